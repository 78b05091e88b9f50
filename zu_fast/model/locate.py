"""Locating the edited modules on any HF causal LM, by name template."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import UnlearnConfig
from ..errors import ZuFastError


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name``; a clear error naming the closest existing prefix if absent."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        parts = name.split(".")
        have = ""
        for i in range(len(parts), 0, -1):
            try:
                model.get_submodule(".".join(parts[:i]))
                have = ".".join(parts[:i])
                break
            except AttributeError:
                continue
        raise ZuFastError(
            f"module {name!r} not found in {type(model).__name__}"
            + (f" (the longest existing prefix is {have!r})" if have else "")
            + "; set rewrite_module_tmp / layer_module_tmp in UnlearnConfig for this architecture"
        ) from None


def layer_count(model: nn.Module, layer_module_tmp: str) -> int:
    """Number of decoder layers, found by probing the layer template."""
    n = 0
    while True:
        try:
            model.get_submodule(layer_module_tmp.format(n))
        except AttributeError:
            return n
        n += 1


def model_device(model: nn.Module) -> torch.device:
    """Device of the input embeddings (where token ids must go)."""
    try:
        emb = model.get_input_embeddings()
        return emb.weight.device
    except (AttributeError, NotImplementedError):
        return next(model.parameters()).device


@dataclass
class EditTarget:
    """One edited linear map W: k ∈ R^{d_in} → v = W k (+ b) ∈ R^d at one layer."""

    layer: int
    name: str
    module: nn.Module
    transposed: bool  # GPT-2 Conv1D stores Wᵀ

    @property
    def weight(self) -> torch.Tensor:
        """W as a [d, d_in] view of the module's parameter (detached; in-place writes go through)."""
        w = self.module.weight.detach()
        return w.t() if self.transposed else w

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.module, "bias", None)

    @property
    def d(self) -> int:
        return self.weight.shape[0]

    @property
    def d_in(self) -> int:
        return self.weight.shape[1]

    @property
    def device(self) -> torch.device:
        return self.module.weight.device


def edit_targets(model: nn.Module, cfg: UnlearnConfig) -> list[EditTarget]:
    """The edit targets of ``cfg.layers``, validating layer range and module kind."""
    n_layers = layer_count(model, cfg.layer_module_tmp)
    if n_layers == 0:
        raise ZuFastError(
            f"layer_module_tmp {cfg.layer_module_tmp!r} matched nothing in {type(model).__name__}; "
            "set it (and rewrite_module_tmp) for this architecture"
        )
    out = []
    for layer in cfg.layers:
        if not 0 <= layer < n_layers:
            raise ZuFastError(f"layer {layer} out of range: the model has layers 0..{n_layers - 1}")
        name = cfg.rewrite_module_tmp.format(layer)
        mod = get_module(model, name)
        if isinstance(mod, nn.Linear):
            transposed = False
        elif type(mod).__name__ == "Conv1D" and hasattr(mod, "weight"):
            transposed = True  # transformers' GPT-2 Conv1D: y = x @ weight + bias, weight [d_in, d]
        else:
            raise ZuFastError(
                f"layer {layer}: module {name!r} is a {type(mod).__name__}; zu_fast edits nn.Linear or "
                "Conv1D modules (the MLP's output projection)"
            )
        if mod.weight.device.type == "meta":
            raise ZuFastError(
                f"layer {layer}: weight of {name!r} is on the meta device (offloaded); load it onto a real "
                "device before editing"
            )
        out.append(EditTarget(layer, name, mod, transposed))
    return out
