"""The `triton` backend: fused per-token activation quantization + W8A8 GEMMs, as torch custom ops.

Custom ops (torch.library, with fake impls so `torch.compile(fullgraph=True)` traces through them):

- `diffquant::quantize_per_token(x: [M, K], fmt: "fp8"|"int8") -> (q: [M, K], scale: [M, 1] f32)`
- `diffquant::w8a8_scaled_mm(xq, x_scale, wq, w_scale, bias, out_dtype) -> [M, N]`
- `diffquant::act_quantize_per_token(x: [M, Kx], prefix: [M, Kp] | None, act, fmt) -> (q: [M, Kp + Kx],
  scale)`: per-token quantization of cat([prefix, act(x)], -1) in one kernel, for linears whose
  input activation a fusion pass moved into them (numerics/activations.py, quantization/fusion.py)

On CUDA they run the Triton kernels (`triton_quant`, `triton_gemm`, imported on first use, so
importing diffquant needs neither triton nor a GPU); on any other device they run the reference
numerics, so the op path traces and runs on CPU too. FP8 GEMMs go through `torch._scaled_mm`
(cuBLASLt, row-wise scales, bias in the epilogue, fast accumulation: FP8_FAST_ACCUM) unless
`FP8_GEMM` says "triton"; int8 GEMMs through triton_gemm (under compile the persistent TMA kernel
inside CUDA-graph capture on Hopper, else the classic one: COMPILED_INT8_KERNEL; eager: classic).
In eager mode the Python wrappers are called directly (no dispatcher round trip per layer).
"""

import functools
import importlib.util
import threading

import torch

from diffquant.quantization import numerics as nx

# Which GEMM runs FP8 W8A8 in the triton backend: "scaled_mm" (cuBLASLt: as fast or faster than ours at
# all but one benchmarks/bench_linear.py shape, 2-40% at 3072-wide layers) or "triton" (ours).
FP8_GEMM = "scaled_mm"
# torch._scaled_mm's use_fast_accum for FP8 GEMMs. Hopper's FP8 tensor cores accumulate in reduced
# precision unless partial sums are promoted to float32 every few MMAs; skipping the promotion is
# what torchao (Float8DynamicActivationFloat8WeightConfig's default) and vLLM do for inference.
# On the H200 (benchmarks/NOTES.md run 5): the FP8 GEMMs of one FLUX.1-dev forward take 47.3 ms of
# GPU time with it and 52.8 ms without; FLUX eager 146.0 vs 150.3 ms, compiled 102.6 vs 109.4 ms.
# Error vs the float64 product of the quantized operands: 1.7e-3 promoted, 3.1e-3 (K=12288) /
# 3.4e-3 (K=15360) fast, ten times under the activation quantization's own error.
FP8_FAST_ACCUM = True
# Under torch.compile, who quantizes activations: "inductor" (the reference numerics as torch ops:
# inductor fuses them into the kernel that produces x and computes them once for q/k/v; its
# generated division may differ from IEEE in the last bit, so rare values land one fp8/int8 step
# away from eager) or "kernel" (our bit-exact custom op, opaque to inductor). Both pass the GPU
# compile test; "inductor" measured 4.4 ms faster per FLUX.1-dev forward (benchmarks/NOTES.md run 4).
COMPILED_QUANT = "inductor"
# Which Triton int8 GEMM the custom op (the compiled path) runs (triton_gemm.w8a8_scaled_mm's kernel):
# "auto" (the persistent TMA kernel on Hopper for M > 64: faster on the GPU, but three host-side TMA
# descriptors per call), "classic", or "capture": TMA while a CUDA graph is captured, classic otherwise.
# FLUX.1-dev, run 7a, same run: default compile mode (host-bound) 148.9 ms with TMA vs 124.5 classic
# (bf16 132.4); CUDA graphs (no host work) 100.4 ms with TMA. "capture" gives each mode the kernel
# measured faster there (int8 results are bit-identical between the two kernels).
COMPILED_INT8_KERNEL = "capture"


