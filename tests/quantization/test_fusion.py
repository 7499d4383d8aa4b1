"""The fusion pass (quantization/fusion.py): GELUs that feed a quantized linear move into its
activation quantization. On the CPU the fused layers compute torch's activation and the reference
quantization, so a fused model must equal the unfused one bit for bit; the Triton kernel is
checked on the GPU (test_triton_kernels.py)."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

from diffquant.demo import flux_inputs, tiny_flux
from diffquant.engine.models import keep_patterns
from diffquant.quantization import QuantLinear, quantize_
from diffquant.quantization import numerics as nx
from diffquant.quantization.fusion import DeferredActivation
from diffquant.quantization.kernels import triton_ops
from tests.conftest import require_cuda
from tests.quantization.test_triton_kernels import _check_bit_exact, _rows

REF = {"fp8": nx.fp8_quantize_per_row, "int8": nx.int8_quantize_per_row}


def _flux_pair(method: str, device: str = "cpu", **extra):
    """(fused, unfused) copies of the tiny FLUX transformer, quantized with FLUX's keep list."""
    base = tiny_flux(seed=int(torch.randint(0, 2**31 - 1, ()))).to(device)
    fused, plain = base, copy.deepcopy(base)
    keep = keep_patterns("flux1-dev")
    r_fused = quantize_(fused, {"method": method, **extra}, keep_high_precision=keep)
    r_plain = quantize_(plain, {"method": method, "fuse_activations": False, **extra}, keep_high_precision=keep)
    return fused, plain, r_fused, r_plain


@pytest.mark.parametrize("method", ["fp8", "int8"])
def test_fused_flux_equals_unfused(method):
    fused, plain, report, plain_report = _flux_pair(method)
    # 2 double blocks x (ff, ff_context) + 2 single blocks
    assert [f.fused for f in report.fusions] == [True] * 6, report.table()
    assert plain_report.fusions == []
    assert "6 of 6 activations fused" in report.summary()
    consumers = {f.consumer for f in report.fusions}
    assert consumers == {"transformer_blocks.0.ff.net.2", "transformer_blocks.0.ff_context.net.2",
                         "transformer_blocks.1.ff.net.2", "transformer_blocks.1.ff_context.net.2",
                         "single_transformer_blocks.0.proj_out", "single_transformer_blocks.1.proj_out"}
    for name in consumers:
        assert fused.get_submodule(name).input_act == "gelu_tanh"
    assert isinstance(fused.get_submodule("transformer_blocks.0.ff.net.0"), DeferredActivation)
    assert list(fused.state_dict()) == list(plain.state_dict())  # names and keys unchanged
    inputs = flux_inputs(fused)
    with torch.no_grad():
        out, ref = fused(**inputs)[0], plain(**inputs)[0]
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_fused_model_pickles(tmp_path):
    """torch.save of the whole module (pickle) and torch.load in a fresh process give the same output."""
    fused, _, _, _ = _flux_pair("fp8")
    inputs = flux_inputs(fused)
    torch.save({"model": fused, "inputs": inputs}, tmp_path / "m.pt")
    code = ("import sys, torch; d = torch.load(sys.argv[1], weights_only=False); "
            "torch.save(d['model'](**d['inputs'])[0], sys.argv[2])")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.pt"), str(tmp_path / "out.pt")], check=True)
    with torch.no_grad():
        ref = fused(**inputs)[0]
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), ref, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["fp8", "int8"])
def test_fused_flux_compiles_whole_model_cpu(method):
    """The fused blocks (class-swapped single blocks, deferred GELUs, the fused custom op) trace
    with fullgraph=True and give the eager output (aot_eager: the same ops)."""
    fused, _, _, _ = _flux_pair(method)
    inputs = flux_inputs(fused)
    torch._dynamo.reset()
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(**inputs)[0], fused(**inputs)[0], rtol=0, atol=0)


def test_fusion_skips_a_kept_consumer_and_says_why():
    _, _, report, _ = _flux_pair("fp8", ignored_layers=["single_transformer_blocks.0.proj_out"])
    skipped = [f for f in report.fusions if not f.fused]
    assert [f.name for f in skipped] == ["single_transformer_blocks.0"]
    assert "not a quantized linear" in skipped[0].reason
    assert "5 of 6 activations fused" in report.summary()
    assert "not fused" in report.table()


def test_fusion_needs_dynamic_per_token_activations():
    _, _, report, _ = _flux_pair("fp8", activation_granularity="per_tensor")
    assert report.fusions and not any(f.fused for f in report.fusions)
    assert all("per_tensor" in f.reason for f in report.fusions)


@pytest.mark.parametrize("activation_fn,fused", [("gelu-approximate", True), ("gelu", False)])
def test_feedforward_fusion_by_gelu_form(activation_fn, fused, rng):
    """A diffusers FeedForward alone: the tanh GELU fuses (same output), the exact GELU is reported
    as not fused (no bit-exact kernel for it) and left as it was."""
    from diffusers.models.attention import FeedForward

    ff = FeedForward(64, activation_fn=activation_fn).to(torch.bfloat16)
    plain = copy.deepcopy(ff)
    report = quantize_(ff, "fp8")
    quantize_(plain, {"method": "fp8", "fuse_activations": False})
    [f] = report.fusions
    assert f.fused is fused, f
    if not fused:
        assert "no fused kernel" in f.reason and f.act == "gelu(none)"
    x = torch.randn(3, 5, 64, generator=rng).to(torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(ff(x), plain(x), rtol=0, atol=0)


def test_non_diffusers_module_has_no_fusion_candidates():
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(approximate="tanh"), torch.nn.Linear(64, 32))
    assert quantize_(model, "fp8").fusions == []


