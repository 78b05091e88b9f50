"""MEMIT's own code (kmeng01/memit) running on zu_fast's statistics and statistics op, on the small model.

MEMIT cannot be committed here; point the script at a checkout (nothing in it is modified: the
folders it needs are copied and the changed lines printed as a diff first):

    MEMIT_PATH=/path/to/memit python examples/memit_with_zu_fast.py          # MEMIT edits 5 facts
    MEMIT_PATH=/path/to/memit python examples/memit_with_zu_fast.py --time   # statistics: theirs vs ours

The drop-ins:

1. the statistics function, one line in ``memit/memit_main.py`` (their ``get_cov`` calls it per layer)::

       -from rome.layer_stats import layer_stats
       +from zu_fast.compat import layer_stats

   Same signature and return (``stat.mom2.moment()``); ``mom2_dataset`` is then the corpus itself (a
   local .txt / .jsonl path): zu_fast never downloads, and caches by a fingerprint of the weights;
1b. or every edited layer in ONE pass, their per-layer calls answered from it (one line at run time)::

       memit_main.layer_stats = zu_fast.compat.layer_stats_from(zu_fast.collect_stats(model, tok, corpus, cfg))

2. or, keeping their statistics pipeline, its accumulation op, in ``util/runningstats.py``
   (``SecondMoment.add``; plus the import)::

       -        self.mom2 += a.t().mm(a)
       +        _zu_ops.cov_accumulate(self.mom2, a.new_zeros(a.shape[1]), ...); _zu_ops.symmetrize_upper_(self.mom2)

   (Triton / CUDA kernels on a GPU; on a CPU it is the same GEMM as theirs).

``zu_fast.ops.multiplicative_update_`` is not a drop-in here: MEMIT's update ``W += ΔW`` is additive and
ΔW is not a left multiple of W (down_proj's W is wider than tall, so W⁺W ≠ I); it serves editors whose
update is W ← D W (ZeroUnlearn, ``examples/use_ops_from_another_codebase.py``).

Shims, not drop-ins (``_reference_code.py``): MEMIT (2022) was written for GPT-2 / GPT-J with the
transformers of its day, so for the small Llama its compute_z gets AlphaEdit's two lines that drop a BOS
from the target, ``output[0]`` of a decoder layer reads the tensor transformers now returns, and two
GPT-2 config names are set on the Llama config (``n_embd``, ``n_positions``). Without a GPU, "cuda" becomes
"cpu" and their loader's two worker processes run in-process.

``--mom2-update-weight``: MEMIT's λ (15000 in its files) also weighs the corpus term against the new facts;
on the 128-wide small model 15000 leaves the edit too weak to move the answers, 100 moves them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _reference_code import (  # noqa: E402
    BOS_SHIM,
    CPU_SHIMS,
    STATS_VARIANTS,
    TRANSFORMERS_SHIMS,
    Patch,
    checkout,
    datasets_stand_in,
    measure,
    prepare,
    small_model_requests,
    timing_table,
    working_folder,
)

import zu_fast  # noqa: E402
from zu_fast.eval import tinylm  # noqa: E402

LAYERS = [1, 2, 3]  # the small model's preset layers (zu_fast.UnlearnConfig.preset("zu-tiny"))
MODULE = "model.layers.{}.mlp.down_proj"

STATS_DROP_IN = Patch("memit/memit_main.py", "from rome.layer_stats import layer_stats",
                      "from zu_fast.compat import layer_stats", "drop-in 1: zu_fast's statistics function")
OP_DROP_IN = [
    Patch("util/runningstats.py", "from torch.utils.data.sampler import Sampler",
          "from torch.utils.data.sampler import Sampler\nfrom zu_fast import ops as _zu_ops",
          "drop-in 2 (import)"),
    Patch("util/runningstats.py", "        self.mom2 += a.t().mm(a)",
          "        _zu_ops.cov_accumulate(self.mom2, a.new_zeros(a.shape[1]), torch.zeros((), dtype=torch.int64, "
          "device=a.device), a); _zu_ops.symmetrize_upper_(self.mom2)",
          "drop-in 2: zu_fast's statistics op in their SecondMoment.add"),
]
def memit_hparams(hparams_cls, corpus: str, n_samples: int, lam: float = 15000):
    """MEMIT's hparams for the small model (its own GPT-J file's values; the small model's layers and names)."""
    return hparams_cls(
        layers=LAYERS, layer_selection="all", fact_token="subject_last", v_num_grad_steps=25, v_lr=5e-1,
        v_loss_layer=5, v_weight_decay=0.5, clamp_norm_factor=0.75, kl_factor=0.0625, mom2_adjustment=True,
        mom2_update_weight=lam, rewrite_module_tmp=MODULE, layer_module_tmp="model.layers.{}",
        mlp_module_tmp="model.layers.{}.mlp", attn_module_tmp="model.layers.{}.self_attn", ln_f_module="model.norm",
        lm_head_module="lm_head", mom2_dataset=corpus, mom2_n_samples=n_samples, mom2_dtype="float32")


def small_model(cpu: bool):
    model, tok, world = tinylm.load_or_train(progress=False)
    model.to("cpu" if cpu else "cuda")  # where their code puts its tensors
    model.config.n_embd = model.config.hidden_size  # MEMIT's compute_z reads GPT-2's name for the width
    model.config.n_positions = model.config.max_position_embeddings  # and its layer_stats GPT-2's context
    return model, tok, world


