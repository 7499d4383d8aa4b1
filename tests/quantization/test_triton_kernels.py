"""The `triton` backend: fused activation quantization kernels, the W8A8 GEMM, custom ops, compile.

Budgets (STYLE.md 5):
- quantize kernels: bit-exact (rtol=0, atol=0) against numerics.fp8_quantize_per_row /
  numerics.int8_quantize_per_row, quantized values and scales;
- GEMM: max|out - ref64| <= 2 * max|F.linear_bf16 - ref64| + atol, where ref64 multiplies the
  dequantized operands in float64 and F.linear_bf16 is PyTorch's bf16 GEMM of the same operands;
- torch.compile: the compiled model matches eager within the same GEMM budget (CPU: aot_eager).
GPU tests are marked `gpu` and skip without CUDA (conftest.require_cuda says why).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from diffquant.quantization import QuantLinear, quantize_
from diffquant.quantization import numerics as nx
from diffquant.quantization.kernels import triton_ops
from tests.conftest import require_cuda

ATOL_BF16 = 1e-2
REF = {"fp8": nx.fp8_quantize_per_row, "int8": nx.int8_quantize_per_row}


def _rows(m: int, k: int, rng: torch.Generator, dtype: torch.dtype, device: str) -> torch.Tensor:
    """[M, K] with row magnitudes spread over 1e-3..1e3, an all-zero row, a row of exact int8 ties
    (amax 127 -> scale 1, values k + 0.5) and a row with one huge outlier."""
    mag = 10 ** (torch.rand(m, 1, generator=rng) * 6 - 3)
    x = torch.randn(m, k, generator=rng) * mag
    if m > 2:
        x[1] = 0
        x[2] = (torch.randint(-126, 126, (k,), generator=rng) + 0.5).float()
        x[2, 0] = 127.0
    if m > 3:
        x[3, k // 2] = 3e4
    return x.to(dtype).to(device)


def _bits(q: torch.Tensor) -> torch.Tensor:
    return q.view(torch.int8)


def _check_bit_exact(x: torch.Tensor, fmt: str, q: torch.Tensor, s: torch.Tensor) -> None:
    qr, sr = REF[fmt](x)
    assert q.dtype == qr.dtype and q.shape == qr.shape and s.shape == sr.shape == (x.shape[0], 1)
    mism = int((_bits(q) != _bits(qr)).sum())
    assert mism == 0, f"{mism} quantized values differ from the reference"
    torch.testing.assert_close(s, sr, rtol=0, atol=0)


def _ref64(xq, xs, wq, ws, bias) -> torch.Tensor:
    out = (xq.double() * xs.double()) @ (wq.double() * ws.double().reshape(-1, 1)).t()
    return out + bias.double() if bias is not None else out


def _check_budget(out, xq, xs, wq, ws, bias) -> None:
    """out vs the float64 product of the dequantized operands, budget from bf16 F.linear."""
    ref = _ref64(xq, xs, wq, ws, bias)
    x_deq = (xq.float() * xs).to(torch.bfloat16)
    w_deq = (wq.float() * ws.reshape(-1, 1)).to(torch.bfloat16)
    lowp = F.linear(x_deq, w_deq, bias.to(torch.bfloat16) if bias is not None else None)
    budget = 2 * (lowp.double() - ref).abs().max().item() + ATOL_BF16
    err = (out.double() - ref).abs().max().item()
    assert torch.isfinite(out).all()
    assert err <= budget, f"max err {err:.4g} > budget {budget:.4g}"


# ---------------------------------------------------------------------------------------------
# CPU: import hygiene, custom ops (reference path), torch.compile tracing


def test_import_does_not_touch_triton_or_cuda():
    code = ("import sys, torch, diffquant; from diffquant.quantization.kernels import BACKENDS; "
            "assert 'triton' in BACKENDS; assert 'triton' not in sys.modules, 'triton imported'; "
            "assert not torch.cuda.is_initialized(), 'CUDA initialised'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_quantize_op_cpu_is_the_reference(fmt, rng):
    x = _rows(9, 80, rng, torch.bfloat16, "cpu")
    q, s = torch.ops.diffquant.quantize_per_token(x, fmt)
    _check_bit_exact(x, fmt, q, s)


def test_custom_ops_pass_opcheck(rng):
    x = torch.randn(5, 32, generator=rng).to(torch.bfloat16)
    torch.library.opcheck(torch.ops.diffquant.quantize_per_token.default, (x, "int8"))
    torch.library.opcheck(torch.ops.diffquant.quantize_per_token.default, (x, "fp8"))
    xq, xs = nx.int8_quantize_per_row(x)
    wq, ws = nx.int8_quantize_per_row(torch.randn(24, 32, generator=rng))
    bias = torch.randn(24, generator=rng).to(torch.bfloat16)
    torch.library.opcheck(torch.ops.diffquant.w8a8_scaled_mm.default, (xq, xs, wq, ws, bias, torch.bfloat16))
    torch.library.opcheck(torch.ops.diffquant.w8a8_scaled_mm.default, (xq, xs, wq, ws, None, torch.float32))


def test_quantize_op_rejects_unknown_format():
    with pytest.raises(ValueError, match="fmt must be 'fp8' or 'int8'"):
        triton_ops.quantize_per_token_impl(torch.ones(2, 4), "int4")


@pytest.mark.parametrize("method", ["fp8", "int8"])
def test_forcing_triton_on_cpu_is_an_error(method):
    lin = torch.nn.Sequential(torch.nn.Linear(32, 32))
    with pytest.raises(ValueError, match="backend 'triton' cannot run layer 0: needs a CUDA device"):
        quantize_(lin, {"method": method, "backend": "triton"})


class _Block(torch.nn.Module):
    """A tiny DiT-like block: M=1 modulation linear, then an MLP on tokens."""

    def __init__(self, dim: int = 64):
        super().__init__()
        self.mod = torch.nn.Linear(dim, 2 * dim)
        self.fc1 = torch.nn.Linear(dim, 4 * dim)
        self.fc2 = torch.nn.Linear(4 * dim, dim)

    def forward(self, x, t):  # x: [B, S, D], t: [B, D]
        shift, scale = self.mod(t).unsqueeze(1).chunk(2, dim=-1)  # [B, 1, D] each
        h = F.layer_norm(x, x.shape[-1:]) * (1 + scale) + shift
        return x + self.fc2(F.gelu(self.fc1(h)))


@pytest.mark.parametrize("method", ["fp8", "int8"])
def test_compile_fullgraph_traces_quantized_model_cpu(method, rng):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=rng)))
    model = _Block().to(torch.bfloat16)
    quantize_(model, method)
    x = torch.randn(2, 7, 64, generator=rng).to(torch.bfloat16)
    t = torch.randn(2, 64, generator=rng).to(torch.bfloat16)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, t), model(x, t), rtol=0, atol=0)


@pytest.mark.parametrize("quant", ["inductor", "kernel"])
@pytest.mark.parametrize("method", ["fp8", "int8"])
def test_compile_fullgraph_traces_triton_custom_ops_cpu(method, quant, rng, monkeypatch):
    """The triton backend's op path (custom ops, CPU reference impls) traces without graph breaks."""
    monkeypatch.setattr(triton_ops, "COMPILED_QUANT", quant)
    model = _Block().to(torch.bfloat16)
    quantize_(model, method)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]

    class TritonPath(torch.nn.Module):
        def forward(self, x):  # x: [M, K]
            return triton_ops.triton_linear(layers[1], x)

    x = torch.randn(13, 64, generator=rng).to(torch.bfloat16)
    torch._dynamo.reset()
    out = torch.compile(TritonPath(), fullgraph=True, backend="aot_eager")(x)
    ref = triton_ops.triton_linear(layers[1], x)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    lay = layers[1]
    xq, xs = REF[method](x)
    _check_budget(out, xq, xs, lay.qweight, lay.weight_scale, lay.bias)


