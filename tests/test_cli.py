"""The CLI through a subprocess, as a user runs it."""

from __future__ import annotations

import subprocess
import sys


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diffquant.cli", *args], capture_output=True, text=True, timeout=300)


def test_demo_reports_and_sqnr():
    res = _cli("demo", "--quantization", "int8", "--ignored-layers", "ff", "-v")
    assert res.returncode == 0, res.stderr
    assert "int8: " in res.stdout and "linear layers quantized" in res.stdout
    assert "transformer_blocks.0.ff.net.2" in res.stdout and "ignored_layers 'ff'" in res.stdout
    sqnr = float(res.stdout.split("SQNR vs bf16")[1].split(":")[1].split("dB")[0])
    assert sqnr > 25


def test_bad_method_is_one_line_error():
    res = _cli("demo", "--quantization", "fp9")
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "unknown quantization method 'fp9'" in res.stderr
    assert "Traceback" not in res.stderr


def test_typo_pattern_is_one_line_error():
    res = _cli("demo", "--ignored-layers", "ff_contxt")
    assert res.returncode == 2 and "'ff_contxt' matches no linear layer" in res.stderr
    assert "ff_context" in res.stderr and "Traceback" not in res.stderr
