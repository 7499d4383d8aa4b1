"""FP8 weight-only storage for text encoders and VAEs (DESIGN "Default numerics").

Weights of nn.Linear and nn.Conv1d/2d/3d (and ConvTranspose1d/2d/3d) rest in float8_e4m3fn with
float32 scales: one per tensor for Linear, one per output channel for convolutions. The compute
stays in the original dtype: a forward pre-hook materialises that one layer's weight
(`q * scale`, cast back) and a forward hook drops it, so at most one layer's high-precision
weight exists at a time. Outside its forward a stored layer's `weight` is None (code that reads
`layer.weight.dtype` from outside, e.g. T5's dtype check, then skips its cast).
"""

from __future__ import annotations

import torch
from torch import nn

from diffquant.quantization.numerics.fp8 import fp8_dequantize, fp8_quantize_per_row, fp8_quantize_per_tensor
from diffquant.quantization.patterns import check_all_match
from diffquant.quantization.report import LayerReport, QuantizeReport

STORAGE_METHOD = "fp8_weight_storage"
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
SUPPORTED = (nn.Linear, *_CONV, *_CONV_T)


class _LiveTracker:
    """Counts the bytes of materialised high-precision weights (tests read `peak_bytes`)."""

    def __init__(self) -> None:
        self.live_bytes = 0
        self.peak_bytes = 0

    def add(self, n: int) -> None:
        self.live_bytes += n
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)


def _out_dim(layer: nn.Module) -> int:
    """Weight dimension of the output channels: [O, I/g, *k] for Conv, [I, O/g, *k] for ConvTranspose."""
    return 1 if isinstance(layer, _CONV_T) else 0


def quantize_weight_fp8(layer: nn.Module, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear w: [N, K] -> (q fp8 [N, K], scale [] f32). Conv w: [..] -> (q, scale broadcastable to w)."""
    if isinstance(layer, nn.Linear):
        return fp8_quantize_per_tensor(w)
    dim = _out_dim(layer)
    moved = w.movedim(dim, 0)  # [O, ...]
    q, scale = fp8_quantize_per_row(moved.reshape(moved.shape[0], -1))  # [O, R], [O, 1]
    q = q.reshape(moved.shape).movedim(0, dim)
    shape = [1] * w.dim()
    shape[dim] = w.shape[dim]
    return q, scale.reshape(shape)


_CHUNK_ELEMENTS = 1 << 22  # float32 temporaries of the dequantization stay under 16 MiB


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The weight a stored layer computes with: fp8 * scale in its original dtype.

    Dequantized in slices along dim 0 into one preallocated tensor, so the transient memory is the
    output plus one slice's float32 product, not a float32 copy of the whole weight; the values are
    exactly `fp8_dequantize(q, scale, dtype)` (the product is element-wise).
    """
    q, scale, dtype = layer.weight_fp8, layer.weight_scale, layer.weight_orig_dtype
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    rows = max(1, _CHUNK_ELEMENTS // max(1, q[0].numel()))
    per_row_scale = scale.dim() > 0 and scale.shape[0] > 1  # Conv: [O, 1, ...]; Linear / ConvT: broadcast
    for start in range(0, q.shape[0], rows):
        s = scale[start:start + rows] if per_row_scale else scale
        out[start:start + rows] = fp8_dequantize(q[start:start + rows], s, dtype)
    return out


def _pre_hook(layer: nn.Module, args) -> None:
    w = dequantized_weight(layer)
    layer.weight = w
    layer._fp8_tracker.add(w.numel() * w.element_size())


def _post_hook(layer: nn.Module, args, output) -> None:
    w = layer.weight
    if w is not None:
        layer._fp8_tracker.add(-(w.numel() * w.element_size()))
    layer.weight = None


def _store_one(layer: nn.Module, tracker: _LiveTracker) -> None:
    w = layer.weight.detach()
    q, scale = quantize_weight_fp8(layer, w)
    del layer._parameters["weight"]
    layer.weight = None
    layer.register_buffer("weight_fp8", q)
    layer.register_buffer("weight_scale", scale)
    layer.weight_orig_dtype = w.dtype
    layer._fp8_tracker = tracker
    layer._fp8_hooks = (layer.register_forward_pre_hook(_pre_hook), layer.register_forward_hook(_post_hook))


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _layer_shape(layer: nn.Module) -> tuple[int, int]:
    if isinstance(layer, nn.Linear):
        return (layer.out_features, layer.in_features)
    return (layer.out_channels, layer.in_channels)


def is_fp8_stored(layer: nn.Module) -> bool:
    return hasattr(layer, "weight_fp8")


def _storable(module: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in module.named_modules() if isinstance(m, SUPPORTED) and not is_fp8_stored(m)]


def _keep_reason(layer: nn.Module, name: str, ignored) -> str | None:
    if (hit := ignored.match(name)) is not None:
        return f"ignored_layers {hit!r}"
    if not layer.weight.is_floating_point() or layer.weight.dtype == torch.float8_e4m3fn:
        return f"weight dtype {layer.weight.dtype}"
    return None


def apply_fp8_weight_storage(module: nn.Module, ignored_layers: tuple[str, ...] | list[str] = ()) -> QuantizeReport:
    """Store every Linear / Conv / ConvTranspose weight of `module` in FP8, on its current device.

    ignored_layers: patterns (same rules as for transformers) of layers left as they are.
    Returns a QuantizeReport (method "fp8_weight_storage", backend "fp8_storage"); the report's
    `tracker` attribute counts materialised weight bytes (peak = largest layer's weight).
    """
    report = QuantizeReport(method=STORAGE_METHOD)
    tracker = _LiveTracker()
    report.tracker = tracker
    layers = _storable(module)
    ignored = check_all_match(list(ignored_layers), [n for n, _ in layers])
    for name, layer in layers:
        before = _nbytes(layer.weight, layer.bias)
        if (reason := _keep_reason(layer, name, ignored)) is not None:
            report.layers.append(LayerReport(name, "kept", reason, None, _layer_shape(layer), before, before))
            continue
        _store_one(layer, tracker)
        after = _nbytes(layer.weight_fp8, layer.weight_scale, layer.bias)
        report.layers.append(LayerReport(name, "quantized", "fp8 weight-only storage, bf16 compute",
                                         "fp8_storage", _layer_shape(layer), before, after))
    if not report.quantized:
        raise ValueError(f"{type(module).__name__} has no Linear or Conv layer to store in fp8")
    return report


__all__ = ["STORAGE_METHOD", "apply_fp8_weight_storage", "dequantized_weight", "is_fp8_stored",
           "quantize_weight_fp8"]
