"""pytest-benchmark suite for ``multiplicative_update_`` (W ← D W in place).

    pytest benchmarks/bench_update.py --benchmark-only            # CPU sizes always, GPU sizes with CUDA

Compared: the plain-PyTorch chunked default ("torch"), the CUDA C++ extension ("cuda", GPU only,
when it builds) and, for scale, one bf16 cuBLAS GEMM of the same shape ("bf16_gemm": D_bf16 @ W,
out of place) — the floor a bf16-accurate update could reach. The CUDA kernel keeps fp32
accuracy (D split into three bf16 terms on tensor cores), so about 3x the GEMM is its target.
GPU shape: a 70B model's MLP down projection, d 8192, d_in 28672 (bf16 W of 470 MB).
"""

from __future__ import annotations

import pytest
import torch

from zu_fast.ops import backend_fn, cuda_backend

HAS_CUDA = torch.cuda.is_available()
CPU_SHAPES = [(256, 1024), (512, 2048)]
GPU_SHAPES = [(8192, 28672)]


def _edit(d: int, device: str, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(0)
    return (torch.eye(d, device=device) + 1e-3 * torch.randn(d, d, device=device, generator=g)).to(dtype)


@pytest.mark.parametrize("d,d_in", CPU_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_update_cpu_torch(benchmark, d, d_in, dtype):
    W = torch.randn(d, d_in).to(dtype)
    D = _edit(d, "cpu")
    fn = backend_fn("multiplicative_update_", "torch")
    benchmark.group = f"update cpu {d}x{d_in} {dtype}"
    benchmark(fn, W, D)


def _gpu_call(impl: str, W: torch.Tensor, D: torch.Tensor, D16: torch.Tensor):
    if impl == "bf16_gemm":
        def run():
            torch.mm(D16, W)
            torch.cuda.synchronize()
    else:
        fn = backend_fn("multiplicative_update_", impl)

        def run():
            fn(W, D)
            torch.cuda.synchronize()
    return run


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("d,d_in", GPU_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("layout", ["row", "col"])
@pytest.mark.parametrize("impl", ["bf16_gemm", "torch", "cuda"])
def test_update_gpu(benchmark, impl, layout, d, d_in):
    if impl == "cuda" and not cuda_backend.is_available():
        pytest.skip(f"cuda backend unavailable: {cuda_backend.why_unavailable()}")
    W = torch.randn(d, d_in, device="cuda").to(torch.bfloat16)
    if layout == "col":
        W = W.t().contiguous().t()
    D = _edit(d, "cuda")
    D16 = D.to(torch.bfloat16)
    run = _gpu_call(impl, W, D, D16)
    run()  # warm-up (and the JIT build, if any)
    benchmark.group = f"update gpu {d}x{d_in} bf16 {layout}"
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
