"""The leverage rule (method/leverage.py): diag(H) is the fraction of each residual the closed form realises."""

from __future__ import annotations

import pytest
import torch

from zu_fast import UnlearnConfig, ZuFastError
from zu_fast.method.closed_form import multiplier, narrow_multiplier
from zu_fast.method.leverage import forget_weight_for, leverage_spectrum, mean_leverage
from zu_fast.stats.moments import LayerStats


def problem(d=20, d_in=36, N=6, n_tok=400, seed=0, dup=False):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d, d_in, generator=g, dtype=torch.float64) / d_in**0.5  # [d, d_in]
    keys = torch.randn(n_tok, d_in, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2.0, d_in)
    st = LayerStats(3, keys.t() @ keys, keys.sum(0), n_tok)  # fp64 sums: exact identities below
    K = torch.randn(d_in, N, generator=g, dtype=torch.float64)  # [d_in, N]
    if dup:
        K[:, -1] = K[:, 0]
    R = torch.randn(d, N, generator=g, dtype=torch.float64)  # [d, N]
    return W, st, K, R


def test_leverage_is_the_realised_fraction_of_the_residual():
    W, st, K, R = problem()
    n = st.n
    # λ_wV (n/(n−1)) = λ_wK and no projector: then A = B + λ_f R Vᵀ and (D − I) V = R H exactly
    cfg = UnlearnConfig(layers=[3], mom2_update_weight_wv=15000.0 * (n - 1) / n, projector_eps=0.0,
                        forget_weight_fk=300.0, forget_weight_fv=300.0)
    info: dict = {}
    D = multiplier(W, st, K, R, torch.zeros(W.shape[0], 0, dtype=torch.float64), cfg, precision="fp64", info=info)
    V = W @ K  # [d, N]
    G = W @ st.second_moment(torch.float64) @ W.t()
    B = 15000.0 * G + 300.0 * V @ V.t() + W @ W.t()
    H = 300.0 * V.t() @ torch.linalg.solve(B, V)  # [N, N]
    moved = (D - torch.eye(W.shape[0], dtype=torch.float64)) @ V
    assert torch.allclose(moved, R @ H, atol=1e-9 * R.norm())
    assert info["leverage_mean"] == pytest.approx(float(H.diag().mean()), rel=1e-9)
    assert info["leverage_min"] == pytest.approx(float(H.diag().min()), rel=1e-9)
    assert 0.0 < info["leverage_mean"] < 1.0


@pytest.mark.parametrize("target", [0.3, 0.7, 0.95])
@pytest.mark.parametrize("form", ["fast", "exact"])
def test_rule_reaches_the_target_and_is_the_plain_solve_at_that_weight(target, form):
    W, st, K, R = problem(seed=1)
    U = torch.linalg.qr(torch.randn(W.shape[0], 3, dtype=torch.float64))[0]  # [d, 3]
    cfg = UnlearnConfig(layers=[3], forget_leverage=target, forget_weight_fk=1.0, forget_weight_fv=2.0)
    info: dict = {}
    D = multiplier(W, st, K, R, U, cfg, form=form, precision="fp64", info=info)
    assert info["leverage_mean"] == pytest.approx(target, abs=1e-6)
    assert info["forget_weight_fv"] == pytest.approx(2.0 * info["forget_weight_fk"])  # ratio kept
    plain = cfg.replace(forget_leverage=None, forget_weight_fk=info["forget_weight_fk"],
                        forget_weight_fv=info["forget_weight_fv"])
    D_plain = multiplier(W, st, K, R, U, plain, form=form, precision="fp64")
    assert (D - D_plain).norm() / D_plain.norm() < 1e-10


def test_configured_weight_is_a_floor():
    W, st, K, R = problem(seed=2)
    cfg = UnlearnConfig(layers=[3], forget_weight_fk=1e9, forget_weight_fv=1e9, forget_leverage=0.5)
    info: dict = {}
    multiplier(W, st, K, R, torch.zeros(W.shape[0], 0, dtype=torch.float64), cfg, precision="fp64", info=info)
    assert info["forget_weight_fk"] == 1e9 and info["leverage_mean"] > 0.5


def test_rank_deficient_forget_set_is_capped_not_looping():
    W, st, K, R = problem(seed=3, dup=True)  # two identical keys: rank N − 1
    G = W @ st.second_moment(torch.float64) @ W.t()
    mu = leverage_spectrum(15000.0 * G + W @ W.t(), W @ K)
    lam = forget_weight_for(mu, 0.99, 50.0)
    reach = (K.shape[1] - 1) / K.shape[1]
    assert mean_leverage(mu, lam) == pytest.approx(0.999 * reach, rel=1e-6)


def test_narrow_expert_reaches_the_target():
    W, st, K, R = problem(d=30, d_in=12, N=4, seed=4)  # d_in < d: B is singular, range(W) solve
    cfg = UnlearnConfig(layers=[3], forget_leverage=0.6)
    info: dict = {}
    D = narrow_multiplier(W, st, K, R, torch.zeros(30, 0, dtype=torch.float64), cfg, info=info)
    assert torch.isfinite(D).all()
    assert info["leverage_mean"] == pytest.approx(0.6, abs=1e-6)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.2, 1.5])
def test_out_of_range_target_is_refused(bad):
    with pytest.raises(ZuFastError, match="forget_leverage"):
        UnlearnConfig(layers=[3], forget_leverage=bad)
