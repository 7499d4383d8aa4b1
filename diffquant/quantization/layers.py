"""QuantLinear: an nn.Linear replacement holding a quantized weight and its scales."""

from __future__ import annotations

import torch
from torch import nn

from diffquant.quantization import numerics as nx
from diffquant.quantization.kernels import BACKENDS, LinearScheme, select_backend
from diffquant.quantization.kernels.backends import FUSED_INPUT_BACKENDS, dequantize_weight, quantize_weight


def _check_finite(name: str, w: torch.Tensor) -> None:
    if not bool(torch.isfinite(w).all()):
        bad = int((~torch.isfinite(w)).sum())
        raise ValueError(f"layer {name or '<unnamed>'}: weight has {bad} inf/NaN value(s); cannot quantize it")


class QuantLinear(nn.Module):
    """Quantized linear layer.

    Buffers: qweight [N, K] (float8_e4m3fn or int8), weight_scale (float32: [N, 1] per channel,
    [] per tensor, [ceil(N/bn), ceil(K/bk)] block-wise), input_scale ([] float32, static fp8 only).
    bias keeps the original dtype. The backend is chosen per device on first use and can be forced.

    input_act (None unless a fusion pass set it, quantization/fusion.py): an activation this layer
    applies to its input before quantizing it, so that the activation and the quantization run as
    one kernel; forward then also takes `prefix`, concatenated in front: the layer computes
    linear(cat([prefix, act(x)], -1)).
    """

    input_act: str | None = None

    def __init__(self, scheme: LinearScheme, qweight, weight_scale, bias=None, input_scale=None,
                 backend: str = "auto", dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.scheme = scheme
        self.in_features, self.out_features = scheme.in_features, scheme.out_features
        self.backend_request = backend
        self.orig_dtype = dtype
        self.register_buffer("qweight", qweight)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("input_scale", input_scale)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self._backends: dict[torch.device, tuple[str, str]] = {}

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: LinearScheme, backend: str = "auto",
                    input_scale: float | None = None) -> QuantLinear:
        """Quantize `linear` on its own device (the float weight is not copied elsewhere)."""
        w = linear.weight.detach()
        _check_finite(scheme.name, w)
        qweight, scale = quantize_weight(scheme, w)
        in_scale = None if input_scale is None else torch.tensor(float(input_scale), device=w.device)
        bias = linear.bias.detach() if linear.bias is not None else None
        layer = cls(scheme, qweight, scale, bias, in_scale, backend, dtype=w.dtype)
        layer.backend_for(w.device)  # an impossible forced backend fails here, at quantize time
        return layer

    def backend_for(self, device: torch.device) -> tuple[str, str]:
        """(backend name, reason) for running on `device`; resolved once per device."""
        choice = self._backends.get(device)
        if choice is None:
            choice = self._backends[device] = select_backend(self.scheme, self.backend_request, device)
        return choice

    @property
    def backend(self) -> str:
        return self.backend_for(self.qweight.device)[0]

    def forward(self, x: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """x: [..., K] -> [..., N]. With input_act: x: [..., Kx], prefix: [..., K - Kx] | None."""
        name, _ = self.backend_for(x.device)
        if self.input_act is None:
            if prefix is not None:
                raise ValueError(f"{self.scheme.name or 'QuantLinear'}: prefix given, but the layer has no input_act")
            out = BACKENDS[name](self, x.reshape(-1, self.in_features))  # [M, N]
        else:
            x2d = x.reshape(-1, x.shape[-1])
            p2d = None if prefix is None else prefix.reshape(-1, prefix.shape[-1])
            if x2d.shape[1] + (0 if p2d is None else p2d.shape[1]) != self.in_features:
                raise ValueError(f"{self.scheme.name or 'QuantLinear'}: input widths {x2d.shape[1]} + prefix "
                                 f"{0 if p2d is None else p2d.shape[1]} != in_features {self.in_features}")
            fused = FUSED_INPUT_BACKENDS.get(name)
            if fused is not None:
                out = fused(self, x2d, p2d)
            else:
                out = BACKENDS[name](self, nx.activation_input(x2d, p2d, self.input_act))
        return out.reshape(*x.shape[:-1], self.out_features)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """[N, K] weight as the quantized layer sees it (for analysis and tests)."""
        return dequantize_weight(self.scheme, self.qweight, self.weight_scale).to(dtype or self.orig_dtype)

    def extra_repr(self) -> str:
        s = self.scheme
        return (f"in_features={self.in_features}, out_features={self.out_features}, method={s.method}, "
                f"weight={s.weight_granularity}, activation={s.activation_granularity}, "
                f"bias={self.bias is not None}, backend={self.backend_request}"
                + (f", input_act={self.input_act}" if self.input_act else ""))
