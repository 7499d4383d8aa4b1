"""Load a diffusers pipeline folder and quantize its components while moving them to the device.

Diffusion transformers are quantized layer by layer as they move (`quantize_(..., device=...)`):
each linear layer goes to the device, is quantized there and its float weight is dropped, so the
transformer's full bf16 copy never sits on the GPU (DESIGN decision 9). Text encoders and VAEs
asked for "fp8" get FP8 weight-only storage on the CPU and then move (half the bytes to copy).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffquant.engine.models import ArchitectureProfile, detect_profile
from diffquant.quantization import ComponentQuantizationConfig, QuantizationConfig, build_quant_config, quantize_
from diffquant.quantization.report import QuantizeReport
from diffquant.quantization.weight_storage import apply_fp8_weight_storage

EMBEDDED_MODEL = Path(__file__).resolve().parent.parent / "assets" / "tiny-shapes"
NO_EMBEDDED_MODEL = (f"the embedded model is missing from this install ({EMBEDDED_MODEL}); reinstall diffquant or "
                     "pass a diffusers pipeline folder, e.g. model='/path/to/FLUX.1-dev' or --model DIR")


@dataclass(frozen=True)
class PipelineInfo:
    """What model_index.json says, before any weight is read."""

    folder: Path
    index: dict[str, Any]
    profile: ArchitectureProfile
    components: dict[str, tuple[str, str]]  # name -> (library, class)

    @property
    def transformers(self) -> list[str]:
        return self.profile.transformer_components(list(self.components))


def read_pipeline_info(model: str | Path | None, warn: bool = True) -> PipelineInfo:
    """Validate a pipeline folder and detect its architecture profile."""
    if model is None:
        if not (EMBEDDED_MODEL / "model_index.json").is_file():
            raise FileNotFoundError(NO_EMBEDDED_MODEL)
        model = EMBEDDED_MODEL
    folder = Path(model).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"model folder {str(folder)!r} does not exist")
    index_file = folder / "model_index.json"
    if not folder.is_dir() or not index_file.is_file():
        raise ValueError(f"{str(folder)!r} is not a diffusers pipeline folder (no model_index.json)")
    try:
        index = json.loads(index_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(index_file)!r} is not valid JSON: {e}") from None
    components = {k: (v[0], v[1]) for k, v in index.items()
                  if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and v[1] is not None}
    tcfg = _read_json(folder / "transformer" / "config.json")
    return PipelineInfo(folder, index, detect_profile(index, tcfg, warn=warn), components)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def resolve_quant_spec(quantization: Any = None, quantization_config: Any = None):
    """Merge Engine's `quantization` (a method name) and `quantization_config` into one config."""
    if quantization is None or quantization_config is None:
        return build_quant_config(quantization_config if quantization is None else quantization)
    if isinstance(quantization_config, dict) and not any(k in quantization_config for k in ("method", "quant_method")):
        cfg = build_quant_config(quantization)
        unknown = sorted(set(quantization_config) - set(type(cfg).parameter_names()))
        if unknown:
            raise ValueError(f"quantization={quantization!r} cannot be combined with a per-component "
                             f"quantization_config (key {unknown[0]!r}); name the method per component")
        return build_quant_config({"method": quantization, **quantization_config})
    cfg = build_quant_config(quantization_config)
    method = build_quant_config(quantization)
    if not isinstance(cfg, QuantizationConfig) or cfg.method != method.method:
        raise ValueError(f"quantization={quantization!r} disagrees with quantization_config "
                         f"({getattr(cfg, 'method', 'per-component')}); give one of them")
    return cfg


def plan_quantization(cfg, info: PipelineInfo) -> dict[str, QuantizationConfig]:
    """component name -> config. A single method applies to the diffusion transformer(s) only;
    a per-component config names components explicitly ('default' covers the unnamed transformers)."""
    if cfg is None:
        return {}
    transformers = info.transformers
    if isinstance(cfg, QuantizationConfig):
        if not transformers:
            raise ValueError(f"no diffusion transformer component found to quantize; components: "
                             f"{', '.join(info.components)}; name one in a per-component quantization_config")
        return {name: cfg for name in transformers}
    if not isinstance(cfg, ComponentQuantizationConfig):
        raise ValueError(f"unsupported quantization config {cfg!r}")
    for name in cfg.component_names:
        if name not in info.components:
            raise ValueError(f"quantization_config names component {name!r}, which this pipeline does not have; "
                             f"its components: {', '.join(info.components)} (or 'default' for the transformers)")
    plan = {name: c for name, c in cfg.components if c is not None}
    if cfg.default is not None:
        plan.update({name: cfg.default for name in transformers if name not in cfg.component_names})
    return plan


