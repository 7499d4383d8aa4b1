"""Layer sensitivity: quantize one layer group at a time, rank the groups by the output error each
causes alone, then grow ignored_layers greedily (worst group first) until the fully quantized run
minus the ignored groups reaches a target PSNR.

Groups come from the diffusion transformer's linear layer names: a *name* group per layer kind
inside the repeated blocks ("ff", "ff_context", "attn.to_q", "attn.add_k_proj", "proj_mlp",
"img_mlp", ...) and a *block* group per block ("transformer_blocks.0",
"single_transformer_blocks.3"). Each group's pattern is a valid ignored_layers pattern. Variants
are made with `quantize_` on a copy of the loaded bf16 transformer, so the model loads once.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from diffquant.quantization import QuantizationConfig, quantize_
from diffquant.quantization.patterns import LayerMatcher
from diffquant.quantization.tools.metrics import output_metrics
from diffquant.quantization.tools.runs import output_array

GROUP_KINDS = ("names", "blocks")


@dataclass(frozen=True)
class LayerGroup:
    pattern: str
    kind: str  # "names" | "blocks"
    layers: tuple[str, ...]


def split_block(name: str) -> tuple[str | None, list[str]]:
    """'transformer_blocks.3.attn.to_q' -> ('transformer_blocks.3', ['attn', 'to_q']); no block -> None."""
    segs = name.split(".")
    for i in range(len(segs) - 1):
        if segs[i + 1].isdigit() and not segs[i].isdigit():
            return ".".join(segs[:i + 2]), segs[i + 2:]
    return None, segs


def name_key(name: str) -> str:
    """The layer kind: the first segment after the block ('ff', 'proj_mlp'), two inside attention
    ('attn.to_q', 'attn.to_out'); a layer outside the blocks is its own kind."""
    block, rest = split_block(name)
    if block is None or not rest:
        return name
    if "attn" in rest[0] and len(rest) > 1:
        return f"{rest[0]}.{rest[1]}"
    return rest[0]


def layer_groups(names: list[str], kinds: tuple[str, ...] = GROUP_KINDS) -> list[LayerGroup]:
    """Name and/or block groups over `names` (the layers that the candidate config quantizes)."""
    keys: dict[str, str] = {}
    if "names" in kinds:
        keys.update({name_key(n): "names" for n in names})
    if "blocks" in kinds:
        keys.update({b: "blocks" for n in names if (b := split_block(n)[0]) is not None})
    groups = []
    for pattern, kind in keys.items():
        matcher = LayerMatcher([pattern])
        groups.append(LayerGroup(pattern, kind, tuple(n for n in names if matcher.match(n))))
    return groups


def quantizable_layers(module: nn.Module, cfg: QuantizationConfig, keep: tuple[str, ...]) -> list[str]:
    """Linear layers `cfg` would quantize: not kept by the profile, not in cfg.ignored_layers."""
    skip = LayerMatcher([*cfg.ignored_layers, *keep])
    return [n for n, m in module.named_modules() if isinstance(m, nn.Linear) and n and skip.match(n) is None]


def run_quantized(engine, cfg: QuantizationConfig, ignored: list[str], prompt: str, params, task: str) -> np.ndarray:
    """Generate with copies of the engine's (bf16) transformers quantized with `cfg` + `ignored`."""
    cfg = dataclasses.replace(cfg, ignored_layers=tuple(dict.fromkeys([*cfg.ignored_layers, *ignored])))
    originals = {n: getattr(engine.pipe, n) for n in engine.info.transformers}
    try:
        for name, module in originals.items():
            variant = copy.deepcopy(module)
            quantize_(variant, cfg, keep_high_precision=engine.profile.keep_high_precision)
            setattr(engine.pipe, name, variant)
        return output_array(engine.generate(prompt, params), task)
    finally:
        for name, module in originals.items():
            setattr(engine.pipe, name, module)


def _psnr_key(metrics: dict[str, Any]) -> float:
    """PSNR for ranking; identical outputs (psnr None) rank as the least sensitive."""
    return math.inf if metrics["psnr_db"] is None else metrics["psnr_db"]


