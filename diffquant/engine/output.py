"""Saving GenerationOutput and one-line summaries for the CLI."""

from __future__ import annotations

from pathlib import Path

from diffquant.quantization.report import QuantizeReport

_ANIMATED = (".gif", ".webp")


def _numbered(path: Path, i: int, n: int, width: int = 1) -> Path:
    return path if n == 1 else path.with_name(f"{path.stem}-{i:0{width}d}{path.suffix}")


def save_output(out, path: Path) -> list[Path]:
    """Images -> path (or path-1.png ...); videos -> animated GIF/WebP, else one PNG per frame."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if out.frames is None:
        saved = [_numbered(path, i + 1, len(out.images)) for i in range(len(out.images))]
        for image, p in zip(out.images, saved, strict=True):
            image.save(p)
        return saved
    saved = []
    for v, video in enumerate(out.frames):
        vpath = _numbered(path, v + 1, len(out.frames))
        if vpath.suffix.lower() in _ANIMATED:
            video[0].save(vpath, save_all=True, append_images=video[1:], duration=62, loop=0)
            saved.append(vpath)
            continue
        for f, frame in enumerate(video):
            fpath = vpath.with_name(f"{vpath.stem}-{f:04d}{vpath.suffix or '.png'}")
            frame.save(fpath)
            saved.append(fpath)
    return saved


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _fused(r: QuantizeReport) -> str:
    gelus = sum(f.fused for f in getattr(r, "fusions", ()))
    qkv = sum(f.fused for f in getattr(r, "projections", ()))
    rope = sum(f.fused for f in getattr(r, "attention", ()))
    parts = ([f"{gelus} GELUs fused"] if gelus else []) + ([f"q/k/v fused in {qkv} attention modules"] if qkv else [])
    parts += [f"q/k norm + RoPE fused in {rope}"] if rope else []
    return f" ({', '.join(parts)})" if parts else ""


def quantization_summary(reports: dict[str, QuantizeReport]) -> str:
    """'transformer fp8 40 quantized / 12 kept, vae fp8_weight_storage 30 / 0; weights A -> B (0.52x)'."""
    if not reports:
        return "no quantization (bf16)"
    parts = [f"{name} {r.method} {len(r.quantized)} quantized / {len(r.kept)} kept{_fused(r)}"
             for name, r in reports.items()]
    before = sum(r.bytes_before for r in reports.values())
    after = sum(r.bytes_after for r in reports.values())
    ratio = after / before if before else 1.0
    return f"{', '.join(parts)}; layer weights {_mib(before)} -> {_mib(after)} ({ratio:.2f}x)"


def generation_summary(reports: dict[str, QuantizeReport], out, elapsed: float, saved: list[Path]) -> str:
    """The CLI's one line: method, layers quantized/kept, weight memory before -> after, time, files."""
    t = out.timings
    steps = f" ({int(t['steps'])} steps)" if "steps" in t else ""
    peak = f"; peak {_mib(out.peak_memory_bytes)} ({out.peak_memory_kind})" if out.peak_memory_bytes else ""
    where = saved[0] if len(saved) == 1 else f"{len(saved)} files ({saved[0]} ...)"
    return (f"{quantization_summary(reports)}; load+quantize {t.get('load_s', 0) + t.get('quantize_s', 0):.1f}s, "
            f"generate {t.get('generate_s', 0):.1f}s{steps}, total {elapsed:.1f}s{peak}; saved {where}")
