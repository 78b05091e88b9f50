"""ZeroUnlearn-GD: the multi-sample variant, an additive edit W ← W + Δ P_null found by Adam.

The objective (docs/algorithm.md, "ZeroUnlearn-GD"), over Δ ∈ R^{d×d_in}:

    L(Δ) = w_o ‖Uᵀ O‖² + w_r ‖O − (V_f + R)‖² + w_n ‖Δ P‖² [+ w_ret ‖Δ P K_r‖²],     O = (W + Δ P) K_f (+ b)

with P = P_null the orthogonal projector onto the eigenvectors of C (the corpus key second moment)
whose eigenvalue is ≤ ``gd_null_threshold`` (or, scale-free, the cheapest eigen-directions carrying at
most ``gd_null_energy`` of tr C); Adam (lr ``gd_lr``, ``gd_steps`` steps), Δ = 0 at the
start; the edit is ΔW = Δ P. O is the module's output on the forget keys (bias included, so that
the remap term compares outputs with the target outputs V_f + R; the reference models have no bias).
The bracketed term is zu_fast's, present only with retain keys K_r (``unlearn(..., retain=...)``): the
change of the retain records' outputs, weighted by ``gd_retain_weight``.

The reference optimises a dense float64 Δ with autograd through ``Δ @ P`` (P dense d_in×d_in built
from a full SVD of C) every step. This module computes the same iterates, faster:

- The eigendecomposition of C is done once per layer (``eigh``, float64) and cached on the
  LayerStats object (and optionally on disk, keyed on the statistic's content).
- P is never formed. With B [d_in, r] an orthonormal basis of the null space (P = B Bᵀ), or of its
  complement when that is smaller (P = I − B Bᵀ), ΔP = (ΔB)Bᵀ or Δ − (ΔB)Bᵀ: two thin products of
  d·d_in·r flops, r = min(null rank, d_in − null rank) ≤ d_in/2, instead of d·d_in² (twice).
- The gradient is written in closed form. With M = ΔP and E = ∂L/∂O = 2 w_o U Uᵀ O + 2 w_r (O − V_f − R)
  (a thin [d, N] matrix), the reference's autograd gradient is
      ∂L/∂Δ = (E K_fᵀ + 2 w_n M) P = E (P K_f)ᵀ + 2 w_n M        (M P = Δ P P = M)
  so each step needs only M (which the forward needs anyway) and the thin E (P K_f)ᵀ.
- Adam stays on the dense Δ [d, d_in], exactly as in the reference: Adam is element-wise, hence not
  rotation invariant, so optimising a reduced variable such as ΔB would be a different algorithm.
  Only the gradient's formation is cheaper; m, v and the step are torch.optim.Adam's own.
- float32 by default (the objective is a well-conditioned quadratic of a small matrix; tests compare
  the loss curve and ΔW with the float64 reference), ``precision="fp64"`` reproduces the reference to
  round-off.
- Early stop when the loss decreased by less than ``tol`` (relative) over the last ``window`` steps.

Those keep the reference's iterates, and so its per-step floor of two d·d_in·r products. The opt-in
``gd_variable="null"`` optimises the edit's null-space coordinates X = Δ B_null [d, k] instead: the
same objective and minimiser, a different (and far cheaper) trajectory, with its step scaled by
sqrt(d_in/k) to keep the dense Δ's pace; RESULTS.md compares the two.
"""

from __future__ import annotations

import hashlib
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import UnlearnConfig
from ..errors import ZuFastError
from ..stats.moments import LayerStats
from .closed_form import check_layer_problem, w_times

# Disk cache of eigenbases only for layers whose eigendecomposition is expensive.
DISK_CACHE_MIN_D_IN = 4096

_CACHE_ATTR = "_zu_gd_eigh"


# --------------------------------------------------------------------------- eigenbasis ------


