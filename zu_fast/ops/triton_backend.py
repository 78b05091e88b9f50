"""Triton backend registration (kernels live in zu_fast.kernels, one per file).

Nothing is imported from Triton here: each registered function imports its kernel module on first
call, and availability (Triton importable and a CUDA device present) is checked lazily by the
registry. Under ``TRITON_INTERPRET=1`` the kernels also run on CPU tensors when called directly
(``zu_fast.ops.backend_fn(op, "triton")``), which is how the CPU test suite exercises them.

A kernel that fails to compile on the device at hand (a Triton error raised before anything is
written) is not a crash of the op: ``is_compile_error`` tells the registry, which warns once,
naming the backend, and runs the plain-PyTorch default from then on (registry.call).
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


def is_compile_error(e: BaseException) -> bool:
    """Whether ``e`` is Triton failing to build a kernel for this device (front end, MLIR passes,
    ptxas, or resources the compiled kernel needs and the device lacks): raised before the launch,
    so the op's outputs are untouched and the default can run instead."""
    try:
        from triton.compiler.errors import CompilationError
        from triton.runtime.errors import OutOfResources, PTXASError
    except Exception:  # pragma: no cover - triton missing or of another layout
        return False
    if isinstance(e, (CompilationError, OutOfResources, PTXASError)):
        return True
    # an MLIR pass that fails raises a bare RuntimeError from the compiler's pass manager
    return isinstance(e, RuntimeError) and "PassManager::run failed" in str(e)


def cov_accumulate_triton(kk, ks, n, keys, mask=None, *, values=None, vk=None, vs=None) -> None:
    """Triton ``cov_accumulate``: upper-triangle tiles of kk, sums and n in one launch (lazy import)."""
    from ..kernels.cov_accumulate import cov_accumulate_triton as fn

    fn(kk, ks, n, keys, mask, values=values, vk=vk, vs=vs)


def multiplicative_update_triton(W, D, *, form: str = "multiplier", **kwargs):
    """Triton ``multiplicative_update_``: W + E·W in place, tensor cores for bf16 W and fp32 E (lazy import)."""
    from ..kernels.multiplicative_update import multiplicative_update_triton as fn

    return fn(W, D, form=form, **kwargs)


# No static preference: on a GPU a backend is preferred only where measured_preferences.json says so
# for that device (correctness tests passed there and it beat torch in the GPU check's tables;
# preferences.py).
for _op, _fn in (("cov_accumulate", cov_accumulate_triton), ("multiplicative_update_", multiplicative_update_triton)):
    register_backend(
        _op,
        "triton",
        _fn,
        device_types=("cuda",),
        available=_available,
        why_unavailable=_why_unavailable,
        fallback_on=is_compile_error,
        prefer_on=(),
    )
