"""Cheap, content-sensitive fingerprints of tensors and models (cache keys, edit provenance).

Hashing every byte of a 70B model would take minutes; instead each tensor contributes its shape,
dtype, 4096 evenly spaced elements and its float64 sum and absolute sum. Any realistic change
(training, an edit, another checkpoint) changes the fingerprint; it is not a cryptographic
defence against crafted collisions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch
from torch import nn

_SAMPLES = 4096


@torch.no_grad()
def tensor_fingerprint(t: torch.Tensor, h: hashlib._Hash | None = None) -> str:
    """Fingerprint of one tensor (hex); updates ``h`` in place when given."""
    own = h is None
    h = h or hashlib.sha256()
    h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
    if t.device.type == "meta":
        h.update(b"meta")
    elif t.numel():
        flat = t.reshape(-1) if t.is_contiguous() else t.contiguous().reshape(-1)
        idx = torch.linspace(0, flat.numel() - 1, min(_SAMPLES, flat.numel()), device=flat.device).long()
        sample = flat[idx].detach().to("cpu", torch.float64)
        h.update(sample.numpy().tobytes())
        sums = torch.stack([flat.sum(dtype=torch.float64), flat.abs().sum(dtype=torch.float64)]).cpu()
        h.update(sums.numpy().tobytes())
    return h.hexdigest() if own else ""


def model_fingerprint(model: nn.Module, prefixes: Iterable[str] | None = None) -> str:
    """Fingerprint of the parameters (and buffers) whose names start with one of ``prefixes``."""
    prefixes = tuple(prefixes) if prefixes is not None else None
    h = hashlib.sha256()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if prefixes is None or name.startswith(prefixes):
            if t.device.type == "meta":  # accelerate offload: fingerprint the value its hook keeps
                from .locate import offloaded_value

                real = offloaded_value(model, name)
                t = real if real is not None else t
            h.update(name.encode())
            tensor_fingerprint(t, h)
    return h.hexdigest()
