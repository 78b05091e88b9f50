"""Step 5: the closed-form multiplier D (W ← D W) for one layer.

Normal equations (docs/algorithm.md, step 5): D · W (KKT + λI) Wᵀ = P (VKT + λW) Wᵀ with
    KKT = λ_wK C + λ_fK K_f K_fᵀ                # [d_in, d_in]
    VKT = λ_wV X + λ_fV (V_f + R) K_fᵀ          # [d, d_in]
so D = A B⁻¹ with B = W (KKT + λI) Wᵀ (SPD) and A = P (VKT + λW) Wᵀ, both [d, d].

Two forms compute the same D:
- ``exact``: the dense formulation as written above (float64; for verification).
- ``fast`` (default): nothing of size d×d_in besides W. With G = W C Wᵀ (one big product, in column
  chunks of C) and the thin terms W μ_k, W K_f, R, W Wᵀ:
      B = λ_wK G + λ_fK (W K_f)(W K_f)ᵀ + λ W Wᵀ
      A = P [ λ_wV X Wᵀ + λ_fV (V_f + R)(W K_f)ᵀ + λ W Wᵀ ]
  where the reference's (effectively uncentred) cross moment X = (1/(n−1)) Σ v kᵀ gives
  X Wᵀ = (n/(n−1)) (G + b (W μ_k)ᵀ) exactly (v = W k + b), the centred option
  X Wᵀ = (n/(n−1)) (G − (W μ_k)(W μ_k)ᵀ) (the bias cancels on centring), and P is applied as
  (1+ε)Y − U(UᵀY).
B is solved by Cholesky in float64 (it is only d×d).

Retain keys K_r [d_in, M] (``unlearn(..., retain=...)``; not in the reference, whose retain_*_lam weights no code
reads) add the demand that the retain records' outputs stay what they are, D W k_r = W k_r, with weights λ_rK, λ_rV:
      B += λ_rK (W K_r)(W K_r)ᵀ,      A += λ_rV (W K_r)(W K_r)ᵀ
(thin terms only). The retain target is W K_r itself, outside P: P would remove from the retain outputs the
directions of the forgotten facts' original representations, which a same-subject retain output shares. With the
leverage rule, λ_rK and λ_rV are raised by the same factor as the forget weights.
"""

from __future__ import annotations

import torch

from ..config import UnlearnConfig
from ..errors import ZuFastError
from ..stats.moments import LayerStats
from .leverage import forget_weight_for, leverage_spectrum, request_leverage
from .projector import Projector

# The retain term's target: the retain outputs W K_r as they are (False), or P W K_r as the corpus term's (True).
# Measured on the small model (docs/design-notes.md, "Retain set"); both are verified against the dense form.
RETAIN_PROJECTED = False

# --------------------------------------------------------------------------- products ------


def _resolve_precision(precision: str, W: torch.Tensor) -> str:
    if precision != "auto":
        return precision
    if W.device.type == "cpu":
        return "fp64"
    return "bf16x2" if W.dtype == torch.bfloat16 else "fp32"


