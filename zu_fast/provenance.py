"""Where weights and statistics come from: the per-model stack of zu_fast edits, and the fingerprint of
the weights that corpus statistics depend on.

Both ``zu_fast.edit`` (which pushes and pops edits) and ``zu_fast.stats`` (which accepts the statistics
of the unedited model for a model that carries only zu_fast edits: sequential unlearning) use this
module; it knows neither of them. A stack entry is anything with the bound state an applied edit has
(:class:`StackEntry`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import torch

from .model import model_fingerprint, tensor_fingerprint
from .model.locate import EditTarget, ExpertSlice, Locate

_STACK_ATTR = "_zu_fast_edit_stack"  # a plain attribute on the model: not a parameter, buffer or module


class StackEntry(Protocol):
    """What the stack needs of an applied edit."""

    name: str
    bound_targets: Mapping[int, EditTarget]  # key → the weight it changed
    backups: Mapping[int, torch.Tensor]  # key → that weight before this edit
    applied_fingerprints: Mapping[int, str]  # key → fingerprint of the weight this edit left


def stack(model: torch.nn.Module) -> list[Any]:
    """The model's edit stack itself (mutable), oldest first."""
    st = model.__dict__.get(_STACK_ATTR)
    if st is None:
        st = model.__dict__[_STACK_ATTR] = []
    return st


def edits(model: torch.nn.Module) -> list[Any]:
    """The zu_fast edits applied to ``model`` in this session, oldest first (the last is on top)."""
    return list(model.__dict__.get(_STACK_ATTR) or [])


@contextlib.contextmanager
def weights_swapped(params: Mapping[torch.nn.Parameter, torch.Tensor]) -> Iterator[None]:
    """Point each parameter at another tensor for the block (a reference swap, no copy of the weights; the
    original tensors are put back in ``finally``, so nothing changes even on an interrupt)."""
    saved = {p: p.data for p in params}
    try:
        with torch.no_grad():
            for p, t in params.items():
                p.data = t
        yield
    finally:
        with torch.no_grad():
            for p, t in saved.items():
                p.data = t


def stats_model_fingerprint(model: torch.nn.Module, layers: Sequence[int], locate: Locate) -> str:
    """Fingerprint of the weights corpus statistics depend on: the input embeddings and the decoder layers
    0..max(layers) (the statistics pass stops after the deepest edited layer)."""
    prefixes = [locate.layer_module.format(i) + "." for i in range(max(layers) + 1)]
    emb = model.get_input_embeddings()
    for name, mod in model.named_modules():
        if mod is emb:
            prefixes.append(name + ".")
    return model_fingerprint(model, prefixes)


def parameter_of(t: EditTarget) -> tuple[torch.nn.Parameter | None, int | None]:
    """The model parameter a target's weight lives in, and the expert index for a fused-experts slice."""
    if isinstance(t.module, ExpertSlice):
        p = getattr(t.module.owner, t.module.attr, None)
        return (p, t.module.index) if isinstance(p, torch.nn.Parameter) else (None, None)
    p = getattr(t.module, "weight", None)
    return (p, None) if isinstance(p, torch.nn.Parameter) else (None, None)


def stack_base_fingerprint(model: torch.nn.Module, layers: Sequence[int], locate: Locate) -> str | None:
    """``stats_model_fingerprint`` of the weights ``model`` had before its zu_fast edits, or None.

    None when the model carries no edits, or when an edited weight is not what the top edit touching it left
    (changed outside zu_fast: then the current weights are not "base + known edits" and nothing can be vouched
    for). This is what lets sequential unlearning re-use the unedited model's statistics.
    """
    entries: list[StackEntry] = edits(model)
    if not entries:
        return None
    first: dict[tuple[int, int | None], tuple[StackEntry, int]] = {}  # (id(parameter), expert) → oldest edit, key
    last: dict[tuple[int, int | None], tuple[StackEntry, int]] = {}
    params: dict[int, torch.nn.Parameter] = {}
    for e in entries:
        for key, t in e.bound_targets.items():
            p, index = parameter_of(t)
            if p is None:
                return None
            params[id(p)] = p
            first.setdefault((id(p), index), (e, key))
            last[(id(p), index)] = (e, key)
    originals: dict[torch.nn.Parameter, torch.Tensor] = {}
    for slot, (e, key) in last.items():
        t = e.bound_targets[key]
        if tensor_fingerprint(t.module.weight.detach()) != e.applied_fingerprints.get(key):
            return None  # changed since the top edit touching it: not base + known edits
        e0, key0 = first[slot]
        p, index = params[slot[0]], slot[1]
        backup = e0.backups[key0].to(p.device)
        if index is None:
            originals[p] = backup
        else:  # one expert's slice of a fused [E, ...] parameter: a copy with the original slices
            full = originals.get(p)
            if full is None:
                full = originals[p] = p.detach().clone()
            full[index].copy_(backup)
    with weights_swapped(originals):
        return stats_model_fingerprint(model, layers, locate)


__all__ = ["StackEntry", "edits", "parameter_of", "stack", "stack_base_fingerprint", "stats_model_fingerprint",
           "weights_swapped"]
