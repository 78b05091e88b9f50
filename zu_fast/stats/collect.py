"""Corpus statistics for every edited layer in ONE truncated forward per batch.

Hooks on every edited module feed ``ops.cov_accumulate`` with the module inputs (keys) and the
attention mask (padding is never counted); the forward stops right after the deepest edited module.

Caching (issue 26):

- **The default cache** (``cache_root()/stats/<key>``, the key a hash of the model, corpus and settings
  fingerprints) is shared by every process of the machine or cluster. An entry is written whole into a
  temporary folder and renamed into place (``zu_fast.atomic``), so a reader sees a finished entry or none.
  A process that finds a valid entry uses it. Processes that start together are serialised by a lock file
  beside the entry (``zu_fast.stats.lock``: PID, host, heartbeat, and a stale-lock rule): one computes,
  the others wait and then use its entry. An entry that cannot be read (truncated, size or SHA-256 not as
  recorded at write, cut ``meta.json``, another format) is moved aside to ``<key>.corrupt-<time>-<id>``
  (nothing is deleted) with a warning naming both folders, and recomputed; it is never used. A full disk
  while writing the entry is a warning: the statistics are returned uncached. Temporary folders left by a
  crashed write are removed by the next process that takes the entry's lock, once an hour old.
- **A folder the user names** (``cache_path=``, command line ``--stats`` / ``--out``) is used when it holds
  these statistics, refused (StaleStatsError) when it holds others, and refused with a ZuFastError saying what
  to do when it is damaged: zu_fast does not replace a folder it was pointed at and cannot read (move it
  away, or recompute into it with ``zu-fast stats --out DIR --overwrite``). A full disk is a ZuFastError
  naming the folder and the bytes needed; the folder is left as it was.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import ops
from ..atomic import DiskFullError, FolderAppearedError, check_target, move_aside
from ..config import UnlearnConfig
from ..config.keys import STATS_SETTINGS
from ..errors import StaleStatsError, ZuFastError
from ..model import StopForward, edit_targets, forward_until, model_device, padded_batch
from ..model.hooks import match_token_mask
from ..model.locate import MoETarget
from ..provenance import stats_model_fingerprint
from ..requests import max_positions
from . import distributed as dist_stats
from . import moe as moe_stats
from .corpus import corpus_fingerprint, read_corpus
from .lock import CacheLock
from .moments import LayerStats, finalize, new_layer_stats
from .store import FILES, cache_root, load_stats, model_info, save_stats, stats_key


@dataclass
class CorpusStats:
    """Statistics of every edited layer plus where they came from."""

    layers: dict[int, LayerStats]
    meta: dict[str, Any] = field(default_factory=dict)
    path: str | None = None
    # "computed" (this call ran the statistics pass) or "loaded" (from the cache or a statistics folder,
    # possibly after waiting for another process that computed them); None when built by hand
    origin: str | None = None

    def __getitem__(self, layer: int) -> LayerStats:
        try:
            return self.layers[layer]
        except KeyError:
            raise ZuFastError(
                f"no statistics for layer {layer} (have layers {sorted(self.layers)}); collect them with "
                "the same config.layers"
            ) from None

    def __contains__(self, layer: int) -> bool:
        return layer in self.layers


def _settings(cfg: UnlearnConfig) -> dict[str, Any]:
    """What the statistics depend on (the token-per-batch budget only changes summation order), under the flat
    names every cache on disk was keyed with (``config.keys.STATS_SETTINGS``)."""
    flat = cfg.to_flat()
    return {k: flat[k] for k in STATS_SETTINGS} | {"layers": list(cfg.layers)}


def _max_length(model, cfg: UnlearnConfig) -> int:
    """Tokens per text at most: ``stats_max_length``, and never past the model's trained context
    (``max_position_embeddings`` / ``n_positions``: longer inputs index past GPT-2's position table and
    put rotary models where they were never trained)."""
    limit = max_positions(model)
    return min(cfg.stats.max_length, limit) if limit else cfg.stats.max_length


def _batches(tok, texts: list[str], max_length: int, batch_tokens: int, window: int = 512):
    """Token-budget batches: texts tokenised (truncated), sorted by length within a window."""
    for w in range(0, len(texts), window):
        enc = tok(texts[w : w + window], add_special_tokens=True, truncation=True, max_length=max_length)
        ids = sorted((list(x) for x in enc["input_ids"] if len(x) > 0), key=len, reverse=True)
        i = 0
        while i < len(ids):
            longest = len(ids[i])
            rows = max(1, batch_tokens // longest)
            yield ids[i : i + rows]
            i += rows


def collect_stats(
    model: torch.nn.Module | str | os.PathLike,
    tok,
    corpus: Any,
    config: UnlearnConfig | None = None,
    *,
    cache: bool = True,
    cache_path: str | None = None,
    progress: bool | None = None,
    distributed: bool = False,
    device: str | torch.device | None = None,
) -> CorpusStats:
    """Collect (or load from cache) Σkkᵀ, Σk, n for every edited layer in ``config.layers``.

    ``corpus``: an iterable of str, a .txt (one text per line) or .jsonl ("text") path, or a
    datasets.Dataset. Cached under ``cache_root()/stats/<key>`` (or ``cache_path``); the cache
    key covers a fingerprint of the weights up to the deepest edited layer, the corpus and the
    settings, and a cache that does not match is refused (StaleStatsError).

    ``model`` may be a local HF folder (safetensors): then only the embeddings and layers
    0..max(layers) are loaded (``zu_fast.model.partial``), onto ``device`` (default: the current
    CUDA device, else CPU), and ``tok`` may be None (loaded from the folder).
    ``distributed``: shard the corpus over the ``torch.distributed`` ranks and all-reduce the sums
    (every rank returns the same result; rank 0 writes the cache) — see ``zu_fast.stats.distributed``.
    Models dispatched with accelerate (device_map, CPU/disk offload) work as they are.
    """
    if isinstance(model, (str, os.PathLike)):
        model, tok, config = _load_from_path(model, tok, config, device)
    cfg = config or UnlearnConfig.for_model(model)
    progress = cfg.runtime.progress if progress is None else progress
    rank, world = dist_stats.require_initialized() if distributed else (0, 1)
    targets = edit_targets(model, cfg.layers, cfg.locate, allow_offloaded=True)  # statistics only read module inputs
    texts = read_corpus(corpus, cfg.stats.n_samples)
    if not texts:
        raise ZuFastError("the corpus is empty: statistics need text")
    meta = {
        "model_fingerprint": stats_model_fingerprint(model, cfg.layers, cfg.locate),
        "corpus_fingerprint": corpus_fingerprint(texts),
        "settings": _settings(cfg),
        "model_info": model_info(model, targets),  # not in the key: says what differs on a refusal
    }

    def compute() -> dict[int, LayerStats]:
        if distributed:
            layers, info = _collect(model, tok, dist_stats.shard(texts, rank, world), cfg, targets,
                                    progress and rank == 0,
                                    budget=dist_stats.shard_budget(cfg.stats.token_budget, world), reduce=True)
            info["world_size"] = world
        else:
            layers, info = _collect(model, tok, texts, cfg, targets, progress)
        meta["collection"] = info
        return layers

    def loaded(path: Path, layers: dict[int, LayerStats], full_meta: dict) -> CorpusStats:
        return CorpusStats({k: layers[k].to(t.device) for t in targets for k in moe_stats.stat_keys(t)}, full_meta,
                           str(path), origin="loaded")

    if not cache:
        return CorpusStats(compute(), meta, None, origin="computed")
    if distributed:
        return _distributed(Path(cache_path or cache_root() / "stats" / stats_key(meta)), meta, rank, compute,
                            loaded, default=cache_path is None)
    if cache_path is not None:
        return _user_folder(Path(cache_path), meta, compute, loaded)
    return _default_entry(cache_root() / "stats" / stats_key(meta), meta, compute, loaded)


def _user_folder(path: Path, meta: dict, compute, loaded) -> CorpusStats:
    """``cache_path=``: use the statistics there, refuse others or a damaged folder, else compute and write them."""
    fix = (f"zu_fast does not replace a statistics folder it cannot read: move {str(path)!r} away (or delete it) and "
           f"run again, choose another folder, or recompute into it with zu-fast stats --out {path} --overwrite")
    if (path / "meta.json").exists():
        try:
            return loaded(path, *load_stats(path, expect=meta))
        except StaleStatsError:
            raise
        except ZuFastError as e:
            raise ZuFastError(f"{e}. {fix}") from None
    if path.is_dir() and any((path / f).exists() for f in FILES):
        raise ZuFastError(f"{path} holds {', '.join(f for f in FILES if (path / f).exists())} but no meta.json: an "
                          f"incomplete statistics folder (a write cut short?). {fix}")
    check_target(path, what="statistics")  # a non-empty folder is refused now, not after the pass
    layers = compute()
    try:
        save_stats(path, layers, meta)
    except FolderAppearedError:  # another process wrote the same folder meanwhile: theirs, if it is ours too
        return loaded(path, *load_stats(path, expect=meta))
    return CorpusStats(layers, meta, str(path), origin="computed")


def _try_entry(path: Path, meta: dict, loaded) -> tuple[CorpusStats | None, str | None]:
    """(the entry at ``path`` if it is valid and matches, else None; why it cannot be used, if it is there)."""
    if not (path / "meta.json").exists():
        if path.is_dir() and any(path.iterdir()):
            return None, "it has no meta.json (an incomplete entry)"
        return None, None
    try:
        return loaded(path, *load_stats(path, expect=meta)), None
    except ZuFastError as e:
        return None, str(e)


def _entry_signature(path: Path) -> tuple | None:
    try:
        st = (path / "meta.json").stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _say(msg: str) -> None:
    print(f"zu_fast: {msg}", file=sys.stderr, flush=True)


def _default_entry(path: Path, meta: dict, compute, loaded) -> CorpusStats:
    """The default cache: use a valid entry, else compute it once across processes (see the module docstring)."""
    got, _ = _try_entry(path, meta, loaded)
    if got is not None:
        return got
    lock = CacheLock(path.with_name(path.name + ".lock"),
                     on_wait=lambda c: _say(f"waiting for process {c.get('pid', '?')} on {c.get('host', '?')}, "
                                            f"which is computing these statistics ({path})"),
                     on_break=lambda c, why: _say(f"taking over the statistics of {path} from process "
                                                  f"{c.get('pid', '?')} on {c.get('host', '?')}: {why}"))
    known_bad = [_entry_signature(path)]  # an entry already there that cannot be used: not what we wait for
    while not lock.acquire(until=lambda: _entry_signature(path) not in (None, known_bad[0])):
        got, _ = _try_entry(path, meta, loaded)  # finished by the process we waited for
        if got is not None:
            return got
        known_bad[0] = _entry_signature(path)
    try:
        got, why = _try_entry(path, meta, loaded)  # finished just before we took the lock
        if got is not None:
            return got
        if why is not None:
            moved = move_aside(path, "corrupt")
            warnings.warn(f"zu_fast: the cached statistics in {path} cannot be used ({why}); moved them aside to "
                          f"{moved} (nothing is deleted) and computing them again", stacklevel=3)
        elif path.is_dir():
            path.rmdir()  # an empty folder (ours: named by the cache key)
        _remove_dead_temporaries(path)
        layers = compute()
        try:
            save_stats(path, layers, meta, new_only=True)
        except FolderAppearedError:  # written meanwhile by a process that judged our lock stale
            got, _ = _try_entry(path, meta, loaded)
            if got is not None:
                return got
            raise
        except DiskFullError as e:
            warnings.warn(f"zu_fast: the statistics were not cached: {e}; they are used for this run only",
                          stacklevel=3)
            return CorpusStats(layers, meta, None, origin="computed")
        return CorpusStats(layers, meta, str(path), origin="computed")
    finally:
        lock.release()


def _remove_dead_temporaries(path: Path, age_s: float = 3600.0) -> None:
    """Remove the temporary folders of crashed writes of this entry (``.<key>.zu_fast-tmp-*``, ours), once they
    are older than ``age_s``: the caller holds the entry's lock, so no live process writes them."""
    now = time.time()
    for tmp in path.parent.glob(f".{path.name}.zu_fast-tmp-*"):
        try:
            if tmp.is_dir() and now - tmp.stat().st_mtime > age_s:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


