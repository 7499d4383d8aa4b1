"""The embedded model on a small subset of the evaluation (the full one: scripts/eval_tiny_model.py).

Floors (bf16, 16 prompts drawn with the evaluation seed): ACCURACY_FLOOR below, far above chance
(color 1/9, position 1/5, size 1/2) and below what the shipped model measures, so a broken pipeline,
tokenizer, VAE scaling or profile fails. Quantized runs: mean PSNR vs bf16 >= 35 dB.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from PIL import Image

from diffquant import Engine
from diffquant.tiny.evaluate import accuracy, eval_prompts, generate, mean_psnr

# measured on this subset with the shipped model: color 0.69, shape 0.19, background 0.94, position 0.94,
# size 0.94. Shape has no floor yet: the model has not learned it (issue 5 stays open until it has).
ACCURACY_FLOOR = {"color": 0.5, "background": 0.8, "position": 0.8, "size": 0.75}
PSNR_FLOOR_DB = 35.0


@pytest.fixture(scope="module")
def subset():
    attrs = eval_prompts(16)
    return attrs, generate(Engine(None, device="cpu"), attrs)


def test_bf16_follows_prompts(subset):
    attrs, images = subset
    acc = accuracy(images, attrs)
    assert all(acc[k] >= v for k, v in ACCURACY_FLOOR.items()), acc


@pytest.mark.parametrize("method", ["fp8", "int8"])
def test_quantized_stays_close_to_bf16(subset, method):
    attrs, ref = subset
    out = generate(Engine(None, quantization=method, device="cpu"), attrs[:8])
    assert mean_psnr(ref[:8], out) >= PSNR_FLOOR_DB


def test_readme_command_writes_the_image(tmp_path):
    target = tmp_path / "out.png"
    res = subprocess.run([sys.executable, "-m", "diffquant", "generate",
                          "a large red circle in the center on a white background", "--quantization", "fp8",
                          "-o", str(target)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "transformer fp8" in res.stdout and "quantized" in res.stdout and str(target) in res.stdout
    assert Image.open(target).size == (64, 64)
