"""Saved outputs: reference / candidate files and a side-by-side PNG
(reference | candidate | |difference| x amplification)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

AMPLIFY = 8  # the difference panel shows |ref - cand| * 8 (clipped at 255): small errors become visible


def side_by_side(reference: np.ndarray, candidate: np.ndarray, amplify: int = AMPLIFY) -> np.ndarray:
    """`[H, W, 3]` uint8 pair -> `[H, 3W + 8, 3]`: the two images and the amplified difference."""
    diff = np.abs(reference.astype(np.int16) - candidate.astype(np.int16)) * amplify
    gap = np.full((reference.shape[0], 4, 3), 255, np.uint8)
    return np.concatenate([reference, gap, candidate, gap, np.clip(diff, 0, 255).astype(np.uint8)], axis=1)


def save_outputs(folder: str | Path, reference, candidate, ref_array: np.ndarray, cand_array: np.ndarray,
                 task: str) -> dict[str, list[str] | str | int]:
    """Write reference / candidate outputs (PNG, or animated GIF for video) and the side-by-side PNG
    (the middle frame for video). Returns the paths for the JSON."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gif" if task == "t2v" else ".png"
    ref_paths = reference.save(folder / f"reference{suffix}")
    cand_paths = candidate.save(folder / f"candidate{suffix}")
    mid = len(ref_array) // 2
    pair = (ref_array, cand_array) if task == "t2i" else (ref_array[mid], cand_array[mid])
    sbs = folder / "side_by_side.png"
    Image.fromarray(side_by_side(*pair)).save(sbs)
    return {"reference": [str(p) for p in ref_paths], "candidate": [str(p) for p in cand_paths],
            "side_by_side": str(sbs), "difference_amplification": AMPLIFY}


__all__ = ["AMPLIFY", "save_outputs", "side_by_side"]
