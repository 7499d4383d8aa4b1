"""Does the embedded model follow prompts? Render prompts, read the images back by pixel analysis.

Used by scripts/eval_tiny_model.py (the full evaluation) and by a test on a small subset.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from diffquant.quantization.metrics import psnr_db
from diffquant.tiny import shapes
from diffquant.tiny.model import TEXT_LEN

EVAL_SEED = 20261129  # training uses scripts/train_tiny_model.TRAIN_SEED; this one it never saw
FIELDS = ("color", "shape", "background", "position", "size")


def eval_prompts(n: int, seed: int = EVAL_SEED) -> list[shapes.Attributes]:
    return shapes.sample_attributes(n, torch.Generator().manual_seed(seed))


def images_to_tensor(images) -> torch.Tensor:
    """PIL images -> uint8 [B, 3, H, W]."""
    return torch.stack([torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1) for im in images])


def generate(
    engine, attrs: list[shapes.Attributes], steps: int | None = None, seed: int = 0, batch: int = 16,
    true_cfg_scale: float | None = None,
) -> torch.Tensor:
    """uint8 [B, 3, H, W] images for the captions of `attrs` (same seed for every variant). With
    true_cfg_scale > 1, classifier-free guidance against the empty prompt."""
    from diffquant.engine import SamplingParams

    out = []
    for i in range(0, len(attrs), batch):
        prompts = [shapes.caption(a) for a in attrs[i : i + batch]]
        size = shapes.IMAGE_SIZE
        cfg = {}
        if true_cfg_scale is not None:
            cfg = {"true_cfg_scale": true_cfg_scale, "negative_prompt": [""] * len(prompts)}
        res = engine.generate(
            prompts,
            SamplingParams(num_inference_steps=steps, seed=seed + i, height=size, width=size, **cfg),
            max_sequence_length=TEXT_LEN,
        )
        out.append(images_to_tensor(res.images))
    return torch.cat(out)


def accuracy(images: torch.Tensor, attrs: list[shapes.Attributes]) -> dict[str, float]:
    """Fraction of images whose classified attribute matches the prompt, per attribute."""
    hits = dict.fromkeys(FIELDS, 0)
    for image, want in zip(images, attrs, strict=True):
        got = shapes.classify(image)
        for f in FIELDS:
            hits[f] += int(got is not None and getattr(got, f) == getattr(want, f))
    return {f: hits[f] / len(attrs) for f in FIELDS}


def mean_psnr(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """Mean per-image PSNR in dB (identical images count as 100 dB so the mean stays finite)."""
    vals = [psnr_db(r, c) for r, c in zip(reference, candidate, strict=True)]
    return float(np.mean([100.0 if math.isinf(v) else v for v in vals]))
