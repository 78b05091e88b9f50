"""Statistics cost vs a plain truncated forward over the same corpus (issue target: ≤ 1.15×).

    python benchmarks/stats_overhead.py --shape llama-3.1-8b      # GPU, bf16, 3 edited layers
    python benchmarks/stats_overhead.py --shape tiny --texts 200  # CPU smoke run

Both runs use the same token-budget batches and stop after the deepest edited module; the
baseline has no hooks (it only runs the forward), the statistics run accumulates Σkkᵀ, Σk, n for
every edited layer with the chosen ``cov_accumulate`` backend (``ZU_FAST_BACKEND`` to force one).
"""

from __future__ import annotations

import argparse
import time

import torch
from random_llama import SHAPES, build  # a sibling script: run from benchmarks/

import zu_fast
from zu_fast import ops
from zu_fast.model import Capture, edit_targets, forward_until, padded_batch
from zu_fast.stats.collect import _batches


def truncated_forward_seconds(model, tok, texts, cfg, device) -> tuple[float, int]:
    tokens = 0
    # nothing captured: the context only stops each forward after the deepest edited module
    with Capture(model, stop_after=edit_targets(model, cfg.layers, cfg.locate)[-1].name):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            for ids in _batches(tok, texts, cfg.stats.max_length, cfg.stats.batch_tokens):
                forward_until(model, padded_batch(tok, ids, device))
                tokens += sum(len(x) for x in ids)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, tokens


def measure(model, tok, texts, layers, device, batch_tokens: int = 8192) -> dict:
    """Seconds of a plain truncated forward and of collect_stats over ``texts`` (after a warm-up)."""
    cfg = zu_fast.UnlearnConfig.for_model(model, layers=layers, progress=False, stats_batch_tokens=batch_tokens)
    truncated_forward_seconds(model, tok, texts[:50], cfg, device)  # warm-up
    zu_fast.collect_stats(model, tok, texts[:50], cfg, cache=False)
    fwd, tokens = truncated_forward_seconds(model, tok, texts, cfg, device)
    t0 = time.perf_counter()
    stats = zu_fast.collect_stats(model, tok, texts, cfg, cache=False)
    if device == "cuda":
        torch.cuda.synchronize()
    st = time.perf_counter() - t0
    backend = ops.choose("cov_accumulate", device).name
    print(f"{len(texts)} texts, layers {layers}, {tokens} tokens, cov_accumulate backend {backend}")
    print("| run | seconds | tokens/s |\n|---|---:|---:|")
    print(f"| truncated forward | {fwd:.3f} | {tokens / fwd:.4g} |")
    print(f"| statistics ({len(layers)} layers) | {st:.3f} | {int(stats[layers[0]].n) / st:.4g} |")
    print(f"ratio statistics / truncated forward: {st / fwd:.3f}")
    return {"texts": len(texts), "tokens": tokens, "forward_s": fwd, "stats_s": st, "ratio": st / fwd,
            "backend": backend}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    p.add_argument("--texts", type=int, default=2000)
    p.add_argument("--batch-tokens", type=int, default=8192)
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, tok, world, layers = build(args.shape, device, dtype)
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    print(f"{args.shape} on {name}")
    measure(model, tok, (world.training_texts() * 4)[: args.texts], layers, device, args.batch_tokens)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
