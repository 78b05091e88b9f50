"""Measure savings in steps 2 and 3 before adopting them (issue 25): what each changes in the edit, what it saves.

    OMP_NUM_THREADS=1 python benchmarks/step_savings.py --case tinylm [--world people|species] [--metrics]
                                                        [--what warm,reuse,templates,orig] [--for-model]

Every variant runs zu_fast's ``unlearn`` (closed form, the paper's settings, as ``vs_reference.py``) on the same
statistics and is compared with the default run: the edit's work in token-layer evaluations (forward + backward,
padded: ``work_count.py``), its step-3 steps, how far its weights are from the default's (‖W − W_def‖ / ‖W_def −
W₀‖ summed over the layers, "ΔW vs default"), the z gap it closed (report), and with ``--metrics`` the world's
efficacy / generalization / specificity / perplexity.

- ``warm``: step 3 at layer l_{j+1} starts from layer l_j's δ (``optimize_deltas(init=…)``), not from 0.
- ``reuse``: no variant; the work of each optimisation's clean forward (the δ = 0 pass every optimisation starts
  with), i.e. the most that sharing step 2's forward rows and KL distribution with step 3 could save.
- ``templates``: fewer context templates (the bare prompt and the first k of the other type).
- ``orig``: ``original_representation="clean"`` (no step 3 optimisation) against ``"optimized"``;
  ``--for-model`` runs only this comparison, on ``UnlearnConfig.for_model``'s defaults instead of the paper's.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import vs_reference as vr  # noqa: E402
from work_count import Work, WorkCounter  # noqa: E402


def world_case(world: str, n_texts: int, n_requests: int, layers=(1, 2, 3)) -> vr.Case:
    """``vs_reference.tinylm_case`` for any named world (its model trained and cached once)."""
    import zu_fast
    from zu_fast.eval import tinylm, worlds
    from zu_fast.method.templates import context_templates

    model, tok, w = tinylm.load_or_train(worlds.tinylm_config(world), progress=False)
    model.eval()
    model.config._name_or_path = f"zu_{world}_case"
    records = w.records(n_requests, seed=0)
    reqs = [{"prompt": r["prompt"], "subject": r["subject"], "target_true": r["target_true"]["str"]} for r in records]
    cfg = zu_fast.UnlearnConfig(layers=list(layers), progress=False)
    return vr.Case(world, model, tok, w.training_texts()[:n_texts], reqs, context_templates(model, tok, cfg),
                   list(layers), records, w.heldout_texts())


def edit_work(run: dict) -> Work:
    return sum((w for k, w in run["work"].items() if k != "statistics"), Work())


def step3_steps(run: dict) -> str:
    rows = run["report"].get("layers", {})
    return "/".join(f"{float(r.get('orig_steps_mean', float('nan'))):.1f}" for r in rows.values())


def gap(run: dict) -> float:
    rep = run["report"]
    for where in (rep, rep.get("targets", {})):
        if isinstance(where, dict) and "z_gap_closed" in where:
            return float(where["z_gap_closed"])
    for f in rep.get("flags", []):
        if isinstance(f, dict) and f.get("z_gap_closed") is not None:
            return float(f["z_gap_closed"])
    return float("nan")


def dw(run: dict, base: dict) -> float:
    out = 0.0
    for layer, r in run["layers"].items():
        b = base["layers"][layer]
        out += float((r["W_after"].double() - b["W_after"].double()).norm()
                     / (b["W_after"].double() - b["W_before"].double()).norm().clamp_min(1e-30))
    return out


def row(name: str, run: dict, base: dict, case: vr.Case, metrics: bool) -> str:
    w, wb = edit_work(run), edit_work(base)
    cells = [name, f"{w.padded / 1e3:.1f}k", f"{w.padded / wb.padded:.3f}", step3_steps(run), f"{dw(run, base):.2e}",
             f"{gap(run):.3f}", f"{run['edit']:.2f}"]
    if metrics:
        m = vr.edited_metrics(case, run)
        cells += [f"{m['efficacy']:.1f}", f"{m['generalization']:.1f}", f"{m['specificity']:.1f}",
                  f"{m['perplexity']:.3f}"]
    return "| " + " | ".join(cells) + " |"


def header(metrics: bool) -> str:
    cols = ["variant", "edit work (padded)", "vs default", "step-3 steps per layer", "ΔW vs default", "z gap closed",
            "edit s"] + (["Eff ↓", "Gen ↓", "Spe ↑", "PPL"] if metrics else [])
    return "| " + " | ".join(cols) + " |\n|---" + "|---:" * (len(cols) - 1) + "|"


def warm_run(case: vr.Case, stats) -> dict:
    """Step 3 at each layer after the first starts from the previous layer's δ."""
    un = sys.modules["zu_fast.method.unlearn"]
    cold = un.original_basis
    prev: dict = {}

    def warm(model, tok, reqs, cfg, templates, layer, true_ids, clean, device):
        res = un.optimize_deltas(model, tok, reqs, cfg, templates, layer, true_ids, at_module=True,
                                 desc=f"original repr. layer {layer}", init=prev.get("delta"))
        prev["delta"] = res.delta
        info = {"orig_delta_rel": float((res.delta.norm(dim=1) / res.h_init.norm(dim=1).clamp_min(1e-12)).mean()),
                "orig_steps_mean": float(res.steps.float().mean())}
        return un.representation_basis(res.target.to(clean.device).t().to(device),
                                              cfg.representation.basis_rtol), info

    un.original_basis = warm
    try:
        return vr.run_zu_fast(case, "closed_form", stats=stats)
    finally:
        un.original_basis = cold