def _distributed(path: Path, meta: dict, rank: int, compute, loaded, *, default: bool) -> CorpusStats:
    """``distributed=True``: rank 0 decides whether the entry is there, every rank computes its shard if not,
    rank 0 writes it. (No lock: the ranks of one job compute together; a concurrent job's entry is used.)"""
    hit = dist_stats.broadcast_flag((path / "meta.json").exists())  # every rank takes the same branch
    if hit:
        return loaded(path, *load_stats(path, expect=meta))
    if rank == 0 and not default:
        check_target(path, what="statistics")  # a non-empty folder is refused now, not after the pass
    layers = compute()
    out = str(path)
    if rank == 0:
        try:
            save_stats(path, layers, meta, new_only=default)
        except FolderAppearedError:
            pass  # an identical entry written by another job
        except DiskFullError as e:
            if not default:
                raise
            warnings.warn(f"zu_fast: the statistics were not cached: {e}; they are used for this run only",
                          stacklevel=3)
            out = None
    dist_stats.barrier()  # the others return once the cache is written (they keep their reduced copy)
    return CorpusStats(layers, meta, out, origin="computed")


def _load_from_path(path, tok, config: UnlearnConfig | None, device):
    """(partial model, tokenizer, config) for a local HF folder: layers 0..max(config.layers) only."""
    from transformers import AutoConfig, AutoTokenizer

    from ..model.partial import load_partial_model

    if not (Path(path) / "config.json").exists():
        raise ZuFastError(f"model path {str(path)!r} is not a local HuggingFace model folder (no config.json)")
    cfg = config or UnlearnConfig.for_model(AutoConfig.from_pretrained(str(path), local_files_only=True))
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    model = load_partial_model(path, max(cfg.layers) + 1, device=device)
    if tok is None:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return model, tok, cfg