@dataclass
class Eigh:
    """Eigendecomposition of one layer's C = Σkkᵀ/n (ascending eigenvalues)."""

    eigvals: torch.Tensor  # [d_in] float64
    eigvecs: torch.Tensor  # [d_in, d_in] columns; float64 or float32 (see ``eigh_of``)
    seconds: float  # time the decomposition took (0 when it came from a cache)
    source: str  # "computed", "memory" or "disk"


@dataclass
class NullBasis:
    """P_null in thin form: P = B Bᵀ (``complement`` False) or P = I − B Bᵀ (``complement`` True)."""

    B: torch.Tensor  # [d_in, r] orthonormal columns
    complement: bool
    null_rank: int  # dimension of the null space (trace of P)
    d_in: int

    def project(self, X: torch.Tensor) -> torch.Tensor:
        """P X for X [d_in, m]."""
        BtX = self.B.t() @ X  # [r, m]
        return X - self.B @ BtX if self.complement else self.B @ BtX

    def dense(self) -> torch.Tensor:
        """P  # [d_in, d_in] (verification only)."""
        BBt = self.B @ self.B.t()
        if self.complement:
            return torch.eye(self.d_in, dtype=self.B.dtype, device=self.B.device) - BBt
        return BBt


def _version_key(stats: LayerStats) -> tuple:
    # _version changes on every in-place write, data_ptr on reallocation: a mutated statistic
    # never reuses a stale eigenbasis.
    return (stats.n, stats.kk.data_ptr(), stats.kk._version, tuple(stats.kk.shape))


def _content_key(stats: LayerStats) -> str:
    h = hashlib.sha256()
    kk = stats.kk.detach().contiguous().cpu()
    h.update(f"{tuple(kk.shape)}|{kk.dtype}|{stats.n}|".encode())
    h.update(kk.view(torch.uint8).numpy().tobytes() if kk.dtype != torch.bfloat16 else kk.float().numpy().tobytes())
    return h.hexdigest()[:32]


def _disk_path(stats: LayerStats, dtype: torch.dtype) -> Path:
    from ..stats.store import cache_root

    tag = "f64" if dtype == torch.float64 else "f32"
    return cache_root() / "gd_eigh" / f"{_content_key(stats)}_{tag}.safetensors"


def eigh_of(stats: LayerStats, *, dtype: torch.dtype = torch.float32, disk_cache: bool | None = None) -> Eigh:
    """The eigendecomposition of C = stats.second_moment(), computed once and cached.

    Computed in float64 on the statistic's device; the eigenvectors are kept in ``dtype`` (float32
    halves the memory at large d_in; float64 is asked for by the exact-precision path). The cache
    lives on the LayerStats object (dropped with it; invalidated when ``kk`` is modified in place)
    and, when ``disk_cache`` (default: d_in ≥ 4096, where eigh takes long), under
    ``cache_root()/gd_eigh`` keyed on a hash of Σkkᵀ and n.
    """
    memo: dict = stats.__dict__.setdefault(_CACHE_ATTR, {})
    vkey = _version_key(stats)
    for key in list(memo):
        if key[0] != vkey:
            del memo[key]
    hit = memo.get((vkey, dtype)) or (memo.get((vkey, torch.float64)) if dtype == torch.float32 else None)
    if hit is not None:
        vecs = hit.eigvecs if hit.eigvecs.dtype == dtype else hit.eigvecs.to(dtype)
        return Eigh(hit.eigvals, vecs, 0.0, "memory")
    if disk_cache is None:
        disk_cache = stats.d_in >= DISK_CACHE_MIN_D_IN
    path = _disk_path(stats, dtype) if disk_cache else None
    dev = stats.kk.device
    if path is not None and path.exists():
        from safetensors.torch import load_file

        t = load_file(str(path))
        res = Eigh(t["eigvals"].to(dev), t["eigvecs"].to(dev), 0.0, "disk")
    else:
        t0 = time.perf_counter()
        C = stats.second_moment(torch.float64)  # [d_in, d_in]
        C = 0.5 * (C + C.t())  # exact symmetry (Σkkᵀ is symmetric up to the accumulator's rounding)
        vals, vecs = torch.linalg.eigh(C)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        res = Eigh(vals, vecs.to(dtype).contiguous(), time.perf_counter() - t0, "computed")
        if path is not None:
            _save_eigh(path, res)
    memo[(vkey, dtype)] = Eigh(res.eigvals, res.eigvecs, 0.0, "memory")
    return res


