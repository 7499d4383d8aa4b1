"""FP8 attention (prototype, kernels/triton_attention.py) against bf16 SDPA at DiT attention shapes.

Per shape: torch SDPA in bf16 (the default backend, cuDNN and flash forced), our FP8 attention
(quantization + kernel, the kernel alone on quantized inputs, a launch sweep) with TFLOP/s
(4 N^2 D per head) and error: SQNR against exact float64 attention on the original inputs and,
for FP8, against the spec (numerics/attention.py: exact attention on the dequantized inputs), on
the first 1024 queries of the first two heads.

    python benchmarks/bench_attention.py [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import environment, md_table, write_results  # noqa: E402
from diffquant.quantization.kernels import triton_attention as ta  # noqa: E402
from diffquant.quantization.metrics import sqnr_db  # noqa: E402
from diffquant.quantization.numerics import attention as na  # noqa: E402

# (name, B, H, N, D): FLUX.1-dev 1024^2 (4096 + 512 tokens), Qwen-Image and Z-Image 1024^2 with 256
# text tokens, one Wan2.2-A14B expert at 480p x 81 frames.
SHAPES = [("flux1-dev", 1, 24, 4608, 128), ("qwen-image", 1, 24, 4352, 128), ("z-image", 1, 30, 4352, 128),
          ("wan2.2-a14b", 1, 40, 32760, 128)]
LAUNCHES = [(128, 128, 8, 2), (128, 128, 8, 3), (128, 128, 8, 4)]  # block_m, block_n, warps, stages
SUB_Q, SUB_H = 1024, 2


def _bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=5, rep=40, return_mode="median")


def _bench_graph(fn) -> float:
    """GPU time alone: replays of fn captured in a CUDA graph (no launch or host work; run 8a's
    do_bench of the four quantizer launches was bound by their host-side launches)."""
    return triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median")


def _sdpa(backend):
    def run(q, k, v):
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v)
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)
    return run


def _errors(out, q, k, v, fp8: bool) -> dict:
    qs, ks, vs = q[:, :SUB_H, :SUB_Q], k[:, :SUB_H], v[:, :SUB_H]
    sub = out[:, :SUB_H, :SUB_Q].double().flatten()
    res = {"sqnr_vs_exact_db": sqnr_db(na.sdpa_ref(qs, ks, vs).flatten(), sub)}
    if fp8:
        res["sqnr_vs_spec_db"] = sqnr_db(na.fp8_attention_ref(qs, ks, vs).flatten(), sub)
    return res


def _variants(q, k, v):
    for name, backend in (("bf16 sdpa (default)", None), ("bf16 sdpa cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("bf16 sdpa flash", SDPBackend.FLASH_ATTENTION)):
        fn = _sdpa(backend)
        yield name, False, (lambda fn=fn: fn(q, k, v))
    for bm, bn, w, st in LAUNCHES:
        yield (f"fp8 (quantize + kernel) m{bm} n{bn} w{w} s{st}", True,
               lambda bm=bm, bn=bn, w=w, st=st: ta.fp8_attention(q, k, v, block_m=bm, block_n=bn, warps=w, stages=st))
    yield "fp8 quantize_qkv alone", None, lambda: ta.quantize_qkv(q, k, v)
    yield "fp8 quantize Q alone (per 128-row block)", None, lambda: ta.quantize_rows_blocked(q, 128)
    yield "fp8 quantize Q alone, div_rn (the old division)", None, \
        lambda: ta.quantize_rows_blocked(q, 128, rcp_div=False)
    yield "fp8 quantize V alone (amax + transposed codes)", None, lambda: ta.quantize_channels_transposed(v)
    quantized = ta.quantize_qkv(q, k, v)
    sm_scale = q.shape[-1] ** -0.5
    yield "fp8 kernel alone (m128 n128 w8 s3)", True, lambda: ta.attend_quantized(quantized, q.dtype, sm_scale)


def bench_shape(name, b, h, n, d) -> list[dict]:
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flops = 4 * b * h * n * n * d
    rows = []
    for variant, fp8, fn in _variants(q, k, v):
        row = dict(shape=name, N=n, H=h, variant=variant)
        try:
            out = fn()
            row["ms"] = _bench(fn)
            row["graph_ms"] = _bench_graph(fn)
            if fp8 is not None:
                row["TFLOPs"] = flops / row["ms"] / 1e9
                row["graph_TFLOPs"] = flops / row["graph_ms"] / 1e9
                row.update(_errors(out, q, k, v, fp8))
        except Exception as e:  # noqa: BLE001 - recorded in the table
            row["error"] = f"{type(e).__name__}: {e}"[:200]
        rows.append(row)
        print({k2: (round(v2, 3) if isinstance(v2, float) else v2) for k2, v2 in row.items()}, flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--shapes", nargs="*", default=[s[0] for s in SHAPES])
    args = ap.parse_args(argv)
    rows = []
    for shape in SHAPES:
        if shape[0] in args.shapes:
            rows += bench_shape(*shape)
    env = environment()
    cols = ["shape", "N", "H", "variant", "ms", "graph_ms", "TFLOPs", "graph_TFLOPs", "sqnr_vs_exact_db",
            "sqnr_vs_spec_db", "error"]
    md = (f"# FP8 attention (prototype) vs bf16 SDPA\n\n`{env['command']}`\n\ncommit {env['commit']}, "
          f"{env.get('gpu')}, torch {env['torch']}, triton {env['triton']}; triton.testing.do_bench medians "
          "(ms: launches included) and do_bench_cudagraph medians (graph_ms: GPU time alone). "
          f"TFLOPs: 4 N^2 D H / time. SQNR on the first {SUB_Q} queries of the first {SUB_H} heads: against "
          "exact float64 attention of the bf16 inputs, and (fp8) against the spec (exact attention of the "
          "dequantized inputs).\n\n" + md_table(rows, cols))
    path = write_results("bench_attention", dict(env=env, rows=rows), md, args.out)
    print(md)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
