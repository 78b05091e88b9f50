"""Ops with a plain-PyTorch default and faster backends registered over it.

    from zu_fast import ops
    ops.cov_accumulate(kk, ks, n, keys, mask)       # corpus statistics, in place
    ops.multiplicative_update_(W, D)                # W ← D W, in place
    ops.multiplicative_update_(W, E, form="delta")  # W ← W + E W (E = D − I, what an edit stores)
    ops.info()                                      # every op, its backends, which one is chosen

Backend choice: ``ZU_FAST_BACKEND=torch|triton|cuda`` forces one; otherwise the backend measured
to be correct and faster than torch on this GPU (``preferences.py``, ``measured_preferences.json``),
else torch. A chosen backend whose kernel fails to compile here falls back to torch with one
warning (``registry.call``).
"""

from __future__ import annotations

import torch

from . import registry
from .cov_accumulate import cov_accumulate_torch, symmetrize_upper_
from .multiplicative_update import edit_seed, multiplicative_update_torch, stochastic_round
from .registry import backend_fn, call, choose, info, list_ops, register_backend, use_backend

registry.define_op("cov_accumulate", cov_accumulate_torch)
registry.define_op("multiplicative_update_", multiplicative_update_torch)

from . import backends as _backends  # noqa: E402,F401  (registers triton/cuda over the defaults)


def cov_accumulate(kk, ks, n, keys, mask=None, *, values=None, vk=None, vs=None) -> None:
    """In place: kk += KᵀK (upper triangle), ks += Σk, n += rows [, vk += VᵀK, vs += Σv] over kept rows."""
    call("cov_accumulate", keys.device.type, keys.device.index, kk, ks, n, keys, mask, values=values, vk=vk, vs=vs)


def multiplicative_update_(W: torch.Tensor, D: torch.Tensor, *, form: str = "multiplier", **kwargs) -> torch.Tensor:
    """In place: W ← D W, or with ``form="delta"`` W ← W + D W where D is E = D − I (the form an
    edit stores and the fast paths want); ≥fp32 accumulation, one rounding. Options
    (``chunk_cols``, ``stochastic_rounding``, ``seed``): see multiplicative_update.py."""
    return call("multiplicative_update_", W.device.type, W.device.index, W, D, form=form, **kwargs)


__all__ = [
    "backend_fn",
    "call",
    "choose",
    "cov_accumulate",
    "edit_seed",
    "info",
    "list_ops",
    "multiplicative_update_",
    "register_backend",
    "stochastic_round",
    "symmetrize_upper_",
    "use_backend",
]
