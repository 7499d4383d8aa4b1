"""diffquant: quantized diffusion-model inference (FP8 / Int8 / MX / pre-quantized checkpoints).

Importing diffquant never touches CUDA: hardware is probed when a layer is quantized or run.
"""

from diffquant.quantization import (
    QuantizeReport,
    build_quant_config,
    quantize_,
)

__version__ = "0.1.0"

__all__ = ["Engine", "GenerationOutput", "QuantizeReport", "SamplingParams", "__version__", "build_quant_config",
           "quantize_"]

_LAZY = {"Engine": "diffquant.engine", "SamplingParams": "diffquant.engine", "GenerationOutput": "diffquant.engine"}


def __getattr__(name: str):
    """Engine and friends import diffusers; load them on first use so `import diffquant` stays fast."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'diffquant' has no attribute {name!r}")
