"""Shared benchmark helpers: CUDA-event timing, ceilings, environment record, result files."""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"


def time_cuda(fn, *, warmup: int = 3, reps: int = 10, inner: int = 1) -> dict[str, float]:
    """Median/min/max milliseconds of `fn()` over `reps` timed runs of `inner` calls each (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return {"ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "reps": reps}


def sqnr_db(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    noise = (out.double() - ref).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    return float("inf") if noise == 0 else 10 * torch.log10(torch.tensor(signal / noise)).item()


def measure_ceilings() -> dict[str, float]:
    """Device copy bandwidth (TB/s, read + write) and 8192^3 GEMM rates (TFLOP/s) on random data."""
    dev = "cuda"
    src = torch.empty(2**29, dtype=torch.uint8, device=dev).random_()  # 512 MiB
    dst = torch.empty_like(src)
    t = time_cuda(lambda: dst.copy_(src), warmup=3, reps=20)["ms"]
    out = {"copy_TBps": 2 * src.numel() / t / 1e9}
    n = 8192
    flop = 2 * n**3
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    out["bf16_TFLOPs"] = flop / time_cuda(lambda: a @ b.t(), reps=20)["ms"] / 1e9
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
    one = torch.ones((), device=dev)
    out["fp8_tensorwise_TFLOPs"] = flop / time_cuda(
        lambda: torch._scaled_mm(a8, b8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16), reps=20
    )["ms"] / 1e9
    ai = torch.randint(-127, 128, (n, n), device=dev, dtype=torch.int8)
    bi = torch.randint(-127, 128, (n, n), device=dev, dtype=torch.int8)
    out["int8_int_mm_TOPs"] = flop / time_cuda(lambda: torch._int_mm(ai, bi.t()), reps=20)["ms"] / 1e9
    return out


def _commit() -> str:
    """The commit the tree was copied from: on the device machine ($OUT set) `.device_commit`
    (written by hand before a device call and carried with it: the device's own git metadata can
    lag behind the copied tree), else git, else $DIFFQUANT_COMMIT. (Read locally, a stamp left from
    the last device call would mislabel a local run.)"""
    stamp = Path(__file__).resolve().parent.parent / ".device_commit"
    if os.environ.get("OUT") and stamp.is_file():
        return stamp.read_text().strip()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    return commit or os.environ.get("DIFFQUANT_COMMIT", "unknown")


def environment(argv: list[str] | None = None) -> dict[str, Any]:
    commit = _commit()
    env: dict[str, Any] = {
        "commit": commit,
        "command": " ".join(shlex.quote(a) for a in (argv or ["python"] + sys.argv)),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    for mod in ("triton", "diffusers", "torchao"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional packages
            env[mod] = None
    return env


def write_results(name: str, data: dict[str, Any], markdown: str, out_dir: str | Path | None = None) -> Path:
    folder = Path(out_dir) if out_dir else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(data, indent=1, default=str))
    (folder / f"{name}.md").write_text(markdown)
    return folder / f"{name}.md"


def md_table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.1f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"
