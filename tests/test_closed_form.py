"""The closed form: fast vs exact (dense) form, normal equations, the big product's precision."""

from __future__ import annotations

import pytest
import torch

from zu_fast import UnlearnConfig, ZuFastError
from zu_fast.method.closed_form import gram_wcw, multiplier, objective
from zu_fast.method.projector import Projector, representation_basis
from zu_fast.stats.moments import LayerStats


def random_problem(d=24, d_in=40, N=5, n_tok=300, seed=0, bias=False, measured=False):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d, d_in, generator=g, dtype=torch.float64) / d_in**0.5  # [d, d_in]
    b = torch.randn(d, generator=g, dtype=torch.float64) if bias else None
    keys = torch.randn(n_tok, d_in, generator=g, dtype=torch.float64) + 0.3  # [n, d_in], non-zero mean
    st = LayerStats(7, (keys.t() @ keys).float(), keys.sum(0), n_tok)
    if measured:
        vals = keys @ W.t() + (b if b is not None else 0)  # [n, d]
        st.vk, st.vs = (vals.t() @ keys).float(), vals.sum(0)
    K = torch.randn(d_in, N, generator=g, dtype=torch.float64)  # [d_in, N]
    R = 0.1 * torch.randn(d, N, generator=g, dtype=torch.float64)  # [d, N]
    U = representation_basis(torch.randn(d, N, generator=g, dtype=torch.float64))  # [d, N]
    return W, b, st, K, R, U


@pytest.mark.parametrize("centered", [True, False])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("measured", [False, True])
@pytest.mark.parametrize("projector_on", ["all", "forget"])
def test_fast_matches_exact_float64(centered, bias, measured, projector_on):
    W, b, st, K, R, U = random_problem(bias=bias, measured=measured, seed=int(centered) + 2 * int(bias))
    cfg = UnlearnConfig(layers=[7], centered_cross_moment=centered, gram_chunk=16,  # several chunks
                        closed_form={"projector_on": projector_on})
    D_fast = multiplier(W, st, K, R, U, cfg, bias=b, form="fast", precision="fp64")
    D_exact = multiplier(W, st, K, R, U, cfg, bias=b, form="exact")
    rel = (D_fast - D_exact).norm() / D_exact.norm()
    assert rel < 1e-6, rel
    assert (D_fast - torch.eye(W.shape[0], dtype=torch.float64)).norm() > 1e-3  # a real edit


def test_derived_equals_measured_cross_moment():
    W, b, st, K, R, U = random_problem(bias=True, measured=True)
    cfg = UnlearnConfig(layers=[7])
    D_measured = multiplier(W, st, K, R, U, cfg, bias=b, precision="fp64")
    st.vk = st.vs = None
    D_derived = multiplier(W, st, K, R, U, cfg, bias=b, precision="fp64")
    # Σvkᵀ was rounded to fp32 once: agreement at fp32 level
    assert (D_measured - D_derived).norm() / D_derived.norm() < 1e-5


@pytest.mark.parametrize("centered", [True, False])
@pytest.mark.parametrize("projector_on", ["all", "forget"])
def test_normal_equations_gradient_vanishes(centered, projector_on):
    W, b, st, K, R, U = random_problem(d=16, d_in=28, N=4, seed=3)
    cfg = UnlearnConfig(layers=[7], centered_cross_moment=centered, closed_form={"projector_on": projector_on})
    D = multiplier(W, st, K, R, U, cfg, precision="fp64").requires_grad_(True)
    C = st.second_moment(torch.float64)
    X = st.cross_moment(W, None, centered)
    P = Projector(U, cfg.representation.projector_eps).dense()
    J = objective(D, W, C, X, K, W @ K, R, P, cfg)
    (grad,) = torch.autograd.grad(J, D)
    # scale: the gradient's two terms separately, ‖2DB‖
    D2 = D.detach().clone().requires_grad_(True)
    J_perturbed = objective(D2 + 0.1 * torch.eye(16, dtype=torch.float64), W, C, X, K, W @ K, R, P, cfg)
    (grad_off,) = torch.autograd.grad(J_perturbed, D2)
    assert grad.norm() < 1e-8 * grad_off.norm() + 1e-10, (grad.norm(), grad_off.norm())


def test_projector_never_dense_matches_dense():
    g = torch.Generator().manual_seed(0)
    U = representation_basis(torch.randn(10, 3, generator=g, dtype=torch.float64))
    P = Projector(U, 0.01)
    Y = torch.randn(10, 4, generator=g, dtype=torch.float64)
    assert torch.allclose(P.apply(Y), P.dense() @ Y, atol=1e-12)
    assert torch.allclose(U.t() @ U, torch.eye(3, dtype=torch.float64), atol=1e-12)


def test_basis_drops_dependent_directions():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(12, 2, generator=g, dtype=torch.float64)
    R = torch.cat([a, a[:, :1] * 2.0], 1)  # rank 2
    assert representation_basis(R).shape == (12, 2)
    with pytest.raises(ZuFastError):
        representation_basis(torch.zeros(12, 3))


@pytest.mark.parametrize("precision,tol", [("fp32", 1e-5), ("bf16x2", 5e-5)])
def test_gram_precision_vs_float64(precision, tol):
    g = torch.Generator().manual_seed(1)
    W = (torch.randn(48, 80, generator=g) / 9).to(torch.bfloat16)  # [d, d_in]
    keys = torch.randn(500, 80, generator=g)
    kk = keys.t() @ keys  # [d_in, d_in]
    ref = W.double() @ kk.double() @ W.double().t()
    G = gram_wcw(W, kk, chunk=32, precision=precision)
    assert ((G - ref).norm() / ref.norm()) < tol


def test_singular_system_is_a_clear_error():
    W, b, st, K, R, U = random_problem(d=8, d_in=12, N=2)
    st.kk.zero_()
    st.ks.zero_()
    cfg = UnlearnConfig(layers=[7], regularization_lam=0.0)
    with pytest.raises(ZuFastError, match="layer 7.*singular"):
        multiplier(W, st, K, R, U, cfg, precision="fp64")


def test_nan_statistics_are_refused():
    W, b, st, K, R, U = random_problem(d=8, d_in=12, N=2)
    st.kk[0, 0] = float("nan")
    with pytest.raises(ZuFastError, match="layer 7.*NaN"):
        multiplier(W, st, K, R, U, UnlearnConfig(layers=[7]))


def test_projecting_only_the_forget_targets_keeps_the_corpus_outputs():
    """projector_on="forget": the corpus outputs keep their component along U (with "all" every output of the
    layer loses it: D ≈ P on the corpus), while the forget outputs are projected in both."""
    W, b, st, K, R, U = random_problem(d=24, d_in=40, N=3, seed=5)
    C = st.second_moment(torch.float64)
    moved = {}
    for scope in ("all", "forget"):
        cfg = UnlearnConfig(layers=[7], closed_form={"projector_on": scope})
        D = multiplier(W, st, K, R, U, cfg, precision="fp64")  # [d, d]
        E = D - torch.eye(24, dtype=torch.float64)
        moved[scope] = float(torch.trace(E @ W @ C @ W.t() @ E.t()) / torch.trace(W @ C @ W.t()))  # corpus change
    assert moved["forget"] < 0.2 * moved["all"], moved
