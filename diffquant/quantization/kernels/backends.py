"""Linear backends: each takes the layer's quantized state and x2d: [M, K], returns [M, N].

- emulated: the reference numerics quantize the activation, both operands are dequantized and
  multiplied in float32. Runs on any device; the CPU path and the spec of the others.
- scaled_mm: FP8 W8A8 on FP8 tensor cores via torch._scaled_mm (row-wise or tensor-wise scales,
  bias fused in the epilogue, bf16 out, fast accumulation as in triton_ops.scaled_mm_fp8).
- int_mm: Int8 W8A8 via torch._int_mm (int32 accumulate), scales and bias applied after.
- fp8_weight_only: SM80 path; the fp8 weight is dequantized and the matmul runs in bf16.
- triton: fused one-pass per-token activation quantization (Triton) + FP8 torch._scaled_mm or our
  Triton Int8 GEMM with scales and bias in the epilogue; torch custom ops (see triton_ops.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from diffquant.quantization import numerics as nx
from diffquant.quantization.kernels.triton_ops import scaled_mm_fp8, triton_act_linear, triton_linear


@dataclass(frozen=True)
class LinearScheme:
    """How one linear layer is quantized. Granularities: weight per_channel | per_tensor | block;
    activation per_token | per_tensor | static | per_token_group."""

    method: str
    weight_granularity: str
    activation_granularity: str
    in_features: int
    out_features: int
    block_size: tuple[int, int] | None = None
    name: str = ""


def quantize_weight(scheme: LinearScheme, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w: [N, K] -> (qweight [N, K], weight_scale [N, 1] | [] | [GN, GK])."""
    if scheme.method == "int8":
        return nx.int8_quantize_per_row(w)
    if scheme.weight_granularity == "block":
        return nx.fp8_quantize_block(w, *scheme.block_size)
    if scheme.weight_granularity == "per_tensor":
        return nx.fp8_quantize_per_tensor(w)
    return nx.fp8_quantize_per_row(w)


def quantize_activation(
    scheme: LinearScheme, x2d: torch.Tensor, input_scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x2d: [M, K] -> (q [M, K], scale [M, 1] | [] | [M, G]) by the reference numerics."""
    if scheme.method == "int8":
        return nx.int8_quantize_per_row(x2d)
    gran = scheme.activation_granularity
    if gran == "static":
        return nx.fp8_quantize_static(x2d, input_scale), input_scale.float()
    if gran == "per_tensor":
        return nx.fp8_quantize_per_tensor(x2d)
    if gran == "per_token_group":
        return nx.fp8_quantize_per_token_group(x2d, scheme.block_size[1])
    return nx.fp8_quantize_per_row(x2d)


def dequantize_weight(scheme: LinearScheme, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """[N, K] float32 weight as the quantized layer sees it."""
    if scheme.weight_granularity == "block":
        scale = nx.expand_block_scale(scale, tuple(qweight.shape), scheme.block_size)
    return qweight.float() * scale.float()


def _dequantize_activation(scheme: LinearScheme, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    if scheme.activation_granularity == "per_token_group":
        g = scheme.block_size[1]
        scale = scale.repeat_interleave(g, dim=1)[:, : q.shape[1]]
    return q.float() * scale.float()


def emulated_linear(layer, x2d: torch.Tensor) -> torch.Tensor:
    s = layer.scheme
    xq, xs = quantize_activation(s, x2d, layer.input_scale)
    out = _dequantize_activation(s, xq, xs) @ dequantize_weight(s, layer.qweight, layer.weight_scale).t()
    if layer.bias is not None:
        out = out + layer.bias.float()
    return out.to(x2d.dtype)


def _as_row_scale(scale: torch.Tensor, rows: int) -> torch.Tensor:
    """[] or [R, 1] float32 -> contiguous [R, 1] float32 (torch._scaled_mm row-wise layout)."""
    return scale.float().reshape(-1, 1).expand(rows, 1).contiguous()


def scaled_mm_linear(layer, x2d: torch.Tensor) -> torch.Tensor:
    s = layer.scheme
    xq, xs = quantize_activation(s, x2d, layer.input_scale)
    m, n = x2d.shape[0], s.out_features
    bias = layer.bias.to(torch.bfloat16) if layer.bias is not None else None
    if xs.numel() == 1 and layer.weight_scale.numel() == 1:  # tensor-wise scales
        sa, sb = xs.float().reshape(()), layer.weight_scale.float().reshape(())
    else:  # row-wise: scale_a [M, 1], scale_b [1, N]
        sa, sb = _as_row_scale(xs, m), _as_row_scale(layer.weight_scale, n).view(1, n)
    return scaled_mm_fp8(xq, sa, layer.qweight.t(), sb, bias, x2d.dtype)


_INT_MM_MIN_ROWS = 17  # torch._int_mm needs more than 16 rows; pad short inputs (e.g. M=1 modulation)


def int_mm_linear(layer, x2d: torch.Tensor) -> torch.Tensor:
    xq, xs = nx.int8_quantize_per_row(x2d)  # [M, K] int8, [M, 1]
    m = xq.shape[0]
    if m < _INT_MM_MIN_ROWS:
        xq = F.pad(xq, (0, 0, 0, _INT_MM_MIN_ROWS - m))
    acc = torch._int_mm(xq, layer.qweight.t())[:m]  # [M, N] int32
    out = acc.float() * xs * layer.weight_scale.view(1, -1)
    if layer.bias is not None:
        out = out + layer.bias.float()
    return out.to(x2d.dtype)


def fp8_weight_only_linear(layer, x2d: torch.Tensor) -> torch.Tensor:
    w = dequantize_weight(layer.scheme, layer.qweight, layer.weight_scale).to(x2d.dtype)
    return F.linear(x2d, w, layer.bias)


BACKENDS = {
    "emulated": emulated_linear,
    "scaled_mm": scaled_mm_linear,
    "int_mm": int_mm_linear,
    "fp8_weight_only": fp8_weight_only_linear,
    "triton": triton_linear,
}
# Backends with their own path for a fused input activation (QuantLinear.input_act); the others get
# cat([prefix, act(x)]) computed by torch first (numerics.activation_input), the same values.
FUSED_INPUT_BACKENDS = {"triton": triton_act_linear}
