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


def offload_hook(module: nn.Module):
    """The accelerate hook that offloads ``module``'s own weights (weights_map + offload=True), or None.

    With accelerate's CPU/disk offload the parameters of such a module sit on the meta device and
    the hook materialises them from its ``weights_map`` only for the duration of the forward.
    """
    for h in _hooks(module):
        if getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None:
            return h
    return None


def execution_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: its weight's device, or accelerate's execution device when offloaded."""
    if module.weight.device.type != "meta":
        return module.weight.device
    for h in _hooks(module):
        dev = getattr(h, "execution_device", None)
        if dev is not None:
            return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
    raise ZuFastError(f"{type(module).__name__} has its weights on the meta device and no accelerate hook that "
                      "says where it runs; load the model onto a real device")


def _hooks(module: nn.Module) -> list:
    """accelerate hooks on ``module`` (a SequentialHook unpacked)."""
    hook = getattr(module, "_hf_hook", None)
    return list(getattr(hook, "hooks", None) or ([hook] if hook is not None else []))


def offloaded_value(model: nn.Module, name: str) -> torch.Tensor | None:
    """The real value of parameter/buffer ``name`` that accelerate keeps in an offload map (else None)."""
    mod_name, _, attr = name.rpartition(".")
    try:
        mod = model.get_submodule(mod_name) if mod_name else model
    except AttributeError:
        return None
    hook = offload_hook(mod)
    if hook is None:
        return None
    try:
        return hook.weights_map[attr]
    except KeyError:
        return None


def model_device(model: nn.Module) -> torch.device:
    """Device of the input embeddings (where token ids must go; accelerate's execution device if offloaded)."""
    try:
        emb = model.get_input_embeddings()
        return execution_device(emb)
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
        """Where the module computes (accelerate's execution device for an offloaded module)."""
        return execution_device(self.module)

    @property
    def offloaded(self) -> bool:
        """True when accelerate keeps the weight in an offload map (meta here, real only in its forward)."""
        return self.module.weight.device.type == "meta"


def edit_targets(model: nn.Module, cfg: UnlearnConfig, *, allow_offloaded: bool = False) -> list[EditTarget]:
    """The edit targets of ``cfg.layers``, validating layer range and module kind.

    ``allow_offloaded``: accept modules whose weights accelerate offloads (CPU/disk offload hooks):
    reading their inputs (statistics) works, but the edit writes weights in place, so ``unlearn``
    requires the edited modules to be resident and refuses offloaded ones with a clear error.
    """
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
            if offload_hook(mod) is None:
                raise ZuFastError(
                    f"layer {layer}: weight of {name!r} is on the meta device (not loaded); load it onto a real "
                    "device before editing"
                )
            if not allow_offloaded:
                raise ZuFastError(
                    f"layer {layer}: {name!r} is offloaded by accelerate (its weight lives in the offload hook's "
                    "weights map and is materialised only during its forward); zu_fast edits weights in place, so "
                    f"the edited layers must be resident: keep {cfg.layer_module_tmp.format(layer)!r} on a device "
                    "in the device_map (e.g. device_map[...] = 0 or 'cpu', not 'disk' and outside cpu_offload). "
                    "collect_stats works with offloaded layers."
                )
        out.append(EditTarget(layer, name, mod, transposed))
    return out