def capture_choice(capturing: bool, tma_applies: bool, tuned: bool) -> tuple[str, bool]:
    """kernel="capture": (the kernel to run, whether to tune the TMA kernel for this shape first).
    Inside a CUDA-graph capture the TMA kernel if it is already tuned (timing is not allowed there);
    outside, the classic kernel, after tuning the TMA one once for a later capture."""
    if not tma_applies:
        return "classic", False
    if capturing:
        return ("tma" if tuned else "classic"), False
    return "classic", not tuned


# Whether triton is installed (found, not imported: importing diffquant stays free of triton and
# CUDA). A constant, so torch.compile can trace code that asks.
_TRITON = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON


@functools.cache
def _kernels():
    """(triton_quant, triton_gemm), imported on first CUDA use (they import triton)."""
    from diffquant.quantization.kernels import triton_gemm, triton_quant

    return triton_quant, triton_gemm


def _quant_ref(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    return nx.int8_quantize_per_row(x) if fmt == "int8" else nx.fp8_quantize_per_row(x)


def quantize_per_token_impl(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, K] -> (q [M, K] fp8|int8, scale [M, 1] float32); Triton on CUDA, reference elsewhere."""
    if fmt not in ("fp8", "int8"):
        raise ValueError(f"quantize_per_token: fmt must be 'fp8' or 'int8', got {fmt!r}")
    if x.is_cuda and triton_available():
        return _kernels()[0].quantize_per_token(x, fmt)
    return _quant_ref(x, fmt)


def _mm_ref(xq, x_scale, wq, w_scale, bias, out_dtype):
    # float64 holds the int8 dot products exactly (|sum| < 2^53) and fp8 products nearly so.
    out = (xq.double() @ wq.double().t()) * x_scale.double().reshape(-1, 1) * w_scale.double().reshape(1, -1)
    if bias is not None:
        out = out + bias.double()
    return out.to(out_dtype)


def w8a8_scaled_mm_impl(xq, x_scale, wq, w_scale, bias, out_dtype: torch.dtype, kernel: str = "auto") -> torch.Tensor:
    """xq: [M, K], x_scale: [M, 1], wq: [N, K], w_scale: [N, 1] | [], bias: [N] | None -> [M, N].
    kernel: which Triton GEMM on CUDA (triton_gemm.w8a8_scaled_mm)."""
    if xq.is_cuda and triton_available():
        return _kernels()[1].w8a8_scaled_mm(xq, x_scale, wq, w_scale, bias, out_dtype, kernel)
    return _mm_ref(xq, x_scale, wq, w_scale, bias, out_dtype)


@torch.library.custom_op("diffquant::quantize_per_token", mutates_args=())
def quantize_per_token(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_per_token_impl(x, fmt)


@quantize_per_token.register_fake
def _(x, fmt):
    dtype = torch.int8 if fmt == "int8" else torch.float8_e4m3fn
    return x.new_empty(x.shape, dtype=dtype), x.new_empty((x.shape[0], 1), dtype=torch.float32)


@torch.library.custom_op("diffquant::w8a8_scaled_mm", mutates_args=())
def w8a8_scaled_mm(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    return w8a8_scaled_mm_impl(xq, x_scale, wq, w_scale, bias, out_dtype, COMPILED_INT8_KERNEL)


@w8a8_scaled_mm.register_fake
def _(xq, x_scale, wq, w_scale, bias, out_dtype):
    return xq.new_empty((xq.shape[0], wq.shape[0]), dtype=out_dtype)


def act_quantize_per_token_impl(x: torch.Tensor, prefix: torch.Tensor | None, act: str,
                                fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize cat([prefix, act(x)], -1) per token; Triton on CUDA, reference numerics elsewhere."""
    nx.check_activation(act)
    if fmt not in ("fp8", "int8"):
        raise ValueError(f"act_quantize_per_token: fmt must be 'fp8' or 'int8', got {fmt!r}")
    if x.is_cuda and triton_available():
        return _kernels()[0].act_quantize_per_token(x, prefix, act, fmt)
    return _quant_ref(nx.activation_input(x, prefix, act), fmt)


@torch.library.custom_op("diffquant::act_quantize_per_token", mutates_args=())
def act_quantize_per_token(x: torch.Tensor, prefix: torch.Tensor | None, act: str,
                           fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    return act_quantize_per_token_impl(x, prefix, act, fmt)


@act_quantize_per_token.register_fake
def _(x, prefix, act, fmt):
    dtype = torch.int8 if fmt == "int8" else torch.float8_e4m3fn
    k = x.shape[1] + (0 if prefix is None else prefix.shape[1])
    return x.new_empty((x.shape[0], k), dtype=dtype), x.new_empty((x.shape[0], 1), dtype=torch.float32)


_SHARED = threading.local()


def shared_quantize_per_token(x2d: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_per_token_impl, computed once for linears that read the same activation in a row
    (q, k and v; FLUX's single blocks also feed proj_mlp the same tensor): ~190 of FLUX's ~420
    quantizations per forward are repeats. One entry per thread, keyed by the memory, layout and
    version counter of x; the entry holds x, so its memory cannot be reused by another tensor while
    cached, and an in-place write bumps the version and misses. Inference tensors have no version
    counter: they are quantized every time."""
    if x2d.is_inference():
        return quantize_per_token_impl(x2d, fmt)
    key = (x2d.data_ptr(), x2d.shape, x2d.stride(), x2d.dtype, x2d.device, x2d._version, fmt)
    entry = getattr(_SHARED, "entry", None)
    if entry is not None and entry[0] == key:
        return entry[2]
    out = quantize_per_token_impl(x2d, fmt)
    _SHARED.entry = (key, x2d, out)
    return out


def release_shared_quantization() -> None:
    """Drop the cached activation (and the quantized copy) this thread holds."""
    _SHARED.entry = None


def _fp8_weight_side(layer) -> tuple:
    """(qweight.t() [K, N], w_scale as [1, N] f32, bf16 bias | None): torch._scaled_mm's weight operands."""
    n, ws = layer.out_features, layer.weight_scale
    sb = ws.float().reshape(1, 1).expand(1, n).contiguous() if ws.numel() == 1 else ws.view(1, n)
    bias = layer.bias.to(torch.bfloat16) if layer.bias is not None else None
    return layer.qweight.t(), sb, bias


def _weight_operands(layer) -> tuple:
    """(qweight, *_fp8_weight_side), built once per layer and rebuilt if the buffers are replaced
    (e.g. by .to(device)): saves ~4 tensor ops per eager call."""
    cache = layer.__dict__.get("_triton_operands")
    if cache is None or cache[0] is not layer.qweight:
        cache = (layer.qweight, *_fp8_weight_side(layer))
        layer.__dict__["_triton_operands"] = cache
    return cache


def scaled_mm_fp8(xq, xs, w_t, sb, bias, out_dtype):
    """The one FP8 GEMM call (this backend and the scaled_mm one): torch._scaled_mm, bf16 out, with
    FP8_FAST_ACCUM. xs: [M, 1] or [] float32, w_t: [K, N], sb: [1, N] or [] float32."""
    out = torch._scaled_mm(xq, w_t, scale_a=xs, scale_b=sb, bias=bias, out_dtype=torch.bfloat16,
                           use_fast_accum=FP8_FAST_ACCUM)
    return out if out_dtype == torch.bfloat16 else out.to(out_dtype)


def _triton_linear_traced(layer, x2d: torch.Tensor) -> torch.Tensor:
    """Under torch.compile. With COMPILED_QUANT == "inductor" the activation quantization is the
    reference numerics in plain torch ops, so inductor fuses it into the kernel that produces x
    (norm + modulation) and shares it between the linears that read the same x (q, k, v); with
    "kernel" it is our custom op (opaque to inductor). (The wide activations behind a GELU, which
    inductor read twice at ~1 TB/s, go through the fused kernel instead: triton_act_linear.) The GEMM
    is torch._scaled_mm (fp8) or the custom op. No graph breaks either way."""
    if COMPILED_QUANT not in ("inductor", "kernel"):
        raise ValueError(f"triton_ops.COMPILED_QUANT must be 'inductor' or 'kernel', got {COMPILED_QUANT!r}")
    fmt = layer.scheme.method
    if COMPILED_QUANT == "inductor":
        xq, xs = _quant_ref(x2d, fmt)
    else:
        xq, xs = torch.ops.diffquant.quantize_per_token(x2d, fmt)
    return _gemm_traced(layer, xq, xs, x2d.dtype, x2d.is_cuda)


def _gemm_traced(layer, xq, xs, out_dtype, is_cuda: bool) -> torch.Tensor:
    if layer.scheme.method == "fp8" and FP8_GEMM == "scaled_mm" and is_cuda:
        return scaled_mm_fp8(xq, xs, *_fp8_weight_side(layer), out_dtype)
    return torch.ops.diffquant.w8a8_scaled_mm(xq, xs, layer.qweight, layer.weight_scale, layer.bias, out_dtype)


def triton_linear(layer, x2d: torch.Tensor) -> torch.Tensor:
    """QuantLinear backend: x2d [M, K] -> [M, N]; dynamic per-token activation quantization fused
    into one kernel, then the W8A8 GEMM with scales and bias in its epilogue.

    Eager mode calls the kernels' Python wrappers directly (no dispatcher round trip) with the
    weight-side operands cached on the layer, and quantizes an activation once for the linears
    that read it in a row: FLUX runs ~420 of these per forward, so per-call CPU time decides
    whether the GPU ever waits."""
    if torch.compiler.is_compiling():
        return _triton_linear_traced(layer, x2d)
    xq, xs = shared_quantize_per_token(x2d, layer.scheme.method)  # [M, K] 8-bit, [M, 1] float32
    return _gemm_eager(layer, xq, xs, x2d.dtype, x2d.is_cuda)


def triton_act_linear(layer, x2d: torch.Tensor, prefix2d: torch.Tensor | None) -> torch.Tensor:
    """QuantLinear backend for a layer with a fused input activation (layer.input_act):
    cat([prefix2d, act(x2d)], -1) quantized per token in one kernel, then the W8A8 GEMM.
    x2d: [M, Kx], prefix2d: [M, Kp] | None -> [M, N]. Our kernel also under torch.compile
    (inductor's code for these wide rows read them twice at ~1 TB/s: benchmarks/NOTES.md run 5a)."""
    fmt, act = layer.scheme.method, layer.input_act
    if torch.compiler.is_compiling():
        xq, xs = torch.ops.diffquant.act_quantize_per_token(x2d, prefix2d, act, fmt)
        return _gemm_traced(layer, xq, xs, x2d.dtype, x2d.is_cuda)
    xq, xs = act_quantize_per_token_impl(x2d, prefix2d, act, fmt)
    return _gemm_eager(layer, xq, xs, x2d.dtype, x2d.is_cuda)


def _gemm_eager(layer, xq, xs, out_dtype, is_cuda: bool) -> torch.Tensor:
    wq, w_t, sb, bias = _weight_operands(layer)
    if layer.scheme.method == "fp8" and FP8_GEMM == "scaled_mm" and is_cuda:
        return scaled_mm_fp8(xq, xs, w_t, sb, bias, out_dtype)
    # The classic Triton GEMM in eager mode: the persistent TMA kernel is faster on the GPU, but it
    # builds three host-side TMA descriptors per call; eager int8 FLUX ran 41 ms behind fp8 with it
    # and 11.5 ms behind with the classic kernel (benchmarks/NOTES.md runs 5b, 5c).
    return w8a8_scaled_mm_impl(xq, xs, wq, layer.weight_scale, layer.bias, out_dtype, kernel="classic")
