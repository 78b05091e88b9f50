"""Op registry: every op has a plain-PyTorch default; faster backends register over it.

Modelled on bitsandbytes' op registry. An op is a name plus a default implementation that runs
on any device. A backend (``"triton"``, ``"cuda"``) registers an implementation for the device
types it supports, with an availability check that is evaluated lazily (importing Triton or
building a CUDA extension costs seconds, so nothing is tried until the op is first called).

Choice per call: ``ZU_FAST_BACKEND=torch|triton|cuda`` (or :func:`use_backend`) forces a backend;
otherwise the first available backend in (1) the order measured on this GPU model
(``preferences.py``: a backend is listed only where its correctness tests passed on that device
and it beat torch; read from the checked-in ``measured_preferences.json``), then (2) the order
registered with ``prefer_on`` for the device type, falling back to ``"torch"``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ..errors import ZuFastError

DEFAULT_BACKEND = "torch"
BACKEND_ENV = "ZU_FAST_BACKEND"


@dataclass
class Backend:
    name: str
    fn: Callable
    device_types: tuple[str, ...]
    available: Callable[[], bool]
    why_unavailable: Callable[[], str] = lambda: ""
    _cached: bool | None = None

    def is_available(self) -> bool:
        if self._cached is None:
            try:
                self._cached = bool(self.available())
            except Exception:  # an import or build failure means "not here", never a crash
                self._cached = False
        return self._cached


@dataclass
class Op:
    name: str
    doc: str
    backends: dict[str, Backend] = field(default_factory=dict)
    # Per device type, backends to try in order before "torch". Kept next to the op's
    # registration with the measurements that justify it.
    preference: dict[str, list[str]] = field(default_factory=dict)


_OPS: dict[str, Op] = {}
_forced: list[str] = []


def define_op(name: str, default: Callable, doc: str = "") -> Op:
    """Create op ``name`` with its plain-PyTorch default (runs on every device)."""
    lines = (default.__doc__ or "").strip().splitlines()
    op = Op(name=name, doc=doc or (lines[0] if lines else ""))
    op.backends[DEFAULT_BACKEND] = Backend(DEFAULT_BACKEND, default, ("*",), lambda: True)
    _OPS[name] = op
    return op


def register_backend(
    op_name: str,
    backend: str,
    fn: Callable,
    *,
    device_types: tuple[str, ...],
    available: Callable[[], bool] = lambda: True,
    why_unavailable: Callable[[], str] = lambda: "",
    prefer_on: tuple[str, ...] = (),
) -> None:
    """Register ``fn`` as backend ``backend`` of op ``op_name`` for ``device_types``.

    ``prefer_on`` lists device types on which this backend goes ahead of those already
    registered (later registrations with ``prefer_on`` go first).
    """
    op = get_op(op_name)
    op.backends[backend] = Backend(backend, fn, tuple(device_types), available, why_unavailable)
    for dt in prefer_on:
        order = op.preference.setdefault(dt, [])
        if backend in order:
            order.remove(backend)
        order.insert(0, backend)


def get_op(name: str) -> Op:
    try:
        return _OPS[name]
    except KeyError:
        raise ZuFastError(f"unknown op {name!r}; known ops: {sorted(_OPS)}") from None


def list_ops() -> list[Op]:
    return list(_OPS.values())


def _forced_backend() -> str | None:
    if _forced:
        return _forced[-1]
    env = os.environ.get(BACKEND_ENV, "").strip().lower()
    return env or None


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force backend ``name`` for every op inside the ``with`` block (like ZU_FAST_BACKEND)."""
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def supports(backend: Backend, device_type: str) -> bool:
    return "*" in backend.device_types or device_type in backend.device_types


def choose(op_name: str, device_type: str, device_index: int | None = None) -> Backend:
    """The backend op ``op_name`` uses for tensors on ``device_type`` (CUDA: on device
    ``device_index``, default the current one, whose name selects the measured preferences)."""
    op = get_op(op_name)
    forced = _forced_backend()
    if forced is not None:
        b = op.backends.get(forced)
        if b is None:
            raise ZuFastError(
                f"{BACKEND_ENV}={forced!r}: op {op_name!r} has no such backend "
                f"(registered: {sorted(op.backends)})"
            )
        if not supports(b, device_type):
            raise ZuFastError(
                f"{BACKEND_ENV}={forced!r}: backend does not run on device type {device_type!r} "
                f"(it supports {b.device_types})"
            )
        if not b.is_available():
            raise ZuFastError(
                f"{BACKEND_ENV}={forced!r}: backend of op {op_name!r} is not available here: "
                f"{b.why_unavailable() or 'its availability check failed'}"
            )
        return b
    from . import preferences  # here, not at import: `python -m zu_fast.ops.preferences` runs it as a script

    measured = preferences.measured_order(op_name, preferences.current_device_name(device_type, device_index))
    for name in measured + op.preference.get(device_type, []):
        b = op.backends.get(name)
        if b is not None and supports(b, device_type) and b.is_available():
            return b
    return op.backends[DEFAULT_BACKEND]


def backend_fn(op_name: str, backend: str) -> Callable:
    """The implementation of one backend, for tests and benchmarks that compare them."""
    op = get_op(op_name)
    if backend not in op.backends:
        raise ZuFastError(f"op {op_name!r} has no backend {backend!r} (registered: {sorted(op.backends)})")
    return op.backends[backend].fn


def info() -> list[dict]:
    """One row per (op, backend): device types, availability, and whether it is chosen."""
    import torch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for op in list_ops():
        chosen = {dt: choose(op.name, dt).name for dt in devices}
        for b in op.backends.values():
            avail = b.is_available()
            rows.append(
                {
                    "op": op.name,
                    "backend": b.name,
                    "device_types": ",".join(b.device_types),
                    "available": avail,
                    "why": "" if avail else b.why_unavailable(),
                    "chosen_on": ",".join(dt for dt, n in chosen.items() if n == b.name),
                }
            )
    return rows
