"""Q/K/V fusion (quantization/qkv.py): the quantized q/k/v projections of supported attention
modules become one layer whose output equals the three, the parts are dropped (memory does not
grow), and every module that is not fused says why."""

from __future__ import annotations

import copy

import diffusers
import pytest
import torch

from diffquant.demo import flux_inputs, tiny_flux
from diffquant.quantization import QuantLinear, quantize_
from diffquant.quantization.config import build_quant_config
from diffquant.quantization.metrics import sqnr_db
from tests.conftest import require_cuda
from tests.engine.test_models import TINY


def _buffer_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.buffers(), *model.parameters()])


def _pair(model: torch.nn.Module, method: str, **extra):
    plain = copy.deepcopy(model)
    report = quantize_(model, {"method": method, **extra})
    plain_report = quantize_(plain, {"method": method, "fuse_qkv": False, **extra})
    return model, plain, report, plain_report


@pytest.mark.parametrize("method", ["fp8", "int8"])
def test_flux_fused_projections_compute_the_parts(method):
    fused, plain, report, plain_report = _pair(tiny_flux(seed=int(torch.randint(0, 2**31 - 1, ()))), method)
    assert plain_report.projections == []
    names = ["transformer_blocks.0.attn", "transformer_blocks.1.attn",
             "single_transformer_blocks.0.attn", "single_transformer_blocks.1.attn"]
    assert [(r.name, r.fused) for r in report.projections] == [(n, True) for n in names], report.table()
    assert "q/k/v fused in 4 of 4 attention modules" in report.summary()
    double, single = fused.transformer_blocks[0].attn, fused.single_transformer_blocks[0].attn
    inner = double.inner_dim
    for attn, groups in ((double, ("to_qkv", "to_added_qkv")), (single, ("to_qkv",))):
        assert attn.fused_projections
        for g in groups:
            layer = getattr(attn, g)
            assert isinstance(layer, QuantLinear) and layer.out_features == 3 * inner
            assert layer.weight_scale.shape == (3 * inner, 1)
        for part in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
            assert not hasattr(attn, part), part
    # the fused weights are the parts' codes and scales, in order
    p = plain.transformer_blocks[0].attn
    assert torch.equal(double.to_qkv.qweight.view(torch.uint8),
                       torch.cat([p.to_q.qweight, p.to_k.qweight, p.to_v.qweight]).view(torch.uint8))
    assert torch.equal(double.to_added_qkv.weight_scale,
                       torch.cat([p.add_q_proj.weight_scale, p.add_k_proj.weight_scale, p.add_v_proj.weight_scale]))
    assert _buffer_bytes(fused) == _buffer_bytes(plain)  # the parts are gone, not kept beside
    inputs = flux_inputs(fused, tokens=49, text=7)
    with torch.no_grad():
        out, ref = fused(**inputs)[0], plain(**inputs)[0]
    assert sqnr_db(ref, out) > 60, sqnr_db(ref, out)  # the same products; only summation order may differ


def _tiny_wan(**overrides):
    cfg = dict(TINY["wan2.2-a14b"][1], **overrides)
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    return torch.nn.Module.to(diffusers.WanTransformer3DModel(**cfg), torch.bfloat16).eval()


def _wan_inputs(model, text: int = 5) -> dict:
    cfg = model.config
    return dict(hidden_states=torch.randn(1, cfg.in_channels, 3, 6, 10, dtype=torch.bfloat16),
                timestep=torch.tensor([500]),
                encoder_hidden_states=torch.randn(1, text, cfg.text_dim, dtype=torch.bfloat16), return_dict=False)


def test_wan_self_and_cross_attention():
    fused, plain, report, _ = _pair(_tiny_wan(added_kv_proj_dim=None, image_dim=None), "fp8")
    assert [(r.name, r.fused) for r in report.projections] == [("blocks.0.attn1", True), ("blocks.0.attn2", True)]
    attn1, attn2 = fused.blocks[0].attn1, fused.blocks[0].attn2
    assert isinstance(attn1.to_qkv, QuantLinear) and not hasattr(attn1, "to_q")
    assert isinstance(attn2.to_kv, QuantLinear) and isinstance(attn2.to_q, QuantLinear)  # cross: q stays apart
    assert not hasattr(attn2, "to_k") and not hasattr(attn2, "to_v")
    inputs = _wan_inputs(fused)
    with torch.no_grad():
        out, ref = fused(**inputs)[0], plain(**inputs)[0]
    assert sqnr_db(ref, out) > 60


def test_wan_image_conditioning_attention_stays_unfused_and_says_why():
    fused, plain, report, _ = _pair(_tiny_wan(), "fp8")  # TINY's Wan has image conditioning (add_k_proj)
    by_name = {r.name: r for r in report.projections}
    assert by_name["blocks.0.attn1"].fused
    assert not by_name["blocks.0.attn2"].fused and "add_k_proj" in by_name["blocks.0.attn2"].reason
    assert isinstance(fused.blocks[0].attn2.to_k, QuantLinear) and not fused.blocks[0].attn2.fused_projections
    inputs = _wan_inputs(fused, text=512 + 3)  # the processor takes all but the last 512 tokens as image tokens
    with torch.no_grad():
        assert sqnr_db(plain(**inputs)[0], fused(**inputs)[0]) > 60


