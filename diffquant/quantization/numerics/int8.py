"""Int8 symmetric reference numerics: THE SPEC that every int8 kernel is tested against.

Range is [-127, 127] (symmetric: -128 is never produced, so negation is exact). scale =
amax / 127 in float32; an all-zero row gets scale 1 so it encodes to exact zeros without NaN.
Rounding is half to even (torch.round), which is what a GPU's cvt.rni does, so kernels can match
the reference bit for bit.
"""

from __future__ import annotations

import torch

from diffquant.quantization.numerics.fp8 import scale_from_amax

INT8_MAX = 127.0


def int8_cast(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q = clamp(round_half_even(x / scale), -127, 127) as int8."""
    return torch.round(x.float() / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)


def int8_quantize_per_row(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, K] -> (q: [M, K] int8, scale: [M, 1] float32); rows are output channels or tokens."""
    scale = scale_from_amax(x.abs().amax(dim=-1, keepdim=True), INT8_MAX)
    return int8_cast(x, scale), scale


def int8_dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale.float()).to(dtype)
