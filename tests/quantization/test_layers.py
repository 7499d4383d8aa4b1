"""QuantLinear against float64 references.

Error budgets (STYLE.md 5):
- GEMM: max|out - ref64| <= 2 * max|torch_lowp - ref64| + atol, where ref64 multiplies the
  *dequantized* operands (the reference numerics) in float64, and torch_lowp is PyTorch's own bf16
  F.linear of the same operands. This isolates the backend from quantization error.
- Quantization error: output SQNR vs the unquantized float64 linear >= 25 dB (fp8 E4M3, ~4 bits of
  mantissa per operand) and >= 35 dB (int8 per-token x per-channel). With fewer than 100 output
  elements the SQNR estimate itself is noisy (measured: fp8 1x113->7 ranges 24-35 dB over seeds), so
  those shapes get a floor 8 dB lower.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffquant.quantization import QuantLinear, quantize_
from diffquant.quantization.kernels.backends import quantize_activation
from diffquant.quantization.metrics import sqnr_db

SQNR_FLOOR_DB = {"fp8": 25.0, "int8": 35.0}
ATOL_BF16 = 1e-2


def _linear(k: int, n: int, bias: bool, rng: torch.Generator, dtype=torch.bfloat16) -> torch.nn.Linear:
    lin = torch.nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=rng) / k**0.5)
        if bias:
            lin.bias.copy_(torch.randn(n, generator=rng))
    return lin.to(dtype)


def _quantized(lin: torch.nn.Linear, config) -> QuantLinear:
    wrapper = torch.nn.Sequential(lin)
    quantize_(wrapper, config)
    return wrapper[0]


def _reference64(q: QuantLinear, x2d: torch.Tensor) -> torch.Tensor:
    """float64 product of the dequantized operands, as the reference numerics define them."""
    s = q.scheme
    xq, xs = quantize_activation(s, x2d, q.input_scale)
    if s.activation_granularity == "per_token_group":
        xs = xs.repeat_interleave(s.block_size[1], dim=1)[:, : x2d.shape[1]]
    xd = xq.double() * xs.double()
    wd = q.dequantized_weight(torch.float32).double()  # exact: products of an 8-bit value and a float32 scale
    out = xd @ wd.t()
    return out + q.bias.double() if q.bias is not None else out


SHAPES_KN = [(113, 7), (4224, 113), (7, 4224)]


@pytest.mark.parametrize("method", ["fp8", "int8"])
@pytest.mark.parametrize("m", [1, 7, 113, 4224])
@pytest.mark.parametrize("k,n", SHAPES_KN)
@pytest.mark.parametrize("bias", [True, False])
def test_quant_linear_within_budget(method, m, k, n, bias, rng):
    lin = _linear(k, n, bias, rng)
    x = torch.randn(m, k, generator=rng).to(torch.bfloat16)
    exact = F.linear(x.double(), lin.weight.double(), lin.bias.double() if bias else None)
    q = _quantized(lin, method)
    out = q(x)
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    ref = _reference64(q, x)
    xs_, ws_ = quantize_activation(q.scheme, x, None), q.dequantized_weight(torch.float32)
    lowp = F.linear((xs_[0].float() * xs_[1]).to(torch.bfloat16), ws_.to(torch.bfloat16),
                    q.bias.to(torch.bfloat16) if bias else None)
    budget = 2 * (lowp.double() - ref).abs().max().item() + ATOL_BF16
    assert (out.double() - ref).abs().max().item() <= budget
    assert sqnr_db(exact, out) >= SQNR_FLOOR_DB[method] - (8 if m * n < 100 else 0)


@pytest.mark.parametrize(
    "config",
    [
        {"method": "fp8", "weight_granularity": "per_tensor"},
        {"method": "fp8", "activation_granularity": "per_tensor"},
        {"method": "fp8", "weight_block_size": [64, 128]},
        {"method": "fp8", "weight_block_size": [32, 48]},
        {"method": "fp8", "activation_scheme": "static", "input_scales": {"0": 4.0 / 448}},
    ],
    ids=["w-tensor", "a-tensor", "block64x128", "block32x48", "static"],
)
@pytest.mark.parametrize("m,k,n", [(1, 113, 7), (113, 300, 130), (37, 256, 4224)])
def test_fp8_granularities(config, m, k, n, rng):
    lin = _linear(k, n, True, rng)
    x = torch.randn(m, k, generator=rng).clamp(-4, 4).to(torch.bfloat16)
    exact = F.linear(x.double(), lin.weight.double(), lin.bias.double())
    q = _quantized(lin, config)
    out = q(x)
    ref = _reference64(q, x)
    assert (out.double() - ref).abs().max().item() <= 2 * ref.abs().max().item() * 2**-8 + ATOL_BF16
    small = 8 if m * n < 100 else 0
    assert sqnr_db(exact, out) >= SQNR_FLOOR_DB["fp8"] - small - (5 if "static" in str(config) else 0)


def test_3d_input_and_dtype_preserved(rng):
    lin = _linear(64, 48, True, rng, dtype=torch.float32)
    q = _quantized(lin, "int8")
    x = torch.randn(2, 5, 64, generator=rng)
    out = q(x)
    assert out.shape == (2, 5, 48) and out.dtype == torch.float32
    torch.testing.assert_close(out[1, 3], q(x[1, 3:4])[0], rtol=1e-6, atol=1e-6)  # tokens are independent


def test_zero_token_gives_bias_not_nan(rng):
    lin = _linear(32, 16, True, rng)
    q = _quantized(lin, "fp8")
    x = torch.randn(3, 32, generator=rng).to(torch.bfloat16)
    x[1] = 0
    out = q(x)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], lin.bias.float().to(torch.bfloat16))


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_weight_is_an_error(bad, rng):
    lin = _linear(16, 8, False, rng)
    with torch.no_grad():
        lin.weight[3, 2] = bad
    with pytest.raises(ValueError, match=r"layer 0: weight has 1 inf/NaN"):
        _quantized(lin, "fp8")


@pytest.mark.parametrize("method,backend", [("fp8", "scaled_mm"), ("fp8", "fp8_weight_only"), ("int8", "int_mm")])
def test_forcing_a_cuda_backend_on_cpu_is_an_error(method, backend, rng):
    lin = _linear(32, 32, False, rng)
    with pytest.raises(ValueError, match=f"backend '{backend}' cannot run layer 0: needs a CUDA device"):
        _quantized(lin, {"method": method, "backend": backend})


def test_backend_valid_for_other_method_only_is_rejected():
    with pytest.raises(ValueError, match="backend='scaled_mm' is not valid"):
        _quantized(torch.nn.Linear(8, 8), {"method": "int8", "backend": "scaled_mm"})


def test_cpu_backend_is_emulated_and_named(rng):
    q = _quantized(_linear(32, 32, False, rng), "fp8")
    assert q.backend == "emulated"
    assert "method=fp8" in repr(q)


def test_state_dict_holds_quantized_buffers(rng):
    q = _quantized(_linear(64, 32, True, rng), "fp8")
    sd = q.state_dict()
    assert sd["qweight"].dtype == torch.float8_e4m3fn and sd["weight_scale"].shape == (32, 1)
    assert "weight" not in sd