def for_model_run(case: vr.Case, stats, **overrides) -> dict:
    """``unlearn`` with ``UnlearnConfig.for_model``'s defaults (what users get), in ``vs_reference``'s result form."""
    import copy
    import time

    import zu_fast
    from zu_fast.model import get_module

    model = copy.deepcopy(case.model)
    cfg = zu_fast.UnlearnConfig.for_model(model, progress=False, **overrides)
    names = {layer: cfg.locate.rewrite_module.format(layer) for layer in cfg.layers}
    before = {layer: get_module(model, n).weight.detach().clone() for layer, n in names.items()}
    counter = WorkCounter(model, cfg.locate.layer_module, case.n_layers)
    t0 = time.perf_counter()
    with counter, counter.phase("edit"):
        edit = zu_fast.unlearn(model, case.tok, case.requests, cfg, stats=stats, context_templates=case.templates)
    return {"work": dict(counter.work), "edit": time.perf_counter() - t0, "report": edit.report.to_dict(),
            "layers": {layer: {"W_before": before[layer].float(),
                               "W_after": get_module(model, n).weight.detach().float().clone()}
                       for layer, n in names.items()}}


def reuse_table(case: vr.Case, stats) -> str:
    """Each optimisation's clean forward (δ = 0, full prompts, every layer) against the optimisation's work."""
    from zu_fast.method import targets

    original = targets._clean_forward
    seen: list[tuple[int, int]] = []

    def counted(model, cfg, full, *a, **k):
        mask = full.batch["attention_mask"]
        seen.append((int(mask.sum()), mask.numel()))
        return original(model, cfg, full, *a, **k)

    targets._clean_forward = counted
    try:
        run = vr.run_zu_fast(case, "closed_form", stats=stats)
    finally:
        targets._clean_forward = original
    n_layers = case.n_layers
    phases = ["targets", *[f"step3 L{layer}" for layer in case.layers]]
    lines = ["| optimisation | its work (padded, fwd + bwd) | clean forward (padded) | share |", "|---|---:|---:|---:|"]
    for ph, (_, padded) in zip(phases, seen):
        w = run["work"].get(ph, Work())
        lines.append(f"| {ph} | {w.padded / 1e3:.1f}k | {padded * n_layers / 1e3:.1f}k | "
                     f"{padded * n_layers / max(w.padded, 1):.2f} |")
    keys = run["work"].get("keys", Work())
    lines.append(f"\nkeys readings (every layer's, and the check after the edit): {keys.padded / 1e3:.1f}k padded; "
                 f"edit total {edit_work(run).padded / 1e3:.1f}k.")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--case", default="tinylm", choices=["golden", "tinylm"])
    p.add_argument("--world", default="people", help="tinylm: the world (people, species)")
    p.add_argument("--texts", type=int, default=2000)
    p.add_argument("--requests", type=int, default=10)
    p.add_argument("--what", default="warm,reuse,templates,orig")
    p.add_argument("--metrics", action="store_true")
    p.add_argument("--for-model", action="store_true",
                   help="orig only: UnlearnConfig.for_model's defaults instead of the paper's settings")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    import zu_fast

    case = vr.golden_case(200) if args.case == "golden" else world_case(args.world, args.texts, args.requests)
    metrics = args.metrics and bool(case.records)
    cfg = vr.zu_config("closed_form", case.layers, case.n_layers)
    if args.for_model:
        cfg = zu_fast.UnlearnConfig.for_model(case.model, progress=False)
        case = dataclasses.replace(case, layers=list(cfg.layers))
    stats = zu_fast.collect_stats(case.model, case.tok, case.texts, cfg, cache=False, progress=False)
    what = args.what.split(",")
    print(f"case {case.name}: {case.n_layers} layers, d {case.model.config.hidden_size}, {len(case.texts)} texts, "
          f"{len(case.requests)} requests, layers {case.layers}, templates {[len(g) for g in case.templates]}; "
          f"{vr.machine()}\n", flush=True)
    if args.for_model:  # only the original representation's source, on the defaults users get
        base = for_model_run(case, stats, original_representation="optimized")
        clean = for_model_run(case, stats, original_representation="clean")
        print(f"UnlearnConfig.for_model defaults (layers {case.layers}, method {cfg.method}, its own "
              f"original_representation {cfg.representation.source!r})\n")
        print("\n".join([header(metrics), row('original_representation="optimized"', base, base, case, metrics),
                          row('original_representation="clean"', clean, base, case, metrics)]))
        print(f"\nafter: {vr.machine()}")
        return 0
    base = vr.run_zu_fast(case, "closed_form", stats=stats)
    lines = [header(metrics), row("default (optimized, cold start, all templates)", base, base, case, metrics)]
    if "warm" in what:
        lines.append(row("step 3 warm-started from the previous layer's δ", warm_run(case, stats), base, case, metrics))
    if "orig" in what:
        clean = vr.run_zu_fast(case, "closed_form", stats=stats, overrides={"original_representation": "clean"})
        lines.append(row('original_representation="clean"', clean, base, case, metrics))
    if "templates" in what:
        for k in range(len(case.templates[1]) - 1, -1, -1) if len(case.templates) > 1 else []:
            fewer = dataclasses.replace(case, templates=[case.templates[0], case.templates[1][:k]] if k else
                                        [case.templates[0]])
            lines.append(row(f"templates: bare + {k} of {len(case.templates[1])}",
                             vr.run_zu_fast(fewer, "closed_form", stats=stats), base, case, metrics))
    print("\n".join(lines), flush=True)
    if "reuse" in what:
        print("\n" + reuse_table(case, stats))
    print(f"\nafter: {vr.machine()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