def answer_prob(model, tok, prompt: str, answer: str) -> float:
    """P(first token of `answer` | prompt)."""
    ids = tok(prompt, return_tensors="pt")
    first = tok(" " + answer, add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        return float(model(**ids).logits[0, -1].softmax(-1)[first])


def run_edit(src: Path, cpu: bool, n: int, lam: float, one_pass: bool) -> None:
    """MEMIT's apply_memit_to_model, unchanged but for the statistics drop-in, editing n facts of the small model."""
    datasets_stand_in()
    root = prepare(src, ["memit", "rome", "util"], [STATS_DROP_IN, BOS_SHIM, *TRANSFORMERS_SHIMS, *CPU_SHIMS], cpu=cpu)
    model, tok, world = small_model(cpu)
    corpus = root / "corpus.txt"
    corpus.write_text("".join(t + "\n" for t in world.training_texts()))
    requests = small_model_requests(world, n)
    with working_folder(root):
        from memit import MEMITHyperParams, apply_memit_to_model, memit_main

        hp = memit_hparams(MEMITHyperParams, str(corpus), 100_000, lam)
        t0 = time.perf_counter()
        if one_pass:  # drop-in 1b: every layer's statistics in one pass, their per-layer get_cov answered from it
            cfg = zu_fast.UnlearnConfig.for_model(model, layers=hp.layers, rewrite_module_tmp=hp.rewrite_module_tmp)
            memit_main.layer_stats = zu_fast.compat.layer_stats_from(zu_fast.collect_stats(model, tok, corpus, cfg))
        before = [(answer_prob(model, tok, r["prompt"].format(r["subject"]), r["target_true"]["str"]),
                   answer_prob(model, tok, r["prompt"].format(r["subject"]), r["target_new"]["str"])) for r in requests]
        model, orig = apply_memit_to_model(model, tok, requests, hp, return_orig_weights=True)
        seconds = time.perf_counter() - t0
        params = dict(model.named_parameters())
        moved = {n: float((params[n].detach() - w).norm() / w.norm()) for n, w in orig.items()}
        print("relative weight change per edited layer: " + ", ".join(f"{n}: {v:.3f}" for n, v in moved.items()))
    how = "one pass, drop-in 1b" if one_pass else f"per layer, drop-in 1, cached under {root / 'data' / 'stats'}"
    print(f"\nMEMIT edited {len(requests)} facts in {seconds:.1f} s (statistics included) with zu_fast's statistics "
          f"({how}; a second run reads them from zu_fast's cache):")
    print("| prompt | true answer: P before → after | new answer: P before → after |\n|---|---|---|")
    for r, (pt, pn) in zip(requests, before):
        text = r["prompt"].format(r["subject"])
        true, new = r["target_true"]["str"], r["target_new"]["str"]
        print(f"| {text} | {true}: {pt:.2f} → {answer_prob(model, tok, text, true):.2f} "
              f"| {new}: {pn:.2f} → {answer_prob(model, tok, text, new):.2f} |")
    with torch.no_grad():  # their weights_copy: the model as it was
        for name, w in orig.items():
            dict(model.named_parameters())[name][...] = w


def time_one(src: Path, cpu: bool, variant: str, repeats: int, out: Path) -> None:
    """One variant of the statistics (``_reference_code.measure``), in its own process."""
    torch.set_num_threads(1)
    datasets_stand_in()
    patches = (OP_DROP_IN if variant == "theirs+op" else []) + [BOS_SHIM, *TRANSFORMERS_SHIMS, *CPU_SHIMS]
    root = prepare(src, ["memit", "rome", "util"], patches, cpu=cpu, show=False)
    model, tok, world = small_model(cpu)
    with working_folder(root):
        import rome.layer_stats as their

        torch.save(measure(variant, their, model, tok, world.training_texts(), LAYERS, MODULE, root, repeats), out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkout", "--memit", dest="checkout", default=None, help="MEMIT checkout (or MEMIT_PATH)")
    ap.add_argument("--n", type=int, default=5, help="facts MEMIT edits (default 5)")
    ap.add_argument("--mom2-update-weight", type=float, default=15000,
                    help="MEMIT's λ (its files: 15000; the 128-wide small model needs less for a visible edit)")
    ap.add_argument("--per-layer", action="store_true",
                    help="drop-in 1 (one statistics pass per layer, as their get_cov asks) instead of 1b (one pass)")
    ap.add_argument("--time", action="store_true", help="time the statistics: theirs vs zu_fast's")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cpu", action="store_true", help="apply the CPU shims even with a GPU present")
    ap.add_argument("--time-one", default=None, choices=list(STATS_VARIANTS), help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    src = checkout(args.checkout, "MEMIT_PATH", "memit/memit_main.py")
    cpu = args.cpu or not torch.cuda.is_available()
    if args.time_one:
        time_one(src, cpu, args.time_one, args.repeats, Path(args.out))
    elif args.time:
        timing_table(__file__, src, cpu, args.repeats, "MEMIT", LAYERS, MODULE,
                     len(tinylm.load_or_train(progress=False)[2].training_texts()))
    else:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        run_edit(src, cpu, args.n, args.mom2_update_weight, not args.per_layer)


if __name__ == "__main__":
    main()
