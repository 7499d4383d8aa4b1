"""Reference numerics (the spec): grid round-trips, saturation, zero rows, rounding, bad weights."""

from __future__ import annotations

import pytest
import torch

from diffquant.quantization import numerics as nx


def _all_finite_fp8_values() -> torch.Tensor:
    bits = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    return bits[torch.isfinite(bits)]


def test_fp8_grid_values_round_trip_exactly():
    grid = _all_finite_fp8_values()  # 254 finite values incl. +-0 and +-448
    assert grid.abs().max().item() == nx.FP8_MAX
    q = nx.fp8_cast(grid, torch.tensor(1.0))
    assert torch.equal(q.float(), grid)
    # with a power-of-two scale the grid still round-trips exactly
    q2, s2 = nx.fp8_quantize_per_tensor(grid * 4.0)
    assert s2.item() == 4.0 and torch.equal(nx.fp8_dequantize(q2, s2), grid * 4.0)


def test_fp8_saturates_instead_of_nan():
    x = torch.tensor([1e6, -1e6, 449.0, -500.0, 448.0])
    q = nx.fp8_cast(x, torch.tensor(1.0)).float()
    assert torch.equal(q, torch.tensor([448.0, -448.0, 448.0, -448.0, 448.0]))


def test_fp8_row_amax_lands_on_448(rng):
    x = torch.randn(37, 113, generator=rng) * torch.rand(37, 1, generator=rng) * 100
    q, s = nx.fp8_quantize_per_row(x)
    assert s.shape == (37, 1) and s.dtype == torch.float32
    assert torch.equal(q.float().abs().amax(dim=1), torch.full((37,), 448.0))
    # relative error of E4M3 (3 mantissa bits): at most half an ulp = 2^-4 for normal values
    deq = nx.fp8_dequantize(q, s)
    normal = x.abs() >= s * 2**-6
    assert ((deq - x).abs()[normal] <= x.abs()[normal] * 2**-4 + 1e-12).all()


@pytest.mark.parametrize("fn", [nx.fp8_quantize_per_row, nx.int8_quantize_per_row])
def test_zero_rows_give_zeros_and_scale_one(fn, rng):
    x = torch.randn(5, 64, generator=rng)
    x[2] = 0.0
    q, s = fn(x)
    assert s[2].item() == 1.0 and torch.isfinite(s).all()
    assert (q[2].float() == 0).all() and torch.isfinite(q.float()).all()


def test_fp8_all_zero_tensor():
    q, s = nx.fp8_quantize_per_tensor(torch.zeros(3, 4))
    assert s.item() == 1.0 and (q.float() == 0).all()
    q, s = nx.fp8_quantize_block(torch.zeros(5, 7), 2, 4)
    assert (s == 1).all() and (q.float() == 0).all()


def test_int8_grid_round_trip_and_saturation():
    grid = torch.arange(-127, 128, dtype=torch.float32)
    q = nx.int8_cast(grid, torch.tensor(1.0))
    assert torch.equal(q.float(), grid)
    sat = nx.int8_cast(torch.tensor([300.0, -300.0, -127.6, 127.4]), torch.tensor(1.0))
    assert sat.tolist() == [127, -127, -127, 127]  # never -128


def test_int8_round_half_to_even():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 126.5])
    assert nx.int8_cast(x, torch.tensor(1.0)).tolist() == [0, 2, 2, 0, -2, -2, 4, 126]


def test_int8_row_scale_and_error(rng):
    x = torch.randn(19, 4224, generator=rng) * 3
    q, s = nx.int8_quantize_per_row(x)
    assert torch.equal(q.abs().amax(dim=1), torch.full((19,), 127, dtype=torch.int8))
    assert ((nx.int8_dequantize(q, s) - x).abs() <= s / 2 + 1e-6).all()


def test_fp8_per_token_group_matches_per_row_within_groups(rng):
    x = torch.randn(7, 300, generator=rng)
    q, s = nx.fp8_quantize_per_token_group(x, 128)  # groups of 128, 128, 44
    assert s.shape == (7, 3)
    for g, (lo, hi) in enumerate([(0, 128), (128, 256), (256, 300)]):
        qg, sg = nx.fp8_quantize_per_row(x[:, lo:hi])
        assert torch.equal(s[:, g : g + 1], sg)
        assert torch.equal(q[:, lo:hi].float(), qg.float())


def test_fp8_block_matches_per_tensor_within_blocks(rng):
    w = torch.randn(130, 200, generator=rng)
    q, s = nx.fp8_quantize_block(w, 64, 128)
    assert s.shape == (3, 2)
    qt, st = nx.fp8_quantize_per_tensor(w[64:128, 128:200])
    assert s[1, 1] == st and torch.equal(q[64:128, 128:200].float(), qt.float())
    full = nx.expand_block_scale(s, (130, 200), (64, 128))
    assert full.shape == (130, 200) and full[129, 199] == s[2, 1]


def test_static_activation_scale(rng):
    x = torch.randn(4, 32, generator=rng)
    scale = torch.tensor(0.01)
    q = nx.fp8_quantize_static(x, scale)
    assert torch.equal(q.float(), (x / 0.01).clamp(-448, 448).to(torch.float8_e4m3fn).float())


def test_quantize_keeps_device_and_takes_bf16(rng):
    x = torch.randn(3, 16, generator=rng).to(torch.bfloat16)
    q, s = nx.fp8_quantize_per_row(x)
    assert q.device == x.device and s.dtype == torch.float32
    q2, _ = nx.fp8_quantize_per_row(x.float())
    assert torch.equal(q.float(), q2.float())
