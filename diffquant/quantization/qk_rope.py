"""Fused q/k RMSNorm + rotary embedding for FLUX.1 attention (config `fuse_qk_norm_rope`, default on).

Between the q/k projections and attention, diffusers' FluxAttnProcessor normalizes every head
(torch.nn.RMSNorm), concatenates text and image tokens and applies the rotary embedding. Under
torch.compile inductor makes two to three memory-bound kernels of that per tensor (run 9c: ~118 us
a call in FLUX.1's single blocks, ~164 us in its double blocks, ~5 ms a 1024^2 forward);
`diffquant::rms_norm_rope` does it in one read and one write (kernels/triton_rope.py; spec:
numerics/rope.py). `fuse_qk_norm_rope(model)` swaps the processor of every FLUX.1 attention module
whose norms and processor are the ones this op reproduces, and reports each module. quantize_ calls
it (fp8 / int8 configs' fuse_qk_norm_rope: None = where supported, True = required, False = never).

Measured on the H200 (benchmarks/NOTES.md run 10a, FLUX.1-dev 1024^2, fp8): 18.5 us a call (~3 TB/s)
where inductor's kernels took 118-164; a forward in a CUDA graph 92.9 -> 89.8 ms; eager 141.2 ->
101.7 ms (diffusers' eager RMSNorm and float32 rotation are ~20 kernels a module).
"""

from __future__ import annotations

import functools

import torch

from diffquant.quantization.fusion import FusionReport
from diffquant.quantization.numerics.rope import rms_norm_rope_ref

dispatch_attention_fn = None  # diffusers' function, set when the processor class is first built


