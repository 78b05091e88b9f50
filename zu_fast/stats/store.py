"""On-disk statistics cache: safetensors + JSON metadata, fingerprints, atomic writes.

A cache entry is a folder with ``stats.safetensors`` (per layer: kk, ks [, vk, vs]) and
``meta.json`` (format version, model/corpus/settings fingerprints, token counts). Loading checks
the fingerprints: a stale or foreign cache is refused with StaleStatsError, never used.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from ..atomic import write_folder
from ..errors import StaleStatsError, ZuFastError
from .moments import LayerStats

FORMAT_VERSION = 1


def cache_root() -> Path:
    """ZU_FAST_CACHE, else $XDG_CACHE_HOME/zu_fast, else ~/.cache/zu_fast."""
    if os.environ.get("ZU_FAST_CACHE"):
        return Path(os.environ["ZU_FAST_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "zu_fast"


def stats_key(meta: dict[str, Any]) -> str:
    fields = {k: meta[k] for k in ("model_fingerprint", "corpus_fingerprint", "settings")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]


def save_stats(path: str | Path, layers: dict[int, LayerStats], meta: dict[str, Any]) -> Path:
    """Write a cache entry atomically (a temp folder renamed into place)."""
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
    return write_folder(path, "stats.safetensors", tensors, {"meta.json": full_meta})


def read_meta(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        return json.loads((path / "meta.json").read_text())
    except FileNotFoundError:
        raise ZuFastError(f"{path} is not a zu_fast statistics folder (no meta.json)") from None


def load_stats(
    path: str | Path, expect: dict[str, Any] | None = None, device=None
) -> tuple[dict[int, LayerStats], dict]:
    """Read a cache entry; with ``expect`` (fingerprints), refuse one that does not match."""
    path = Path(path)
    meta = read_meta(path)
    if meta.get("format_version") != FORMAT_VERSION:
        raise StaleStatsError(f"{path}: statistics format {meta.get('format_version')} != {FORMAT_VERSION}")
    if expect is not None:
        for k in ("model_fingerprint", "corpus_fingerprint", "settings"):
            if k in expect and meta.get(k) != expect[k]:
                what = {"model_fingerprint": "a different model (or different weights)",
                        "corpus_fingerprint": "a different corpus",
                        "settings": "different settings"}[k]
                raise StaleStatsError(
                    f"statistics in {path} were computed for {what}: {k} is {meta.get(k)!r}, "
                    f"expected {expect[k]!r}. Delete the folder or pass another path to recompute."
                )
    tensors = load_file(str(path / "stats.safetensors"), device=str(device) if device is not None else "cpu")
    layers = {}
    for layer_s, info in meta["layers"].items():
        layer = int(layer_s)
        info = dict(info)
        n = int(info.pop("n"))
        layers[layer] = LayerStats(
            layer, tensors[f"{layer}.kk"], tensors[f"{layer}.ks"], n,
            tensors.get(f"{layer}.vk"), tensors.get(f"{layer}.vs"), info,
        )
    return layers, meta
