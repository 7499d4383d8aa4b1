"""QuantizeReport: what quantize_ did to every linear layer (nothing is skipped silently)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class LayerReport:
    name: str
    action: str  # "quantized" | "kept"
    reason: str  # why kept, or why this backend
    backend: str | None
    shape: tuple[int, int]  # (out_features, in_features)
    bytes_before: int
    bytes_after: int


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


@dataclass
class QuantizeReport:
    method: str
    layers: list[LayerReport] = field(default_factory=list)
    fusions: list = field(default_factory=list)  # fusion.FusionReport per candidate pattern
    projections: list = field(default_factory=list)  # fusion.FusionReport per attention module (qkv.py)
    attention: list = field(default_factory=list)  # fusion.FusionReport per attention module (qk_rope.py)

    @property
    def quantized(self) -> list[LayerReport]:
        return [r for r in self.layers if r.action == "quantized"]

    @property
    def kept(self) -> list[LayerReport]:
        return [r for r in self.layers if r.action == "kept"]

    @property
    def bytes_before(self) -> int:
        return sum(r.bytes_before for r in self.layers)

    @property
    def bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.layers)

    @property
    def merged(self) -> int:
        """Quantized layers that q/k/v fusion merged into others: the model holds
        len(quantized) - merged QuantLinear modules."""
        return sum(f.merged for f in self.projections)

    @property
    def backends(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self.quantized:
            counts[r.backend] = counts.get(r.backend, 0) + 1
        return counts

    def summary(self) -> str:
        """One line: method, layers quantized/kept, linear weight memory before -> after, backends."""
        ratio = self.bytes_after / self.bytes_before if self.bytes_before else 1.0
        backends = ", ".join(f"{k} x{v}" for k, v in sorted(self.backends.items())) or "none"
        fused = sum(f.fused for f in self.fusions)
        fusions = f"; {fused} of {len(self.fusions)} activations fused into quantization" if self.fusions else ""
        if self.projections:
            fusions += (f"; q/k/v fused in {sum(f.fused for f in self.projections)} of {len(self.projections)} "
                        "attention modules")
        if self.attention:
            fusions += (f"; q/k RMSNorm + RoPE fused in {sum(f.fused for f in self.attention)} of "
                        f"{len(self.attention)} attention modules")
        return (f"{self.method}: {len(self.quantized)} linear layers quantized, {len(self.kept)} kept; "
                f"weights {_mib(self.bytes_before)} -> {_mib(self.bytes_after)} ({ratio:.3f}x); "
                f"backends: {backends}{fusions}")

    def table(self) -> str:
        rows = [f"{'layer':<60} {'action':<9} {'backend':<16} reason"]
        for r in self.layers:
            rows.append(f"{r.name:<60} {r.action:<9} {r.backend or '-':<16} {r.reason}")
        for f in self.fusions + self.projections + self.attention:
            rows.append(f"{f.name:<60} {'fused' if f.fused else 'not fused':<9} {f.act:<16} {f.reason}")
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.summary()

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "summary": self.summary(), "bytes_before": self.bytes_before,
                "bytes_after": self.bytes_after, "layers": [asdict(r) for r in self.layers],
                "fusions": [asdict(f) for f in self.fusions],
                "projections": [asdict(f) for f in self.projections],
                "attention": [asdict(f) for f in self.attention]}
