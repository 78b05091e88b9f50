"""Drop-in ``layer_stats`` for MEMIT / ROME / AlphaEdit code bases, backed by zu_fast's engine.

(``zu_fast.compat.memit``; re-exported as ``zu_fast.compat.layer_stats``.)

Their editing loops call::

    stat = layer_stats(model, tok, layer_name, stats_dir, mom2_dataset, to_collect=["mom2"],
                       sample_size=mom2_n_samples, precision=mom2_dtype, force_recompute=…)
    C = stat.mom2.moment().float()          # (1/n) Σ k kᵀ, uncentred   [d_in, d_in]

``zu_fast.compat.layer_stats`` has the same signature and the same return shape (``.mom2.moment()``,
``.mom2.count``, ``.mean.mean()`` when "mean" is requested, ``.state_dict()`` in their ``.npz``
layout), computed by ``zu_fast.collect_stats`` (one truncated forward per batch, fp32
accumulators, the ``cov_accumulate`` kernels) and cached in zu_fast's fingerprinted format.

Differences, on purpose:
- nothing is downloaded: ``ds_name`` is the corpus itself — a .txt/.jsonl path, a list of texts or
  a ``datasets.Dataset`` — and a dataset NAME such as "wikipedia" raises a ZuFastError saying so;
- an existing MEMIT/ROME ``.npz`` at the path they would use
  (``stats_dir/<model_name>/<ds>_stats/<layer_name>_<precision>_<to_collect><_size>.npz``) is
  imported instead of recomputed (as their own code would; ``force_recompute=True`` ignores it);
- the statistics are collected in fp32 whatever ``precision`` says; ``moment()`` returns that dtype.
"""

from __future__ import annotations

import os
import re
import shutil
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from ..config import UnlearnConfig
from ..errors import ZuFastError
from ..stats.moments import LayerStats
from ..stats.npz import load_npz_stats
from ..stats.store import check_stats_for_model

if TYPE_CHECKING:
    from ..stats.collect import CorpusStats

_DTYPES = {None: torch.float32, "float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
           "bfloat16": torch.bfloat16}


class SecondMomentView:
    """The ``runningstats.SecondMoment`` face of a LayerStats: ``moment()``, ``count``, ``mom2``."""

    def __init__(self, stats: LayerStats, dtype: torch.dtype) -> None:
        self._stats, self._dtype = stats, dtype

    @property
    def count(self) -> int:
        return self._stats.n

    @property
    def mom2(self) -> torch.Tensor:
        """Σ k kᵀ   [d_in, d_in] (the raw sum, as runningstats keeps it)."""
        return self._stats.kk.to(self._dtype)

    def moment(self) -> torch.Tensor:
        """E[k kᵀ] = (1/n) Σ k kᵀ   [d_in, d_in], uncentred."""
        return (self._stats.kk.to(torch.float64) / self._stats.n).to(self._dtype)

    def size(self) -> int:
        return self.count

    def to_(self, device) -> None:
        self._stats.kk = self._stats.kk.to(device)


class MeanView:
    """The ``runningstats.Mean`` face: ``mean()``, ``count``."""

    def __init__(self, stats: LayerStats, dtype: torch.dtype) -> None:
        self._stats, self._dtype = stats, dtype

    @property
    def count(self) -> int:
        return self._stats.n

    def mean(self) -> torch.Tensor:
        """μ_k = (1/n) Σ k   [d_in]."""
        return self._stats.mean_key().to(self._dtype)

    def size(self) -> int:
        return self.count

    def to_(self, device) -> None:
        self._stats.ks = self._stats.ks.to(device)


