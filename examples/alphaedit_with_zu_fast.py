"""AlphaEdit's own code (jianghoucheng/AlphaEdit) running on zu_fast's statistics and op, on the small model.

AlphaEdit cannot be committed here; point the script at a checkout (nothing in it is modified: the
folders it needs are copied and the changed lines printed as a diff first):

    ALPHAEDIT_PATH=/path/to/AlphaEdit python examples/alphaedit_with_zu_fast.py          # 2 batches of 3 edits
    ALPHAEDIT_PATH=/path/to/AlphaEdit python examples/alphaedit_with_zu_fast.py --time   # statistics: theirs vs ours

AlphaEdit projects each update onto the null space of the corpus keys' second moment C (``P`` from the
SVD of ``get_cov``, their ``experiments/evaluate.py: get_project``) and keeps the keys of earlier edits in
``cache_c`` for sequential editing. The drop-ins:

1. the statistics function, one line in ``AlphaEdit/AlphaEdit_main.py`` (``get_cov`` calls it per layer;
   ``get_project`` takes C from it)::

       -from rome.layer_stats import layer_stats
       +from zu_fast.compat import layer_stats

1b. or every layer in ONE pass (one line at run time)::

       AlphaEdit_main.layer_stats = zu_fast.compat.layer_stats_from(zu_fast.collect_stats(model, tok, corpus, cfg))

2. the accumulation op, where AlphaEdit adds the edited keys' K Kᵀ to ``cache_c`` after each batch
   (``AlphaEdit/AlphaEdit_main.py``; plus the import)::

       -        cache_c[i,:,:] += layer_ks.cpu() @ layer_ks.cpu().T
       +        _zu_ops.cov_accumulate(cache_c[i], ..., layer_ks.T.cpu()); _zu_ops.symmetrize_upper_(cache_c[i])

   and in their statistics pipeline (``util/runningstats.py``, ``SecondMoment.add``) as in the MEMIT example.

``zu_fast.ops.multiplicative_update_`` is not a drop-in: AlphaEdit's update ``W += ΔW`` is additive (ΔW is
not a left multiple of the wider-than-tall down_proj W). Shims, not drop-ins (``_reference_code.py``):
``output[0]`` of a decoder layer reads the tensor transformers now returns; without a GPU, "cuda" becomes
"cpu" and their loader's worker processes run in-process. ``get_project`` is taken from their
``experiments/evaluate.py`` by its source (that module imports every baseline and GLUE at import time).
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
    CPU_SHIMS,
    STATS_VARIANTS,
    TRANSFORMERS_SHIMS,
    Patch,
    checkout,
    datasets_stand_in,
    function_from,
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
FOLDERS = ["AlphaEdit", "rome", "util"]

STATS_DROP_IN = Patch("AlphaEdit/AlphaEdit_main.py", "from rome.layer_stats import layer_stats",
                      "from zu_fast.compat import layer_stats", "drop-in 1: zu_fast's statistics function")
CACHE_C_DROP_IN = [
    Patch("AlphaEdit/AlphaEdit_main.py", "from util import nethook",
          "from util import nethook\nfrom zu_fast import ops as _zu_ops", "drop-in 2 (import)"),
    Patch("AlphaEdit/AlphaEdit_main.py", "        cache_c[i,:,:] += layer_ks.cpu() @ layer_ks.cpu().T",
          "        _zu_ops.cov_accumulate(cache_c[i], torch.zeros(cache_c.shape[-1]), torch.zeros((), "
          "dtype=torch.int64), layer_ks.T.cpu().float()); _zu_ops.symmetrize_upper_(cache_c[i])",
          "drop-in 2: zu_fast's statistics op for the edited keys (cache_c += K Kᵀ)"),
]
OP_DROP_IN = [
    Patch("util/runningstats.py", "from torch.utils.data.sampler import Sampler",
          "from torch.utils.data.sampler import Sampler\nfrom zu_fast import ops as _zu_ops", "drop-in 2 (import)"),
    Patch("util/runningstats.py", "        self.mom2 += a.t().mm(a)",
          "        _zu_ops.cov_accumulate(self.mom2, a.new_zeros(a.shape[1]), torch.zeros((), dtype=torch.int64, "
          "device=a.device), a); _zu_ops.symmetrize_upper_(self.mom2)",
          "drop-in 2: zu_fast's statistics op in their SecondMoment.add"),
]


def alphaedit_hparams(hparams_cls, corpus: str, n_samples: int, l2: float):
    """AlphaEdit's hparams for the small model (its Llama3-8B file's values; the small model's layers and names)."""
    return hparams_cls(
        model_name="zu-tiny-llama", layers=LAYERS, layer_selection="all", fact_token="subject_last",
        v_num_grad_steps=25, v_lr=5e-1, v_loss_layer=5, v_weight_decay=0.5, clamp_norm_factor=0.75, kl_factor=0.0625,
        mom2_adjustment=True, mom2_update_weight=15000, rewrite_module_tmp=MODULE, layer_module_tmp="model.layers.{}",
        mlp_module_tmp="model.layers.{}.mlp", attn_module_tmp="model.layers.{}.self_attn", ln_f_module="model.norm",
        lm_head_module="lm_head", mom2_dataset=corpus, mom2_n_samples=n_samples, mom2_dtype="float32",
        nullspace_threshold=2e-2, L2=l2)


