"""FP8 attention (prototype): Triton kernels for numerics/attention.py.

`fp8_attention(q, k, v)` ([B, H, N, D] bf16/fp16, D in {64, 128}) quantizes Q and K per block of
rows and V per channel (three small kernels; V's codes are written transposed, [B, H, D, N], the
K-major layout Hopper's FP8 wgmma wants for the P @ V operand), then runs a FlashAttention-2 style
forward with both matmuls on FP8 tensor cores and its tiles loaded through TMA descriptors:
S = (Qq Kq^T) * sq * sk * sm_scale * log2(e) in float32, online softmax in base 2, P * 256
rounded to E4M3 (the 256 folded into the exponent), O += Pq Vq, and at the end O * sv / l.
Non-causal; an optional key-padding mask (DiT self-attention, text padding).

CODES=False (the CPU interpreter, which has no reliable FP8 casts) keeps every "code" in float32:
the same control flow without rounding, for logic tests only.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from diffquant.quantization.kernels.triton_quant import (
    _RCP_MIN_SCALE,
    _markstein,
    _quotient,
    _row_rcp,
    rcp_div_default,
)

FP8_MAX = 448.0
P_SCALE = 256.0
LOG2E = 1.4426950408889634


@triton.jit
def _to_codes(y, CODES: tl.constexpr, CLAMP: tl.constexpr = True):
    """y as E4M3 codes, saturated to +-448 first unless CLAMP=False (P * 256 <= 256 needs none)."""
    if CLAMP:
        y = tl.minimum(tl.maximum(y, -448.0), 448.0)
    if CODES:  # noqa: SIM108 (constexpr branch)
        c = y.to(tl.float8e4nv)
    else:
        c = y
    return c


@triton.jit
def _row_tile(x_ptr, H, N, sxb, sxh, sxn, sxd, BLOCK: tl.constexpr, D: tl.constexpr):
    """Program (block, batch * head): its BLOCK rows of x [B, H, N, D] (any strides) as float32,
    zero past N; returns (x, rows, cols, row mask, bh)."""
    blk, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    rows = blk * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, D)
    m = (rows < N)[:, None]
    x = tl.load(x_ptr + b.to(tl.int64) * sxb + h * sxh + rows[:, None] * sxn + cols[None, :] * sxd, mask=m,
                other=0.0).to(tl.float32)
    return x, rows, cols, m, bh


@triton.jit
def _quotient_cols(x, scale, RCP_DIV: tl.constexpr):
    """x [R, D] / scale [D], column by column, = div_rn. RCP_DIV: through each column's reciprocal
    with triton_quant's one-fma correction (proven equal to div_rn's fp8 codes for every bf16 / fp16
    (amax, x) pair by tests/quantization/test_kernel_math.py) when no scale is below its floor (one
    uniform branch per program)."""
    s = tl.broadcast_to(scale[None, :], x.shape)
    if RCP_DIV:
        if tl.min(scale, axis=0) >= _RCP_MIN_SCALE:
            r = tl.broadcast_to(tl.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)[None, :], x.shape)
            q = _markstein(x, s, r)
        else:
            q = tl.div_rn(x, s)
    else:
        q = tl.div_rn(x, s)
    return q


@triton.jit
def _quant_row_blocks_kernel(x_ptr, c_ptr, s_ptr, H, N, NB, sxb, sxh, sxn, sxd,
                             BLOCK: tl.constexpr, D: tl.constexpr, CODES: tl.constexpr, RCP_DIV: tl.constexpr):
    """Q / K: one scale per BLOCK rows of one (batch, head); codes contiguous [B, H, N, D]. RCP_DIV:
    the division through the block's reciprocal (triton_quant._quotient: the same codes as div_rn)."""
    x, rows, cols, m, bh = _row_tile(x_ptr, H, N, sxb, sxh, sxn, sxd, BLOCK, D)
    amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
    scale = tl.where(amax > 0.0, tl.div_rn(amax, tl.full((), 448.0, tl.float32)), 1.0)
    codes = _to_codes(_quotient(x, tl.full(x.shape, 1.0, tl.float32) * scale, _row_rcp(scale, RCP_DIV)), CODES)
    tl.store(c_ptr + bh.to(tl.int64) * N * D + rows[:, None] * D + cols[None, :], codes, mask=m)
    tl.store(s_ptr + bh * NB + tl.program_id(0), scale)


