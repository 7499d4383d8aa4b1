"""Engine: load a diffusers pipeline folder, quantize it per component, generate images or videos."""

from __future__ import annotations

import inspect
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffquant.engine.loading import (
    PipelineInfo,
    load_pipeline,
    plan_quantization,
    prepare_components,
    read_pipeline_info,
    resolve_quant_spec,
    upcast_vae_on_cpu,
)
from diffquant.quantization.attention import (
    AttentionPatch,
    apply_attention_quantization,
    check_attention_method,
    short_sequence_hint,
)
from diffquant.quantization.kernels.triton_ops import release_shared_quantization
from diffquant.quantization.report import QuantizeReport

logger = logging.getLogger("diffquant")


@dataclass
class SamplingParams:
    """Per-request sampling settings; None takes the architecture profile's (or pipeline's) default."""

    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    true_cfg_scale: float | None = None
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    seed: int | None = None
    negative_prompt: str | list[str] | None = None
    num_outputs_per_prompt: int = 1

    def __post_init__(self) -> None:
        for name in ("num_inference_steps", "height", "width", "num_frames", "num_outputs_per_prompt"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")


@dataclass
class GenerationOutput:
    """images: one PIL image per output (image pipelines); frames: one list of PIL frames per video."""

    images: list[Any]
    frames: list[list[Any]] | None
    seed: int
    timings: dict[str, float]
    peak_memory_bytes: int | None
    peak_memory_kind: str
    quantization: dict[str, QuantizeReport] = field(default_factory=dict)
    prompts: list[str] = field(default_factory=list)

    def save(self, path: str | Path) -> list[Path]:
        """Save images (path, or path-1.png, path-2.png ... for several) or videos (animated GIF/WebP,
        or one PNG per frame, path-0000.png ..., for other suffixes)."""
        from diffquant.engine.output import save_output

        return save_output(self, Path(path))


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


_PARAM_TO_KWARG = {"num_inference_steps": "num_inference_steps", "guidance_scale": "guidance_scale",
                   "true_cfg_scale": "true_cfg_scale", "height": "height", "width": "width",
                   "num_frames": "num_frames", "negative_prompt": "negative_prompt"}


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


# torch.compile modes that replay CUDA graphs (inductor's CUDA-graph trees).
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def compile_transformer(module: torch.nn.Module, mode: str) -> None:
    """module.compile(mode); under a CUDA-graph mode each call also starts a new graph-tree step and
    returns a copy of its outputs. The graphs' outputs live in memory the next replay overwrites, and
    a pipeline with CFG keeps the conditional prediction while it calls the transformer again for the
    unconditional one (Wan2.2, Qwen-Image): without the copy that access raises (run 8b). The copy is
    one latent-sized tensor per call."""
    module.compile(mode=None if mode == "default" else mode)
    if mode not in CUDA_GRAPH_MODES:
        return
    compiled = module._compiled_call_impl

    def call(*args, **kwargs):
        torch.compiler.cudagraph_mark_step_begin()
        out = compiled(*args, **kwargs)
        return torch.utils._pytree.tree_map_only(torch.Tensor, torch.clone, out)

    module._compiled_call_impl = call


def _compile_mode(compile: bool | str) -> str | None:
    """Engine's `compile` argument as a torch.compile mode name, None for no compile."""
    if compile is False or compile is None:
        return None
    if compile is True:
        return "default"
    if compile not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {compile!r}; valid: True, False or a torch.compile mode: "
                         f"{', '.join(COMPILE_MODES)}")
    return compile


