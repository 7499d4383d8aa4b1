"""Quantization configs, the module swap and the numerics."""

from diffquant.quantization.apply import quantize_
from diffquant.quantization.config import (
    ComponentQuantizationConfig,
    Fp8Config,
    Int8Config,
    QuantizationConfig,
    build_quant_config,
)
from diffquant.quantization.layers import QuantLinear
from diffquant.quantization.registry import method_names
from diffquant.quantization.report import LayerReport, QuantizeReport

__all__ = [
    "ComponentQuantizationConfig",
    "Fp8Config",
    "Int8Config",
    "LayerReport",
    "QuantLinear",
    "QuantizationConfig",
    "QuantizeReport",
    "build_quant_config",
    "method_names",
    "quantize_",
]
