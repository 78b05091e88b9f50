"""Cheap, content-sensitive fingerprints of tensors and models (cache keys, edit provenance).

Hashing every byte of a 70B model would take minutes; instead each tensor contributes its shape,
dtype, 4096 evenly spaced elements and its float64 sum and absolute sum. Any realistic change
(training, an edit, another checkpoint) changes the fingerprint; it is not a cryptographic
defence against crafted collisions.

Every dtype is fingerprinted (issue 26: a bool buffer used to fail with "abs not implemented for Bool"):
floating and integer tensors as above (their fingerprints are unchanged, so caches and saved edits stay
valid); bool as its bytes (0/1); complex as its real and imaginary parts (``view_as_real``); fp8 and every
other dtype as the integer bit patterns of its elements (exact, and defined on every device and backend).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch
from torch import nn

_SAMPLES = 4096
# dtypes hashed by value (sample in float64, float64 sum and absolute sum): the fingerprints of these never change
_BY_VALUE = {torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.int16, torch.int32,
             torch.int64, torch.uint8}
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _by_value(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a tensor of a dtype in ``_BY_VALUE`` that still shows every change of ``t``."""
    if t.dtype in _BY_VALUE:
        return t
    if t.is_quantized:
        return t.int_repr()
    if t.dtype == torch.bool:
        return t.view(torch.uint8)
    if t.is_complex():
        return torch.view_as_real(t if t.is_contiguous() else t.contiguous())  # [..., 2]: real and imaginary parts
    int_dtype = _INT_OF_SIZE.get(t.element_size())
    if int_dtype is None:  # pragma: no cover  (no such dtype in torch today)
        raise TypeError(f"cannot fingerprint a tensor of dtype {t.dtype}")
    return (t if t.is_contiguous() else t.contiguous()).view(int_dtype)  # fp8, uint16/32/64, ...: the bit patterns


@torch.no_grad()
def tensor_fingerprint(t: torch.Tensor, h: hashlib._Hash | None = None) -> str:
    """Fingerprint of one tensor (hex); updates ``h`` in place when given."""
    own = h is None
    h = h or hashlib.sha256()
    h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
    if t.device.type == "meta":
        h.update(b"meta")
    elif t.numel():
        t = _by_value(t)
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
