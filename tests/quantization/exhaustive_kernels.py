"""Triton kernels for the exhaustive GPU tests of the fused kernel's math (test_kernel_math.py):
each walks every input of a finite domain and counts mismatches with atomics. Imported only by
GPU tests (it imports triton)."""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

from diffquant.quantization.kernels import triton_quant as tq


@triton.jit
def tanh_mismatch_kernel(count_ptr, PER_PROGRAM: tl.constexpr, BLOCK: tl.constexpr):
    """Every float32 bit pattern in [pid * PER_PROGRAM, (pid + 1) * PER_PROGRAM): branch-free tanhf
    vs libdevice's, bit for bit (two NaN results count as equal)."""
    base = tl.program_id(0).to(tl.int64) * PER_PROGRAM
    offs = tl.arange(0, BLOCK).to(tl.int64)
    bad = tl.zeros((BLOCK,), tl.int32)
    for i in tl.range(0, PER_PROGRAM, BLOCK):
        x = (base + i + offs).to(tl.uint32).to(tl.float32, bitcast=True)
        a, b = tq._tanhf_select(x), libdevice.tanh(x)
        same = (a.to(tl.uint32, bitcast=True) == b.to(tl.uint32, bitcast=True)) | ((a != a) & (b != b))
        bad += (~same).to(tl.int32)
    tl.atomic_add(count_ptr, tl.sum(bad, axis=0))


@triton.jit
def division_mismatch_kernel(count_ptr, QMAX: tl.constexpr, IS_INT8: tl.constexpr, IS_BF16: tl.constexpr,
                             BLOCK: tl.constexpr):
    """Program p: the row amax with 16-bit pattern p (bf16 or fp16), its scale as the kernels
    compute it, then every 16-bit y with |y| <= amax: `_quotient` (reciprocal path) vs div_rn.
    Counts [quotient bits differ where |quotient| >= 2^-30, codes differ, quotients differ below]."""
    half = tl.float16 if not IS_BF16 else tl.bfloat16
    amax = tl.program_id(0).to(tl.int16).to(half, bitcast=True).to(tl.float32)
    scale = tl.where(amax > 0.0, tl.div_rn(amax, tl.full((), QMAX, tl.float32)), 1.0)
    rcp = tq._row_rcp(scale, True)
    scale_b = tl.full((BLOCK,), 1.0, tl.float32) * scale
    offs = tl.arange(0, BLOCK)
    bad_q = tl.zeros((BLOCK,), tl.int32)
    bad_c = tl.zeros((BLOCK,), tl.int32)
    tiny_q = tl.zeros((BLOCK,), tl.int32)
    for k0 in tl.range(0, 65536, BLOCK):
        y = (k0 + offs).to(tl.int16).to(half, bitcast=True).to(tl.float32)
        ok = tl.abs(y) <= amax  # also drops NaN and inf patterns
        ref = tl.div_rn(y, scale_b)
        got = tq._quotient(y, scale_b, rcp)
        differ = ok & (ref.to(tl.uint32, bitcast=True) != got.to(tl.uint32, bitcast=True))
        big = tl.abs(ref) >= 9.313225746154785e-10  # 2^-30
        bad_q += (differ & big).to(tl.int32)
        tiny_q += (differ & ~big).to(tl.int32)
        c_ref = tq._saturate_cast(ref, QMAX, IS_INT8, True).to(tl.int8, bitcast=True)
        c_got = tq._saturate_cast(got, QMAX, IS_INT8, True).to(tl.int8, bitcast=True)
        bad_c += (ok & (c_ref != c_got)).to(tl.int32)
    tl.atomic_add(count_ptr, tl.sum(bad_q, axis=0))
    tl.atomic_add(count_ptr + 1, tl.sum(bad_c, axis=0))
    tl.atomic_add(count_ptr + 2, tl.sum(tiny_q, axis=0))


@triton.jit
def gelu_kernel(x_ptr, y_ptr, n, TANH: tl.constexpr, BLOCK: tl.constexpr):
    """y = the fused kernel's rounded gelu_tanh of x (elementwise)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(y_ptr + offs, tq._act_rounded(x, TANH), mask=offs < n)
