"""Count an edit's work in token-layer evaluations, per phase, forward and backward (issue 25).

A **token-layer evaluation** is one token's pass through one decoder layer. It does not depend on the
hardware, so it is the primary evidence when two implementations are compared on a shared CPU.

    counter = WorkCounter(model, "model.layers.{}")
    with counter:                                     # hooks on every decoder layer
        with counter.phase("targets"):
            ...                                       # forwards and backwards of the model
    counter.table()                                   # {phase: Work}

- **Forward**: a forward pre-hook on each decoder layer counts every call's tokens: *padded* (batch × sequence,
  what the layer actually computes) and *real* (the attention mask's ones; the model call's mask is read by a
  pre-hook on the model; with a KV cache the mask covers the cached prefix too, and its last columns count).
  A layer that starts counts whole, also when the forward is stopped inside it (both sides stop statistics
  and key readings right after the edited module, the layer's last matrix product). A layer replaced by a
  stand-in (zu_fast skips the layers below an injection) is not called, so not counted.
- **Backward**: when a layer's input needs a gradient, a hook on that tensor counts the layer's tokens when the
  gradient reaches it, i.e. when autograd has back-propagated through the whole layer. A layer whose input
  needs no gradient (the layer where δ is added, the layers below it) passes a gradient at most along a
  residual addition and is not counted.

Phases nest: ``phase`` and ``wrap`` (which times and labels a function's calls) keep a stack, and work and
time go to the innermost phase; times are exclusive (a phase's time does not include the time of the
phases nested in it). Used by benchmarks/vs_reference.py on both zu_fast and the authors' code, and by
tests/test_work_counting.py.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch


@dataclass
class Work:
    """Token-layer evaluations of one phase."""

    fwd_real: int = 0  # forward, non-padding tokens × layers evaluated
    fwd_padded: int = 0  # forward, batch × sequence × layers evaluated
    bwd_real: int = 0  # backward through whole layers, non-padding tokens
    bwd_padded: int = 0
    calls: int = 0  # decoder-layer forward calls (one per layer per batch)

    def __add__(self, other: Work) -> Work:
        return Work(*(getattr(self, f) + getattr(other, f) for f in self.__dataclass_fields__))

    @property
    def real(self) -> int:
        return self.fwd_real + self.bwd_real

    @property
    def padded(self) -> int:
        return self.fwd_padded + self.bwd_padded


@dataclass
class WorkCounter:
    """Hooks on a model's decoder layers counting token-layer evaluations per phase (see the module doc)."""

    model: torch.nn.Module
    layer_module_tmp: str = "model.layers.{}"
    n_layers: int | None = None
    work: dict[str, Work] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    calls: list[tuple[str, tuple, dict, object]] = field(default_factory=list)
    _stack: list[list] = field(default_factory=list)  # [name, start, nested seconds]
    _handles: list = field(default_factory=list)
    _mask: torch.Tensor | None = None
    _saved: list = field(default_factory=list)

    # ---- phases -------------------------------------------------------------------------------------------
    @property
    def current(self) -> str:
        return self._stack[-1][0] if self._stack else "other"

    @contextlib.contextmanager
    def phase(self, name: str | None) -> Iterator[None]:
        """Work and (exclusive) time of the block go to ``name`` (None: to the enclosing phase)."""
        if name is None:
            yield
            return
        self._stack.append([name, time.perf_counter(), 0.0])
        try:
            yield
        finally:
            _, t0, nested = self._stack.pop()
            dt = time.perf_counter() - t0
            self.seconds[name] = self.seconds.get(name, 0.0) + dt - nested
            if self._stack:
                self._stack[-1][2] += dt

    def wrap(self, module, name: str, phase: str | Callable[[tuple, dict], str | None] | None,
             record: bool = False) -> None:
        """Run ``module.name``'s calls inside ``phase`` (a name, or a function of (args, kwargs) giving one);
        ``record``: keep (name, args, kwargs, output) of each call in ``calls``. Undone by ``unwrap``."""
        fn = getattr(module, name)

        def wrapper(*args, **kw):
            with self.phase(phase(args, kw) if callable(phase) else phase):
                out = fn(*args, **kw)
            if record:
                self.calls.append((name, args, kw, out))
            return out

        self._saved.append((module, name, fn))
        setattr(module, name, wrapper)

    def unwrap(self) -> None:
        for module, name, fn in reversed(self._saved):
            setattr(module, name, fn)
        self._saved.clear()

    # ---- hooks --------------------------------------------------------------------------------------------
    def _layers(self) -> list[torch.nn.Module]:
        from zu_fast.model import get_module, layer_count

        n = self.n_layers or layer_count(self.model, self.layer_module_tmp)
        return [get_module(self.model, self.layer_module_tmp.format(i)) for i in range(n)]

    def __enter__(self) -> WorkCounter:
        def model_pre(module, args, kwargs):
            mask = kwargs.get("attention_mask")
            self._mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

        def layer_hook(module, args, kwargs):
            h = args[0] if args else kwargs.get("hidden_states")
            if not isinstance(h, torch.Tensor):
                return
            b, t = (h.shape[0], h.shape[1]) if h.dim() == 3 else (1, h.shape[0])
            padded = b * t
            mask = self._mask
            # a forward over a cached prefix gets the mask of prefix + new tokens: the new ones are the last t
            real = int(mask[:, -t:].sum()) if mask is not None and mask.shape[0] == b and mask.shape[1] >= t \
                else padded
            w = self.work.setdefault(self.current, Work())
            w.fwd_real += real
            w.fwd_padded += padded
            w.calls += 1
            if h.requires_grad and torch.is_grad_enabled():
                name = self.current

                def on_grad(grad, name=name, real=real, padded=padded):
                    wb = self.work.setdefault(name, Work())
                    wb.bwd_real += real
                    wb.bwd_padded += padded

                h.register_hook(on_grad)

        self._handles.append(self.model.register_forward_pre_hook(model_pre, with_kwargs=True))
        for layer in self._layers():
            self._handles.append(layer.register_forward_pre_hook(layer_hook, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.unwrap()

    # ---- results ------------------------------------------------------------------------------------------
    def total(self, phases: list[str] | None = None) -> Work:
        out = Work()
        for name, w in self.work.items():
            if phases is None or name in phases:
                out = out + w
        return out


def merge(a: dict[str, Work], b: dict[str, Work]) -> dict[str, Work]:
    """Phase-wise sum of two work tables."""
    out = dict(a)
    for k, w in b.items():
        out[k] = out[k] + w if k in out else w
    return out
