"""An edit bound to a model: apply (checked before and after), restore (bit-exact), remove, and the stack.

What is guaranteed (README, "Safety"):
- ``apply`` changes nothing until it has checked every layer: the module exists with the recorded shape and
  dtype, the factors are finite and match their checksums, and the weights are the ones the edit was made for
  (base fingerprint). After applying it checks the result (the recorded edited fingerprint, bit for bit, on the
  device type and backend the edit was made with; elsewhere, or with ``cast=True``, D·W₀ recomputed on sampled
  columns within the rounding of the weights' dtype); on any mismatch it puts the weights back bit for bit and
  raises ZuFastError.
- Edits applied to one model form a stack (``zu_fast.edits(model)``, oldest first, kept by
  ``zu_fast.provenance``). ``restore()`` of the top edit is bit-exact; of an edit below others it is refused,
  naming the edits above, unless ``restore(out_of_order=True)``: the edits above are taken off (bit-exact),
  this one is restored, and they are applied again to the weights without it (W = D_B D_A W₀ → D_B W₀), with
  a warning, since they were computed for a model that still had it.
- An edit that was restored can be applied again (``apply`` after ``restore``).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

from .. import ops
from ..config import UnlearnConfig
from ..errors import ZuFastError
from ..model import EditTarget, get_module, tensor_fingerprint
from ..model.locate import ExpertSlice, module_name
from ..provenance import edits, stack
from .file_format import load_edit, save_edit
from .record import EditRecord

_CAST_DTYPES = (torch.bfloat16, torch.float16)  # fingerprints of fp32 weights rounded to these are kept


def apply_additive_(W: torch.Tensor, dW: torch.Tensor, chunk: int = 4096) -> None:
    """W += ΔW with fp32 addition and one rounding, in column chunks (no full fp32 copy of W)."""
    with torch.no_grad():
        for j in range(0, W.shape[1], chunk):
            blk = W[:, j : j + chunk]
            blk.copy_(blk.float() + dW[:, j : j + chunk].to(blk.device, torch.float32))


def _resolve(model: torch.nn.Module, info: dict[str, Any]) -> Any:
    """The module (or fused-experts slice) an edit's layer entry names, on ``model``."""
    ex = info.get("expert")
    if ex:
        return ExpertSlice(get_module(model, ex["owner"]), ex["attr"], int(ex["index"]), info["name"])
    return get_module(model, info["name"])



def _dtype(name: str | None) -> torch.dtype | None:
    if not name:
        return None
    dt = getattr(torch, name.replace("torch.", ""), None)
    return dt if isinstance(dt, torch.dtype) else None


