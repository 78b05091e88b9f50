"""A CPU model of tensor-core fp32 accumulation, for the numerics tests (not part of the package).

The model (what the tests assume about NVIDIA tensor cores, Ampere and Hopper, bf16/fp16 inputs
with fp32 accumulators): the products of one k16 step (``mma.sync m16n8k16`` or one ``wgmma``
k-slice) are exact, they are summed exactly together with the accumulator, and the result is
rounded to fp32 *toward zero* (truncated). Plain fp32 adds on CUDA cores round to nearest.
Truncation always shrinks the magnitude, so a long chain of steps on one accumulator builds a
bias: each step loses about 2^-24·0.7 of the running sum, which averages half the final sum, so a
same-sign sum (the diagonal of KᵀK) ends ≈ 2.1e-8 low per k16 step of the chain (STEP_BIAS). A
scheme that hands the tensor-core partial sum off to a plain fp32 sum every H rows bounds the
chain at H/16 steps.

Everything here works on float64 tensors whose values are exactly representable in fp32, so a
float64 sum of one step is exact for the data the tests use (products of bf16 values carry 16
significant bits; 16 of them plus a 24-bit accumulator stay far inside float64's 53).

Schemes (``AccumScheme``) name each backend's accumulation over the reduction (row) dimension:
``rows_per_acc`` rows go through one tensor-core accumulator before a round-to-nearest fp32
hand-off (None: never handed off, the whole call is one chain); the result is then added to the
caller's accumulator with one more round-to-nearest add.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

K_STEP = 16  # reduction depth of one tensor-core step (m16n8k16 / wgmma k16 for 16-bit inputs)
STEP_BIAS = 2.1e-8  # relative bias of a same-sign sum per truncating step of its chain (tested)


# ------------------------------------------------------------------------------------ roundings
def rz_fp32(x: torch.Tensor) -> torch.Tensor:
    """Round float64 ``x`` to fp32 toward zero (truncation); returned as float64."""
    y = x.to(torch.float32)  # round to nearest
    over = y.double().abs() > x.abs()  # nearest went past x: step one ulp back toward zero
    y = torch.where(over, torch.nextafter(y, torch.zeros_like(y)), y)
    return y.double()


def rn_fp32(x: torch.Tensor) -> torch.Tensor:
    """Round float64 ``x`` to fp32 to nearest (a plain CUDA-core fp32 add); returned as float64."""
    return x.to(torch.float32).double()


def rn_bf16(x: torch.Tensor) -> torch.Tensor:
    """Round to bf16 to nearest (from fp32 values: exact float64 → fp32 first, as the kernels do)."""
    return x.to(torch.float32).to(torch.bfloat16).double()


# ------------------------------------------------------------------------------------ chains
def tc_sum(products: torch.Tensor, rows_per_acc: int | None, acc0: torch.Tensor | None = None) -> torch.Tensor:
    """Sum ``products`` [..., R] (exact float64 products) along the last dim as the hardware would.

    One tensor-core accumulator takes K_STEP products per truncating step; every ``rows_per_acc``
    rows (a multiple of K_STEP; None = never) it is handed off to a round-to-nearest fp32 sum and
    restarts at zero. ``acc0`` (default 0) is the caller's accumulator: the call's result is added
    to it with one round-to-nearest fp32 add (``C += acc`` in every kernel's epilogue).
    """
    R = products.shape[-1]
    steps = max(1, math.ceil(R / K_STEP))
    pad = steps * K_STEP - R
    p = torch.nn.functional.pad(products, (0, pad)) if pad else products
    blocks = p.reshape(*p.shape[:-1], steps, K_STEP).sum(-1)  # exact: see the module docstring
    if rows_per_acc is not None and rows_per_acc % K_STEP:
        raise ValueError(f"rows_per_acc {rows_per_acc} is not a multiple of {K_STEP}")
    per = steps if rows_per_acc is None else rows_per_acc // K_STEP
    acc = torch.zeros(p.shape[:-1], dtype=torch.float64)
    part = torch.zeros_like(acc)
    for s in range(steps):
        part = rz_fp32(part + blocks[..., s])
        if (s + 1) % per == 0 or s + 1 == steps:
            acc = rn_fp32(acc + part)
            part = torch.zeros_like(acc)
    base = torch.zeros_like(acc) if acc0 is None else acc0.double()
    return rn_fp32(base + acc)


@dataclass(frozen=True)
class AccumScheme:
    """How one backend accumulates a Gram entry over the rows of one call."""

    name: str
    rows_per_acc: int | None  # rows per tensor-core accumulator before an fp32 hand-off; None: unbounded
    note: str = ""

    def steps_per_chain(self, rows: int) -> int:
        """Truncating steps on one accumulator for a call of ``rows`` rows."""
        r = rows if self.rows_per_acc is None else min(rows, self.rows_per_acc)
        return math.ceil(r / K_STEP)

    def bound(self, rows: int) -> float:
        """Worst-case |error| / Σ|a_k b_k| of one entry (rigorous, for any data).

        Truncating steps: each loses < 1 ulp of a partial sum ≤ Σ|ab| (2^-23 relative); hand-offs
        and the final add into the caller's accumulator: ≤ 2^-24 each (round to nearest), with
        the usual first-order bound (n adds → n·2^-24).
        """
        chains = 1 if self.rows_per_acc is None else max(1, math.ceil(rows / self.rows_per_acc))
        return self.steps_per_chain(rows) * 2.0**-23 + chains * 2.0**-24


# ------------------------------------------------------------------------------------ sampling
def sample_columns(n: int, rows: int, dist: str, generator: torch.Generator, dtype=torch.bfloat16) -> torch.Tensor:
    """``n`` independent columns of ``rows`` activations, rounded to ``dtype``; float64 [n, rows].

    ``dist``: "gaussian" (N(0,1), what the GPU tests feed), "positive" (|N(0,1)|: every product
    of two columns has one sign, the worst case for a truncation bias), "shifted" (N(0.5, 1):
    a non-zero channel mean, as real MLP activations have).
    """
    x = torch.randn(n, rows, generator=generator, dtype=torch.float64)
    if dist == "positive":
        x = x.abs()
    elif dist == "shifted":
        x = x + 0.5
    elif dist != "gaussian":
        raise ValueError(dist)
    return x.to(dtype).double()


@dataclass
class GramError:
    """Modelled error of KᵀK's upper triangle for one scheme (stratified sample of entries)."""

    rel_frobenius: float  # ‖err‖_F / ‖ref‖_F over the upper triangle (what the tests check)
    diag_bias: float  # mean signed relative error of the diagonal entries
    offdiag_rel_rms: float  # RMS of |err| / |ref| is useless near 0: RMS err / RMS ref off the diagonal
    rows: int
    d_ff: int
    scheme: str


def gram_errors(
    scheme: AccumScheme, d_ffs: list[int], rows: int, dist: str = "gaussian", n_diag: int = 192,
    n_off: int = 192, seed: int = 0,
) -> dict[int, GramError]:
    """Relative Frobenius error of the upper triangle of KᵀK ([rows, d_ff] keys) under ``scheme``,
    for each d_ff in ``d_ffs`` (one sample serves them all).

    The error of an entry depends only on its two columns, so a stratified sample stands in for
    the d_ff² entries: ``n_diag`` diagonal entries (a column with itself) and ``n_off`` strictly
    upper entries (two independent columns), weighted by d_ff and d_ff(d_ff−1)/2.
    """
    g = torch.Generator().manual_seed(seed)
    a = sample_columns(n_diag, rows, dist, g)
    diag_ref = (a * a).sum(-1)
    diag_got = tc_sum(a * a, scheme.rows_per_acc)
    b1 = sample_columns(n_off, rows, dist, g)
    b2 = sample_columns(n_off, rows, dist, g)
    off_ref = (b1 * b2).sum(-1)
    off_got = tc_sum(b1 * b2, scheme.rows_per_acc)
    out = {}
    for d_ff in d_ffs:
        w_diag, w_off = float(d_ff), d_ff * (d_ff - 1) / 2.0
        err2 = w_diag * ((diag_got - diag_ref) ** 2).mean() + w_off * ((off_got - off_ref) ** 2).mean()
        ref2 = w_diag * (diag_ref**2).mean() + w_off * (off_ref**2).mean()
        out[d_ff] = GramError(
            rel_frobenius=float((err2 / ref2).sqrt()),
            diag_bias=float(((diag_got - diag_ref) / diag_ref).mean()),
            offdiag_rel_rms=float((((off_got - off_ref) ** 2).mean() / (off_ref**2).mean()).sqrt()),
            rows=rows, d_ff=d_ff, scheme=scheme.name,
        )
    return out


def gram_error(
    scheme: AccumScheme, d_ff: int, rows: int, dist: str = "gaussian", n_diag: int = 192, n_off: int = 192,
    seed: int = 0,
) -> GramError:
    """``gram_errors`` for one d_ff."""
    return gram_errors(scheme, [d_ff], rows, dist, n_diag, n_off, seed)[d_ff]


# ------------------------------------------------------------------------------------ the update
def split_bf16(x: torch.Tensor, terms: int) -> list[torch.Tensor]:
    """fp32(x) ≈ Σ parts, each part a bf16 value (as fp32): each the nearest bf16 of the remainder.

    The remainder is formed in fp32 as the kernels do (exact: r − bf16(r) is representable)."""
    parts, r = [], x.to(torch.float32)
    for _ in range(terms):
        p = r.to(torch.bfloat16).to(torch.float32)
        parts.append(p)
        r = r - p
    return parts


@dataclass
class UpdateError:
    """Modelled error of W ← D W at sampled output entries, for one kernel scheme."""

    scheme: str
    n: int
    median_rel: float  # median of (fp32 result before rounding − exact) / exact: the truncation shrink
    mismatch: float  # share of bf16 outputs that differ from the correctly rounded exact result


def update_error(
    d: int, n: int, edit_rows: Callable[[torch.Tensor, int, int, torch.Generator], torch.Tensor],
    schemes: tuple[str, ...] = ("old_tc", "delta_tc"), seed: int = 0, chunk: int = 1024,
    triton_bk: int = 64, triton_rows_per_acc: int = 128,
) -> dict[str, UpdateError]:
    """W ← (I + E) W at ``n`` random output entries of a [d, ·] bf16 W, modelled per kernel scheme.

    ``edit_rows(rows, c0, c1, g)`` returns E[rows, c0:c1] (float64, without the identity) for the
    sampled output rows; W's columns are N(0, 1) rounded to bf16 (the relative error does not
    depend on W's scale). Schemes:

    * ``"old_tc"``: the previous ``update_bf16_tc`` — fp32 D = I + E split into three bf16 terms,
      for each k16 step the lo, mid and hi products truncated onto ONE accumulator (3·d/16
      truncating steps, no hand-off), then one rounding to bf16;
    * ``"delta_tc"``: the current ``update_delta_bf16_tc`` — fp32 E split into two bf16 terms, for
      each k16 step the lo then hi products truncated onto a partial sum that is handed off to a
      round-to-nearest fp32 sum every 64 rows of the reduction (two 32-deep slabs), then
      W[i, j] + (E·W)[i, j] in fp32 and one rounding to bf16;
    * ``"torch_delta"``: the torch default's delta form on CUDA — the same two bf16 terms, each
      one cuBLAS product over the whole reduction (one unbounded truncating chain each), E_hi·W
      added to E_lo·W in the GEMM epilogue, then W added in fp32 and one rounding to bf16;
    * ``"triton_delta"``: the Triton kernel (kernels/multiplicative_update.py) — the same two bf16
      terms, per slab of ``triton_bk`` rows first every k16 step of E_lo then every one of E_hi
      truncated onto the partial sum, handed off to a round-to-nearest fp32 sum every
      ``triton_rows_per_acc`` rows, then W added in fp32 and one rounding to bf16
      (``triton_chain`` is that chain, shared with the bit-for-bit test of the kernel).

    The data are generated ``chunk`` reduction indices at a time, so memory stays O(n · chunk).
    """
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, d, (n,), generator=g)
    steps = math.ceil(d / K_STEP)
    n_parts = {"old_tc": 3, "delta_tc": 2, "torch_delta": 2, "triton_delta": 2}
    blocks = {s: torch.zeros(n_parts[s], steps, n, dtype=torch.float64) for s in schemes}
    exact = torch.zeros(n, dtype=torch.float64)
    w_self = torch.zeros(n, dtype=torch.float64)
    for c0 in range(0, d, chunk):
        c1 = min(d, c0 + chunk)
        E = edit_rows(rows, c0, c1, g)  # [n, c]
        W = torch.randn(n, c1 - c0, generator=g).to(torch.bfloat16).to(torch.float32)  # [n, c]
        hit = (rows >= c0) & (rows < c1)  # the identity's column falls in this chunk
        idx = torch.nonzero(hit).squeeze(1)
        w_self[idx] = W[idx, rows[idx] - c0].double()
        D = E.clone()
        D[idx, rows[idx] - c0] += 1.0
        exact += (D * W.double()).sum(-1)
        for s in schemes:
            parts = split_bf16(D if s == "old_tc" else E, n_parts[s])[::-1]
            for q, p in enumerate(parts):  # small terms first, as the kernels issue them
                prod = (p * W).double()  # bf16 × bf16: exact in fp32
                pad = (-(c1 - c0)) % K_STEP
                prod = torch.nn.functional.pad(prod, (0, pad)) if pad else prod
                blocks[s][q, c0 // K_STEP : c0 // K_STEP + prod.shape[1] // K_STEP] = (
                    prod.reshape(n, -1, K_STEP).sum(-1).T)
    out = {}
    for s in schemes:
        if s == "torch_delta":  # two separate chains (lo, hi), summed in the epilogue
            chains = []
            for q in range(2):
                part = torch.zeros(n, dtype=torch.float64)
                for st in range(steps):
                    part = rz_fp32(part + blocks[s][q, st])
                chains.append(part)
            before = rn_fp32(w_self + rn_fp32(chains[1] + chains[0]))
        elif s == "triton_delta":
            before = rn_fp32(w_self + triton_chain(blocks[s], triton_bk, triton_rows_per_acc))
        else:
            per = steps if s == "old_tc" else 64 // K_STEP
            acc = torch.zeros(n, dtype=torch.float64)
            part = torch.zeros_like(acc)
            for st in range(steps):
                for q in range(n_parts[s]):
                    part = rz_fp32(part + blocks[s][q, st])
                if (st + 1) % per == 0 or st + 1 == steps:
                    acc = rn_fp32(acc + part)
                    part = torch.zeros_like(acc)
            before = acc if s == "old_tc" else rn_fp32(w_self + acc)
        ok = exact != 0
        out[s] = UpdateError(
            scheme=s, n=n,
            median_rel=float(((before - exact)[ok] / exact[ok]).median()),
            mismatch=float((rn_bf16(before) != rn_bf16(exact)).double().mean()),
        )
    return out


