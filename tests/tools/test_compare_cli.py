"""`diffquant compare` end to end on the embedded model (2 steps, 64x64), the identical-output case,
the video path on a tiny Wan2.2 pipeline, and the one-line errors (exit 2, no traceback)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from diffquant.cli import main
from diffquant.engine import SamplingParams
from diffquant.quantization.tools.compare_diffusion_trajectory_similarity import (
    compare_diffusion_trajectory_similarity,
)
from diffquant.quantization.tools.runs import VariantSpec
from diffquant.testing import build_tiny_pipeline

TOOL = "diffquant.quantization.tools.compare_diffusion_trajectory_similarity"


def _strict_json(path) -> dict:
    def no_constant(name):
        raise AssertionError(f"non-standard JSON token {name}")

    return json.loads(path.read_text(), parse_constant=no_constant)


def test_module_cli_fp8_embedded_model_gate_fails(tmp_path):
    out = tmp_path / "r.json"
    res = subprocess.run([sys.executable, "-m", TOOL, "--task", "t2i", "--candidate-quantization", "fp8",
                          "--ignored-layers", "proj_mlp", "--num-inference-steps", "2", "--seed", "3",
                          "--output-json", str(out), "--save-output-dir", str(tmp_path / "img"), "--enforce-eager",
                          "--fail-below", "psnr_db=99,cosine_similarity=0.5", "--fail-above", "mae=1000"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr  # psnr_db can't reach 99 dB: the gate fails
    assert "Traceback" not in res.stderr
    assert "diffquant: gate failed: psnr_db" in res.stderr and "cosine" not in res.stderr.split("gate failed")[1]
    r = _strict_json(out)
    m = r["output_metrics"]
    assert set(m) >= {"cosine_similarity", "mae", "mse", "rmse", "max_abs", "l2", "relative_l2", "psnr_db", "ssim"}
    assert 20 < m["psnr_db"] < 99 and 0.5 < m["ssim"] <= 1 and not m["identical"]
    assert r["output_shape"] == [64, 64, 3] and r["sampling"]["num_inference_steps"] == 2
    assert r["candidate"]["quantization_config"] == {"ignored_layers": ["proj_mlp"]}
    cand = r["candidate_generation"]
    assert cand["layers_quantized"] > 0 and cand["quantized_linear_bytes_after"] < cand["quantized_linear_bytes_before"]
    assert len(cand["generation_times_s"]) == 1 and cand["avg_generation_time_s"] > 0
    assert r["thresholds"]["psnr_db"]["smoke"] == 20.0 and r["thresholds"]["mae"]["stricter"] == 6.0
    steps = r["trajectory"]["steps"]
    assert [s["step"] for s in steps] == [0, 1] and all(0 < s["relative_l2"] < 1 for s in steps)
    assert r["trajectory"]["same_initial_noise"] is True  # lockstep: same seed, same starting latents
    assert r["gate"]["failures"] and not r["gate"]["passed"]
    sbs = Image.open(r["saved_outputs"]["side_by_side"])
    assert sbs.size == (3 * 64 + 8, 64)
    assert "output: psnr_db" in res.stdout and "first step with relative_l2 > 0.05" in res.stdout


def test_identical_runs_cli_in_process(tmp_path, capsys):
    out = tmp_path / "same.json"
    rc = main(["compare", "--num-inference-steps", "1", "--height", "32", "--width", "32", "--output-json", str(out),
               "--fail-below", "psnr_db=25"])
    assert rc == 0
    r = _strict_json(out)
    assert r["output_metrics"]["identical"] is True and r["output_metrics"]["psnr_db"] is None
    assert r["output_metrics"]["ssim"] == 1.0 and r["trajectory"]["steps"][0]["relative_l2"] == 0
    assert r["trajectory"]["first_drift_step"] is None and r["gate"]["passed"]
    assert "psnr_db inf (identical outputs)" in capsys.readouterr().out


def test_candidate_with_fp8_attention(tmp_path):
    """--candidate-attention-quantization fp8: the candidate runs FP8 attention (CPU: the kernel's
    emulation), the JSON records it, the picture stays above the stricter thresholds."""
    out = tmp_path / "fa8.json"
    rc = main(["compare", "--num-inference-steps", "2", "--candidate-attention-quantization", "fp8",
               "--output-json", str(out), "--fail-below", "psnr_db=25"])
    assert rc == 0
    r = _strict_json(out)
    assert r["candidate"]["attention_quantization"] == "fp8" and r["reference"]["attention_quantization"] is None
    assert r["output_metrics"]["identical"] is False and r["gate"]["passed"]


def test_video_task_frame_metrics(tmp_path):
    folder = build_tiny_pipeline("wan2.2-t2v-single", tmp_path / "wan")
    params = SamplingParams(num_inference_steps=1, height=16, width=16, num_frames=5, seed=0)
    r = compare_diffusion_trajectory_similarity(VariantSpec(str(folder)), VariantSpec(str(folder), "int8"),
                                                "a red circle", params, task="t2v", device="cpu")
    m = r["output_metrics"]
    assert set(m) == {"frame0", "mid_frame", "mid_frame_index", "all_frames"}
    assert r["output_shape"][0] == 5 and m["mid_frame_index"] == 2
    assert r["thresholds"]["psnr_db"]["value"] == m["all_frames"]["psnr_db"]
    json.dumps(r, allow_nan=False)


@pytest.mark.parametrize("args,message", [
    (["--output-json", "x.json", "--fail-below", "psnr=25"], "'psnr=25' is not METRIC=VALUE"),
    (["--output-json", "x.json", "--model", "/nonexistent/model"], "does not exist"),
    (["--output-json", "x.json", "--task", "t2x"], "invalid choice: 't2x'"),
    (["--candidate-quantization", "fp8"], "the following arguments are required: --output-json"),
    (["--output-json", "x.json", "--ignored-layers", "ff"], "--ignored-layers needs --candidate-quantization"),
    (["--output-json", "x.json", "--target-psnr", "30"], "--target-psnr needs --sensitivity"),
    (["--output-json", "x.json", "--compile", "--enforce-eager"], "exclude each other"),
    (["--output-json", "x.json", "--sensitivity", "--reference-quantization", "int8", "--candidate-quantization",
      "fp8"], "needs a bf16 reference"),
    (["--output-json", "x.json", "--candidate-quantization-config-json", "{bad"], "is not valid JSON"),
    (["--output-json", "x.json", "--candidate-attention-quantization", "int8"], "unknown attention quantization"),
])
def test_errors_are_one_line_exit_2(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        rc = main(["compare", *args])
        raise SystemExit(rc)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("diffquant: error: ") and err.strip().count("\n") == 0 and message in err


def test_missing_model_through_subprocess_has_no_traceback(tmp_path):
    res = subprocess.run([sys.executable, "-m", "diffquant.cli", "compare", "--model", str(tmp_path / "nope"),
                          "--output-json", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.startswith("diffquant: error: model folder") and res.stderr.strip().count("\n") == 0
