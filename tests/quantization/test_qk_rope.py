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


ATTN2 = ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn", "single_transformer_blocks.1.attn"]
FUSED2 = ["FusedQKNormRopeFlux2Processor", "FusedQKNormRopeFlux2ParallelProcessor",
          "FusedQKNormRopeFlux2ParallelProcessor"]


def tiny_flux2(seed: int = 0, dtype: torch.dtype = torch.bfloat16):
    """A FLUX.2 transformer (one double-stream, two single-stream blocks) with random weights."""
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    model = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=32, num_attention_heads=2,
        joint_attention_dim=48, timestep_guidance_channels=32, axes_dims_rope=(8, 8, 8, 8), guidance_embeds=False)
    return torch.nn.Module.to(model, dtype).eval()


def flux2_inputs(model, tokens: int = 36, text: int = 7, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    dt = next(model.parameters()).dtype
    side, pos = int(tokens**0.5), torch.arange(tokens)
    img_ids = torch.stack([torch.zeros(tokens), (pos // side).float(), (pos % side).float(), torch.zeros(tokens)], -1)
    txt_ids = torch.stack([torch.zeros(text)] * 3 + [torch.arange(text).float()], -1)
    return dict(hidden_states=torch.randn(1, tokens, model.config.in_channels, generator=g).to(dt),
                encoder_hidden_states=torch.randn(1, text, model.config.joint_attention_dim, generator=g).to(dt),
                timestep=torch.tensor([0.5]).to(dt), img_ids=img_ids, txt_ids=txt_ids, return_dict=False)


MODELS = {"flux1": (tiny_flux, flux_inputs), "flux2": (tiny_flux2, flux2_inputs)}


def _pair(quantization=None, device="cpu", seed=None, kind="flux1"):
    """(fused model, plain model, reports): the same random weights; quantized models fused by quantize_'s
    default (fuse_qk_norm_rope=None), the plain one quantized with fuse_qk_norm_rope=False."""
    model = MODELS[kind][0](seed=int(torch.randint(0, 2**31 - 1, ())) if seed is None else seed).to(device)
    plain = copy.deepcopy(model)
    if not quantization:
        return model, plain, fuse_qk_norm_rope(model)
    cfg = {"method": quantization} if isinstance(quantization, str) else dict(quantization)
    quantize_(plain, {**cfg, "fuse_qk_norm_rope": False})
    return model, plain, quantize_(model, cfg).attention


@pytest.mark.parametrize("quantization", [None, "fp8", "int8"])
def test_fused_flux_equals_diffusers_processor_cpu(quantization, monkeypatch):
    fused, plain, reports = _pair(quantization)
    assert [(r.name, r.fused) for r in reports] == [(n, True) for n in ATTN]
    assert all("torch ops" in r.reason for r in reports)  # the implementation that runs is named
    assert type(fused.transformer_blocks[0].attn.processor).__name__ == "FusedQKNormRopeFluxProcessor"
    inputs = flux_inputs(fused, tokens=49, text=7)
    calls = _count_op_calls(monkeypatch)
    with torch.no_grad():
        torch.testing.assert_close(fused(**inputs)[0], plain(**inputs)[0], rtol=0, atol=0)
    assert calls == [2 * len(ATTN)]  # q and k of every module went through the op


@pytest.mark.parametrize("quantization", [None, "fp8", "int8"])
def test_fused_flux2_equals_diffusers_processors_cpu(quantization, monkeypatch):
    """FLUX.2: double-stream blocks (Flux2AttnProcessor) and single-stream blocks (Flux2ParallelSelfAttnProcessor,
    q/k/v strided parts of the fused qkv + MLP projection) through the same op."""
    fused, plain, reports = _pair(quantization, kind="flux2")
    assert [(r.name, r.fused) for r in reports] == [(n, True) for n in ATTN2]
    assert [type(fused.get_submodule(n).processor).__name__ for n in ATTN2] == FUSED2
    inputs = flux2_inputs(fused)
    calls = _count_op_calls(monkeypatch)
    with torch.no_grad():
        torch.testing.assert_close(fused(**inputs)[0], plain(**inputs)[0], rtol=0, atol=0)
    assert calls == [2 * len(ATTN2)]


def _count_op_calls(monkeypatch) -> list[int]:
    """A one-element list counting the op's CPU (spec) calls from now on."""
    from diffquant.quantization import qk_rope

    calls, spec = [0], qk_rope.rms_norm_rope_ref

    def counted(*args):
        calls[0] += 1
        return spec(*args)

    monkeypatch.setattr(qk_rope, "rms_norm_rope_ref", counted)
    return calls


@pytest.mark.parametrize("kind", ["flux1", "flux2"])
def test_fused_model_pickles(kind):
    import io

    fused, plain, reports = _pair("fp8", kind=kind)
    buf = io.BytesIO()
    torch.save(fused, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    names = [r.name for r in reports]
    assert [type(loaded.get_submodule(n).processor) for n in names] == [type(fused.get_submodule(n).processor)
                                                                         for n in names]
    inputs = MODELS[kind][1](fused)
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


def _rotation_magnitude(parts, weights, cos, sin, d) -> torch.Tensor:
    """|y_even * cos| + |y_odd * sin| per output element, y the spec's normalized (rounded) input:
    what one ulp of difference in y can move an output by."""
    y = torch.cat([torch.nn.functional.rms_norm(p.unflatten(-1, (-1, d)), (d,), w, 1e-6)
                   for p, w in zip(parts, weights, strict=True)], dim=1).float()
    y_rot = torch.stack([-y[..., 1::2], y[..., 0::2]], dim=-1).flatten(3)
    return (y * cos[None, :, None]).abs() + (y_rot * sin[None, :, None]).abs()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,ns,heads,d", [(1, (512, 4096), 24, 128), (2, (7, 33), 3, 64), (1, (4608,), 24, 128),
                                          (1, (1,), 5, 16)])
def test_kernel_within_budget_of_the_spec(b, ns, heads, d, dtype, rng):
    """Budget per element: 2 eps x (|ref| + the rotation's input magnitude). The kernel's float32 sum of
    squares and rsqrt may round the normalized value y one ulp away from torch's (first run 10a: 0.0156
    = one bf16 ulp of a y in [2, 4) where the rotated output was < 1), and the output's own rounding
    adds one ulp of |ref|. At most 2% of the elements differ at all."""
    require_cuda()
    from diffquant.quantization.kernels import triton_rope

    parts, weights, cos, sin = _case(b, ns, heads, d, dtype, "cuda", rng)
    ref = rms_norm_rope_ref(parts, weights, cos, sin, 1e-6, d).float()
    out = triton_rope.rms_norm_rope(parts, weights, cos, sin, 1e-6, d)
    assert out.shape == (b, sum(ns), heads, d) and out.dtype == dtype
    eps = torch.finfo(dtype).eps
    budget = 2 * eps * (ref.abs() + _rotation_magnitude(parts, weights, cos, sin, d)) + 1e-6
    diff = (out.float() - ref).abs()
    assert bool((diff <= budget).all()), (diff - budget).max().item()
    assert float((diff > 0).float().mean()) < 0.02


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["flux1", "flux2"])
@pytest.mark.parametrize("quantization", [None, {"method": "fp8", "backend": "triton"}])
def test_fused_flux_on_gpu_as_close_to_float32_as_plain(quantization, kind):
    """Against the same (bf16-valued) weights and inputs in float32 without quantization, the fused model
    (eager and compiled) must be as close as the one with diffusers' processor: SQNR within 1 dB of the
    plain model's. (Fused vs plain directly is no fair floor: with fp8, a one-ulp change in q or k
    moves later activations across fp8 rounding steps; run 10a measured 32.4 dB between the two.)"""
    require_cuda((8, 9))
    seed = int(torch.randint(0, 2**31 - 1, ()))
    fused, plain, reports = _pair(quantization, "cuda", seed=seed, kind=kind)
    build, make_inputs = MODELS[kind]
    assert [r.fused for r in reports] == [True] * len(ATTN if kind == "flux1" else ATTN2)
    assert all("Triton kernel" in r.reason for r in reports)
    reference = torch.nn.Module.float(build(seed=seed)).cuda()
    inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in make_inputs(fused, tokens=81).items()}
    inputs32 = {k: v.float() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    with torch.no_grad():
        ref = reference(**inputs32)[0]
        floor = sqnr_db(ref, plain(**inputs)[0].float()) - 1.0
        out = fused(**inputs)[0].float()
        torch._dynamo.reset()
        compiled = torch.compile(fused, fullgraph=True)(**inputs)[0].float()
    for got in (out, compiled):
        assert sqnr_db(ref, got) > floor, (sqnr_db(ref, got), floor + 1.0)


@pytest.mark.parametrize("kind", ["flux1", "flux2"])
def test_fp8_attention_routes_the_fused_processor_cpu(kind):
    """FP8 attention rebinds `dispatch_attention_fn` in the processors' globals: the fused processor must
    expose it the same way, or its attention calls would silently stay in bf16."""
    from diffquant.quantization.attention import use_fp8_attention

    fused, _, reports = _pair("fp8", kind=kind)
    assert reports and all(r.fused for r in reports)
    patch = use_fp8_attention(fused)
    assert len(patch.processors) == len(reports)
    with torch.no_grad():
        fused(**MODELS[kind][1](fused, tokens=16, text=4))
    assert (patch.fp8_calls, patch.kept_calls) == (len(reports), 0)


def test_required_fusion_without_flux_attention_is_an_error():
    """fuse_qk_norm_rope: None (default) on a model without FLUX.1 attention reports nothing and goes on;
    True raises, naming the reason; False leaves the FLUX.1 processors alone."""
    from diffquant.testing import build_z_image

    zimage = build_z_image()["transformer"]
    assert quantize_(copy.deepcopy(zimage), "fp8").attention == []
    with pytest.raises(ValueError, match="fuse_qk_norm_rope=True: no attention module of ZImageTransformer2DModel "
                                         ".*it has no FLUX attention module"):
        quantize_(zimage, {"method": "fp8", "fuse_qk_norm_rope": True})
    flux = tiny_flux(seed=3)
    report = quantize_(flux, {"method": "int8", "fuse_qk_norm_rope": False})
    assert report.attention == [] and "RoPE" not in report.summary()
    assert type(flux.transformer_blocks[0].attn.processor).__name__ == "FluxAttnProcessor"
    assert "q/k RMSNorm + RoPE fused in 4 of 4" in quantize_(tiny_flux(seed=3), "int8").summary()


def test_report_names_the_implementation_of_the_target_device(monkeypatch):
    """The Engine quantizes layer by layer onto the device (quantize_(..., device=...)) while the norms
    still sit on the CPU: the report names what runs on the target device, not where the norms are now."""
    from diffquant.quantization.kernels import triton_ops

    monkeypatch.setattr(triton_ops, "_TRITON", True)  # as on a CUDA machine with triton installed
    cpu = quantize_(tiny_flux(seed=4), "fp8").attention
    assert all("torch ops" in r.reason for r in cpu)
    planned = fuse_qk_norm_rope(tiny_flux(seed=4), device="cuda")
    assert ["Triton kernel" in r.reason for r in planned] == [True] * len(ATTN)
