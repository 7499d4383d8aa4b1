"""The fused kernel's fast math, checked over whole input domains on the GPU (no sampling):

- the branch-free tanhf equals libdevice's tanhf for all 2^32 float32 inputs;
- the reciprocal division (`triton_quant._quotient`) gives the IEEE division's codes for every
  (amax, y) pair a bf16 / fp16 row can hold, at both formats' qmax, and its quotient bits wherever
  the quotient is >= 2^-30 (below, the last bits may differ: the fma residual underflows);
- the kernel's rounded GELU equals torch's CUDA F.gelu(approximate="tanh") for every bf16 and fp16
  input (so, with the tanhf check, for every input of those dtypes the fused kernel sees).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import require_cuda


@pytest.mark.gpu
def test_branch_free_tanhf_is_libdevice_for_every_float32():
    require_cuda()
    from tests.quantization import exhaustive_kernels as ek

    count = torch.zeros(1, dtype=torch.int32, device="cuda")
    per_program = 2**18
    ek.tanh_mismatch_kernel[(2**32 // per_program,)](count, PER_PROGRAM=per_program, BLOCK=1024)
    assert count.item() == 0, f"{count.item()} of 2^32 float32 inputs differ"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_reciprocal_division_is_ieee_for_every_half_pair(dtype, fmt):
    require_cuda()
    from tests.quantization import exhaustive_kernels as ek

    max_finite = torch.tensor(torch.finfo(dtype).max, dtype=dtype).view(torch.int16).item()
    count = torch.zeros(3, dtype=torch.int32, device="cuda")
    ek.division_mismatch_kernel[(max_finite + 1,)](
        count, QMAX=127.0 if fmt == "int8" else 448.0, IS_INT8=fmt == "int8", IS_BF16=dtype == torch.bfloat16,
        BLOCK=1024)
    bad_quotients, bad_codes, tiny = count.tolist()
    print(f"{tiny} quotients below 2^-30 differ in their last bits (codes equal)")
    assert (bad_quotients, bad_codes) == (0, 0), f"{bad_quotients} quotients >= 2^-30, {bad_codes} codes differ"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_gelu_is_torch_for_every_half_input(dtype):
    require_cuda()
    from diffquant.quantization.kernels import triton_quant as tq
    from tests.quantization import exhaustive_kernels as ek

    x = torch.arange(-(2**15), 2**15, dtype=torch.int32, device="cuda").to(torch.int16).view(dtype)
    x = x[x.isfinite()]
    want = F.gelu(x, approximate="tanh")
    for tanh in (tq.TANH_SELECT, tq.TANH_LIBDEVICE):  # the default and the form it replaced
        got = torch.empty_like(x)
        ek.gelu_kernel[((x.numel() + 1023) // 1024,)](x, got, x.numel(), TANH=tanh, BLOCK=1024)
        differ = (got.view(torch.int16) != want.view(torch.int16)) & ~(got.isnan() & want.isnan())
        assert not differ.any(), f"tanh {tanh}: {int(differ.sum())} inputs differ, e.g. {x[differ][:5].tolist()}"
