"""pytest-benchmark suite for ``multiplicative_update_`` (W ← D W in place) with real-edit D.

    pytest benchmarks/bench_update.py --benchmark-only            # CPU sizes always, GPU sizes with CUDA

The edit is what unlearning makes: D = I + E, E = 0.01·I + a rank-64 part of size ~0.3
(``update_table.real_edit``). Compared: the plain-PyTorch chunked default ("torch"), the Triton
kernel ("triton", GPU only), the CUDA C++ extension ("cuda", GPU only, when it builds) and, for
scale, one bf16 cuBLAS GEMM of the same shape
("bf16_gemm": D_bf16 @ W, out of place) — the floor a bf16-accurate update could reach. Forms:
"delta" (E in fp32, ``form="delta"``: what a saved edit stores, the tensor-core path) and
"mult64" (D in float64: what edit.py passed before). GPU shape: a 70B model's MLP down projection,
d 8192, d_in 28672 (bf16 W of 470 MB). ``benchmarks/update_table.py`` prints the same comparison as
one table, with accuracy columns.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

from zu_fast.ops import backend_fn, cuda_backend, registry

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from update_table import real_edit  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
CPU_SHAPES = [(256, 1024), (512, 2048)]
GPU_SHAPES = [(8192, 28672)]


def _operand(form: str, E64: torch.Tensor) -> tuple[torch.Tensor, str]:
    if form == "delta":
        return E64.float(), "delta"
    return torch.eye(E64.shape[0], device=E64.device, dtype=torch.float64) + E64, "multiplier"


@pytest.mark.parametrize("d,d_in", CPU_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("form", ["delta", "mult64"])
def test_update_cpu_torch(benchmark, d, d_in, dtype, form):
    W = torch.randn(d, d_in).to(dtype)
    M, f = _operand(form, real_edit(d, "cpu"))
    fn = backend_fn("multiplicative_update_", "torch")
    benchmark.group = f"update cpu {d}x{d_in} {dtype} {form}"
    benchmark(fn, W, M, form=f)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("d,d_in", GPU_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("layout", ["row", "col"])
@pytest.mark.parametrize("form", ["delta", "mult64"])
@pytest.mark.parametrize("impl", ["bf16_gemm", "torch", "triton", "cuda"])
def test_update_gpu(benchmark, impl, form, layout, d, d_in):
    if impl == "cuda" and not cuda_backend.is_available():
        pytest.skip(f"cuda backend unavailable: {cuda_backend.why_unavailable()}")
    if impl == "triton" and not registry.get_op("multiplicative_update_").backends["triton"].is_available():
        pytest.skip("triton backend unavailable")
    if impl == "bf16_gemm" and form != "delta":
        pytest.skip("one floor per layout")
    W = torch.randn(d, d_in, device="cuda").to(torch.bfloat16)
    if layout == "col":
        W = W.t().contiguous().t()
    E64 = real_edit(d, "cuda")
    M, f = _operand(form, E64)
    if impl == "bf16_gemm":
        D16 = (torch.eye(d, device="cuda", dtype=torch.float64) + E64).to(torch.bfloat16)

        def run():
            torch.mm(D16, W)
            torch.cuda.synchronize()
    else:
        fn = backend_fn("multiplicative_update_", impl)

        def run():
            fn(W, M, form=f)
            torch.cuda.synchronize()

    run()  # warm-up (and the JIT build, if any)
    benchmark.group = f"update gpu {d}x{d_in} bf16 {layout}"
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
