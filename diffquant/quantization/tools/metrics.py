"""Output similarity metrics for decoded images / video frames (uint8 arrays), all in float64.

Arrays are `[H, W, C]` (one image) or `[F, H, W, C]` (frames); values in uint8 pixel units.
Identical outputs have no finite PSNR: `psnr_db` is then None and `identical` is True (JSON has no
Infinity token). The threshold table holds the starting heuristics of the overview document.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from diffquant.quantization.metrics import psnr_db, relative_l2

# metric -> (direction, smoke threshold, stricter threshold)
THRESHOLDS: dict[str, tuple[str, float, float]] = {
    "psnr_db": ("higher", 20.0, 25.0),
    "mae": ("lower", 12.0, 6.0),
    "cosine_similarity": ("higher", 0.98, 0.995),
    "relative_l2": ("lower", 0.20, 0.08),
}
METRIC_NAMES = ("cosine_similarity", "mae", "mse", "rmse", "max_abs", "l2", "relative_l2", "psnr_db", "ssim")
HIGHER_IS_BETTER = {"cosine_similarity", "psnr_db", "ssim"}


def cosine_similarity(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """cos of the angle between the flattened tensors (1.0 for two all-zero tensors)."""
    ref, cand = reference.double().flatten(), candidate.double().flatten()
    denom = ref.norm().item() * cand.norm().item()
    if denom == 0:
        return 1.0 if ref.norm().item() == cand.norm().item() else 0.0
    return float(torch.dot(ref, cand).item() / denom)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Normalised 2-D Gaussian window `[size, size]`, float64 (the SSIM paper's 11x11, sigma 1.5)."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(reference: np.ndarray, candidate: np.ndarray, data_range: float = 255.0, window: int = 11,
         sigma: float = 1.5) -> float:
    """Mean SSIM (Wang et al. 2004): Gaussian-weighted local statistics over 'valid' window positions,
    K1=0.01, K2=0.03, computed per channel and frame and averaged. Inputs `[..., H, W, C]` or `[H, W]`;
    images smaller than the window use a window of their smaller side."""
    ref, cand = (_as_planes(a) for a in (reference, candidate))  # [N, 1, H, W]
    size = min(window, ref.shape[-1], ref.shape[-2])
    w = gaussian_window(size, sigma)[None, None]
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    conv = lambda t: torch.nn.functional.conv2d(t, w)
    mu_x, mu_y = conv(ref), conv(cand)
    var_x = conv(ref * ref) - mu_x**2
    var_y = conv(cand * cand) - mu_y**2
    cov = conv(ref * cand) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    return float((num / den).mean().item())


def _as_planes(a: np.ndarray) -> torch.Tensor:
    """`[..., H, W, C]` (or `[H, W]`) -> `[N, 1, H, W]` float64, one plane per frame and channel."""
    t = torch.from_numpy(np.asarray(a, dtype=np.float64))
    if t.dim() == 2:
        return t[None, None]
    t = t.reshape(-1, *t.shape[-3:])  # [N, H, W, C]
    return t.permute(0, 3, 1, 2).reshape(-1, 1, t.shape[1], t.shape[2])


def output_metrics(reference: np.ndarray, candidate: np.ndarray) -> dict[str, Any]:
    """Every METRIC_NAMES value for two uint8 arrays of one shape, plus `identical`."""
    if reference.shape != candidate.shape:
        raise ValueError(f"reference and candidate outputs differ in shape: {reference.shape} vs {candidate.shape}")
    ref = torch.from_numpy(np.asarray(reference, dtype=np.float64))
    cand = torch.from_numpy(np.asarray(candidate, dtype=np.float64))
    diff = ref - cand
    mse = diff.pow(2).mean().item()
    out = {
        "cosine_similarity": cosine_similarity(ref, cand),
        "mae": diff.abs().mean().item(),
        "mse": mse,
        "rmse": math.sqrt(mse),
        "max_abs": diff.abs().max().item(),
        "l2": diff.norm().item(),
        "relative_l2": relative_l2(ref, cand),
        "psnr_db": psnr_db(ref, cand),
        "ssim": ssim(reference, candidate),
    }
    out["identical"] = mse == 0
    return json_safe(out)


def video_metrics(reference: np.ndarray, candidate: np.ndarray) -> dict[str, Any]:
    """Frames `[F, H, W, C]`: metrics of frame 0, of the middle frame, and of all frames together."""
    mid = reference.shape[0] // 2
    return {"frame0": output_metrics(reference[0], candidate[0]),
            "mid_frame": output_metrics(reference[mid], candidate[mid]),
            "mid_frame_index": mid,
            "all_frames": output_metrics(reference, candidate)}


def threshold_table(metrics: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per THRESHOLDS metric: direction, smoke / stricter thresholds, the value and whether it passes.
    A None psnr_db (identical outputs) passes."""
    table = {}
    for name, (direction, smoke, strict) in THRESHOLDS.items():
        value = metrics.get(name)
        table[name] = {"direction": direction, "smoke": smoke, "stricter": strict, "value": value,
                       "smoke_pass": passes(value, direction, smoke), "stricter_pass": passes(value, direction, strict)}
    return table


def passes(value: float | None, direction: str, threshold: float) -> bool:
    """None stands for a perfect value (identical outputs: infinite PSNR)."""
    if value is None:
        return True
    return value >= threshold if direction == "higher" else value <= threshold


def json_safe(obj: Any) -> Any:
    """Replace inf / nan floats by None, recursively (json.dumps(allow_nan=False) then succeeds)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


__all__ = ["METRIC_NAMES", "THRESHOLDS", "cosine_similarity", "json_safe", "output_metrics", "passes", "ssim",
           "threshold_table", "video_metrics"]
