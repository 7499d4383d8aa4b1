"""Runtime FP8 attention for DiT self-attention: Engine(attention_quantization="fp8"),
`diffquant generate --attention-quantization fp8`, bench_transformer's "+fa8". A prototype: its
Triton kernel passed its H200 tests (run 8a) and beats cuDNN's bf16 attention only on long
sequences (1.24x at 32760 tokens, 0.81x at 4608: MEASURED_SPEEDUP below); the CPU path (the
kernel's float32 emulation) is tested too.

`use_fp8_attention(model)` routes the attention calls of one diffusers transformer instance
(its processors' calls of `dispatch_attention_fn`: FLUX, Qwen-Image, Wan2.2, Z-Image, ...) to
`diffquant::fp8_attention` when a call is plain self-attention of equal-length q / k / v (no mask
or a boolean key-padding mask, no dropout, not causal, no context parallelism; on CUDA head dim 64
or 128); every other call keeps the original backend and is counted as kept. The numerics are
numerics/attention.py; on CUDA the Triton kernel (kernels/triton_attention.py, SM90: the Engine
checks the device, `use_fp8_attention` alone does not), elsewhere its float32 emulation
(`fp8_attention_emulated`: the same blocks, P rounding and online softmax).
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass, field

import torch

from diffquant.quantization.numerics import attention as na

HEAD_DIMS = (64, 128)


@torch.library.custom_op("diffquant::fp8_attention", mutates_args=())
def fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B, H, N, D] q, k, v (any strides), key_mask [B, N] bool (False: a padded key) -> contiguous
    [B, H, N, D] in q's dtype."""
    if q.is_cuda:
        from diffquant.quantization.kernels import triton_attention

        return triton_attention.fp8_attention(q, k, v, sm_scale=scale, key_mask=key_mask)
    return na.fp8_attention_emulated(q, k, v, sm_scale=scale, key_mask=key_mask).to(q.dtype)


@fp8_attention.register_fake
def _(q, k, v, scale, key_mask=None):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


@dataclass
class AttentionPatch:
    """What `use_fp8_attention` changed (attention processors, by their original class) and how
    many attention calls went where (eager calls only: a traced call is not counted)."""

    processors: list = field(default_factory=list)
    fp8_calls: int = 0
    kept_calls: int = 0
    max_tokens: int = 0  # the longest query sequence of an FP8 call

    def restore(self) -> None:
        for proc, cls in self.processors:
            proc.__class__ = cls
        self.processors = []


# FP8 attention (Q/K/V quantization + kernel) against cuDNN's bf16 SDPA on an H200, (tokens, speedup):
# benchmarks/results/bench_attention.md, run 8a (FLUX.1-dev 1024^2, Wan2.2 480p x 81 frames).
MEASURED_SPEEDUP = ((4608, 0.81), (32760, 1.24))
SHORT_SEQUENCE = 16384


def short_sequence_hint(patch: AttentionPatch, device_type: str) -> str | None:
    """On CUDA, a hint when every FP8 call of a run was short: there the measured kernel was slower
    than bf16 SDPA, so FP8 attention cost time as well as quality."""
    if device_type != "cuda" or patch.fp8_calls == 0 or patch.max_tokens >= SHORT_SEQUENCE:
        return None
    measured = ", ".join(f"{x:.2f}x at {n} tokens" for n, x in MEASURED_SPEEDUP)
    return (f"FP8 attention ran on sequences of up to {patch.max_tokens} tokens; against bf16 SDPA on an "
            f"H200 it measured {measured}: at this length it likely costs time as well as quality")


def _key_mask(attn_mask: torch.Tensor | None, batch: int, keys: int) -> torch.Tensor | None | bool:
    """A boolean key-padding mask ([B, N] or [B, 1, 1, N], as Qwen-Image passes) as [B, N]; None
    for no mask; False for any other mask (not supported: the call keeps its backend)."""
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool and attn_mask.shape in ((batch, keys), (batch, 1, 1, keys)):
        return attn_mask.reshape(batch, keys)
    return False


def _eligible(query, key, value, dropout_p, is_causal, enable_gqa, parallel_config) -> bool:
    """Plain self-attention of equal shapes; on CUDA also a head dim the kernel has (the CPU
    emulation takes any)."""
    return (dropout_p == 0.0 and not is_causal and not enable_gqa and parallel_config is None
            and query.shape == key.shape == value.shape and (query.shape[-1] in HEAD_DIMS or not query.is_cuda))


