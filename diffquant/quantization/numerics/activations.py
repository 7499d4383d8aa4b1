"""What a linear layer with a fused input activation quantizes: THE SPEC for the fused
activation + quantization kernel (`triton_quant.act_quantize_per_token`).

A fusion pass (`diffquant.quantization.fusion`) moves an elementwise activation that sits between
two linear layers (FLUX's gelu(mlp) before proj_out, every diffusers FeedForward's GELU) into the
consumer's activation quantization. The consumer's input is then

    cat([prefix, act(x)], dim=-1)   (prefix optional: FLUX's single blocks concatenate the
                                      attention output in front of gelu(mlp))

with act computed as torch computes it (in float32, rounded to x's dtype), so the quantized model
sees exactly the values the unfused one did; per-token quantization of that input follows the
format's usual reference (numerics.fp8 / numerics.int8).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Name -> the activation as torch computes it. "gelu_tanh" is nn.GELU(approximate="tanh")
# (diffusers' "gelu-approximate", the FeedForward GELU of FLUX, Qwen-Image, Wan2.2, HunyuanVideo).
ACTIVATIONS = {
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def check_activation(act: str) -> None:
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown input activation {act!r}; valid: {', '.join(sorted(ACTIVATIONS))}")


def activation_input(x: torch.Tensor, prefix: torch.Tensor | None, act: str) -> torch.Tensor:
    """x: [..., Kx], prefix: [..., Kp] | None -> [..., Kp + Kx] = cat([prefix, act(x)], -1)."""
    check_activation(act)
    y = ACTIVATIONS[act](x)
    return y if prefix is None else torch.cat([prefix.to(y.dtype), y], dim=-1)
