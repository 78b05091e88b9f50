"""Baseline of today's ``for_model`` defaults on a world they were never tuned on (issue 22, item 2).

Runs ``zu-fast eval`` (the harness, unchanged) for the closed form and GD and prints one markdown row per
(method, seed) with Eff / Gen / Spe / PPL beside the unedited model's, the targets' converged fraction,
z loss before → after, mean target steps, ``z_gap_closed`` and the flags raised.

    python benchmarks/second_world_baseline.py --world species --seeds 0,1,2,3 --out OUT
    python benchmarks/second_world_baseline.py --world people --untag --seeds 0,1 --out OUT

``--untag`` removes the ``zu_fast_model`` tag from the loaded model's config (the cached weights are not
touched), so ``UnlearnConfig.for_model`` gives the generic Llama defaults instead of the zu-tiny preset.

The harness builds one config, ``for_model(model)`` (the closed form on a model the project did not tune),
and runs GD as ``cfg.replace(method="gd")``: ``for_model`` leaves the target retry (``target_retry_clamp``)
out of a closed-form config, so the harness's GD runs without it. ``--gd-for-model`` runs GD with
``for_model(model, method="gd")`` instead (what a user asking for GD gets, with the retry); its rows are
labelled ``gd (method=gd)``. ``--set '{"v_num_grad_steps": 100}'`` replaces config fields for both methods
(a diagnostic, not a default: which part fails when the targets converge?); rows name the fields.
``--table OUT/results.json ...`` only prints the rows of finished runs.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from pathlib import Path

HEAD = ("| world | method | seed | Eff (base) | Gen (base) | Spe (base) | PPL (base) | z conv. | "
        "z loss init → final | z steps | z_gap_closed | flags |")


def rows(path: Path, label: str) -> list[str]:
    """Markdown rows of one harness ``results.json``."""
    data = json.loads(path.read_text())
    gd_name = "gd (method=gd)" if data["meta"].get("gd_for_model") else "gd"
    extra = ", ".join(f"{k}={v}" for k, v in (data["meta"].get("set") or {}).items())
    base = {(r["n"], r["seed"]): r for r in data["runs"] if r["method"] == "base" and "error" not in r}
    out = []
    for r in data["runs"]:
        if r["method"] == "base":
            continue
        if "error" in r:
            out.append(f"| {label} | {r['method']} n={r['n']} | {r['seed']} | error: {r['error']} |")
            continue
        b = base.get((r["n"], r["seed"]), {})
        t = r["report"].get("targets", {})
        flags = Counter(f["kind"] for f in r["report"].get("flags", []))

        def num(key: str, digits: int, src: dict = t) -> str:
            v = src.get(key, math.nan)
            return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"

        name = (gd_name if r["method"] == "gd" else r["method"]) + (f", {extra}" if extra else "")
        cells = [label, f"{name} n={r['n']}", str(r["seed"])]
        for key, dg in (("efficacy", 1), ("generalization", 1), ("specificity", 1), ("perplexity", 3)):
            cells.append(f"{num(key, dg, r)} ({num(key, dg, b)})")
        n_req = r["report"].get("n_requests") or r["n"]
        conv = t.get("z_converged_frac")
        cells.append("–" if conv is None else f"{round(conv * n_req)}/{n_req}")
        cells.append(f"{num('z_loss_initial', 2)} → {num('z_loss_final', 2)}")
        cells.append(num("z_steps_mean", 1))
        cells.append(num("z_gap_closed", 2))
        cells.append(", ".join(f"{k} ×{v}" for k, v in sorted(flags.items())) or "–")
        out.append("| " + " | ".join(cells) + " |")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", default="species", choices=["people", "species"])
    p.add_argument("--untag", action="store_true", help="drop the zu-tiny tag: for_model's generic defaults")
    p.add_argument("--methods", default="zeroUnlearn,gd")
    p.add_argument("--n", default="10")
    p.add_argument("--seeds", default="0,1,2,3")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="second_world_baseline")
    p.add_argument("--gd-for-model", action="store_true",
                   help="GD with for_model(model, method='gd') (with the retry) instead of the harness's replace()")
    p.add_argument("--set", default=None, metavar="JSON", help="UnlearnConfig fields replaced for every method")
    p.add_argument("--table", nargs="*", default=None, metavar="RESULTS_JSON", help="only print rows of these files")
    args = p.parse_args()
    if args.table is not None:
        print(HEAD + "\n|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---|")
        for f in args.table:
            data = json.loads(Path(f).read_text())
            label = data["meta"].get("world", "?") + (" (untagged)" if data["meta"].get("untagged") else "")
            print("\n".join(rows(Path(f), label)))
        return 0

    from zu_fast.eval import harness, tinylm

    if args.untag:
        load = tinylm.load_or_train

        def load_untagged(*a, **k):
            model, tok, world = load(*a, **k)
            if hasattr(model.config, "zu_fast_model"):
                del model.config.zu_fast_model  # the loaded copy only; the cache is untouched
            return model, tok, world

        tinylm.load_or_train = load_untagged
    # --set first, so that --gd-for-model's config (installed around it) gets the replaced fields too
    if args.set:
        over = json.loads(args.set)
        if "layers" in over:
            raise SystemExit("--set cannot change the layers (the statistics are collected for for_model's)")
        run_plain = harness._Runner.run

        def run_with(self, method, records):
            saved = self.cfg
            self.cfg = self.cfg.replace(**over)
            try:
                return run_plain(self, method, records)
            finally:
                self.cfg = saved

        harness._Runner.run = run_with
    if args.gd_for_model:
        run = harness._Runner.run

        def run_gd_for_model(self, method, records):
            if method != "gd":
                return run(self, method, records)
            import zu_fast

            saved = self.cfg  # same layers, so the statistics collected for it serve
            self.cfg = zu_fast.UnlearnConfig.for_model(self.model, method="gd", progress=False)
            try:
                return run(self, method, records)
            finally:
                self.cfg = saved

        harness._Runner.run = run_gd_for_model
    argv = ["--world", args.world, "--methods", args.methods, "--n", args.n, "--seeds", args.seeds,
            "--threads", str(args.threads), "--out", args.out, "--no-plot"]
    status = harness.main(argv)
    res = Path(args.out) / "results.json"
    data = json.loads(res.read_text())
    data["meta"]["untagged"] = args.untag
    data["meta"]["gd_for_model"] = args.gd_for_model
    data["meta"]["set"] = json.loads(args.set) if args.set else None
    res.write_text(json.dumps(data, indent=2, default=str))
    label = args.world + (" (untagged)" if args.untag else "")
    print(HEAD + "\n|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---|")
    print("\n".join(rows(res, label)))
    return status


if __name__ == "__main__":
    raise SystemExit(main())
