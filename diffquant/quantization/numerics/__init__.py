"""Reference numerics in plain PyTorch (CPU or any device): the spec for every kernel."""

from diffquant.quantization.numerics.activations import ACTIVATIONS, activation_input, check_activation
from diffquant.quantization.numerics.fp8 import (
    FP8_DTYPE,
    FP8_MAX,
    expand_block_scale,
    fp8_cast,
    fp8_dequantize,
    fp8_quantize_block,
    fp8_quantize_per_row,
    fp8_quantize_per_tensor,
    fp8_quantize_per_token_group,
    fp8_quantize_static,
)
from diffquant.quantization.numerics.int8 import INT8_MAX, int8_cast, int8_dequantize, int8_quantize_per_row

__all__ = [
    "ACTIVATIONS",
    "activation_input",
    "check_activation",
    "FP8_DTYPE",
    "FP8_MAX",
    "INT8_MAX",
    "expand_block_scale",
    "fp8_cast",
    "fp8_dequantize",
    "fp8_quantize_block",
    "fp8_quantize_per_row",
    "fp8_quantize_per_tensor",
    "fp8_quantize_per_token_group",
    "fp8_quantize_static",
    "int8_cast",
    "int8_dequantize",
    "int8_quantize_per_row",
]