def rank_groups(engine, cfg, groups: list[LayerGroup], all_layers: list[str], reference: np.ndarray,
                prompt: str, params, task: str, log=None) -> list[dict[str, Any]]:
    """Quantize each group alone (everything else ignored); rows sorted worst (lowest PSNR) first."""
    rows = []
    for group in groups:
        others = [n for n in all_layers if n not in group.layers]
        m = output_metrics(reference, run_quantized(engine, cfg, others, prompt, params, task))
        rows.append({"pattern": group.pattern, "kind": group.kind, "layers": len(group.layers),
                     **{k: m[k] for k in ("psnr_db", "ssim", "mae", "relative_l2", "cosine_similarity")}})
        if log:
            log(f"  {group.pattern:<40} {len(group.layers):>3} layers  psnr {_fmt(m['psnr_db'])} dB")
    return sorted(rows, key=lambda r: _psnr_key(r))


def _fmt(v: float | None) -> str:
    return "inf (identical)" if v is None else f"{v:.2f}"


def greedy_ignored_layers(engine, cfg, ranking: list[dict[str, Any]], groups: list[LayerGroup], all_layers: list[str],
                          reference: np.ndarray, target_psnr: float, prompt: str, params, task: str,
                          log=None) -> dict[str, Any]:
    """Add the worst remaining group to ignored_layers until the candidate reaches `target_psnr`."""
    by_pattern = {g.pattern: set(g.layers) for g in groups}
    chosen: list[str] = []
    covered: set[str] = set()
    m = output_metrics(reference, run_quantized(engine, cfg, [], prompt, params, task))
    steps = [{"ignored_layers": [], "psnr_db": m["psnr_db"], "ssim": m["ssim"], "mae": m["mae"]}]
    for row in ranking:
        if _psnr_key(m) >= target_psnr:
            break
        layers = by_pattern[row["pattern"]]
        if layers <= covered:
            continue
        chosen.append(row["pattern"])
        covered |= layers
        if covered >= set(all_layers):
            steps.append({"ignored_layers": list(chosen), "psnr_db": None, "ssim": 1.0, "mae": 0.0,
                          "note": "every quantizable layer ignored: nothing left to quantize"})
            break
        m = output_metrics(reference, run_quantized(engine, cfg, chosen, prompt, params, task))
        steps.append({"ignored_layers": list(chosen), "psnr_db": m["psnr_db"], "ssim": m["ssim"], "mae": m["mae"]})
        if log:
            log(f"  ignore {chosen}: psnr {_fmt(m['psnr_db'])} dB")
    reached = "note" not in steps[-1] and (steps[-1]["psnr_db"] is None or steps[-1]["psnr_db"] >= target_psnr)
    return {"target_psnr_db": target_psnr, "reached": reached,
            "ignored_layers": prune_redundant(chosen, by_pattern) if reached else None, "steps": steps}


def prune_redundant(chosen: list[str], layers: dict[str, set[str]]) -> list[str]:
    """Drop patterns whose layers the other chosen patterns already cover (same ignored set, shorter
    list): e.g. "ff" after both blocks that hold the ff layers were added."""
    kept = list(chosen)
    for pattern in chosen:
        others = set().union(*(layers[p] for p in kept if p != pattern))
        if layers[pattern] <= others:
            kept.remove(pattern)
    return kept


def layer_sensitivity(engine, cfg: QuantizationConfig, reference: np.ndarray, prompt: str, params,
                      task: str = "t2i", target_psnr: float | None = None, kinds: tuple[str, ...] = GROUP_KINDS,
                      log=None) -> dict[str, Any]:
    """Rank layer groups of `engine`'s bf16 transformer(s) by the PSNR (vs `reference`, the bf16 output)
    of quantizing each alone with `cfg`; with `target_psnr`, also the greedy ignored_layers list."""
    first = getattr(engine.pipe, engine.info.transformers[0])
    all_layers = quantizable_layers(first, cfg, engine.profile.keep_high_precision)
    groups = [g for g in layer_groups(all_layers, kinds) if g.layers]
    if log:
        log(f"sensitivity: {len(groups)} groups over {len(all_layers)} quantizable layers ({cfg.method})")
    ranking = rank_groups(engine, cfg, groups, all_layers, reference, prompt, params, task, log)
    result: dict[str, Any] = {"method": cfg.method, "group_kinds": list(kinds), "quantizable_layers": len(all_layers),
                              "ranking": ranking, "groups": {g.pattern: list(g.layers) for g in groups}}
    if target_psnr is not None:
        result["greedy"] = greedy_ignored_layers(engine, cfg, ranking, groups, all_layers, reference, target_psnr,
                                                 prompt, params, task, log)
    return result


__all__ = ["GROUP_KINDS", "LayerGroup", "layer_groups", "layer_sensitivity", "name_key", "quantizable_layers",
           "split_block"]
