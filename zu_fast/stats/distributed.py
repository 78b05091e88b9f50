"""Distributed statistics: shard the corpus over ``torch.distributed`` ranks, all-reduce the sums.

The statistics are plain sums (Σkkᵀ, Σk, n [, Σvkᵀ, Σv]), so the result of W ranks that each read
a shard of the corpus and then all-reduce (SUM) their accumulators is the single-process result,
up to the order of fp32 additions. ``collect_stats(..., distributed=True)`` does exactly that:

- rank r reads the texts ``r, r + W, r + 2W, …`` (strided shards balance long and short texts);
- a ``stats_token_budget`` is split evenly: each rank stops after ⌈budget / W⌉ tokens;
- after its pass every rank all-reduces its accumulators (NCCL on GPU, gloo on CPU: tensors are
  moved to the device the process group's backend needs, and back);
- only global rank 0 writes the cache; the others wait at a barrier and keep the (identical)
  reduced result in memory, so no shared file system is needed.

Running on several GPUs / nodes with ``torchrun``
-------------------------------------------------

``collect_stats.py``::

    import os, torch, torch.distributed as dist, zu_fast
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dist.init_process_group("nccl")                      # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR…
    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    path = "/models/Llama-3.1-8B"
    cfg = zu_fast.UnlearnConfig.from_json("hparams.json")
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.bfloat16).to(local)
    # or pass the path itself: only the embeddings and layers 0..max(cfg.layers) are loaded,
    # on the current CUDA device:  zu_fast.collect_stats(path, None, corpus, cfg, distributed=True)
    tok = AutoTokenizer.from_pretrained(path)
    stats = zu_fast.collect_stats(model, tok, "wiki.jsonl", cfg, distributed=True)
    dist.destroy_process_group()

One node, 8 GPUs::

    torchrun --standalone --nproc_per_node=8 collect_stats.py

Two nodes (run on each, ``--node_rank`` 0 and 1; the endpoint is node 0's address)::

    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 \\
             --rdzv_backend=c10d --rdzv_endpoint=node0.example:29500 collect_stats.py

Every rank must see the same corpus (same texts in the same order: the cache key hashes it) and
the same weights. The cache is written by global rank 0 under ``ZU_FAST_CACHE`` on its node; the
other ranks return the same reduced statistics without touching the disk. On CPU use
``dist.init_process_group("gloo")``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..errors import ZuFastError
from .moments import LayerStats


def _dist():
    import torch.distributed as dist

    return dist


def require_initialized() -> tuple[int, int]:
    """(rank, world_size) of the default process group; a clear error when there is none."""
    dist = _dist()
    if not (dist.is_available() and dist.is_initialized()):
        raise ZuFastError(
            "collect_stats(distributed=True) needs an initialised torch.distributed process group: call "
            "torch.distributed.init_process_group('nccl' or 'gloo') first (torchrun sets the environment), "
            "see zu_fast.stats.distributed"
        )
    return dist.get_rank(), dist.get_world_size()


def shard(texts: Sequence[str], rank: int, world_size: int) -> list[str]:
    """Rank ``rank``'s texts: every ``world_size``-th one starting at ``rank`` (strided shards)."""
    return list(texts[rank::world_size])


def shard_budget(budget: int | None, world_size: int) -> int | None:
    """Each rank's share of a global token budget (⌈budget / W⌉)."""
    return None if budget is None else math.ceil(budget / world_size)


def _reduce_device() -> torch.device | None:
    """The device the default group's backend reduces on (None: any; gloo: CPU; NCCL: current GPU)."""
    backend = str(_dist().get_backend()).lower()
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "gloo":
        return torch.device("cpu")
    return None


def all_reduce_sum_(tensors: Sequence[torch.Tensor | None]) -> None:
    """In place: every tensor ← its sum over ranks (None entries skipped).

    A tensor not on the device the backend needs (e.g. a CPU accumulator under NCCL, a CUDA one
    under gloo) is copied there, reduced, and copied back, so accumulators may live anywhere.
    """
    dist = _dist()
    need = _reduce_device()
    for t in tensors:
        if t is None:
            continue
        if need is None or t.device == need:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        else:
            tmp = t.to(need)
            dist.all_reduce(tmp, op=dist.ReduceOp.SUM)
            t.copy_(tmp)


def reduce_layer_stats_(acc: dict[int, LayerStats], counters: dict[int, torch.Tensor]) -> None:
    """All-reduce every layer's accumulators (kk, ks, n, and vk/vs when measured), in place.

    Call BEFORE ``finalize``: backends may leave kk's lower triangle stale, but a sum of upper
    triangles is the upper triangle of the sum, so symmetrising afterwards is exact.
    """
    for layer in sorted(acc):  # same order on every rank (collectives must match)
        st = acc[layer]
        all_reduce_sum_([st.kk, st.ks, counters[layer], st.vk, st.vs])


def all_reduce_ints(values: Sequence[int]) -> list[int]:
    """Sums over ranks of a few host integers (token/batch/text counts)."""
    dev = _reduce_device() or torch.device("cpu")
    t = torch.tensor(list(values), dtype=torch.int64, device=dev)
    _dist().all_reduce(t, op=_dist().ReduceOp.SUM)
    return [int(x) for x in t.tolist()]


def broadcast_flag(flag: bool, src: int = 0) -> bool:
    """Rank ``src``'s boolean on every rank (e.g. "the cache exists", decided once)."""
    dev = _reduce_device() or torch.device("cpu")
    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=dev)
    _dist().broadcast(t, src=src)
    return bool(t.item())


def barrier() -> None:
    """Wait for every rank (rank 0 writing the cache, the others waiting for it)."""
    dist = _dist()
    if str(dist.get_backend()).lower() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


__all__ = [
    "all_reduce_ints",
    "all_reduce_sum_",
    "barrier",
    "broadcast_flag",
    "reduce_layer_stats_",
    "require_initialized",
    "shard",
    "shard_budget",
]
