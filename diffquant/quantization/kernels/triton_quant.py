"""Triton kernels: one-pass dynamic per-token activation quantization (FP8 E4M3FN and Int8).

Each program loads whole rows once, takes the row's amax, computes the scale and writes the
quantized row and its scale: one read of x, one write of q, instead of the 3-4 passes of the
eager reference. The numerics are `numerics.fp8_quantize_per_row` / `numerics.int8_quantize_per_row`
bit for bit (the tests compare with rtol=0, atol=0):

- scale = amax / qmax with an IEEE round-to-nearest division (`tl.div_rn`; Triton's plain `/` on
  float32 is the approximate `div.full` and can differ in the last bit), 1.0 for an all-zero row;
- q = x / scale, again correctly rounded, clamped to +-qmax before the cast (torch's fp8 cast does
  not saturate), then cast to E4M3FN with round-to-nearest-even, or rounded half-to-even (`rint`,
  PTX cvt.rni) to int8. In the fused kernel, bf16 / fp16 rows take the quotient from the row's
  reciprocal by one multiply and one fma correction (Markstein): the codes equal div_rn's for
  every pair a bf16 / fp16 row can hold (an exhaustive GPU test over all of them); float32 rows
  and rows with a tiny scale keep `div_rn`.

This module imports triton at import time; only `triton_ops` imports it, lazily, on CUDA.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from diffquant.quantization.kernels.triton_launch import LaunchCache, spec_key

FP8_MAX = 448.0
INT8_MAX = 127.0
_LAUNCHES = LaunchCache()
_MAX_ROW_BLOCK = 16384  # rows up to this many elements stay in registers (one read of x)
# Triton's CPU interpreter (TRITON_INTERPRET=1, for debugging without a GPU) has no libdevice.rint;
# there, round half to even by adding and subtracting 1.5 * 2^23 (exact for |y| <= 127).
_RINT = os.environ.get("TRITON_INTERPRET", "0") != "1"  # also: libdevice available (tanh, erf)


@triton.jit
def _round_half_even(y, RINT: tl.constexpr):
    if RINT:  # noqa: SIM108 (constexpr branch, resolved at compile time)
        r = libdevice.rint(y)  # PTX cvt.rni: round half to even, like torch.round
    else:
        r = (y + 12582912.0) - 12582912.0
    return r


@triton.jit
def _saturate_cast(y, QMAX: tl.constexpr, IS_INT8: tl.constexpr, RINT: tl.constexpr):
    """Clamp to +-QMAX (torch's fp8 cast does not saturate), then E4M3FN round-to-nearest-even or
    int8 round-half-to-even (like torch.round)."""
    y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
    if IS_INT8:  # noqa: SIM108 (constexpr branch)
        q = _round_half_even(y, RINT).to(tl.int8)
    else:
        q = y.to(tl.float8e4nv)
    return q


@triton.jit
def _codes(x, scale, QMAX: tl.constexpr, IS_INT8: tl.constexpr, RINT: tl.constexpr):
    """x / scale (IEEE division, float32; scale broadcast to x's shape) as fp8 / int8 codes."""
    return _saturate_cast(tl.div_rn(x, scale), QMAX, IS_INT8, RINT)


# Rows whose scale is below this keep div_rn. Above it, an element whose quotient is >= 2^-30 is
# >= 2^-99, so the fma residual below is a normal float (exact); smaller quotients round to a zero
# code either way.
_RCP_MIN_SCALE = tl.constexpr(2.0**-69)


@triton.jit
def _row_rcp(scale, RCP_DIV: tl.constexpr):
    """The row's correctly rounded reciprocal for `_quotient`, or 0 where the row keeps div_rn."""
    if RCP_DIV:  # noqa: SIM108 (constexpr branch)
        rcp = tl.where(scale >= _RCP_MIN_SCALE, tl.div_rn(tl.full((), 1.0, tl.float32), scale), 0.0)
    else:
        rcp = tl.full((), 0.0, tl.float32)
    return rcp


@triton.jit
def _markstein(x, scale, rcp):
    """x / scale from rcp = RN(1 / scale) (shapes broadcast): q = x * rcp, then one fma correction
    q + (x - q * scale) * rcp, written as q + (q * scale - x) * (-rcp) so that x = -0 gives -0
    however `-x` is lowered (see `_quotient`). The one copy of this formula."""
    q = x * rcp
    return tl.fma(tl.fma(q, scale, -x), -rcp, q)


@triton.jit
def _quotient(x, scale, rcp):
    """x / scale. rcp > 0 (the row's RN(1 / scale), a uniform branch): q = x * rcp, then one fma
    correction q + (x - q * scale) * rcp (Markstein; the residual is exact in an fma). It is
    computed as q + (q * scale - x) * (-rcp) so that x = -0 gives -0 however `-x` is lowered
    (Triton emits unary minus as 0 - x, which maps -0 to +0: runs 7b/7c lost the sign of zero
    that way in two other forms, the only codes that differed). The exhaustive GPU test finds it
    equal to div_rn for every bf16 / fp16 pair whose quotient is >= 2^-30, and the codes equal for
    every pair. rcp == 0: div_rn. scale broadcasts to x's shape."""
    if rcp > 0.0:  # noqa: SIM108 (a uniform runtime branch: a ternary would compute both sides)
        q = _markstein(x, scale, rcp)
    else:
        q = tl.div_rn(x, scale)
    return q


@triton.jit
def _codes_rcp(x, scale, rcp, QMAX: tl.constexpr, IS_INT8: tl.constexpr, RINT: tl.constexpr):
    """`_codes` through `_quotient` (rcp from `_row_rcp`)."""
    return _saturate_cast(_quotient(x, scale, rcp), QMAX, IS_INT8, RINT)


@triton.jit
def _codes_mul(x, inv_scale, QMAX: tl.constexpr, IS_INT8: tl.constexpr, RINT: tl.constexpr):
    """x * (1 / scale): NOT the numerics (a benchmark probe of the division's cost)."""
    return _saturate_cast(x * inv_scale, QMAX, IS_INT8, RINT)


@triton.jit
def _quant_rows_kernel(
    x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm,
    QMAX: tl.constexpr, IS_INT8: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr, RINT: tl.constexpr,
    EXACT_DIV: tl.constexpr = True,
):
    """ROWS whole rows per program. x: [M, K] (unit stride along K) -> q: [M, K], s: [M].
    EXACT_DIV=False multiplies by the row's reciprocal instead of dividing (NOT the numerics: a
    benchmark probe of how much the per-element IEEE division costs)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols[None, :] < K)
    rows64 = rows.to(tl.int64)
    x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)  # [ROWS]; max is exact in any order
    qmax = tl.full(amax.shape, QMAX, tl.float32)
    # All-zero row -> scale 1: 0 / 1 encodes exactly and nothing divides by zero.
    scale = tl.where(amax > 0.0, tl.div_rn(amax, qmax), 1.0)
    if EXACT_DIV:
        q = _codes(x, tl.broadcast_to(scale[:, None], x.shape), QMAX, IS_INT8, RINT)
    else:
        q = _codes_mul(x, tl.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)[:, None], QMAX, IS_INT8, RINT)
    tl.store(q_ptr + rows64[:, None] * stride_qm + cols[None, :], q, mask=mask)
    tl.store(s_ptr + rows, scale, mask=row_ok)


@triton.jit
def _quant_long_rows_kernel(
    x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm,
    QMAX: tl.constexpr, IS_INT8: tl.constexpr, BLOCK_K: tl.constexpr, RINT: tl.constexpr,
):
    """Rows longer than _MAX_ROW_BLOCK: one row per program, amax pass then cast pass (the
    second read mostly hits L2)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K):
        x = tl.load(x_ptr + row * stride_xm + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
        acc = tl.maximum(acc, tl.abs(x))
    amax = tl.max(acc, axis=0)
    scale = tl.where(amax > 0.0, tl.div_rn(amax, tl.full((), QMAX, tl.float32)), 1.0)
    for k0 in tl.range(0, K, BLOCK_K):
        m = k0 + cols < K
        x = tl.load(x_ptr + row * stride_xm + k0 + cols, mask=m, other=0.0).to(tl.float32)
        q = _codes(x, tl.full(x.shape, 1.0, tl.float32) * scale, QMAX, IS_INT8, RINT)
        tl.store(q_ptr + row * stride_qm + k0 + cols, q, mask=m)
    tl.store(s_ptr + row, scale)


# torch's CUDA GELU, tanh form (aten/src/ATen/native/cuda/ActivationGeluKernel.cu), float32 opmath:
# the same constants (rounded from double) and the one multiply-add nvcc contracts. Bit-identical to
# F.gelu(x, approximate="tanh") on the H200 for bf16, fp16 and fp32 inputs (GPU test). (The erf form
# through libdevice.erf was not: 10-600 codes per 4224-row test differed, so it is not fused.)
_GELU_BETA = tl.constexpr(1.4142135623730951 * 1.1283791670955126 * 0.5)  # M_SQRT2 * M_2_SQRTPI * 0.5
_GELU_KAPPA = tl.constexpr(0.044715)
# |gelu_tanh(x)| <= 0.16997 for x <= 0 (its minimum, near x = -0.7518); rounded to bf16/fp16 at most
# 0.1709. A row whose largest gelu output is above this bound takes its amax from max(x) alone.
_GELU_NEG_BOUND = tl.constexpr(0.172)
ACT_CODES = {"gelu_tanh": 1}


# How the fused kernel computes tanhf: TANH_FORMULA (Triton's CPU interpreter, no libdevice; not
# bit-exact on GPUs), TANH_LIBDEVICE (libdevice's __nv_tanhf: a per-element branch on |x| < 0.6), or
# TANH_SELECT (the same PTX instructions with both sides computed and one selected: no divergence;
# equal to libdevice's for all 2^32 float32 inputs, exhaustive GPU test).
TANH_FORMULA, TANH_LIBDEVICE, TANH_SELECT = 0, 1, 2
# libdevice's __nv_tanhf as Triton 3.6 inlines it for sm_90 (read from its PTX), branch-free:
# |x| < 0.6 (or NaN): odd polynomial; else 1 - 2 / (2^(2|x| log2 e) + 1) with ex2/rcp.approx,
# 1.0 from |x| >= 9.0109, and x's sign.
_TANHF_SELECT_PTX = tl.constexpr("""{
.reg .f32 a, x2, p, ts, e, tb;
.reg .b32 sgn, bits;
.reg .pred sat, small;
abs.ftz.f32 a, $1;
mul.f32 x2, $1, $1;
fma.rn.ftz.f32 p, 0f3C80F082, x2, 0fBD563CAE;
fma.rn.ftz.f32 p, p, x2, 0f3E085941;
fma.rn.ftz.f32 p, p, x2, 0fBEAAA9ED;
fma.rn.ftz.f32 p, p, x2, 0f00000000;
fma.rn.ftz.f32 ts, p, $1, $1;
mul.f32 e, a, 0f4038AA3B;
ex2.approx.ftz.f32 e, e;
add.f32 e, e, 0f3F800000;
rcp.approx.ftz.f32 e, e;
fma.rn.ftz.f32 tb, e, 0fC0000000, 0f3F800000;
setp.ge.f32 sat, a, 0f41102CB4;
selp.f32 tb, 0f3F800000, tb, sat;
mov.b32 sgn, $1;
and.b32 sgn, sgn, -2147483648;
mov.b32 bits, tb;
or.b32 bits, bits, sgn;
mov.b32 tb, bits;
setp.ltu.f32 small, a, 0f3F19999A;
selp.f32 $0, ts, tb, small;
}""")


@triton.jit
def _tanhf_select(x):
    """libdevice's tanhf, bit for bit, without its branch (x: float32)."""
    return tl.inline_asm_elementwise(_TANHF_SELECT_PTX, "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _gelu_tanh(x, TANH: tl.constexpr):
    """x: float32; TANH picks the tanhf (TANH_* above)."""
    inner = _GELU_BETA * tl.fma(x * x * x, tl.full(x.shape, _GELU_KAPPA, tl.float32), x)
    if TANH == 2:  # TANH_SELECT
        t = _tanhf_select(inner)
    elif TANH == 1:  # TANH_LIBDEVICE
        t = libdevice.tanh(inner)
    else:
        t = 1.0 - 2.0 / (tl.exp(2.0 * inner) + 1.0)
    return 0.5 * x * (1.0 + t)


@triton.jit
def _act_rounded(x, TANH: tl.constexpr):
    """gelu_tanh of a loaded block, rounded to the block's dtype (as torch's output is), as float32."""
    return _gelu_tanh(x.to(tl.float32), TANH).to(x.dtype).to(tl.float32)


@triton.jit
def _act_amax(x_row, KX, CHUNK: tl.constexpr, TANH: tl.constexpr):
    """max |act(x)| over a row, every element's activation computed."""
    cols = tl.arange(0, CHUNK)
    acc = tl.zeros((CHUNK,), dtype=tl.float32)
    for k0 in tl.range(0, KX, CHUNK):
        x = tl.load(x_row + k0 + cols, mask=k0 + cols < KX, other=0.0)
        acc = tl.maximum(acc, tl.abs(_act_rounded(x, TANH)))  # act(0) = 0 on masked lanes
    return tl.max(acc, axis=0)


@triton.jit
def _abs_max(row_ptr, K, CHUNK: tl.constexpr):
    cols = tl.arange(0, CHUNK)
    acc = tl.zeros((CHUNK,), dtype=tl.float32)
    for k0 in tl.range(0, K, CHUNK):
        acc = tl.maximum(acc, tl.abs(tl.load(row_ptr + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)))
    return tl.max(acc, axis=0)


@triton.jit
def _act_quant_chunked_kernel(
    p_ptr, x_ptr, q_ptr, s_ptr, KP, KX, stride_pm, stride_xm, stride_qm,
    QMAX: tl.constexpr, IS_INT8: tl.constexpr, HAS_P: tl.constexpr, CHUNK: tl.constexpr,
    MONOTONE: tl.constexpr, RINT: tl.constexpr, TANH: tl.constexpr, RCP_DIV: tl.constexpr,
):
    """One row per program, in CHUNK-wide steps (small programs, many per SM, so loads overlap the
    activation math): q[row] = codes(cat(p[row], gelu_tanh(x[row]))).

    Pass 1 finds the row's amax, pass 2 (a re-read that hits L2) writes the codes. MONOTONE (bf16 /
    fp16 inputs): gelu_tanh increases on x >= 0 and is above -0.172 below, so when
    act(max x) > 0.172 it is the row's max |act| and pass 1 reads x without any tanh; rows where it
    is not (all inputs small or negative) compute every activation. The rounded activation keeps
    that order because neighbouring bf16/fp16 inputs are far apart compared with tanhf's error;
    fp32 inputs always take the full pass. Either way the amax is exactly the reference's.
    RCP_DIV (bf16 / fp16 inputs): quotients through the row's reciprocal (`_quotient`)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, CHUNK)
    x_row = x_ptr + row * stride_xm
    if MONOTONE:
        acc = tl.full((CHUNK,), float("-inf"), tl.float32)
        for k0 in tl.range(0, KX, CHUNK):
            acc = tl.maximum(acc, tl.load(x_row + k0 + cols, mask=k0 + cols < KX, other=float("-inf")).to(tl.float32))
        xmax = tl.max(acc, axis=0).to(x_ptr.dtype.element_ty)
        amax = _act_rounded(xmax, TANH)
        if amax <= _GELU_NEG_BOUND:
            amax = _act_amax(x_row, KX, CHUNK, TANH)
    else:
        amax = _act_amax(x_row, KX, CHUNK, TANH)
    if HAS_P:
        amax = tl.maximum(amax, _abs_max(p_ptr + row * stride_pm, KP, CHUNK))
    scale = tl.where(amax > 0.0, tl.div_rn(amax, tl.full((), QMAX, tl.float32)), 1.0)
    rcp = _row_rcp(scale, RCP_DIV)
    scale_b = tl.full((CHUNK,), 1.0, tl.float32) * scale
    q_row = q_ptr + row * stride_qm
    if HAS_P:
        for k0 in tl.range(0, KP, CHUNK):
            m = k0 + cols < KP
            p = tl.load(p_ptr + row * stride_pm + k0 + cols, mask=m, other=0.0).to(tl.float32)
            tl.store(q_row + k0 + cols, _codes_rcp(p, scale_b, rcp, QMAX, IS_INT8, RINT), mask=m)
    for k0 in tl.range(0, KX, CHUNK):
        m = k0 + cols < KX
        y = _act_rounded(tl.load(x_row + k0 + cols, mask=m, other=0.0), TANH)
        tl.store(q_row + KP + k0 + cols, _codes_rcp(y, scale_b, rcp, QMAX, IS_INT8, RINT), mask=m)
    tl.store(s_ptr + row, scale)


@functools.lru_cache(maxsize=256)
def _launch_config(k: int) -> tuple[int, int, int]:
    """(rows per program, warps, BLOCK_K) for rows of k elements that fit in registers."""
    block = triton.next_power_of_2(max(k, 1))
    # Short rows: 16 per program. Only the two families the H200 run verified bit-exact are used
    # (16 rows for K <= 128, one row above); 2-8 rows per program were never checked there.
    rows = 16 if block <= 128 else 1
    warps = max(1, min(16, rows * block // 512))
    return rows, warps, block


def quantize_per_token(x: torch.Tensor, fmt: str, rows: int | None = None, warps: int | None = None,
                       exact_div: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, K] float (CUDA) -> (q: [M, K] float8_e4m3fn | int8, scale: [M, 1] float32).

    rows / warps override the launch configuration and exact_div=False swaps the IEEE division for
    a reciprocal multiply (rows up to 16384 elements; not bit-exact): for benchmarking only."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    is_int8 = fmt == "int8"
    q = torch.empty((m, k), device=x.device, dtype=torch.int8 if is_int8 else torch.float8_e4m3fn)
    scale = torch.empty((m, 1), device=x.device, dtype=torch.float32)
    if m == 0:
        return q, scale
    qmax = INT8_MAX if is_int8 else FP8_MAX
    r, w, block = _launch_config(k)
    if block <= _MAX_ROW_BLOCK:
        r, w = rows or r, warps or w
        kernel, grid = _quant_rows_kernel, (triton.cdiv(m, r), 1, 1)
        args = (x, q, scale, m, k, x.stride(0), q.stride(0), qmax, is_int8, r, block, _RINT, exact_div)
    else:
        kernel, grid, w = _quant_long_rows_kernel, (m, 1, 1), warps or 8
        args = (x, q, scale, m, k, x.stride(0), q.stride(0), qmax, is_int8, 4096, _RINT)
    _LAUNCHES.launch((kernel, w, spec_key(args)), grid, args, x.device,
                     lambda: kernel[grid](*args, num_warps=w))
    return q, scale


# The chunked kernel's default launch and math: the best of bench_act_quant's sweep at FLUX's and
# Wan2.2's shapes with the branch-free tanhf and the reciprocal division (runs 7b-7d, all bit-exact:
# FLUX single block 112.9 us, double-block FF 87.9 us, Wan2.2's FF 700 us; run 6b's kernel, libdevice
# tanhf + div_rn at CHUNK 1024: 146.4 / 113.3 / 936 in the same run). (Whole rows in registers,
# one program per row, measured 352 / 258 / 1971 us in run 6b: one program per SM at a time.)
ACT_CHUNK, ACT_WARPS = 2048, 8
ACT_TANH, ACT_RCP_DIV = TANH_SELECT, True


def rcp_div_default(dtype: torch.dtype) -> bool:
    """Whether a kernel divides through the reciprocal (`_quotient`) by default: proven equal in codes
    to div_rn for bf16 / fp16 inputs only, and not in the CPU interpreter (unfused fma)."""
    return dtype in (torch.bfloat16, torch.float16) and _RINT and ACT_RCP_DIV


def act_quantize_per_token(x: torch.Tensor, prefix: torch.Tensor | None, act: str, fmt: str,
                           chunk: int | None = None, warps: int | None = None, monotone: bool | None = None,
                           tanh: int | None = None, rcp_div: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, Kx], prefix: [M, Kp] | None (CUDA, x's dtype) -> (q: [M, Kp + Kx], scale: [M, 1] f32):
    per-token quantization of cat([prefix, act(x)], -1) (numerics/activations.py), bit-exact.
    chunk / warps / monotone / tanh (TANH_*) / rcp_div override the launch (benchmarks)."""
    if act not in ACT_CODES:
        raise ValueError(f"act_quantize_per_token: no kernel for activation {act!r}; valid: {', '.join(ACT_CODES)}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    if prefix is not None:
        prefix = prefix if prefix.stride(-1) == 1 else prefix.contiguous()
        if prefix.shape[0] != x.shape[0] or prefix.dtype != x.dtype:
            raise ValueError(f"act_quantize_per_token: prefix {tuple(prefix.shape)} {prefix.dtype} does not "
                             f"match x {tuple(x.shape)} {x.dtype}")
    m, kx = x.shape
    kp = 0 if prefix is None else prefix.shape[1]
    is_int8 = fmt == "int8"
    q = torch.empty((m, kp + kx), device=x.device, dtype=torch.int8 if is_int8 else torch.float8_e4m3fn)
    scale = torch.empty((m, 1), device=x.device, dtype=torch.float32)
    if m == 0:
        return q, scale
    p_arg = prefix if prefix is not None else x
    half = x.dtype in (torch.bfloat16, torch.float16)
    mono = half if monotone is None else monotone
    rcp_div = rcp_div_default(x.dtype) if rcp_div is None else rcp_div
    tanh = (ACT_TANH if _RINT else TANH_FORMULA) if tanh is None else tanh
    args = (p_arg, x, q, scale, kp, kx, p_arg.stride(0), x.stride(0), q.stride(0),
            INT8_MAX if is_int8 else FP8_MAX, is_int8, prefix is not None, chunk or ACT_CHUNK, mono, _RINT,
            tanh, rcp_div)
    w, grid, kern = warps or ACT_WARPS, (m, 1, 1), _act_quant_chunked_kernel
    _LAUNCHES.launch((kern, w, spec_key(args)), grid, args, x.device, lambda: kern[grid](*args, num_warps=w))
    return q, scale
