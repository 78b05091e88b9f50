"""Ops with a plain-PyTorch default and faster backends registered over it.

    from zu_fast import ops
    ops.cov_accumulate(kk, ks, n, keys, mask)       # corpus statistics, in place
    ops.multiplicative_update_(W, D)                # W ← D W, in place
    ops.info()                                      # every op, its backends, which one is chosen

Backend choice: ``ZU_FAST_BACKEND=torch|triton|cuda`` forces one; otherwise the fastest available
for the device (see ``backends.py`` for the order and the measurements behind it).
"""

from __future__ import annotations

import torch

from . import registry
from .cov_accumulate import cov_accumulate_torch, symmetrize_upper_
from .multiplicative_update import multiplicative_update_torch, stochastic_round
from .registry import backend_fn, choose, info, list_ops, register_backend, use_backend

registry.define_op("cov_accumulate", cov_accumulate_torch)
registry.define_op("multiplicative_update_", multiplicative_update_torch)

from . import backends as _backends  # noqa: E402,F401  (registers triton/cuda over the defaults)


def cov_accumulate(kk, ks, n, keys, mask=None, *, values=None, vk=None, vs=None) -> None:
    """In place: kk += KᵀK (upper triangle), ks += Σk, n += rows [, vk += VᵀK, vs += Σv] over kept rows."""
    fn = choose("cov_accumulate", keys.device.type).fn
    fn(kk, ks, n, keys, mask, values=values, vk=vk, vs=vs)


def multiplicative_update_(W: torch.Tensor, D: torch.Tensor, **kwargs) -> torch.Tensor:
    """In place: W ← D W with ≥fp32 accumulation and one rounding; see multiplicative_update.py."""
    return choose("multiplicative_update_", W.device.type).fn(W, D, **kwargs)


__all__ = [
    "backend_fn",
    "choose",
    "cov_accumulate",
    "info",
    "list_ops",
    "multiplicative_update_",
    "register_backend",
    "stochastic_round",
    "symmetrize_upper_",
    "use_backend",
]
