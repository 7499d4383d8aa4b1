"""FP8 attention's quality on the embedded trained model (CPU, the kernel's float32 emulation).

For each prompt and seed: bf16, fp8 linears, FP8 attention alone and both, each image's PSNR against
bf16 (same prompt, seed, steps). FP8 attention goes through `use_fp8_attention` (every attention
call of the embedded FLUX-architecture transformer; on the CPU `numerics.fp8_attention_emulated`,
the GPU kernel's blocks, P rounding and online softmax).

    python benchmarks/eval_fp8_attention_cpu.py [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import environment, md_table, write_results  # noqa: E402
from diffquant import Engine, SamplingParams  # noqa: E402
from diffquant.quantization.attention import use_fp8_attention  # noqa: E402
from diffquant.quantization.metrics import psnr_db  # noqa: E402

PROMPTS = ["a large red circle in the center on a white background",
           "a small blue square at the left on a yellow background",
           "a green triangle at the top on a black background"]


def _pixels(out) -> torch.Tensor:
    return torch.tensor(list(out.images[0].getdata()), dtype=torch.float64)


def _with_fp8_attention(engine: Engine, prompt: str, params: SamplingParams) -> tuple[torch.Tensor, int, int]:
    patch = use_fp8_attention(engine.pipe.transformer)
    try:
        return _pixels(engine.generate(prompt, params)), patch.fp8_calls, patch.kept_calls
    finally:
        patch.restore()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1])
    args = ap.parse_args(argv)
    bf16, fp8 = Engine(model=None, device="cpu"), Engine(model=None, quantization="fp8", device="cpu")
    rows = []
    for seed in args.seeds:
        for prompt in PROMPTS:
            params = SamplingParams(seed=seed)
            ref = _pixels(bf16.generate(prompt, params))
            attn_only, calls, kept = _with_fp8_attention(bf16, prompt, params)
            both, _, _ = _with_fp8_attention(fp8, prompt, params)
            linears = _pixels(fp8.generate(prompt, params))
            rows.append(dict(prompt=prompt, seed=seed, fp8_linears_psnr_db=psnr_db(ref, linears),
                             fp8_attention_psnr_db=psnr_db(ref, attn_only), both_psnr_db=psnr_db(ref, both),
                             attention_calls=calls, kept_calls=kept))
            print(rows[-1], flush=True)
    env = environment()
    md = (f"# FP8 attention on the embedded model (CPU emulation of the kernel)\n\n`{env['command']}`\n\n"
          f"commit {env['commit']}, torch {env['torch']}; 64x64, the model's default 8 steps; PSNR of the "
          "decoded image against bf16 with the same prompt and seed.\n\n" + md_table(rows, list(rows[0])))
    path = write_results("eval_fp8_attention_cpu", dict(env=env, rows=rows), md, args.out)
    print(md)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