@torch.no_grad()
def _collect(model, tok, texts, cfg: UnlearnConfig, targets, progress: bool, *, budget: int | None = None,
             reduce: bool = False):
    measured = cfg.stats.mode == "measured"
    acc: dict[int, LayerStats] = {}
    counters: dict[int, torch.Tensor] = {}
    for t in targets:
        if isinstance(t, MoETarget):  # gate moments + every expert (+ the shared expert): zu_fast.stats.moe
            for key, (st, n) in moe_stats.new_accumulators(t, measured).items():
                acc[key], counters[key] = st, n
        else:
            acc[t.layer], counters[t.layer] = new_layer_stats(t.layer, t.d_in, t.device, t.d if measured else None)
    current_mask: list[torch.Tensor | None] = [None]
    deepest = targets[-1]

    def make_hook(layer: int, is_deepest: bool, name: str):
        st = acc[layer]

        def hook(module, args, output):
            keys = args[0]  # [batch, seq, d_in], or flattened [batch·seq, d_in] (OPT's fc2): the mask follows
            mask = match_token_mask(keys, current_mask[0].to(keys.device), name)
            values = (output[0] if isinstance(output, tuple) else output) if measured else None
            ops.cov_accumulate(st.kk, st.ks, counters[layer], keys, mask, values=values, vk=st.vk, vs=st.vs)
            if is_deepest:
                raise StopForward  # nothing above the deepest edited module is needed

        return hook

    handles = []
    for t in targets:
        if isinstance(t, MoETarget):
            handles += moe_stats.register_hooks(model, t, acc, counters, current_mask, t is deepest, measured)
        else:
            handles.append(t.module.register_forward_hook(make_hook(t.layer, t is deepest, t.name)))
    sketches = _Sketches(acc, counters)
    device = model_device(model)
    budget = cfg.stats.token_budget if not reduce else budget
    tokens = 0
    batches = 0
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    max_length = _max_length(model, cfg)
    # a total (hence an ETA): the token budget when there is one, else the number of texts
    by_text = budget is None
    bar = tqdm(total=len(texts) if by_text else budget, disable=not progress, desc="zu_fast stats",
               unit="text" if by_text else "tok", unit_scale=not by_text)
    try:
        for ids in _batches(tok, texts, max_length, cfg.stats.batch_tokens):
            if budget is not None and tokens >= budget:
                break
            batch = padded_batch(tok, ids, device)
            current_mask[0] = batch["attention_mask"].bool()
            if not forward_until(model, batch):  # the deepest hook always stops it: it never ran
                raise ZuFastError(f"module {deepest.name!r} was not called during the forward pass")
            n_tok = sum(len(x) for x in ids)
            tokens += n_tok
            batches += 1
            bar.update(len(ids) if by_text else n_tok)
            sketches.maybe_snapshot(tokens)
    finally:
        for h in handles:
            h.remove()
        bar.close()
        model.train(was_training)
    convergence = sketches.report(tokens)  # (distributed: measured on this rank's shard, before the sum)
    if reduce:
        dist_stats.reduce_layer_stats_(acc, counters)
        tokens, batches, n_texts = dist_stats.all_reduce_ints([tokens, batches, len(texts)])
    else:
        n_texts = len(texts)
    if tokens == 0:
        raise ZuFastError("no tokens were read from the corpus")
    for layer, st in acc.items():
        finalize(st, counters[layer])
        moe_stats.check_component(st)  # = st.check(), except that an expert may have seen < 2 tokens
    info = {
        "tokens": tokens,
        "texts": n_texts,
        "batches": batches,
        "seconds": round(time.perf_counter() - t0, 3),
        "max_length": max_length,
        "backend": ops.choose("cov_accumulate", deepest.device.type).name,
        "convergence": convergence,
    }
    for st in acc.values():
        st.info = {"convergence": info["convergence"].get(str(st.layer))}
    return acc, info


