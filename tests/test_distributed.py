"""collect_stats(distributed=True): 2 gloo ranks on CPU give the single-process statistics."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny_models import corpus, llama

import zu_fast
from zu_fast import UnlearnConfig, ZuFastError
from zu_fast.stats import distributed as dist_stats
from zu_fast.stats import load_stats

WORLD = 2


def _cfg(**kw) -> UnlearnConfig:
    return UnlearnConfig(**{"layers": [1, 2], "progress": False, "stats_mode": "measured",
                            "stats_batch_tokens": 96, **kw})


def _worker(rank: int, tmp: str) -> None:
    """One rank: collect (cache miss, rank 0 writes), collect again (cache hit), save what it got."""
    torch.set_num_threads(1)  # two ranks on a shared CPU
    os.environ["ZU_FAST_CACHE"] = str(Path(tmp) / "cache")
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=WORLD)
    try:
        model, tok = llama()
        texts = corpus(21)  # odd count: the shards differ in size
        st = zu_fast.collect_stats(model, tok, texts, _cfg(), distributed=True)
        again = zu_fast.collect_stats(model, tok, texts, _cfg(), distributed=True)  # every rank loads the cache
        budget = zu_fast.collect_stats(model, tok, texts, _cfg(stats_token_budget=120), cache=False,
                                       distributed=True)
        out = {"path": st.path, "meta": st.meta["collection"], "budget_n": budget[1].n}
        for layer in (1, 2):
            for name in ("kk", "ks", "vk", "vs"):
                out[f"{layer}.{name}"] = getattr(st[layer], name)
                out[f"again.{layer}.{name}"] = getattr(again[layer], name)
            out[f"{layer}.n"] = st[layer].n
        torch.save(out, Path(tmp) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    # fork (Linux, CUDA not initialised) skips re-importing torch/transformers in each rank: seconds, not tens
    method = "fork" if "fork" in mp.get_all_start_methods() and not torch.cuda.is_initialized() else "spawn"
    mp.start_processes(_worker, args=(str(tmp),), nprocs=WORLD, join=True, start_method=method)
    return tmp, [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_two_gloo_ranks_equal_the_single_process_result(ranks):
    tmp, outs = ranks
    model, tok = llama()
    ref = zu_fast.collect_stats(model, tok, corpus(21), _cfg(), cache=False)
    for out in outs:
        for layer in (1, 2):
            assert out[f"{layer}.n"] == ref[layer].n
            assert torch.allclose(out[f"{layer}.kk"], ref[layer].kk, rtol=1e-5, atol=1e-5)
            assert torch.allclose(out[f"{layer}.kk"], out[f"{layer}.kk"].t())  # symmetrised after the sum
            assert torch.allclose(out[f"{layer}.ks"], ref[layer].ks, rtol=1e-6, atol=1e-6)
            assert torch.allclose(out[f"{layer}.vk"], ref[layer].vk, rtol=1e-5, atol=1e-5)
            assert torch.allclose(out[f"{layer}.vs"], ref[layer].vs, rtol=1e-6, atol=1e-6)
        assert out["meta"]["tokens"] == ref[1].n and out["meta"]["texts"] == 21 and out["meta"]["world_size"] == 2
    # both ranks hold the same reduced sums
    assert torch.equal(outs[0]["2.kk"], outs[1]["2.kk"])


def test_rank0_writes_one_cache_entry_and_every_rank_can_load_it(ranks):
    tmp, outs = ranks
    entries = [p for p in (tmp / "cache" / "stats").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and str(entries[0]) == outs[0]["path"] == outs[1]["path"]
    layers, _ = load_stats(entries[0])
    for out in outs:
        assert torch.equal(layers[2].kk, out["2.kk"]) and torch.equal(out["again.2.kk"], out["2.kk"])
        assert torch.equal(out["again.1.vk"], out["1.vk"])


def test_token_budget_is_split_over_ranks(ranks):
    _, outs = ranks
    # each rank stops after ⌈120/2⌉ tokens (plus at most one batch of 96)
    assert 120 <= outs[0]["budget_n"] < 120 + WORLD * 96
    assert outs[0]["budget_n"] == outs[1]["budget_n"]


def test_shards_cover_the_corpus_once():
    texts = [str(i) for i in range(11)]
    parts = [dist_stats.shard(texts, r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == sorted(texts) and [len(p) for p in parts] == [4, 4, 3]
    assert dist_stats.shard_budget(201, 2) == 101 and dist_stats.shard_budget(None, 2) is None


def test_distributed_without_a_process_group_is_a_clear_error():
    model, tok = llama()
    with pytest.raises(ZuFastError, match="init_process_group"):
        zu_fast.collect_stats(model, tok, corpus(4), _cfg(), cache=False, distributed=True)
