"""Low-overhead launches of already-compiled Triton kernels (the eager path's hot loop).

`kernel[grid](*args)` re-binds and re-specializes every argument in Python and reads Triton's
knobs on each call: measured 40 us of CPU per launch on the H200 host (79 us through an
autotuner), against ~10-100 us of GPU work per FLUX linear, so eager quantized models were
CPU-bound. The first launch for a specialization goes through Triton as usual (compile,
autotune); later ones call the compiled kernel's C launcher directly (`CompiledKernel.run`, the
same call `JITFunction.run` ends in).

The cache key reproduces Triton's specialization rules for the arguments: tensors by dtype and
16-byte alignment, integers by ==1, divisibility by 16 and int32 range; constexprs by value.
Under Triton's interpreter (TRITON_INTERPRET=1) nothing is cached and every launch is plain.

OFF by default (opt in with DIFFQUANT_TRITON_DIRECT_LAUNCH=1). On the H200 (run 3,
benchmarks/NOTES.md) this path gave correct outputs for the 1-row quantize kernel and the GEMM
(bench_linear results after ~160 direct launches equal run 2's), but two GPU tests that launched
the 2-, 4- and 8-rows-per-program quantize kernels returned wrong values. The argument list is
exactly what `JITFunction.run` passes in Triton 3.6, and an 8-row kernel launched through Triton
passed once, so the cause (this path, or a race in those layouts) is not settled. The quantize
kernel no longer uses those layouts; turn this on by default once the GPU tests pass with it
(it takes FLUX int8 eager from 210 to 166 ms).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

_INT32 = 2**31


def spec_key(args: Sequence[Any]) -> tuple:
    """What Triton specializes a compiled kernel on, for these positional arguments."""
    key = []
    for a in args:
        if isinstance(a, torch.Tensor):
            key.append((a.dtype, a.data_ptr() % 16 == 0))
        elif isinstance(a, bool) or a is None or isinstance(a, float):
            key.append(a)
        elif isinstance(a, int):
            key.append((a == 1, a % 16 == 0, -_INT32 <= a < _INT32))
        else:
            key.append(a)
    return tuple(key)


ENABLED = os.environ.get("DIFFQUANT_TRITON_DIRECT_LAUNCH", "0") == "1"


class LaunchCache:
    """Compiled kernels by key; `launch` falls back to `first(...)` (a normal Triton launch that
    returns the CompiledKernel) the first time a key is seen."""

    def __init__(self) -> None:
        self.kernels: dict[tuple, Any] = {}

    def launch(self, key: tuple, grid: tuple[int, int, int], args: Sequence[Any], device: torch.device,
               first: Callable[[], Any]) -> None:
        ck = self.kernels.get(key) if ENABLED else None
        if ck is None:
            ck = first()
            if ck is not None and hasattr(ck, "packed_metadata"):  # None under the interpreter
                self.kernels[key] = ck
            return
        stream = torch._C._cuda_getCurrentRawStream(device.index)
        ck.run(grid[0], grid[1], grid[2], stream, ck.function, ck.packed_metadata, None, None, None, *args)