# ---------------------------------------------------------------------------------------------
# GPU: Triton kernels against the numerics, the GEMM budget, backend choice, compile


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["fp8", "int8"])
@pytest.mark.parametrize("m", [1, 7, 113, 4224])
@pytest.mark.parametrize("k", [64, 113, 3072, 15360, 20000])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_quantize_kernel_bit_exact(fmt, m, k, dtype, rng):
    require_cuda((8, 9) if fmt == "fp8" else (8, 0))
    from diffquant.quantization.kernels import triton_quant

    x = _rows(m, k, rng, dtype, "cuda")
    q, s = triton_quant.quantize_per_token(x, fmt)
    _check_bit_exact(x, fmt, q, s)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_quantize_kernel_strided_rows(fmt, rng):
    require_cuda((8, 9) if fmt == "fp8" else (8, 0))
    from diffquant.quantization.kernels import triton_quant

    x = _rows(64, 512, rng, torch.bfloat16, "cuda")[:, 128:384]  # row stride 512, unit column stride
    q, s = triton_quant.quantize_per_token(x, fmt)
    _check_bit_exact(x, fmt, q, s)


def test_launch_key_separates_constexprs_and_alignment():
    """Direct launches reuse a compiled kernel by this key: any integer (a constexpr like BLOCK_K
    or a runtime M) that differs must give another key, and so must a tensor's dtype or 16-byte
    alignment; equal arguments give equal keys."""
    from diffquant.quantization.kernels.triton_launch import spec_key

    x = torch.zeros(64, dtype=torch.bfloat16)
    assert spec_key((x, 96, 256, True)) == spec_key((x.clone(), 96, 256, True))
    assert spec_key((x, 96, 256, True)) != spec_key((x, 96, 512, True))  # both multiples of 16
    assert spec_key((x, 96, 256, True)) != spec_key((x, 112, 256, True))
    assert spec_key((x, 96)) != spec_key((x[1:], 96))  # 2-byte offset: not 16-byte aligned
    assert spec_key((x, 96)) != spec_key((x.float(), 96))
    assert spec_key((x, 1.0, None)) != spec_key((x, 2.0, None))


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_repeated_launches_stay_exact(fmt, rng):
    """Later calls reuse the compiled kernel (and, with triton_launch.ENABLED, its direct launcher):
    every call must still be exact / in budget on fresh inputs."""
    require_cuda((8, 9) if fmt == "fp8" else (8, 0))
    from diffquant.quantization.kernels import triton_gemm, triton_quant

    w = (torch.randn(256, 512, generator=rng) / 512**0.5).cuda()
    wq, ws = REF[fmt](w)
    b = torch.randn(256, generator=rng).to(torch.bfloat16).cuda()
    for _ in range(4):
        # row widths whose BLOCK_K constexprs (256, 512, 4096) are all multiples of 16: a launch key
        # that treated them like runtime integers ran one width's kernel for another (run 9b)
        for k in (160, 512, 3072):
            x = _rows(96, k, rng, torch.bfloat16, "cuda")
            q, s = triton_quant.quantize_per_token(x, fmt)
            _check_bit_exact(x, fmt, q, s)
        x = _rows(96, 512, rng, torch.bfloat16, "cuda")
        xn = (torch.randn(96, 512, generator=rng) * 2).to(torch.bfloat16).cuda()
        xq, xs = REF[fmt](xn)
        _check_budget(triton_gemm.w8a8_scaled_mm(xq, xs, wq, ws, b), xq, xs, wq, ws, b)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("m", [1, 7, 113, 4224])
