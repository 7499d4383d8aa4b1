"""Evaluate the embedded model: prompt following in bf16, fp8 and int8, and PSNR vs bf16.

    python scripts/eval_tiny_model.py                      # 48 prompts, CPU, writes a JSON + table
    python scripts/eval_tiny_model.py --num-prompts 96 --output-json out.json

Prompts are drawn with diffquant.tiny.evaluate.EVAL_SEED, which training never uses. Each image is
classified by pixel analysis (diffquant.tiny.shapes.classify).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from diffquant.tiny.evaluate import EVAL_SEED, FIELDS, accuracy, eval_prompts, generate, mean_psnr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="pipeline folder (default: the embedded model)")
    ap.add_argument("--num-prompts", type=int, default=48)
    ap.add_argument("--seed", type=int, default=EVAL_SEED)
    ap.add_argument("--steps", type=int, default=None, help="default: the model's")
    ap.add_argument("--methods", default="bf16,fp8,int8")
    ap.add_argument("--true-cfg-scale", type=float, default=None, help="default: the model's (no guidance)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--output-json", default=None)
    args = ap.parse_args()

    from diffquant import Engine

    attrs = eval_prompts(args.num_prompts, args.seed)
    rows, ref = [], None
    for method in args.methods.split(","):
        t0 = time.perf_counter()
        engine = Engine(args.model, quantization=None if method == "bf16" else method, device=args.device)
        images = generate(engine, attrs, args.steps, true_cfg_scale=args.true_cfg_scale)
        row = {"method": method, **accuracy(images, attrs), "seconds": round(time.perf_counter() - t0, 1)}
        ref = images if ref is None else ref
        row["psnr_vs_bf16_db"] = None if method == "bf16" else round(mean_psnr(ref, images), 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    header = "| method | " + " | ".join(FIELDS) + " | PSNR vs bf16 (dB) |"
    lines = [header, "|" + "---|" * (len(FIELDS) + 2)]
    for r in rows:
        cells = " | ".join(f"{100 * r[f]:.1f}%" for f in FIELDS)
        lines.append(f"| {r['method']} | {cells} | {r['psnr_vs_bf16_db'] or '-'} |")
    table = "\n".join(lines)
    print(table)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"num_prompts": args.num_prompts, "seed": args.seed, "device": args.device,
                       "true_cfg_scale": args.true_cfg_scale, "model": args.model or "embedded",
                       "torch": torch.__version__, "rows": rows, "table": table}, f, indent=2)


if __name__ == "__main__":
    main()
