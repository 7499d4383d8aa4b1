"""`diffquant generate` and `diffquant info` through a subprocess, as a user runs them; the error
paths in-process through main() (same code, no interpreter start-up per case)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from PIL import Image

from diffquant.cli import main


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diffquant.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_generate_positional_prompt_fp8(tiny_pipeline, tmp_path):
    out = tmp_path / "out.png"
    res = _cli("generate", "a red circle", "--model", str(tiny_pipeline("qwen-image")), "--quantization", "fp8",
               "--ignored-layers", "img_mlp", "--steps", "2", "--height", "32", "--width", "32", "--seed", "5",
               "-o", str(out))
    assert res.returncode == 0, res.stderr
    summary = res.stdout.strip().splitlines()
    assert len(summary) == 1
    line = summary[0]
    assert "transformer fp8" in line and "quantized" in line and "kept" in line and "->" in line
    assert "(2 steps)" in line and str(out) in line
    assert "Traceback" not in res.stderr
    assert Image.open(out).size == (32, 32)


def test_info(tiny_pipeline):
    res = _cli("info", str(tiny_pipeline("wan2.2-t2v-a14b")))
    assert res.returncode == 0, res.stderr
    assert "profile: wan2.2-a14b" in res.stdout and "transformer_2" in res.stdout
    assert "UMT5EncoderModel" in res.stdout and "total weights" in res.stdout


def test_error_is_one_line_exit_2_through_subprocess(tmp_path):
    res = _cli("generate", "--model", str(tmp_path / "nope"), "--prompt", "x")
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and res.stderr.startswith("diffquant: error: ")
    assert "does not exist" in res.stderr


@pytest.mark.parametrize("args,message", [
    (["generate", "a red circle", "-q", "fp8", "--ignored-layers", "ff_contxt"], "matches no linear layer"),
    (["generate", "x", "--model", "{tmp}"], "not a diffusers pipeline folder"),
    (["generate", "x", "--model", "{zimage}", "-q", "fp9"], "unknown quantization method 'fp9'"),
    (["generate", "x", "--model", "{zimage}", "--quantization-config", '{"text_encoder_3": "fp8"}'],
     "component 'text_encoder_3'"),
    (["generate", "x", "--model", "{zimage}", "--ignored-layers", "img_mlp"], "--ignored-layers needs"),
    (["generate", "x", "--model", "{zimage}", "--quantization-config", "{bad"], "not valid JSON"),
    (["generate", "x", "--steps", "two"], "invalid int value"),
    (["info", "{tmp}"], "not a diffusers pipeline folder"),
])
def test_errors_in_process(tiny_pipeline, tmp_path, capsys, args, message):
    args = [a.replace("{tmp}", str(tmp_path)).replace("{zimage}", str(tiny_pipeline("z-image"))) for a in args]
    capsys.readouterr()  # drop the fixture's own output (save_pretrained progress)
    try:
        rc = main(args)
    except SystemExit as e:  # argparse usage errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert err.startswith("diffquant: error: ") and err.strip().count("\n") == 0


def test_quantization_config_from_file(tiny_pipeline, tmp_path, capsys):
    cfg = tmp_path / "q.json"
    cfg.write_text('{"transformer": {"method": "int8"}, "vae": "fp8"}')
    out = tmp_path / "img.png"
    rc = main(["generate", "--prompt", "x", "--model", str(tiny_pipeline("z-image")), "--quantization-config", str(cfg),
               "--steps", "2", "--height", "32", "--width", "32", "--quiet", "-o", str(out)])
    line = capsys.readouterr().out.strip()
    assert rc == 0 and "transformer int8" in line and "vae fp8_weight_storage" in line and out.exists()


def test_video_saved_as_animated_gif(tiny_pipeline, tmp_path, capsys):
    out = tmp_path / "clip.gif"
    rc = main(["generate", "a red circle", "--model", str(tiny_pipeline("wan2.2-t2v-a14b")), "-q", "int8", "--steps",
               "2", "--height", "16", "--width", "16", "--frames", "5", "--quiet", "-o", str(out)])
    line = capsys.readouterr().out.strip()
    assert rc == 0 and "transformer int8" in line and "transformer_2 int8" in line
    with Image.open(out) as gif:
        assert gif.n_frames == 5 and gif.size == (16, 16)