class _Sketches:
    """Convergence report: C·Ω for a fixed random Ω [d_in, 8], snapshotted when tokens double.

    rel_change = ‖(C_final − C_last_snapshot) Ω‖ / ‖C_final Ω‖ over the last chunk (the tokens
    since the last doubling, i.e. the last half or more), cheap enough to take on the fly.
    """

    def __init__(self, acc: dict[int, LayerStats], counters: dict[int, torch.Tensor]) -> None:
        self.acc, self.counters = acc, counters
        self.omega = {}
        for layer, st in acc.items():
            g = torch.Generator(device="cpu").manual_seed(1234 + layer)
            self.omega[layer] = torch.randn(st.d_in, 8, generator=g, dtype=torch.float64).to(st.kk.device)
        self.last: dict[int, torch.Tensor] = {}
        self.last_tokens = 0
        self.prev: dict[int, torch.Tensor] = {}  # kept in case the final batch is itself a snapshot
        self.prev_tokens = 0
        self.next_at = 0

    def _sketch(self, layer: int) -> torch.Tensor:
        kk = self.acc[layer].kk.to(torch.float64)
        upper = torch.triu(kk)
        sym_omega = upper @ self.omega[layer] + torch.triu(kk, 1).t() @ self.omega[layer]
        return sym_omega / max(int(self.counters[layer].item()), 1)

    def maybe_snapshot(self, tokens: int) -> None:
        if tokens >= self.next_at:
            self.prev, self.prev_tokens = self.last, self.last_tokens
            self.last = {layer: self._sketch(layer) for layer in self.acc}
            self.last_tokens = tokens
            self.next_at = 2 * tokens

    def report(self, tokens: int) -> dict[str, Any]:
        out = {}
        if self.last_tokens < tokens:
            snap, snap_tokens = self.last, self.last_tokens
        else:
            snap, snap_tokens = self.prev, self.prev_tokens
        for layer in self.acc:
            final = self._sketch(layer)
            prev = snap.get(layer)
            # None: one snapshot only (the corpus fit in one batch), nothing to compare with
            rel = None if prev is None else float((final - prev).norm() / final.norm().clamp_min(1e-300))
            out[str(layer)] = {"rel_change": rel, "over_tokens": tokens - snap_tokens, "tokens": tokens}
        return out


def describe(stats: CorpusStats) -> str:
    """A short human-readable summary (for the CLI)."""
    rows = [f"statistics: {stats.path or '(not cached)'}"]
    coll = stats.meta.get("collection", {})
    if coll:
        rows.append(f"  {coll.get('tokens')} tokens from {coll.get('texts')} texts in {coll.get('seconds')} s "
                    f"({coll.get('backend')} backend)")
    for layer, st in sorted(stats.layers.items()):
        conv = st.info.get("convergence") or {}
        rel = conv.get("rel_change")
        if isinstance(rel, (int, float)) and math.isfinite(rel):
            change = f"rel. change over last {conv.get('over_tokens', '?')} tokens: {rel:.2e}"
        else:  # one batch (or an old cache entry without the number): there is no earlier state to compare with
            change = "convergence not measured (the corpus fit in one batch: give more text to measure it)"
        rows.append(f"  layer {layer}: d_in {st.d_in}, n {st.n}, {change}")
    return "\n".join(rows)


__all__ = ["CorpusStats", "StaleStatsError", "collect_stats", "describe"]
