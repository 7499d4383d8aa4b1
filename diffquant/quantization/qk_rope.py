"""Fused q/k RMSNorm + rotary embedding for FLUX.1 and FLUX.2 attention (config `fuse_qk_norm_rope`, default on).

Between the q/k projections and attention, diffusers' FLUX processors normalize every head
(torch.nn.RMSNorm), concatenate text and image tokens and apply the rotary embedding. Eager, that
is ~20 kernels a module; under torch.compile inductor makes two to three memory-bound kernels of it
per tensor (run 9c: ~118 us a call in FLUX.1's single blocks, ~164 us in its double blocks, ~5 ms a
1024^2 forward). `diffquant::rms_norm_rope` does it in one read and one write (kernels/triton_rope.py;
spec: numerics/rope.py). `fuse_qk_norm_rope(model)` swaps the processor of every attention module
whose processor is one it reproduces (FLUX.1's FluxAttnProcessor, FLUX.2's Flux2AttnProcessor and
Flux2ParallelSelfAttnProcessor) with RMSNorm q/k norms, and reports each module. quantize_ calls it
(fp8 / int8 configs' fuse_qk_norm_rope: None = where supported, True = required, False = never).

Measured on the H200 (benchmarks/NOTES.md runs 10a / 10c, FLUX.1-dev 1024^2, fp8): 18.5 us a call
(~3 TB/s) where inductor's kernels took 118-164; a forward in a CUDA graph 92.9 -> 89.8 ms; eager
141.2 -> 101.7 ms. The FLUX.2 processors run the same op and kernel; on the CPU both equal diffusers'
processors bit for bit (the op's CPU path is diffusers' torch ops).
"""

from __future__ import annotations

import functools

import torch

from diffquant.quantization.fusion import FusionReport
from diffquant.quantization.kernels.triton_ops import triton_available
from diffquant.quantization.numerics.rope import rms_norm_rope_ref

dispatch_attention_fn = None  # diffusers' function, set when the processor class is first built


def rms_norm_rope_impl(parts: list[torch.Tensor], weights: list[torch.Tensor], cos: torch.Tensor,
                       sin: torch.Tensor, eps: float, head_dim: int) -> torch.Tensor:
    """numerics.rope.rms_norm_rope_ref; on CUDA the Triton kernel when triton is installed."""
    if parts[0].is_cuda and triton_available():
        from diffquant.quantization.kernels import triton_rope

        return triton_rope.rms_norm_rope(parts, weights, cos, sin, eps, head_dim)
    return rms_norm_rope_ref(parts, weights, cos, sin, eps, head_dim)


