"""FP8 E4M3FN reference numerics: THE SPEC that every fp8 kernel is tested against.

Scales are float32 and multiply back: x ~= q.float() * scale. A scale is amax / 448 (448 is the
largest finite E4M3FN value), so the largest |x| of each group lands exactly on +-448. An all-zero
group gets scale 1 (not 0): 0 / 1 = 0 encodes exactly and nothing divides by zero, so no NaN.
Values are divided in float32, clamped to +-448 (torch's cast does not saturate: out-of-range
values would become NaN) and cast with round-to-nearest-even.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0


def scale_from_amax(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """amax / qmax, IEEE-rounded on every device (1 for amax 0). The divisor is a tensor on purpose:
    CUDA turns division by a Python scalar into a multiply by its rounded reciprocal, which is off by
    one ulp for some amax, so CPU and CUDA scales (and the quantized values) would differ."""
    amax = amax.float()
    return torch.where(amax > 0, amax / torch.full_like(amax, qmax), torch.ones_like(amax))


def fp8_cast(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q = saturate(x / scale) in E4M3FN. x: any float, scale: broadcastable float32."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def fp8_quantize_per_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [..] -> (q: [..] fp8, scale: [] float32)."""
    scale = scale_from_amax(x.abs().amax(), FP8_MAX)
    return fp8_cast(x, scale), scale


def fp8_quantize_per_row(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale per row (weights: per output channel; activations: per token).

    x: [M, K] -> (q: [M, K] fp8, scale: [M, 1] float32).
    """
    scale = scale_from_amax(x.abs().amax(dim=-1, keepdim=True), FP8_MAX)
    return fp8_cast(x, scale), scale


def fp8_quantize_static(x: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """Static activation quantization with a calibrated per-tensor scale ([] float32)."""
    return fp8_cast(x, input_scale.float())


def fp8_quantize_per_token_group(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale per `group` consecutive elements along K (block-wise fp8 activations).

    x: [M, K] -> (q: [M, K] fp8, scale: [M, ceil(K / group)] float32). The last group may be short.
    """
    m, k = x.shape
    groups = -(-k // group)
    padded = torch.nn.functional.pad(x.float(), (0, groups * group - k))  # zeros do not change amax
    amax = padded.view(m, groups, group).abs().amax(dim=-1)
    scale = scale_from_amax(amax, FP8_MAX)  # [M, G]
    q = fp8_cast(x, scale.repeat_interleave(group, dim=1)[:, :k])
    return q, scale


def fp8_quantize_block(w: torch.Tensor, block_n: int, block_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise weight scales: one per [block_n, block_k] tile; edge tiles may be short.

    w: [N, K] -> (q: [N, K] fp8, scale: [ceil(N / block_n), ceil(K / block_k)] float32).
    """
    n, k = w.shape
    gn, gk = -(-n // block_n), -(-k // block_k)
    padded = torch.nn.functional.pad(w.float(), (0, gk * block_k - k, 0, gn * block_n - n))
    amax = padded.view(gn, block_n, gk, block_k).abs().amax(dim=(1, 3))
    scale = scale_from_amax(amax, FP8_MAX)  # [GN, GK]
    return fp8_cast(w, expand_block_scale(scale, (n, k), (block_n, block_k))), scale


def expand_block_scale(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """[GN, GK] block scales -> [N, K] element-wise scales."""
    n, k = shape
    return scale.repeat_interleave(block[0], dim=0)[:n].repeat_interleave(block[1], dim=1)[:, :k]


def fp8_dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x = q * scale (scale broadcastable, e.g. [M, 1] or [])."""
    return (q.float() * scale.float()).to(dtype)
