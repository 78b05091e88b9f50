"""MEMIT/ROME/AlphaEdit ``.npz`` statistics files ⇄ zu_fast LayerStats.

Those code bases cache ``layer_stats`` as the ``state_dict`` of a ``runningstats.CombinedStat``
saved with ``numpy.savez`` (no pickle). Keys, per collected statistic ``<s>`` ("mom2", "mean"):

    mom2.constructor  str    "util.runningstats.SecondMoment()"
    mom2.count        int    n, tokens seen
    mom2.mom2         [d, d] Σ_t k_t k_tᵀ — the raw SUM (``moment()`` divides it by count)
    mean.constructor  str    "util.runningstats.Mean()"
    mean.count        int    tokens seen by the mean (the same tokens as mom2)
    mean.batchcount   int
    mean.mean         [d]    μ_k (a running mean, Chan-style updates)
    mean.data_shape   [1]    (d,)
    sample_size       …      tally's argument (a NaN-boxed null when None)

Mapping to LayerStats: n = mom2.count, kk = mom2.mom2 (= n · moment()), ks = n · mean.mean.
Files collected with ``to_collect=["mom2"]`` only (MEMIT's default) have no mean. zu_fast's
default closed form uses the reference's CENTRED cross moment X = W (C − μ_k μ_kᵀ) n/(n−1), which
needs μ_k: such a file is refused for it, with the fix (re-collect with "mean", or set
``centered_cross_moment=False`` — the uncentred variant, which only needs C) in the message.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..config import UnlearnConfig
from ..errors import ZuFastError
from .moments import LayerStats


def _scalar(z, key: str, path) -> int:
    try:
        return int(np.asarray(z[key]).reshape(()))
    except (KeyError, ValueError, TypeError):
        raise ZuFastError(f"{path}: {key!r} is missing or not an integer") from None


def load_npz_stats(path: str | os.PathLike, layer: int, config: UnlearnConfig | None = None) -> LayerStats:
    """Read one MEMIT/ROME ``layer_stats`` .npz file as the LayerStats of ``layer``.

    ``config``: decides whether a missing mean is an error (``centered_cross_moment=True``; the
    default, uncentred, needs none).
    Without a mean and with the uncentred variant, ks is zero and ``info["mean"] == "missing"``.
    """
    cfg = config or UnlearnConfig(layers=[layer])
    path = Path(path)
    try:
        z = np.load(str(path), allow_pickle=False)
    except FileNotFoundError:
        raise ZuFastError(f"statistics file {str(path)!r} does not exist") from None
    except ValueError as e:
        raise ZuFastError(f"{path}: not a numpy .npz file without pickles ({e})") from None
    with z:
        keys = set(z.files)
        if "mom2.mom2" not in keys:
            raise ZuFastError(
                f"{path}: no 'mom2.mom2' entry (keys: {sorted(keys)}); expected a MEMIT/ROME layer_stats file "
                "collected with to_collect containing 'mom2'"
            )
        mom2 = torch.from_numpy(np.asarray(z["mom2.mom2"]))
        n = _scalar(z, "mom2.count", path)
        if mom2.dim() != 2 or mom2.shape[0] != mom2.shape[1]:
            raise ZuFastError(f"{path}: mom2.mom2 has shape {tuple(mom2.shape)}, expected [d, d]")
        if n < 2:
            raise ZuFastError(f"{path}: mom2.count is {n}; statistics need at least 2 tokens")
        d = mom2.shape[0]
        info: dict = {"source": str(path), "format": "memit-npz"}
        if "mean.mean" in keys:
            mean = torch.from_numpy(np.asarray(z["mean.mean"])).reshape(-1).to(torch.float64)
            n_mean = _scalar(z, "mean.count", path)
            if mean.shape[0] != d:
                raise ZuFastError(f"{path}: mean.mean has width {mean.shape[0]}, mom2.mom2 has {d}")
            if n_mean != n:
                raise ZuFastError(f"{path}: mean.count {n_mean} != mom2.count {n}: the two were not collected "
                                  "over the same tokens")
            ks = mean * n  # Σ k   [d] fp64
        else:
            if cfg.closed_form.centered_cross_moment:
                raise ZuFastError(
                    f"{path} has no mean (collected with to_collect=['mom2'] only). The reference's centred "
                    "cross moment X = W (C − μ_k μ_kᵀ) n/(n−1), zu_fast's default, needs the mean key μ_k: "
                    "re-collect with to_collect=['mom2', 'mean'] (zu_fast.compat.layer_stats or "
                    "zu_fast.collect_stats compute it at no extra cost), or use "
                    "UnlearnConfig(centered_cross_moment=False), the uncentred variant that needs only C"
                )
            ks = torch.zeros(d, dtype=torch.float64)
            info["mean"] = "missing"
    st = LayerStats(layer, mom2.to(torch.float32).contiguous(), ks, n, info=info)
    st.check()
    return st


def save_npz_stats(stats: LayerStats, path: str | os.PathLike, to_collect=("mom2", "mean"),
                   precision: str = "float32") -> Path:
    """Write ``stats`` as a MEMIT/ROME ``layer_stats`` .npz (what their ``tally`` would have cached)."""
    path = Path(path)
    dtype = {"float32": np.float32, "float64": np.float64, "float16": np.float16}.get(precision)
    if dtype is None:
        raise ZuFastError(f"precision {precision!r}; choose float32, float64 or float16")
    out: dict[str, np.ndarray] = {}
    for what in to_collect:
        if what == "mom2":
            out["mom2.constructor"] = np.array("util.runningstats.SecondMoment()")
            out["mom2.count"] = np.array(stats.n)
            out["mom2.mom2"] = stats.kk.detach().cpu().numpy().astype(dtype)
        elif what == "mean":
            if stats.info.get("mean") == "missing":
                raise ZuFastError("these statistics have no mean to export")
            out["mean.constructor"] = np.array("util.runningstats.Mean()")
            out["mean.count"] = np.array(stats.n)
            out["mean.batchcount"] = np.array(1)
            out["mean.mean"] = stats.mean_key().cpu().numpy().astype(dtype)
            out["mean.data_shape"] = np.array([stats.d_in])
        else:
            raise ZuFastError(f"cannot export {what!r}: zu_fast statistics hold 'mom2' and 'mean'")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(str(tmp), **out)
    os.replace(tmp, path)
    return path


def corpus_stats_from_npz(paths: dict[int, str | os.PathLike], config: UnlearnConfig | None = None):
    """A CorpusStats (for ``unlearn(stats=…)``) from one MEMIT/ROME .npz per edited layer."""
    from .collect import CorpusStats

    layers = {layer: load_npz_stats(p, layer, config) for layer, p in paths.items()}
    return CorpusStats(layers, {"source": "memit-npz", "files": {str(k): str(v) for k, v in paths.items()}})


__all__ = ["corpus_stats_from_npz", "load_npz_stats", "save_npz_stats"]