def test_a_kept_part_leaves_its_module_unfused():
    model = tiny_flux(seed=3)
    plain = copy.deepcopy(model)
    report = quantize_(model, {"method": "fp8", "ignored_layers": ["transformer_blocks.0.attn.add_k_proj"]})
    quantize_(plain, {"method": "fp8", "ignored_layers": ["transformer_blocks.0.attn.add_k_proj"], "fuse_qkv": False})
    by_name = {r.name: r for r in report.projections}
    r = by_name["transformer_blocks.0.attn"]
    assert not r.fused and "add_k_proj is Linear, not a quantized linear" in r.reason
    attn = model.transformer_blocks[0].attn
    assert not attn.fused_projections and not hasattr(attn, "to_qkv")  # all groups or none
    assert isinstance(attn.to_q, QuantLinear)
    assert all(by_name[n].fused for n in by_name if n != "transformer_blocks.0.attn")
    inputs = flux_inputs(model)
    with torch.no_grad():
        assert sqnr_db(plain(**inputs)[0], model(**inputs)[0]) > 60


def test_unsupported_attention_is_reported_and_required_fusion_raises():
    cls_name, config, _, _ = TINY["qwen-image"]
    model = torch.nn.Module.to(getattr(diffusers, cls_name)(**config), torch.bfloat16)
    report = quantize_(copy.deepcopy(model), "fp8")
    assert report.projections and not any(r.fused for r in report.projections)
    assert "does not read fused projections" in report.projections[0].reason
    with pytest.raises(ValueError, match="fuse_qkv=True: no q/k/v projections .* could be fused.*supported: "
                                         "FluxAttention"):
        quantize_(model, {"method": "fp8", "fuse_qkv": True})


def test_required_fusion_of_a_model_without_attention_raises():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8)).to(torch.bfloat16)
    with pytest.raises(ValueError, match="has no diffusers attention module"):
        quantize_(model, {"method": "int8", "fuse_qkv": True})
    assert quantize_(torch.nn.Sequential(torch.nn.Linear(8, 8)), "int8").projections == []


def test_model_fused_by_diffusers_first_is_reported():
    model = tiny_flux(seed=7)
    model.fuse_qkv_projections()  # diffusers' own: to_qkv next to to_q / to_k / to_v
    report = quantize_(model, "fp8")
    assert report.projections and not any(r.fused for r in report.projections)
    assert all("already fused before quantization" in r.reason for r in report.projections)
    assert isinstance(model.transformer_blocks[0].attn.to_qkv, QuantLinear)
    with torch.no_grad():
        assert torch.isfinite(model(**flux_inputs(model))[0]).all()


def test_replaced_parts_are_freed_module_by_module(monkeypatch):
    """Peak memory: each module's q/k/v parts must be garbage once its fused layer exists, not only
    after the whole model is done (run 9d: FLUX.1-dev peaked 2.15 GB above its final footprint)."""
    import weakref

    from diffquant.quantization import qkv

    model = tiny_flux(seed=11)
    quantize_(model, {"method": "fp8", "fuse_qkv": False})
    seen, alive = [], []
    real = qkv._concatenated

    def spy(parts, name):
        alive.append(sum(r() is not None for r in seen))  # parts of earlier modules still referenced
        seen.extend(weakref.ref(p) for p in parts)
        return real(parts, name)

    monkeypatch.setattr(qkv, "_concatenated", spy)
    reports = qkv.fuse_qkv_projections(model)
    assert sum(r.fused for r in reports) == 4 and len(alive) == 6  # 2 double blocks x 2 groups + 2 single
    assert alive == [0] * 6, alive


def test_fuse_qkv_config_values():
    assert build_quant_config("fp8").fuse_qkv is None
    assert build_quant_config({"method": "int8", "fuse_qkv": False}).fuse_qkv is False
    with pytest.raises(ValueError, match="fuse_qkv='yes' is not valid; valid values: None, True, False"):
        build_quant_config({"method": "fp8", "fuse_qkv": "yes"})


def test_fused_flux_compiles_fullgraph_cpu():
    model = tiny_flux(seed=5)
    quantize_(model, "fp8")
    inputs = flux_inputs(model)
    with torch.no_grad():
        ref = model(**inputs)[0]
        torch._dynamo.reset()
        out = torch.compile(model, fullgraph=True, backend="aot_eager")(**inputs)[0]
    assert sqnr_db(ref, out) > 60


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["fp8", "int8"])
def test_fused_projections_on_gpu_match_the_parts(method):
    """The triton backend on CUDA: the fused q/k/v GEMM (one cuBLASLt / Triton call of thrice the
    width) gives the three parts' outputs, eager and compiled (fullgraph, CUDA graphs)."""
    require_cuda((8, 9) if method == "fp8" else (8, 0))
    base = tiny_flux(seed=int(torch.randint(0, 2**31 - 1, ()))).cuda()
    fused, plain, report, _ = _pair(base, method, backend="triton")
    assert all(r.fused for r in report.projections) and report.merged == 2 * 4 + 2 * 2
    inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in flux_inputs(fused, tokens=81).items()}
    with torch.no_grad():
        out, ref = fused(**inputs)[0], plain(**inputs)[0]
        assert sqnr_db(ref, out) > 40, sqnr_db(ref, out)
        torch._dynamo.reset()
        compiled = torch.compile(fused, fullgraph=True, mode="reduce-overhead")
        for _ in range(3):  # record, then replay
            torch.compiler.cudagraph_mark_step_begin()
            got = compiled(**inputs)[0].clone()
    assert sqnr_db(ref, got) > 30, sqnr_db(ref, got)


def test_cli_summary_counts_fused_projections():
    from diffquant.engine.output import quantization_summary

    report = quantize_(tiny_flux(seed=13), "fp8")
    line = quantization_summary({"transformer": report})
    assert "(6 GELUs fused, q/k/v fused in 4 attention modules, q/k norm + RoPE fused in 4)" in line, line
    plain = quantize_(tiny_flux(seed=13), {"method": "fp8", "fuse_qkv": False, "fuse_activations": False,
                                           "fuse_qk_norm_rope": False})
    assert "fused" not in quantization_summary({"transformer": plain})
