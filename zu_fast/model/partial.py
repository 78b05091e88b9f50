"""Load only the part of a checkpoint that statistics need: embeddings and layers 0..L.

Statistics at the edited layers read the keys of ``down_proj`` of layers ≤ max(layers); nothing
above the deepest edited layer ever runs (the forward is stopped there). So for a 70B model whose
deepest edited layer is 21 of 80, only ~27% of the weights are needed. ``load_partial_model``:

1. reads ``config.json`` and builds the model with ``num_hidden_layers = L + 1`` under
   ``accelerate.init_empty_weights(include_buffers=False)``: parameters on the meta device (no
   memory, no random init), buffers (e.g. rotary ``inv_freq``, computed in ``__init__``) real;
2. opens the safetensors shards (``model.safetensors.index.json`` aware) and reads exactly the
   tensors the truncated model has, straight onto ``device`` (safetensors' ``safe_open(device=…)``:
   for CUDA the host never holds the whole model), assigning them in place of the meta ones.

Parameter names match the full model's (layer i keeps the name ``model.layers.i``), so weight
fingerprints and therefore the statistics cache are shared with the full model. The LM head is
not needed for statistics and stays on the meta device unless ``include_head``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import ZuFastError


def checkpoint_index(path: str | os.PathLike) -> dict[str, str]:
    """Tensor name → shard file name of a local HF checkpoint folder (sharded or single-file)."""
    path = Path(path)
    idx = path / "model.safetensors.index.json"
    if idx.exists():
        return dict(json.loads(idx.read_text())["weight_map"])
    single = path / "model.safetensors"
    if single.exists():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return {k: single.name for k in f.keys()}
    raise ZuFastError(
        f"{path} has no model.safetensors or model.safetensors.index.json: zu_fast loads partial models from "
        "safetensors checkpoints only (convert .bin checkpoints with transformers' save_pretrained)"
    )


def _truncated_config(config, n_layers: int):
    cfg = config.__class__.from_dict(config.to_dict())
    total = getattr(config, "num_hidden_layers", None)
    if total is None:
        raise ZuFastError(f"config of type {type(config).__name__} has no num_hidden_layers")
    if not 1 <= n_layers <= total:
        raise ZuFastError(f"asked for {n_layers} layers; the checkpoint has {total}")
    cfg.num_hidden_layers = n_layers  # attribute_map makes this work for n_layer-style configs too
    for attr in ("layer_types",):  # per-layer lists (e.g. sliding/full attention) must match the count
        v = getattr(cfg, attr, None)
        if isinstance(v, list) and len(v) == total:
            setattr(cfg, attr, v[:n_layers])
    return cfg


def load_partial_model(
    path: str | os.PathLike,
    n_layers: int,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    include_head: bool = False,
) -> nn.Module:
    """A causal LM with only the embeddings and decoder layers 0..n_layers−1 of the checkpoint at ``path``.

    ``device``: where tensors are loaded (directly from the shards). ``dtype``: cast floating
    tensors (default: keep the checkpoint's dtype). The model is in eval mode, gradients off.
    ``model.config.num_hidden_layers`` is ``n_layers``; ``model.zu_fast_partial`` records what
    was loaded (``{"path", "n_layers", "total_layers", "tensors", "bytes"}``).
    """
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").exists():
        raise ZuFastError(f"{path} is not a local HuggingFace model folder (no config.json)")
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    total = config.num_hidden_layers
    cfg = _truncated_config(config, n_layers)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(cfg)
    device = torch.device(device)
    for mod in model.modules():  # buffers were built on the CPU: move them where the weights go
        for k, b in list(mod._buffers.items()):
            if b is not None and b.device.type != "meta":
                mod._buffers[k] = b.to(device)

    weight_map = checkpoint_index(path)
    prefix = getattr(model, "base_model_prefix", "") or ""
    wanted = {}
    head = ""
    out_emb = model.get_output_embeddings()
    for name, mod in model.named_modules():
        if mod is out_emb:
            head = name + "."
    buffers = {name for name, _ in model.named_buffers()}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for name, _ in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers()):
        if head and name.startswith(head) and (tied or not include_head):
            continue  # the LM head: not needed for statistics (or tied to the embeddings)
        if name in weight_map:
            wanted[name] = name
        elif prefix and name.startswith(prefix + ".") and name[len(prefix) + 1:] in weight_map:
            wanted[name] = name[len(prefix) + 1:]  # checkpoints saved from the base model
        elif name in buffers:
            continue  # a non-persistent buffer (computed at init, already real)
        else:
            raise ZuFastError(f"tensor {name!r} is not in the checkpoint at {path}")
    by_file: dict[str, list[str]] = {}
    for name, ckpt_name in wanted.items():
        by_file.setdefault(weight_map[ckpt_name], []).append(name)
    loaded: dict[str, torch.Tensor] = {}
    n_bytes = 0
    for fname, names in sorted(by_file.items()):
        with safe_open(str(path / fname), framework="pt", device=str(device)) as f:
            for name in names:
                t = f.get_tensor(wanted[name])
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                loaded[name] = t
                n_bytes += t.numel() * t.element_size()
    model.load_state_dict(loaded, strict=False, assign=True)
    if include_head and tied:
        model.tie_weights()
    model.eval().requires_grad_(False)
    model.zu_fast_partial = {"path": str(path), "n_layers": n_layers, "total_layers": total,
                             "tensors": len(loaded), "bytes": n_bytes}
    return model


__all__ = ["checkpoint_index", "load_partial_model"]
