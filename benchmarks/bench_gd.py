"""pytest-benchmark: ZeroUnlearn-GD, zu_fast's gd_update vs the dense float64 reference.

    pytest benchmarks/bench_gd.py --benchmark-only

CPU at the small model's shape (d 128, d_ff 512) always; 8B shapes (d 4096, d_ff 14336) on CUDA when
present (fast form only, a fixed number of steps: the dense reference there is the slow thing being
replaced). ``null_variable`` is ``gd_variable="null"`` for the full step count. For the printed
comparison table with quality columns see benchmarks/gd_speed.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_gd import gd_problem, reference_gd  # noqa: E402

from zu_fast import UnlearnConfig  # noqa: E402
from zu_fast.method.gd import eigh_of, gd_update  # noqa: E402


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _params():
    out = [pytest.param("cpu", 128, 512, 0.5, id="cpu-128x512-null50")]
    if torch.cuda.is_available():
        out += [pytest.param("cuda", 4096, 14336, f, id=f"cuda-4096x14336-null{int(f * 100)}") for f in (0.25, 0.75)]
    return out


@pytest.fixture(autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # stable timings on a shared CPU
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("device,d,d_in,null_frac", _params())
@pytest.mark.parametrize("impl", ["fast", "fast_full", "null_variable", "reference"])
def test_gd(benchmark, device, d, d_in, null_frac, impl):
    if impl == "reference" and device == "cuda":
        pytest.skip("the dense float64 reference at 8B shapes: timed per step by benchmarks/gd_speed.py")
    W, st, K, R, U, _ = gd_problem(d=d, d_in=d_in, N=50, null_frac=null_frac, seed=0)
    if device == "cuda":
        W, K, R, U = (x.cuda() for x in (W.bfloat16(), K, R, U))
        st = st.to("cuda")
    cfg = UnlearnConfig(layers=[3], gd_steps=500 if device == "cpu" else 100)
    eigh_of(st)  # the per-layer eigendecomposition is cached: time the steady state

    def run():
        if impl == "reference":
            out = reference_gd(W, st.second_moment(torch.float64), K, R, U, cfg)[0]
        elif impl == "null_variable":  # Adam on the null-space coordinates: same objective, other iterates
            out = gd_update(W, st, K, R, U, cfg.replace(gd_variable="null"), tol=0.0)[0]
        else:
            out = gd_update(W, st, K, R, U, cfg, tol=None if impl == "fast" else 0.0)[0]
        _sync(device)
        return out

    benchmark.pedantic(run, rounds=2 if impl == "reference" else 3, warmup_rounds=0)
