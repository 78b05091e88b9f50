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

A call through :func:`call` whose chosen backend fails to compile its kernel here (the backend's
``fallback_on`` says which errors those are: raised before anything is written) runs the default
instead, with one warning naming the backend, and that backend is not chosen for the op again in
this process. A forced backend raises instead (the user asked for that one).
"""

from __future__ import annotations

import contextlib
import os
import warnings
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
    # errors of ``fn`` that mean "could not build the kernel here" (raised before any output is
    # written): the registry's call() then runs the default instead
    fallback_on: Callable[[BaseException], bool] = lambda e: False
    # Set for backends whose availability check is expensive (a CUDA build: minutes): what is known
    # without running it, (True/False, or None when only the check can tell; a description).
    status: Callable[[], tuple[bool | None, str]] | None = None
    _cached: bool | None = None
    _failure: str | None = None  # set when its kernel failed to compile here (call())

    def is_available(self) -> bool:
        if self._failure is not None:
            return False
        if self._cached is None:
            try:
                self._cached = bool(self.available())
            except Exception:  # an import or build failure means "not here", never a crash
                self._cached = False
        return self._cached

    def known(self) -> tuple[bool | None, str]:
        """(available, why not) without running an expensive check: available is None when only
        that check can tell (the reason then says how the backend would be obtained)."""
        if self._failure is not None or self._cached is not None or self.status is None:
            avail = self.is_available()
            return avail, "" if avail else self.reason()
        return self.status()

    def reason(self) -> str:
        """Why it is unavailable ('' when it is available)."""
        if self._failure is not None:
            return self._failure
        return "" if self.is_available() else self.why_unavailable()


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
    fallback_on: Callable[[BaseException], bool] = lambda e: False,
    status: Callable[[], tuple[bool | None, str]] | None = None,
) -> None:
    """Register ``fn`` as backend ``backend`` of op ``op_name`` for ``device_types``.

    ``prefer_on`` lists device types on which this backend goes ahead of those already
    registered (later registrations with ``prefer_on`` go first). ``fallback_on(error)`` tells
    :func:`call` that an error of ``fn`` means its kernel could not be built here (nothing written
    yet). ``status`` marks an availability check as expensive and says what is known without it:
    ``(True | False | None, description)`` (see :func:`info`).
    """
    op = get_op(op_name)
    op.backends[backend] = Backend(backend, fn, tuple(device_types), available, why_unavailable,
                                   fallback_on, status)
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


def choose(op_name: str, device_type: str, device_index: int | None = None, *, expensive: bool = True) -> Backend:
    """The backend op ``op_name`` uses for tensors on ``device_type`` (CUDA: on device
    ``device_index``, default the current one, whose name selects the measured preferences).
    ``expensive=False`` skips backends whose availability is not known yet and costly to learn
    (a CUDA extension not built yet): what is chosen without building anything."""
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
        if not expensive and b.known()[0] is None:
            return b
        if not b.is_available():
            raise ZuFastError(
                f"{BACKEND_ENV}={forced!r}: backend of op {op_name!r} is not available here: "
                f"{b.reason() or 'its availability check failed'}"
            )
        return b
    from . import preferences  # here, not at import: `python -m zu_fast.ops.preferences` runs it as a script

    measured = preferences.measured_order(op_name, preferences.current_device_name(device_type, device_index))
    for name in measured + op.preference.get(device_type, []):
        b = op.backends.get(name)
        if b is None or not supports(b, device_type):
            continue
        if b.is_available() if expensive else b.known()[0]:
            return b
    return op.backends[DEFAULT_BACKEND]


def call(op_name: str, device_type: str, device_index: int | None, *args, **kwargs):
    """Run op ``op_name`` on the backend chosen for ``device_type``; if that backend's kernel
    fails to compile here (its ``fallback_on``), warn once naming it, stop choosing it for this
    op, and run the plain-PyTorch default (nothing was written: the error comes before the launch)."""
    b = choose(op_name, device_type, device_index)
    if b.name == DEFAULT_BACKEND:
        return b.fn(*args, **kwargs)
    try:
        return b.fn(*args, **kwargs)
    except Exception as e:
        if not b.fallback_on(e):
            raise
        first = (str(e).strip().splitlines() or [""])[-1][:300]
        what = f"the {b.name} kernel of op {op_name!r} failed to compile on this device ({type(e).__name__}: {first})"
        if _forced_backend() is not None:
            raise ZuFastError(f"{BACKEND_ENV}={b.name!r}: {what}") from e
        b._failure = what
        warnings.warn(f"zu_fast: {what}; using the torch default for {op_name!r} from now on "
                      f"(ZU_FAST_BACKEND={b.name} shows the error)", RuntimeWarning, stacklevel=3)
        return get_op(op_name).backends[DEFAULT_BACKEND].fn(*args, **kwargs)


def backend_fn(op_name: str, backend: str) -> Callable:
    """The implementation of one backend, for tests and benchmarks that compare them."""
    op = get_op(op_name)
    if backend not in op.backends:
        raise ZuFastError(f"op {op_name!r} has no backend {backend!r} (registered: {sorted(op.backends)})")
    return op.backends[backend].fn


def info(build: bool = False) -> list[dict]:
    """One row per (op, backend): device types, availability, and whether it is chosen.

    Without ``build``, nothing expensive runs: a backend whose availability would take a build
    to learn (the CUDA extension, minutes of nvcc) is reported as ``available: None`` with how it
    would be obtained, and "chosen" is what is chosen without it. ``build=True`` runs every check.
    """
    import torch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for op in list_ops():
        chosen = {dt: choose(op.name, dt, expensive=build).name for dt in devices}
        for b in op.backends.values():
            if build:
                avail = b.is_available()
                why = "" if avail else b.reason()
            else:
                avail, why = b.known()
                if avail is None:
                    why = f"not checked (a build; `zu-fast info --build` tries it): {why}"
            rows.append(
                {
                    "op": op.name,
                    "backend": b.name,
                    "device_types": ",".join(b.device_types),
                    "available": avail,
                    "why": why,
                    "chosen_on": ",".join(dt for dt, n in chosen.items() if n == b.name),
                }
            )
    return rows
