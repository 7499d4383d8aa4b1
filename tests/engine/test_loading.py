"""Quantize while loading: each linear layer moves to the device, is quantized there and its float
weight is dropped at once, so the transformer's full bf16 copy never sits on the device."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from diffquant.engine.loading import PipelineInfo, quantize_component
from diffquant.engine.models import PROFILE_BY_NAME
from diffquant.quantization import build_quant_config
from tests.conftest import require_cuda


def _tiny_flux():
    from diffquant.demo import tiny_flux

    return tiny_flux()


def _info() -> PipelineInfo:
    return PipelineInfo(folder=None, index={}, profile=PROFILE_BY_NAME["flux1-dev"],
                        components={"transformer": ("diffusers", "FluxTransformer2DModel")})


def test_float_weights_are_dropped_layer_by_layer():
    model = _tiny_flux()
    weights = {n: weakref.ref(m.weight) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    report = quantize_component("transformer", model, build_quant_config("fp8"), _info(), torch.device("cpu"))
    gc.collect()
    quantized = {r.name for r in report.quantized}
    assert quantized and len(quantized) < len(weights)
    for name, ref in weights.items():
        assert (ref() is None) == (name in quantized), name  # a replaced layer's float weight is freed
    assert all(p.device.type == "cpu" for p in model.parameters())


def _flux1_dev_on_cpu(**config):
    """FLUX.1-dev shape (11.9B parameters; `config` shrinks it), bf16, random weights, on the CPU."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(guidance_embeds=True, **config)
    model = nn.Module.to(model, torch.bfloat16).to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.05, 0.05)
    return model


def test_meta_built_transformer_quantizes_on_cpu():
    """The GPU test's model builder and path, at a small size."""
    model = _flux1_dev_on_cpu(num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=64,
                              joint_attention_dim=64, axes_dims_rope=(16, 24, 24))
    report = quantize_component("transformer", model, build_quant_config("fp8"), _info(), torch.device("cpu"))
    assert report.quantized and all(p.device.type == "cpu" for p in model.parameters())


@pytest.mark.gpu
def test_flux1_dev_size_peak_gpu_memory_below_bf16_weights():
    require_cuda()
    model = _flux1_dev_on_cpu()
    bf16_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    largest = max(m.weight.numel() * 2 for m in model.modules() if isinstance(m, nn.Linear))
    device = torch.device("cuda")
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    report = quantize_component("transformer", model, build_quant_config("fp8"), _info(), device)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    final = torch.cuda.memory_allocated(device) - base
    print(f"bf16 weights {bf16_bytes / 2**30:.2f} GiB, after fp8 {final / 2**30:.2f} GiB, "
          f"peak while loading {peak / 2**30:.2f} GiB, largest layer {largest / 2**20:.0f} MiB; {report.summary()}")
    assert peak < bf16_bytes
    assert peak <= final + 8 * largest  # streaming: a few layers' temporaries above the final footprint
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert all(b.device.type == "cuda" for b in model.buffers())
