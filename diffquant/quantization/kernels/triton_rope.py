"""Triton kernel: q (or k) RMSNorm + rotary embedding in one pass, written straight into the
token-concatenated [B, N, H, D] tensor attention reads (numerics/rope.py is the spec).

Inductor generates this as two or three kernels in FLUX's double blocks (row statistics, normalize,
concatenate + rotate) and as a looped reduction in the single blocks; run 9c measured them at
118 us (single block, 114 MB of q / k in and out: ~1 TB/s) and ~164 us (double block) per call.
Here each program normalizes and rotates BLOCK_R rows of head_dim elements held in registers:
one read of the projection output, one write. The result follows the spec's roundings (the norm's
output rounded to the input dtype before the rotation) up to float32 summation order and fma
contraction: not bit-exact, tested within a stated budget.

This module imports triton at import time; quantization/qk_rope.py imports it lazily, on CUDA.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from diffquant.quantization.kernels.triton_launch import LaunchCache, spec_key

_LAUNCHES = LaunchCache()
BLOCK_R, WARPS = 16, 4


@triton.jit
def _rms_norm_rope_kernel(
    x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, rows, tokens, heads, stride_xb, stride_xn,
    stride_ob, stride_on, tok_off, eps, D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Rows r = (b, n, h) of one part; output token = tok_off + n (the part's place in the concatenation)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask = (r < rows)[:, None]
    h = r % heads
    n = (r // heads) % tokens
    b = r // (heads * tokens)
    d = tl.arange(0, D)[None, :]
    x = tl.load(x_ptr + (b * stride_xb + n * stride_xn + h * D)[:, None] + d, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt_rn(tl.sum(xf * xf, axis=1) / D + eps)
    w = tl.load(w_ptr + d).to(tl.float32)
    y = (xf * rstd[:, None] * w).to(x.dtype).to(tl.float32)  # the norm's output, in the input dtype
    trig = (tok_off + n)[:, None] * D + d
    c = tl.load(cos_ptr + trig, mask=mask, other=0.0)
    s = tl.load(sin_ptr + trig, mask=mask, other=0.0)
    ye, yo = tl.split(tl.reshape(y, [BLOCK_R, D // 2, 2]))
    ce, co = tl.split(tl.reshape(c, [BLOCK_R, D // 2, 2]))
    se, so = tl.split(tl.reshape(s, [BLOCK_R, D // 2, 2]))
    out = tl.reshape(tl.join(ye * ce - yo * se, yo * co + ye * so), [BLOCK_R, D])
    o_off = (b * stride_ob + (tok_off + n) * stride_on + h * D)[:, None] + d
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm_rope(parts: list[torch.Tensor], weights: list[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor,
                  eps: float, head_dim: int) -> torch.Tensor:
    """numerics.rope.rms_norm_rope_ref on CUDA: parts [B, N_i, H * head_dim] (last dim contiguous),
    weights [head_dim], cos / sin [sum N_i, head_dim] float32 -> [B, sum N_i, H, head_dim]."""
    b, _, width = parts[0].shape
    heads = width // head_dim
    total = sum(p.shape[1] for p in parts)
    out = torch.empty((b, total, heads, head_dim), device=parts[0].device, dtype=parts[0].dtype)
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    tok_off = 0
    for x, w in zip(parts, weights, strict=True):
        x = x if x.stride(-1) == 1 else x.contiguous()
        rows = b * x.shape[1] * heads
        if rows:
            args = (x, w, cos, sin, out, rows, x.shape[1], heads, x.stride(0), x.stride(1), out.stride(0),
                    out.stride(1), tok_off, float(eps), head_dim, BLOCK_R)
            grid = (triton.cdiv(rows, BLOCK_R), 1, 1)
            _LAUNCHES.launch((_rms_norm_rope_kernel, spec_key(args)), grid, args, x.device,
                             lambda args=args, grid=grid: _rms_norm_rope_kernel[grid](*args, num_warps=WARPS))
        tok_off += x.shape[1]
    return out