@torch.library.custom_op("diffquant::rms_norm_rope", mutates_args=())
def rms_norm_rope(parts: list[torch.Tensor], weights: list[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor,
                  eps: float, head_dim: int) -> torch.Tensor:
    """numerics.rope.rms_norm_rope_ref; on CUDA the Triton kernel when triton is installed."""
    from diffquant.quantization.kernels.triton_ops import triton_available

    if parts[0].is_cuda and triton_available():
        from diffquant.quantization.kernels import triton_rope

        return triton_rope.rms_norm_rope(parts, weights, cos, sin, eps, head_dim)
    return rms_norm_rope_ref(parts, weights, cos, sin, eps, head_dim)


@rms_norm_rope.register_fake
def _(parts, weights, cos, sin, eps, head_dim):
    b, _, width = parts[0].shape
    return parts[0].new_empty((b, sum(p.shape[1] for p in parts), width // head_dim, head_dim))


def _norm_eps(attn, names: tuple[str, ...]) -> float | str:
    """The common eps of the named norms, or why they are not what the op computes."""
    eps = set()
    for n in names:
        norm = getattr(attn, n)
        if type(norm) is not torch.nn.RMSNorm or norm.weight is None or norm.eps is None:
            return f"{n} is {norm!r}, not torch.nn.RMSNorm with a weight and an eps"
        eps.add(float(norm.eps))
    return eps.pop() if len(eps) == 1 else f"the norms' eps differ: {sorted(eps)}"


@functools.cache
def _processor_class() -> type:
    from diffusers.models.attention_dispatch import dispatch_attention_fn as dispatch
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, _get_qkv_projections

    # A module global, not a closure variable: FP8 attention (quantization/attention.py) rebinds the
    # name `dispatch_attention_fn` in a copy of __call__'s globals, as it does for diffusers' processors.
    globals()["dispatch_attention_fn"] = dispatch

    class FusedQKNormRopeFluxProcessor(FluxAttnProcessor):
        """diffusers 0.42's FluxAttnProcessor with q/k norm + concatenation + rotation in one op."""

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     image_rotary_emb=None):
            if image_rotary_emb is None:
                return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
            q, k, v, eq, ek, ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
            qs, ks, vs, wq, wk = [q], [k], [v], [attn.norm_q.weight], [attn.norm_k.weight]
            if attn.added_kv_proj_dim is not None:  # text tokens first, as diffusers concatenates them
                qs, ks, vs = [eq, q], [ek, k], [ev, v]
                wq, wk = [attn.norm_added_q.weight, *wq], [attn.norm_added_k.weight, *wk]
            cos, sin = image_rotary_emb
            eps, hd = attn.norm_q.eps, attn.head_dim
            query = torch.ops.diffquant.rms_norm_rope(qs, wq, cos, sin, eps, hd)
            key = torch.ops.diffquant.rms_norm_rope(ks, wk, cos, sin, eps, hd)
            value = (vs[0] if len(vs) == 1 else torch.cat(vs, dim=1)).unflatten(-1, (-1, hd))
            out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, backend=self._attention_backend,
                                        parallel_config=self._parallel_config)
            out = out.flatten(2, 3).to(query.dtype)
            if encoder_hidden_states is None:
                return out
            n_txt = encoder_hidden_states.shape[1]
            txt, img = out.split_with_sizes([n_txt, out.shape[1] - n_txt], dim=1)
            img = attn.to_out[1](attn.to_out[0](img.contiguous()))
            return img, attn.to_add_out(txt.contiguous())

    # pickle finds it as diffquant.quantization.qk_rope.FusedQKNormRopeFluxProcessor (__getattr__ below)
    FusedQKNormRopeFluxProcessor.__module__ = __name__
    FusedQKNormRopeFluxProcessor.__qualname__ = "FusedQKNormRopeFluxProcessor"
    return FusedQKNormRopeFluxProcessor


def __getattr__(name: str):
    if name == "FusedQKNormRopeFluxProcessor":
        return _processor_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _why_not(attn) -> str | None:
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    if type(attn.processor) is not FluxAttnProcessor:
        return f"processor is {type(attn.processor).__name__}, not FluxAttnProcessor"
    hd = attn.head_dim
    if hd < 16 or hd > 256 or hd & (hd - 1):
        return f"head_dim {hd} is not a power of two in [16, 256]"
    names = ("norm_q", "norm_k") + (("norm_added_q", "norm_added_k") if attn.added_kv_proj_dim is not None else ())
    eps = _norm_eps(attn, names)
    return eps if isinstance(eps, str) else None


def _implementation(attn, device) -> str:
    """What runs the op where the module will run: `device` if given, else where its norms are."""
    from diffquant.quantization.kernels.triton_ops import triton_available

    on_cuda = torch.device(device).type == "cuda" if device is not None else attn.norm_q.weight.is_cuda
    return "Triton kernel" if on_cuda and triton_available() else "torch ops (the spec: not on CUDA, or no triton)"


def fuse_qk_norm_rope(model: torch.nn.Module, required: bool = False,
                      device: torch.device | str | None = None) -> list[FusionReport]:
    """Give every FLUX.1 attention module of `model` the fused processor; one report per module.
    required: raise ValueError when no module can take it (the reasons listed). device: where the
    model will run (the report names the implementation used there; default: where its norms are)."""
    from diffusers.models.transformers.transformer_flux import FluxAttention

    reports = []
    for name, m in model.named_modules():
        if type(m) is not FluxAttention:
            continue
        why = _why_not(m)
        if why is None:
            m.set_processor(_processor_class()())
            reports.append(FusionReport(name, name, "qk_norm_rope", True,
                                        f"q/k RMSNorm + concatenation + RoPE in one op: {_implementation(m, device)}"))
        else:
            reports.append(FusionReport(name, "", "qk_norm_rope", False, why))
    if required and not any(r.fused for r in reports):
        why = "; ".join(f"{r.name}: {r.reason}" for r in reports[:3]) or "it has no FluxAttention module"
        raise ValueError(f"fuse_qk_norm_rope=True: no attention module of {type(model).__name__} can run the fused "
                         f"q/k RMSNorm + RoPE op (FLUX.1's FluxAttention with FluxAttnProcessor only): {why}")
    return reports