class Engine:
    """A quantized diffusers pipeline.

    model: a local diffusers pipeline folder (model_index.json); None loads the embedded tiny model
    (diffquant/assets/tiny-shapes). quantization: a method name ("fp8", "int8", ...) applied
    to the diffusion transformer(s). quantization_config: anything `build_quant_config` accepts:
    method params ({"method": "fp8", "ignored_layers": ["img_mlp"]}, or params alone beside
    `quantization`), or a per-component dict ({"transformer": {...}, "text_encoder": "fp8",
    "vae": None, "default": ...}) where text encoders / VAEs take "fp8" (FP8 weight-only storage) and
    "default" covers the diffusion transformers not named. The transformers are quantized layer by
    layer while they move to `device` (default: cuda if available), so no full bf16 copy lands there.
    attention_quantization: "fp8" runs the transformers' self-attention with FP8 Q/K/V and P
    (quantization/attention.py; a prototype: on CUDA a Hopper Triton kernel, elsewhere its float32
    emulation). compile: True (or "default") runs the diffusion transformer(s) through torch.compile; a
    torch.compile mode name picks that mode: "reduce-overhead" replays CUDA graphs, so no per-kernel
    host work is left (every denoising step calls the transformer with the same shapes).
    """

    def __init__(self, model: str | Path | None = None, quantization: str | None = None,
                 quantization_config: Any = None, dtype: torch.dtype = torch.bfloat16,
                 device: str | torch.device | None = None, compile: bool | str = False,
                 attention_quantization: str | None = None,
                 cache_backend: str | None = None, cache_config: dict | None = None):
        if cache_backend is not None or cache_config is not None:
            raise NotImplementedError("cache_backend / cache_config (TeaCache, first-block cache) are planned; "
                                      "not implemented yet")
        mode = self.compile_mode = _compile_mode(compile)  # checked before the slow load
        check_attention_method(attention_quantization)
        self.info: PipelineInfo = read_pipeline_info(model)
        self.profile = self.info.profile
        self.quant_config = resolve_quant_spec(quantization, quantization_config)
        self.plan = plan_quantization(self.quant_config, self.info)
        self.device = torch.device(device) if device is not None else _default_device()
        self.dtype = dtype
        self.timings: dict[str, float] = {}
        start = time.perf_counter()
        self.pipe = load_pipeline(self.info, dtype)
        self.timings["load_s"] = time.perf_counter() - start
        start = time.perf_counter()
        self.reports = prepare_components(self.pipe, self.plan, self.info, self.device)
        if upcast_vae_on_cpu(self.pipe, self.plan, self.device, dtype):
            logger.info("vae runs in float32 on CPU (its config sets force_upcast; bf16 convolutions are slow on CPU)")
        self.attention: dict[str, AttentionPatch] = {}
        self._hinted: set[str] = set()
        if attention_quantization is not None:
            models = {name: getattr(self.pipe, name) for name in self.info.transformers}
            self.attention = apply_attention_quantization(models, attention_quantization, self.device)
        self._sync()
        self.timings["quantize_s"] = time.perf_counter() - start
        self.pipe.set_progress_bar_config(disable=True)
        logger.info("%s (load %.1fs, quantize %.1fs)", self.summary(), self.timings["load_s"],
                    self.timings["quantize_s"])
        for hint in self.hints():
            logger.info(hint)
        if mode is not None:
            for name in self.info.transformers:
                compile_transformer(getattr(self.pipe, name), mode)

    # ---- generation -------------------------------------------------------------------------
    def generate(self, prompt: str | list[str], params: SamplingParams | None = None,
                 progress: bool = False, **pipeline_kwargs: Any) -> GenerationOutput:
        """Run the pipeline. Extra keyword arguments go to the diffusers pipeline call as they are."""
        params = params or SamplingParams()
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt must be a non-empty string or a list of strings")
        seed = params.seed if params.seed is not None else random.randrange(2**31)
        kwargs = self._call_kwargs(params, seed)
        kwargs.update(pipeline_kwargs)
        from diffquant.engine.progress import StepTimer

        timer = StepTimer(self.pipe, self.info.transformers, kwargs.get("num_inference_steps"), progress,
                          user_callback=kwargs.pop("callback_on_step_end", None))
        self._reset_peak()
        # no_grad, as diffusers pipelines run themselves: inference tensors would have no version
        # counter, which the triton backend's shared q/k/v activation quantization keys on.
        with torch.no_grad(), timer:
            try:
                result = self.pipe(prompt=prompts, **timer.kwargs(self._accepts), **kwargs)
                self._sync()
            finally:
                release_shared_quantization()
        self._warn_unused_attention()
        return self._output(result, seed, prompts, timer.timings())

    def _warn_unused_attention(self) -> None:
        """Never a silent no-op: FP8 attention that no eager call could use is said (traced calls
        are not counted, so compiled engines are not judged); once per transformer, a hint when
        it only saw sequences where it measured slower than bf16."""
        for name, patch in self.attention.items():
            if self.compile_mode is None and patch.fp8_calls == 0 and patch.kept_calls > 0:
                logger.warning("FP8 attention in %s: none of its %d attention calls could use it (masks, "
                               "cross-attention or head dims it does not take); they ran in bf16", name,
                               patch.kept_calls)
            hint = short_sequence_hint(patch, self.device.type)
            if hint is not None and name not in self._hinted:
                self._hinted.add(name)
                logger.info("%s: %s", name, hint)

    def _call_kwargs(self, params: SamplingParams, seed: int) -> dict[str, Any]:
        defaults = self.profile.defaults
        kwargs: dict[str, Any] = {}
        for pname, kwarg in _PARAM_TO_KWARG.items():
            value = getattr(params, pname)
            if value is None:
                value = getattr(defaults, pname, None)
                if value is None or not self._accepts(kwarg):
                    continue
            elif not self._accepts(kwarg):
                raise ValueError(f"{pname} is not a parameter of {type(self.pipe).__name__}")
            kwargs[kwarg] = value
        per_prompt = "num_videos_per_prompt" if self._accepts("num_videos_per_prompt") else "num_images_per_prompt"
        if self._accepts(per_prompt):
            kwargs[per_prompt] = params.num_outputs_per_prompt
        elif params.num_outputs_per_prompt != 1:
            raise ValueError(f"{type(self.pipe).__name__} does not take num_outputs_per_prompt")
        kwargs.update((k, v) for k, v in self.profile.call_kwargs if self._accepts(k))
        kwargs["generator"] = torch.Generator().manual_seed(seed)  # CPU generator: same noise on any device
        if self._accepts("output_type"):
            kwargs["output_type"] = "pil"
        return kwargs

    def _accepts(self, name: str) -> bool:
        if not hasattr(self, "_call_params"):
            self._call_params = set(inspect.signature(type(self.pipe).__call__).parameters)
        return name in self._call_params

    def _output(self, result, seed: int, prompts: list[str], timings: dict[str, float]) -> GenerationOutput:
        frames = getattr(result, "frames", None)
        images = [] if frames is not None else list(getattr(result, "images", []) or [])
        if frames is not None:
            frames = [list(video) for video in frames]
        peak, kind = self._peak()
        return GenerationOutput(images=images, frames=frames, seed=seed, timings={**self.timings, **timings},
                                peak_memory_bytes=peak, peak_memory_kind=kind, quantization=dict(self.reports),
                                prompts=prompts)

    # ---- device helpers ---------------------------------------------------------------------
    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def _peak(self) -> tuple[int | None, str]:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device), "cuda max_memory_allocated"
        try:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS (CPU)"
        except ImportError:  # Windows
            return None, "unavailable"

    # ---- reporting --------------------------------------------------------------------------
    def summary(self) -> str:
        """One line: profile, per-component method and layer counts, weight bytes before -> after."""
        from diffquant.engine.output import quantization_summary

        attention = f"; FP8 attention in {', '.join(self.attention)}" if self.attention else ""
        return f"{self.profile.display_name}: {quantization_summary(self.reports)}{attention}"

    def hints(self) -> list[str]:
        """Advice the user may want (never applied silently): e.g. Qwen-Image's recommended ignored_layers."""
        out = []
        rec = self.profile.recommended_ignored_layers
        for name in self.info.transformers:
            cfg = self.plan.get(name)
            if cfg is not None and rec and not set(rec) & set(cfg.ignored_layers):
                out.append(f"{self.profile.display_name}: ignored_layers={list(rec)} is recommended for "
                           f"{name} (keeps quality-sensitive layers in bf16); not applied")
        methods = {getattr(self.plan.get(name), "method", None) for name in self.info.transformers}
        if self.compile_mode == "default" and self.device.type == "cuda" and methods & {"fp8", "int8"}:
            out.append("fp8/int8 under torch.compile's default mode depend on host speed (FLUX.1-dev on an H200: "
                       "fp8 1.25-1.37x, int8 0.89-1.06x bf16); compile='reduce-overhead' replays CUDA graphs "
                       "(fp8 1.40-1.43x, int8 1.32-1.33x there)")
        return out

    def __repr__(self) -> str:
        return f"Engine({str(self.info.folder)!r}, profile={self.profile.name}, {self.summary()})"


__all__ = ["Engine", "GenerationOutput", "SamplingParams"]
