"""Low-overhead launches of already-compiled Triton kernels (the eager path's hot loop).

`kernel[grid](*args)` re-binds and re-specializes every argument in Python and reads Triton's
knobs on each call: measured 40 us of CPU per launch on the H200 host (79 us through an
autotuner), against ~10-100 us of GPU work per FLUX linear, so eager quantized models were
CPU-bound. The first launch for a specialization goes through Triton as usual (compile,
autotune); later ones call the compiled kernel's C launcher directly (`CompiledKernel.run`, the
same call `JITFunction.run` ends in).

The cache key determines Triton's specialization of the arguments: tensors by dtype and 16-byte
alignment, every other argument by value (`spec_key`).
Under Triton's interpreter (TRITON_INTERPRET=1) nothing is cached and every launch is plain.

On by default since session 9. History: off since run 3, where GPU tests of the 2-, 4- and
8-rows-per-program quantize kernels returned wrong values with it; run 9b
(DIFFQUANT_TRITON_DIRECT_LAUNCH=1) failed the same way on the 1-row kernel after other tests had
run other row widths. The cause was this key: integers were keyed by divisibility like Triton's
runtime arguments, so two BLOCK_K / ROWS constexprs that are both multiples of 16 shared one
compiled kernel. Integers are now keyed by value. The environment variable
DIFFQUANT_TRITON_DIRECT_LAUNCH=0/1 overrides the default (ENABLED below).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch


def spec_key(args: Sequence[Any]) -> tuple:
    """A key that determines Triton's specialization of a kernel for these positional arguments:
    tensors by dtype and 16-byte alignment, every other argument by value. Integers go in by value
    because this key cannot tell a constexpr (BLOCK, ROWS: part of the compiled kernel) from a
    runtime integer (M, strides: Triton specializes those on ==1 and divisibility by 16 only);
    keying both by divisibility made kernels compiled for one BLOCK_K run for another (run 9b:
    wrong codes). A new integer value costs one ordinary launch through Triton (no recompile:
    Triton's own cache answers), later launches with it are direct."""
    return tuple((a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else a for a in args)


ENABLED = os.environ.get("DIFFQUANT_TRITON_DIRECT_LAUNCH", "1") == "1"


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