@pytest.mark.parametrize("k,n", [(3072, 3072), (160, 272), (3072, 12288)])
@pytest.mark.parametrize("bias", [True, False])
def test_w8a8_gemm_within_budget(fmt, m, k, n, bias, rng):
    require_cuda((8, 9) if fmt == "fp8" else (8, 0))
    from diffquant.quantization.kernels import triton_gemm

    x = (torch.randn(m, k, generator=rng) * 3).to(torch.bfloat16).cuda()
    w = (torch.randn(n, k, generator=rng) / k**0.5).cuda()
    b = torch.randn(n, generator=rng).to(torch.bfloat16).cuda() if bias else None
    xq, xs = REF[fmt](x)
    wq, ws = REF[fmt](w)
    out = triton_gemm.w8a8_scaled_mm(xq, xs, wq, ws, b, torch.bfloat16)
    assert out.shape == (m, n) and out.dtype == torch.bfloat16
    _check_budget(out, xq, xs, wq, ws, b)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("m,k,n", [(113, 160, 272), (4224, 3072, 3072), (300, 12288, 200), (1100, 2064, 1544)])
def test_tma_gemm_every_config(fmt, m, k, n, rng):
    """The persistent TMA kernel at awkward shapes (M, N and K not multiples of the tiles), every
    config: int8 bit-identical to the classic kernel (same epilogue on exact int32 sums), both
    formats within the GEMM budget; the output is poisoned first, so unwritten tiles fail."""
    require_cuda((9, 0))
    from diffquant.quantization.kernels import triton_gemm

    x = (torch.randn(m, k, generator=rng) * 3).to(torch.bfloat16).cuda()
    w = (torch.randn(n, k, generator=rng) / k**0.5).cuda()
    b = torch.randn(n, generator=rng).to(torch.bfloat16).cuda()
    xq, xs = REF[fmt](x)
    wq, ws = REF[fmt](w)
    assert triton_gemm.tma_ok(xq, wq, torch.bfloat16)
    classic = triton_gemm.w8a8_scaled_mm(xq, xs, wq, ws, b, torch.bfloat16, kernel="classic")
    for cfg in triton_gemm.TMA_CONFIGS:
        torch.cuda.empty_cache()
        poison = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
        del poison  # the allocator hands the NaN-filled block to the kernel's output next
        out = triton_gemm.w8a8_scaled_mm_tma(xq, xs, wq, ws, b, torch.bfloat16, config=cfg)
        _check_budget(out, xq, xs, wq, ws, b)
        if fmt == "int8":
            assert torch.equal(out, classic), cfg