def triton_chain(blocks: torch.Tensor, bk: int, rows_per_acc: int | None) -> torch.Tensor:
    """The Triton update kernel's accumulation of E·W: ``blocks`` [2, steps, ...] holds the exact
    k16-step sums of E_lo·W (index 0) and E_hi·W (index 1). Per slab of ``bk`` rows, E_lo's steps
    then E_hi's are truncated onto the partial sum; every ``rows_per_acc`` rows (None: never) it is
    handed off to a round-to-nearest fp32 sum. Returns that sum (float64 holding fp32 values)."""
    steps = blocks.shape[1]
    per_slab = bk // K_STEP
    n_slabs = math.ceil(steps / per_slab)
    slabs_per_acc = n_slabs if rows_per_acc is None else max(1, rows_per_acc // bk)
    acc = torch.zeros(blocks.shape[2:], dtype=torch.float64)
    part = torch.zeros_like(acc)
    for sl in range(n_slabs):
        for q in range(2):
            for st in range(sl * per_slab, min((sl + 1) * per_slab, steps)):
                part = rz_fp32(part + blocks[q, st])
        if (sl + 1) % slabs_per_acc == 0 or sl + 1 == n_slabs:
            acc = rn_fp32(acc + part)
            part = torch.zeros_like(acc)
    return acc
