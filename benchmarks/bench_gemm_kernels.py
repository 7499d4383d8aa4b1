"""W8A8 GEMM kernels alone (activation already quantized) at the FLUX.1-dev 1024^2 shapes.

Compares, per shape and summed over one FLUX forward (418 quantized linears: the count of each
shape below): bf16 F.linear; FP8 `torch._scaled_mm` row-wise with and without fast accumulation;
our Triton W8A8 kernels (the classic tiled one and the persistent TMA one, every TMA config) for
int8 and fp8; `torch._int_mm` + the scales. Checks: the TMA int8 kernel is bit-identical to the
classic kernel (same epilogue arithmetic on exact int32 sums); every variant's relative error vs
the float64 product of the dequantized operands.

    python benchmarks/bench_gemm_kernels.py [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import environment, md_table, write_results  # noqa: E402
from diffquant.quantization import numerics as nx  # noqa: E402
from diffquant.quantization.kernels import triton_gemm, triton_ops  # noqa: E402

# (M, K, N, linears of this shape in one FLUX.1-dev forward at 1024^2)
FLUX_SHAPES = [
    (4096, 3072, 3072, 76), (4096, 3072, 12288, 19), (4096, 12288, 3072, 19),
    (512, 3072, 3072, 76), (512, 3072, 12288, 19), (512, 12288, 3072, 19),
    (4608, 3072, 3072, 114), (4608, 3072, 12288, 38), (4608, 15360, 3072, 38),
]


def _bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def _variants(x, w, bias):
    """name -> (fn, fmt | None); operands quantized once up front."""
    xq8, xs8 = nx.int8_quantize_per_row(x)
    wq8, ws8 = nx.int8_quantize_per_row(w)
    xqf, xsf = nx.fp8_quantize_per_row(x)
    wqf, wsf = nx.fp8_quantize_per_row(w)
    wtf, sbf = wqf.t(), wsf.reshape(1, -1)
    out = {"bf16 F.linear": (lambda: F.linear(x, w, bias), None)}
    for fast in (False, True):
        out[f"fp8 scaled_mm fast_accum={fast}"] = (
            lambda fast=fast: torch._scaled_mm(xqf, wtf, scale_a=xsf, scale_b=sbf, bias=bias,
                                               out_dtype=torch.bfloat16, use_fast_accum=fast), "fp8")
    for fmt, (xq, xs, wq, ws) in (("int8", (xq8, xs8, wq8, ws8)), ("fp8", (xqf, xsf, wqf, wsf))):
        out[f"{fmt} triton classic"] = (
            lambda a=(xq, xs, wq, ws): triton_gemm.w8a8_scaled_mm(*a, bias, kernel="classic"), fmt)
        for i, cfg in enumerate(triton_gemm.TMA_CONFIGS):
            out[f"{fmt} triton tma#{i}"] = (
                lambda a=(xq, xs, wq, ws), cfg=cfg: triton_gemm.w8a8_scaled_mm_tma(*a, bias, config=cfg), fmt)
    if x.shape[0] > 16:
        out["int8 _int_mm + scales"] = (
            lambda: (torch._int_mm(xq8, wq8.t()) * xs8 * ws8.reshape(1, -1) + bias).to(torch.bfloat16), "int8")
    ops = {"int8": (xq8, xs8, wq8, ws8), "fp8": (xqf, xsf, wqf, wsf)}
    return out, ops


def bench_shape(m, k, n, count, g) -> list[dict]:
    x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
    w = (torch.randn(n, k, device="cuda", generator=g) / k**0.5).to(torch.bfloat16)
    bias = (torch.randn(n, device="cuda", generator=g) * 0.1).to(torch.bfloat16)
    variants, ops = _variants(x, w, bias)
    refs = {fmt: triton_ops._mm_ref(*o, bias, torch.float64) for fmt, o in ops.items()}
    refs[None] = F.linear(x.double(), w.double(), bias.double())
    rows, outs = [], {}
    for name, (fn, fmt) in variants.items():
        try:
            out = fn()
            ms = _bench(fn)
        except Exception as e:  # noqa: BLE001 - a config that does not compile is a result too
            rows.append(dict(M=m, K=k, N=n, variant=name, error=f"{type(e).__name__}: {str(e)[:200]}"))
            print(f"{m}x{k}x{n} {name}: {rows[-1]['error']}", flush=True)
            continue
        outs[name] = out
        rel = ((out.double() - refs[fmt]).norm() / refs[fmt].norm()).item()
        rows.append(dict(M=m, K=k, N=n, count=count, variant=name, ms=ms, TFLOPs=2 * m * k * n / ms / 1e9,
                         rel_err=rel))
        print(f"{m}x{k}x{n} {name:34s} {ms:.4f} ms {rows[-1]['TFLOPs']:7.1f} TF/s rel {rel:.2e}", flush=True)
    classic = outs.get("int8 triton classic")
    for r in rows:
        if r["variant"].startswith("int8 triton tma") and r["variant"] in outs and classic is not None:
            r["bit_equal_classic"] = bool(torch.equal(outs[r["variant"]], classic))
    return rows


def per_forward(rows) -> list[dict]:
    """Sum of count x ms over the FLUX shapes, per variant; the best TMA config per shape as its own row."""
    total: dict[str, float] = {}
    for r in rows:
        if "ms" in r:
            total[r["variant"]] = total.get(r["variant"], 0.0) + r["count"] * r["ms"]
    for fmt in ("int8", "fp8"):
        best = 0.0
        for m, k, n, count in FLUX_SHAPES:
            cands = [r["ms"] for r in rows if "ms" in r and (r["M"], r["K"], r["N"]) == (m, k, n)
                     and r["variant"].startswith(f"{fmt} triton tma")]
            best += count * min(cands) if cands else float("nan")
        total[f"{fmt} triton tma (best config per shape)"] = best
    return [dict(variant=v, flux_forward_gemm_ms=t) for v, t in sorted(total.items(), key=lambda kv: kv[1])]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for m, k, n, count in FLUX_SHAPES:
        rows += bench_shape(m, k, n, count, g)
    totals = per_forward(rows)
    env = environment()
    md = (f"# W8A8 GEMM kernels at FLUX.1-dev shapes\n\n`{env['command']}`\n\n"
          f"commit {env['commit']}, {env.get('gpu')}, torch {env['torch']}, triton {env['triton']}; "
          "triton.testing.do_bench medians (L2 flushed).\n\n"
          "## Summed over one FLUX forward (418 linears)\n\n" + md_table(totals, ["variant", "flux_forward_gemm_ms"])
          + "\n\n## Per shape\n\n"
          + md_table(rows, ["M", "K", "N", "variant", "ms", "TFLOPs", "rel_err", "bit_equal_classic", "error"]))
    path = write_results("bench_gemm_kernels", dict(env=env, rows=rows, totals=totals), md, args.out)
    print(md_table(totals, ["variant", "flux_forward_gemm_ms"]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