def test_capture_choice_policy():
    """The compiled int8 path's kernel policy (triton_ops.COMPILED_INT8_KERNEL = "capture"): TMA only
    inside a CUDA-graph capture and only once tuned; tuning happens outside a capture, once."""
    assert triton_ops.COMPILED_INT8_KERNEL == "capture"
    choice = triton_ops.capture_choice
    assert choice(capturing=True, tma_applies=True, tuned=True) == ("tma", False)
    assert choice(capturing=True, tma_applies=True, tuned=False) == ("classic", False)  # no timing in a capture
    assert choice(capturing=False, tma_applies=True, tuned=False) == ("classic", True)
    assert choice(capturing=False, tma_applies=True, tuned=True) == ("classic", False)
    for capturing in (True, False):
        assert choice(capturing=capturing, tma_applies=False, tuned=False) == ("classic", False)


@pytest.mark.gpu
@pytest.mark.parametrize("m,k,n", [(4224, 3072, 3072), (1100, 2064, 1544), (40, 3072, 3072)])
def test_capture_kernel_choice_inside_and_outside_cuda_graphs(m, k, n, rng):
    """kernel="capture" (the compiled int8 path's default): outside a CUDA-graph capture the classic
    kernel runs and the TMA kernel gets tuned for the shape; inside a capture the tuned TMA kernel is
    recorded (M <= 64 stays classic). Int8 output bit-identical to the classic kernel both ways, also
    when the graph is replayed on new inputs."""
    require_cuda((9, 0))
    from diffquant.quantization.kernels import triton_gemm

    def operands():
        x = (torch.randn(m, k, generator=rng) * 3).to(torch.bfloat16).cuda()
        w = (torch.randn(n, k, generator=rng) / k**0.5).cuda()
        return (*REF["int8"](x), *REF["int8"](w), torch.randn(n, generator=rng).to(torch.bfloat16).cuda())

    xq, xs, wq, ws, b = operands()
    eager = triton_gemm.w8a8_scaled_mm(xq, xs, wq, ws, b, torch.bfloat16, kernel="capture")
    assert torch.equal(eager, triton_gemm.w8a8_scaled_mm(xq, xs, wq, ws, b, torch.bfloat16, kernel="classic"))
    tma = m > 64
    assert (triton_gemm._tma_key(xq, wq, b, torch.bfloat16) in triton_gemm._TMA_TUNED) == tma
    chosen = []
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        triton_gemm.w8a8_scaled_mm(xq, xs, wq, ws, b, torch.bfloat16, kernel="capture")  # warm-up, as graphs do
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        chosen.append(triton_gemm._capture_choice(xq, xs, wq, ws, b, torch.bfloat16))
        out = triton_gemm.w8a8_scaled_mm(xq, xs, wq, ws, b, torch.bfloat16, kernel="capture")
    assert chosen == ["tma" if tma else "classic"]
    new = operands()
    for dst, src in zip((xq, xs, wq, ws, b), new, strict=True):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, triton_gemm.w8a8_scaled_mm(*new, torch.bfloat16, kernel="classic"))


@pytest.mark.gpu
def test_gemm_kernel_choice_is_checked(rng):
    """A kernel name outside the choices, or kernel="tma" on operands TMA cannot describe, is a
    ValueError naming the problem (never a silent switch to the other kernel)."""
    require_cuda((9, 0))
    from diffquant.quantization.kernels import triton_gemm

    xq, xs = REF["int8"]((torch.randn(80, 150, generator=rng)).cuda())  # K=150: not a multiple of 16
    wq, ws = REF["int8"]((torch.randn(64, 150, generator=rng)).cuda())
    assert not triton_gemm.tma_ok(xq, wq, torch.bfloat16)
    with pytest.raises(ValueError, match="multiples of 16"):
        triton_gemm.w8a8_scaled_mm(xq, xs, wq, ws, None, kernel="tma")
    with pytest.raises(ValueError, match="one of auto, tma, classic, capture"):
        triton_gemm.w8a8_scaled_mm(xq, xs, wq, ws, None, kernel="cutlass")
    _check_budget(triton_gemm.w8a8_scaled_mm(xq, xs, wq, ws, None), xq, xs, wq, ws, None)  # auto: classic


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["fp8", "int8"])
@pytest.mark.parametrize("m", [1, 113, 4224])
def test_quant_linear_triton_backend(method, m, rng):
    require_cuda((8, 9) if method == "fp8" else (8, 0))
    lin = torch.nn.Linear(3072, 1536).to(torch.bfloat16).cuda()
    wrapper = torch.nn.Sequential(lin)
    report = quantize_(wrapper, method)
    layer = wrapper[0]
    assert layer.backend == "triton", report
    x = (torch.randn(m, 3072, generator=rng) * 2).to(torch.bfloat16).cuda()
    out = layer(x)
    xq, xs = REF[method](x)
    _check_budget(out, xq, xs, layer.qweight, layer.weight_scale, layer.bias)


