"""Engine and FP8 weight storage on a CUDA device (skipped without one)."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

from diffquant import Engine
from diffquant.quantization.metrics import psnr_db
from diffquant.quantization.weight_storage import apply_fp8_weight_storage
from tests.conftest import require_cuda
from tests.engine.conftest import sampling_for


@pytest.mark.gpu
def test_engine_fp8_on_cuda_with_fp8_text_encoders_and_vae(tiny_pipeline):
    require_cuda((8, 9))
    config = {"transformer": "fp8", "text_encoder": "fp8", "text_encoder_2": "fp8", "vae": "fp8"}
    engine = Engine(model=tiny_pipeline("flux1-dev"), quantization_config=config, device="cuda")
    out = engine.generate("a red circle", sampling_for("flux1-dev"))
    assert len(out.images) == 1 and out.peak_memory_kind.startswith("cuda")
    print(engine.summary(), out.timings, out.quantization["transformer"].backends)
    backends = out.quantization["transformer"].backends
    assert backends.get("triton", 0) + backends.get("scaled_mm", 0) > 0, backends  # FP8 tensor cores, not emulated


def _first_picture(out) -> torch.Tensor:
    im = out.images[0] if out.frames is None else out.frames[0][0]
    return torch.tensor(list(im.getdata()), dtype=torch.float64)


@pytest.mark.gpu
@pytest.mark.parametrize("name,method", [("flux1-dev", "fp8"), ("flux1-dev", "int8"),
                                         ("wan2.2-t2v-a14b", "fp8"), ("qwen-image", "fp8")])
def test_engine_compiled_with_cuda_graphs_matches_eager(tiny_pipeline, name, method):
    """compile="reduce-overhead" (CUDA graphs): two generations replay the same graphs and give the
    same picture; against the eager engine it is within 30 dB PSNR (inductor's activation
    quantization and GEMM epilogues round differently from eager's kernels). Wan2.2 (CFG: two
    transformer calls a step, two experts) and Qwen-Image with true CFG (a negative prompt) keep the
    first call's output alive across the second call, which CUDA-graph trees must not overwrite."""
    require_cuda((8, 9) if method == "fp8" else (8, 0))
    path = tiny_pipeline(name)
    extra = {"negative_prompt": "blurry"} if name == "qwen-image" else {}
    params = sampling_for(name, **extra)
    eager = Engine(model=path, quantization=method, device="cuda").generate("a red circle", params)
    engine = Engine(model=path, quantization=method, device="cuda", compile="reduce-overhead")
    first = _first_picture(engine.generate("a red circle", params))
    second = _first_picture(engine.generate("a red circle", params))
    assert torch.equal(first, second)
    assert psnr_db(_first_picture(eager), first) >= 30.0


@pytest.mark.gpu
def test_weight_storage_forward_peak_on_cuda():
    """Peak of a forward <= fp8 footprint + the largest layer's bf16 weight + activations (+ slice slack)."""
    require_cuda()
    device = torch.device("cuda")
    # Start from an empty allocator cache: run 8b measured a 192 MiB peak here right after a failed
    # CUDA-graph engine test, where 7d (same code, other order) passed; earlier tests' cached blocks
    # are the suspect, not weight storage.
    gc.collect()
    torch.cuda.empty_cache()
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(8192, 8192, bias=False) for _ in range(6)]).to(device, torch.bfloat16)
    bf16_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    largest = 8192 * 8192 * 2
    apply_fp8_weight_storage(model)
    torch.cuda.empty_cache()
    x = torch.randn(16, 8192, device=device, dtype=torch.bfloat16)
    base = torch.cuda.memory_allocated(device)
    fp8_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():
        model(x)
    torch.cuda.synchronize(device)
    peak_extra = torch.cuda.max_memory_allocated(device) - base
    activations = 3 * x.numel() * x.element_size()
    slack = 32 * 2**20  # one float32 slice of the dequantization + its bf16 copy
    print(f"bf16 {bf16_bytes / 2**20:.0f} MiB, fp8 {fp8_bytes / 2**20:.0f} MiB, forward peak above the fp8 "
          f"footprint {peak_extra / 2**20:.0f} MiB (largest layer {largest / 2**20:.0f} MiB)")
    assert peak_extra <= largest + activations + slack
    assert fp8_bytes + peak_extra < 0.75 * bf16_bytes  # 0.5 (fp8) + 1/6 (one of six layers) + slack
