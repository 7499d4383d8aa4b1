"""Fused q/k RMSNorm + RoPE (quantization/qk_rope.py, kernels/triton_rope.py, spec numerics/rope.py).
On the CPU the op runs the spec, which is diffusers' own sequence of torch ops, so a fused FLUX
model must equal the plain one bit for bit; the Triton kernel is checked on the GPU against the spec
within a stated budget (its float32 sums and fma contraction differ from torch's)."""

from __future__ import annotations

import copy

import pytest
import torch

from diffquant.demo import flux_inputs, tiny_flux
from diffquant.quantization import quantize_
from diffquant.quantization.metrics import sqnr_db
from diffquant.quantization.numerics.rope import rms_norm_rope_ref
from diffquant.quantization.qk_rope import fuse_qk_norm_rope
from tests.conftest import require_cuda

ATTN = ["transformer_blocks.0.attn", "transformer_blocks.1.attn", "single_transformer_blocks.0.attn",
        "single_transformer_blocks.1.attn"]


def _pair(quantization=None, device="cpu"):
    model = tiny_flux(seed=int(torch.randint(0, 2**31 - 1, ()))).to(device)
    if quantization:
        quantize_(model, quantization)
    plain = copy.deepcopy(model)
    return model, plain, fuse_qk_norm_rope(model)


@pytest.mark.parametrize("quantization", [None, "fp8", "int8"])
def test_fused_flux_equals_diffusers_processor_cpu(quantization):
    fused, plain, reports = _pair(quantization)
    assert [(r.name, r.fused) for r in reports] == [(n, True) for n in ATTN]
    assert all("torch ops" in r.reason for r in reports)  # the implementation that runs is named
    assert type(fused.transformer_blocks[0].attn.processor).__name__ == "FusedQKNormRopeFluxProcessor"
    inputs = flux_inputs(fused, tokens=49, text=7)
    with torch.no_grad():
        torch.testing.assert_close(fused(**inputs)[0], plain(**inputs)[0], rtol=0, atol=0)


def test_fused_model_pickles():
    import io

    fused, plain, _ = _pair("fp8")
    buf = io.BytesIO()
    torch.save(fused, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded.single_transformer_blocks[0].attn.processor).__name__ == "FusedQKNormRopeFluxProcessor"
    inputs = flux_inputs(fused)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs)[0], plain(**inputs)[0], rtol=0, atol=0)


def test_unsupported_modules_are_reported_and_left_alone():
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    model = tiny_flux(seed=2)
    custom = type("MyProcessor", (FluxAttnProcessor,), {})
    model.transformer_blocks[0].attn.set_processor(custom())
    single = model.single_transformer_blocks[1].attn
    single.norm_k = torch.nn.LayerNorm(single.head_dim)
    reports = {r.name: r for r in fuse_qk_norm_rope(model)}
    assert reports["transformer_blocks.0.attn"].reason == "processor is MyProcessor, not FluxAttnProcessor"
    assert "norm_k is LayerNorm" in reports["single_transformer_blocks.1.attn"].reason
    assert not reports["single_transformer_blocks.1.attn"].fused
    assert reports["transformer_blocks.1.attn"].fused and reports["single_transformer_blocks.0.attn"].fused
    assert type(model.transformer_blocks[0].attn.processor) is custom


def test_fused_flux_compiles_fullgraph_cpu():
    fused, plain, _ = _pair("fp8")
    inputs = flux_inputs(fused)
    with torch.no_grad():
        ref = plain(**inputs)[0]
        torch._dynamo.reset()
        out = torch.compile(fused, fullgraph=True, backend="aot_eager")(**inputs)[0]
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def _case(b, ns, heads, d, dtype, device, rng):
    # each part a strided view: the middle third of a fused q/k/v projection output
    big = [(torch.randn(b, n, 3 * heads * d, generator=rng) * 3).to(dtype).to(device) for n in ns]
    parts = [t[..., heads * d: 2 * heads * d] for t in big]
    weights = [(torch.rand(d, generator=rng) + 0.5).to(dtype).to(device) for _ in ns]
    ang = torch.randn(sum(ns), d // 2, generator=rng) * 10
    cos, sin = (f(ang).repeat_interleave(2, -1).to(device) for f in (torch.cos, torch.sin))
    return parts, weights, cos, sin


def test_op_passes_opcheck(rng):
    parts, weights, cos, sin = _case(1, (5, 9), 2, 16, torch.bfloat16, "cpu", rng)
    torch.library.opcheck(torch.ops.diffquant.rms_norm_rope.default, (parts, weights, cos, sin, 1e-6, 16))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,ns,heads,d", [(1, (512, 4096), 24, 128), (2, (7, 33), 3, 64), (1, (4608,), 24, 128),
                                          (1, (1,), 5, 16)])
def test_kernel_within_budget_of_the_spec(b, ns, heads, d, dtype, rng):
    """Budget: every element within 2 ulp of the output dtype of the spec's value (+1e-3 near zero);
    at most 2% of the elements differ at all (rounding of nearly-tied values)."""
    require_cuda()
    from diffquant.quantization.kernels import triton_rope

    parts, weights, cos, sin = _case(b, ns, heads, d, dtype, "cuda", rng)
    ref = rms_norm_rope_ref(parts, weights, cos, sin, 1e-6, d).float()
    out = triton_rope.rms_norm_rope(parts, weights, cos, sin, 1e-6, d)
    assert out.shape == (b, sum(ns), heads, d) and out.dtype == dtype
    ulp = torch.finfo(dtype).eps
    diff = (out.float() - ref).abs()
    assert bool((diff <= 2 * ulp * ref.abs() + 1e-3).all()), diff.max().item()
    assert float((diff > 0).float().mean()) < 0.02


@pytest.mark.gpu
def test_fused_flux_on_gpu_matches_and_compiles():
    require_cuda((8, 9))
    fused, plain, reports = _pair({"method": "fp8", "backend": "triton"}, "cuda")
    assert all(r.fused and "Triton kernel" in r.reason for r in reports)
    inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in flux_inputs(fused, tokens=81).items()}
    with torch.no_grad():
        ref = plain(**inputs)[0].float()
        out = fused(**inputs)[0].float()
        torch._dynamo.reset()
        compiled = torch.compile(fused, fullgraph=True)(**inputs)[0].float()
    for got in (out, compiled):
        assert sqnr_db(ref, got) > 35, sqnr_db(ref, got)
