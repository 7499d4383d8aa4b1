"""Fused GELU + per-token quantization (triton_quant.act_quantize_per_token) at the shapes the
fusion pass (diffquant/quantization/fusion.py) creates, against what it replaces.

Per shape and fmt: the unfused eager path (torch GELU in bf16, torch.cat for FLUX single blocks,
then our quantize kernel) and the fused chunked kernel (launch sweep; monotone amax shortcut on
and off; the math variants: libdevice's branching tanhf vs its branch-free form, div_rn vs the
reciprocal division, each alone; run 6b also timed a whole-row kernel, since removed). Every
variant's codes and scales are compared with the unfused path's bit for bit (the unfused path is
the spec on CUDA). The floor is the HBM traffic (activation in, codes out) at this run's copy
bandwidth.

    python benchmarks/bench_act_quant.py [--out DIR]
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
from diffquant.quantization.kernels import triton_quant  # noqa: E402

# (name, M, Kp, Kx, calls in one forward)
SHAPES = [
    ("flux single: cat(attn, gelu(mlp))", 4608, 3072, 12288, 38),
    ("flux double ff (image)", 4096, 0, 12288, 19),
    ("flux double ff (text)", 512, 0, 12288, 19),
    ("wan2.2 ff 480p x 81", 32760, 0, 13824, 40),
]
CHUNKED = [(512, 4), (1024, 4), (1024, 8), (2048, 8), (4096, 8)]  # run 6b swept 512-4096 x 2-8 warps
# (tanh, rcp_div) math variants at the default launch: run 6b's kernel was (TANH_LIBDEVICE, False)
MATH = [(triton_quant.TANH_LIBDEVICE, False, "libdevice tanhf, div_rn (run 6b)"),
        (triton_quant.TANH_SELECT, False, "branch-free tanhf, div_rn"),
        (triton_quant.TANH_LIBDEVICE, True, "libdevice tanhf, reciprocal division")]

def _bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def _unfused(x, p, fmt):
    y = F.gelu(x, approximate="tanh")
    return triton_quant.quantize_per_token(y if p is None else torch.cat([p, y], dim=1), fmt)


def _variants(x, p, fmt):
    yield "unfused (gelu, cat, quantize)", lambda: _unfused(x, p, fmt)
    for chunk, warps in CHUNKED:
        yield f"chunked c{chunk} w{warps}", lambda c=chunk, w=warps: triton_quant.act_quantize_per_token(
            x, p, "gelu_tanh", fmt, chunk=c, warps=w)
    for tanh, rcp, label in MATH:
        yield f"chunked (default launch), {label}", lambda t=tanh, r=rcp: triton_quant.act_quantize_per_token(
            x, p, "gelu_tanh", fmt, tanh=t, rcp_div=r)
    yield "chunked (default launch), no shortcut", lambda: triton_quant.act_quantize_per_token(
        x, p, "gelu_tanh", fmt, monotone=False)


def bench_shape(name, m, kp, kx, calls, fmt, copy_tbps) -> list[dict]:
    x = torch.randn(m, kx, device="cuda", dtype=torch.bfloat16) * 2
    p = torch.randn(m, kp, device="cuda", dtype=torch.bfloat16) if kp else None
    ref_q, ref_s = _unfused(x, p, fmt)
    traffic = m * (kp + kx) * 3  # bf16 in, 8-bit out
    rows = []
    for variant, fn in _variants(x, p, fmt):
        row = dict(shape=name, fmt=fmt, variant=variant, M=m, K=kp + kx)
        try:
            q, s = fn()
            row["bit_exact"] = bool(torch.equal(q.view(torch.int8), ref_q.view(torch.int8)) and torch.equal(s, ref_s))
            row["us"] = _bench(fn) * 1e3
            row["TBps"] = traffic / row["us"] / 1e6
            row["floor_us"] = traffic / copy_tbps / 1e6
            row["ms_per_forward"] = row["us"] * calls / 1e3
        except Exception as e:  # noqa: BLE001 - recorded in the table
            row["error"] = f"{type(e).__name__}: {e}"[:200]
        rows.append(row)
    return rows


def _copy_tbps() -> float:
    src = torch.empty(2**29, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / _bench(lambda: dst.copy_(src)) / 1e9


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--fmts", nargs="*", default=["fp8", "int8"])
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    copy = _copy_tbps()
    rows = []
    for fmt in args.fmts:
        for shape in SHAPES:
            rows += bench_shape(*shape, fmt, copy)
            last = rows[-len(CHUNKED) - len(MATH) - 2:]
            print(md_table(last, ["shape", "fmt", "variant", "us", "TBps", "bit_exact"]))
    env = environment()
    cols = ["shape", "fmt", "variant", "M", "K", "us", "TBps", "floor_us", "ms_per_forward", "bit_exact", "error"]
    md = (f"# Fused GELU + per-token quantization\n\n`{env['command']}`\n\n"
          f"commit {env['commit']}, {env.get('gpu')}, torch {env['torch']}, triton {env['triton']}; "
          f"triton.testing.do_bench medians (L2 flushed); copy bandwidth this run {copy:.2f} TB/s "
          "(floor_us: activation in + codes out at that rate).\n\n" + md_table(rows, cols))
    path = write_results("bench_act_quant", dict(env=env, copy_TBps=copy, rows=rows), md, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