def _fp8_dispatch(original, patch: AttentionPatch):
    """A `dispatch_attention_fn` that sends eligible calls to FP8 attention and the rest to `original`."""

    def dispatch(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                 attention_kwargs=None, *, backend=None, parallel_config=None):
        key_mask = _key_mask(attn_mask, query.shape[0], key.shape[1])
        if key_mask is False or not _eligible(query, key, value, dropout_p, is_causal, enable_gqa, parallel_config):
            if not torch.compiler.is_compiling():
                patch.kept_calls += 1
            return original(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, attention_kwargs,
                            backend=backend, parallel_config=parallel_config)
        if not torch.compiler.is_compiling():
            patch.fp8_calls += 1
            patch.max_tokens = max(patch.max_tokens, query.shape[1])
        q, k, v = (x.permute(0, 2, 1, 3) for x in (query, key, value))  # diffusers passes [B, S, H, D]
        sm_scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        return torch.ops.diffquant.fp8_attention(q, k, v, sm_scale, key_mask).permute(0, 2, 1, 3)

    return dispatch


def _fp8_processor_class(cls: type, patch: AttentionPatch) -> type:
    """A subclass of the processor class whose __call__ is the same code with `dispatch_attention_fn`
    bound to `_fp8_dispatch` (a copy of the function with its own globals): this processor
    instance changes, no module-level function does, so other models of the class are untouched."""
    call = cls.__call__
    env = dict(call.__globals__)
    env["dispatch_attention_fn"] = _fp8_dispatch(call.__globals__["dispatch_attention_fn"], patch)
    new_call = types.FunctionType(call.__code__, env, call.__name__, call.__defaults__, call.__closure__)
    new_call.__kwdefaults__ = call.__kwdefaults__
    return type(f"FP8{cls.__name__}", (cls,), {"__call__": new_call, "__module__": cls.__module__})


def _uses_dispatch(proc) -> bool:
    code = getattr(type(proc).__call__, "__code__", None)
    return code is not None and "dispatch_attention_fn" in code.co_names


def use_fp8_attention(model: torch.nn.Module) -> AttentionPatch:
    """Route `model`'s self-attention to FP8 attention (see the module docstring): each attention
    processor that calls diffusers' `dispatch_attention_fn` gets a subclass calling ours instead.
    Returns the patch (`.restore()` undoes it). ValueError when no processor does (not a diffusers
    DiT of this generation)."""
    patch = AttentionPatch()
    classes: dict[type, type] = {}
    for module in model.modules():
        proc = getattr(module, "processor", None)
        if proc is None or not _uses_dispatch(proc):
            continue
        cls = type(proc)
        if cls not in classes:
            classes[cls] = _fp8_processor_class(cls, patch)
        patch.processors.append((proc, cls))
        proc.__class__ = classes[cls]
    if not patch.processors:
        raise ValueError(f"use_fp8_attention: {type(model).__name__} has no attention processor that calls "
                         "diffusers' dispatch_attention_fn; FP8 attention supports diffusers DiTs that do (FLUX, "
                         "Qwen-Image, Wan2.2, Z-Image, ...)")
    return patch


ATTENTION_METHODS = ("fp8",)


def _head_dim(model: torch.nn.Module) -> int | None:
    cfg = getattr(model, "config", {}) or {}
    if cfg.get("attention_head_dim"):
        return int(cfg["attention_head_dim"])
    if cfg.get("dim") and cfg.get("n_heads"):  # Z-Image
        return int(cfg["dim"]) // int(cfg["n_heads"])
    return None


def check_attention_method(method: str | None) -> None:
    if method is not None and method not in ATTENTION_METHODS:
        raise ValueError(f"unknown attention quantization {method!r}; valid: {', '.join(ATTENTION_METHODS)}")


def check_fp8_attention_device(name: str, head_dim: int | None, capability: tuple[int, int] | None) -> None:
    """capability: the CUDA device's (None on CPU, where the emulation takes any head dim). The
    kernel needs Hopper (TMA, FP8 wgmma) and a head dim of 64 or 128."""
    if capability is None:
        return
    if capability < (9, 0):
        raise ValueError(f"FP8 attention needs an SM90+ GPU (Hopper); this device is SM{capability[0]}{capability[1]}")
    if head_dim is not None and head_dim not in HEAD_DIMS:
        raise ValueError(f"FP8 attention supports head dims {', '.join(map(str, HEAD_DIMS))}; {name} has {head_dim}")


def apply_attention_quantization(models: dict[str, torch.nn.Module], method: str,
                                 device: torch.device) -> dict[str, AttentionPatch]:
    """Engine(attention_quantization=...): FP8 attention in each named transformer, after checking
    that the device can run it. Returns the patches by name."""
    check_attention_method(method)
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    for name, model in models.items():
        check_fp8_attention_device(name, _head_dim(model), capability)
    return {name: use_fp8_attention(model) for name, model in models.items()}