@triton.jit
def _channel_amax_kernel(x_ptr, amax_ptr, H, N, sxb, sxh, sxn, sxd, BLOCK: tl.constexpr, D: tl.constexpr):
    """V: per-channel amax of BLOCK rows, combined across programs with atomic max (amax >= 0)."""
    x, rows, cols, m, bh = _row_tile(x_ptr, H, N, sxb, sxh, sxn, sxd, BLOCK, D)
    tl.atomic_max(amax_ptr + bh * D + cols, tl.max(tl.abs(x), axis=0))


@triton.jit
def _quant_v_kernel(x_ptr, amax_ptr, ct_ptr, s_ptr, H, N, SCT, sxb, sxh, sxn, sxd,
                    BLOCK: tl.constexpr, D: tl.constexpr, CODES: tl.constexpr, RCP_DIV: tl.constexpr):
    """V codes, transposed: ct[b, h, d, n] = v[b, h, n, d] / scale[b, h, d] (ct rows SCT apart)."""
    x, rows, cols, m, bh = _row_tile(x_ptr, H, N, sxb, sxh, sxn, sxd, BLOCK, D)
    amax = tl.load(amax_ptr + bh * D + cols)
    scale = tl.where(amax > 0.0, tl.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32)), 1.0)
    codes = _to_codes(_quotient_cols(x, scale, RCP_DIV), CODES)
    tl.store(ct_ptr + (bh.to(tl.int64) * D + cols[None, :]) * SCT + rows[:, None], codes, mask=m)
    if tl.program_id(0) == 0:
        tl.store(s_ptr + bh * D + cols, scale)


@triton.jit
def _attn_fwd_kernel(q_desc, k_desc, vt_desc, sq_ptr, sk_ptr, sv_ptr, o_ptr, km_ptr, H, N, NBQ, NBK,
                     sob, soh, son, sod, qk_scale,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, CODES: tl.constexpr,
                     HAS_KMASK: tl.constexpr):
    """One BLOCK_M query block of one (batch, head); qk_scale = sm_scale * log2(e). Q and K codes
    are read through TMA descriptors over [B * H * N, D] (a tile past this head's N reads the next
    head's rows: those keys are masked to -inf, those queries are not stored), V's transposed codes
    through one over [B * H * D, N] (columns past N are zero-filled). HAS_KMASK: km[b, n] == 0
    masks key n of batch b (a key-padding mask)."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, D)
    q = q_desc.load([bh * N + pid_m * BLOCK_M, 0])
    q_scale = tl.load(sq_ptr + bh * NBQ + pid_m) * qk_scale
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    for start in tl.range(0, N, BLOCK_N):
        k = k_desc.load([bh * N + start, 0])
        qk = tl.dot(q, tl.trans(k))
        sc = q_scale * tl.load(sk_ptr + bh * NBK + start // BLOCK_N)  # > 0
        if HAS_KMASK:
            keep = tl.load(km_ptr + b.to(tl.int64) * N + start + offs_n, mask=start + offs_n < N, other=0) != 0
            qk = tl.where(keep[None, :], qk, float("-inf"))
        elif start + BLOCK_N > N:  # the last, partial block (a uniform branch)
            qk = tl.where((start + offs_n < N)[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1) * sc)
        p = tl.math.exp2(qk * sc - (m_new - 8.0)[:, None])  # 256 * exp2(s - m_new): one fma + ex2
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        vt = vt_desc.load([bh * D, start])
        acc = tl.dot(_to_codes(p, CODES, False), tl.trans(vt), acc)
        m_i = m_new
    sv = tl.load(sv_ptr + bh * D + cols)
    out = acc * sv[None, :] / l_i[:, None]  # l_i carries the same 256
    tl.store(o_ptr + b.to(tl.int64) * sob + h * soh + rows[:, None] * son + cols[None, :] * sod,
             out.to(o_ptr.dtype.element_ty), mask=(rows < N)[:, None])


def _rcp_div(x: torch.Tensor, rcp_div: bool | None) -> bool:
    return rcp_div_default(x.dtype) if rcp_div is None else rcp_div


def quantize_rows_blocked(x: torch.Tensor, block: int, codes: bool = True,
                          rcp_div: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Q or K: [B, H, N, D] (any strides) -> codes [B, H, N, D] contiguous, scales [B, H, ceil(N / block)].
    rcp_div overrides the division's form (benchmarks; both give the same codes)."""
    bsz, heads, n, d = x.shape
    nb = triton.cdiv(n, block)
    c = torch.empty((bsz, heads, n, d), device=x.device, dtype=torch.float8_e4m3fn if codes else torch.float32)
    s = torch.empty((bsz, heads, nb), device=x.device, dtype=torch.float32)
    _quant_row_blocks_kernel[(nb, bsz * heads)](x, c, s, heads, n, nb, *x.stride(), BLOCK=block, D=d, CODES=codes,
                                                RCP_DIV=_rcp_div(x, rcp_div),
                                                num_warps=8)  # 4 warps spill a 128 x 128 tile (sm_90 compile)
    return c, s


