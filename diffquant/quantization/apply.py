"""quantize_(module, config): swap nn.Linear layers in place for QuantLinear, with a report."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from diffquant.quantization.config import Fp8Config, Int8Config, QuantizationConfig, build_quant_config
from diffquant.quantization.fusion import fuse_activations
from diffquant.quantization.kernels import LinearScheme
from diffquant.quantization.layers import QuantLinear
from diffquant.quantization.patterns import LayerMatcher, check_all_match
from diffquant.quantization.qk_rope import fuse_qk_norm_rope
from diffquant.quantization.qkv import fuse_qkv_projections
from diffquant.quantization.report import LayerReport, QuantizeReport


def _tensor_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _scheme(cfg: QuantizationConfig, name: str, linear: nn.Linear) -> LinearScheme:
    common = dict(in_features=linear.in_features, out_features=linear.out_features, name=name)
    if isinstance(cfg, Int8Config):
        return LinearScheme("int8", "per_channel", "per_token", **common)
    if isinstance(cfg, Fp8Config):
        return LinearScheme("fp8", cfg.resolved_weight_granularity, cfg.resolved_activation_granularity,
                            block_size=cfg.weight_block_size, **common)
    raise NotImplementedError(f"quantize_ does not implement method {cfg.method!r} yet")


def _linear_layers(module: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear) and n]


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _static_scale(cfg: QuantizationConfig, name: str) -> float | None:
    if not isinstance(cfg, Fp8Config) or cfg.activation_scheme != "static":
        return None
    for key, value in cfg.input_scales:
        if key == name or LayerMatcher([key]).match(name):
            return value
    raise ValueError(f"fp8 static activation scheme: no input_scales entry for layer {name!r}; "
                     f"given keys: {', '.join(k for k, _ in cfg.input_scales)}")


def quantize_(
    module: nn.Module,
    config,
    *,
    keep_high_precision: Iterable[str] = (),
    device: torch.device | str | None = None,
) -> QuantizeReport:
    """Quantize `module`'s nn.Linear layers in place, one layer at a time on its own device.

    config: anything `build_quant_config` accepts for a single method (fp8 / int8: fuse_activations,
    default on, also moves GELUs feeding a quantized linear into its quantization kernel: fusion.py;
    fuse_qkv, default "where supported", makes one GEMM of each attention's q/k/v: qkv.py;
    fuse_qk_norm_rope, default "where supported", runs FLUX attention's q/k RMSNorm + RoPE as one
    op: qk_rope.py).
    keep_high_precision:
    patterns (architecture profiles feed them) for layers that stay high precision by default;
    unlike ignored_layers, a keep pattern that matches nothing is not an error. device: if given,
    each linear layer is moved there right before it is quantized and its float weight is dropped
    right after, so the module's full float copy never sits on that device (load-time streaming);
    the caller moves the remaining (non-linear) parameters.
    Raises ValueError if an ignored_layers pattern matches no layer, or nothing gets quantized.
    """
    cfg = build_quant_config(config)
    if not isinstance(cfg, QuantizationConfig):
        raise ValueError("quantize_ needs a single-method config (e.g. 'fp8'); per-component configs are "
                         "applied by the Engine, component by component")
    names = [n for n, _ in _linear_layers(module)]  # names only: a swapped-out layer is freed at once
    if not names:
        raise ValueError(f"{type(module).__name__} has no nn.Linear layer to quantize")
    ignored = check_all_match(list(cfg.ignored_layers), names)
    keep = LayerMatcher(keep_high_precision)
    report = QuantizeReport(method=cfg.method)
    for name in names:
        linear = module.get_submodule(name)
        report.layers.append(_quantize_one(module, cfg, name, linear, ignored, keep, device))
        del linear
    if not report.quantized:
        raise ValueError(f"{cfg.method}: every linear layer of {type(module).__name__} was excluded "
                         f"({len(report.kept)} kept); nothing was quantized")
    if getattr(cfg, "fuse_activations", False):
        report.fusions = fuse_activations(module)
    fuse_qkv = getattr(cfg, "fuse_qkv", False)
    if fuse_qkv is not False:
        report.projections = fuse_qkv_projections(module, required=fuse_qkv is True)
    qk_rope = getattr(cfg, "fuse_qk_norm_rope", False)
    if qk_rope is not False:
        report.attention = fuse_qk_norm_rope(module, required=qk_rope is True, device=device)
    return report


def _quantize_one(root, cfg, name, linear, ignored: LayerMatcher, keep: LayerMatcher, device=None) -> LayerReport:
    if device is not None:
        linear.to(device)
    before = _tensor_bytes(linear.weight, linear.bias)
    shape = (linear.out_features, linear.in_features)
    hit = ignored.match(name)
    reason = f"ignored_layers {hit!r}" if hit else None
    if reason is None and (hit := keep.match(name)):
        reason = f"kept high precision by default ({hit!r})"
    if reason is not None:
        return LayerReport(name, "kept", reason, None, shape, before, before)
    q = QuantLinear.from_linear(linear, _scheme(cfg, name, linear), backend=cfg.backend,
                                input_scale=_static_scale(cfg, name))
    _set_submodule(root, name, q)
    backend, why = q.backend_for(q.qweight.device)
    after = _tensor_bytes(q.qweight, q.weight_scale, q.input_scale, q.bias)
    return LayerReport(name, "quantized", why, backend, shape, before, after)
