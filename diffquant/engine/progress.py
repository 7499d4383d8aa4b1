"""Per-stage timings and the denoising progress bar of one Engine.generate call.

Stages are cut at the diffusion transformer's first forward (encode -> denoise) and its last
forward's end (denoise -> decode), read from forward hooks, so they work for every pipeline;
the progress bar advances on the pipeline's `callback_on_step_end` where it has one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch


class StepTimer:
    def __init__(self, pipe, transformer_names: list[str], steps: int | None, progress: bool,
                 user_callback: Callable | None = None):
        self.pipe = pipe
        self.user_callback = user_callback  # a caller's callback_on_step_end, chained after ours
        self.modules = [getattr(pipe, n) for n in transformer_names if isinstance(getattr(pipe, n, None),
                                                                             torch.nn.Module)]
        self.steps = steps
        self.progress = progress
        self.bar = None
        self.handles: list[Any] = []
        self.t0 = self.t_first = self.t_last = self.t_end = None
        self.step_times: list[float] = []

    def _now(self) -> float:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        return time.perf_counter()

    def _pre(self, module, args, kwargs=None) -> None:
        if self.t_first is None:
            self.t_first = self._now()

    def _post(self, module, args, output) -> None:
        self.t_last = self._now()

    def _on_step_end(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        self.step_times.append(self._now())
        if self.bar is not None:
            self.bar.update(1)
        if self.user_callback is not None:
            return self.user_callback(pipe, step, timestep, callback_kwargs)
        return callback_kwargs

    def kwargs(self, accepts: Callable[[str], bool]) -> dict[str, Any]:
        return {"callback_on_step_end": self._on_step_end} if accepts("callback_on_step_end") else {}

    def __enter__(self) -> StepTimer:
        for m in self.modules:
            self.handles.append(m.register_forward_pre_hook(self._pre))
            self.handles.append(m.register_forward_hook(self._post))
        if self.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.steps, desc="denoising", unit="step", leave=False)
        self.t0 = self._now()
        return self

    def __exit__(self, *exc) -> None:
        self.t_end = self._now()
        for h in self.handles:
            h.remove()
        if self.bar is not None:
            self.bar.close()

    def timings(self) -> dict[str, float]:
        out = {"generate_s": self.t_end - self.t0}
        if self.t_first is not None and self.t_last is not None:
            out["encode_s"] = self.t_first - self.t0
            out["denoise_s"] = self.t_last - self.t_first
            out["decode_s"] = self.t_end - self.t_last
        if self.step_times:
            out["steps"] = float(len(self.step_times))
        return out
