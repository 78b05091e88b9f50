"""The file format of a saved edit: ``factors.safetensors`` + ``edit.json`` in one folder. No pickle.

``edit.json`` holds the config, module names, dtype and shape of each edited weight, fingerprints of each
edited weight before and after, a SHA-256 of each factor, the size and SHA-256 of ``factors.safetensors``
as written (``zu_fast_files``) and the report. Writes go through ``zu_fast.atomic.write_folder`` (a new
folder appears whole, fsynced before the rename; a non-empty one is refused unless ``overwrite``, which
replaces only these two files; a full disk is a ZuFastError naming the folder and the bytes needed, with
nothing partial left). Reads check everything and raise ZuFastError naming the file and what is wrong: a
file of another size than recorded (cut short by a crash or a full disk) before it is parsed, then the
write id, then each factor's SHA-256 (which covers every byte of the factors; the file's own digest is not
read again).
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any, TypeVar

import torch

from .._version import __version__
from ..atomic import FILES_KEY, WRITE_ID, read_json, read_tensors, write_folder
from ..config import UnlearnConfig
from ..errors import ZuFastError
from .record import EditRecord, EditReport

FORMAT_VERSION = 2  # 2 adds id, dtype/shape per module, factor checksums, cast fingerprints, made_with
FILES = ("factors.safetensors", "edit.json")
R = TypeVar("R", bound=EditRecord)


def sha256(t: torch.Tensor) -> str:
    arr = t.detach().cpu().contiguous().numpy()
    return hashlib.sha256(memoryview(arr).cast("B")).hexdigest()


def save_edit(edit: EditRecord, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``factors.safetensors`` + ``edit.json`` into folder ``path``.

    A new or empty folder is written whole (temporary folder, then rename); a non-empty folder is
    refused unless ``overwrite=True``, which replaces only these two files and keeps everything else.
    """
    if not edit.factors:
        raise ZuFastError("nothing to save: the edit has no factors")
    bad = [layer for layer, f in edit.factors.items() if not bool(torch.isfinite(f).all())]
    if bad:
        raise ZuFastError(f"refusing to save {edit.name}: the factors of layers {bad} contain NaN/Inf")
    name = edit.factor_name
    tensors = {f"{layer}.{name}": f.contiguous() for layer, f in edit.factors.items()}
    meta = {
        "format_version": FORMAT_VERSION,
        "zu_fast_version": __version__,
        "id": edit.id,
        "kind": edit.kind,
        "layers": edit.layers,
        "modules": {str(k): v for k, v in edit.modules.items()},
        "base_fingerprints": {str(k): v for k, v in edit.base_fingerprints.items()},
        "edited_fingerprints": {str(k): v for k, v in edit.edited_fingerprints.items()},
        "cast_fingerprints": {str(k): v for k, v in edit.cast_fingerprints.items()},
        "factor_sha256": {str(k): sha256(f) for k, f in edit.factors.items()},
        "made_with": edit.made_with,
        "config": edit.config.to_dict(),
        "report": edit.report.to_dict(),
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return write_folder(path, "factors.safetensors", tensors, {"edit.json": meta}, overwrite=overwrite,
                        what="edit")



def load_edit(path: str | os.PathLike, cls: type[R]) -> R:
    """Read an edit saved by :func:`save_edit` as an instance of ``cls`` (an :class:`EditRecord`).

    A missing, truncated or corrupted file, or factors that do not match their recorded checksums,
    raise ZuFastError naming the file and what is wrong.
    """
    path = Path(path)
    jpath = path / "edit.json"
    meta = read_json(jpath, "saved zu_fast edit")
    version = meta.get("format_version")
    if version not in (1, 2):
        raise ZuFastError(f"{jpath}: unsupported edit format {version!r} (this zu_fast reads 1 and 2)")

    def need(key: str, kind: type) -> Any:
        if key not in meta:
            raise ZuFastError(f"{jpath}: corrupted, no {key!r} entry")
        if not isinstance(meta[key], kind):
            raise ZuFastError(f"{jpath}: corrupted, {key!r} is a {type(meta[key]).__name__}")
        return meta[key]

    kind = need("kind", str)
    try:
        layers = [int(x) for x in need("layers", list)]
        modules = {int(k): dict(v) for k, v in need("modules", dict).items()}
        base = {int(k): str(v) for k, v in need("base_fingerprints", dict).items()}
        edited = {int(k): str(v) for k, v in need("edited_fingerprints", dict).items()}
        casts = {int(k): dict(v) for k, v in (meta.get("cast_fingerprints") or {}).items()}
        sums = {int(k): str(v) for k, v in (meta.get("factor_sha256") or {}).items()}
    except (TypeError, ValueError) as e:
        raise ZuFastError(f"{jpath}: corrupted layer entries ({e})") from None
    for layer in layers:
        for what, table in (("modules", modules), ("base_fingerprints", base),
                            ("edited_fingerprints", edited)):
            if layer not in table:
                raise ZuFastError(f"{jpath}: corrupted, {what!r} has no entry for layer {layer}")
        if "name" not in modules[layer]:
            raise ZuFastError(f"{jpath}: corrupted, module of layer {layer} has no name")
    try:
        config = UnlearnConfig.from_dict(need("config", dict))
    except ZuFastError as e:
        raise ZuFastError(f"{jpath}: its config is not valid here ({e})") from None
    edit = cls(config, kind)
    files = meta.get(FILES_KEY) if isinstance(meta.get(FILES_KEY), dict) else {}
    recorded = files.get("factors.safetensors")
    tensors = read_tensors(path / "factors.safetensors", meta.get(WRITE_ID),
                           recorded=recorded if isinstance(recorded, dict) else None)
    name = edit.factor_name
    fpath = path / "factors.safetensors"
    for layer in layers:
        f = tensors.get(f"{layer}.{name}")
        if f is None:
            raise ZuFastError(f"{fpath}: no factor {layer}.{name} for layer {layer} (incomplete or another file)")
        shape = modules[layer].get("shape")
        want = ([shape[0], shape[0]] if kind == "multiplicative" else list(shape)) if shape else None
        if f.dim() != 2 or (want is not None and list(f.shape) != want) or \
                (kind == "multiplicative" and f.shape[0] != f.shape[1]):
            raise ZuFastError(f"{fpath}: layer {layer}'s factor has shape {tuple(f.shape)}, expected "
                              f"{tuple(want) if want else '[d, d]'}")
        if layer in sums and sha256(f) != sums[layer]:
            raise ZuFastError(f"{fpath}: layer {layer}'s factor does not match its SHA-256 in edit.json "
                              "(the file is corrupted or was changed)")
        edit.factors[layer] = f
    edit.id = str(meta.get("id") or edit.id)
    edit.modules, edit.base_fingerprints, edit.edited_fingerprints = modules, base, edited
    edit.cast_fingerprints, edit.factor_sha256 = casts, sums
    edit.made_with = dict(meta.get("made_with") or {})
    edit.source = str(path)
    rep = meta.get("report") or {}
    try:
        edit.report = EditReport(rep.get("n_requests", 0), {int(k): v for k, v in rep.get("layers", {}).items()},
                                 rep.get("targets", {}), rep.get("timings", {}), rep.get("peak_memory_bytes", {}),
                                 rep.get("flags", []))
    except (AttributeError, TypeError, ValueError):
        raise ZuFastError(f"{jpath}: corrupted 'report' entry") from None
    return edit



__all__ = ["FILES", "FORMAT_VERSION", "load_edit", "save_edit", "sha256"]
