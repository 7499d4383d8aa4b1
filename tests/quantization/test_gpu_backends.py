"""CUDA backends (scaled_mm, int_mm, fp8_weight_only) against the float64 reference.

Budget (STYLE.md 5): max|out - ref64| <= 2 * max|bf16 F.linear(dequantized operands) - ref64| + 1e-2,
with ref64 the float64 product of the operands the reference numerics produce. Run with -m gpu.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from diffquant.demo import FLUX_KEEP, flux_inputs, tiny_flux
from diffquant.quantization import QuantLinear, quantize_
from diffquant.quantization.kernels.backends import quantize_activation
from diffquant.quantization.metrics import sqnr_db
from tests.conftest import require_cuda

pytestmark = pytest.mark.gpu


def _layer(k, n, bias, config, rng) -> QuantLinear:
    lin = torch.nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=rng) / k**0.5)
        if bias:
            lin.bias.copy_(torch.randn(n, generator=rng))
    wrapper = torch.nn.Sequential(lin.to("cuda", torch.bfloat16))
    quantize_(wrapper, config)
    return wrapper[0]


def _check_budget(q: QuantLinear, x: torch.Tensor):
    out = q(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    xq, xs = quantize_activation(q.scheme, x, q.input_scale)
    xd = xq.double() * xs.double()
    wd = q.dequantized_weight(torch.float32).double()
    ref = xd @ wd.t() + (q.bias.double() if q.bias is not None else 0)
    lowp = F.linear(xd.to(torch.bfloat16), wd.to(torch.bfloat16), q.bias)
    budget = 2 * (lowp.double() - ref).abs().max().item() + 1e-2
    err = (out.double() - ref).abs().max().item()
    assert err <= budget, (err, budget)


@pytest.mark.parametrize("m", [1, 7, 113, 4224])
@pytest.mark.parametrize("k,n", [(3072, 3072), (256, 4224), (4224, 112)])
@pytest.mark.parametrize(
    "config,backend",
    [
        ({"method": "fp8"}, "scaled_mm"),
        ({"method": "fp8", "weight_granularity": "per_tensor", "activation_granularity": "per_tensor"}, "scaled_mm"),
        ({"method": "fp8", "activation_granularity": "per_tensor"}, "scaled_mm"),
        ({"method": "fp8", "activation_scheme": "static", "input_scales": {"0": 4.0 / 448}}, "scaled_mm"),
        ({"method": "fp8", "backend": "fp8_weight_only"}, "fp8_weight_only"),
        ({"method": "int8"}, "int_mm"),
    ],
    ids=["fp8-row", "fp8-tensor", "fp8-a-tensor", "fp8-static", "fp8-wo", "int8"],
)
def test_cuda_backend_within_budget(m, k, n, config, backend):
    require_cuda((8, 9))
    rng = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    q = _layer(k, n, True, {**config, "backend": backend}, rng)  # forced: auto may pick triton
    assert q.backend == backend
    x = torch.randn(m, k, generator=rng).clamp(-4, 4).to("cuda", torch.bfloat16)
    if backend == "fp8_weight_only":  # activations are not quantized on this path
        out = q(x)
        ref = x.double() @ q.dequantized_weight(torch.float32).double().t() + q.bias.double()
        assert (out.double() - ref).abs().max().item() <= 2 * ref.abs().max().item() * 2**-7 + 1e-2
        return
    _check_budget(q, x)


def test_unaligned_shape_runs_emulated_and_says_why():
    require_cuda((8, 9))
    rng = torch.Generator().manual_seed(0)
    q = _layer(113, 7, True, "fp8", rng)
    name, why = q.backend_for(q.qweight.device)
    assert name in ("emulated", "triton") and (name == "triton" or "divisible by 16" in why)
    _check_budget(q, torch.randn(5, 113, generator=rng).to("cuda", torch.bfloat16))
    with pytest.raises(ValueError, match="backend 'scaled_mm' cannot run layer 0: needs in/out features"):
        _layer(113, 7, True, {"method": "fp8", "backend": "scaled_mm"}, rng)


def test_tiny_flux_on_cuda_matches_cpu_emulation():
    require_cuda((8, 9))
    model = tiny_flux(0)
    inputs = flux_inputs(model)
    for method, backend in (("fp8", "scaled_mm"), ("int8", "int_mm")):
        cpu = copy.deepcopy(model)
        quantize_(cpu, method, keep_high_precision=FLUX_KEEP)
        gpu = copy.deepcopy(model).cuda()
        report = quantize_(gpu, {"method": method, "backend": backend}, keep_high_precision=FLUX_KEEP)
        assert set(report.backends) == {backend}, report.backends
        gin = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        with torch.no_grad():
            ref, out_cpu, out_gpu = model(**inputs)[0], cpu(**inputs)[0], gpu(**gin)[0].cpu()
        assert sqnr_db(out_cpu, out_gpu) >= 30, method  # same numerics, different accumulation order
        assert sqnr_db(ref, out_gpu) >= 25, method
