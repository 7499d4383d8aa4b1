"""CPU checks of bench_transformer's model specs at tiny sizes: every spec builds its diffusers
transformer, its inputs run a forward, the block names it measures exist, quantization through
the same helper the benchmark uses keeps the per-block output close, and the regional-compile
wrapper (with the eager backend) gives the uncompiled output. GPU runs of these specs cost device
time; a spec that breaks should break here first."""

from __future__ import annotations

import copy

import pytest
import torch

from benchmarks import bench_transformer as bench

TINY = {
    "flux1-dev": dict(height=64, width=48, text_tokens=7, num_layers=2, num_single_layers=2, attention_head_dim=16,
                      num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24,
                      axes_dims_rope=(4, 6, 6)),
    "flux2-klein": dict(height=64, width=48, text_tokens=7, num_layers=2, num_single_layers=2, attention_head_dim=16,
                        num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=32, in_channels=16,
                        axes_dims_rope=(4, 4, 4, 4)),
    "qwen-image": dict(height=64, width=48, text_tokens=7, num_layers=2, attention_head_dim=16,
                       num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6)),
    "wan2.2-a14b": dict(frames=5, height=32, width=48, text_tokens=7, num_layers=2, num_attention_heads=2,
                        attention_head_dim=16, ffn_dim=64, text_dim=32, freq_dim=32),
    "z-image": dict(height=64, width=48, text_tokens=7, dim=64, n_layers=2, n_refiner_layers=1, n_heads=2,
                    n_kv_heads=2, cap_feat_dim=32, axes_dims=[8, 12, 12], axes_lens=[64, 32, 32]),
}


def _flat(out):
    return bench._flat(out).float()


@pytest.mark.parametrize("name", sorted(TINY))
def test_spec_builds_runs_and_quantizes(name):
    torch.manual_seed(0)
    spec = bench.SPECS[name](**TINY[name])
    base = spec["build"]().to(torch.bfloat16).eval().requires_grad_(False)
    inputs = spec["inputs"]("cpu")
    for block in spec["sqnr_blocks"]:
        base.get_submodule(block)  # raises if the spec names a block the model does not have
    captured = bench._capture_blocks(base, spec["sqnr_blocks"], inputs)
    assert set(captured) == set(spec["sqnr_blocks"])
    with torch.no_grad():
        ref = _flat(base(**inputs))
    assert torch.isfinite(ref).all()
    model = copy.deepcopy(base)
    desc = bench._quantize_variant(model, bench._knobs("fp8"), spec["keep"])
    assert "diffquant fp8" in desc and " 0 layers" not in desc, desc
    sq = bench.block_sqnr(model, captured)
    assert min(sq.values()) > 35, sq  # measured 40-53 dB at these sizes (FLUX.1-dev full size: 52.6)


@pytest.mark.parametrize("name", sorted(TINY))
def test_regional_compile_wrapper_matches_uncompiled(name):
    """One shared graph per block type with each block's weights as inputs: the eager backend must
    reproduce the model exactly, and restore() must put the original blocks back."""
    torch.manual_seed(0)
    spec = bench.SPECS[name](**TINY[name])
    model = spec["build"]().to(torch.bfloat16).eval().requires_grad_(False)
    inputs = spec["inputs"]("cpu")
    originals = {attr: list(getattr(model, attr)) for attr in spec["blocks"]}
    with torch.no_grad():
        ref = _flat(model(**inputs))
        torch._dynamo.reset()
        restore = bench.regional_compile(model, spec["blocks"], backend="eager")
        out = _flat(model(**inputs))
        captured = bench._capture_blocks(model, spec["sqnr_blocks"], inputs)  # reaches the wrapped blocks
        assert min(bench.block_sqnr(model, captured).values()) == float("inf")  # the block SQNR of compiled rows
    restore()
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for attr, blocks in originals.items():
        assert all(a is b for a, b in zip(getattr(model, attr), blocks, strict=True))


def test_unknown_variant_option_is_an_error():
    with pytest.raises(ValueError, match=r"\+fa, \+nofa, \+wide, \+cdt"):
        bench._knobs("fp8+fast")


# GELUs the fusion pass moves into the next linear's quantization, per tiny spec: FLUX 2 double
# blocks x (ff, ff_context) + 2 single blocks; Qwen-Image 2 blocks x (img_mlp, txt_mlp); Wan2.2
# 2 blocks x ffn; Z-Image's SwiGLU feed-forward has no GELU.
FUSIONS = {"flux1-dev": 6, "flux2-klein": 0, "qwen-image": 4, "wan2.2-a14b": 2, "z-image": 0}  # GELUs (FLUX.2: SwiGLU)