class Edit(EditRecord):
    """An edit that can be bound to a model: applied, verified, restored (bit-exact), stacked."""

    def __init__(self, config: UnlearnConfig, kind: str = "multiplicative") -> None:
        super().__init__(config, kind)
        self.model: torch.nn.Module | None = None
        # bound state while applied (zu_fast.provenance.StackEntry)
        self.backups: dict[int, torch.Tensor] = {}
        self.bound_targets: dict[int, EditTarget] = {}
        self.applied_fingerprints: dict[int, str] = {}  # fingerprints this application left (stack checks)

    # ------------------------------------------------------------------ building ---------
    def _attach(self, model: torch.nn.Module, targets: list[EditTarget]) -> None:
        """Back up every weight that may change (before any change) and go on top of the model's stack."""
        if self.model is not None:
            raise ZuFastError(f"{self.name} is already applied to a model; restore() it first or load it again")
        backups = {}
        for t in targets:
            w = t.module.weight.detach()
            backups[t.layer] = w.to(self.config.runtime.backup_device or w.device, copy=True)
        self.model = model
        self.bound_targets = {t.layer: t for t in targets}
        self.backups = backups
        self.applied_fingerprints = {}
        stack(model).append(self)

    def _detach(self) -> None:
        entries = stack(self.model) if self.model is not None else []
        if self in entries:
            entries.remove(self)
        self.model = None
        self.backups, self.bound_targets, self.applied_fingerprints = {}, {}, {}

    def bind(self, model: torch.nn.Module, targets: list[EditTarget]) -> None:
        """Remember the model, back up every weight that may change (before any change), record what the
        edit is made for (module, dtype, shape, fingerprints) and put it on top of the model's edit stack."""
        self._attach(model, targets)
        dev = targets[0].device if targets else torch.device("cpu")
        op = "multiplicative_update_" if self.kind == "multiplicative" else None
        self.made_with = {"device_type": dev.type,
                          "backend": ops.choose(op, dev.type, dev.index).name if op else "torch"}
        for t in targets:
            w = t.module.weight.detach()
            self.modules[t.layer] = {"name": t.name, "transposed": t.transposed, "dtype": str(w.dtype),
                                     "shape": list(t.weight.shape)}
            if isinstance(t.module, ExpertSlice):  # a slice of a fused experts parameter: how to find it again
                self.modules[t.layer]["expert"] = {"owner": module_name(model, t.module.owner),
                                                   "attr": t.module.attr, "index": t.module.index}
            self.base_fingerprints[t.layer] = tensor_fingerprint(w)
            # until a factor is applied (or none is)
            self.applied_fingerprints[t.layer] = self.base_fingerprints[t.layer]
            if w.dtype in (torch.float32, torch.float64):  # so that cast=True can check a bf16/fp16 copy
                self.cast_fingerprints[t.layer] = {str(dt): tensor_fingerprint(w.to(dt)) for dt in _CAST_DTYPES}

    def apply_factor(self, layer: int, factor: torch.Tensor) -> None:
        """Apply one layer's factor (D for multiplicative, ΔW for additive) in place and record it."""
        if self.kind == "multiplicative":
            eye = torch.eye(factor.shape[0], dtype=torch.float64, device=factor.device)
            stored = (factor.to(torch.float64) - eye).float()  # what save() writes
        else:
            stored = factor.float()
        self._apply_stored(layer, stored)
        fp = tensor_fingerprint(self.bound_targets[layer].module.weight.detach())
        self.edited_fingerprints[layer] = self.applied_fingerprints[layer] = fp

    def _apply_stored(self, layer: int, stored: torch.Tensor) -> None:
        # The live edit and Edit.load(...).apply(...) both go through here with the same fp32
        # tensor, so they produce the same weights bit for bit.
        t = self.bound_targets[layer]
        self._update_weight(t, stored)
        self.factors[layer] = stored.cpu()

    def _update_weight(self, t: EditTarget, stored: torch.Tensor) -> None:
        """The one place that changes a weight by a stored factor (D − I or ΔW, fp32)."""
        if self.kind == "multiplicative":
            # W ← W + E W with E = D − I as stored: on tensor cores the truncation error then scales with
            # the edit, not with W (ops/multiplicative_update.py)
            ops.multiplicative_update_(t.weight, stored.to(t.device), form="delta")
        else:
            apply_additive_(t.weight, stored)

    # ------------------------------------------------------------------ restore ----------
    def restore(self, *, out_of_order: bool = False) -> None:
        """Put the weights back as they were before this edit, bit for bit, and take it off the stack.

        Only the top edit of the model's stack can be restored; for one below others this raises
        ZuFastError naming them, unless ``out_of_order=True``: the edits above are taken off, this one is
        restored, and the edits above are applied again to the weights without it (a warning says so:
        they were computed for a model that still had this edit). Afterwards ``apply`` works again.
        """
        if self.model is None:
            raise ZuFastError(f"{self.name} is not applied to a model (use Edit.load(dir).apply(model) first)")
        entries = stack(self.model)
        above = entries[entries.index(self) + 1:] if self in entries else []
        if not above:
            with torch.no_grad():
                for layer, backup in self.backups.items():
                    self.bound_targets[layer].module.weight.copy_(backup)
            self._detach()
            return
        if not out_of_order:
            names = "; ".join(e.name for e in reversed(above))
            raise ZuFastError(
                f"cannot restore {self.name}: {len(above)} edit(s) were applied after it and are still on the model "
                f"(newest first: {names}); restore those first, or call restore(out_of_order=True) to take it out "
                "and apply them again without it"
            )
        self._restore_out_of_order(above)

    def _restore_out_of_order(self, above: list[Edit]) -> None:
        model = self.model
        touched = {id(t.module): t.module for e in [self, *above] for t in e.bound_targets.values()}
        snapshot = {k: m.weight.detach().clone() for k, m in touched.items()}  # rollback if anything fails
        stack_before = list(stack(model))
        states = {id(e): (e, e.model, dict(e.backups), dict(e.bound_targets), dict(e.applied_fingerprints),
                          dict(e.verification)) for e in [self, *above]}
        keep = [(e, dict(e.bound_targets)) for e in above]
        try:
            for e in reversed(above):
                e.restore()  # bit-exact: newest first
            self.restore()
            for e, targets in keep:  # apply again, on the weights without this edit
                e._attach(model, [targets[layer] for layer in sorted(targets)])
                for layer in sorted(targets):
                    e._update_weight(targets[layer], e.factors[layer])
                    e.applied_fingerprints[layer] = tensor_fingerprint(targets[layer].module.weight.detach())
                e.verification = {layer: "re-applied out of order (not checked against a recorded fingerprint)"
                                  for layer in targets}
        except BaseException:
            with torch.no_grad():
                for k, m in touched.items():
                    m.weight.copy_(snapshot[k])
            stack(model)[:] = stack_before
            for e, m, backups, targets, applied, verification in states.values():
                e.model, e.backups, e.bound_targets, e.applied_fingerprints, e.verification = \
                    m, backups, targets, applied, verification
            raise
        names = ", ".join(e.name for e, _ in keep)
        warnings.warn(f"zu_fast: restored {self.name} out of order: {names} were applied again to the weights without "
                      "it (W = D_B D_A W₀ → D_B W₀); they were computed for a model that still had it", stacklevel=3)

    # ------------------------------------------------------------------ save / load ------
    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write ``factors.safetensors`` + ``edit.json`` into folder ``path`` (``zu_fast.edit.file_format``).

        A new or empty folder is written whole (temporary folder, then rename); a non-empty folder is refused
        unless ``overwrite=True``, which replaces only these two files and keeps everything else.
        """
        return save_edit(self, path, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Edit:
        """Read an edit saved by ``save``; apply it with ``.apply(model)``.

        A missing, truncated or corrupted file, or factors that do not match their recorded checksums, raise
        ZuFastError naming the file and what is wrong.
        """
        return load_edit(path, cls)

    # ------------------------------------------------------------------ apply ------------
    def _check_factors(self) -> None:
        where = f" in {self.source}" if self.source else ""
        for layer, f in self.factors.items():
            if not bool(torch.isfinite(f).all()):
                n = int((~torch.isfinite(f)).sum())
                raise ZuFastError(f"refusing to apply {self.name}: layer {layer}'s factor{where} has {n} NaN/Inf "
                                  "entries; nothing was changed")

    def _check_target(self, model: torch.nn.Module, layer: int, cast: bool) -> tuple[EditTarget, str]:
        """The target of ``layer`` on ``model`` if this edit may be applied to it, and how the base was
        recognised ("exact" or "cast from <dtype>"); ZuFastError naming the layer otherwise."""
        info = self.modules[layer]
        mod = _resolve(model, info)
        if not hasattr(mod, "weight") or not isinstance(mod.weight, torch.Tensor):
            raise ZuFastError(f"layer {layer}: {info['name']} has no weight")
        t = EditTarget(layer, info["name"], mod, bool(info.get("transposed", False)))
        if t.offloaded:
            raise ZuFastError(f"layer {layer}: {info['name']} is offloaded (meta device); zu_fast edits resident "
                              "weights only")
        f = self.factors[layer]
        want = (t.d, t.d) if self.kind == "multiplicative" else (t.d, t.d_in)
        if tuple(f.shape) != want:
            raise ZuFastError(f"layer {layer}: refusing to apply: the factor is {tuple(f.shape)}, {info['name']} "
                              f"needs {want} (another architecture)")
        w = mod.weight.detach()
        fp = tensor_fingerprint(w)
        if fp == self.edited_fingerprints.get(layer):
            raise ZuFastError(f"layer {layer}: this edit is already applied to the model")
        made = _dtype(info.get("dtype"))
        if made is not None and made != w.dtype:
            if not cast:
                raise ZuFastError(
                    f"layer {layer}: refusing to apply: the edit was made for {str(made).replace('torch.', '')} "
                    f"weights, {info['name']} is {str(w.dtype).replace('torch.', '')}; pass cast=True "
                    "(command line: --cast) to apply it to a cast copy of the same weights")
            recorded = self.cast_fingerprints.get(layer, {}).get(str(w.dtype))
            if recorded is not None:
                ok = fp == recorded
            elif torch.finfo(w.dtype).bits > torch.finfo(made).bits:  # a wider copy: round it back and compare
                ok = tensor_fingerprint(w.to(made)) == self.base_fingerprints[layer]
            else:
                raise ZuFastError(f"layer {layer}: the edit has no fingerprint of its weights in "
                                  f"{w.dtype}, so it cannot check that {info['name']} is a cast copy of them")
            if not ok:
                raise ZuFastError(
                    f"layer {layer}: refusing to apply: {info['name']} is not a {w.dtype} copy of the weights the "
                    "edit was made for (fingerprint mismatch — another model or already edited)")
            return t, f"cast from {str(made).replace('torch.', '')}"
        if fp != self.base_fingerprints[layer]:
            raise ZuFastError(
                f"layer {layer}: refusing to apply: {info['name']} of this model is not the weight the "
                "edit was made for (fingerprint mismatch — another model or already edited)"
            )
        return t, "exact"

    def _close_to_expected(self, t: EditTarget, layer: int, n_cols: int = 64) -> tuple[bool, float]:
        """Recompute the edit on sampled columns from the backup (float64) and compare with the weights:
        (within the rounding of the weights' dtype plus fp32 accumulation, worst error / bound)."""
        W = t.weight  # [d, d_in] view of the module's weight
        W0 = self.backups[layer]
        W0 = W0.t() if t.transposed else W0  # [d, d_in]
        d, d_in = W.shape
        cols = torch.linspace(0, d_in - 1, min(n_cols, d_in)).long()
        w0 = W0[:, cols.to(W0.device)].to("cpu", torch.float64)  # [d, c]
        got = W[:, cols.to(W.device)].to("cpu", torch.float64)  # [d, c]
        f = self.factors[layer].double()
        eps_w = torch.finfo(W.dtype).eps
        if self.kind == "multiplicative":
            D = torch.eye(d, dtype=torch.float64) + f  # [d, d]
            want = D @ w0
            scale = D.abs() @ w0.abs()
            bound = eps_w * want.abs() + 4 * d * 2.0**-24 * scale + 1e-30
        else:
            df = f[:, cols]
            want = w0 + df
            bound = eps_w * want.abs() + 2.0**-22 * (w0.abs() + df.abs()) + 1e-30
        ratio = float(((got - want).abs() / bound).max())
        return ratio <= 1.0, ratio

    def apply(self, model: torch.nn.Module, *, cast: bool = False) -> Edit:
        """Apply the saved factors to ``model`` in place, checked before and after (module docstring).

        ``cast=True``: allow weights of another dtype than the edit was made for (a bf16 copy of the fp32
        weights); they must be that copy (checked by fingerprint) and the result is checked within the
        rounding of their dtype. Returns self, now on top of the model's edit stack (``restore()`` undoes it).
        """
        if self.model is not None:
            raise ZuFastError(f"{self.name} is already applied to a model; restore() it first or load it again")
        if not self.factors:
            raise ZuFastError("this edit has no factors to apply")
        self._check_factors()
        checked = [self._check_target(model, layer, cast) for layer in self.layers]  # nothing changed yet
        targets = [t for t, _ in checked]
        how = {t.layer: h for t, h in checked}
        dev = targets[0].device
        op = "multiplicative_update_" if self.kind == "multiplicative" else None
        here = {"device_type": dev.type, "backend": ops.choose(op, dev.type, dev.index).name if op else "torch"}
        # bit-exact is promised on the device type and backend the edit was made with (fingerprints are
        # taken where the weights live, and another backend may round the product differently)
        exact_scope = bool(self.made_with) and self.made_with == here
        self._attach(model, targets)
        try:
            verification = {}
            for t in targets:
                self._update_weight(t, self.factors[t.layer])
                fp = tensor_fingerprint(t.module.weight.detach())
                self.applied_fingerprints[t.layer] = fp
                if how[t.layer] == "exact" and fp == self.edited_fingerprints[t.layer]:
                    verification[t.layer] = "exact (edited fingerprint)"
                    continue
                if how[t.layer] == "exact" and exact_scope:
                    raise ZuFastError(
                        f"layer {t.layer}: after applying, {t.name} does not have the edited fingerprint recorded in "
                        f"the edit{f' ({self.source})' if self.source else ''} although the device type and backend "
                        f"are the same ({here['device_type']}, {here['backend']}); the weights were put back")
                ok, ratio = self._close_to_expected(t, t.layer)
                if not ok:
                    raise ZuFastError(
                        f"layer {t.layer}: after applying, {t.name} differs from D·W₀ recomputed on sampled columns "
                        f"by {ratio:.3g}× the rounding bound of {t.module.weight.dtype}; the weights were put back")
                why = how[t.layer] if how[t.layer] != "exact" else \
                    f"made on {self.made_with or 'an unrecorded device'}, applied on {here}"
                verification[t.layer] = f"within rounding ({why}; worst {ratio:.2f} of the bound)"
            self.verification = verification
        except BaseException:
            self.restore()
            raise
        return self

    def remove(self, model: torch.nn.Module) -> dict[int, bool]:
        """Undo this edit on a model that carries it but is not bound to it (e.g. an edited model saved to
        disk and loaded again), by applying the inverse factor: W ← D⁻¹ W (multiplicative) or W ← W − ΔW
        (additive), one rounding. Refused (nothing changed) unless every layer has the edited fingerprint.

        The inverse cannot undo the rounding of the edit, so the result is the original weights up to
        rounding; returns, per layer, whether it matches the base fingerprint bit for bit. (In the
        session that made the edit, ``restore()`` is bit-exact.)
        """
        if self.model is not None or any(e.id == self.id for e in edits(model)):
            raise ZuFastError(f"{self.name} is applied to this model in this session: use restore() (bit-exact)")
        self._check_factors()
        targets = []
        for layer in self.layers:
            info = self.modules[layer]
            mod = _resolve(model, info)
            if tensor_fingerprint(mod.weight.detach()) != self.edited_fingerprints[layer]:
                raise ZuFastError(f"layer {layer}: {info['name']} does not carry {self.name} (its weights are not the "
                                  "edited ones: another model, another edit on top, or already restored)")
            targets.append(EditTarget(layer, info["name"], mod, bool(info.get("transposed", False))))
        inverses = {}
        for t in targets:
            f = self.factors[t.layer].double()
            if self.kind == "multiplicative":
                D = torch.eye(f.shape[0], dtype=torch.float64) + f
                try:
                    inv = torch.linalg.inv(D)
                except RuntimeError as e:
                    raise ZuFastError(f"layer {t.layer}: the edit's D is not invertible ({e})") from None
                if not bool(torch.isfinite(inv).all()):
                    raise ZuFastError(f"layer {t.layer}: the edit's D is not invertible")
                inverses[t.layer] = (inv - torch.eye(f.shape[0], dtype=torch.float64)).float()
            else:
                inverses[t.layer] = (-f).float()
        saved = {t.layer: t.module.weight.detach().clone() for t in targets}
        try:
            for t in targets:
                self._update_weight(t, inverses[t.layer])
        except BaseException:
            with torch.no_grad():
                for t in targets:
                    t.module.weight.copy_(saved[t.layer])
            raise
        return {t.layer: tensor_fingerprint(t.module.weight.detach()) == self.base_fingerprints[t.layer]
                for t in targets}

    def summary(self) -> dict[str, Any]:
        """What a saved model records about an edit applied to it (``zu_fast_edits.json``)."""
        return {"id": self.id, "kind": self.kind, "layers": self.layers, "source": self.source,
                "modules": {str(k): v.get("name") for k, v in self.modules.items()},
                "base_fingerprints": {str(k): v for k, v in self.base_fingerprints.items()},
                "edited_fingerprints": {str(k): self.applied_fingerprints.get(k, v)
                                        for k, v in self.edited_fingerprints.items()}}

    def __repr__(self) -> str:
        state = "applied" if self.model is not None else "detached"
        return f"Edit({self.kind}, id={self.id}, layers={self.layers}, {state})"


__all__ = ["Edit", "apply_additive_"]
