"""Layer-name patterns for ignored_layers (DESIGN decision 4).

A pattern matches a qualified layer name when:
- it equals a whole dotted run of the name's segments ("img_mlp" matches
  "transformer_blocks.3.img_mlp.net.2"; "to_q" does not match "to_qkv"), each segment may use
  `*` / `?` globs ("transformer_blocks.*.attn.to_out");
- or, with a "re:" prefix, the regex searches the name ("re:blocks\\.(0|1)\\.");
- fused names expand to their parts: "to_qkv" also matches to_q / to_k / to_v.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Iterable

FUSED_NAMES = {
    "to_qkv": ("to_q", "to_k", "to_v"),
    "to_kv": ("to_k", "to_v"),
    "add_qkv_proj": ("add_q_proj", "add_k_proj", "add_v_proj"),
    "add_kv_proj": ("add_k_proj", "add_v_proj"),
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "qkv": ("q", "k", "v"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


def _segments_match(pattern: list[str], name: list[str]) -> bool:
    span = len(pattern)
    for start in range(len(name) - span + 1):
        if all(fnmatch.fnmatchcase(name[start + i], pattern[i]) for i in range(span)):
            return True
    return False


def _expansions(pattern: str) -> list[list[str]]:
    """All segment lists the pattern stands for, after fused-name expansion."""
    out: list[list[str]] = [[]]
    for seg in pattern.split("."):
        alts = (seg, *FUSED_NAMES.get(seg, ()))
        out = [prefix + [alt] for prefix in out for alt in alts]
    return out


class LayerMatcher:
    """Compiled pattern list; `match(name)` returns the first pattern that matches, or None."""

    def __init__(self, patterns: Iterable[str]):
        self.patterns = list(patterns)
        self._compiled = [self._compile(p) for p in self.patterns]

    @staticmethod
    def _compile(pattern: str):
        if pattern.startswith("re:"):
            try:
                regex = re.compile(pattern[3:])
            except re.error as e:
                raise ValueError(f"invalid regex in layer pattern {pattern!r}: {e}") from None
            return lambda name: regex.search(name) is not None
        if not pattern or any(not seg for seg in pattern.split(".")):
            raise ValueError(f"invalid layer pattern {pattern!r}: empty dotted segment")
        alternatives = _expansions(pattern)
        return lambda name: any(_segments_match(alt, name.split(".")) for alt in alternatives)

    def match(self, name: str) -> str | None:
        for pattern, fn in zip(self.patterns, self._compiled, strict=True):
            if fn(name):
                return pattern
        return None

    def unmatched(self, names: Iterable[str]) -> list[str]:
        names = list(names)
        return [p for p, fn in zip(self.patterns, self._compiled, strict=True) if not any(fn(n) for n in names)]


def close_names(pattern: str, names: Iterable[str], n: int = 5) -> list[str]:
    """Layer names (and their segments) that look like a typo'd pattern, for error messages."""
    names = list(names)
    pool = set(names)
    for name in names:
        segs = name.split(".")
        pool.update(segs)
        pool.update(".".join(segs[i:i + 2]) for i in range(len(segs) - 1))
    pool = {p for p in pool if not p.isdigit()}
    key = pattern.removeprefix("re:")
    return difflib.get_close_matches(key, sorted(pool), n=n, cutoff=0.5)


def check_all_match(patterns: list[str], names: list[str], what: str = "ignored_layers") -> LayerMatcher:
    """Compile patterns; a pattern that matches none of `names` is a ValueError with suggestions."""
    matcher = LayerMatcher(patterns)
    missing = matcher.unmatched(names)
    if missing:
        hint = close_names(missing[0], names)
        near = f"; close layer names: {', '.join(hint)}" if hint else f"; e.g. {', '.join(names[:3])}"
        raise ValueError(f"{what} pattern {missing[0]!r} matches no linear layer{near}")
    return matcher