@pytest.mark.parametrize("name", sorted(TINY))
def test_fused_model_equals_unfused(name):
    """quantize_ with and without fuse_activations: same output bit for bit (CPU reference path)."""
    from diffquant.quantization import quantize_

    torch.manual_seed(0)
    spec = bench.SPECS[name](**TINY[name])
    fused = spec["build"]().to(torch.bfloat16).eval().requires_grad_(False)
    plain = copy.deepcopy(fused)
    report = quantize_(fused, "fp8", keep_high_precision=spec["keep"])
    quantize_(plain, {"method": "fp8", "fuse_activations": False}, keep_high_precision=spec["keep"])
    assert sum(f.fused for f in report.fusions) == FUSIONS[name], report.table()
    inputs = spec["inputs"]("cpu")
    with torch.no_grad():
        torch.testing.assert_close(_flat(fused(**inputs)), _flat(plain(**inputs)), rtol=0, atol=0)


def test_variant_options_parse():
    """Variant names carry knobs after "+": each sets its library knob; unknown ones are an error."""
    assert bench._knobs("fp8+nofuse+graph") == "fp8" and bench._QUANT_EXTRA["fuse_activations"] is False
    assert bench._knobs("fp8+noqkv+nodl") == "fp8" and bench._QUANT_EXTRA["fuse_qkv"] is False
    assert bench.triton_launch.ENABLED is False
    assert bench._knobs("int8+classic") == "int8" and bench.triton_ops.COMPILED_INT8_KERNEL == "classic"
    assert bench._knobs("int8") == "int8" and bench._QUANT_EXTRA == {"fuse_activations": True, "fuse_qkv": None,
                                                                     "fuse_qk_norm_rope": None}
    assert bench._knobs("fp8+noqknr") == "fp8" and bench._QUANT_EXTRA["fuse_qk_norm_rope"] is False
    assert bench.triton_launch.ENABLED is True  # the library's default
    assert bench.triton_ops.COMPILED_INT8_KERNEL == "capture"  # the library's default
    assert bench._knobs("int8+tmaauto") == "int8" and bench.triton_ops.COMPILED_INT8_KERNEL == "auto"
    assert bench._mode("bf16+graph", True) == "compiled (regional) + CUDA graph"
    assert bench._mode("fp8", False) == "eager"
    assert bench._mode("fp8+whole", True) == "compiled (whole model)"
    assert bench._mode("bf16+ro", True) == "compiled (whole model, reduce-overhead)"
    assert bench._knobs("fp8+ro") == "fp8" and bench._knobs("fp8+fa8+graph") == "fp8"
    assert bench._knobs("bf16+qknr+graph") == "bf16" and bench._knobs("ao-fp8+qknr") == "ao-fp8"
    with pytest.raises(ValueError, match="fuses q/k RMSNorm"):
        bench._knobs("fp8+qknr+graph")
    with pytest.raises(ValueError, match=r"variant options \['grpah'\] unknown"):
        bench._knobs("fp8+grpah")
    with pytest.raises(ValueError, match=r"fp8\+ro\+graph: \+ro is whole-model compile"):
        bench._knobs("fp8+ro+graph")


def test_whole_model_compile_variants_wrap_and_restore():
    """"+whole" / "+ro" compile the whole model (as the Engine does) and the undo removes it."""
    spec = bench.SPECS["flux1-dev"](**TINY["flux1-dev"])
    model = spec["build"]()
    for variant in ("fp8+whole", "fp8+ro"):
        restore = bench._compile_for(model, spec, variant, compiled=True)
        assert model._compiled_call_impl is not None
        restore()
        assert model._compiled_call_impl is None
    assert bench._compile_for(model, spec, "fp8+whole", compiled=False) is None


def test_fa8_variant_patches_attention_while_it_runs():
    spec = bench.SPECS["flux1-dev"](**TINY["flux1-dev"])
    model = spec["build"]()

    def processors():
        return {type(m.processor).__name__ for m in model.modules() if hasattr(m, "processor")}

    original = processors()
    with bench._attention_for(model, "fp8+fa8") as patch:
        assert patch is not None and processors() == {"FP8" + name for name in original}
    assert processors() == original
    with bench._attention_for(model, "fp8") as patch:
        assert patch is None