class CompatStat:
    """What MEMIT's ``layer_stats`` returns (a ``CombinedStat``), for the statistics zu_fast has."""

    def __init__(self, stats: LayerStats, to_collect: Sequence[str], dtype: torch.dtype, path: str | None) -> None:
        self.stats = stats  # zu_fast's LayerStats (raw sums): use with zu_fast.unlearn
        self.to_collect = list(to_collect)
        self.path = path
        self._objs: dict[str, Any] = {}
        if "mom2" in to_collect:
            self._objs["mom2"] = SecondMomentView(stats, dtype)
        if "mean" in to_collect:
            self._objs["mean"] = MeanView(stats, dtype)

    def __getattr__(self, k: str) -> Any:
        objs = self.__dict__.get("_objs", {})
        if k in objs:
            return objs[k]
        raise AttributeError(k)

    def to_(self, device) -> None:
        for v in self._objs.values():
            v.to_(device)

    def cpu_(self) -> None:
        self.to_("cpu")

    def state_dict(self) -> dict[str, Any]:
        """The runningstats ``state_dict`` (numpy arrays) — what their ``.npz`` cache holds."""
        import numpy as np

        out: dict[str, Any] = {}
        if "mom2" in self._objs:
            out |= {"mom2.constructor": "util.runningstats.SecondMoment()", "mom2.count": self.stats.n,
                    "mom2.mom2": self.stats.kk.detach().cpu().numpy()}
        if "mean" in self._objs:
            out |= {"mean.constructor": "util.runningstats.Mean()", "mean.count": self.stats.n, "mean.batchcount": 1,
                    "mean.mean": self.stats.mean_key().cpu().numpy(), "mean.data_shape": np.array([self.stats.d_in])}
        return out


def _split_layer_name(layer_name: str) -> tuple[str, int]:
    """"model.layers.5.mlp.down_proj" → ("model.layers.{}.mlp.down_proj", 5): the first ".<int>." is the layer."""
    m = re.search(r"\.(\d+)(\.|$)", layer_name)
    if m is None:
        raise ZuFastError(f"layer_name {layer_name!r} has no layer index "
                          "(expected e.g. 'model.layers.5.mlp.down_proj')")
    template = layer_name[: m.start(1)] + "{}" + layer_name[m.end(1):]
    return template, int(m.group(1))


def _checked_request(to_collect: Sequence[str], precision: str | None) -> tuple[list[str], torch.dtype]:
    """(the statistics asked for, the dtype of the returned moments), or a ZuFastError."""
    to_collect = list(to_collect)
    bad = [s for s in to_collect if s not in ("mom2", "mean")]
    if bad or not to_collect:
        raise ZuFastError(f"to_collect={to_collect}: zu_fast provides 'mom2' and 'mean' (not {bad})")
    dtype = _DTYPES.get(precision)
    if dtype is None:
        raise ZuFastError(f"precision {precision!r}; choose one of {[k for k in _DTYPES if k]}")
    return to_collect, dtype


def _corpus_of(ds_name: Any, download: bool) -> tuple[Any, str]:
    """(corpus, label for file names) — a path, list of texts or datasets.Dataset; never a download."""
    if isinstance(ds_name, (str, os.PathLike)):
        p = Path(ds_name)
        if p.exists():
            return p, p.stem
        raise ZuFastError(
            f"ds_name={str(ds_name)!r} is not a local file: zu_fast.compat.layer_stats never downloads "
            f"{'(download=True is not supported) ' if download else ''}— pass the corpus itself instead of a dataset "
            "name: a .txt (one text per line) or .jsonl ('text' field) path, a list of str, or a datasets.Dataset "
            "you loaded yourself (e.g. load_dataset('wikipedia', ...)['train'])"
        )
    if hasattr(ds_name, "column_names"):
        return ds_name, "dataset"
    if isinstance(ds_name, (list, tuple)):
        return list(ds_name), "texts"
    raise ZuFastError(f"ds_name must be a corpus path, a list of texts or a datasets.Dataset, got {type(ds_name)}")


