"""Spec of the fused q/k RMSNorm + rotary embedding (kernels/triton_rope.py): what diffusers' FLUX
attention processor computes between the q/k projections and attention, in its own torch ops."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_rope_ref(parts: list[torch.Tensor], weights: list[torch.Tensor], cos: torch.Tensor,
                      sin: torch.Tensor, eps: float, head_dim: int) -> torch.Tensor:
    """parts[i]: [B, N_i, H * head_dim] (a projection's output, any row stride), weights[i]: [head_dim]
    -> [B, sum N_i, H, head_dim]: torch.nn.RMSNorm(head_dim, eps) of each part's heads with its
    weight, the parts concatenated along tokens, then diffusers' apply_rotary_emb(use_real=True,
    unbind_dim=-1, sequence_dim=1) with cos / sin: [sum N_i, head_dim] float32."""
    normed = [F.rms_norm(p.unflatten(-1, (-1, head_dim)), (head_dim,), w, eps) for p, w in zip(parts, weights,
                                                                                              strict=True)]
    x = normed[0] if len(normed) == 1 else torch.cat(normed, dim=1)
    c, s = cos[None, :, None, :].to(x.device), sin[None, :, None, :].to(x.device)
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x.float() * c + x_rotated.float() * s).to(x.dtype)
