"""One side of a comparison: load a variant's Engine, run it (warm-up + measured runs), collect the
decoded output, the latent trajectory and the generation stats."""

from __future__ import annotations

import gc
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from diffquant.quantization.tools.trajectory import LatentRecorder


@dataclass(frozen=True)
class VariantSpec:
    """A model folder (None: the embedded model) and its quantization (None: bf16)."""

    model: str | None = None
    quantization: str | None = None
    quantization_config: Any = None
    label: str = "variant"
    attention_quantization: str | None = None  # Engine(attention_quantization=...): "fp8"

    def describe(self) -> dict[str, Any]:
        return {"model": self.model or "embedded (diffquant/assets/tiny-shapes)", "quantization": self.quantization,
                "quantization_config": self.quantization_config, "attention_quantization": self.attention_quantization}


@dataclass
class RunResult:
    output: np.ndarray  # uint8 [H, W, C] (image) or [F, H, W, C] (video): the first output of the last run
    generation: dict[str, Any]
    latents: list[torch.Tensor] = field(default_factory=list)
    initial_latents: torch.Tensor | None = None
    last: Any = None  # GenerationOutput of the last measured run (for saving)


def load_engine(spec: VariantSpec, device: str | None = None, compile: bool = False):
    from diffquant.engine import Engine

    return Engine(model=spec.model, quantization=spec.quantization, quantization_config=spec.quantization_config,
                  device=device, compile=compile, attention_quantization=spec.attention_quantization)


def output_array(out, task: str) -> np.ndarray:
    """The first image `[H, W, 3]` or video `[F, H, W, 3]` of a GenerationOutput, uint8."""
    if task == "t2v":
        if out.frames is None:
            raise ValueError("--task t2v, but the pipeline produced images; use --task t2i")
        return np.stack([np.asarray(f.convert("RGB")) for f in out.frames[0]])
    if out.frames is not None:
        raise ValueError("--task t2i, but the pipeline produced video frames; use --task t2v")
    return np.asarray(out.images[0].convert("RGB"))


def run_variant(engine, prompt: str, params, task: str, warmup_runs: int = 0, measure_runs: int = 1) -> RunResult:
    """Warm-up runs (not timed), then measured runs; the first measured run records the trajectory."""
    for _ in range(warmup_runs):
        engine.generate(prompt, params)
    outs, latents, initial = [], [], None
    for i in range(measure_runs):
        if i == 0:
            with LatentRecorder(engine.pipe) as rec:
                outs.append(engine.generate(prompt, params))
            latents, initial = rec.latents, rec.initial
        else:
            outs.append(engine.generate(prompt, params))
    arrays = [output_array(o, task) for o in outs]
    stats = generation_stats(engine, outs, warmup_runs)
    stats["repeat_runs_identical"] = all(np.array_equal(arrays[0], a) for a in arrays[1:])
    return RunResult(arrays[-1], stats, latents, initial, outs[-1])


def _mb(n: int | None) -> float | None:
    return None if n is None else n / 2**20


def generation_stats(engine, outs: list, warmup_runs: int) -> dict[str, Any]:
    """Times, peak memory (device peak where the device reports one) and weight bytes."""
    times = [o.timings["generate_s"] for o in outs]
    peaks = [o.peak_memory_bytes for o in outs if o.peak_memory_bytes is not None]
    on_device = bool(peaks) and outs[0].peak_memory_kind.startswith("cuda")
    return {
        "avg_generation_time_s": statistics.fmean(times),
        "generation_times_s": times,
        "median_generation_time_s": statistics.median(times),
        "warmup_runs": warmup_runs,
        "measure_runs": len(outs),
        "stage_times_s": {k: v for k, v in outs[-1].timings.items() if k.endswith("_s") and k != "generate_s"},
        "max_peak_memory_mb": _mb(max(peaks)) if on_device else None,
        "peak_memory_kind": outs[0].peak_memory_kind if on_device else "not reported on this device",
        "process_peak_rss_mb": None if on_device or not peaks else _mb(max(peaks)),
        "device": str(engine.device),
        "profile": engine.profile.name,
        "quantization_summary": engine.summary(),
        "quantization_config_resolved": None if engine.quant_config is None else engine.quant_config.to_dict(),
        **weight_bytes(engine),
    }


def weight_bytes(engine) -> dict[str, Any]:
    """Bytes of the diffusion transformer(s) (parameters + buffers) and of their linear layers."""
    total = 0
    for name in engine.info.transformers:
        module = getattr(engine.pipe, name)
        total += sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
    reports = {k: r for k, r in engine.reports.items() if k in engine.info.transformers}
    return {"transformer_weight_bytes": total,
            "quantized_linear_bytes_before": sum(r.bytes_before for r in reports.values()) or None,
            "quantized_linear_bytes_after": sum(r.bytes_after for r in reports.values()) or None,
            "layers_quantized": sum(len(r.quantized) for r in reports.values()),
            "layers_kept": sum(len(r.kept) for r in reports.values())}


def sampling_record(engine, prompt: str, params) -> dict[str, Any]:
    """The sampling settings as run: SamplingParams with the profile's defaults filled in."""
    record = asdict(params)
    for key, value in record.items():
        if value is None:
            record[key] = getattr(engine.profile.defaults, key, None)
    return {"prompt": prompt, **record}


def release(engine) -> None:
    """Drop an Engine's pipeline so the next variant loads into free memory."""
    engine.pipe = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


__all__ = ["RunResult", "VariantSpec", "generation_stats", "load_engine", "output_array", "run_variant",
           "sampling_record"]
