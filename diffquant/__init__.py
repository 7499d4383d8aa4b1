"""diffquant: quantized diffusion-model inference (FP8 / Int8 / MX / pre-quantized checkpoints).

Importing diffquant never touches CUDA: hardware is probed when a layer is quantized or run.
"""

from diffquant.quantization import (
    QuantizeReport,
    build_quant_config,
    quantize_,
)

__version__ = "0.1.0"

__all__ = ["QuantizeReport", "__version__", "build_quant_config", "quantize_"]
