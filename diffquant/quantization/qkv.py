"""Q/K/V fusion: one quantized GEMM for an attention module's query, key and value projections.

diffusers' `fuse_qkv_projections()` builds `to_qkv` next to `to_q` / `to_k` / `to_v` and keeps all
four (the processor then reads `attn.fused_projections`). Here the fused layer is built from the
already quantized ones and the parts are dropped, so memory does not grow: per-channel weight
scales concatenate exactly, and the dynamic per-token activation scale of the shared input is the
same for all three, so the fused layer computes what the three did (up to the GEMM's summation
order), in one launch instead of three.

Only attention classes whose diffusers processor reads `fused_projections` take part (diffusers
0.42: FLUX.1, FLUX.2's double-stream attention, Wan2.x); every candidate module is reported, fused
or not, with the reason.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from diffquant.quantization.fusion import FusionReport
from diffquant.quantization.layers import QuantLinear

_QKV = ("to_q", "to_k", "to_v")
_ADDED_QKV = ("add_q_proj", "add_k_proj", "add_v_proj")
# What the processors of diffusers 0.42 read when fused_projections is set.
SUPPORTED = ("FluxAttention", "Flux2Attention", "WanAttention")


def _groups(attn: nn.Module) -> list[tuple[str, tuple[str, ...]]] | str:
    """(fused attribute, the attributes it replaces) for a SUPPORTED attention module, or why not."""
    if type(attn).__name__ == "WanAttention":
        if attn.added_kv_proj_dim is not None:  # its processor tests `attn.add_k_proj is not None` when fused
            return "Wan image-conditioning attention (add_k_proj / add_v_proj) is left unfused"
        return [("to_kv", _QKV[1:]) if attn.is_cross_attention else ("to_qkv", _QKV)]
    groups = [("to_qkv", _QKV)]
    if getattr(attn, "add_q_proj", None) is not None:  # the processor uses to_added_qkv once fused
        groups.append(("to_added_qkv", _ADDED_QKV))
    return groups


def _why_not(name: str, parts: list[nn.Module | None], attrs: tuple[str, ...]) -> str | None:
    for attr, p in zip(attrs, parts, strict=True):
        if not isinstance(p, QuantLinear):
            return f"{name}.{attr} is {type(p).__name__}, not a quantized linear"
        s = p.scheme
        if s.weight_granularity != "per_channel" or s.activation_granularity != "per_token":
            return (f"{name}.{attr} has {s.weight_granularity} weight / {s.activation_granularity} activation "
                    "scales (fusion needs per-channel / dynamic per-token)")
    first = parts[0]
    for attr, p in zip(attrs[1:], parts[1:], strict=True):
        same = (p.scheme.method, p.in_features, p.bias is None, p.backend_request, p.qweight.device,
                p.input_act) == (first.scheme.method, first.in_features, first.bias is None,
                                 first.backend_request, first.qweight.device, first.input_act)
        if not same:
            return f"{name}.{attr} differs from {name}.{attrs[0]} (method, width, bias, backend or device)"
    return None


def _concatenated(parts: list[QuantLinear], name: str) -> QuantLinear:
    first = parts[0]
    scheme = dataclasses.replace(first.scheme, out_features=sum(p.out_features for p in parts), name=name)
    bias = None if first.bias is None else torch.cat([p.bias.detach() for p in parts])
    return QuantLinear(scheme, torch.cat([p.qweight for p in parts]), torch.cat([p.weight_scale for p in parts]),
                       bias, None, first.backend_request, dtype=first.orig_dtype)


def _fuse_module(name: str, attn: nn.Module) -> FusionReport:
    groups = _groups(attn)
    if isinstance(groups, str):
        return FusionReport(name, "", "qkv", False, groups)
    for _, attrs in groups:  # all groups or none: a half-fused module would break its processor
        why = _why_not(name, [getattr(attn, a, None) for a in attrs], attrs)
        if why is not None:
            return FusionReport(name, "", "qkv", False, why)
    for fused, attrs in groups:
        parts = [getattr(attn, a) for a in attrs]
        setattr(attn, fused, _concatenated(parts, f"{name}.{fused}"))
        for a in attrs:
            delattr(attn, a)
        del parts
    attn.fused_projections = True
    made = ", ".join(f"{fused} <- {'/'.join(attrs)}" for fused, attrs in groups)
    merged = sum(len(attrs) - 1 for _, attrs in groups)
    return FusionReport(name, f"{name}.{groups[0][0]}", "qkv", True, f"one GEMM per group: {made}", merged)


def fuse_qkv_projections(module: nn.Module, required: bool = False) -> list[FusionReport]:
    """Fuse the quantized q/k/v projections of every supported attention module of `module` in place
    (after quantization). Returns one report per attention module that has projections, fused or not.
    required=True (the user asked for it explicitly): ValueError if nothing could be fused."""
    reports = []
    # names, not modules: a list of modules would keep every replaced part alive until the end
    # (FLUX.1-dev: 2.15 GB of fp8 q/k/v weights above the final footprint, run 9d)
    names = [n for n, m in module.named_modules() if callable(getattr(m, "fuse_projections", None))]
    for name in names:
        m = module.get_submodule(name)
        if getattr(m, "fused_projections", False):
            why = "already fused before quantization (diffusers' fuse_qkv_projections: its parts stay beside it)"
        elif not getattr(m, "_supports_qkv_fusion", True):
            why = f"{type(m).__name__} has no separate q/k/v projections to fuse"
        elif type(m).__name__ not in SUPPORTED:
            why = f"{type(m).__name__}'s processor does not read fused projections (supported: {', '.join(SUPPORTED)})"
        else:
            reports.append(_fuse_module(name, m))
            continue
        reports.append(FusionReport(name, "", "qkv", False, why))
    if required and not any(r.fused for r in reports):
        reasons = sorted({r.reason for r in reports}) or [f"{type(module).__name__} has no diffusers attention module"]
        raise ValueError(f"fuse_qkv=True: no q/k/v projections of {type(module).__name__} could be fused: "
                         f"{'; '.join(reasons[:3])}")
    return reports