def _split_bf16(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x ≈ hi + lo with hi, lo bf16: 16 mantissa bits, ~1.5e-5 relative (two tensor-core passes)."""
    hi = x.to(torch.bfloat16)
    lo = (x - hi.float()).to(torch.bfloat16)
    return hi, lo


def _mm32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b of bf16 operands with fp32 accumulation and output (tensor cores on CUDA)."""
    try:
        return torch.mm(a, b, out_dtype=torch.float32)
    except (TypeError, RuntimeError):
        return a.float() @ b.float()


def gram_wcw(W: torch.Tensor, kk: torch.Tensor, chunk: int = 4096, precision: str = "auto") -> torch.Tensor:
    """G = W · kk · Wᵀ   # [d, d] float64, for symmetric kk [d_in, d_in] (any device; moved in chunks).

    Cost d·d_in² flops (the one big product). ``precision``:
      fp64   — float64 throughout (CPU default);
      fp32   — float32 products, float64 accumulation across chunks;
      bf16x2 — W must be bf16 (exact); C and the intermediate are split into bf16 hi+lo pairs, so
               every product runs on bf16 tensor cores with fp32 accumulation (~1e-5 relative).
    """
    precision = _resolve_precision(precision, W)
    d, d_in = W.shape
    dev = W.device
    G = torch.zeros(d, d, dtype=torch.float64, device=dev)
    with torch.no_grad():
        for j in range(0, d_in, chunk):
            J = slice(j, min(j + chunk, d_in))
            cJ = kk[:, J].to(dev)  # [d_in, c]
            if precision == "fp64":
                T = W.to(torch.float64) @ cJ.to(torch.float64)  # [d, c]
                G += T @ W[:, J].to(torch.float64).t()
            elif precision == "fp32":
                T = W.float() @ cJ.float()
                G += (T @ W[:, J].float().t()).double()
            elif precision == "bf16x2":
                if W.dtype != torch.bfloat16:
                    raise ZuFastError("gram precision bf16x2 needs a bf16 weight (exact in bf16)")
                hi, lo = _split_bf16(cJ.float())
                T = _mm32(W, hi) + _mm32(W, lo)  # [d, c] fp32
                t_hi, t_lo = _split_bf16(T)
                WJt = W[:, J].t()
                G += (_mm32(t_hi, WJt) + _mm32(t_lo, WJt)).double()
            else:
                raise ZuFastError(f"unknown gram precision {precision!r}")
    return G


def w_times(W: torch.Tensor, X: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """W @ X in float64 for a thin X [d_in, m], in column chunks of W (no fp64 copy of W)."""
    d, d_in = W.shape
    out = torch.zeros(d, X.shape[1], dtype=torch.float64, device=W.device)
    X = X.to(W.device, torch.float64)
    for j in range(0, d_in, chunk):
        out += W[:, j : j + chunk].to(torch.float64) @ X[j : j + chunk]
    return out


def w_wt(W: torch.Tensor, chunk: int = 4096, precision: str = "auto") -> torch.Tensor:
    """W Wᵀ   # [d, d] float64."""
    precision = _resolve_precision(precision, W)
    d, d_in = W.shape
    out = torch.zeros(d, d, dtype=torch.float64, device=W.device)
    for j in range(0, d_in, chunk):
        blk = W[:, j : j + chunk]
        if precision == "fp64":
            b = blk.to(torch.float64)
            out += b @ b.t()
        elif precision == "bf16x2" and W.dtype == torch.bfloat16:
            out += _mm32(blk, blk.t()).double()  # bf16 products are exact in fp32
        else:
            b = blk.float()
            out += (b @ b.t()).double()
    return out


def _solve(A: torch.Tensor, B: torch.Tensor, layer: int | None) -> torch.Tensor:
    """D = A B⁻¹ for SPD B (Cholesky, float64)."""
    where = f"layer {layer}: " if layer is not None else ""
    if not (bool(torch.isfinite(A).all()) and bool(torch.isfinite(B).all())):
        raise ZuFastError(f"{where}the closed-form system contains NaN/Inf (statistics or residuals overflowed)")
    L, info = torch.linalg.cholesky_ex(B)
    if int(info) != 0:
        raise ZuFastError(
            f"{where}the system B = W(KKᵀ + λI)Wᵀ is singular or not positive definite "
            f"(Cholesky failed at column {int(info)}); raise regularization_lam (now it may be 0) or check the "
            "statistics"
        )
    D = torch.cholesky_solve(A.t(), L).t()  # B symmetric: B Dᵀ = Aᵀ
    if not bool(torch.isfinite(D).all()):
        raise ZuFastError(f"{where}the closed-form solution is not finite (ill-conditioned system)")
    return D


# --------------------------------------------------------------------------- the multiplier ------


def check_layer_problem(W: torch.Tensor, stats: LayerStats, K_f: torch.Tensor, R: torch.Tensor,
                        U: torch.Tensor, K_r: torch.Tensor | None = None) -> None:
    """Shapes of one layer's edit problem agree (shared by the closed form and the GD variant)."""
    d, d_in = W.shape
    N = K_f.shape[1]
    if (K_f.shape[0] != d_in or R.shape != (d, N) or U.shape[0] != d
            or (K_r is not None and (K_r.dim() != 2 or K_r.shape[0] != d_in))):
        retain = f", K_r {tuple(K_r.shape)}" if K_r is not None else ""
        raise ZuFastError(
            f"layer {stats.layer}: shapes disagree: W {tuple(W.shape)}, K_f {tuple(K_f.shape)}, "
            f"R {tuple(R.shape)}, U {tuple(U.shape)}{retain}"
        )
    if stats.d_in != d_in:
        raise ZuFastError(f"layer {stats.layer}: statistics have width {stats.d_in}, the weight has {d_in}")


def multiplier(
    W: torch.Tensor,
    stats: LayerStats,
    K_f: torch.Tensor,
    R: torch.Tensor,
    U: torch.Tensor,
    config: UnlearnConfig | None = None,
    *,
    bias: torch.Tensor | None = None,
    form: str | None = None,
    precision: str = "auto",
    info: dict | None = None,
    K_r: torch.Tensor | None = None,
    retain_projected: bool = RETAIN_PROJECTED,
) -> torch.Tensor:
    """The multiplier D  # [d, d] float64 of one layer: the edit is W ← D W.

    W    [d, d_in]  the layer's current weight (any dtype/device; never copied whole in fp64)
    stats           corpus sums of this layer's keys (LayerStats)
    K_f  [d_in, N]  forget keys (columns);  V_f = W K_f (+ b) is computed from them
    R    [d, N]     residuals r_i (already divided by the number of remaining layers)
    U    [d, r]     orthonormal basis of the original representations (P = (1+ε)I − UUᵀ)
    form            "fast" (default: config.closed_form.solver) or "exact" (dense, for verification)
    info            when given, filled with the forget weights used and the requests' leverage (the
                    fraction of each residual the edit realises, method/leverage.py)
    K_r  [d_in, M]  retain keys (columns), or None: adds λ_rK ‖D W K_r‖² − 2 λ_rV tr(Dᵀ T_r (W K_r)ᵀ) to J, i.e.
                    the demand D W k_r = T_r with T_r = W K_r, the retain outputs as they are (retain_projected:
                    P W K_r, as the corpus term; see the module docstring)
    """
    cfg = config or UnlearnConfig(layers=[stats.layer])
    form = form or cfg.closed_form.solver
    stats.check()
    check_layer_problem(W, stats, K_f, R, U, K_r)
    d, d_in = W.shape
    N = K_f.shape[1]
    dev = W.device
    P = Projector(U.to(dev, torch.float64), cfg.representation.projector_eps)
    n = stats.n
    lam = cfg.closed_form.regularization
    K = K_f.to(dev, torch.float64)  # [d_in, N]
    Rd = R.to(dev, torch.float64)  # [d, N]
    b = bias.detach().to(dev, torch.float64) if bias is not None else None
    mu = stats.mean_key().to(dev)  # [d_in]
    Kr = K_r.to(dev, torch.float64) if K_r is not None else K.new_zeros(d_in, 0)  # [d_in, M]
    M = Kr.shape[1]

    if form == "exact":
        Wd = W.detach().to(torch.float64)  # [d, d_in]
        C = stats.second_moment(torch.float64).to(dev)  # [d_in, d_in]
        X = stats.cross_moment(Wd, b, cfg.closed_form.centered_cross_moment)  # [d, d_in]
        V = Wd @ K + (b[:, None] if b is not None else 0.0)  # [d, N]
        eye = torch.eye(d_in, dtype=torch.float64, device=dev)
        WK = Wd @ K  # [d, N]
        B0 = Wd @ (cfg.closed_form.corpus_weight_k * C + lam * eye) @ Wd.t()  # [d, d]
        lam_fk, lam_fv = _forget_weights(B0, WK, cfg)
        lam_rk, lam_rv = _retain_weights(cfg, lam_fk)
        KKT = cfg.closed_form.corpus_weight_k * C + lam_fk * (K @ K.t()) + lam_rk * (Kr @ Kr.t())  # [d_in, d_in]
        B = Wd @ (KKT + lam * eye) @ Wd.t()
        VKT_r = lam_rv * (Wd @ Kr @ Kr.t())  # the retain outputs as they are   [d, d_in]
        T_r = P.dense() @ VKT_r if retain_projected else VKT_r  # [d, d_in]
        if cfg.closed_form.projector_on == "all":
            VKT = cfg.closed_form.corpus_weight_v * X + lam_fv * ((V + Rd) @ K.t())  # [d, d_in]
            A = P.dense() @ (VKT + lam * Wd) @ Wd.t() + T_r @ Wd.t()
        else:  # only the forget targets are projected
            VKT = cfg.closed_form.corpus_weight_v * X + lam_fv * (P.dense() @ (V + Rd)) @ K.t()  # [d, d_in]
            A = (VKT + lam * Wd + T_r) @ Wd.t()
        D = _solve(A, B, stats.layer)
        _report(info, B, WK, lam_fk, lam_fv)
        _report_retain(info, D, Wd @ Kr, lam_rk, lam_rv)
        return D
    if form != "fast":
        raise ZuFastError(f"unknown closed form {form!r}; choose 'fast' or 'exact'")

    G = gram_wcw(W.detach(), stats.kk, cfg.closed_form.gram_chunk, precision) / n  # W C Wᵀ   [d, d]
    WK = w_times(W.detach(), torch.cat([K, Kr, mu[:, None]], 1), cfg.closed_form.gram_chunk)  # [d, N+M+1]
    WK, WKr, Wmu = WK[:, :N], WK[:, N : N + M], WK[:, N + M :]  # [d, N], [d, M], [d, 1]
    WWt = w_wt(W.detach(), cfg.closed_form.gram_chunk, precision)  # [d, d]
    V = WK + (b[:, None] if b is not None else 0.0)  # forget values  [d, N]
    if stats.vk is not None:  # measured cross moment: X Wᵀ from Σvkᵀ directly
        XWt = _measured_xwt(W.detach(), stats, cfg)
    elif cfg.closed_form.centered_cross_moment:
        XWt = (n / (n - 1)) * (G - Wmu @ Wmu.t())
    else:
        XWt = (n / (n - 1)) * (G + (b[:, None] @ Wmu.t() if b is not None else 0.0))
    B0 = cfg.closed_form.corpus_weight_k * G + lam * WWt  # corpus + regulariser part of B   [d, d]
    B0 = 0.5 * (B0 + B0.t())  # exact symmetry for Cholesky (chunked sums may differ in the last bit)
    lam_fk, lam_fv = _forget_weights(B0, WK, cfg)
    lam_rk, lam_rv = _retain_weights(cfg, lam_fk)
    B = B0 + lam_fk * (WK @ WK.t()) + lam_rk * (WKr @ WKr.t())
    Y_r = lam_rv * (WKr @ WKr.t())  # the retain term: T_r (W K_r)ᵀ with T_r = W K_r   [d, d]
    T_r = P.apply(Y_r) if retain_projected else Y_r
    if cfg.closed_form.projector_on == "all":
        A = P.apply(cfg.closed_form.corpus_weight_v * XWt + lam_fv * ((V + Rd) @ WK.t()) + lam * WWt) + T_r
    else:  # only the forget targets are projected: P (V + R) is thin  [d, N]
        A = cfg.closed_form.corpus_weight_v * XWt + lam_fv * (P.apply(V + Rd) @ WK.t()) + lam * WWt + T_r
    D = _solve(A, B, stats.layer)
    _report(info, B, WK, lam_fk, lam_fv)
    _report_retain(info, D, WKr, lam_rk, lam_rv)
    if info is not None:  # how much the layer's outputs move on the corpus: E‖(D−I)Wk‖² / E‖Wk‖²
        E = D - torch.eye(d, dtype=D.dtype, device=dev)
        info["corpus_output_change"] = float(((E @ G) * E).sum().clamp_min(0) / torch.trace(G).clamp_min(1e-300)) ** 0.5
    return D


def narrow_multiplier(W: torch.Tensor, stats: LayerStats, K_f: torch.Tensor, R: torch.Tensor, U: torch.Tensor,
                      cfg: UnlearnConfig, *, bias: torch.Tensor | None = None,
                      info: dict | None = None, K_r: torch.Tensor | None = None,
                      retain_projected: bool = RETAIN_PROJECTED) -> torch.Tensor:
    """The closed-form multiplier D  # [d, d] float64 of a map narrower than the hidden size (d_in < d).

    Fine-grained experts (OLMoE, Qwen3-MoE, DeepSeek: d_ff < d), or any layer with d_in < d, have rank W ≤ d_in < d, so
    B = W (KKT + λI) Wᵀ is singular and ``multiplier``'s Cholesky fails; yet the edited weight D W is unique
    (two solutions of D B = A differ by a D₀ with D₀ W = 0). With M = λ_wK C + λ_fK K_f K_fᵀ + λ I
    [d_in, d_in] (SPD), Y = P (λ_wV X + λ_fV (V_f + R) K_fᵀ + λ W) [d, d_in], B = W M Wᵀ and A = Y Wᵀ, the
    minimum-norm solution is D = A Q (Qᵀ B Q)⁻¹ Qᵀ for Q [d, r] an orthonormal basis of range(W): it solves
    D B = A (Aᵀ's columns lie in range(W)) and is 0 on range(W)^⊥. For W of full column rank it gives
    D W = Y M⁻¹, the weighted least-squares weight itself: the multiplicative form loses nothing there.
    Retain keys K_r add λ_rK K_r K_rᵀ to M and λ_rV W K_r K_rᵀ to Y (outside P, as in ``multiplier``).
    Dense float64: d_in < d keeps every matrix small.
    """
    d, d_in = W.shape
    dev = W.device
    Wd = W.detach().to(torch.float64)  # [d, d_in]
    K = K_f.to(dev, torch.float64)  # [d_in, N]
    b = bias.detach().to(dev, torch.float64) if bias is not None else None
    C = stats.second_moment(torch.float64).to(dev)  # [d_in, d_in]
    X = stats.cross_moment(Wd, b, cfg.closed_form.centered_cross_moment)  # [d, d_in]
    V = Wd @ K + (b[:, None] if b is not None else 0.0)  # [d, N]
    lam = cfg.closed_form.regularization
    Q, S, _ = torch.linalg.svd(Wd, full_matrices=False)  # Q [d, min(d, d_in)]
    Q = Q[:, S > S[0] * max(d, d_in) * torch.finfo(torch.float64).eps]  # [d, r] range(W)
    WtQ = Wd.t() @ Q  # [d_in, r]
    M0 = cfg.closed_form.corpus_weight_k * C + lam * torch.eye(d_in, dtype=torch.float64, device=dev)  # [d_in, d_in]
    Bq0 = WtQ.t() @ M0 @ WtQ  # Qᵀ B₀ Q   [r, r]
    Vq = WtQ.t() @ K  # Qᵀ W K_f   [r, N]
    lam_fk, lam_fv = _forget_weights(0.5 * (Bq0 + Bq0.t()), Vq, cfg)
    lam_rk, lam_rv = _retain_weights(cfg, lam_fk)
    Kr = K_r.to(dev, torch.float64) if K_r is not None else K.new_zeros(d_in, 0)  # [d_in, M]
    M = M0 + lam_fk * (K @ K.t()) + lam_rk * (Kr @ Kr.t())  # [d_in, d_in]
    proj = Projector(U.to(dev, torch.float64), cfg.representation.projector_eps)
    Rf = R.to(dev, torch.float64)  # [d, N]
    Y_r = lam_rv * (Wd @ Kr @ Kr.t())  # the retain outputs as they are   [d, d_in]
    T_r = proj.apply(Y_r) if retain_projected else Y_r
    if cfg.closed_form.projector_on == "all":
        Y = proj.apply(cfg.closed_form.corpus_weight_v * X + lam_fv * ((V + Rf) @ K.t()) + lam * Wd) + T_r
    else:
        Y = cfg.closed_form.corpus_weight_v * X + lam_fv * (proj.apply(V + Rf) @ K.t()) + lam * Wd + T_r
    Bq = WtQ.t() @ M @ WtQ  # Qᵀ B Q   [r, r]
    Aq = Y @ WtQ  # A Q   [d, r]
    Bq = 0.5 * (Bq + Bq.t())
    Dq = _solve(Aq, Bq, stats.layer)  # A Q (Qᵀ B Q)⁻¹   [d, r]
    D = Dq @ Q.t()  # [d, d]
    _report(info, Bq, Vq, lam_fk, lam_fv)
    _report_retain(info, D, Wd @ Kr, lam_rk, lam_rv)
    return D


def _forget_weights(B0: torch.Tensor, WK: torch.Tensor, cfg: UnlearnConfig) -> tuple[float, float]:
    """(λ_fK, λ_fV): the configured ones, or raised together (same ratio) to reach cfg.closed_form.forget_leverage."""
    lam_fk, lam_fv = float(cfg.closed_form.forget_weight_k), float(cfg.closed_form.forget_weight_v)
    target = cfg.closed_form.forget_leverage
    if target is None:
        return lam_fk, lam_fv
    start = lam_fk if lam_fk > 0 else 1.0
    new = forget_weight_for(leverage_spectrum(B0, WK), float(target), start)
    return new, (lam_fv * new / lam_fk if lam_fk > 0 else new)


def _retain_weights(cfg: UnlearnConfig, lam_fk: float) -> tuple[float, float]:
    """(λ_rK, λ_rV): the configured retain weights, raised by the factor the leverage rule raised the forget
    weights by (``lam_fk`` / the configured λ_fK), so that the configured retain : forget ratio holds."""
    cf = cfg.closed_form
    scale = lam_fk / float(cf.forget_weight_k) if cf.forget_weight_k > 0 else 1.0
    return float(cf.retain_weight_k) * scale, float(cf.retain_weight_v) * scale


def _report_retain(info: dict | None, D: torch.Tensor, WKr: torch.Tensor, lam_rk: float, lam_rv: float) -> None:
    """The retain weights used and how far the edit moved the retain outputs: ‖(D − I) W K_r‖ / ‖W K_r‖."""
    if info is None or WKr.shape[1] == 0:
        return
    moved = D @ WKr - WKr  # [d, M]
    info.update({"retain_weight_rk": lam_rk, "retain_weight_rv": lam_rv,
                 "retain_output_change": float(moved.norm() / WKr.norm().clamp_min(1e-300))})


def _report(info: dict | None, B: torch.Tensor, WK: torch.Tensor, lam_fk: float, lam_fv: float) -> None:
    if info is None:
        return
    lev = request_leverage(B, WK, lam_fk)  # [N]
    info.update({"forget_weight_fk": lam_fk, "forget_weight_fv": lam_fv,
                 "leverage_mean": float(lev.mean()), "leverage_min": float(lev.min())})


def _measured_xwt(W: torch.Tensor, stats: LayerStats, cfg: UnlearnConfig) -> torch.Tensor:
    """X Wᵀ from the measured Σvkᵀ, Σv (centred or not), chunked over d_in."""
    n = stats.n
    d, d_in = W.shape
    dev = W.device
    out = torch.zeros(d, d, dtype=torch.float64, device=dev)
    for j in range(0, d_in, cfg.closed_form.gram_chunk):
        J = slice(j, j + cfg.closed_form.gram_chunk)
        out += stats.vk[:, J].to(dev, torch.float64) @ W[:, J].to(torch.float64).t()
    if cfg.closed_form.centered_cross_moment:
        mu_v = stats.vs.to(dev, torch.float64) / n  # [d]
        Wmu = w_times(W, stats.mean_key()[:, None])  # [d, 1]
        return (out - n * mu_v[:, None] @ Wmu.t()) / (n - 1)
    return out / (n - 1)


def objective(
    D: torch.Tensor,
    W: torch.Tensor,
    C: torch.Tensor,
    X: torch.Tensor,
    K_f: torch.Tensor,
    V_f: torch.Tensor,
    R: torch.Tensor,
    P: torch.Tensor,
    cfg: UnlearnConfig,
    K_r: torch.Tensor | None = None,
    retain_projected: bool = RETAIN_PROJECTED,
) -> torch.Tensor:
    """J(D) up to a constant, written from the raw definitions (dense; verification only):

    J = λ_wK tr(D W C Wᵀ Dᵀ) + λ_fK ‖D W K_f‖² + λ ‖D W‖²
        − 2 tr(Dᵀ P [λ_wV X Wᵀ + λ_fV (V_f + R)(W K_f)ᵀ + λ W Wᵀ])
        [+ λ_rK ‖D W K_r‖² − 2 λ_rV tr(Dᵀ T_r (W K_r)ᵀ),  T_r = W K_r (retain_projected: P W K_r)]
    (``projector_on="forget"``: P multiplies the forget term only). Its gradient 2(D B − A) vanishes exactly at
    the multiplier (with the configured weights: no leverage rule).
    """
    cf = cfg.closed_form
    WK = W @ K_f
    quad = (cf.corpus_weight_k * torch.trace(D @ W @ C @ W.t() @ D.t())
            + cf.forget_weight_k * (D @ WK).pow(2).sum()
            + cf.regularization * (D @ W).pow(2).sum())
    if cf.projector_on == "all":
        target = P @ (cf.corpus_weight_v * X @ W.t() + cf.forget_weight_v * (V_f + R) @ WK.t()
                      + cf.regularization * W @ W.t())
    else:
        target = (cf.corpus_weight_v * X @ W.t() + cf.forget_weight_v * (P @ (V_f + R)) @ WK.t()
                  + cf.regularization * W @ W.t())
    if K_r is not None:
        WKr = W @ K_r
        quad = quad + cf.retain_weight_k * (D @ WKr).pow(2).sum()
        target = target + cf.retain_weight_v * ((P @ WKr) if retain_projected else WKr) @ WKr.t()
    return quad - 2 * (D * target).sum()