@torch.library.custom_op("diffquant::rms_norm_rope", mutates_args=())
def rms_norm_rope(parts: list[torch.Tensor], weights: list[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor,
                  eps: float, head_dim: int) -> torch.Tensor:
    """The op torch.compile traces; eager calls rms_norm_rope_impl directly (no dispatcher round trip)."""
    return rms_norm_rope_impl(parts, weights, cos, sin, eps, head_dim)


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


def _parts(attn, q, k, v, eq, ek, ev) -> tuple[list, list, list, list, list]:
    """Per-token parts of q, k, v and the q / k norm weights, text tokens first as diffusers concatenates."""
    if attn.added_kv_proj_dim is None:
        return [q], [k], [v], [attn.norm_q.weight], [attn.norm_k.weight]
    return ([eq, q], [ek, k], [ev, v], [attn.norm_added_q.weight, attn.norm_q.weight],
            [attn.norm_added_k.weight, attn.norm_k.weight])


def _qk_rope(attn, parts: tuple, image_rotary_emb) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(query, key, value) as [B, S, H, head_dim], as diffusers' FLUX processors pass them to attention."""
    qs, ks, vs, wq, wk = parts
    cos, sin = image_rotary_emb
    eps, hd = attn.norm_q.eps, attn.head_dim
    # eager: the implementation itself, as triton_ops does for the linears (114 calls a FLUX.1 forward)
    op = torch.ops.diffquant.rms_norm_rope if torch.compiler.is_compiling() else rms_norm_rope_impl
    query = op(qs, wq, cos, sin, eps, hd)
    key = op(ks, wk, cos, sin, eps, hd)
    value = (vs[0] if len(vs) == 1 else torch.cat(vs, dim=1)).unflatten(-1, (-1, hd))
    return query, key, value


def _split_text(out: torch.Tensor, encoder_hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n_txt = encoder_hidden_states.shape[1]
    return out.split_with_sizes([n_txt, out.shape[1] - n_txt], dim=1)


# Each fused processor's __call__ calls `dispatch_attention_fn` itself, by that global name: FP8 attention
# (quantization/attention.py) rebinds the name in a copy of __call__'s globals, as for diffusers' processors.


def _joint_call(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
    """__call__ of the fused FLUX.1 / FLUX.2 double-stream processors (the class holds _base, _get_qkv, _tail)."""
    if image_rotary_emb is None:
        return self._base.__call__(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
    parts = _parts(attn, *self._get_qkv(attn, hidden_states, encoder_hidden_states))
    query, key, value = _qk_rope(attn, parts, image_rotary_emb)
    out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, backend=self._attention_backend,
                                parallel_config=self._parallel_config)
    return self._tail(attn, out.flatten(2, 3).to(query.dtype), encoder_hidden_states)


def _flux1_tail(attn, out, encoder_hidden_states):
    """FluxAttnProcessor's output projections (single blocks project outside the processor)."""
    if encoder_hidden_states is None:
        return out
    txt, img = _split_text(out, encoder_hidden_states)
    img = attn.to_out[1](attn.to_out[0](img.contiguous()))
    return img, attn.to_add_out(txt.contiguous())


def _flux2_tail(attn, out, encoder_hidden_states):
    """Flux2AttnProcessor's output projections."""
    if encoder_hidden_states is None:
        return attn.to_out[1](attn.to_out[0](out))
    txt, img = _split_text(out, encoder_hidden_states)
    txt = attn.to_add_out(txt)
    return attn.to_out[1](attn.to_out[0](img)), txt


def _joint_processor(name: str, tail):
    def build(base, get_qkv):
        doc = f"diffusers 0.42's {base.__name__} with q/k norm + concatenation + rotation in one op."
        return type(name, (base,), {"__call__": _joint_call, "__doc__": doc, "_base": base,
                                    "_get_qkv": staticmethod(get_qkv), "_tail": staticmethod(tail)})

    return build


def _flux2_parallel_processor(base, _):
    class FusedQKNormRopeFlux2ParallelProcessor(base):
        """diffusers 0.42's Flux2ParallelSelfAttnProcessor (FLUX.2 single-stream blocks) with the fused op."""

        def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None):
            if image_rotary_emb is None:
                return super().__call__(attn, hidden_states, attention_mask, image_rotary_emb)
            hidden_states = attn.to_qkv_mlp_proj(hidden_states)
            qkv_dim, mlp_dim = 3 * attn.inner_dim, attn.mlp_hidden_dim * attn.mlp_mult_factor
            local_qkv = hidden_states.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
            qkv, mlp = torch.split(hidden_states, [local_qkv, hidden_states.shape[-1] - local_qkv], dim=-1)
            q, k, v = qkv.chunk(3, dim=-1)
            parts = [q], [k], [v], [attn.norm_q.weight], [attn.norm_k.weight]
            query, key, value = _qk_rope(attn, parts, image_rotary_emb)
            out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, backend=self._attention_backend,
                                        parallel_config=self._parallel_config)
            out = out.flatten(2, 3).to(query.dtype)
            return attn.to_out(torch.cat([out, attn.mlp_act_fn(mlp)], dim=-1))

    return FusedQKNormRopeFlux2ParallelProcessor


# attention module class -> (diffusers module, the processor the fused one reproduces, its builder)
_SUPPORTED = {
    "FluxAttention": ("transformer_flux", "FluxAttnProcessor",
                      _joint_processor("FusedQKNormRopeFluxProcessor", _flux1_tail)),
    "Flux2Attention": ("transformer_flux2", "Flux2AttnProcessor",
                       _joint_processor("FusedQKNormRopeFlux2Processor", _flux2_tail)),
    "Flux2ParallelSelfAttention": ("transformer_flux2", "Flux2ParallelSelfAttnProcessor", _flux2_parallel_processor),
}


@functools.cache
def _processors() -> dict[str, tuple[type, type, type]]:
    """attention module class name -> (module class, diffusers processor class, fused processor class)."""
    import importlib

    from diffusers.models.attention_dispatch import dispatch_attention_fn as dispatch

    globals()["dispatch_attention_fn"] = dispatch
    out = {}
    for attn_name, (module, proc_name, build) in _SUPPORTED.items():
        mod = importlib.import_module(f"diffusers.models.transformers.{module}")
        base = getattr(mod, proc_name)
        fused = build(base, getattr(mod, "_get_qkv_projections", None))
        fused.__module__, fused.__qualname__ = __name__, fused.__name__  # pickle finds it here (__getattr__)
        out[attn_name] = (getattr(mod, attn_name), base, fused)
    return out


def __getattr__(name: str):
    if not name.startswith("FusedQKNormRope"):  # e.g. the import system's __path__ probe: diffusers stays unimported
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    for _, _, fused in _processors().values():
        if fused.__name__ == name:
            return fused
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _why_not(attn, base: type) -> str | None:
    if type(attn.processor) is not base:
        return f"processor is {type(attn.processor).__name__}, not {base.__name__}"
    hd = attn.head_dim
    if hd < 16 or hd > 256 or hd & (hd - 1):
        return f"head_dim {hd} is not a power of two in [16, 256]"
    added = getattr(attn, "added_kv_proj_dim", None) is not None
    names = ("norm_q", "norm_k") + (("norm_added_q", "norm_added_k") if added else ())
    eps = _norm_eps(attn, names)
    return eps if isinstance(eps, str) else None


def _implementation(attn, device) -> str:
    """What runs the op where the module will run: `device` if given, else where its norms are."""
    on_cuda = torch.device(device).type == "cuda" if device is not None else attn.norm_q.weight.is_cuda
    return "Triton kernel" if on_cuda and triton_available() else "torch ops (the spec: not on CUDA, or no triton)"


def fuse_qk_norm_rope(model: torch.nn.Module, required: bool = False,
                      device: torch.device | str | None = None) -> list[FusionReport]:
    """Give every FLUX.1 / FLUX.2 attention module of `model` the fused processor; one report per module.
    required: raise ValueError when no module can take it (the reasons listed). device: where the
    model will run (the report names the implementation used there; default: where its norms are)."""
    by_class = {cls: (base, fused) for cls, base, fused in _processors().values()}
    reports = []
    for name, m in model.named_modules():
        if type(m) not in by_class:
            continue
        base, fused = by_class[type(m)]
        why = _why_not(m, base)
        if why is None:
            m.set_processor(fused())
            reports.append(FusionReport(name, name, "qk_norm_rope", True,
                                        f"q/k RMSNorm + concatenation + RoPE in one op: {_implementation(m, device)}"))
        else:
            reports.append(FusionReport(name, "", "qk_norm_rope", False, why))
    if required and not any(r.fused for r in reports):
        why = "; ".join(f"{r.name}: {r.reason}" for r in reports[:3]) or "it has no FLUX attention module"
        raise ValueError(f"fuse_qk_norm_rope=True: no attention module of {type(model).__name__} can run the fused "
                         f"q/k RMSNorm + RoPE op (FLUX.1 / FLUX.2 attention with diffusers' processors only): {why}")
    return reports