def layer_stats(
    model: torch.nn.Module,
    tok,
    layer_name: str,
    stats_dir: str | os.PathLike,
    ds_name: Any,
    to_collect: Sequence[str],
    model_name: str | None = None,
    sample_size: int | None = None,
    precision: str | None = None,
    batch_tokens: int | None = None,
    download: bool = False,
    progress=tqdm,
    force_recompute: bool = False,
) -> CompatStat:
    """Second moment (and mean) of the INPUT of module ``layer_name`` over the corpus ``ds_name``.

    Signature and return shape of MEMIT/ROME/AlphaEdit's ``layer_stats``; see the module docstring.
    ``to_collect``: any of "mom2", "mean". ``sample_size``: texts read at most (None: all).
    ``precision``: dtype of the returned moments. ``batch_tokens``: tokens per forward batch.
    ``progress``: a tqdm-like callable, or None for silence. Cached under
    ``stats_dir/<model_name>/<ds>_stats/<layer_name>_<precision>_<to_collect><_size>.zu_fast/``.
    """
    to_collect, dtype = _checked_request(to_collect, precision)
    template, layer = _split_layer_name(layer_name)
    corpus, ds_label = _corpus_of(ds_name, download)
    if model_name is None:
        model_name = str(getattr(model.config, "_name_or_path", "") or type(model).__name__).rstrip("/")
        model_name = model_name.rsplit("/", 1)[-1] or type(model).__name__
    size_suffix = "" if sample_size is None else f"_{sample_size}"
    stem = f"{layer_name}_{precision or 'float32'}_{'-'.join(sorted(to_collect))}{size_suffix}"
    folder = Path(stats_dir) / model_name / f"{ds_label}_stats"
    npz = folder / f"{stem}.npz"
    cfg = UnlearnConfig.for_model(model, layers=[layer], rewrite_module_tmp=template,
                                  progress=progress is not None)
    if npz.exists() and not force_recompute:  # their cache file: import it (mean only if it has one)
        st = load_npz_stats(npz, layer, cfg.replace(centered_cross_moment="mean" in to_collect))
        return CompatStat(st, to_collect, dtype, str(npz))
    changes: dict[str, Any] = {"mom2_n_samples": sample_size or 10**12}
    if batch_tokens is not None:
        changes["stats_batch_tokens"] = int(batch_tokens)
    max_pos = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if max_pos:  # as the reference: texts truncated to the model's context
        changes["stats_max_length"] = min(cfg.stats.max_length, int(max_pos))
    cfg = cfg.replace(**changes)
    cache_path = folder / f"{stem}.zu_fast"
    if force_recompute and cache_path.exists():
        shutil.rmtree(cache_path)
    from ..stats.collect import collect_stats

    stats = collect_stats(model, tok, corpus, cfg, cache=True, cache_path=str(cache_path))
    return CompatStat(stats[layer], to_collect, dtype, stats.path)


def layer_stats_from(stats: CorpusStats) -> Callable[..., CompatStat]:
    """A ``layer_stats`` drop-in that answers from statistics collected for every layer in ONE pass.

    MEMIT-family code calls ``layer_stats`` once per edited layer, and each call is a pass over the
    corpus up to that layer; ``zu_fast.collect_stats`` reads all the edited layers in one pass (one
    truncated forward per batch, hooks on every layer). Collect once, then hand their code this::

        cfg = zu_fast.UnlearnConfig.for_model(model, layers=hparams.layers,
                                              rewrite_module_tmp=hparams.rewrite_module_tmp)
        memit_main.layer_stats = zu_fast.compat.layer_stats_from(zu_fast.collect_stats(model, tok, corpus, cfg))

    The function returned takes ``layer_stats``' arguments and returns the same ``CompatStat``. It
    answers for the module and layers the statistics cover (ZuFastError naming them otherwise); the
    corpus, sample-size and cache arguments were settled by the collection and are not read. The first
    call on a model checks that the statistics are that model's (StaleStatsError otherwise); later calls
    on the same model object are not checked again, because MEMIT and AlphaEdit edit the lower layers
    while they ask for the statistics of the upper ones, and mean those of the unedited model (what their
    own ``COV_CACHE`` keeps).
    """
    module = ((stats.meta or {}).get("settings") or {}).get("rewrite_module_tmp")
    checked: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()

    def layer_stats(model: torch.nn.Module, tok, layer_name: str, stats_dir: Any = None, ds_name: Any = None,
                    to_collect: Sequence[str] = ("mom2",), model_name: str | None = None,
                    sample_size: int | None = None, precision: str | None = None, batch_tokens: int | None = None,
                    download: bool = False, progress=None, force_recompute: bool = False) -> CompatStat:
        wanted, dtype = _checked_request(to_collect, precision)
        template, layer = _split_layer_name(layer_name)
        if module is not None and template != module:
            raise ZuFastError(f"{layer_name!r}: these statistics are of {module!r}")
        if layer not in stats.layers:
            raise ZuFastError(f"{layer_name!r}: these statistics cover layers {sorted(stats.layers)}; collect them "
                              f"with the layers the editor edits")
        if model not in checked:
            cfg = UnlearnConfig.for_model(model, layers=[layer], rewrite_module_tmp=template, progress=False)
            check_stats_for_model(model, cfg, stats)  # of this model (StaleStatsError otherwise)
            checked.add(model)
        return CompatStat(stats[layer], wanted, dtype, stats.path)

    return layer_stats


__all__ = ["CompatStat", "MeanView", "SecondMomentView", "layer_stats", "layer_stats_from"]
