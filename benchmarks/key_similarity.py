"""How alike are a subject's keys in the forget prompt and in its paraphrases? Per world and decoder layer, the
mean cosine between the layer's output at the subject's last token in the request's prompt and in each
paraphrase prompt (issue 22: why an edit that forgets the prompt does not forget its paraphrases).

    OMP_NUM_THREADS=1 python benchmarks/key_similarity.py --worlds people,species --n 20 --seed 0

An edit reads its key at that position (``templates.fact_token="subject_last"``); where the paraphrases' keys
point elsewhere, the edit does not fire on them, whatever the targets.
"""

from __future__ import annotations

import argparse
import statistics
import warnings

import torch

from zu_fast.eval import tinylm, worlds
from zu_fast.model import padded_batch, subject_spans


def similarity(world_name: str, n: int, seed: int) -> tuple[list[float], str]:
    model, tok, world = tinylm.load_or_train(worlds.tinylm_config(world_name), progress=False)
    per_layer: list[list[float]] = [[] for _ in range(model.config.num_hidden_layers)]
    records = world.records(n, seed)
    for r in records:
        # the request's prompt first, then its paraphrases (full strings: the subject becomes "{}" again)
        templates = [r["prompt"]] + [p.replace(r["subject"], "{}", 1) for p in r["paraphrase_prompts"]]
        ids, idx = subject_spans(tok, templates, [r["subject"]] * len(templates))
        with torch.no_grad():
            hidden = model(**padded_batch(tok, ids, "cpu"), output_hidden_states=True).hidden_states
        rows = torch.arange(len(ids))
        for layer in range(len(per_layer)):
            h = hidden[layer + 1][rows, torch.tensor(idx)]  # [1 + paraphrases, d] layer output at the subject
            per_layer[layer].append(float(torch.nn.functional.cosine_similarity(h[:1], h[1:], dim=1).mean()))
    example = f"{records[0]['prompt']!r} vs {records[0]['paraphrase_prompts'][:2]}"
    return [statistics.fmean(v) for v in per_layer], example


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worlds", default="people,species")
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    results = {w: similarity(w, args.n, args.seed) for w in args.worlds.split(",")}
    depth = max(len(v[0]) for v in results.values())
    print("| world | " + " | ".join(f"layer {i}" for i in range(depth)) + " |")
    print("|---|" + "---:|" * depth)
    for w, (cos, _) in results.items():
        print(f"| {w} | " + " | ".join(f"{c:.3f}" for c in cos) + " |" * (1 + depth - len(cos)))
    for w, (_, example) in results.items():
        print(f"\n{w}: e.g. {example}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