@pytest.mark.gpu
@pytest.mark.parametrize("quant", ["kernel", "inductor"])
@pytest.mark.parametrize("method", ["fp8", "int8"])
def test_compile_fullgraph_gpu_matches_eager(method, quant, rng, monkeypatch):
    """Every way of quantizing activations under compile (triton_ops.COMPILED_QUANT)."""
    require_cuda((8, 9) if method == "fp8" else (8, 0))
    monkeypatch.setattr(triton_ops, "COMPILED_QUANT", quant)
    model = _Block(256).to(torch.bfloat16).cuda()
    quantize_(model, {"method": method, "backend": "triton"})
    x = torch.randn(2, 300, 256, generator=rng).to(torch.bfloat16).cuda()
    t = torch.randn(2, 256, generator=rng).to(torch.bfloat16).cuda()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    out, ref = compiled(x, t), model(x, t)
    assert torch.isfinite(out).all()
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= 0.05 * ref.float().abs().max().item(), err


@pytest.mark.parametrize("method", ["fp8", "int8"])
def test_eager_quantizes_a_shared_activation_once(method, rng, monkeypatch):
    """q, k and v read the same activation: one quantization serves all three, outputs unchanged;
    an in-place write, another tensor or an inference tensor is quantized afresh."""
    calls = []
    impl = triton_ops.quantize_per_token_impl
    monkeypatch.setattr(triton_ops, "quantize_per_token_impl", lambda x, fmt: calls.append(x.shape) or impl(x, fmt))
    triton_ops.release_shared_quantization()
    model = torch.nn.ModuleDict({n: torch.nn.Linear(48, 32 + 16 * i) for i, n in enumerate("qkv")}).to(torch.bfloat16)
    quantize_(model, method)
    x = torch.randn(2, 11, 48, generator=rng).to(torch.bfloat16)

    def run(t):
        return [triton_ops.triton_linear(model[n], t.reshape(-1, 48)) for n in "qkv"]

    shared = run(x)
    assert len(calls) == 1
    for n, out in zip("qkv", shared, strict=True):
        xq, xs = REF[method](x.reshape(-1, 48))
        torch.testing.assert_close(out, triton_ops._mm_ref(xq, xs, model[n].qweight, model[n].weight_scale,
                                                           model[n].bias, torch.bfloat16), rtol=0, atol=0)
    x.mul_(2)  # in place: the version counter moves, the cached quantization must not be used
    doubled = run(x)
    assert len(calls) == 2 and not torch.equal(doubled[0], shared[0])
    run(x.clone())
    assert len(calls) == 3
    with torch.inference_mode():
        run(torch.randn(3, 48).to(torch.bfloat16))
    assert len(calls) == 6
    triton_ops.release_shared_quantization()


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["fp8", "int8"])
def test_shared_activation_quantization_on_gpu(method, rng):
    """q/k/v through the triton backend on CUDA: the shared quantization gives the same bits as
    quantizing for each layer, and each output stays within the GEMM budget."""
    require_cuda((8, 9) if method == "fp8" else (8, 0))
    model = torch.nn.ModuleDict({n: torch.nn.Linear(320, 64 * (i + 1)) for i, n in enumerate("qkv")})
    model = model.to(torch.bfloat16).cuda()
    quantize_(model, {"method": method, "backend": "triton"})
    x = _rows(77, 320, rng, torch.bfloat16, "cuda")
    with torch.no_grad():
        shared = [model[n](x) for n in "qkv"]
        separate = []
        for n in "qkv":
            triton_ops.release_shared_quantization()
            separate.append(model[n](x))
    triton_ops.release_shared_quantization()
    xq, xs = REF[method](x)
    for n, a, b in zip("qkv", shared, separate, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        lay = model[n]
        _check_budget(a, xq, xs, lay.qweight, lay.weight_scale, lay.bias)