def _save_eigh(path: Path, res: Eigh) -> None:
    import os
    import tempfile

    from safetensors.torch import save_file

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        save_file({"eigvals": res.eigvals.cpu().contiguous(), "eigvecs": res.eigvecs.cpu().contiguous()}, tmp)
        os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    except OSError as e:  # a cache is an optimisation: never fail the edit over it
        warnings.warn(f"could not write the eigenbasis cache {path}: {e}", stacklevel=3)


def null_rank(eigvals: torch.Tensor, threshold: float | None = None, *, energy: float | None = None) -> int:
    """How many of C's (ascending) eigenvalues span P_null.

    threshold: eigenvalues ≤ threshold (the reference's absolute rule; its scale is the corpus
    keys' scale, so a value tuned on one model or corpus does not transfer).
    energy: the longest prefix of eigen-directions whose eigenvalues sum to ≤ energy · tr C, i.e.
    the corpus keys keep at most that fraction of their energy E‖k‖² in the edited subspace; unchanged
    when the keys are rescaled. Takes precedence over ``threshold``.
    """
    if energy is not None:
        lam = eigvals.to(torch.float64).clamp_min(0.0)  # round-off can leave tiny negatives
        cum = torch.cumsum(lam, 0)  # ascending eigenvalues: the cheapest directions first
        return int((cum <= float(energy) * float(cum[-1])).sum())
    if threshold is None:
        raise ZuFastError("null_rank needs a threshold or an energy fraction")
    return int((eigvals <= threshold).sum())  # ascending, so the null space is a prefix


def null_basis(
    stats: LayerStats,
    threshold: float | None = None,
    *,
    energy: float | None = None,
    device=None,
    dtype: torch.dtype = torch.float32,
    form: str = "auto",
    disk_cache: bool | None = None,
) -> tuple[NullBasis, Eigh]:
    """P_null in thin form, on ``device``: the eigenvectors of C selected by ``null_rank``.

    form: "null" (P = B Bᵀ), "complement" (P = I − B Bᵀ) or "auto" (whichever B is thinner).
    """
    e = eigh_of(stats, dtype=torch.float64 if dtype == torch.float64 else torch.float32, disk_cache=disk_cache)
    k = null_rank(e.eigvals, threshold, energy=energy)
    d_in = e.eigvals.numel()
    if form == "auto":
        form = "complement" if k > d_in - k else "null"
    if form not in ("null", "complement"):
        raise ZuFastError(f"unknown null-space form {form!r}; choose 'auto', 'null' or 'complement'")
    cols = e.eigvecs[:, :k] if form == "null" else e.eigvecs[:, k:]
    dev = device if device is not None else stats.kk.device
    return NullBasis(cols.to(dev, dtype).contiguous(), form == "complement", k, d_in), e


def null_basis_for(stats: LayerStats, cfg: UnlearnConfig, **kw) -> tuple[NullBasis, Eigh]:
    """``null_basis`` with the config's rule (``gd_null_energy`` if set, else ``gd_null_threshold``)."""
    return null_basis(stats, cfg.gd.null_threshold, energy=cfg.gd.null_energy, **kw)


# --------------------------------------------------------------------------- the update ------


def _fused_ok(dev: torch.device, dt: torch.dtype) -> bool | None:
    # The fused Adam kernel (one pass over m, v, Δ) is the same update; use it where torch has it.
    if dev.type in ("cpu", "cuda") and dt in (torch.float32, torch.float64):
        return True
    return None


