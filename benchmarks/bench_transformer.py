"""Whole-transformer benchmark: real-shaped diffusers DiTs with random weights, one denoising forward.

For each variant (bf16, diffquant fp8/int8, torchao 0.18 fp8 rowwise / int8 dynamic, in the same
run) it reports the median forward time (CUDA events), weight memory and peak memory (allocator
deltas, so torchao's tensor subclasses are counted by what they really allocate) and, as the
quality column, the per-block output SQNR vs bf16 on the same block inputs (random weights make
end-to-end quality meaningless: see DESIGN.md).

Compiled variants use regional compilation: one `torch.compile(fullgraph=True)` graph per block
*type* (FLUX: double and single blocks), shared by every block of that type through
`torch.func.functional_call` with that block's own weights, so each variant compiles two graphs
instead of the whole model (the repeated blocks are ~all of the time; embedders and norm_out stay
eager). "+whole" / "+ro" compile the whole model as `Engine(compile=True / "reduce-overhead")` does
(minutes of first compile each); "+graph" replays a CUDA graph of one compiled forward.

    python benchmarks/bench_transformer.py --model flux1-dev --variants bf16 fp8 int8 ao-fp8 ao-int8 \
        --compile bf16 fp8 int8 ao-fp8
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import inductor_tuning  # noqa: E402
from benchmarks.common import environment, md_table, sqnr_db, time_cuda, write_results  # noqa: E402
from diffquant.engine.models import keep_patterns  # noqa: E402
from diffquant.quantization import quantize_  # noqa: E402
from diffquant.quantization.attention import use_fp8_attention  # noqa: E402
from diffquant.quantization.kernels import triton_launch, triton_ops  # noqa: E402
from diffquant.quantization.patterns import LayerMatcher  # noqa: E402
from diffquant.quantization.qk_rope import fuse_qk_norm_rope  # noqa: E402

GB = 1e9
_DEFAULT_FAST_ACCUM = triton_ops.FP8_FAST_ACCUM
_DEFAULT_COMPILED_QUANT = triton_ops.COMPILED_QUANT
_DEFAULT_INT8_KERNEL = triton_ops.COMPILED_INT8_KERNEL
_DEFAULT_DIRECT_LAUNCH = triton_launch.ENABLED


def flux_spec(height: int = 1024, width: int = 1024, text_tokens: int = 512, **overrides) -> dict:
    from diffusers import FluxTransformer2DModel

    cfg = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
               num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
               axes_dims_rope=(16, 56, 56))
    cfg.update(overrides)

    def build():
        return FluxTransformer2DModel(**cfg)

    def inputs(dev):
        h, w = height // 16, width // 16  # 8x VAE, 2x2 patches -> tokens
        g = torch.Generator(device=dev).manual_seed(1)
        img_ids = torch.zeros(h, w, 3, device=dev)
        img_ids[..., 1] = torch.arange(h, device=dev)[:, None]
        img_ids[..., 2] = torch.arange(w, device=dev)[None, :]
        bf = torch.bfloat16
        return dict(
            hidden_states=torch.randn(1, h * w, cfg["in_channels"], device=dev, generator=g).to(bf),
            encoder_hidden_states=torch.randn(1, text_tokens, cfg["joint_attention_dim"], device=dev,
                                              generator=g).to(bf),
            pooled_projections=torch.randn(1, cfg["pooled_projection_dim"], device=dev, generator=g).to(bf),
            timestep=torch.tensor([0.5], device=dev, dtype=bf),
            img_ids=img_ids.reshape(-1, 3), txt_ids=torch.zeros(text_tokens, 3, device=dev),
            guidance=torch.tensor([3.5], device=dev, dtype=bf), return_dict=False,
        )

    return dict(
        build=build, inputs=inputs, blocks=("transformer_blocks", "single_transformer_blocks"),
        sqnr_blocks=tuple(dict.fromkeys((  # distinct names (a --config of one block names it twice)
            "transformer_blocks.0", f"transformer_blocks.{cfg['num_layers'] - 1}",
            "single_transformer_blocks.0", f"single_transformer_blocks.{cfg['num_single_layers'] - 1}"))),
        # DESIGN decision 8: modulation, embedders, norm_out and the final proj_out stay bf16
        # (the engine's FLUX profile; torchao gets the same layer filter).
        keep=keep_patterns("flux1-dev"),
        shape=f"{height}x{width}, {(height // 16) * (width // 16)} image + {text_tokens} text tokens",
    )


def qwen_image_spec(height: int = 1024, width: int = 1024, text_tokens: int = 256, **overrides) -> dict:
    """Qwen-Image (20B, 60 dual-stream blocks) at 1024^2 (issue 4's shape; the pipeline's default is
    1328^2): 4096 image tokens."""
    from diffusers import QwenImageTransformer2DModel

    cfg = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
               num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56))
    cfg.update(overrides)
    h, w = height // 16, width // 16

    def inputs(dev):
        g = torch.Generator(device=dev).manual_seed(1)
        bf = torch.bfloat16
        return dict(
            hidden_states=torch.randn(1, h * w, cfg["in_channels"], device=dev, generator=g).to(bf),
            encoder_hidden_states=torch.randn(1, text_tokens, cfg["joint_attention_dim"], device=dev,
                                              generator=g).to(bf),
            # No mask: QwenImagePipeline drops an all-ones prompt mask (batch 1), and the forward turns a
            # mask into a host-to-device copy that CUDA-graph capture refuses.
            encoder_hidden_states_mask=None,
            timestep=torch.tensor([0.5], device=dev, dtype=bf), img_shapes=[[(1, h, w)]], return_dict=False,
        )

    last = cfg["num_layers"] - 1
    return dict(build=lambda: QwenImageTransformer2DModel(**cfg), inputs=inputs, blocks=("transformer_blocks",),
                sqnr_blocks=("transformer_blocks.0", f"transformer_blocks.{last}"), keep=keep_patterns("qwen-image"),
                shape=f"{height}x{width}, {h * w} image + {text_tokens} text tokens")


def wan22_spec(frames: int = 81, height: int = 480, width: int = 832, text_tokens: int = 512, **overrides) -> dict:
    """One Wan2.2-A14B expert (14B, 40 blocks) at 480p x 81 frames: 32760 video tokens."""
    from diffusers import WanTransformer3DModel

    cfg = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
               text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
    cfg.update(overrides)
    t, h, w = (frames - 1) // 4 + 1, height // 8, width // 8  # Wan VAE: 4x time, 8x space

    def inputs(dev):
        g = torch.Generator(device=dev).manual_seed(1)
        bf = torch.bfloat16
        return dict(
            hidden_states=torch.randn(1, cfg["in_channels"], t, h, w, device=dev, generator=g).to(bf),
            timestep=torch.tensor([500.0], device=dev),
            encoder_hidden_states=torch.randn(1, text_tokens, cfg["text_dim"], device=dev, generator=g).to(bf),
            return_dict=False,
        )

    last = cfg["num_layers"] - 1
    tokens = t * (h // 2) * (w // 2)
    return dict(build=lambda: WanTransformer3DModel(**cfg), inputs=inputs, blocks=("blocks",),
                sqnr_blocks=("blocks.0", f"blocks.{last}"), keep=keep_patterns("wan2.2-a14b"),
                shape=f"{frames}x{height}x{width}, {tokens} video tokens + {text_tokens} text tokens")


def z_image_spec(height: int = 1024, width: int = 1024, text_tokens: int = 256, **overrides) -> dict:
    """Z-Image (6B, single-stream: 2 noise + 2 context refiner blocks, 30 main blocks; diffusers'
    defaults are the released config) at 1024^2: 4096 image tokens."""
    from diffusers import ZImageTransformer2DModel

    cfg = dict(overrides)
    h, w = height // 8, width // 8  # 8x VAE; the transformer patchifies 2x2

    def inputs(dev):
        g = torch.Generator(device=dev).manual_seed(1)
        bf = torch.bfloat16
        in_ch, cap = cfg.get("in_channels", 16), cfg.get("cap_feat_dim", 2560)
        return dict(
            x=[torch.randn(in_ch, 1, h, w, device=dev, generator=g).to(bf)],
            t=torch.tensor([0.5], device=dev, dtype=bf),
            cap_feats=[torch.randn(text_tokens, cap, device=dev, generator=g).to(bf)],
            return_dict=False,
        )

    last = cfg.get("n_layers", 30) - 1
    return dict(build=lambda: ZImageTransformer2DModel(**cfg), inputs=inputs,
                blocks=("noise_refiner", "context_refiner", "layers"),
                sqnr_blocks=("layers.0", f"layers.{last}"), keep=keep_patterns("z-image"),
                shape=f"{height}x{width}, {(h // 2) * (w // 2)} image + {text_tokens} text tokens")


def flux2_klein_spec(height: int = 1024, width: int = 1024, text_tokens: int = 512, **overrides) -> dict:
    """FLUX.2-klein 4B (3.88B parameters: 5 double-stream + 20 single-stream blocks, 24 heads of 128,
    text features of three Qwen3-4B layers: 3 x 2560) at 1024^2: 4096 image tokens (16x VAE + 2x2
    packing: 128 channels). The 9B model: --config num_layers=8 num_single_layers=24
    num_attention_heads=32 joint_attention_dim=12288 (9.08B)."""
    from diffusers import Flux2Transformer2DModel

    cfg = dict(num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680,
               guidance_embeds=False)
    cfg.update(overrides)
    h, w = height // 16, width // 16

    def inputs(dev):
        g = torch.Generator(device=dev).manual_seed(1)
        bf = torch.bfloat16
        img_ids = torch.zeros(h, w, 4, device=dev)
        img_ids[..., 1] = torch.arange(h, device=dev)[:, None]
        img_ids[..., 2] = torch.arange(w, device=dev)[None, :]
        txt_ids = torch.zeros(text_tokens, 4, device=dev)
        txt_ids[:, 3] = torch.arange(text_tokens, device=dev)
        return dict(
            hidden_states=torch.randn(1, h * w, cfg.get("in_channels", 128), device=dev, generator=g).to(bf),
            encoder_hidden_states=torch.randn(1, text_tokens, cfg["joint_attention_dim"], device=dev,
                                              generator=g).to(bf),
            timestep=torch.tensor([0.5], device=dev, dtype=bf), img_ids=img_ids.reshape(-1, 4), txt_ids=txt_ids,
            return_dict=False,
        )

    return dict(
        build=lambda: Flux2Transformer2DModel(**cfg), inputs=inputs,
        blocks=("transformer_blocks", "single_transformer_blocks"),
        sqnr_blocks=tuple(dict.fromkeys((
            "transformer_blocks.0", f"transformer_blocks.{cfg['num_layers'] - 1}",
            "single_transformer_blocks.0", f"single_transformer_blocks.{cfg['num_single_layers'] - 1}"))),
        keep=keep_patterns("flux2-klein"),
        shape=f"{height}x{width}, {h * w} image + {text_tokens} text tokens",
    )


SPECS = {"flux1-dev": flux_spec, "flux2-klein": flux2_klein_spec, "qwen-image": qwen_image_spec,
         "wan2.2-a14b": wan22_spec, "z-image": z_image_spec}


def _quantize_variant(model: torch.nn.Module, variant: str, keep: tuple[str, ...]) -> str:
    """Quantize `model` in place; returns a short description."""
    if variant == "bf16":
        return "bf16 (no quantization)"
    if variant.partition("-")[0] in ("fp8", "int8"):
        method, _, backend = variant.partition("-")
        backend = "triton" if backend in ("inductor", "kernel") else backend
        report = quantize_(model, {"method": method, "backend": backend or "auto", **_QUANT_EXTRA},
                           keep_high_precision=keep)
        backends = sorted({layer.backend for layer in report.quantized})
        fused = sum(f.fused for f in report.fusions)
        qkv = sum(f.fused for f in report.projections)
        rope = sum(f.fused for f in report.attention)
        return (f"diffquant {method}: {len(report.quantized)} layers on {','.join(backends)}, {len(report.kept)} kept, "
                f"{fused} activations fused, q/k/v fused in {qkv} attention modules, "
                f"q/k RMSNorm + RoPE fused in {rope}")
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int8DynamicActivationInt8WeightConfig,
        PerRow,
    )
    from torchao.quantization import quantize_ as ao_quantize_

    matcher = LayerMatcher(keep)

    def filter_fn(module, fqn):
        return isinstance(module, torch.nn.Linear) and not matcher.match(fqn)

    cfg = (Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()) if variant == "ao-fp8"
           else Int8DynamicActivationInt8WeightConfig())
    ao_quantize_(model, cfg, filter_fn=filter_fn)
    return f"torchao {type(cfg).__name__}"


class _RegionalBlock(torch.nn.Module):
    """Stands in for one block: runs the shared compiled graph with this block's weights."""

    def __init__(self, fn, params: dict[str, torch.Tensor]):
        super().__init__()
        self.fn, self.params = fn, params

    def forward(self, *args, **kwargs):
        # Canonical strides: one set of stride guards for every block of the type (no recompiles).
        kwargs = {k: _canonical(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        return self.fn(self.params, args, kwargs)


def _canonical(t: torch.Tensor) -> torch.Tensor:
    """Contiguous t with row-major strides also on size-1 dims (a [1, S, D] slice of a longer
    sequence is contiguous but keeps the parent's batch stride, which dynamo guards on)."""
    t = t.contiguous()
    strides, acc = [], 1
    for size in reversed(t.shape):
        strides.append(acc)
        acc *= size
    strides = tuple(reversed(strides))
    return t if t.stride() == strides else t.as_strided(t.shape, strides, t.storage_offset())


def regional_compile(model: torch.nn.Module, block_lists: tuple[str, ...], backend: str = "inductor"):
    """One compiled graph per block type, shared by all blocks of the type (weights as graph inputs).

    Swaps each block in its ModuleList for a _RegionalBlock; returns a function that undoes it."""
    undo = []
    for attr in block_lists:
        blocks = getattr(model, attr)
        # A private copy: if the template owned block 0's tensors, dynamo would guard on their
        # identity and compile block 0 separately.
        template = copy.deepcopy(blocks[0])

        def run(params, args, kwargs, template=template):
            return torch.func.functional_call(template, params, args, kwargs)

        fn = torch.compile(run, fullgraph=True, backend=backend)
        originals = list(blocks)
        for i, b in enumerate(originals):
            blocks[i] = _RegionalBlock(fn, {**dict(b.named_parameters()), **dict(b.named_buffers())})
        undo.append((blocks, originals))

    def restore():
        for blocks, originals in undo:
            for i, b in enumerate(originals):
                blocks[i] = b

    return restore


def _capture_blocks(model, names, inputs):
    """Run `model` once, recording (args, kwargs, output) of the named blocks."""
    seen, hooks = {}, []
    for name in names:
        mod = model.get_submodule(name)

        def hook(mod, args, kwargs, out, name=name):
            seen[name] = (args, kwargs, out)

        hooks.append(mod.register_forward_hook(hook, with_kwargs=True))
    with torch.no_grad():  # as diffusers pipelines run (inference tensors skip the shared q/k/v quantization)
        model(**inputs)
    for h in hooks:
        h.remove()
    return seen


def _flat(out) -> torch.Tensor:
    """A block's or model's output (a tensor, or tuples/lists of them, e.g. Z-Image's list) as one
    flat float32 vector."""
    if isinstance(out, torch.Tensor):
        return out.reshape(-1).float()
    return torch.cat([_flat(o) for o in out])


def block_sqnr(model, captured) -> dict[str, float]:
    res = {}
    with torch.no_grad():
        for name, (args, kwargs, ref) in captured.items():
            out = model.get_submodule(name)(*args, **kwargs)
            res[name] = sqnr_db(_flat(out), _flat(ref))
    return res


def _record_sqnr(row: dict, model, captured) -> None:
    sq = block_sqnr(model, captured)
    row["block_sqnr_db"] = sq
    row["sqnr_min_db"] = min(sq.values())
    row["sqnr_mean_db"] = sum(sq.values()) / len(sq)


def _free_memory() -> None:
    """Release the previous variant's model (unreferenced once its function returned)."""
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()


_QUANT_EXTRA: dict = {}  # quantize_ options, set per variant by _knobs
_PROFILE_TIMED: set[str] = set()  # --profile-timed: variants profiled right after their timing
TIMED_PROFILES: dict[str, str] = {}


def _compile_kind(variant: str) -> str:
    """How a compiled variant is compiled: "regional" (the default: regional_compile below),
    "whole model" (+whole: model.compile(), as Engine(compile=True) does) or "whole model,
    reduce-overhead" (+ro: as Engine(compile="reduce-overhead"): torch's CUDA-graph trees)."""
    opts = variant.split("+")[1:]
    return "whole model, reduce-overhead" if "ro" in opts else "whole model" if "whole" in opts else "regional"


def _mode(variant: str, compiled: bool) -> str:
    mode = f"compiled ({_compile_kind(variant)})" if compiled else "eager"
    return mode + (" + CUDA graph" if "graph" in variant.split("+")[1:] else "")


def _graphed(model, inputs):
    """Replay function of one forward captured in a CUDA graph (after warm-up on a side stream, as
    torch.cuda.graph requires). The inputs are the same tensors every call, so replays copy nothing;
    compiled variants must not recompile during capture (their first call ran before)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            model(**inputs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model(**inputs)
    return graph.replay


def _knobs(variant: str) -> str:
    """Set the kernel knobs a variant name carries; returns the name without its "+" option.
    "-inductor" / "-kernel": under compile, inductor generates the activation quantization (fused
    into the producer, shared by q/k/v) / our kernel does (triton_ops.COMPILED_QUANT; no suffix: the
    library's default); "+fa" / "+nofa":
    FP8 GEMMs with / without fast accumulation (triton_ops.FP8_FAST_ACCUM; default: the library's);
    "+wide": inductor keeps row reductions up to 16384 wide persistent (benchmarks/inductor_tuning);
    "+cdt": inductor's coordinate-descent tuning of its generated kernels (torchao's compiled variants
    get it from torchao's own config setter); "+nofuse": quantize_ with fuse_activations=False (the
    GELUs stay separate ops, quantization/fusion.py);
    "+graph": time replays of one forward captured in a CUDA graph (no CPU work per forward; its own
    mode, compared with "bf16+graph"); "+classic" / "+tmaauto": under compile, int8 GEMMs always on the
    classic kernel / on the TMA one wherever it applies (triton_ops.COMPILED_INT8_KERNEL; the default
    takes TMA inside CUDA-graph capture only); "+whole" / "+ro": under compile, the
    whole model through model.compile() in torch.compile's default / "reduce-overhead" mode, as the
    Engine compiles (no per-block wrapper; first compiles take minutes: see _compile_kind); "+fa8":
    self-attention through the FP8 attention prototype (quantization/attention.py); "+qkv": this
    variant's copy of the model gets diffusers' fuse_qkv_projections() before quantization (one GEMM
    for q/k/v, the parts kept beside it; --fuse-qkv does it for every variant: for torchao and bf16,
    since diffquant's fp8 / int8 fuse quantized q/k/v by default, quantization/qkv.py); "+noqkv":
    diffquant's quantize_ with fuse_qkv=False; "+nodl": our compiled Triton kernels launched through
    Triton's own launch path in eager mode (triton_launch.ENABLED off; direct launches are the default);
    "+qknr": FLUX.1's q/k RMSNorm + RoPE through the fused op (quantization/qk_rope.py) for bf16 and
    torchao variants (diffquant's fp8 / int8 fuse it by default); "+noqknr": quantize_ with
    fuse_qk_norm_rope=False."""
    name, *opts = variant.split("+")
    valid = ("fa", "nofa", "wide", "cdt", "nofuse", "graph", "classic", "tmaauto", "whole", "ro", "fa8", "qkv",
             "noqkv", "nodl", "qknr", "noqknr")
    unknown = set(opts) - set(valid)
    if unknown:
        raise ValueError(f"variant options {sorted(unknown)} unknown; valid: " + ", ".join("+" + o for o in valid))
    if "qknr" in opts and name.partition("-")[0] in ("fp8", "int8"):
        raise ValueError(f"{variant}: diffquant's {name} fuses q/k RMSNorm + RoPE by default; +noqknr turns it off")
    if "ro" in opts and ("graph" in opts or "whole" in opts):
        raise ValueError(f"{variant}: +ro is whole-model compile with CUDA-graph trees; it takes no +graph or +whole")
    triton_ops.COMPILED_INT8_KERNEL = ("classic" if "classic" in opts else "auto" if "tmaauto" in opts
                                      else _DEFAULT_INT8_KERNEL)
    _QUANT_EXTRA.update(fuse_activations="nofuse" not in opts, fuse_qkv=False if "noqkv" in opts else None,
                        fuse_qk_norm_rope=False if "noqknr" in opts else None)
    triton_launch.ENABLED = False if "nodl" in opts else _DEFAULT_DIRECT_LAUNCH
    triton_ops.FP8_FAST_ACCUM = True if "fa" in opts else False if "nofa" in opts else _DEFAULT_FAST_ACCUM
    suffix = name.rpartition("-")[2]
    triton_ops.COMPILED_QUANT = suffix if suffix in ("inductor", "kernel") else _DEFAULT_COMPILED_QUANT
    import torch._inductor.config as inductor_config

    inductor_config.inductor_choices_class = inductor_tuning.WideRowReductions if "wide" in opts else None
    if "cdt" in opts:  # what torchao's recommended_inductor_config_setter turns on (run_variant restores it)
        inductor_config.coordinate_descent_tuning = True
        inductor_config.coordinate_descent_check_all_directions = True
    return name


def _compile_for(model, spec, variant: str, compiled: bool):
    """Compile as the variant asks (from a clean dynamo cache: the knobs of the previous variant
    must not be reused); returns the undo function (or None)."""
    if not compiled:
        return None
    torch._dynamo.reset()
    kind = _compile_kind(variant)
    if kind == "regional":
        return regional_compile(model, spec["blocks"])
    model.compile(fullgraph=False, mode="reduce-overhead" if kind.endswith("reduce-overhead") else None)

    def restore():
        model._compiled_call_impl = None

    return restore


@contextlib.contextmanager
def _inductor_config_restored():
    """Inductor's config as it was on entry, afterwards: torchao's quantize_ configs call
    torchao.quantization.utils.recommended_inductor_config_setter() (coordinate-descent tuning on,
    process-wide, never undone) and our "+" knobs set it too; neither may leak into later variants."""
    import torch._inductor.config as inductor_config

    saved = inductor_config.save_config()
    try:
        yield
    finally:
        inductor_config.load_config(saved)


def run_variant(base, spec, variant, compiled, captured, inputs, reps) -> dict:
    with _inductor_config_restored():
        return _run_variant(base, spec, variant, compiled, captured, inputs, reps)


@contextlib.contextmanager
def _attention_for(model, variant: str):
    """"+fa8": the model's self-attention through FP8 attention while the variant runs."""
    patch = use_fp8_attention(model) if "fa8" in variant.split("+")[1:] else None
    try:
        yield patch
    finally:
        if patch is not None:
            patch.restore()


def _run_variant(base, spec, variant, compiled, captured, inputs, reps) -> dict:
    _free_memory()
    mem0 = torch.cuda.memory_allocated()
    row = dict(variant=variant, mode=_mode(variant, compiled))
    opts = variant.split("+")[1:]
    fuse_qkv = "qkv" in opts
    model = base if variant.partition("+")[0] == "bf16" and not (fuse_qkv or "qknr" in opts) else copy.deepcopy(base)
    if fuse_qkv:
        model.fuse_qkv_projections()
    t0 = time.perf_counter()
    row["quantization"] = _quantize_variant(model, _knobs(variant), spec["keep"])
    if "qknr" in opts:
        fused = sum(r.fused for r in fuse_qk_norm_rope(model))
        row["quantization"] += f"; fused q/k RMSNorm + RoPE in {fused} attention modules"
    with _attention_for(model, variant) as attention:
        torch.cuda.synchronize()
        row["quantize_s"] = time.perf_counter() - t0
        row["weights_GB"] = (torch.cuda.memory_allocated() - mem0) / GB if model is not base else (
            sum(p.numel() * p.element_size() for p in model.parameters()) / GB)
        quantized = variant.partition("+")[0] != "bf16" or attention is not None
        if quantized and not compiled:
            _record_sqnr(row, model, captured)
        restore = _compile_for(model, spec, variant, compiled)
        try:
            with torch.no_grad():
                _time_variant(row, model, inputs, variant, quantized and compiled, captured, attention, reps)
        finally:  # a failed variant must not leave the shared bf16 model wrapped for the next one
            if restore is not None:
                restore()
    return row


def _time_variant(row, model, inputs, variant, compiled_quantized, captured, attention, reps) -> None:
    """First call (compiles), block SQNR of a compiled quantized variant, then the timed forwards."""
    if attention is not None:
        attention.fp8_calls = attention.kept_calls = 0  # count the first forward's calls only
    t0 = time.perf_counter()
    model(**inputs)
    torch.cuda.synchronize()
    row["first_call_s"] = time.perf_counter() - t0
    if attention is not None:  # eager calls of the first forward; a compiled one runs the traced op
        counted = ("traced into the compiled graphs" if compiled_quantized
                   else f"{attention.fp8_calls} calls, {attention.kept_calls} kept")
        row["quantization"] += f"; FP8 attention: {counted}"
    if compiled_quantized and _compile_kind(variant) == "regional":
        _record_sqnr(row, model, captured)  # through the compiled block graphs (compiled above)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn = _graphed(model, inputs) if row["mode"].endswith("CUDA graph") else (lambda: model(**inputs))
    warmup = 4 if "reduce-overhead" in row["mode"] else 2  # CUDA-graph trees record on call 2-3
    t = time_cuda(fn, warmup=warmup, reps=reps)
    row["activation_peak_GB"] = (torch.cuda.max_memory_allocated() - before) / GB
    if variant in _PROFILE_TIMED:
        TIMED_PROFILES[f"{variant} ({row['mode']}, profiled after timing)"] = profile_forward(model, inputs)
    row.update(ms=t["ms"], min_ms=t["min_ms"], max_ms=t["max_ms"], reps=t["reps"])
    row["peak_GB"] = row["weights_GB"] + row["activation_peak_GB"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="flux1-dev", choices=list(SPECS))
    ap.add_argument("--variants", nargs="*", default=["bf16", "fp8", "int8", "ao-fp8", "ao-int8"])
    ap.add_argument("--compile", nargs="*", default=[], help="variants to also time with regional compile")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--config", nargs="*", default=[], metavar="KEY=INT",
                    help="override integer fields of the model config, e.g. num_layers=1 num_single_layers=2 "
                         "(a few blocks: fast compiles for kernel-level A/B runs)")
    ap.add_argument("--tag", default="")
    ap.add_argument("--fuse-qkv", action="store_true",
                    help="diffusers fuse_qkv_projections() on the bf16 model first (all variants share it)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", nargs="*", default=[], help="variants to profile (eager, top CUDA kernels)")
    ap.add_argument("--profile-compiled", nargs="*", default=[], help="variants to profile under regional compile")
    ap.add_argument("--profile-timed", nargs="*", default=[],
                    help="variants (of --variants / --compile) profiled with one more forward right after their "
                         "timing: no second compile")
    ap.add_argument("--multi-kernel", action="store_true",
                    help="inductor multi_kernel=1 for every compiled variant: rows of 3072 (FLUX) exceed inductor's "
                         "1024-element persistent-reduction threshold, so norm + quantization otherwise loop over x")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    torch._dynamo.config.cache_size_limit = 64
    if args.multi_kernel:
        import torch._inductor.config as inductor_config

        inductor_config.triton.multi_kernel = 1
    spec = SPECS[args.model](**_config_overrides(args.config))
    dev = "cuda"
    with torch.device(dev):
        base = spec["build"]().to(torch.bfloat16).eval()  # fp32 init on the GPU, then bf16
    base.requires_grad_(False)
    if args.fuse_qkv:
        base.fuse_qkv_projections()
    torch.cuda.empty_cache()
    inputs = spec["inputs"](dev)
    captured = _capture_blocks(base, spec["sqnr_blocks"], inputs)
    env = environment()
    rows = []
    # In the order given (put torchao's compiled variants early: their compile time is the least
    # predictable and a stage limit should not cut them), then the profiles.
    jobs = [(v, False) for v in args.variants] + [(v, True) for v in args.compile]
    profiles = TIMED_PROFILES
    _PROFILE_TIMED.update(args.profile_timed)
    for variant, compiled in jobs:
        try:
            row = run_variant(base, spec, variant, compiled, captured, inputs, args.reps)
        except Exception as e:  # noqa: BLE001 - record the failure, keep benchmarking the rest
            traceback.print_exc()
            row = dict(variant=variant, mode=_mode(variant, compiled),
                       error=f"{type(e).__name__}: {str(e)[:300]}")
            torch._dynamo.reset()
            gc.collect()
            torch.cuda.empty_cache()
        rows.append(row)
        print({k: v for k, v in row.items() if k != "block_sqnr_db"}, flush=True)
        _report(args, spec, env, rows, profiles)  # after every variant: a killed run keeps what it measured
    for v, compiled in [(v, False) for v in args.profile] + [(v, True) for v in args.profile_compiled]:
        with _inductor_config_restored():
            profiles[f"{v} (compiled)" if compiled else v] = profile_variant(base, spec, v, inputs, compiled)
        _report(args, spec, env, rows, profiles)
    _report(args, spec, env, rows, profiles, echo=True)


def _config_overrides(items: list[str]) -> dict[str, int]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not value.lstrip("-").isdigit():
            raise SystemExit(f"--config takes KEY=INT, got {item!r}")
        out[key] = int(value)
    return out


def _report(args, spec, env, rows, profiles, echo=False):
    for mode in {r["mode"] for r in rows}:
        base_row = next((r for r in rows if r["variant"].partition("+")[0] == "bf16" and r["mode"] == mode
                         and "ms" in r), None)
        for r in rows:
            if base_row and r["mode"] == mode and "ms" in r:
                r["speedup_vs_bf16_same_mode"] = base_row["ms"] / r["ms"]
    cols = ["variant", "mode", "ms", "speedup_vs_bf16_same_mode", "weights_GB", "peak_GB", "sqnr_min_db",
            "sqnr_mean_db", "first_call_s", "quantization", "error"]
    fused = ", q/k/v projections fused (fuse_qkv_projections)" if args.fuse_qkv else ""
    fused += f", config {' '.join(args.config)}" if args.config else ""
    md = (f"# bench_transformer {args.model} ({spec['shape']}{fused})\n\n`{env['command']}`\n\ncommit {env['commit']}, "
          f"{env.get('gpu')}, torch {env['torch']}, triton {env['triton']}, diffusers {env['diffusers']}, "
          f"torchao {env['torchao']}; median of {args.reps} forwards (CUDA events) after warm-up. "
          "SQNR: per-block output vs bf16 on identical block inputs (min / mean over "
          f"{', '.join(spec['sqnr_blocks'])}).\n\n" + md_table(rows, cols))
    for v, text in profiles.items():
        title = v if v.endswith("(compiled)") else f"{v} (eager)"
        md += f"\n## torch.profiler top CUDA kernels, {title}\n\n```\n{text}\n```\n"
    name = f"bench_transformer_{args.model}{('_' + args.tag) if args.tag else ''}"
    data = dict(env=env, spec=spec["shape"], config=args.config, fuse_qkv=args.fuse_qkv, rows=rows, profiles=profiles)
    path = write_results(name, data, md, args.out)
    if echo:
        print(md)
        print(f"wrote {path}")


_CATEGORIES = [  # (category, name fragments), first match wins; inductor's kernels are named triton_{red,per,poi}_*
    ("inductor reduction", ("triton_red", "triton_per")),
    ("inductor pointwise", ("triton_poi",)),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "w8a8", "matmul")),
    ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa")),
    ("quantize (ours)", ("_quant_rows", "_quant_long_rows", "_act_quant")),
    ("aten elementwise / norm / copy (eager)", ("at::native",)),
]


def kernel_categories(events) -> str:
    """Device time per kernel category (ms, share, calls): where a forward's time goes."""
    cats: dict[str, list[float]] = {}
    for e in events:
        t = getattr(e, "device_time_total", None)
        t = e.cuda_time_total if t is None else t
        if t <= 0 or e.key.startswith(("ProfilerStep", "aten::")):
            continue
        name = e.key.lower()
        cat = next((c for c, frags in _CATEGORIES if any(f in name for f in frags)), "other")
        acc = cats.setdefault(cat, [0.0, 0])
        acc[0] += t / 1e3
        acc[1] += e.count
    total = sum(v[0] for v in cats.values()) or 1.0
    lines = [f"{c:40s} {ms:9.2f} ms {100 * ms / total:5.1f}% {n:6d} calls"
             for c, (ms, n) in sorted(cats.items(), key=lambda kv: -kv[1][0])]
    return "kernel time by category (device)\n" + "\n".join(lines) + f"\n{'total':40s} {total:9.2f} ms"


def profile_variant(base, spec, variant, inputs, compiled: bool = False) -> str:
    """Top CUDA kernels of one forward (after a warm-up forward, which also compiles)."""
    _free_memory()
    opts = variant.split("+")[1:]
    if "qkv" in opts:
        raise ValueError(f"{variant}: +qkv is not profiled this way; use --profile-timed")
    model = base if variant.partition("+")[0] == "bf16" and "qknr" not in opts else copy.deepcopy(base)
    _quantize_variant(model, _knobs(variant), spec["keep"])
    if "qknr" in opts:
        fuse_qk_norm_rope(model)
    restore = _compile_for(model, spec, variant, compiled)
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        model(**inputs)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(**inputs)
            torch.cuda.synchronize()
    if restore is not None:
        restore()
    return _profile_text(prof)


def _profile_text(prof) -> str:
    text = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=160)
    return text + "\n" + kernel_categories(prof.key_averages())


def profile_forward(model, inputs) -> str:
    """Top CUDA kernels of one more forward of an already timed (compiled, warm) model: profiling a
    compiled variant this way costs no second compile (torchao's take minutes)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(**inputs)
        torch.cuda.synchronize()
    return _profile_text(prof)


if __name__ == "__main__":
    main()
