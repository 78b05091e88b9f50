"""How much of each residual the closed form realises, and the forget weight that sets it.

With B₀ = W(λ_wK C + λI)Wᵀ  # [d, d] (the corpus and regulariser part of B) and the forget values'
linear part V = W K_f  # [d, N], the closed form's B = B₀ + λ_fK V Vᵀ. For one layer on its own (P = I,
λ_fV = λ_fK) the edit moves the forget outputs by (D − I) V = R H with the hat matrix

    H = λ_fK Vᵀ B⁻¹ V = I − (I + λ_fK M)⁻¹,   M = Vᵀ B₀⁻¹ V  # [N, N]   (Woodbury)

so diag(H) — the *leverage* of each request against the corpus — is the fraction of its residual the
edit realises, between 0 (the corpus term wins) and 1 (the residual is written exactly). Its mean is
Σ_j λμ_j / (1 + λμ_j) / N over M's eigenvalues μ_j: monotone in λ_fK, so one bisection over log λ
finds the forget weight that gives a chosen mean leverage. The paper's λ_fK = 50 against λ_wK = 15000
was tuned on 3–8B models; on a narrow model the same weights realise a fifth of the residual
(benchmarks/RESULTS.md, "The closed form on the small model: why it did not forget").
"""

from __future__ import annotations

import math

import torch


def _spd_solve(B: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """B⁻¹ Y for symmetric PSD B (Cholesky; eigen-pseudo-inverse when B is singular)."""
    L, info = torch.linalg.cholesky_ex(B)
    if int(info) == 0:
        return torch.cholesky_solve(Y, L)
    evals, evecs = torch.linalg.eigh(B)
    keep = evals > evals.abs().max() * 1e-12
    return evecs[:, keep] @ ((evecs[:, keep].t() @ Y) / evals[keep, None])


def leverage_spectrum(B0: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """Eigenvalues μ  # [N] of M = Vᵀ B₀⁻¹ V (float64): B₀ [d, d], V [d, N]."""
    M = V.t() @ _spd_solve(B0, V)  # [N, N]
    return torch.linalg.eigvalsh(0.5 * (M + M.t())).clamp_min(0.0)


def mean_leverage(mu: torch.Tensor, lam_f: float) -> float:
    """Mean of diag(H) at forget weight λ_fK (= tr H / N)."""
    return float((lam_f * mu / (1.0 + lam_f * mu)).sum() / mu.numel())


def request_leverage(B: torch.Tensor, V: torch.Tensor, lam_f: float) -> torch.Tensor:
    """diag(H) = λ_fK diag(Vᵀ B⁻¹ V)  # [N] with the full B (what the edit realises per request)."""
    return lam_f * (V * _spd_solve(B, V)).sum(0)


def forget_weight_for(mu: torch.Tensor, target: float, lam_f: float) -> float:
    """The forget weight whose mean leverage is ``target`` (capped just below what M's rank allows).

    ``lam_f``: the configured weight, where the search starts. Returns it unchanged when it already gives
    the target (the rule only raises the weight: the configured value is a floor).
    """
    n = mu.numel()
    reachable = int((mu > mu.max() * 1e-12).sum()) / n if n and float(mu.max()) > 0 else 0.0
    goal = min(target, 0.999 * reachable)
    if goal <= 0 or mean_leverage(mu, lam_f) >= goal:
        return lam_f
    lo, hi = math.log(lam_f), math.log(lam_f)
    while mean_leverage(mu, math.exp(hi)) < goal:
        hi += math.log(10.0)
        if hi - lo > 80:  # 1e35× the configured weight: numerically unreachable
            return math.exp(hi)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if mean_leverage(mu, math.exp(mid)) < goal else (lo, mid)
    return math.exp(hi)