class _Objective:
    """The GD loss as a function of the outputs' change MK = ΔW [K_f, K_r]  [d, N + M] (forget keys, then retain
    keys) and ‖ΔW‖², and its gradient in those outputs.

    The retain term w_ret ‖ΔW K_r‖² is the change of the retain records' outputs O_r − V_r (the bias cancels):
    they must stay what they are. Its gradient in O_r is 2 w_ret ΔW K_r, so ∂L/∂Δ keeps the form E (P K)ᵀ + 2 w_n ΔP
    with K and E extended by the retain columns.
    """

    def __init__(self, W, K_f, R, U, cfg, bias, dt, n_retain: int = 0) -> None:
        dev = W.device
        with torch.no_grad():
            V = w_times(W.detach(), K_f.detach())  # V_f = W K_f in float64, chunked over W's columns  [d, N]
            if bias is not None:
                V = V + bias.detach().to(dev, torch.float64)[:, None]
            self.Ud = U.detach().to(dev, dt)  # [d, r_u]
            self.Rd = R.detach().to(dev, dt)  # [d, N]
            self.UtV = self.Ud.t() @ V.to(dt)  # Uᵀ V_f: the orth term's constant part  [r_u, N]
        self.N = K_f.shape[1]
        self.M = n_retain
        # weights of the (orth, remap, norm, retain) parts
        self.w = (float(cfg.gd.orth_weight), float(cfg.gd.remap_weight), float(cfg.gd.norm_weight),
                  float(cfg.gd.retain_weight) if n_retain else 0.0)

    def terms(self, MK: torch.Tensor, norm: float):
        """S = Uᵀ O_f [r_u, N], Rm = O_f − (V_f + R) [d, N], the retain outputs' change ΔW K_r [d, M], and the
        (orth, remap, norm, retain) parts of the loss."""
        MKf, MKr = MK[:, : self.N], MK[:, self.N :]
        S = self.UtV + self.Ud.t() @ MKf
        Rm = MKf - self.Rd
        return S, Rm, MKr, (float(S.pow(2).sum()), float(Rm.pow(2).sum()), norm, float(MKr.pow(2).sum()))

    def loss(self, parts: tuple[float, float, float, float]) -> float:
        return sum(w * p for w, p in zip(self.w, parts))

    def d_out(self, S: torch.Tensor, Rm: torch.Tensor, MKr: torch.Tensor) -> torch.Tensor:
        """E = ∂L/∂O = [2 w_o U S + 2 w_r Rm, 2 w_ret ΔW K_r]  [d, N + M]."""
        E = (2.0 * self.w[0]) * (self.Ud @ S) + (2.0 * self.w[1]) * Rm
        return torch.cat([E, (2.0 * self.w[3]) * MKr], 1) if self.M else E


class _Stopper:
    """Loss log and stop rule shared by both variables: ``steps`` updates, or the relative decrease over
    the last ``window`` steps fell below ``tol``; a non-finite loss is an error."""

    def __init__(self, steps: int, tol: float, window: int, trace: list[float] | None, layer) -> None:
        self.steps, self.tol, self.window, self.trace, self.layer = steps, tol, window, trace, layer
        self.losses: list[float] = []
        self.converged = False

    def stop(self, loss: float, step: int) -> bool:
        if not math.isfinite(loss):
            raise ZuFastError(f"layer {self.layer}: the GD loss is not finite at step {step}")
        self.losses.append(loss)
        if self.trace is not None:
            self.trace.append(loss)
        if step >= self.steps:
            return True  # the loss of the final iterate (the reference's Δ after gd_steps updates)
        if self.tol > 0 and self.window > 0 and len(self.losses) > self.window:
            old = self.losses[-1 - self.window]
            if old - loss <= self.tol * abs(old):
                self.converged = True
                return True
        return False

    def info(self, step: int, parts: tuple[float, float, float, float], retain: bool) -> dict[str, float]:
        out = {"gd_steps": float(step), "gd_converged": float(self.converged),
               "gd_loss_initial": self.losses[0], "gd_loss_final": self.losses[-1],
               "gd_orth_final": parts[0], "gd_remap_final": parts[1], "gd_norm_final": parts[2]}
        if retain:
            out["gd_retain_final"] = parts[3]
        return out


