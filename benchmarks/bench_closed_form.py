"""pytest-benchmark: the closed-form multiplier, fast vs exact (dense) form, and the W·C·Wᵀ product.

    pytest benchmarks/bench_closed_form.py --benchmark-only

CPU sizes always; 8B shapes (d 4096, d_ff 14336) when CUDA is present.
"""

from __future__ import annotations

import pytest
import torch

from zu_fast import UnlearnConfig
from zu_fast.method.closed_form import gram_wcw, multiplier
from zu_fast.method.projector import representation_basis
from zu_fast.stats.moments import LayerStats

CPU_SHAPES = [(128, 512), (256, 1024)]
GPU_SHAPES = [(4096, 14336)]


def _problem(d, d_in, device, dtype, N=10):
    g = torch.Generator(device="cpu").manual_seed(0)
    W = (torch.randn(d, d_in, generator=g) / d_in**0.5).to(device, dtype)
    A = torch.randn(d_in, d_in // 4, generator=g).to(device)
    kk = A @ A.t() * 100  # [d_in, d_in] symmetric PSD, as if from 100·d_in/4 tokens
    st = LayerStats(0, kk.float(), torch.randn(d_in, generator=g, dtype=torch.float64).to(device), 100 * d_in)
    K = torch.randn(d_in, N, generator=g).to(device)
    R = 0.1 * torch.randn(d, N, generator=g).to(device)
    U = representation_basis(torch.randn(d, N, generator=g, dtype=torch.float64)).to(device)
    return W, st, K, R, U


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _params():
    out = [pytest.param("cpu", torch.float32, s, id=f"cpu-{s[0]}x{s[1]}") for s in CPU_SHAPES]
    if torch.cuda.is_available():
        out += [pytest.param("cuda", torch.bfloat16, s, id=f"cuda-bf16-{s[0]}x{s[1]}") for s in GPU_SHAPES]
    return out


@pytest.mark.parametrize("device,dtype,shape", _params())
@pytest.mark.parametrize("form", ["fast", "exact"])
def test_multiplier(benchmark, device, dtype, shape, form):
    if form == "exact" and device == "cuda":
        pytest.skip("the dense float64 form at 8B shapes is the slow reference; timed on CPU sizes only")
    W, st, K, R, U = _problem(*shape, device, dtype)
    cfg = UnlearnConfig(layers=[0])

    def run():
        D = multiplier(W, st, K, R, U, cfg, form=form)
        _sync(device)
        return D

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("device,dtype,shape", _params())
@pytest.mark.parametrize("precision", ["fp64", "fp32", "bf16x2"])
def test_gram(benchmark, device, dtype, shape, precision):
    if precision == "fp64" and device == "cuda":
        pytest.skip("fp64 on GPU is not a candidate")
    W, st, *_ = _problem(*shape, device, dtype)
    Wp = W.to(torch.bfloat16) if precision == "bf16x2" else W

    def run():
        G = gram_wcw(Wp, st.kk, precision=precision)
        _sync(device)
        return G

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
