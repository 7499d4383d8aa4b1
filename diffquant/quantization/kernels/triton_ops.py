"""The `triton` backend: fused per-token activation quantization + W8A8 GEMMs, as torch custom ops.

Custom ops (torch.library, with fake impls so `torch.compile(fullgraph=True)` traces through them):

- `diffquant::quantize_per_token(x: [M, K], fmt: "fp8"|"int8") -> (q: [M, K], scale: [M, 1] f32)`
- `diffquant::w8a8_scaled_mm(xq, x_scale, wq, w_scale, bias, out_dtype) -> [M, N]`

On CUDA they run the Triton kernels (`triton_quant`, `triton_gemm`, imported on first use, so
importing diffquant needs neither triton nor a GPU); on any other device they run the reference
numerics, so the op path traces and runs on CPU too. FP8 GEMMs go through `torch._scaled_mm`
(cuBLASLt, row-wise scales, bias in the epilogue) unless `FP8_GEMM` says "triton".
In eager mode the Python wrappers are called directly (no dispatcher round trip per layer).
"""

import functools
import importlib.util

import torch

from diffquant.quantization import numerics as nx

# Which GEMM runs FP8 W8A8 in the triton backend: "scaled_mm" (cuBLASLt) or "triton" (ours).
FP8_GEMM = "scaled_mm"


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _quant_ref(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    return nx.int8_quantize_per_row(x) if fmt == "int8" else nx.fp8_quantize_per_row(x)


def quantize_per_token_impl(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, K] -> (q [M, K] fp8|int8, scale [M, 1] float32); Triton on CUDA, reference elsewhere."""
    if fmt not in ("fp8", "int8"):
        raise ValueError(f"quantize_per_token: fmt must be 'fp8' or 'int8', got {fmt!r}")
    if x.is_cuda and triton_available():
        from diffquant.quantization.kernels import triton_quant

        return triton_quant.quantize_per_token(x, fmt)
    return _quant_ref(x, fmt)


def _mm_ref(xq, x_scale, wq, w_scale, bias, out_dtype):
    # float64 holds the int8 dot products exactly (|sum| < 2^53) and fp8 products nearly so.
    out = (xq.double() @ wq.double().t()) * x_scale.double().reshape(-1, 1) * w_scale.double().reshape(1, -1)
    if bias is not None:
        out = out + bias.double()
    return out.to(out_dtype)


def w8a8_scaled_mm_impl(xq, x_scale, wq, w_scale, bias, out_dtype: torch.dtype) -> torch.Tensor:
    """xq: [M, K], x_scale: [M, 1], wq: [N, K], w_scale: [N, 1] | [], bias: [N] | None -> [M, N]."""
    if xq.is_cuda and triton_available():
        from diffquant.quantization.kernels import triton_gemm

        return triton_gemm.w8a8_scaled_mm(xq, x_scale, wq, w_scale, bias, out_dtype)
    return _mm_ref(xq, x_scale, wq, w_scale, bias, out_dtype)


@torch.library.custom_op("diffquant::quantize_per_token", mutates_args=())
def quantize_per_token(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_per_token_impl(x, fmt)


@quantize_per_token.register_fake
def _(x, fmt):
    dtype = torch.int8 if fmt == "int8" else torch.float8_e4m3fn
    return x.new_empty(x.shape, dtype=dtype), x.new_empty((x.shape[0], 1), dtype=torch.float32)


@torch.library.custom_op("diffquant::w8a8_scaled_mm", mutates_args=())
def w8a8_scaled_mm(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    return w8a8_scaled_mm_impl(xq, x_scale, wq, w_scale, bias, out_dtype)


@w8a8_scaled_mm.register_fake
def _(xq, x_scale, wq, w_scale, bias, out_dtype):
    return xq.new_empty((xq.shape[0], wq.shape[0]), dtype=out_dtype)


def _ops():
    """(quantize, gemm): custom ops while torch.compile traces, plain wrappers in eager mode."""
    if torch.compiler.is_compiling():
        return torch.ops.diffquant.quantize_per_token, torch.ops.diffquant.w8a8_scaled_mm
    return quantize_per_token_impl, w8a8_scaled_mm_impl


def _scaled_mm_fp8(xq, xs, layer, out_dtype):
    n = layer.out_features
    ws = layer.weight_scale
    sb = ws.float().reshape(1, 1).expand(1, n).contiguous() if ws.numel() == 1 else ws.view(1, n)
    bias = layer.bias.to(torch.bfloat16) if layer.bias is not None else None
    out = torch._scaled_mm(xq, layer.qweight.t(), scale_a=xs, scale_b=sb, bias=bias, out_dtype=torch.bfloat16)
    return out if out_dtype == torch.bfloat16 else out.to(out_dtype)


def triton_linear(layer, x2d: torch.Tensor) -> torch.Tensor:
    """QuantLinear backend: x2d [M, K] -> [M, N]; dynamic per-token activation quantization fused
    into one kernel, then the W8A8 GEMM with scales and bias in its epilogue."""
    quant, gemm = _ops()
    fmt = layer.scheme.method
    xq, xs = quant(x2d, fmt)  # [M, K] 8-bit, [M, 1] float32
    if fmt == "fp8" and FP8_GEMM == "scaled_mm" and x2d.is_cuda:
        return _scaled_mm_fp8(xq, xs, layer, x2d.dtype)
    return gemm(xq, xs, layer.qweight, layer.weight_scale, layer.bias, x2d.dtype)
