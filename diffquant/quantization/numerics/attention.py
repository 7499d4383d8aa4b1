"""FP8 attention (prototype): how Q, K, V are quantized, and the attention the kernel approximates.

Layout [B, H, N, D] (as F.scaled_dot_product_attention). Dynamic scales, amax / 448, E4M3FN:

- Q: one scale per (batch, head, block of `block_q` consecutive queries);
- K: one scale per (batch, head, block of `block_k` consecutive keys);
- V: one scale per (batch, head, channel d): out[:, d] = sum_n P[m, n] V[n, d], so a per-channel
  scale factors out of the sum; a per-token one would not.

`fp8_attention_ref` is exact attention (float64 softmax, no rounding of P) on the dequantized
inputs: the kernel, which also rounds P to E4M3 (x 256) and accumulates in float32, is held to an
error budget against it; the quantization error itself shows against attention on the original
inputs (`sdpa_ref`). `fp8_attention_emulated` follows the kernel's arithmetic block by block
(online softmax in base 2, P * 256 rounded to E4M3, float32 accumulation): the CPU path of
`diffquant::fp8_attention`, so CPU runs show the kernel's quality.
"""

from __future__ import annotations

import math

import torch

from diffquant.quantization.numerics.fp8 import FP8_MAX, fp8_cast, scale_from_amax

P_SCALE = 256.0  # the kernel rounds P * 256 to E4M3 (P <= 1: keeps small probabilities out of subnormals)


def _block_amax(x: torch.Tensor, block: int) -> torch.Tensor:
    """[B, H, N, D] -> amax over each block of `block` rows and all of D: [B, H, ceil(N / block)]."""
    b, h, n, d = x.shape
    pad = (-n) % block
    xa = torch.nn.functional.pad(x.abs().float(), (0, 0, 0, pad))
    return xa.reshape(b, h, (n + pad) // block, block * d).amax(dim=-1)  # x may be a strided view


def fp8_quantize_rows_blocked(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q or K: [B, H, N, D] -> (codes [B, H, N, D] fp8, scales [B, H, ceil(N / block)] float32)."""
    scale = scale_from_amax(_block_amax(x, block), FP8_MAX)
    per_row = scale.repeat_interleave(block, dim=-1)[..., : x.shape[2], None]
    return fp8_cast(x, per_row), scale


def fp8_quantize_channels(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """V: [B, H, N, D] -> (codes [B, H, N, D] fp8, scales [B, H, D] float32)."""
    scale = scale_from_amax(v.abs().float().amax(dim=2), FP8_MAX)
    return fp8_cast(v, scale[:, :, None, :]), scale


def dequantize_rows_blocked(q: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    per_row = scale.repeat_interleave(block, dim=-1)[..., : q.shape[2], None]
    return q.float() * per_row


def _masked(s: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """Scores [B, H, M, N] with keys where key_mask [B, N] is False set to -inf."""
    return s if key_mask is None else s.masked_fill(~key_mask[:, None, None, :], float("-inf"))


def sdpa_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float | None = None,
             key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Exact attention in float64: softmax(q k^T * sm_scale) v, [B, H, N, D]; key_mask [B, N] bool."""
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    s = _masked(torch.einsum("bhmd,bhnd->bhmn", q.double(), k.double()) * sm_scale, key_mask)
    return torch.einsum("bhmn,bhnd->bhmd", s.softmax(dim=-1), v.double())


def fp8_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_q: int = 128, block_k: int = 128,
                      sm_scale: float | None = None, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """What the FP8 kernel computes, without its P rounding: exact attention (float64) on the
    dequantized Q (per query block), K (per key block) and V (per channel)."""
    qq, sq = fp8_quantize_rows_blocked(q, block_q)
    kq, sk = fp8_quantize_rows_blocked(k, block_k)
    vq, sv = fp8_quantize_channels(v)
    return sdpa_ref(dequantize_rows_blocked(qq, sq, block_q), dequantize_rows_blocked(kq, sk, block_k),
                    vq.float() * sv[:, :, None, :], sm_scale, key_mask)


def fp8_attention_emulated(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_q: int = 128, block_k: int = 128,
                           sm_scale: float | None = None, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The FP8 kernel's arithmetic in float32 (kernels/triton_attention.py), [B, H, N, D] -> float32."""
    qq, sq = fp8_quantize_rows_blocked(q, block_q)
    kq, sk = fp8_quantize_rows_blocked(k, block_k)
    vq, sv = fp8_quantize_channels(v)
    n = q.shape[2]
    qk_scale = (1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale) * math.log2(math.e)
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for m0 in range(0, n, block_q):
        qb, m_i = qq[:, :, m0:m0 + block_q].float(), None
        for n0 in range(0, n, block_k):
            qk = qb @ kq[:, :, n0:n0 + block_k].float().transpose(-1, -2)
            qk = _masked(qk, None if key_mask is None else key_mask[:, n0:n0 + block_k])
            sc = (sq[:, :, m0 // block_q] * qk_scale * sk[:, :, n0 // block_k])[..., None, None]
            m_new = (qk.amax(dim=-1) * sc[..., 0]) if m_i is None else torch.maximum(m_i, qk.amax(dim=-1) * sc[..., 0])
            p = torch.exp2(qk * sc - (m_new - 8.0)[..., None])  # 256 * exp2(s - m)
            pv = p.to(torch.float8_e4m3fn).float() @ vq[:, :, n0:n0 + block_k].float()
            if m_i is None:
                l_i, acc = p.sum(dim=-1), pv
            else:
                alpha = torch.exp2(m_i - m_new)
                l_i, acc = l_i * alpha + p.sum(dim=-1), acc * alpha[..., None] + pv
            m_i = m_new
        out[:, :, m0:m0 + block_q] = acc * sv[:, :, None, :] / l_i[..., None]
    return out
