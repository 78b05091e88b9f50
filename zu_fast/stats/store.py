"""On-disk statistics cache: safetensors + JSON metadata, fingerprints, safe writes.

A cache entry is a folder with ``stats.safetensors`` (per layer: kk, ks [, vk, vs]) and
``meta.json`` (format version, model/corpus/settings fingerprints, token counts, a description
of the model — dtype, class, name — used only to say what differs, and the size and SHA-256 of
``stats.safetensors`` as written). Loading checks the fingerprints: a stale or foreign cache is
refused with StaleStatsError saying what differs, never used; a corrupted or truncated one (size or
SHA-256 not as recorded, unreadable JSON) raises ZuFastError naming the file. Writing never deletes a
folder zu_fast did not write (``zu_fast.atomic``). What ``collect_stats`` does with a bad entry
(moved aside and recomputed in the default cache, refused for a folder the user named) is described
in ``zu_fast.stats.collect``.

Statistics passed to ``unlearn(stats=...)`` by hand are checked by :func:`check_stats_for_model`:
- with ``meta["model_fingerprint"]`` (everything ``collect_stats`` returns or loads): they must
  match the model's weights up to their deepest layer — or, for a model edited by zu_fast in this
  session (sequential unlearning), the weights the edit stack started from (see
  ``zu_fast.provenance.stack_base_fingerprint``);
- without it (LayerStats built by hand, ``zu_fast.stats.npz`` / ``compat`` imports): accepted as
  given — the caller vouches for them; ``model_fingerprint`` is what makes statistics checkable.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from ..atomic import FILES_KEY, WRITE_ID, read_json, read_tensors, write_folder
from ..errors import StaleStatsError, ZuFastError
from ..model import edit_targets
from ..provenance import stack_base_fingerprint, stats_model_fingerprint
from .moments import LayerStats

FORMAT_VERSION = 1
FILES = ("stats.safetensors", "meta.json")


def cache_root() -> Path:
    """ZU_FAST_CACHE, else $XDG_CACHE_HOME/zu_fast, else ~/.cache/zu_fast."""
    if os.environ.get("ZU_FAST_CACHE"):
        return Path(os.environ["ZU_FAST_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "zu_fast"


def stats_key(meta: dict[str, Any]) -> str:
    fields = {k: meta[k] for k in ("model_fingerprint", "corpus_fingerprint", "settings")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]


def model_info(model: torch.nn.Module, targets: list | None = None) -> dict[str, Any]:
    """What a person recognises a model by (not part of any cache key): the edited weights' dtype,
    the class and the name or path it was loaded from. Used to say what differs on a refusal."""
    dtype = None
    if targets:
        dtype = str(targets[0].module.weight.dtype)
    else:
        p = next(iter(model.parameters()), None)
        dtype = str(p.dtype) if p is not None else None
    mcfg = getattr(model, "config", None)
    return {"dtype": dtype, "class": type(model).__name__,
            "name_or_path": getattr(mcfg, "_name_or_path", None) or None}


def save_stats(path: str | Path, layers: dict[int, LayerStats], meta: dict[str, Any], *,
               overwrite: bool = False, new_only: bool = False) -> Path:
    """Write a cache entry safely (``zu_fast.atomic.write_folder``: a new folder appears whole; a
    non-empty folder is refused unless ``overwrite``, which replaces only the two statistics files;
    ``new_only``: an entry published meanwhile by another process raises ``FolderAppearedError``)."""
    tensors = {}
    for layer, st in layers.items():
        tensors[f"{layer}.kk"], tensors[f"{layer}.ks"] = st.kk, st.ks
        if st.vk is not None:
            tensors[f"{layer}.vk"], tensors[f"{layer}.vs"] = st.vk, st.vs
    full_meta = {
        **meta,
        "format_version": FORMAT_VERSION,
        "layers": {str(layer): {"n": st.n, **st.info} for layer, st in layers.items()},
    }
    return write_folder(path, "stats.safetensors", tensors, {"meta.json": full_meta}, overwrite=overwrite,
                        what="statistics", new_only=new_only)


def read_meta(path: str | Path) -> dict[str, Any]:
    """``meta.json`` of a statistics folder (ZuFastError naming the file if missing or corrupted)."""
    return read_json(Path(path) / "meta.json", "zu_fast statistics")


def _settings_diff(got: dict[str, Any], want: dict[str, Any]) -> str:
    keys = sorted(set(got) | set(want))
    return "; ".join(f"{k} {got.get(k)!r} (expected {want.get(k)!r})" for k in keys if got.get(k) != want.get(k))


def describe_model_mismatch(meta: dict[str, Any], current: dict[str, Any] | None) -> str:
    """Why the model fingerprint of statistics ``meta`` differs, as far as the descriptions tell."""
    was = meta.get("model_info") or {}
    now = current or {}
    if was.get("dtype") and now.get("dtype") and was["dtype"] != now["dtype"]:
        return (f"a different dtype: they were collected on {was['dtype'].replace('torch.', '')} weights, this "
                f"model's are {now['dtype'].replace('torch.', '')} (collect them for this dtype, or load the model "
                f"as {was['dtype'].replace('torch.', '')})")
    if was.get("class") and now.get("class") and was["class"] != now["class"]:
        return f"a different model: {was['class']} (they were collected on), this is {now['class']}"
    if was.get("name_or_path") and now.get("name_or_path") and was["name_or_path"] != now["name_or_path"]:
        return (f"a different model: {was['name_or_path']!r} (they were collected on), this is "
                f"{now['name_or_path']!r}")
    return ("a different model or different weights (same dtype and architecture: another checkpoint, a "
            "fine-tune, or edits not made by zu_fast in this session)")


def load_stats(
    path: str | Path, expect: dict[str, Any] | None = None, device=None
) -> tuple[dict[int, LayerStats], dict]:
    """Read a cache entry; with ``expect`` (fingerprints), refuse one that does not match.

    A missing, truncated or corrupted file raises ZuFastError naming it; a mismatch raises
    StaleStatsError saying what differs (settings, corpus, dtype, model).
    """
    path = Path(path)
    meta = read_meta(path)
    if meta.get("format_version") != FORMAT_VERSION:
        raise StaleStatsError(f"{path}: statistics format {meta.get('format_version')} != {FORMAT_VERSION}")
    if expect is not None:
        fix = "Pass another folder, or recompute into it (command line: --overwrite)."
        if "settings" in expect and meta.get("settings") != expect["settings"]:
            raise StaleStatsError(
                f"statistics in {path} were computed with different settings: "
                f"{_settings_diff(meta.get('settings') or {}, expect['settings'])}. {fix}")
        if "corpus_fingerprint" in expect and meta.get("corpus_fingerprint") != expect["corpus_fingerprint"]:
            raise StaleStatsError(f"statistics in {path} were computed on a different corpus (its texts differ). {fix}")
        if "model_fingerprint" in expect and meta.get("model_fingerprint") != expect["model_fingerprint"]:
            raise StaleStatsError(
                f"statistics in {path} were computed for "
                f"{describe_model_mismatch(meta, expect.get('model_info'))}: model_fingerprint is "
                f"{meta.get('model_fingerprint')!r}, expected {expect['model_fingerprint']!r}. {fix}")
    layer_meta = meta.get("layers")
    if not isinstance(layer_meta, dict) or not layer_meta:
        raise ZuFastError(f"{path / 'meta.json'}: corrupted, no 'layers' entry")
    recorded = (meta.get(FILES_KEY) or {}).get("stats.safetensors") if isinstance(meta.get(FILES_KEY), dict) else None
    tensors = read_tensors(path / "stats.safetensors", meta.get(WRITE_ID),
                           device=str(device) if device is not None else "cpu",
                           recorded=recorded if isinstance(recorded, dict) else None, verify_sha256=True)
    layers = {}
    for layer_s, info in layer_meta.items():
        try:
            layer = int(layer_s)
            info = dict(info)
            n = int(info.pop("n"))
        except (TypeError, ValueError, KeyError):
            raise ZuFastError(f"{path / 'meta.json'}: corrupted entry for layer {layer_s!r}") from None
        missing = [k for k in ("kk", "ks") if f"{layer}.{k}" not in tensors]
        if missing:
            raise ZuFastError(f"{path / 'stats.safetensors'}: layer {layer} has no {missing} (the file is incomplete "
                              "or from another write)")
        kk, ks = tensors[f"{layer}.kk"], tensors[f"{layer}.ks"]
        if kk.dim() != 2 or kk.shape[0] != kk.shape[1] or ks.shape != (kk.shape[0],):
            raise ZuFastError(f"{path / 'stats.safetensors'}: layer {layer} has kk {tuple(kk.shape)} and ks "
                              f"{tuple(ks.shape)}; expected [d, d] and [d]")
        layers[layer] = LayerStats(layer, kk, ks, n, tensors.get(f"{layer}.vk"), tensors.get(f"{layer}.vs"), info)
    return layers, meta


def check_stats_for_model(model: torch.nn.Module, cfg, stats) -> str:
    """Refuse statistics that were not computed on this model (StaleStatsError saying what differs).

    ``stats``: a CorpusStats. Returns how they were checked: ``"unchecked"`` (no
    ``meta["model_fingerprint"]``: built by hand or imported, accepted as given), ``"model"`` (they match
    the current weights) or ``"base of the edit stack"`` (the model carries zu_fast edits and the
    statistics match the weights those edits started from: sequential unlearning re-uses them).
    Also checks that they cover every layer of ``cfg.layers`` and the same module. Cheap next to the
    work it guards (one fingerprint of the layers up to the deepest edited one).
    """
    meta = stats.meta or {}
    where = f"statistics in {stats.path}" if getattr(stats, "path", None) else "the statistics passed in"
    missing = [layer for layer in cfg.layers if layer not in stats.layers]
    if missing:
        raise ZuFastError(f"{where} have no layers {missing} (they cover {sorted(stats.layers)}); collect them with "
                          f"config.layers = {list(cfg.layers)}")
    settings = meta.get("settings") or {}
    module = settings.get("rewrite_module_tmp")
    if module is not None and module != cfg.locate.rewrite_module:
        raise StaleStatsError(f"{where} are of module {module!r}; the config edits {cfg.locate.rewrite_module!r}")
    fp = meta.get("model_fingerprint")
    if fp is None:
        return "unchecked"
    layers = [int(x) for x in settings.get("layers") or sorted(stats.layers)]
    scfg = cfg.replace(layers=sorted(layers))
    if stats_model_fingerprint(model, scfg.layers, scfg.locate) == fp:
        return "model"
    if stack_base_fingerprint(model, scfg.layers, scfg.locate) == fp:
        return "base of the edit stack"
    try:
        targets = edit_targets(model, scfg.layers, scfg.locate, allow_offloaded=True)
    except ZuFastError:
        targets = None
    raise StaleStatsError(
        f"{where} were computed for {describe_model_mismatch(meta, model_info(model, targets))}; they cannot be "
        "used for this model (collect them on it; after zu_fast edits in this session the statistics of the "
        "unedited model are accepted)"
    )