def gd_update(
    W: torch.Tensor,
    stats: LayerStats,
    K_f: torch.Tensor,
    R: torch.Tensor,
    U: torch.Tensor,
    cfg: UnlearnConfig,
    *,
    bias: torch.Tensor | None = None,
    precision: str | None = None,
    tol: float | None = None,
    window: int | None = None,
    form: str = "auto",
    trace: list[float] | None = None,
    K_r: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """ΔW  # [d, d_in] fp32 (the edit is W ← W + ΔW, ΔW = Δ P_null) and an info dict of floats.

    W    [d, d_in]  current weight (any dtype/device; never copied whole to float64)
    stats           this layer's corpus statistics (C = stats.second_moment())
    K_f  [d_in, N]  forget keys (columns)
    R    [d, N]     residuals: the remap target is V_f + R with V_f = W K_f (+ b)
    U    [d, r]     orthonormal basis of the original representations
    precision       "fp32" (default: config ``gd_precision`` or fp32) or "fp64" (reference round-off)
    tol, window     early stop: relative loss decrease < tol over ``window`` steps (tol=0: run all steps)
    form            thin form of P_null: "auto", "null" or "complement" (same iterates; speed only; the
                    ``gd_variable="null"`` path always uses the null-space basis itself)
    trace           if given, the loss before each Adam step is appended (the reference's loss curve)
    K_r  [d_in, M]  retain keys (columns), or None: adds cfg.gd.retain_weight · ‖ΔW K_r‖² to the loss (their
                    outputs must not change; docs/design-notes.md, "Retain set")
    """
    t_start = time.perf_counter()
    check_layer_problem(W, stats, K_f, R, U, K_r)
    d, d_in = W.shape
    M = 0 if K_r is None else K_r.shape[1]
    precision = precision or cfg.gd.precision
    if precision not in ("fp32", "fp64"):
        raise ZuFastError(f"gd precision {precision!r}; choose 'fp32' or 'fp64'")
    dt = torch.float64 if precision == "fp64" else torch.float32
    tol = float(cfg.gd.tol if tol is None else tol)
    window = int(cfg.gd.window if window is None else window)
    steps = int(cfg.gd.steps)
    w_n = float(cfg.gd.norm_weight)
    dev = W.device
    variable = cfg.gd.variable
    if variable not in ("dense", "null"):
        raise ZuFastError(f"gd variable {variable!r}; choose 'dense' or 'null'")

    t_eig = time.perf_counter()
    nb, eig = null_basis_for(stats, cfg, device=dev, dtype=dt, form="null" if variable == "null" else form)
    t_eig = time.perf_counter() - t_eig
    k = nb.null_rank
    info: dict[str, float] = {
        "gd_null_rank": float(k),
        # the largest eigenvalue inside P_null and the corpus energy share it carries (either rule)
        "gd_null_cut": float(eig.eigvals[k - 1]) if k else math.nan,
        "gd_null_energy": float(eig.eigvals[:k].clamp_min(0).sum() / eig.eigvals.clamp_min(0).sum().clamp_min(1e-300)),
        "gd_basis_width": float(nb.B.shape[1]),
        "gd_eigh_seconds": float(eig.seconds),
        "gd_basis_seconds": float(t_eig),
    }
    if nb.null_rank == 0:
        energy = cfg.gd.null_energy
        rule = (f"gd_null_energy={energy} (smallest eigenvalue carries "
                f"{float(eig.eigvals[0] / eig.eigvals.clamp_min(0).sum()):.3g} of tr C)" if energy is not None
                else f"gd_null_threshold={cfg.gd.null_threshold} (smallest eigenvalue {float(eig.eigvals[0]):.3g})")
        warnings.warn(f"layer {stats.layer}: the null space of C is empty under {rule}: the GD edit is empty; "
                      "raise the setting", stacklevel=2)
        info.update({"gd_steps": 0.0, "gd_loss_initial": math.nan, "gd_loss_final": math.nan,
                     "gd_converged": 0.0, "gd_seconds": time.perf_counter() - t_start})
        return torch.zeros(d, d_in, dtype=torch.float32, device=dev), info

    objective = _Objective(W, K_f, R, U, cfg, bias, dt, M)
    stopper = _Stopper(steps, tol, window, trace, stats.layer)
    K_all = K_f if not M else torch.cat([K_f.detach().to(dev), K_r.detach().to(dev, K_f.dtype)], 1)  # [d_in, N + M]
    if variable == "null":
        dW, parts, step = _adam_in_null_coordinates(W, nb, K_all, objective, stopper, cfg, dt)
        info.update(stopper.info(step, parts, bool(M)))
        _retain_change(info, W, dW, K_r)
        info["gd_seconds"] = time.perf_counter() - t_start
        return dW, info

    with torch.no_grad():
        K = K_all.detach().to(dev, dt)  # [d_in, N + M] forget keys, then retain keys
        B = nb.B  # [d_in, r]
        Bt = B.t().contiguous()  # [r, d_in]
        KP = nb.project(K)  # P K  [d_in, N + M]
        KPt = KP.t().contiguous()  # [N + M, d_in]
        BtK = Bt @ K  # [r, N + M]

    # Adam on the dense Δ, exactly as the reference (torch.optim.Adam, default betas/eps); the
    # gradient is written into delta.grad in closed form instead of by autograd.
    delta = torch.zeros(d, d_in, dtype=dt, device=dev)  # [d, d_in]
    delta.grad = torch.zeros_like(delta)  # [d, d_in]
    opt = torch.optim.Adam([delta], lr=cfg.gd.lr, fused=_fused_ok(dev, dt))
    step = 0

    with torch.no_grad():
        while True:
            # ---- forward at the current Δ: only thin products besides T = ΔB ----
            T = delta @ B  # [d, r]
            if nb.complement:  # P = I − BBᵀ
                MK = delta @ KP  # Δ P K   [d, N + M]
                # ‖ΔP‖² = ‖Δ‖² − ‖ΔB‖² (Pythagoras; B orthonormal)
                norm = max(float(delta.pow(2).sum()) - float(T.pow(2).sum()), 0.0)
            else:  # P = BBᵀ
                MK = T @ BtK  # Δ B Bᵀ K   [d, N + M]
                norm = float(T.pow(2).sum())  # ‖ΔBBᵀ‖² = ‖ΔB‖²
            S, Rm, MKr, parts = objective.terms(MK, norm)
            if stopper.stop(objective.loss(parts), step):
                break
            # ---- gradient: (E Kᵀ + 2 w_n ΔP) P = E (P K)ᵀ + 2 w_n ΔP,  E = ∂L/∂O ----
            E = objective.d_out(S, Rm, MKr)  # [d, N + M]
            g = delta.grad  # [d, d_in]
            if nb.complement:  # 2 w_n (Δ − T Bᵀ) + E KPᵀ
                torch.mul(delta, 2.0 * w_n, out=g)
                g.addmm_(T, Bt, alpha=-2.0 * w_n)
            else:  # 2 w_n T Bᵀ + E KPᵀ
                torch.mm(T, Bt, out=g)
                g.mul_(2.0 * w_n)
            g.addmm_(E, KPt)
            opt.step()
            step += 1
        dW = delta.addmm(T, Bt, beta=1.0, alpha=-1.0) if nb.complement else T @ Bt  # Δ P  [d, d_in]
        dW = dW.float()
    info.update(stopper.info(step, parts, bool(M)))
    _retain_change(info, W, dW, K_r)
    info["gd_seconds"] = time.perf_counter() - t_start
    return dW, info


def _retain_change(info: dict[str, float], W: torch.Tensor, dW: torch.Tensor, K_r: torch.Tensor | None) -> None:
    """How far the edit moved the retain outputs: ‖ΔW K_r‖ / ‖W K_r‖ (as the closed form reports it)."""
    if K_r is None or K_r.shape[1] == 0:
        return
    with torch.no_grad():
        Kr = K_r.to(W.device, torch.float64)
        moved = (dW.double() @ Kr).norm()  # ‖ΔW K_r‖
        info["retain_output_change"] = float(moved / w_times(W.detach(), Kr).norm().clamp_min(1e-300))


def _adam_in_null_coordinates(W, nb: NullBasis, K, objective: _Objective, stopper: _Stopper, cfg, dt):
    """``gd_variable="null"``: Adam on X = Δ B_null  [d, k], the edit's coordinates in the null-space basis.

    The objective is the same function of ΔW = X B_nullᵀ (‖ΔW‖ = ‖X‖, ΔW K_f = X (B_nullᵀ K_f)), so its
    minimisers are the same; the trajectory is not the reference's (Adam is element-wise, hence not
    rotation invariant) and after a fixed number of steps the edit differs (RESULTS.md). Per step
    O(d·k·N) and Adam on d·k numbers instead of two d·d_in·r products and Adam on d·d_in.
    Step size: lr · sqrt(d_in / k). Adam's steps are sign-like (each coordinate moves by about lr), so
    a step's first-order progress is lr‖g‖₁, and for a gradient spread over n coordinates
    ‖g‖₁ ≈ sqrt(2n/π)‖g‖₂. Both variables see the same ‖g‖₂ (g_X = g B_null, and g = g P), over
    d·d_in coordinates for the dense Δ and d·k for X; scaling lr by sqrt(d_in/k) gives both the same
    progress per step, so that ``gd_lr`` and ``gd_steps`` tuned on the reference mean the same here
    (measured in RESULTS.md: without it the null variable lags wherever k ≪ d_in).
    Returns (ΔW [d, d_in] fp32, final loss parts, steps taken).
    """
    dev = W.device
    w_n = objective.w[2]
    lr = float(cfg.gd.lr) * math.sqrt(nb.d_in / nb.B.shape[1])
    with torch.no_grad():
        BtK = nb.B.t() @ K.detach().to(dev, dt)  # B_nullᵀ K  [k, N + M] (forget keys, then retain keys)
        BtKt = BtK.t().contiguous()  # [N + M, k]
    X = torch.zeros(W.shape[0], nb.B.shape[1], dtype=dt, device=dev)  # [d, k]
    X.grad = torch.zeros_like(X)
    opt = torch.optim.Adam([X], lr=lr, fused=_fused_ok(dev, dt))
    step = 0
    with torch.no_grad():
        while True:
            S, Rm, MKr, parts = objective.terms(X @ BtK, float(X.pow(2).sum()))  # MK = ΔW K  [d, N + M]
            if stopper.stop(objective.loss(parts), step):
                break
            # E (B_nullᵀ K)ᵀ + 2 w_n X
            torch.addmm(X, objective.d_out(S, Rm, MKr), BtKt, beta=2.0 * w_n, out=X.grad)
            opt.step()
            step += 1
        dW = (X @ nb.B.t()).float()  # [d, d_in]
    return dW, parts, step


__all__ = ["Eigh", "NullBasis", "eigh_of", "gd_update", "null_basis", "null_basis_for",
           "null_rank"]
