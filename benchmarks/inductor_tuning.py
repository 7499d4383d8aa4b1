"""Inductor heuristics for quantized diffusion transformers under torch.compile.

Dynamic per-token quantization needs the amax of each whole activation row. Inductor keeps a row
reduction "persistent" (the row stays in registers: one read of the input) only up to 1024
elements (torch/_inductor/choices.py); wider rows become a loop that reads the row once for the
statistics and again to write. DiT rows are 3072-15360 wide (FLUX's single blocks quantize
cat(attention, gelu(mlp)) rows of 15360), so the norm + quantize and gelu + quantize kernels
read their input two or three times. `WideRowReductions` raises the limit for inner (row)
reductions to 16384 elements.

A benchmark knob (bench_transformer's "+wide" variants), not a library default: on the H200 it did
not help (benchmarks/NOTES.md run 5: compiled FLUX bf16 132.4 -> 133.4 ms, fp8 106.0 ms against
102.6 without it in the previous call) and the first compile took 64-199 s.
"""

from __future__ import annotations

from torch._inductor.choices import InductorChoices
from torch._inductor.runtime.hints import ReductionHint
from torch._inductor.virtualized import V

WIDE_ROW_LIMIT = 16384


class WideRowReductions(InductorChoices):
    """Persistent row reductions up to WIDE_ROW_LIMIT elements; everything else as inductor decides."""

    @staticmethod
    def should_use_persistent_reduction(features, cooperative_reduction):
        if features.get_reduction_hint() == ReductionHint.INNER and not cooperative_reduction:
            return V.graph.sizevars.statically_known_leq(features.reduction_numel, WIDE_ROW_LIMIT)
        return InductorChoices.should_use_persistent_reduction(features, cooperative_reduction)

    @staticmethod
    def uuid() -> str:
        """Inductor's compile caches key on this (a config value must say what it changes)."""
        return f"diffquant.WideRowReductions/{WIDE_ROW_LIMIT}"


def compile_options() -> dict:
    """torch.compile options that install WideRowReductions for that compilation only."""
    return {"inductor_choices_class": WideRowReductions}
