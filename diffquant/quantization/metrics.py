"""Error metrics shared by tests, benchmarks and tools (computed in float64)."""

from __future__ import annotations

import math

import torch


def sqnr_db(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 10*log10(sum ref^2 / sum (ref - cand)^2); inf if identical."""
    ref, cand = reference.double(), candidate.double()
    noise = (ref - cand).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def relative_l2(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    ref, cand = reference.double(), candidate.double()
    denom = ref.norm().item()
    return (ref - cand).norm().item() / denom if denom > 0 else math.inf


def psnr_db(reference: torch.Tensor, candidate: torch.Tensor, peak: float = 255.0) -> float:
    """PSNR of two images (uint8 scale by default); inf when identical."""
    mse = (reference.double() - candidate.double()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)