def load_pipeline(info: PipelineInfo, dtype: torch.dtype):
    """The pipeline with every component on the CPU, in `dtype`."""
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.from_pretrained(str(info.folder), dtype=dtype)
    except (OSError, ImportError, AttributeError, KeyError) as e:
        raise ValueError(f"could not load the pipeline in {str(info.folder)!r}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from None


def quantize_component(name: str, module: nn.Module, cfg: QuantizationConfig, info: PipelineInfo,
                       device: torch.device) -> QuantizeReport:
    """Quantize one component while moving it to `device`; returns its report."""
    if name in info.transformers:
        report = quantize_(module, cfg, keep_high_precision=info.profile.keep_high_precision, device=device)
    elif cfg.method == "fp8":
        _check_storage_params(name, cfg)
        report = apply_fp8_weight_storage(module, ignored_layers=cfg.ignored_layers)
    else:
        raise ValueError(f"component {name!r}: text encoders, VAEs and other non-transformer components support "
                         f"only 'fp8' (FP8 weight-only storage), got {cfg.method!r}")
    module.to(device)
    return report


def _check_storage_params(name: str, cfg: QuantizationConfig) -> None:
    """FP8 weight storage has one recipe (DESIGN numerics); W8A8 parameters there would be silently unused."""
    plain = build_quant_config({"method": "fp8", "ignored_layers": list(cfg.ignored_layers)}).to_dict()
    changed = [k for k, v in cfg.to_dict().items() if plain.get(k) != v]
    if changed:
        raise ValueError(f"component {name!r}: fp8 weight-only storage takes only ignored_layers; "
                         f"{changed[0]}={getattr(cfg, changed[0])!r} applies to diffusion transformers")


def check_plan_modules(plan: dict[str, QuantizationConfig], pipe) -> None:
    """Every planned component must be a torch module (not a tokenizer or scheduler)."""
    for name in plan:
        if not isinstance(getattr(pipe, name, None), nn.Module):
            modules = [n for n, m in pipe.components.items() if isinstance(m, nn.Module)]
            raise ValueError(f"component {name!r} has no weights to quantize; components with weights: "
                             f"{', '.join(modules)}")


def prepare_components(pipe, plan: dict[str, QuantizationConfig], info: PipelineInfo,
                       device: torch.device) -> dict[str, QuantizeReport]:
    """Quantize the planned components and move every module to `device`, one component at a time."""
    check_plan_modules(plan, pipe)
    reports: dict[str, QuantizeReport] = {}
    for name, module in pipe.components.items():
        if not isinstance(module, nn.Module):
            continue
        if name in plan:
            reports[name] = quantize_component(name, module, plan[name], info, device)
        else:
            module.to(device)
    return reports


def upcast_vae_on_cpu(pipe, plan: dict[str, QuantizationConfig], device: torch.device, dtype: torch.dtype) -> bool:
    """On CPU, run a VAE whose config asks for it (`force_upcast`) in float32: bf16 convolutions are
    ~80x slower than fp32 on CPU (measured: 1.9 s vs 0.02 s to decode the embedded model's 64x64
    image). Inputs are cast to float32 on the way in, latents back to `dtype` on the way out of
    encode. Returns True when it did so."""
    vae = getattr(pipe, "vae", None)
    if (device.type != "cpu" or dtype == torch.float32 or "vae" in plan or not isinstance(vae, nn.Module)
            or not getattr(vae.config, "force_upcast", False)):
        return False
    nn.Module.to(vae, torch.float32)  # not ModelMixin.to: it warns about fp32 modules on any cast
    decode, encode = vae.decode, vae.encode

    def decode_fp32(z, *args, **kwargs):
        return decode(z.to(torch.float32), *args, **kwargs)

    def encode_fp32(x, *args, **kwargs):
        out = encode(x.to(torch.float32), *args, **kwargs)
        dist = out[0] if isinstance(out, tuple) else out.latent_dist
        for attr in ("parameters", "mean", "logvar", "std", "var"):
            if isinstance(getattr(dist, attr, None), torch.Tensor):
                setattr(dist, attr, getattr(dist, attr).to(dtype))
        return out

    vae.decode, vae.encode = decode_fp32, encode_fp32
    return True


__all__ = ["NO_EMBEDDED_MODEL", "PipelineInfo", "load_pipeline", "plan_quantization", "prepare_components",
           "read_pipeline_info", "resolve_quant_spec", "upcast_vae_on_cpu"]
