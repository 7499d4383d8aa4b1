"""`diffquant info DIR`: a pipeline folder's components, profile and weight sizes, read from the
safetensors headers (no weight is loaded)."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from diffquant.engine.loading import read_pipeline_info

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
                "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8}


@dataclass
class ComponentInfo:
    name: str
    library: str
    cls: str
    params: int | None  # None: no safetensors weights (tokenizer, scheduler, or .bin)
    nbytes: int | None
    role: str


def _header(path: Path) -> dict:
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def safetensors_size(folder: Path) -> tuple[int, int] | None:
    """(parameter count, bytes) over every *.safetensors file in `folder`, or None if there is none."""
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return None
    params = nbytes = 0
    for file in files:
        for key, entry in _header(file).items():
            if key == "__metadata__":
                continue
            numel = 1
            for d in entry["shape"]:
                numel *= d
            params += numel
            nbytes += numel * _DTYPE_BYTES.get(entry["dtype"], 0)
    return params, nbytes


def _role(name: str, transformers: list[str]) -> str:
    if name in transformers:
        return "diffusion transformer (quantized by default)"
    if "vae" in name or "text_encoder" in name or "image_encoder" in name:
        return "encoder/decoder (fp8 weight storage on request)"
    return ""


def pipeline_components(model: str | Path) -> tuple[object, list[ComponentInfo]]:
    info = read_pipeline_info(model, warn=False)
    rows = []
    for name, (lib, cls) in info.components.items():
        size = safetensors_size(info.folder / name)
        params, nbytes = size if size else (None, None)
        rows.append(ComponentInfo(name, lib, cls, params, nbytes, _role(name, info.transformers)))
    return info, rows


def _fmt_params(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,}"


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def info_text(model: str | Path) -> str:
    info, rows = pipeline_components(model)
    p = info.profile
    lines = [f"pipeline: {info.index.get('_class_name', '?')} ({info.folder})",
             f"profile: {p.name} ({p.display_name}); diffusion transformers: {', '.join(info.transformers) or '-'}",
             f"kept high precision by default: {', '.join(p.keep_high_precision)}"]
    if p.recommended_ignored_layers:
        lines.append(f"recommended ignored_layers: {', '.join(p.recommended_ignored_layers)}")
    lines.append(f"{'component':<16} {'class':<40} {'params':>10} {'bytes':>12}  role")
    for r in rows:
        lines.append(f"{r.name:<16} {r.cls:<40} {_fmt_params(r.params):>10} {_fmt_bytes(r.nbytes):>12}  {r.role}")
    total = sum(r.nbytes or 0 for r in rows)
    lines.append(f"total weights: {_fmt_bytes(total)}")
    return "\n".join(lines)