def quantize_channels_transposed(v: torch.Tensor, codes: bool = True,
                                 rcp_div: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """V: [B, H, N, D] (any strides) -> codes transposed [B, H, D, N] (rows padded to 16 bytes: TMA
    strides; a view of the first N), per-channel scales [B, H, D]. Two passes: amax, then codes."""
    bsz, heads, n, d = v.shape
    nb = triton.cdiv(n, 64)
    amax = torch.zeros((bsz, heads, d), device=v.device, dtype=torch.float32)
    _channel_amax_kernel[(nb, bsz * heads)](v, amax, heads, n, *v.stride(), BLOCK=64, D=d)
    dt = torch.float8_e4m3fn if codes else torch.float32
    vct = torch.empty((bsz, heads, d, triton.cdiv(n, 16) * 16), device=v.device, dtype=dt)[..., :n]
    sv = torch.empty((bsz, heads, d), device=v.device, dtype=torch.float32)
    _quant_v_kernel[(nb, bsz * heads)](v, amax, vct, sv, heads, n, vct.stride(2), *v.stride(), BLOCK=64, D=d,
                                       CODES=codes, RCP_DIV=_rcp_div(v, rcp_div))
    return vct, sv


def quantize_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_q: int = 128, block_k: int = 128,
                 codes: bool = True):
    """(qc, sq, kc, sk, vct, sv): Q/K codes [B, H, N, D] with per-block scales [B, H, nb]; V codes
    transposed [B, H, D, N] with per-channel scales [B, H, D] (numerics/attention.py)."""
    return (*quantize_rows_blocked(q, block_q, codes), *quantize_rows_blocked(k, block_k, codes),
            *quantize_channels_transposed(v, codes))


def fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float | None = None,
                  key_mask: torch.Tensor | None = None, block_m: int = 128, block_n: int = 128, warps: int = 8,
                  stages: int = 3, codes: bool = True) -> torch.Tensor:
    """Attention of [B, H, N, D] q, k, v (same shape; non-causal) on FP8 tensor cores; out in q's
    dtype, contiguous [B, H, N, D]. key_mask: [B, N] bool, False = a padded key nobody attends to.
    block_m / block_n are also Q's / K's quantization blocks."""
    bsz, heads, n, d = q.shape
    if k.shape != q.shape or v.shape != q.shape or d not in (64, 128):
        raise ValueError(f"fp8_attention: q, k, v must share a [B, H, N, D] shape with D 64 or 128; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    quantized = quantize_qkv(q, k, v, block_m, block_n, codes)
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    return attend_quantized(quantized, q.dtype, sm_scale, key_mask, block_m, block_n, warps, stages, codes)


def attend_quantized(quantized: tuple, out_dtype: torch.dtype, sm_scale: float, key_mask: torch.Tensor | None = None,
                     block_m: int = 128, block_n: int = 128, warps: int = 8, stages: int = 3,
                     codes: bool = True) -> torch.Tensor:
    """The attention kernel on `quantize_qkv`'s output (same block_m / block_n): [B, H, N, D] in
    out_dtype. fp8_attention is quantize_qkv + this; apart so benchmarks can time each."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    qc, sq, kc, sk, vct, sv = quantized
    bsz, heads, n, d = qc.shape
    o = torch.empty(qc.shape, device=qc.device, dtype=out_dtype)  # contiguous, as the custom op's fake says
    rows = bsz * heads * n
    q_desc = TensorDescriptor(qc, [rows, d], [d, 1], [block_m, d])
    k_desc = TensorDescriptor(kc, [rows, d], [d, 1], [block_n, d])
    vt_desc = TensorDescriptor(vct, [bsz * heads * d, n], [vct.stride(2), 1], [d, block_n])
    grid = (triton.cdiv(n, block_m), bsz * heads)
    km = key_mask.to(torch.uint8).contiguous() if key_mask is not None else sq  # sq: any pointer, never read
    _attn_fwd_kernel[grid](q_desc, k_desc, vt_desc, sq, sk, sv, o, km, heads, n, sq.shape[-1], sk.shape[-1],
                           *o.stride(), sm_scale * LOG2E, BLOCK_M=block_m, BLOCK_N=block_n, D=d, CODES=codes,
                           HAS_KMASK=key_mask is not None, num_warps=warps, num_stages=stages)
    return o