def small_model(cpu: bool):
    model, tok, world = tinylm.load_or_train(progress=False)
    return model.to("cpu" if cpu else "cuda"), tok, world


def answer_prob(model, tok, prompt: str, answer: str) -> float:
    """P(first token of `answer` | prompt)."""
    ids = tok(prompt, return_tensors="pt").to(model.device)
    first = tok(" " + answer, add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        return float(model(**ids).logits[0, -1].softmax(-1)[first])


def run_edit(src: Path, cpu: bool, n: int, batches: int, l2: float, one_pass: bool) -> None:
    """AlphaEdit's own sequential loop (as its evaluate.py runs it): P from get_project, then apply_AlphaEdit_to_model
    per batch with cache_c carried over; unchanged but for the drop-ins."""
    datasets_stand_in()
    root = prepare(src, FOLDERS, [STATS_DROP_IN, *CACHE_C_DROP_IN, *TRANSFORMERS_SHIMS, *CPU_SHIMS], cpu=cpu)
    model, tok, world = small_model(cpu)
    corpus = root / "corpus.txt"
    corpus.write_text("".join(t + "\n" for t in world.training_texts()))
    requests = small_model_requests(world, n * batches)
    with working_folder(root):
        from AlphaEdit import AlphaEdit_main
        from AlphaEdit.AlphaEdit_hparams import AlphaEditHyperParams

        hp = alphaedit_hparams(AlphaEditHyperParams, str(corpus), 100_000, l2)
        t0 = time.perf_counter()
        if one_pass:  # drop-in 1b
            cfg = zu_fast.UnlearnConfig.for_model(model, layers=hp.layers, rewrite_module_tmp=hp.rewrite_module_tmp)
            AlphaEdit_main.layer_stats = zu_fast.compat.layer_stats_from(zu_fast.collect_stats(model, tok, corpus, cfg))
        get_project = function_from(src / "experiments" / "evaluate.py", "get_project",
                                    {"get_cov": AlphaEdit_main.get_cov, "torch": torch})
        d_in = model.get_submodule(MODULE.format(LAYERS[-1])).weight.shape[1]
        P = torch.zeros((len(LAYERS), d_in, d_in))  # as their evaluate.py builds P and cache_c for Llama
        cache_c = torch.zeros((len(LAYERS), d_in, d_in))
        for i, layer in enumerate(LAYERS):
            P[i] = get_project(model, tok, layer, hp)
        t_stats = time.perf_counter() - t0
        originals = {MODULE.format(la) + ".weight": model.get_submodule(MODULE.format(la)).weight.detach().clone()
                     for la in LAYERS}
        before = [(answer_prob(model, tok, r["prompt"].format(r["subject"]), r["target_true"]["str"]),
                   answer_prob(model, tok, r["prompt"].format(r["subject"]), r["target_new"]["str"])) for r in requests]
        for b in range(batches):
            model, cache_c = AlphaEdit_main.apply_AlphaEdit_to_model(model, tok, requests[b * n:(b + 1) * n], hp,
                                                                     cache_c=cache_c, P=P)
        seconds = time.perf_counter() - t0
    how = "one pass, drop-in 1b" if one_pass else "per layer, drop-in 1"
    print(f"\nAlphaEdit edited {len(requests)} facts in {batches} sequential batches in {seconds:.1f} s (statistics "
          f"and projectors {t_stats:.1f} s: {how}); cache_c holds the keys of every edit (drop-in 2), trace "
          f"{[round(float(c.trace()), 2) for c in cache_c]}")
    print("| prompt | true answer: P before → after | new answer: P before → after |\n|---|---|---|")
    for r, (pt, pn) in zip(requests, before):
        text = r["prompt"].format(r["subject"])
        true, new = r["target_true"]["str"], r["target_new"]["str"]
        print(f"| {text} | {true}: {pt:.2f} → {answer_prob(model, tok, text, true):.2f} "
              f"| {new}: {pn:.2f} → {answer_prob(model, tok, text, new):.2f} |")
    with torch.no_grad():
        for name, w in originals.items():
            dict(model.named_parameters())[name][...] = w


def time_one(src: Path, cpu: bool, variant: str, repeats: int, out: Path) -> None:
    """One variant of the statistics (``_reference_code.measure``), in its own process."""
    torch.set_num_threads(1)
    datasets_stand_in()
    patches = (OP_DROP_IN if variant == "theirs+op" else []) + [*TRANSFORMERS_SHIMS, *CPU_SHIMS]
    root = prepare(src, FOLDERS, patches, cpu=cpu, show=False)
    model, tok, world = small_model(cpu)
    with working_folder(root):
        import rome.layer_stats as their

        torch.save(measure(variant, their, model, tok, world.training_texts(), LAYERS, MODULE, root, repeats), out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkout", "--alphaedit", dest="checkout", default=None,
                    help="AlphaEdit checkout (or ALPHAEDIT_PATH)")
    ap.add_argument("--n", type=int, default=3, help="facts per batch (default 3)")
    ap.add_argument("--batches", type=int, default=2, help="sequential batches (default 2)")
    ap.add_argument("--l2", type=float, default=10.0,
                    help="AlphaEdit's L2 (its Llama3-8B file: 10; the 128-wide small model needs ~0.1 to move answers)")
    ap.add_argument("--per-layer", action="store_true", help="drop-in 1 (a pass per layer) instead of 1b (one pass)")
    ap.add_argument("--time", action="store_true", help="time the statistics: theirs vs zu_fast's")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cpu", action="store_true", help="apply the CPU shims even with a GPU present")
    ap.add_argument("--time-one", default=None, choices=list(STATS_VARIANTS), help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    src = checkout(args.checkout, "ALPHAEDIT_PATH", "AlphaEdit/AlphaEdit_main.py")
    cpu = args.cpu or not torch.cuda.is_available()
    if args.time_one:
        time_one(src, cpu, args.time_one, args.repeats, Path(args.out))
    elif args.time:
        timing_table(__file__, src, cpu, args.repeats, "AlphaEdit", LAYERS, MODULE,
                     len(tinylm.load_or_train(progress=False)[2].training_texts()))
    else:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        run_edit(src, cpu, args.n, args.batches, args.l2, not args.per_layer)


if __name__ == "__main__":
    main()
