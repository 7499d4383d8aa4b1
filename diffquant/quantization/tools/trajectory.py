"""Per-step latent trajectories: record the latents after every scheduler step, compare two runs.

Both runs use the same seed, so they start from the same initial noise and the same timesteps:
step i of one run is comparable with step i of the other (lockstep). The recorder wraps the
pipeline's `scheduler.step` on the instance (every diffusers denoising loop calls it once per
step), which works for pipelines with and without `callback_on_step_end`.
"""

from __future__ import annotations

from typing import Any

import torch

from diffquant.quantization.metrics import relative_l2
from diffquant.quantization.tools.metrics import cosine_similarity

DRIFT_LEVEL = 0.05  # relative L2 of the latents at which the CLI reports "drift starts here"


class LatentRecorder:
    """Context manager: `latents[i]` is a float32 CPU copy of the latents after step i; `initial` the
    latents the first step started from (the seed's noise)."""

    def __init__(self, pipe):
        self.scheduler = pipe.scheduler
        self.latents: list[torch.Tensor] = []
        self.initial: torch.Tensor | None = None

    def _step(self, *args: Any, **kwargs: Any):
        if not self.latents:  # step(model_output, timestep, sample, ...)
            sample = kwargs.get("sample", args[2] if len(args) > 2 else None)
            self.initial = sample.detach().float().cpu().clone() if isinstance(sample, torch.Tensor) else None
        out = self._orig(*args, **kwargs)
        prev = out[0] if isinstance(out, tuple) else out.prev_sample
        self.latents.append(prev.detach().float().cpu().clone())
        return out

    def __enter__(self) -> LatentRecorder:
        self.latents, self.initial = [], None
        self._orig = self.scheduler.step
        self.scheduler.step = self._step  # instance attribute shadows the bound method
        return self

    def __exit__(self, *exc) -> None:
        del self.scheduler.step


def compare_trajectories(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> list[dict[str, Any]]:
    """One row per step both runs recorded: relative_l2 and cosine similarity of the latents."""
    rows = []
    for i, (ref, cand) in enumerate(zip(reference, candidate, strict=False)):
        if ref.shape != cand.shape:
            raise ValueError(f"step {i}: latent shapes differ ({tuple(ref.shape)} vs {tuple(cand.shape)}); "
                             "the runs are not in lockstep (same resolution, frames and steps needed)")
        rows.append({"step": i, "relative_l2": relative_l2(ref, cand),
                     "cosine_similarity": cosine_similarity(ref, cand)})
    return rows


def same_start(reference: torch.Tensor | None, candidate: torch.Tensor | None) -> bool | None:
    """Whether both runs started from bit-identical latents (None: not recorded)."""
    if reference is None or candidate is None:
        return None
    return reference.shape == candidate.shape and torch.equal(reference, candidate)


def first_drift_step(rows: list[dict[str, Any]], level: float = DRIFT_LEVEL) -> int | None:
    """The first step whose latent relative_l2 exceeds `level` (None: never)."""
    return next((r["step"] for r in rows if r["relative_l2"] > level), None)


__all__ = ["DRIFT_LEVEL", "LatentRecorder", "compare_trajectories", "first_drift_step", "same_start"]
