"""Linear-layer benchmark at real DiT GEMM shapes: bf16 F.linear vs quantized QuantLinear backends.

Every quantized time includes the dynamic per-token activation quantization (the whole
QuantLinear forward). Reports ms, TFLOP/s, % of the measured ceiling (8192^3 GEMM of the same
dtype; bf16 for bf16, fp8 tensor-wise torch._scaled_mm for fp8, max(int8 GEMM seen) for int8) and
the error vs the float64 linear of the unquantized operands (relative L2 and SQNR).

    python benchmarks/bench_linear.py [--models flux1-dev qwen-image wan2.2] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import environment, md_table, measure_ceilings, sqnr_db, time_cuda, write_results  # noqa: E402
from diffquant.quantization import quantize_  # noqa: E402
from diffquant.quantization.kernels import triton_ops  # noqa: E402

# (layer, M tokens, K in, N out); M = tokens of one denoising forward at the model's usual size.
SHAPES = {
    "flux1-dev": [  # 1024x1024: 4096 image + 512 text tokens, hidden 3072, MLP 12288
        ("attn.to_q/k/v/out (joint)", 4608, 3072, 3072),
        ("ff.net.0 (img)", 4096, 3072, 12288),
        ("ff.net.2 (img)", 4096, 12288, 3072),
        ("single.proj_mlp", 4608, 3072, 12288),
        ("single.proj_out", 4608, 15360, 3072),
        ("ff_context (txt)", 512, 3072, 12288),
        ("norm1.linear (modulation, M=1)", 1, 3072, 18432),
    ],
    "qwen-image": [  # 1328x1328 -> 6889 image tokens; hidden 3072, MLP 12288
        ("attn.to_q/k/v (img)", 6889, 3072, 3072),
        ("img_mlp.net.0", 6889, 3072, 12288),
        ("img_mlp.net.2", 6889, 12288, 3072),
    ],
    "wan2.2": [  # A14B expert, 480p x 81 frames: 32760 tokens, hidden 5120, FFN 13824
        ("attn1.to_q/k/v/out", 32760, 5120, 5120),
        ("ffn.net.0", 32760, 5120, 13824),
        ("ffn.net.2", 32760, 13824, 5120),
        ("attn2.to_k/v (text)", 512, 5120, 5120),
    ],
}

VARIANTS = [  # (name, method, backend, fp8 gemm)
    ("bf16", None, None, None),
    ("fp8 triton-quant + scaled_mm", "fp8", "triton", "scaled_mm"),
    ("fp8 triton-quant + triton-gemm", "fp8", "triton", "triton"),
    ("fp8 eager-quant + scaled_mm", "fp8", "scaled_mm", None),
    ("int8 triton", "int8", "triton", None),
    ("int8 eager-quant + int_mm", "int8", "int_mm", None),
]


def _make(lin: torch.nn.Linear, method: str | None, backend: str | None):
    if method is None:
        return lambda x: F.linear(x, lin.weight, lin.bias)
    wrapper = torch.nn.Sequential(torch.nn.Linear(lin.in_features, lin.out_features, device="cuda",
                                                  dtype=torch.bfloat16))
    with torch.no_grad():
        wrapper[0].weight.copy_(lin.weight)
        wrapper[0].bias.copy_(lin.bias)
    quantize_(wrapper, {"method": method, "backend": backend})
    return wrapper[0]


def bench_shape(model: str, layer: str, m: int, k: int, n: int, ceilings: dict) -> list[dict]:
    g = torch.Generator(device="cuda").manual_seed(0)
    lin = torch.nn.Linear(k, n, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, device="cuda", generator=g) / k**0.5)
        lin.bias.copy_(torch.randn(n, device="cuda", generator=g) * 0.1)
    xs = [torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16) for _ in range(3)]
    ref = F.linear(xs[0].double(), lin.weight.double(), lin.bias.double())
    flop = 2 * m * k * n
    rows = []
    for name, method, backend, fp8_gemm in VARIANTS:
        fn = _make(lin, method, backend)
        if fp8_gemm:
            triton_ops.FP8_GEMM = fp8_gemm
        i = [0]

        def call(fn=fn, i=i):
            i[0] = (i[0] + 1) % len(xs)
            return fn(xs[i[0]])

        with torch.no_grad():
            t = time_cuda(call, warmup=5, reps=15, inner=10)
            out = fn(xs[0])
        triton_ops.FP8_GEMM = "scaled_mm"
        tflops = flop / t["ms"] / 1e9
        ceil = {None: ceilings["bf16_TFLOPs"], "fp8": ceilings["fp8_tensorwise_TFLOPs"],
                "int8": ceilings["int8_TOPs"]}[method]
        rel = ((out.double() - ref).norm() / ref.norm()).item()
        rows.append(dict(model=model, layer=layer, M=m, K=k, N=n, variant=name, ms=t["ms"], TFLOPs=tflops,
                         pct_ceiling=100 * tflops / ceil, rel_err=rel, sqnr_db=sqnr_db(out, ref)))
        print(f"{model:10s} {layer:32s} {name:32s} {t['ms']:.4f} ms {tflops:7.1f} TF/s rel {rel:.2e}", flush=True)
        del fn
    base = rows[0]["ms"]
    for r in rows:
        r["speedup_vs_bf16"] = base / r["ms"]
    return rows


def bench_quantize_kernels(ceilings: dict) -> list[dict]:
    """The fused quantize kernel alone vs the eager reference, as bandwidth (read bf16 + write 8-bit)."""
    from diffquant.quantization import numerics as nx

    rows = []
    for m, k in [(4608, 3072), (4608, 15360), (32760, 5120)]:
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        nbytes = m * k * 3 + m * 4
        for fmt, ref in (("fp8", nx.fp8_quantize_per_row), ("int8", nx.int8_quantize_per_row)):
            for impl, fn in (("triton fused", lambda x=x, f=fmt: triton_ops.quantize_per_token_impl(x, f)),
                             ("eager reference", lambda x=x, r=ref: r(x))):
                t = time_cuda(fn, warmup=5, reps=15, inner=10)
                tbps = nbytes / t["ms"] / 1e9
                rows.append(dict(M=m, K=k, fmt=fmt, impl=impl, ms=t["ms"], TBps=tbps,
                                 pct_copy=100 * tbps / ceilings["copy_TBps"]))
                print(f"quantize {fmt} {m}x{k} {impl:16s} {t['ms']:.4f} ms {tbps:.2f} TB/s", flush=True)
    return rows


def bench_overhead() -> list[dict]:
    """CPU time per call at a tiny shape (GPU work negligible): what eager mode pays per layer."""
    from diffquant.quantization.kernels import triton_gemm, triton_quant

    m, k, n = 16, 256, 256
    lin = torch.nn.Linear(k, n, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    xq, xs = triton_quant.quantize_per_token(x, "fp8")
    xqi, xsi = triton_quant.quantize_per_token(x, "int8")
    layers = {f"QuantLinear {meth} {be}": _make(lin, meth, be) for meth, be in
              (("fp8", "triton"), ("fp8", "scaled_mm"), ("int8", "triton"), ("int8", "int_mm"))}
    q8 = layers["QuantLinear fp8 triton"]
    qi = layers["QuantLinear int8 triton"]
    cases = {"F.linear bf16": lambda: F.linear(x, lin.weight, lin.bias),
             **{name: (lambda layer=layer: layer(x)) for name, layer in layers.items()},
             "triton quantize alone": lambda: triton_quant.quantize_per_token(x, "fp8"),
             "torch._scaled_mm alone": lambda: torch._scaled_mm(xq, q8.qweight.t(), scale_a=xs,
                                                                scale_b=q8.weight_scale.view(1, n), bias=lin.bias,
                                                                out_dtype=torch.bfloat16),
             "triton int8 gemm alone": lambda: triton_gemm.w8a8_scaled_mm(xqi, xsi, qi.qweight, qi.weight_scale,
                                                                          lin.bias),
             "torch.empty alone": lambda: torch.empty((m, k), device="cuda")}
    rows = []
    with torch.no_grad():
        for name, fn in cases.items():
            for _ in range(50):
                fn()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(2000):
                fn()
            us = (time.perf_counter() - t0) / 2000 * 1e6
            torch.cuda.synchronize()
            rows.append(dict(case=name, cpu_us_per_call=us))
            print(f"overhead {name:32s} {us:.1f} us", flush=True)
    return rows


def bench_quant_configs(ceilings: dict) -> list[dict]:
    """Launch configurations of the fused quantize kernel (rows per program x warps)."""
    from diffquant.quantization.kernels import triton_quant

    rows = []
    for m, k in [(4608, 3072), (4096, 12288), (4608, 15360), (512, 3072)]:
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        block = triton.next_power_of_2(k)
        for r in (1, 2, 4):
            for w in (2, 4, 8, 16):
                if r * block > 32768 or r * block < 32 * w * 8:
                    continue
                t = time_cuda(lambda x=x, r=r, w=w: triton_quant.quantize_per_token(x, "fp8", rows=r, warps=w),
                              warmup=3, reps=10, inner=10)
                tbps = (m * k * 3 + m * 4) / t["ms"] / 1e9
                rows.append(dict(M=m, K=k, rows=r, warps=w, ms=t["ms"], TBps=tbps,
                                 pct_copy=100 * tbps / ceilings["copy_TBps"]))
        best = min((r for r in rows if r["M"] == m and r["K"] == k), key=lambda r: r["ms"])
        print(f"quant config {m}x{k}: best rows={best['rows']} warps={best['warps']} {best['ms']*1e3:.1f} us "
              f"{best['TBps']:.2f} TB/s; default {triton_quant._launch_config(k)}", flush=True)
        # Probe: the same launch with a reciprocal multiply instead of the IEEE division (not the numerics).
        t = time_cuda(lambda x=x, b=best: triton_quant.quantize_per_token(x, "fp8", rows=b["rows"], warps=b["warps"],
                                                                            exact_div=False),
                      warmup=3, reps=10, inner=10)
        tbps = (m * k * 3 + m * 4) / t["ms"] / 1e9
        rows.append(dict(M=m, K=k, rows=best["rows"], warps=best["warps"], ms=t["ms"], TBps=tbps,
                         pct_copy=100 * tbps / ceilings["copy_TBps"], division="reciprocal multiply (probe)"))
    return rows


def _triton_8192() -> dict[str, float]:
    """Our Triton W8A8 GEMM at 8192^3 (int8 and fp8), scales and bias included."""
    from diffquant.quantization.kernels import triton_gemm

    n, out = 8192, {}
    for fmt, dtype in (("int8", torch.int8), ("fp8", torch.float8_e4m3fn)):
        a = torch.randn(n, n, device="cuda").clamp(-100, 100).to(dtype)
        b = torch.randn(n, n, device="cuda").clamp(-100, 100).to(dtype)
        sa, sb = torch.rand(n, 1, device="cuda"), torch.rand(n, 1, device="cuda")
        t = time_cuda(lambda a=a, b=b, sa=sa, sb=sb: triton_gemm.w8a8_scaled_mm(a, sa, b, sb, None), reps=20)
        out[f"{fmt}_triton_TOPs"] = 2 * n**3 / t["ms"] / 1e9
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    ap.add_argument("--quant-configs", action="store_true", help="also sweep the quantize kernel's launch config")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    ceilings = measure_ceilings()
    ceilings.update(_triton_8192())
    ceilings["int8_TOPs"] = max(ceilings["int8_int_mm_TOPs"], ceilings["int8_triton_TOPs"])
    rows = []
    for model in args.models:
        for layer, m, k, n in SHAPES[model]:
            rows += bench_shape(model, layer, m, k, n, ceilings)
    # int8 ceiling: best int8 rate seen anywhere (8192^3 GEMMs or our kernel at real shapes)
    seen = [r["TFLOPs"] for r in rows if r["variant"].startswith("int8")]
    ceilings["int8_TOPs"] = max([ceilings["int8_TOPs"], *seen])
    for r in rows:
        if r["variant"].startswith("int8"):
            r["pct_ceiling"] = 100 * r["TFLOPs"] / ceilings["int8_TOPs"]
    qrows = bench_quantize_kernels(ceilings)
    overhead = bench_overhead()
    qconfigs = bench_quant_configs(ceilings) if args.quant_configs else []
    env = environment()
    cols = ["model", "layer", "M", "K", "N", "variant", "ms", "TFLOPs", "pct_ceiling", "speedup_vs_bf16",
            "rel_err", "sqnr_db"]
    md = (f"# bench_linear\n\n`{env['command']}` — commit {env['commit']}, {env.get('gpu')}, torch {env['torch']}, "
          f"triton {env['triton']}\n\nCeilings (measured): " + ", ".join(f"{k} {v:.1f}" for k, v in ceilings.items())
          + "\n\nQuantized times include the activation quantization. Error vs float64 of the unquantized "
          "operands.\n\n" + md_table(rows, cols) + "\n## Activation quantization alone\n\n"
          + md_table(qrows, ["M", "K", "fmt", "impl", "ms", "TBps", "pct_copy"])
          + "\n## CPU time per call (eager overhead, M=16 K=N=256)\n\n"
          + md_table(overhead, ["case", "cpu_us_per_call"])
          + "\n## Quantize kernel launch configurations (fp8)\n\n"
          + md_table(qconfigs, ["M", "K", "rows", "warps", "division", "ms", "TBps", "pct_copy"]))
    path = write_results("bench_linear", dict(env=env, ceilings=ceilings, rows=rows, quantize=qrows,
                                                  overhead=overhead, quant_configs=qconfigs), md, args.out)
    print(md)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
