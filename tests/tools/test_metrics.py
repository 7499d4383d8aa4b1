"""The compare tool's metrics against hand-computed values on small arrays; SSIM against a direct
loop over every window position of the Wang et al. formula; gates, thresholds, JSON safety."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from diffquant.quantization.tools.compare_diffusion_trajectory_similarity import check_gates, parse_gate
from diffquant.quantization.tools.metrics import (
    gaussian_window,
    json_safe,
    output_metrics,
    ssim,
    threshold_table,
    video_metrics,
)
from diffquant.quantization.tools.trajectory import (
    LatentRecorder,
    compare_trajectories,
    first_drift_step,
    same_start,
)

REF = np.array([0, 10, 20, 30], np.uint8).reshape(2, 2, 1)
CAND = np.array([0, 12, 18, 30], np.uint8).reshape(2, 2, 1)


def test_pixel_metrics_hand_computed():
    m = output_metrics(REF, CAND)  # diff = [0, -2, 2, 0]
    assert m["mae"] == 1.0
    assert m["mse"] == 2.0
    assert m["rmse"] == pytest.approx(math.sqrt(2), rel=1e-15)
    assert m["max_abs"] == 2.0
    assert m["l2"] == pytest.approx(math.sqrt(8), rel=1e-15)
    assert m["relative_l2"] == pytest.approx(math.sqrt(8) / math.sqrt(1400), rel=1e-15)
    assert m["psnr_db"] == pytest.approx(10 * math.log10(255**2 / 2), rel=1e-15)
    assert m["cosine_similarity"] == pytest.approx(1380 / math.sqrt(1400 * 1368), rel=1e-15)
    assert m["identical"] is False


def test_uint8_inputs_do_not_wrap_around():
    a, b = np.array([[[0]]], np.uint8), np.array([[[255]]], np.uint8)
    m = output_metrics(a, b)
    assert m["mae"] == 255.0 and m["max_abs"] == 255.0 and m["psnr_db"] == pytest.approx(0.0)


def test_identical_outputs_give_null_psnr_and_strict_json():
    img = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    m = output_metrics(img, img.copy())
    assert m["identical"] is True and m["psnr_db"] is None
    assert m["mse"] == 0 and m["ssim"] == pytest.approx(1.0, abs=1e-12) and m["cosine_similarity"] == pytest.approx(1)
    json.dumps(m, allow_nan=False)
    assert all(row["smoke_pass"] and row["stricter_pass"] for row in threshold_table(m).values())


def _ssim_loop(x: np.ndarray, y: np.ndarray, size: int = 11, sigma: float = 1.5, L: float = 255.0) -> float:
    """Direct formula: for every valid window, Gaussian-weighted means, variances, covariance."""
    ax = np.arange(size) - (size - 1) / 2
    g = np.exp(-(ax**2) / (2 * sigma**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    vals = []
    for i in range(x.shape[0] - size + 1):
        for j in range(x.shape[1] - size + 1):
            px, py = x[i:i + size, j:j + size].astype(float), y[i:i + size, j:j + size].astype(float)
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cov = (w * (px - mx) * (py - my)).sum()
            vals.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_ssim_matches_direct_formula():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (15, 13), dtype=np.uint8)
    y = np.clip(x.astype(int) + rng.integers(-40, 41, x.shape), 0, 255).astype(np.uint8)
    expected = _ssim_loop(x, y)
    assert 0.1 < expected < 0.99
    assert ssim(x, y) == pytest.approx(expected, rel=1e-10)
    # RGB: the mean of the three channels' SSIM
    rgb_x, rgb_y = np.stack([x, y, x], -1), np.stack([y, y, 255 - x], -1)
    per_channel = [_ssim_loop(rgb_x[..., c], rgb_y[..., c]) for c in range(3)]
    assert ssim(rgb_x, rgb_y) == pytest.approx(np.mean(per_channel), rel=1e-10)


def test_ssim_known_cases():
    flat = np.full((12, 12), 100, np.uint8)
    assert ssim(flat, flat) == 1.0
    # constant images a, b: SSIM = (2ab + c1) / (a^2 + b^2 + c1) (variances are zero)
    c1 = (0.01 * 255) ** 2
    assert ssim(flat, np.full_like(flat, 50)) == pytest.approx((2 * 100 * 50 + c1) / (100**2 + 50**2 + c1), rel=1e-12)
    assert gaussian_window().sum().item() == pytest.approx(1.0, rel=1e-15)


def test_video_metrics_frames():
    rng = np.random.default_rng(2)
    ref = rng.integers(0, 256, (5, 12, 12, 3), dtype=np.uint8)
    cand = ref.copy()
    cand[2] = 255 - cand[2]
    m = video_metrics(ref, cand)
    assert m["frame0"]["identical"] and m["mid_frame_index"] == 2 and not m["mid_frame"]["identical"]
    assert m["all_frames"]["mse"] == pytest.approx(m["mid_frame"]["mse"] / 5, rel=1e-12)


def test_json_safe():
    assert json_safe({"a": [math.inf, -math.inf, math.nan, 1.5], "b": (2,)}) == {"a": [None, None, None, 1.5], "b": [2]}


def test_gates():
    metrics = {"psnr_db": 22.0, "cosine_similarity": 0.999, "mae": 7.0}
    assert parse_gate("psnr_db=25, cosine_similarity=0.995", "--fail-below") == {"psnr_db": 25.0,
                                                                                "cosine_similarity": 0.995}
    fails = check_gates(metrics, parse_gate("psnr_db=25,cosine_similarity=0.995", "x"), parse_gate("mae=6", "x"))
    assert fails == ["psnr_db 22 < 25", "mae 7 > 6"]
    assert check_gates({"psnr_db": None, "mae": 0.0}, {"psnr_db": 25}, {"mae": 6}) == []
    with pytest.raises(ValueError, match="'psnr=25' is not METRIC=VALUE"):
        parse_gate("psnr=25", "--fail-below")
    with pytest.raises(ValueError, match="not a number"):
        parse_gate("psnr_db=high", "--fail-below")


def test_threshold_table_levels():
    table = threshold_table({"psnr_db": 22.0, "mae": 5.0, "cosine_similarity": 0.99, "relative_l2": 0.1})
    assert table["psnr_db"]["smoke_pass"] and not table["psnr_db"]["stricter_pass"]
    assert table["mae"]["stricter_pass"] and table["cosine_similarity"]["smoke_pass"]
    assert not table["relative_l2"]["stricter_pass"] and table["relative_l2"]["direction"] == "lower"


def test_trajectory_rows_and_drift():
    ref = [torch.ones(2, 3), torch.ones(2, 3), torch.ones(2, 3)]
    cand = [torch.ones(2, 3), torch.full((2, 3), 1.03), torch.full((2, 3), 1.2)]
    rows = compare_trajectories(ref, cand)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[0]["relative_l2"] == 0 and rows[1]["relative_l2"] == pytest.approx(0.03, rel=1e-6)
    assert rows[2]["cosine_similarity"] == pytest.approx(1.0)
    assert first_drift_step(rows) == 2 and first_drift_step(rows, 0.5) is None
    assert same_start(ref[0], cand[0]) is True and same_start(ref[0], cand[1]) is False
    assert same_start(None, cand[0]) is None
    with pytest.raises(ValueError, match="lockstep"):
        compare_trajectories([torch.ones(2)], [torch.ones(3)])


def test_latent_recorder_wraps_scheduler_step():
    class Out:
        def __init__(self, t):
            self.prev_sample = t

    class Scheduler:
        def step(self, noise, t, latents, return_dict=True):
            prev = latents - noise
            return Out(prev) if return_dict else (prev,)

    class Pipe:
        scheduler = Scheduler()

    pipe = Pipe()
    with LatentRecorder(pipe) as rec:
        pipe.scheduler.step(torch.ones(2), 0, torch.zeros(2), return_dict=False)
        pipe.scheduler.step(torch.ones(2), 1, torch.zeros(2))
    assert [t.tolist() for t in rec.latents] == [[-1.0, -1.0], [-1.0, -1.0]]
    assert rec.initial.tolist() == [0.0, 0.0]
    assert "step" not in vars(pipe.scheduler)  # the bound method is back