def _fused_layer(method: str, k: int, n: int, act: str) -> QuantLinear:
    lin = torch.nn.Linear(k, n).to(torch.bfloat16)
    layer = QuantLinear.from_linear(lin, _scheme(method, k, n))
    layer.input_act = act
    return layer


def _scheme(method, k, n):
    from diffquant.quantization.kernels import LinearScheme

    return LinearScheme(method, "per_channel", "per_token", k, n, name="fused")


@pytest.mark.parametrize("method", ["fp8", "int8"])
def test_fused_op_path_is_the_reference_and_traces(method, rng):
    """triton_act_linear (the custom op on CPU = reference numerics) equals linear(cat(p, act(x)))
    with the reference quantization, and traces with fullgraph=True."""
    kp, kx, n, act = 48, 80, 32, "gelu_tanh"
    layer = _fused_layer(method, kp + kx, n, act)
    x = (torch.randn(13, kx, generator=rng) * 3).to(torch.bfloat16)
    p = (torch.randn(13, kp, generator=rng) * 5).to(torch.bfloat16)
    out = triton_ops.triton_act_linear(layer, x, p)
    xq, xs = REF[method](nx.activation_input(x, p, act))
    ref = triton_ops._mm_ref(xq, xs, layer.qweight, layer.weight_scale, layer.bias, torch.bfloat16)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch._dynamo.reset()
    traced = torch.compile(lambda a, b: triton_ops.triton_act_linear(layer, a, b), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(traced(x, p), out, rtol=0, atol=0)


def test_fused_layer_checks_its_inputs(rng):
    layer = _fused_layer("fp8", 64, 32, "gelu_tanh")
    x = torch.randn(3, 48, generator=rng).to(torch.bfloat16)
    with pytest.raises(ValueError, match="input widths 48 \\+ prefix 0 != in_features 64"):
        layer(x)
    layer.input_act = None
    with pytest.raises(ValueError, match="prefix given, but the layer has no input_act"):
        layer(torch.randn(3, 16).to(torch.bfloat16), prefix=x)
    with pytest.raises(ValueError, match="unknown input activation 'relu'; valid: gelu_tanh"):
        triton_ops.act_quantize_per_token_impl(x, None, "relu", "fp8")


# ---------------------------------------------------------------------------------------------
# GPU: the one-pass Triton kernel against the spec (bit-exact), fused FLUX on the triton backend


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["fp8", "int8"])
@pytest.mark.parametrize("kp,kx", [(0, 113), (0, 12288), (3072, 12288), (37, 200), (0, 20000)])
@pytest.mark.parametrize("m", [1, 7, 4224])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_act_quantize_kernel_bit_exact(fmt, kp, kx, m, dtype, rng):
    """q, scale == the reference quantization of cat([p, gelu_tanh(x)]) with torch's CUDA GELU
    (numerics/activations.py): rows over six decades (so some rows are all below the chunked
    kernel's monotone shortcut), a zero row, int8 ties, an outlier, an all-negative row."""
    require_cuda((8, 9) if fmt == "fp8" else (8, 0))
    from diffquant.quantization.kernels import triton_quant

    x = _rows(m, kx, rng, dtype, "cuda")
    if m > 4:
        x[4] = -x[4].abs()
    p = _rows(m, kp, rng, dtype, "cuda") if kp else None
    q, s = triton_quant.act_quantize_per_token(x, p, "gelu_tanh", fmt)
    _check_bit_exact(nx.activation_input(x, p, "gelu_tanh"), fmt, q, s)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_act_quantize_kernel_strided_inputs(fmt, rng):
    """Row strides other than the width (slices of wider tensors), as attention outputs can be."""
    require_cuda((8, 9) if fmt == "fp8" else (8, 0))
    from diffquant.quantization.kernels import triton_quant

    x = _rows(300, 1024, rng, torch.bfloat16, "cuda")[:, 100:612]
    p = _rows(300, 512, rng, torch.bfloat16, "cuda")[:, 64:320]
    q, s = triton_quant.act_quantize_per_token(x, p, "gelu_tanh", fmt)
    _check_bit_exact(nx.activation_input(x, p, "gelu_tanh"), fmt, q, s)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["fp8", "int8"])
def test_fused_flux_on_gpu_equals_unfused_and_compiles(method):
    """Tiny FLUX on the triton backend: fused == unfused bit for bit in eager mode (the kernel's GELU
    is torch's); the fused blocks compile with fullgraph=True and match eager within 5% of max|out|."""
    require_cuda((8, 9) if method == "fp8" else (8, 0))
    fused, plain, report, _ = _flux_pair(method, "cuda", backend="triton")
    assert sum(f.fused for f in report.fusions) == 6, report.table()
    inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in flux_inputs(fused).items()}
    with torch.no_grad():
        out, ref = fused(**inputs)[0], plain(**inputs)[0]
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        torch._dynamo.reset()
        for blocks in (fused.transformer_blocks, fused.single_transformer_blocks):
            blocks[0] = torch.compile(blocks[0], fullgraph=True)
        compiled = fused(**inputs)[0]
    assert torch.isfinite(compiled).all()
    err = (compiled.float() - out.float()).abs().max().item()
    assert err <= 0.05 * out.float().abs().max().item(), err
