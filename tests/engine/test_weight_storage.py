"""FP8 weight-only storage (text encoders, VAEs): bytes, exactness against the dequantized weight,
one materialised layer at a time."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffquant.quantization.numerics.fp8 import fp8_dequantize, fp8_quantize_per_row, fp8_quantize_per_tensor
from diffquant.quantization.weight_storage import apply_fp8_weight_storage, dequantized_weight, is_fp8_stored

MAX_RATIO = 0.52  # stored bytes / bf16 bytes over the stored layers


def _encoder_like(dtype=torch.bfloat16) -> nn.Module:
    """Linear layers (a text encoder) and 1d/2d/3d (transposed) convolutions (a VAE)."""
    torch.manual_seed(0)
    m = nn.ModuleDict({
        "q": nn.Linear(128, 128), "mlp": nn.Linear(128, 512, bias=False), "out": nn.Linear(512, 128),
        "c1": nn.Conv1d(64, 64, 3, padding=1), "c2": nn.Conv2d(64, 64, 3, padding=1),
        "c3": nn.Conv3d(32, 32, 3, padding=1), "up": nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1),
    })
    return m.to(dtype)


def _bytes_of_layers(m: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))


def test_bytes_at_most_052x_of_bf16():
    m = _encoder_like()
    before = _bytes_of_layers(m)
    report = apply_fp8_weight_storage(m)
    after = _bytes_of_layers(m)
    assert after <= MAX_RATIO * before, (after, before)
    assert report.bytes_after <= MAX_RATIO * report.bytes_before
    assert len(report.quantized) == 7 and not report.kept
    for layer in m.values():
        assert is_fp8_stored(layer) and layer.weight is None and layer.weight_fp8.dtype == torch.float8_e4m3fn
        assert layer.weight_scale.dtype == torch.float32


def test_scales_per_tensor_for_linear_per_output_channel_for_conv():
    m = _encoder_like()
    ref = copy.deepcopy(m)
    apply_fp8_weight_storage(m)
    assert m["q"].weight_scale.shape == ()
    assert m["c2"].weight_scale.shape == (64, 1, 1, 1)
    assert m["c3"].weight_scale.shape == (32, 1, 1, 1, 1)
    assert m["up"].weight_scale.shape == (1, 32, 1, 1)  # ConvTranspose weight: [in, out, kh, kw]
    # the numerics are diffquant.quantization.numerics.fp8, bit for bit
    q, s = fp8_quantize_per_tensor(ref["q"].weight.detach())
    assert torch.equal(m["q"].weight_fp8.view(torch.uint8), q.view(torch.uint8)) and torch.equal(m["q"].weight_scale, s)
    q, s = fp8_quantize_per_row(ref["c2"].weight.detach().reshape(64, -1))
    assert torch.equal(m["c2"].weight_fp8.reshape(64, -1).view(torch.uint8), q.view(torch.uint8))
    w = fp8_dequantize(q, s, torch.bfloat16).reshape(ref["c2"].weight.shape)
    assert torch.equal(dequantized_weight(m["c2"]), w)


@pytest.mark.parametrize("name,shape", [("q", (3, 7, 128)), ("out", (5, 512)), ("c1", (2, 64, 9)),
                                        ("c2", (1, 64, 6, 5)), ("c3", (1, 32, 3, 4, 4)), ("up", (1, 64, 5, 5))])
def test_output_bit_identical_to_dequantized_weight(name, shape):
    m = _encoder_like()
    apply_fp8_weight_storage(m)
    layer = m[name]
    x = torch.randn(shape).to(torch.bfloat16)
    w = dequantized_weight(layer)
    ref = copy.deepcopy(layer)
    for hook_dict in (ref._forward_pre_hooks, ref._forward_hooks):
        hook_dict.clear()
    ref.weight = w
    with torch.no_grad():
        assert torch.equal(layer(x), type(layer).forward(ref, x))  # rtol=0, atol=0
    assert layer.weight is None  # freed again after the forward


def test_at_most_one_layer_materialised_during_forward():
    """Peak materialised high-precision weight bytes == the largest layer's, never the sum."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 64))
    mlp = mlp.to(torch.bfloat16)
    sizes = [layer.weight.numel() * 2 for layer in mlp if isinstance(layer, nn.Linear)]
    live = []
    report = apply_fp8_weight_storage(mlp)

    def probe(module, args):
        live.append(sum(layer.weight.numel() * 2 for layer in mlp if isinstance(layer, nn.Linear)
                        and layer.weight is not None))

    for layer in mlp:
        if isinstance(layer, nn.Linear):
            layer.register_forward_pre_hook(probe)  # runs after the storage pre-hook
    with torch.no_grad():
        mlp(torch.randn(4, 64).to(torch.bfloat16))
    assert max(live) == max(sizes) < sum(sizes)
    assert report.tracker.peak_bytes == max(sizes) and report.tracker.live_bytes == 0


def test_moves_with_the_module_and_keeps_float32_layers_dtype():
    m = nn.Sequential(nn.Linear(16, 16)).float()  # e.g. T5's `wo`, kept in fp32 by transformers
    x = torch.randn(2, 16)
    apply_fp8_weight_storage(m)
    assert m[0].weight_orig_dtype == torch.float32
    m.to(torch.device("cpu"))
    assert m(x).dtype == torch.float32
    assert torch.equal(m(x), F.linear(x, dequantized_weight(m[0]), m[0].bias))


def test_ignored_layers_and_errors():
    m = _encoder_like()
    report = apply_fp8_weight_storage(m, ignored_layers=["mlp"])
    assert [r.name for r in report.kept] == ["mlp"] and not is_fp8_stored(m["mlp"])
    with pytest.raises(ValueError, match="'mpl' matches no linear layer"):
        apply_fp8_weight_storage(_encoder_like(), ignored_layers=["mpl"])
    with pytest.raises(ValueError, match="no Linear or Conv layer"):
        apply_fp8_weight_storage(nn.Sequential(nn.LayerNorm(4)))


def test_sliced_dequantization_equals_the_spec(monkeypatch):
    import diffquant.quantization.weight_storage as ws

    monkeypatch.setattr(ws, "_CHUNK_ELEMENTS", 1000)  # force many slices
    m = _encoder_like()
    apply_fp8_weight_storage(m)
    for layer in m.values():
        expected = fp8_dequantize(layer.weight_fp8, layer.weight_scale, torch.bfloat16)
        assert torch.equal(dequantized_weight(layer), expected)
