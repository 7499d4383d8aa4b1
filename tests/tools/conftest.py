"""A tiny random-weight FLUX.1-schnell pipeline folder, built once per test session."""

from __future__ import annotations

import pytest

from diffquant.testing import build_tiny_pipeline


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory):
    return build_tiny_pipeline("flux1-schnell", tmp_path_factory.mktemp("flux"))
