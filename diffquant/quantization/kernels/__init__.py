"""Backends for QuantLinear and the rule that picks one (DESIGN decision 7).

A backend is chosen per layer from the method, the layer's shape and the device it runs on, and
its name goes into the QuantizeReport. A user can force one through the config's `backend`; a
choice the device or shape cannot run is a ValueError, never a silent fallback. Hardware is probed
here, lazily, never at import.
"""

from __future__ import annotations

import torch

from diffquant.quantization.kernels.backends import BACKENDS, LinearScheme
from diffquant.quantization.kernels.triton_ops import triton_available

# Per method: backends a user may force (besides "auto").
METHOD_BACKENDS = {
    "fp8": ("emulated", "scaled_mm", "fp8_weight_only", "triton"),
    "int8": ("emulated", "int_mm", "triton"),
}


def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _why_not(name: str, scheme: LinearScheme, device: torch.device) -> str | None:
    """None if backend `name` can run this layer on `device`, else the reason it cannot."""
    if name == "emulated":
        return None
    if device.type != "cuda":
        return f"needs a CUDA device, layer is on {device.type}"
    cap = _capability(device)
    n, k = scheme.out_features, scheme.in_features
    if name == "scaled_mm":
        if cap < (8, 9):
            return f"needs FP8 tensor cores (SM89+), device is SM{cap[0]}{cap[1]}"
        if scheme.weight_granularity == "block":
            return "block-wise weight scales are not supported by torch._scaled_mm here"
        if n % 16 or k % 16:
            return f"needs in/out features divisible by 16, layer is {k}->{n}"
        return None
    if name == "int_mm":
        if cap < (8, 0):
            return f"needs INT8 tensor cores (SM80+), device is SM{cap[0]}{cap[1]}"
        if n % 8 or k % 8:
            return f"needs in/out features divisible by 8, layer is {k}->{n}"
        return None
    if name == "fp8_weight_only":
        return None
    if name == "triton":
        return _why_not_triton(scheme, cap)
    raise ValueError(f"unknown backend {name!r}; valid backends: {', '.join(sorted(BACKENDS))}")


def _why_not_triton(scheme: LinearScheme, cap: tuple[int, int]) -> str | None:
    if not triton_available():
        return "needs the triton package (pip install triton)"
    n, k = scheme.out_features, scheme.in_features
    if scheme.method == "fp8" and cap < (8, 9):
        return f"needs FP8 tensor cores (SM89+), device is SM{cap[0]}{cap[1]}"
    if cap < (8, 0):
        return f"needs INT8 tensor cores (SM80+), device is SM{cap[0]}{cap[1]}"
    if scheme.activation_granularity != "per_token":
        return f"runs dynamic per-token activations only, layer uses {scheme.activation_granularity}"
    if scheme.weight_granularity not in ("per_channel", "per_tensor"):
        return f"runs per-channel or per-tensor weight scales only, layer uses {scheme.weight_granularity}"
    if n % 16 or k % 16:
        return f"needs in/out features divisible by 16, layer is {k}->{n}"
    return None


def _auto_order(scheme: LinearScheme, device: torch.device) -> tuple[str, ...]:
    # "triton" first on CUDA: fused activation quantization measured faster than the eager
    # reference quantization in front of torch._scaled_mm / torch._int_mm (benchmarks/bench_linear.py).
    if scheme.method == "int8":
        return ("triton", "int_mm", "emulated")
    if device.type == "cuda" and _capability(device) < (8, 9):
        return ("fp8_weight_only",)  # SM80: FP8 storage, bf16 compute (DESIGN hardware targets)
    return ("triton", "scaled_mm", "emulated")


def select_backend(scheme: LinearScheme, request: str, device: torch.device) -> tuple[str, str]:
    """Return (backend name, why it was chosen). Raises ValueError for an impossible forced choice."""
    valid = METHOD_BACKENDS[scheme.method]
    if request != "auto":
        if request not in valid:
            raise ValueError(f"backend {request!r} is not valid for {scheme.method}; "
                             f"valid backends: auto, {', '.join(valid)}")
        reason = _why_not(request, scheme, device)
        if reason is not None:
            raise ValueError(f"backend {request!r} cannot run layer {scheme.name or '<unnamed>'}: {reason}")
        return request, "forced by config"
    skipped = []
    for name in _auto_order(scheme, device):
        reason = _why_not(name, scheme, device)
        if reason is None:
            why = "; ".join(skipped) if skipped else f"fastest available on {device.type}"
            return name, why
        skipped.append(f"{name}: {reason}")
    raise ValueError(f"no backend can run layer {scheme.name}: {'; '.join(skipped)}")


__all__ = ["BACKENDS", "METHOD_BACKENDS", "LinearScheme", "select_backend"]
