"""`import diffquant` must not touch CUDA (DESIGN decision 7) and must stay quick."""

from __future__ import annotations

import subprocess
import sys

PROBE = r"""
import sys, time, torch
calls = []
for name in ("is_available", "device_count", "get_device_capability", "init", "current_device"):
    orig = getattr(torch.cuda, name)
    setattr(torch.cuda, name, (lambda n, f: lambda *a, **k: calls.append(n) or f(*a, **k))(name, orig))
t = time.perf_counter()
import diffquant
from diffquant import build_quant_config, quantize_
build_quant_config("fp8")
print(len(calls), round(time.perf_counter() - t, 3), torch.cuda.is_initialized(), "diffusers" in sys.modules)
"""


def test_import_touches_no_cuda_and_is_fast():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout.split()
    calls, seconds, initialized, diffusers = int(out[0]), float(out[1]), out[2], out[3]
    assert calls == 0 and initialized == "False"
    assert diffusers == "False", "import diffquant imported diffusers (~3 s): import it where it is used"
    assert seconds < 5.0, f"import diffquant took {seconds}s after torch"
