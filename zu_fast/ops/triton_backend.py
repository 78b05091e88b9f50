"""Triton backend registration (kernels live in zu_fast.kernels, one per file).

Nothing is imported from Triton here: each registered function imports its kernel module on first
call, and availability (Triton importable and a CUDA device present) is checked lazily by the
registry. Under ``TRITON_INTERPRET=1`` the kernels also run on CPU tensors when called directly
(``zu_fast.ops.backend_fn(op, "triton")``), which is how the CPU test suite exercises them.
"""

from __future__ import annotations

import importlib.util

from .registry import register_backend


def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def _available() -> bool:
    if not _triton_importable():
        return False
    import torch

    if not torch.cuda.is_available():
        return False
    import triton  # noqa: F401  (a broken install counts as unavailable: the registry catches it)

    return True


def _why_unavailable() -> str:
    if not _triton_importable():
        return "triton is not installed"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    try:
        import triton  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the install
        return f"importing triton failed: {e!r}"
    return ""


def cov_accumulate_triton(kk, ks, n, keys, mask=None, *, values=None, vk=None, vs=None) -> None:
    """Triton ``cov_accumulate``: upper-triangle tiles of kk, sums and n in one launch (lazy import)."""
    from ..kernels.cov_accumulate import cov_accumulate_triton as fn

    fn(kk, ks, n, keys, mask, values=values, vk=vk, vs=vs)


# No static preference: on a GPU it is preferred only where measured_preferences.json says so for
# that device (correctness tests passed there and it beat torch in cov_table.py; preferences.py).
register_backend(
    "cov_accumulate",
    "triton",
    cov_accumulate_triton,
    device_types=("cuda",),
    available=_available,
    why_unavailable=_why_unavailable,
    prefer_on=(),
)
