"""Edit: the result of ``unlearn`` — restore, save, load, apply, report.

An edit is a set of per-layer factors:
- ``multiplicative`` (closed form): W ← D W, stored compactly as D − I  # [d, d] fp32. The live
  edit applies exactly I + fp32(D − I) too, so ``Edit.load(dir).apply(model)`` reproduces the
  live edit bit for bit on the same device and backend.
- ``additive`` (GD variant): W ← W + ΔW, stored as ΔW  # [d, d_in] fp32.
Files: ``factors.safetensors`` and ``edit.json`` (config, module names, fingerprints of each edited
weight before and after, report). No pickle anywhere.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from . import __version__, ops
from .atomic import write_folder
from .config import UnlearnConfig
from .errors import ZuFastError
from .model import EditTarget, get_module, tensor_fingerprint


def apply_additive_(W: torch.Tensor, dW: torch.Tensor, chunk: int = 4096) -> None:
    """W += ΔW with fp32 addition and one rounding, in column chunks (no full fp32 copy of W)."""
    with torch.no_grad():
        for j in range(0, W.shape[1], chunk):
            blk = W[:, j : j + chunk]
            blk.copy_(blk.float() + dW[:, j : j + chunk].to(blk.device, torch.float32))


@dataclass
class EditReport:
    """Numbers from one unlearning run."""

    n_requests: int = 0
    layers: dict[int, dict[str, float]] = field(default_factory=dict)
    targets: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    peak_memory_bytes: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_requests": self.n_requests,
            "layers": {str(k): v for k, v in self.layers.items()},
            "targets": self.targets,
            "timings": self.timings,
            "peak_memory_bytes": self.peak_memory_bytes,
        }

    def __str__(self) -> str:
        lines = [f"zu_fast edit of {self.n_requests} requests"]
        if self.targets:
            lines.append("targets: " + ", ".join(f"{k} {v:.4g}" for k, v in self.targets.items()))
        if self.layers:
            keys = list(next(iter(self.layers.values())).keys())
            lines.append("| layer | " + " | ".join(keys) + " |")
            lines.append("|---" * (len(keys) + 1) + "|")
            for layer, row in self.layers.items():
                lines.append(f"| {layer} | " + " | ".join(f"{row[k]:.4g}" for k in keys) + " |")
        if self.timings:
            lines.append("time (s): " + ", ".join(f"{k} {v:.2f}" for k, v in self.timings.items()))
        if self.peak_memory_bytes:
            lines.append("peak memory: " + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in
                                                    self.peak_memory_bytes.items()))
        return "\n".join(lines)


class Edit:
    """Per-layer factors of an unlearning edit, optionally bound to the model they were applied to."""

    def __init__(self, config: UnlearnConfig, kind: str = "multiplicative") -> None:
        if kind not in ("multiplicative", "additive"):
            raise ZuFastError(f"unknown edit kind {kind!r}")
        self.config = config
        self.kind = kind
        self.factors: dict[int, torch.Tensor] = {}  # layer → D − I [d,d] or ΔW [d,d_in], fp32, CPU
        self.modules: dict[int, dict[str, Any]] = {}  # layer → {"name", "transposed"}
        self.base_fingerprints: dict[int, str] = {}
        self.edited_fingerprints: dict[int, str] = {}
        self.report = EditReport()
        self.model: torch.nn.Module | None = None
        self._backups: dict[int, torch.Tensor] = {}
        self._targets: dict[int, EditTarget] = {}

    # ------------------------------------------------------------------ building ---------
    def bind(self, model: torch.nn.Module, targets: list[EditTarget]) -> None:
        """Remember the model and back up every weight that may change (before any change)."""
        self.model = model
        for t in targets:
            self._targets[t.layer] = t
            self.modules[t.layer] = {"name": t.name, "transposed": t.transposed}
            w = t.module.weight.detach()
            dev = self.config.backup_device or w.device
            self._backups[t.layer] = w.to(dev, copy=True)
            self.base_fingerprints[t.layer] = tensor_fingerprint(w)

    def apply_factor(self, layer: int, factor: torch.Tensor) -> None:
        """Apply one layer's factor (D for multiplicative, ΔW for additive) in place and record it."""
        if self.kind == "multiplicative":
            eye = torch.eye(factor.shape[0], dtype=torch.float64, device=factor.device)
            stored = (factor.to(torch.float64) - eye).float()  # what save() writes
        else:
            stored = factor.float()
        self._apply_stored(layer, stored)

    def _apply_stored(self, layer: int, stored: torch.Tensor) -> None:
        # The live edit and Edit.load(...).apply(...) both go through here with the same fp32
        # tensor, so they produce the same weights bit for bit.
        t = self._targets[layer]
        if self.kind == "multiplicative":
            D = torch.eye(stored.shape[0], dtype=torch.float64, device=t.device) + stored.to(t.device).double()
            ops.multiplicative_update_(t.weight, D)
        else:
            apply_additive_(t.weight, stored)
        self.factors[layer] = stored.cpu()
        self.edited_fingerprints[layer] = tensor_fingerprint(t.module.weight.detach())

    # ------------------------------------------------------------------ public API -------
    def restore(self) -> None:
        """Put the original weights back, bit for bit."""
        if self.model is None:
            raise ZuFastError("this edit is not applied to a model (use Edit.load(dir).apply(model) first)")
        with torch.no_grad():
            for layer, backup in self._backups.items():
                self._targets[layer].module.weight.copy_(backup)

    @property
    def layers(self) -> list[int]:
        return sorted(self.factors)

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``factors.safetensors`` + ``edit.json`` into folder ``path`` (atomically)."""
        if not self.factors:
            raise ZuFastError("nothing to save: the edit has no factors")
        name = "D_minus_I" if self.kind == "multiplicative" else "delta_w"
        tensors = {f"{layer}.{name}": f.contiguous() for layer, f in self.factors.items()}
        meta = {
            "format_version": 1,
            "zu_fast_version": __version__,
            "kind": self.kind,
            "layers": self.layers,
            "modules": {str(k): v for k, v in self.modules.items()},
            "base_fingerprints": {str(k): v for k, v in self.base_fingerprints.items()},
            "edited_fingerprints": {str(k): v for k, v in self.edited_fingerprints.items()},
            "config": self.config.to_dict(),
            "report": self.report.to_dict(),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        return write_folder(path, "factors.safetensors", tensors, {"edit.json": meta})

    @classmethod
    def load(cls, path: str | os.PathLike) -> Edit:
        """Read an edit saved by ``save``; apply it with ``.apply(model)``."""
        path = Path(path)
        try:
            meta = json.loads((path / "edit.json").read_text())
        except FileNotFoundError:
            raise ZuFastError(f"{path} is not a saved zu_fast edit (no edit.json)") from None
        if meta.get("format_version") != 1:
            raise ZuFastError(f"{path}: unsupported edit format {meta.get('format_version')}")
        edit = cls(UnlearnConfig.from_dict(meta["config"]), meta["kind"])
        tensors = load_file(str(path / "factors.safetensors"))
        name = "D_minus_I" if edit.kind == "multiplicative" else "delta_w"
        for layer in meta["layers"]:
            edit.factors[int(layer)] = tensors[f"{layer}.{name}"]
        edit.modules = {int(k): v for k, v in meta["modules"].items()}
        edit.base_fingerprints = {int(k): v for k, v in meta["base_fingerprints"].items()}
        edit.edited_fingerprints = {int(k): v for k, v in meta["edited_fingerprints"].items()}
        rep = meta.get("report", {})
        edit.report = EditReport(rep.get("n_requests", 0), {int(k): v for k, v in rep.get("layers", {}).items()},
                                 rep.get("targets", {}), rep.get("timings", {}), rep.get("peak_memory_bytes", {}))
        return edit

    def apply(self, model: torch.nn.Module) -> Edit:
        """Apply the saved factors to ``model`` in place (refusing a model they were not made for).

        Returns self, now bound to ``model`` so that ``restore()`` undoes it.
        """
        if self.model is not None:
            raise ZuFastError("this edit is already applied to a model; restore() it first or load it again")
        targets = []
        for layer in self.layers:
            info = self.modules[layer]
            mod = get_module(model, info["name"])
            t = EditTarget(layer, info["name"], mod, bool(info["transposed"]))
            fp = tensor_fingerprint(mod.weight.detach())
            if fp == self.edited_fingerprints.get(layer):
                raise ZuFastError(f"layer {layer}: this edit is already applied to the model")
            if fp != self.base_fingerprints[layer]:
                raise ZuFastError(
                    f"layer {layer}: refusing to apply: {info['name']} of this model is not the weight the "
                    "edit was made for (fingerprint mismatch — another model or already edited)"
                )
            targets.append(t)
        factors = dict(self.factors)
        self.factors = {}
        self.bind(model, targets)
        try:
            for layer in sorted(factors):
                self._apply_stored(layer, factors[layer])
        except BaseException:
            self.restore()
            raise
        return self

    def __repr__(self) -> str:
        state = "applied" if self.model is not None else "detached"
        return f"Edit({self.kind}, layers={self.layers}, {state})"
