"""Forward hooks: capture module inputs/outputs, stop the forward early, inject δ at a layer."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..errors import ZuFastError
from .locate import get_module


class StopForward(Exception):
    """Raised by a hook to end a forward pass once everything needed has been read."""


def _first(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, (tuple, list)) else x


# Some decoders flatten the tokens before the MLP (OPT's decoder layer, Qwen2-MoE's shared expert, every
# MoE block): their modules see [batch·seq, d] instead of [batch, seq, d]. Token masks must follow, and
# a capture is viewed back as [batch, seq, d] so that (row, position) indexing keeps working.


def match_token_mask(x: torch.Tensor, mask: torch.Tensor, name: str = "") -> torch.Tensor:
    """The token mask [batch, seq] shaped like ``x``'s leading dims: as is for x [batch, seq, ·],
    flattened for a module that sees flattened tokens x [batch·seq, ·]."""
    lead = tuple(x.shape[:-1])
    if lead == tuple(mask.shape):
        return mask
    if len(lead) == 1 and lead[0] == mask.numel():
        return mask.reshape(-1)
    raise ZuFastError(f"module {name!r} sees inputs of shape {tuple(x.shape)}, which are neither [batch, seq, ·] "
                      f"nor flattened [batch·seq, ·] tokens of the batch {tuple(mask.shape)}")


def unflatten_tokens(x: torch.Tensor, batch_shape: tuple[int, int] | None) -> torch.Tensor:
    """``x`` [batch·seq, d] viewed as [batch, seq, d] (anything else returned as is)."""
    if batch_shape is None or x.dim() != 2 or x.shape[0] != batch_shape[0] * batch_shape[1]:
        return x
    return x.view(batch_shape[0], batch_shape[1], x.shape[1])


def batch_shape_of(args: tuple, kwargs: dict) -> tuple[int, int] | None:
    """[batch, seq] of a model call, from its input_ids / inputs_embeds / attention_mask."""
    for key in ("input_ids", "inputs_embeds", "attention_mask"):
        v = kwargs.get(key)
        if isinstance(v, torch.Tensor) and v.dim() >= 2:
            return int(v.shape[0]), int(v.shape[1])
    if args and isinstance(args[0], torch.Tensor) and args[0].dim() >= 2:
        return int(args[0].shape[0]), int(args[0].shape[1])
    return None


class Capture:
    """Record the input and/or output tensor of named modules during forwards.

    ``Capture(model, inputs=[...], outputs=[...], stop_after=name)`` used as a context manager;
    after a forward, ``cap.inputs[name]`` / ``cap.outputs[name]`` hold the (first) tensor.
    ``on_input`` / ``on_output`` callbacks (name, tensor) let a caller consume each batch at once
    (e.g. accumulate statistics) instead of keeping it. A module that sees flattened tokens
    [batch·seq, d] (OPT's ``fc2``) is captured as [batch, seq, d], like every other module.
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: list[str] = (),
        outputs: list[str] = (),
        stop_after: str | None = None,
        on_input=None,
        on_output=None,
        keep: bool = True,
    ) -> None:
        self.model = model
        self.input_names = list(inputs)
        self.output_names = list(outputs)
        self.stop_after = stop_after
        self.on_input = on_input
        self.on_output = on_output
        self.keep = keep
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.output_tuple_len: dict[str, int] = {}  # 0: the module returned a bare tensor
        self._handles: list[Any] = []
        self._batch_shape: tuple[int, int] | None = None  # [batch, seq] of the model call in flight

    def __enter__(self) -> Capture:
        def record_shape(module, args, kwargs):
            self._batch_shape = batch_shape_of(args, kwargs)

        self._handles.append(self.model.register_forward_pre_hook(record_shape, with_kwargs=True))
        stop = [self.stop_after] if self.stop_after else []
        for name in dict.fromkeys(self.input_names + self.output_names + stop):
            mod = get_module(self.model, name)
            self._handles.append(mod.register_forward_hook(self._hook(name), with_kwargs=True))
        return self

    def _hook(self, name: str):
        def hook(module, args, kwargs, output):
            if name in self.input_names:
                x = unflatten_tokens(args[0] if args else next(iter(kwargs.values())), self._batch_shape)
                if self.keep:
                    self.inputs[name] = x.detach()
                if self.on_input is not None:
                    self.on_input(name, x.detach())
            if name in self.output_names:
                y = unflatten_tokens(_first(output), self._batch_shape)
                self.output_tuple_len[name] = len(output) if isinstance(output, (tuple, list)) else 0
                if self.keep:
                    self.outputs[name] = y.detach()
                if self.on_output is not None:
                    self.on_output(name, y.detach())
            if name == self.stop_after:
                raise StopForward

        return hook

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def forward_until(model: nn.Module, batch: dict[str, torch.Tensor]) -> bool:
    """Run ``model(**batch)`` (use_cache off); True when a hook ended it early with StopForward.

    The hooks that raise StopForward are the caller's (Capture(stop_after=...), a stats hook, ...).
    """
    try:
        model(**batch, use_cache=False)
    except StopForward:
        return True
    return False


class _Passthrough(nn.Module):
    """Stands in for a decoder layer whose output is already known: skips its computation."""

    def __init__(self, orig: nn.Module, output_fn, tuple_len: int) -> None:
        super().__init__()
        object.__setattr__(self, "_orig", orig)  # not a submodule: its parameters stay out of this
        self._output_fn = output_fn
        self._tuple_len = tuple_len

    def __getattr__(self, item: str) -> Any:
        # HF models read attributes of their layers (e.g. attention_type for sliding windows)
        try:
            return super().__getattr__(item)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_orig"), item)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = self._output_fn(hidden_states)
        if self._tuple_len:
            return (out,) + (None,) * (self._tuple_len - 1)
        return out


@contextlib.contextmanager
def inject_at_layer(
    model: nn.Module,
    layer_module_tmp: str,
    layer: int,
    base_output: torch.Tensor,
    add_fn,
    tuple_len: int,
    skip_below: bool = True,
) -> Iterator[None]:
    """Make decoder layer ``layer`` output ``base_output + add_fn()`` during forwards in the block.

    With ``skip_below`` the layers 0..layer are replaced by pass-throughs, so a forward runs only
    the embeddings and the layers above ``layer`` (their inputs are what ``base_output`` says):
    the z optimisation then costs (L − layer − 1)/L of a full forward per step. Without it a
    forward hook replaces the output and everything below still runs (a fallback for models whose
    layer loop cannot take stand-ins).
    """
    if not skip_below:
        mod = get_module(model, layer_module_tmp.format(layer))

        def hook(module, args, output):
            new = base_output + add_fn()
            if isinstance(output, (tuple, list)):
                return (new,) + tuple(output[1:])
            return new

        handle = mod.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()
        return

    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for i in range(layer + 1):
            name = layer_module_tmp.format(i)
            parent_name, _, attr = name.rpartition(".")
            parent = get_module(model, parent_name) if parent_name else model
            orig = getattr(parent, attr) if not attr.isdigit() else parent[int(attr)]
            if i < layer:
                stand_in = _Passthrough(orig, lambda h: h, tuple_len)
            else:
                stand_in = _Passthrough(orig, lambda h: base_output + add_fn(), tuple_len)
            if attr.isdigit():
                parent[int(attr)] = stand_in
            else:
                setattr(parent, attr, stand_in)
            swapped.append((parent, attr, orig))
        yield
    finally:
        for parent, attr, orig in reversed(swapped):
            if attr.isdigit():
                parent[int(attr)] = orig
            else:
                setattr(parent, attr, orig)
