"""Tiny random-weight pipeline folders, built once per test session (diffquant.testing builders)."""

from __future__ import annotations

import pytest

from diffquant.engine import SamplingParams
from diffquant.testing import build_tiny_pipeline

# Small enough for a 2-core CI machine: 2 steps, 32x32 images, 16x16x5 videos.
IMAGE_PARAMS = dict(num_inference_steps=2, height=32, width=32, seed=0)
VIDEO_PARAMS = dict(num_inference_steps=2, height=16, width=16, num_frames=5, seed=0)


def sampling_for(name: str, **overrides) -> SamplingParams:
    base = VIDEO_PARAMS if name.startswith(("wan", "hunyuanvideo")) else IMAGE_PARAMS
    return SamplingParams(**{**base, **overrides})


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """tiny_pipeline(name) -> folder of the tiny diffusers pipeline `name` (see diffquant.testing.BUILDERS)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = build_tiny_pipeline(name, tmp_path_factory.mktemp(name.replace(".", "_")))
        return cache[name]

    return get
