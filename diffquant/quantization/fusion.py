"""Fusion pass: move an activation that feeds a quantized linear into that linear's activation
quantization, so activation + per-token quantization run as one kernel (the input read from HBM
once, 8-bit codes written) instead of an activation kernel, a bf16 round trip and a quantize kernel.

Two patterns, both in most diffusers transformers:

- diffusers `FeedForward` with a tanh-GELU projection (`activation_fn="gelu-approximate"`: FLUX
  double blocks, Qwen-Image, Wan2.2, ...): `net[0]` keeps its projection and drops its GELU, and
  the output linear `net[2]` applies it (QuantLinear.input_act). The exact GELU (`"gelu"`) is
  reported as a candidate that was not fused.
- FLUX.1 single blocks: proj_out's input is cat([attention, gelu(proj_mlp(x))]); the block's
  forward (diffusers 0.42's, with one change) hands both parts to proj_out, which applies the
  GELU to the second and quantizes the row without materializing the concatenation.

The consumer must be a QuantLinear with dynamic per-token activations (fp8 / int8 W8A8). Module
names and state-dict keys do not change. Every fused and every skipped candidate is reported
(nothing is skipped silently).
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass

import torch
from torch import nn

from diffquant.quantization.layers import QuantLinear

# diffusers GELU(approximate=...) -> our activation name. The exact (erf) GELU is not fused: the
# kernel's libdevice erf did not reproduce torch's CUDA GELU bit for bit (benchmarks/NOTES.md run 6a).
_GELU_ACTS = {"tanh": "gelu_tanh"}


@dataclass
class FusionReport:
    name: str  # the module the pattern was found in
    consumer: str  # the QuantLinear that now applies the activation ("" if not fused)
    act: str
    fused: bool
    reason: str  # what was fused, or why not
    merged: int = 0  # linear layers the fusion removed (q/k/v fusion: parts - fused layers)


def _why_not_consumer(layer: nn.Module, kp: int, kx: int) -> str | None:
    if not isinstance(layer, QuantLinear):
        return f"consumer is {type(layer).__name__}, not a quantized linear"
    s = layer.scheme
    if s.method not in ("fp8", "int8") or s.activation_granularity != "per_token":
        return f"consumer quantizes activations {s.activation_granularity} ({s.method}), not dynamic per-token"
    if layer.input_act is not None:
        return f"consumer already applies {layer.input_act}"
    if kp + kx != layer.in_features:
        return f"widths {kp} + {kx} do not make the consumer's {layer.in_features} inputs"
    return None


class DeferredActivation(nn.Module):
    """Stands in for a diffusers GELU projection whose activation moved into the next linear:
    forward is `proj` alone (the attribute keeps its name, so do the state-dict keys)."""

    def __init__(self, proj: nn.Module, act: str):
        super().__init__()
        self.proj, self.act = proj, act

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden_states)

    def extra_repr(self) -> str:
        return f"act={self.act} (applied by the next linear)"


def _fuse_feedforward(name: str, ff: nn.Module, gelu_cls: type) -> FusionReport | None:
    net = getattr(ff, "net", None)
    if not isinstance(net, nn.ModuleList) or len(net) < 3 or not isinstance(net[0], gelu_cls):
        return None
    act = _GELU_ACTS.get(net[0].approximate)
    if act is None:
        return FusionReport(name, "", f"gelu({net[0].approximate})", False,
                            f"GELU(approximate={net[0].approximate!r}) has no fused kernel (only 'tanh')")
    if not (isinstance(net[1], nn.Dropout) and net[1].p == 0.0):
        return FusionReport(name, "", act, False, f"{net[1]!r} between the GELU and the linear, not Dropout(p=0)")
    consumer = net[2]
    proj = net[0].proj
    why = _why_not_consumer(consumer, 0, getattr(proj, "out_features", -1))
    if why is not None:
        return FusionReport(name, "", act, False, why)
    net[0] = DeferredActivation(proj, act)
    consumer.input_act = act
    return FusionReport(name, f"{name}.net.2", act, True, "GELU + per-token quantization of net.2's input")


def _fused_flux_single_forward(
    self,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    temb: torch.Tensor,
    image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    joint_attention_kwargs: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers 0.42's FluxSingleTransformerBlock.forward, with gelu(proj_mlp) and the
    concatenation in front of proj_out done inside proj_out's activation quantization."""
    text_seq_len = encoder_hidden_states.shape[1]
    hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    residual = hidden_states
    norm_hidden_states, gate = self.norm(hidden_states, emb=temb)
    mlp_pre = self.proj_mlp(norm_hidden_states)  # act_mlp runs inside proj_out
    attn_output = self.attn(hidden_states=norm_hidden_states, image_rotary_emb=image_rotary_emb,
                            **(joint_attention_kwargs or {}))
    hidden_states = residual + gate.unsqueeze(1) * self.proj_out(mlp_pre, prefix=attn_output)
    if hidden_states.dtype == torch.float16:
        hidden_states = hidden_states.clip(-65504, 65504)
    return hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]


_FLUX_SINGLE_PARAMS = ["self", "hidden_states", "encoder_hidden_states", "temb", "image_rotary_emb",
                       "joint_attention_kwargs"]
_FUSED_CLASSES: dict[type, type] = {}


def _fused_class(cls: type) -> type:
    if cls not in _FUSED_CLASSES:
        _FUSED_CLASSES[cls] = type(f"Fused{cls.__name__}", (cls,), {"forward": _fused_flux_single_forward,
                                                                     "__module__": __name__})
    return _FUSED_CLASSES[cls]


def __getattr__(name: str):
    """Pickle finds the fused block class here (torch.save / torch.load of a whole fused model)."""
    if name == "FusedFluxSingleTransformerBlock":
        from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock

        return _fused_class(FluxSingleTransformerBlock)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _fuse_flux_single(name: str, block: nn.Module) -> FusionReport:
    act_mlp = block.act_mlp
    if not isinstance(act_mlp, nn.GELU) or act_mlp.approximate != "tanh":
        return FusionReport(name, "", "gelu_tanh", False, f"act_mlp is {act_mlp!r}, not GELU(tanh)")
    if list(inspect.signature(type(block).forward).parameters) != _FLUX_SINGLE_PARAMS:
        return FusionReport(name, "", "gelu_tanh", False, "forward signature differs from diffusers 0.42's")
    why = _why_not_consumer(block.proj_out, block.attn.inner_dim, block.proj_mlp.out_features)
    if why is not None:
        return FusionReport(name, "", "gelu_tanh", False, why)
    block.__class__ = _fused_class(type(block))
    block.proj_out.input_act = "gelu_tanh"
    return FusionReport(name, f"{name}.proj_out", "gelu_tanh", True,
                        "GELU + concatenation + per-token quantization of proj_out's input")


def fuse_activations(module: nn.Module) -> list[FusionReport]:
    """Apply the fusions above to `module` in place (after quantization); returns one report per
    candidate pattern found, fused or not. Modules that are not diffusers models have none."""
    if "diffusers" not in sys.modules:  # no diffusers module was ever built: nothing to match
        return []
    from diffusers.models.activations import GELU
    from diffusers.models.attention import FeedForward
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock

    reports = []
    for name, m in list(module.named_modules()):
        report = None
        if isinstance(m, FeedForward):
            report = _fuse_feedforward(name, m, GELU)
        elif type(m) is FluxSingleTransformerBlock:
            report = _fuse_flux_single(name, m)
        if report is not None:
            reports.append(report)
    return reports
