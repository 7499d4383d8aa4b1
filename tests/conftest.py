"""Shared test helpers. GPU tests are marked `gpu` and skip without CUDA, saying why."""

from __future__ import annotations

import pytest
import torch


def cuda_capability() -> tuple[int, int] | None:
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else None


def require_cuda(min_capability: tuple[int, int] = (0, 0)):
    """Skip unless a CUDA device with at least `min_capability` is present."""
    cap = cuda_capability()
    if cap is None:
        pytest.skip("needs a CUDA GPU (none found)")
    if cap < min_capability:
        pytest.skip(f"needs SM{min_capability[0]}{min_capability[1]}+, device is SM{cap[0]}{cap[1]}")


@pytest.fixture
def rng():
    """A fresh, unseeded-by-test generator: every run draws new inputs (seed printed on failure)."""
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    print(f"rng seed {seed}")
    return torch.Generator().manual_seed(seed)
