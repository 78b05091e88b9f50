"""``zu-fast eval``: ZeroUnlearn (closed form, GD) against the baselines on the synthetic world's small model.

For every method × n × seed: restore the model, unlearn ``world.records(n, seed)``, evaluate
(Efficacy/Generalization/Specificity/PPL and ES/PS/NS via :mod:`zu_fast.metrics`), time it.
Writes ``results.json`` (every run + aggregates + environment), ``results.md`` (mean ± std over seeds)
and ``results.png``. ``--sweep`` runs the sample-size sweep instead (closed form vs GD, quality and
time vs n) and writes ``sweep.{json,md,png}``.

Methods: ``base`` (no edit; always evaluated), ``zeroUnlearn`` (closed form), ``gd`` (ZeroUnlearn-GD),
``ga``, ``npo``, ``ft``, ``memit``, ``alphaedit`` (see :mod:`zu_fast.eval.baselines`).
Corpus statistics are collected once on the world's training texts (``collect_stats``; cached).

``--dataset FILE`` (CounterFact/MCF, ZsRE, MQuAKE; :mod:`zu_fast.eval.datasets`) runs the paper's
table instead: on ``--model DIR`` (default: the small model) with statistics over ``--corpus``,
every method on the same forget records (drawn from the file's second half per seed, as the
reference does), layers and statistics, scored by the reference's evaluation
(:func:`zu_fast.eval.reference_metrics.evaluate_dataset`), with time and peak memory per method.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import ZuFastError

METHOD_NAMES = {  # lower-case alias → canonical name
    "base": "base",
    "zerounlearn": "zeroUnlearn",
    "zu": "zeroUnlearn",
    "closed_form": "zeroUnlearn",
    "gd": "gd",
    "zerounlearn-gd": "gd",
    "ga": "ga",
    "npo": "npo",
    "ft": "ft",
    "memit": "memit",
    "alphaedit": "alphaedit",
}
METRICS = [  # key, column label, digits
    ("efficacy", "Eff ↓", 1),
    ("generalization", "Gen ↓", 1),
    ("specificity", "Spe ↑", 1),
    ("subject_other", "Subj-other ↑", 1),
    ("perplexity", "PPL ↓", 3),
    ("relearn_same_subject_back", "RL@20 same % back ↓", 0),
    ("relearn_unrelated_back", "RL@20 unrel. % back ↓", 0),
    ("es", "ES ↑", 1),
    ("ps", "PS ↑", 1),
    ("ns", "NS ↑", 1),
    ("seconds", "time (s)", 2),
]


DEFAULT_METHODS = "zeroUnlearn,gd,ga,npo,ft,alphaedit"
DEFAULT_N = "10,50"
# Relearning in the default table: fine-tuning steps on texts that never state a forgotten fact (eval/probes.py,
# relearn_probe), and the Efficacy gap below which "% back" is not reported (one record of ten moves it 100 points).
RELEARN_KINDS = ("same_subject", "unrelated")
RECOVERY_MIN_GAP = 30.0
# Retain prompts per other relation of a forgotten subject (--retain subject): its first trained phrasings; the
# Subject-other column measures its held-out phrasings, which the retain set never contains.
RETAIN_PER_RELATION = 2


def _ints(s: str, what: str = "--n", least: int = 1) -> list[int]:
    try:
        out = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise ZuFastError(f"{what}: expected comma-separated integers, got {s!r}") from None
    if not out or any(x < least for x in out):
        raise ZuFastError(f"{what}: expected integers ≥ {least}, got {s!r}")
    return out


def _methods(s: str) -> list[str]:
    out = []
    for x in s.split(","):
        x = x.strip()
        if not x:
            continue
        try:
            name = METHOD_NAMES[x.lower()]
        except KeyError:
            raise ZuFastError(f"--methods: unknown method {x!r}; choose from "
                              f"{sorted(set(METHOD_NAMES.values()))}") from None
        if name not in out:
            out.append(name)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zu-fast eval", description=__doc__.split("\n")[0])
    p.add_argument("--methods", default=None,
                   help="comma-separated: zeroUnlearn, gd, ga, npo, ft, memit, alphaedit (base is always added; "
                        f"default {DEFAULT_METHODS}, with --sweep zeroUnlearn,gd)")
    p.add_argument("--n", default=None,
                   help=f"comma-separated numbers of forget records (default {DEFAULT_N}, with --sweep 10..max)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated record-sampling seeds")
    p.add_argument("--out", default="zu_fast_eval", help="output folder")
    p.add_argument("--sweep", action="store_true",
                   help="sample-size sweep: closed form vs GD, quality and time vs n (--n defaults to 10..max)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--gd-steps", type=int, default=None, help="override UnlearnConfig.gd.steps")
    p.add_argument("--baseline-lr", type=float, default=None,
                   help="AdamW learning rate of GA / NPO / FT (default: BaselineHParams.lr)")
    p.add_argument("--baseline-epochs", type=int, default=None,
                   help="passes over the forget set for GA / NPO / FT (default: BaselineHParams.epochs)")
    from zu_fast.eval.worlds import WORLDS

    p.add_argument("--world", default="people", choices=sorted(WORLDS),
                   help="the synthetic world and its small model (zu_fast.eval.worlds): people (default; every "
                        "default was tuned here) or species (for checking only: another generator, an untagged "
                        "8-layer model that gets the generic for_model defaults; docs/second-world.md)")
    p.add_argument("--tinylm", default=None, metavar="JSON",
                   help="TinyLMConfig overrides for the --world's small model as JSON, e.g. "
                        '\'{"steps": 500, "world": {"n_people": 120}}\' (default: the default small model)')
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--probes", default=None, metavar="LIST",
                   help="robustness probes after each edit (zu_fast.eval.probes): comma-separated from quant, relearn, "
                        "lens, generate, multihop, or 'all'; writes robustness.{md,json,png} beside the quality table")
    p.add_argument("--relearn-steps", type=int, default=20, metavar="K",
                   help="relearning in the quality table: K fine-tuning steps on the forgotten subjects' other facts "
                        "and on unrelated facts, reported as %% of the forgotten facts back (0: off; default 20)")
    p.add_argument("--retain", default=None, choices=["subject"],
                   help="zeroUnlearn and gd get a retain set: 'subject' = the forgotten subjects' other facts in their "
                        f"first {RETAIN_PER_RELATION} trained phrasings per relation (Subject-other is measured on "
                        "their held-out phrasings, never retained)")
    p.add_argument("--merge", nargs="+", default=None, metavar="RESULTS_JSON",
                   help="merge the results.json of several runs (e.g. one process per --n) into one quality table "
                        "and one robustness table under --out; nothing is run")
    _add_dataset_arguments(p)
    return p


# --------------------------------------------------------------------------- running ------


def tinylm_config(spec: str | None, world: str = "people"):
    """The named world's TinyLMConfig with a JSON string of overrides (``world`` nested) applied, or None
    for the default small model (the people world, no overrides)."""
    if not spec and world == "people":
        return None
    from zu_fast.eval import worlds

    return worlds.tinylm_config(world, json.loads(spec) if spec else None)


class _Runner:
    """Holds the model, world, config and statistics; runs one method on one record set."""

    def __init__(self, args: argparse.Namespace) -> None:
        import zu_fast
        from zu_fast.eval import tinylm

        self.log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
        t0 = time.perf_counter()
        self.tinylm_config = tinylm_config(args.tinylm, args.world)
        if self.tinylm_config is None:
            self.model, self.tok, self.world = tinylm.load_or_train(progress=not args.quiet)
        else:
            self.model, self.tok, self.world = tinylm.load_or_train(self.tinylm_config, progress=not args.quiet)
        self.model.eval()
        overrides: dict[str, Any] = {"progress": False}
        if args.gd_steps is not None:
            overrides["gd_steps"] = args.gd_steps
        self.cfg = zu_fast.UnlearnConfig.for_model(self.model, **overrides)
        # zeroUnlearn and gd: each method's own preset (for_model(method=...): the closed form without the GD
        # retry), or the --config / --preset given (with its "-gd" twin for the other method when there is one)
        self.method_cfg = _method_configs(self.model, args, overrides)
        self.retain = args.retain
        self.relearn_steps = args.relearn_steps
        from zu_fast.eval.baselines import BaselineHParams

        hp_over = {k: v for k, v in (("lr", args.baseline_lr), ("epochs", args.baseline_epochs)) if v is not None}
        self.baseline_hparams = BaselineHParams(**hp_over)
        # one statistics pass for every layer any method edits (a --preset may edit other layers than for_model)
        edited = sorted(set(self.cfg.layers).union(*(c.layers for c in self.method_cfg.values())))
        self.stats = zu_fast.collect_stats(self.model, self.tok, self.world.training_texts(),
                                           self.cfg.replace(layers=edited))
        self.setup_seconds = time.perf_counter() - t0
        self.max_n = len(self.world.people) // 2
        # every parameter any method may touch: the edited layers' MLPs (checked after each restore)
        module = self.cfg.locate.rewrite_module
        prefixes = tuple(module.format(layer).rsplit(".", 1)[0] + "." for layer in edited)
        self.watch = {n: p.detach().clone() for n, p in self.model.named_parameters() if n.startswith(prefixes)}
        self.meta = {
            "model": "tinylm " + str(getattr(tinylm, "CODE_VERSION", "")),
            "world": args.world,
            "model_params": sum(p.numel() for p in self.model.parameters()),
            "layers": list(self.cfg.layers),
            "stats_tokens": self.stats[self.cfg.layers[0]].n,
            "stats_path": self.stats.path,
            "setup_seconds": round(self.setup_seconds, 2),
            "config": self.cfg.to_dict(),
            "method_configs": {m: c.to_dict() for m, c in self.method_cfg.items()},
            "retain": args.retain,
            "relearn_steps": args.relearn_steps,
            "baseline_hparams": dataclasses.asdict(self.baseline_hparams),
        }
        try:
            self.meta["tinylm"] = tinylm.load_meta(self.tinylm_config)
        except Exception:  # the meta file is a report only
            pass
        from zu_fast.eval import probes  # issue 18: robustness probes (eval/probes.py)

        self.probes = probes.parse_probes(args.probes) if args.probes else []

    def _check_restored(self) -> None:
        params = dict(self.model.named_parameters())
        bad = [n for n, b in self.watch.items() if not torch.equal(params[n].detach(), b)]
        if bad:
            raise RuntimeError(f"restore was not exact for {bad[:3]}")

    def records(self, n: int, seed: int) -> list[dict]:
        """The world's forget records with their subjects' other facts in held-out phrasings
        (``subject_other_prompts``, the Subject-other metric)."""
        recs = self.world.records(n, seed)
        for r in recs:
            r["subject_other_prompts"] = [{"prompt": f["text"], "target": f["target"]}
                                          for f in self.world.other_facts(r, "heldout")]
        return recs

    def retain_records(self, records: list[dict]) -> list[dict] | None:
        """``--retain subject``: the forgotten subjects' other facts in trained phrasings (never the held-out
        ones Subject-other measures)."""
        if self.retain != "subject":
            return None
        return [{"prompt": f["prompt"], "subject": f["subject"], "target_true": f["target"]}
                for r in records for f in self.world.other_facts(r, "train", RETAIN_PER_RELATION)]

    def run(self, method: str, records: list[dict]) -> dict[str, Any]:
        """Unlearn ``records`` with ``method`` (timed), evaluate, restore; returns a result row."""
        import zu_fast
        from zu_fast import metrics
        from zu_fast.eval import baselines

        retain = self.retain_records(records) if method in ("zeroUnlearn", "gd") else None
        t0, c0 = time.perf_counter(), time.process_time()
        edit = None
        report: dict[str, Any] = {}
        if method == "zeroUnlearn" or method == "gd":
            edit = zu_fast.unlearn(self.model, self.tok, records, self.method_cfg[method], stats=self.stats,
                                   retain=retain)
            report = edit.report.to_dict()
        elif method != "base":
            edit = baselines.run_baseline(method, self.model, self.tok, records, self.cfg, self.stats,
                                          hparams=self.baseline_hparams)
            report = {k: v for k, v in edit.report.items() if k != "hparams"}
            report["hparams"] = edit.report.get("hparams")
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        try:
            res = metrics.evaluate(self.model, self.tok, records, self.world.heldout_texts(),
                                   neutral_target=self.cfg.neutral_target)
            if retain:
                res["retained"] = metrics.recall(self.model, self.tok,
                                                 [(r["prompt"].format(r["subject"]), r["target_true"]) for r in retain])
            if self.relearn_steps > 0:  # relearning in the default table (restores the weights it trains)
                from zu_fast.eval import probes

                texts = {k: probes.relearn_texts(self.world, records, k) for k in RELEARN_KINDS}
                rl = probes.relearn_probe(self.model, self.tok, records, texts, steps=(self.relearn_steps,))
                for kind in RELEARN_KINDS:
                    res[f"relearn_{kind}_eff"] = rl[kind][self.relearn_steps]["efficacy"]
            if self.probes:  # issue 18: attacks on the edited model (they restore what they change)
                from zu_fast.eval import probes

                res["probes"] = probes.run_probes(self.model, self.tok, records, self.probes, world=self.world,
                                                  layer_module_tmp=self.cfg.locate.layer_module,
                                                  heldout_texts=self.world.heldout_texts())
        finally:
            if edit is not None:
                edit.restore()
        self._check_restored()
        return {**res, "seconds": seconds if method != "base" else 0.0,
                "cpu_seconds": cpu if method != "base" else 0.0, "report": report}


def with_recovery(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with ``relearn_<kind>_back``: the % of the forgotten facts relearning brought back,
    (Eff after relearning − Eff after the edit) / (Eff of the unedited model − Eff after the edit), against the
    same (n, seed)'s base row; NaN where the edit removed less than ``RECOVERY_MIN_GAP`` points."""
    base = {(r["n"], r["seed"]): r for r in rows if r.get("method") == "base" and "error" not in r}
    out = []
    for r in rows:
        b = base.get((r.get("n"), r.get("seed")))
        if "error" in r or b is None:
            out.append(r)
            continue
        r = dict(r)
        gap = float(b["efficacy"]) - float(r["efficacy"])
        for kind in RELEARN_KINDS:
            eff = r.get(f"relearn_{kind}_eff")
            if eff is not None and r.get("method") != "base":
                r[f"relearn_{kind}_back"] = 100.0 * (eff - r["efficacy"]) / gap if gap >= RECOVERY_MIN_GAP else math.nan
        out.append(r)
    return out


def _aggregate(rows: list[dict[str, Any]], metrics: list[tuple[str, str, int]] | None = None) -> list[dict[str, Any]]:
    """Mean and sample std over seeds per (method, n) of ``metrics`` (default: METRICS and the CPU time)."""
    metrics = METRICS + [("cpu_seconds", "", 2)] if metrics is None else metrics
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        if "error" not in r:
            groups.setdefault((r["method"], r["n"]), []).append(r)
    out = []
    for (method, n), rs in groups.items():
        agg: dict[str, Any] = {"method": method, "n": n, "seeds": [r["seed"] for r in rs]}
        for key, _, _ in metrics:
            vals = [float(r[key]) for r in rs if key in r and not math.isnan(float(r[key]))]
            agg[key] = statistics.fmean(vals) if vals else math.nan
            agg[key + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        out.append(agg)
    return out


def _fmt(mean: float, std: float, digits: int, with_std: bool) -> str:
    if math.isnan(mean):
        return "–"
    big = abs(mean) >= 1e4
    s = f"{mean:.3g}" if big else f"{mean:.{digits}f}"
    if with_std:
        s += f" ± {std:.3g}" if big else f" ± {std:.{digits}f}"
    return s


def markdown_table(aggs: list[dict[str, Any]], order: list[str]) -> str:
    """One markdown table: rows (n, method), columns the metrics as mean ± std over seeds."""
    with_std = any(len(a["seeds"]) > 1 for a in aggs)
    head = "| n | method | " + " | ".join(label for _, label, _ in METRICS) + " |"
    lines = [head, "|---:|---|" + "---:|" * len(METRICS)]
    rank = {m: i for i, m in enumerate(order)}
    for a in sorted(aggs, key=lambda a: (a["n"], rank.get(a["method"], 99))):
        cells = [_fmt(a[k], a[k + "_std"], dg, with_std) for k, _, dg in METRICS]
        lines.append(f"| {a['n']} | {a['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _environment() -> dict[str, Any]:
    env = {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
           "device": "cpu", "cpu": platform.processor() or platform.machine()}
    if torch.cuda.is_available():
        env["cuda_device"] = torch.cuda.get_device_name(0)
    return env


# --------------------------------------------------------------------------- plots ------


def plot_results(aggs: list[dict[str, Any]], order: list[str], path: Path) -> Path | None:
    """Grouped bars per method (one group per n): Eff, Gen, Spe, PPL (log) and time (log)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ns = sorted({a["n"] for a in aggs})
    methods = [m for m in order if any(a["method"] == m for a in aggs)]
    panels = [("efficacy", "Efficacy % ↓", False), ("generalization", "Generalization % ↓", False),
              ("specificity", "Specificity % ↑", False), ("perplexity", "PPL ↓ (log)", True),
              ("seconds", "time s (log)", True)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
    width = 0.8 / max(1, len(ns))
    for ax, (key, title, log) in zip(axes, panels):
        drawn = 0
        for j, n in enumerate(ns):
            xs, ys, es = [], [], []
            for i, m in enumerate(methods):
                a = next((a for a in aggs if a["method"] == m and a["n"] == n), None)
                if a is None or (key == "seconds" and m == "base"):
                    continue
                y = float(a.get(key, math.nan))
                if not math.isfinite(y) or (log and y <= 0):  # no value (e.g. no perplexity text), or not on a log axis
                    continue
                xs.append(i + (j - (len(ns) - 1) / 2) * width)
                ys.append(y)
                std = float(a.get(key + "_std", 0.0))
                es.append(std if math.isfinite(std) else 0.0)
            if xs:
                ax.bar(xs, ys, width, yerr=es, label=f"n={n}", capsize=2)
                drawn += len(xs)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=45, ha="right")
        ax.set_title(title)
        if not drawn:
            ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes, color="gray")
        elif log:
            ax.set_yscale("log")
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def draw_plot(plot, *args: Any) -> Path | None:
    """Call a plot function; a plot that cannot be drawn never loses a run: it is skipped with one line on stderr
    (the table and the JSON are written before any plot)."""
    path = Path(args[-1])
    try:
        return plot(*args)
    except Exception as e:  # noqa: BLE001  (matplotlib raises many kinds; the results are already on disk)
        print(f"zu-fast eval: {path.name} not drawn ({type(e).__name__}: {' '.join(str(e).split())[:200]}); the "
              f"tables and JSON beside it are complete", file=sys.stderr, flush=True)
        try:
            import matplotlib.pyplot as plt

            plt.close("all")
        except ImportError:
            pass
        return None


def plot_sweep(aggs: list[dict[str, Any]], path: Path) -> Path | None:
    """Quality and time vs n, one line per method."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = [("efficacy", "Efficacy % ↓"), ("generalization", "Generalization % ↓"),
              ("specificity", "Specificity % ↑"), ("perplexity", "PPL ↓"), ("seconds", "time s")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    methods = sorted({a["method"] for a in aggs})
    # one colour per method in every panel (the time panel leaves out base)
    colour = {m: f"C{i}" for i, m in enumerate(methods)}
    for ax, (key, title) in zip(axes, panels):
        for m in methods:
            if key == "seconds" and m == "base":
                continue
            pts = sorted((a["n"], a[key], a[key + "_std"]) for a in aggs if a["method"] == m)
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                        label=m, capsize=2, color=colour[m])
        ax.set_xscale("log")
        ax.set_xlabel("forget records n")
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- main ------


def _write(out: Path, args, runner: _Runner, methods: list[str], ns: list[int], seeds: list[int],
           skipped: list[int], rows: list[dict[str, Any]], final: bool) -> tuple[str, list[dict]]:
    """Write results.{md,json} (and the PNG when ``final``); called after every record set so partial
    results survive an interrupted run."""
    aggs = _aggregate(with_recovery(rows))
    stem = "sweep" if args.sweep else "results"
    table = markdown_table(aggs, methods)
    env = _environment()
    header = [f"# zu-fast eval ({'sample-size sweep' if args.sweep else 'method comparison'})", "",
              f"World: {runner.meta['world']}. Small model: {runner.meta['model_params']:,} parameters, edited "
              f"layers {runner.meta['layers']}, "
              f"statistics over {runner.meta['stats_tokens']:,} tokens. Device: {env['device']} "
              f"({env['cpu']}, {env['threads']} threads), torch {env['torch']}. Seeds {seeds}; mean ± std over "
              "seeds. Eff/Gen/Spe: % of prompts whose answer is still the teacher-forced argmax; Subj-other: "
              "the same on the forgotten subjects' other facts in held-out phrasings; RL@k % back: forgotten facts "
              f"brought back by {runner.relearn_steps} AdamW steps (lr 1e-4, all parameters) on the forgotten "
              "subjects' other facts (same) or on other people's facts (unrel.), as % of what the edit removed "
              f"('–' where it removed < {RECOVERY_MIN_GAP:.0f} points); time = wall "
              "seconds of the unlearning call (evaluation excluded) on a shared machine. GA/NPO/FT: AdamW lr "
              f"{runner.baseline_hparams.lr:g}, {runner.baseline_hparams.epochs} epochs."
              + (" zeroUnlearn and gd with a retain set: the forgotten subjects' other facts in their first "
                 f"{RETAIN_PER_RELATION} trained phrasings per relation." if runner.retain else "")
              + (f" Config: {args.config or args.preset}." if (args.config or args.preset) else ""), ""]
    if skipped:
        header += [f"Skipped n={skipped}: the world has {len(runner.world.people)} people, so at most "
                   f"{runner.max_n} forget records.", ""]
    failures = [r for r in rows if "error" in r]
    if failures:
        header += ["Failures: " + "; ".join(f"{r['method']} n={r['n']} seed={r['seed']}: {r['error']}"
                                            for r in failures), ""]
    (out / f"{stem}.md").write_text("\n".join(header) + "\n" + table + "\n")
    (out / f"{stem}.json").write_text(json.dumps({"environment": env, "meta": runner.meta, "methods": methods,
                                                  "n": ns, "seeds": seeds, "skipped_n": skipped,
                                                  "aggregates": aggs, "runs": rows}, indent=2, default=str))
    if final and not args.no_plot:
        draw_plot(plot_sweep if args.sweep else plot_results, *((aggs,) if args.sweep else (aggs, methods)),
                  out / f"{stem}.png")
    if runner.probes:  # issue 18: the robustness table beside the quality table
        from zu_fast.eval import probes

        probes.write_robustness(out, rows, methods, header=header[2], plot=final and not args.no_plot)
    return table, failures




def merge_runs(json_paths: Sequence[str | Path], out: str | Path, *, plot: bool = True) -> str:
    """One quality table and one robustness table from several ``zu-fast eval --probes`` runs (their
    ``results.json``), e.g. the same command run as one process per ``--n``: every (method, n, seed)
    row is computed on its own, so the merged tables are the single command's. Writes
    ``results.md`` and ``robustness.{md,json,png}`` under ``out``; returns the robustness tables."""
    rows: list[dict] = []
    methods: list[str] = []
    headers = []
    for p in json_paths:
        d = json.loads(Path(p).read_text())
        rows += d["runs"]
        methods += [m for m in d["methods"] if m not in methods]
        meta = d.get("meta", {})
        params = meta.get("model_params")
        headers.append(f"{Path(p).parent.name}: " + (f"{params:,} parameters, " if params else "")
                       + f"layers {meta.get('layers')}, seeds {d.get('seeds')}, n {d.get('n')}.")
    if not rows:
        raise ZuFastError("merge_runs: no runs in the given results.json files")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    quality = markdown_table(_aggregate(with_recovery(rows)), methods)
    (out / "results.md").write_text("# zu-fast eval (merged runs)\n\n" + "\n".join(headers) + "\n\n" + quality + "\n")
    from .probes import write_robustness

    return write_robustness(out, rows, methods, header=" ".join(headers), plot=plot)


def _file(path: str | None, flag: str) -> None:
    if path is None:
        return
    p = Path(path)
    if not p.exists():
        raise ZuFastError(f"{flag} {path!r}: no such file")
    if not p.is_file():
        raise ZuFastError(f"{flag} {path!r} is a folder; give a file")


def check_inputs(args: argparse.Namespace) -> tuple[list[int], list[int] | None]:
    """Every path and value of a ``zu-fast eval`` command line, checked before any folder is created and any
    model is loaded or trained (issue 26): ZuFastError naming the first bad one. Returns (seeds, ns; ns None
    when they depend on the small model's world: --sweep without --n)."""
    from zu_fast.config import UnlearnConfig

    if args.methods is not None:
        _methods(args.methods)
    seeds = _ints(args.seeds, "--seeds", least=0)
    ns = _ints(args.n or DEFAULT_N) if args.n is not None or not args.sweep else None
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ZuFastError(f"--out {args.out!r} is a file; give a folder")
    for flag, value, least in (("--threads", args.threads, 1), ("--gd-steps", args.gd_steps, 0),
                               ("--baseline-epochs", args.baseline_epochs, 1), ("--gen-len", args.gen_len, 1),
                               ("--batch-size", args.batch_size, 1)):
        if value is not None and value < least:
            raise ZuFastError(f"{flag} {value}: expected an integer ≥ {least}")
    if args.baseline_lr is not None and not args.baseline_lr > 0:
        raise ZuFastError(f"--baseline-lr {args.baseline_lr}: expected a positive number")
    if args.probes:
        from zu_fast.eval import probes

        probes.parse_probes(args.probes)
    if args.tinylm:
        try:
            tinylm_config(args.tinylm)
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            raise ZuFastError(f"--tinylm {args.tinylm!r}: not valid TinyLMConfig overrides ({e})") from None
    for p in args.merge or []:
        _file(p, "--merge")
    _file(args.config, "--config")
    if args.config:
        import warnings

        with warnings.catch_warnings():  # (said once, when the run reads it)
            warnings.simplefilter("ignore")
            UnlearnConfig.from_json(args.config)
    if args.preset and args.preset.lower() not in {p.lower() for p in UnlearnConfig.presets()}:
        raise ZuFastError(f"--preset {args.preset!r}: no such preset; shipped presets: {UnlearnConfig.presets()}")
    if not args.dataset:
        for flag in ("model", "corpus", "ppl_text", "snippets", "tfidf", "kind"):
            if getattr(args, flag, None):
                raise ZuFastError(f"--{flag.replace('_', '-')} is an option of the dataset mode: give --dataset FILE "
                                  "too (without it zu-fast eval runs the small model's synthetic world)")
        return seeds, ns
    if getattr(args, "retain", None):
        raise ZuFastError("--retain subject builds the retain set from the synthetic world's other facts; the dataset "
                          "mode has none (CounterFact holds one record for most subjects); run it without --dataset")
    from zu_fast.eval import datasets
    from zu_fast.stats.corpus import read_corpus

    _file(args.dataset, "--dataset")
    raw = datasets.read_json_records(args.dataset)
    kind = args.kind
    if kind is None:
        try:
            kind = datasets.detect_kind(raw[0])
        except ZuFastError as e:
            raise ZuFastError(f"{args.dataset}: record 0: {e}") from None
    if args.model:
        p = Path(args.model)
        if args.corpus is None:
            raise ZuFastError("--model needs --corpus (the statistics corpus, e.g. a Wikipedia text dump)")
        if not p.is_dir():
            raise ZuFastError(f"--model {args.model}: not a folder with a HuggingFace model"
                              + ("" if p.exists() else " (it does not exist)"))
        if not (p / "config.json").exists():
            raise ZuFastError(f"--model {args.model}: not a HuggingFace model folder (no config.json)")
    if args.corpus is not None:
        if not Path(args.corpus).is_file():
            read_corpus(args.corpus)  # the error naming it
    _file(args.ppl_text, "--ppl-text")
    _file(args.snippets, "--snippets")
    if args.tfidf:
        missing = [f for f in ("idf.npy", "tfidf_vocab.json") if not (Path(args.tfidf) / f).is_file()]
        if missing:
            raise ZuFastError(f"--tfidf {args.tfidf!r}: not a folder with the reference's {' and '.join(missing)}")
    if args.device:
        try:
            torch.device(args.device)
        except (RuntimeError, ValueError) as e:
            raise ZuFastError(f"--device {args.device!r}: {e}") from None
    forget = len(raw) - len(raw) // 2
    too_many = [n for n in ns or [] if n > forget]
    if too_many:
        raise ZuFastError(f"--n {','.join(map(str, too_many))}: {args.dataset} holds {len(raw)} records, and forget "
                          f"records are drawn from its second half ({forget}, the reference's forget split)")
    return seeds, ns


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``zu-fast eval`` (argv without the sub-command). Returns the exit status."""
    args = build_parser().parse_args(argv)
    check_inputs(args)  # every path and value, before any folder or model
    if args.merge:
        print(merge_runs(args.merge, args.out, plot=not args.no_plot))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dataset:
        return dataset_main(args, list(argv if argv is not None else sys.argv[1:]))
    if args.sweep:
        methods = ["base", "zeroUnlearn", "gd"]
        if args.methods is not None:
            methods = ["base"] + [m for m in _methods(args.methods or DEFAULT_METHODS) if m != "base"]
    else:
        methods = ["base"] + [m for m in _methods(args.methods or DEFAULT_METHODS) if m != "base"]
    seeds = _ints(args.seeds, "--seeds", least=0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runner = _Runner(args)
    n_given = args.n is not None
    if args.sweep and not n_given:
        ns = [n for n in (10, 20, 50, 100, 200, 500, 1000) if n <= runner.max_n]
    else:
        ns = _ints(args.n or DEFAULT_N)
    skipped = [n for n in ns if n > runner.max_n]
    ns = [n for n in ns if n <= runner.max_n]
    if skipped:
        runner.log(f"skipping n={skipped}: the world supports at most {runner.max_n} forget records "
                   f"({len(runner.world.people)} people)")
    rows: list[dict[str, Any]] = []
    for n in ns:
        for seed in seeds:
            records = runner.records(n, seed)
            for method in methods:
                runner.log(f"[zu-fast eval] n={n} seed={seed} {method} ...")
                try:
                    res = runner.run(method, records)
                except Exception as e:  # one failing method must not lose the others' results
                    runner.log(f"  FAILED: {e!r}")
                    rows.append({"method": method, "n": n, "seed": seed, "error": repr(e)})
                    continue
                rows.append({"method": method, "n": n, "seed": seed, **res})
                runner.log("  " + ", ".join(f"{k} {res[k]:.4g}" for k, _, _ in METRICS if k in res)
                           + (f" | phases {res['report'].get('timings')}" if res["report"].get("timings") else ""))
            _write(out, args, runner, methods, ns, seeds, skipped, rows, final=False)
    table, failures = _write(out, args, runner, methods, ns, seeds, skipped, rows, final=True)
    print(table)
    if runner.probes:
        print("\n" + (out / "robustness.md").read_text())
    return 1 if failures else 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())


# --------------------------------------------------------------------------- dataset mode ------
# ``zu-fast eval --dataset FILE``: the paper's table on a dataset file (CounterFact/MCF, ZsRE,
# MQuAKE) and any local model, with the reference's metrics (reference_metrics.evaluate_dataset). Kept in
# its own functions: main() only dispatches here when --dataset is given.

DATASET_METRICS = [  # key, column label, digits
    ("efficacy", "Eff ↓", 2),
    ("generalization", "Gen ↓", 2),
    ("specificity", "Spe ↑", 2),
    ("subject_other", "Subj-other ↑", 2),
    ("perplexity", "PPL ↓", 3),
    ("es", "ES ↑", 1),
    ("ps", "PS ↑", 1),
    ("ns", "NS ↑", 1),
    ("multihop", "Multi-hop ↓", 2),
    ("fluency", "Fluency ↑", 1),
    ("consistency", "Consistency ↓", 1),
    ("seconds", "time (s)", 2),
    ("peak_mib", "peak MiB", 0),
]


def _add_dataset_arguments(p: argparse.ArgumentParser) -> None:
    """Options of the dataset mode (``--dataset``)."""
    g = p.add_argument_group("dataset mode (--dataset): the paper's table on a dataset file and a local model")
    g.add_argument("--dataset", default=None, metavar="FILE",
                   help="CounterFact/MCF, ZsRE or MQuAKE file (.json/.jsonl); forget records are drawn from its "
                        "second half as the reference does")
    g.add_argument("--kind", default=None, choices=["mcf", "zsre", "mquake"], help="dataset kind (default: detected)")
    g.add_argument("--model", default=None, metavar="DIR",
                   help="local HuggingFace model folder (default: the project's small model)")
    g.add_argument("--corpus", default=None, metavar="FILE",
                   help="statistics corpus (.txt one text a line, .jsonl 'text'); default for the small model: "
                        "its training texts")
    g.add_argument("--ppl-text", default=None, metavar="FILE",
                   help="held-out text for perplexity (default for the small model: its held-out texts)")
    g.add_argument("--device", default=None, help="device for --model (default: the accelerator if any, else cpu)")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="dtype for --model")
    g.add_argument("--config", default=None, metavar="JSON",
                   help="UnlearnConfig JSON or a reference hparams file (also without --dataset, for zeroUnlearn/gd)")
    g.add_argument("--preset", default=None,
                   help="a named preset (UnlearnConfig.preset; also without --dataset); default: for_model")
    g.add_argument("--neutral-target", default=None,
                   help="neutral target for the methods and for ES/PS/NS (default: the config's for the methods, "
                        "each record's target_new for ES/PS/NS)")
    g.add_argument("--generation", action="store_true",
                   help="also fluency (n-gram entropy) and consistency on the records' generation_prompts")
    g.add_argument("--gen-len", type=int, default=100,
                   help="tokens per generated text, prompt included (the reference's 100)")
    g.add_argument("--snippets", default=None, metavar="FILE", help="attribute_snippets.json (consistency texts)")
    g.add_argument("--tfidf", default=None, metavar="DIR",
                   help="folder with the reference's idf.npy and tfidf_vocab.json (default: fitted on the snippets)")
    g.add_argument("--batch-size", type=int, default=32, help="evaluation batch size")


def _load_local_model(path: str, device: str | None, dtype: str):
    """A local HuggingFace causal LM and its tokenizer, on ``device`` (default: the accelerator if any)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer


    if not Path(path).is_dir():
        raise ZuFastError(f"--model {path}: not a folder with a HuggingFace model")
    if device is None:
        acc = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
        device = str(acc) if acc is not None and torch.accelerator.is_available() else "cpu"
    torch_dtype = {"auto": "auto", "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, local_files_only=True).to(device).eval()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tok.pad_token is None:  # the reference does the same (padded batches in its evaluation)
        tok.pad_token = tok.eos_token
    return model, tok


class _PeakMemory:
    """Peak memory of a block: allocated bytes on an accelerator, the process's resident set on CPU
    (Linux: the high-water mark is reset at the start; elsewhere the process's lifetime peak)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes = 0

    def __enter__(self) -> _PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:  # "5" resets VmHWM, the peak resident set size (Linux ≥ 4.0)
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
            return
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.peak_bytes = int(line.split()[1]) * 1024
                    return
        except OSError:
            pass
        import resource

        self.peak_bytes = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class _DatasetRunner:
    """Model, tokenizer, config, statistics and dataset of the dataset mode; runs one method on one record set."""

    def __init__(self, args: argparse.Namespace) -> None:
        import zu_fast
        from zu_fast.eval import datasets, reference_metrics


        self.args = args
        self.log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
        t0 = time.perf_counter()
        if args.model:
            if args.corpus is None:
                raise ZuFastError("--model needs --corpus (the statistics corpus, e.g. a Wikipedia text dump)")
            self.model, self.tok = _load_local_model(args.model, args.device, args.dtype)
            corpus, ppl = args.corpus, None
            model_name = args.model
        else:
            from zu_fast.eval import tinylm

            cfg_tiny = tinylm_config(args.tinylm, args.world)
            if cfg_tiny is None:
                self.model, self.tok, world = tinylm.load_or_train(progress=not args.quiet)
            else:
                self.model, self.tok, world = tinylm.load_or_train(cfg_tiny, progress=not args.quiet)
            corpus = args.corpus or world.training_texts()
            ppl = world.heldout_texts()
            model_name = "tinylm " + str(getattr(tinylm, "CODE_VERSION", ""))
        self.model.eval()
        self.ppl_texts = reference_metrics.read_texts(args.ppl_text) if args.ppl_text else ppl
        overrides: dict[str, Any] = {"progress": False}
        if args.gd_steps is not None:
            overrides["gd_steps"] = args.gd_steps
        if args.neutral_target is not None:
            overrides["neutral_target"] = args.neutral_target
        if args.config:
            self.cfg = zu_fast.UnlearnConfig.from_json(args.config, **overrides)
        elif args.preset:
            self.cfg = zu_fast.UnlearnConfig.preset(args.preset, **overrides)
        else:
            self.cfg = zu_fast.UnlearnConfig.for_model(self.model, **overrides)
        # zeroUnlearn and gd: the config's settings with the method swapped; a named preset's "-gd"
        # twin (the paper's ZeroUnlearn_DG hparams) is used for the other method when it has the same layers
        self.method_cfg = {"zeroUnlearn": self.cfg.replace(method="closed_form"), "gd": self.cfg.replace(method="gd")}
        if args.config or args.preset:
            self.method_cfg = _method_configs(self.model, args, overrides)
        self.dataset = datasets.load_dataset(args.dataset, args.kind, self.tok)
        if args.neutral_target is not None:
            self.dataset = self.dataset.with_neutral(args.neutral_target)
        self.snippets = reference_metrics.load_snippets(args.snippets) if args.snippets else None
        self.tfidf = None
        if args.tfidf:
            self.tfidf = reference_metrics.Tfidf.load(args.tfidf)
        elif self.snippets:
            self.tfidf = reference_metrics.Tfidf.fit([s["text"] for v in self.snippets.values() for s in v])
        from zu_fast.eval.baselines import BaselineHParams

        hp_over = {k: v for k, v in (("lr", args.baseline_lr), ("epochs", args.baseline_epochs)) if v is not None}
        self.baseline_hparams = BaselineHParams(**hp_over)
        self.stats = zu_fast.collect_stats(self.model, self.tok, corpus, self.cfg)
        self.device = zu_fast.model.model_device(self.model)
        module = self.cfg.locate.rewrite_module
        prefixes = tuple(module.format(layer).rsplit(".", 1)[0] + "." for layer in self.cfg.layers)
        self.watch = {n: p.detach().clone() for n, p in self.model.named_parameters() if n.startswith(prefixes)}
        self.meta = {
            "model": model_name,
            "model_params": sum(p.numel() for p in self.model.parameters()),
            "device": str(self.device),
            "dataset": str(self.dataset.path),
            "kind": self.dataset.kind,
            "dataset_records": len(self.dataset),
            "layers": list(self.cfg.layers),
            "stats_tokens": self.stats[self.cfg.layers[0]].n,
            "stats_path": self.stats.path,
            "ppl_texts": len(self.ppl_texts or []),
            "setup_seconds": round(time.perf_counter() - t0, 2),
            "config": self.cfg.to_dict(),
            "method_configs": {m: c.to_dict() for m, c in self.method_cfg.items()},
            "baseline_hparams": dataclasses.asdict(self.baseline_hparams),
        }

    def subject_other_pairs(self, records: list[dict]) -> list[tuple[str, str]]:
        """The forgotten subjects' other facts, where the file has them: the rewrite prompts and true answers of
        the file's records about a forgotten subject that are not forgotten themselves (CounterFact has one record
        per subject for most subjects, so this is often empty and the column is left out)."""
        forgotten = {r["case_id"] for r in records}
        subjects = {rr["subject"] for rec in records for rr in _rewrites(rec)}
        return [(rr["prompt"].format(rr["subject"]), _target_str(rr["target_true"]))
                for rec in self.dataset.records if rec["case_id"] not in forgotten
                for rr in _rewrites(rec) if rr["subject"] in subjects]

    def evaluate(self, records: list[dict]) -> dict[str, Any]:
        """The reference's metrics on ``records`` with the model as it is now, and Subject-other (zu_fast's
        teacher-forced recall; NaN where the file has no other fact of a forgotten subject)."""
        from zu_fast import metrics
        from zu_fast.eval import reference_metrics

        res = reference_metrics.evaluate_dataset(self.model, self.tok, self.dataset.kind, records,
                                                 ppl_texts=self.ppl_texts, generation=self.args.generation,
                                                 snippets=self.snippets, tfidf=self.tfidf, gen_len=self.args.gen_len,
                                                 batch_size=self.args.batch_size)
        pairs = self.subject_other_pairs(records)
        res["subject_other"] = metrics.recall(self.model, self.tok, pairs) if pairs else math.nan
        return res

    def run(self, method: str, records: list[dict]) -> dict[str, Any]:
        """Unlearn ``records`` with ``method`` (timed, peak memory), evaluate, restore; a result row."""
        import zu_fast
        from zu_fast.eval import baselines

        requests = self.dataset.requests(records)
        edit, report = None, {}
        meter = _PeakMemory(self.device)
        t0 = time.perf_counter()
        with meter:
            if method in ("zeroUnlearn", "gd"):
                edit = zu_fast.unlearn(self.model, self.tok, requests, self.method_cfg[method], stats=self.stats)
                report = edit.report.to_dict()
            elif method != "base":
                edit = baselines.run_baseline(method, self.model, self.tok, requests, self.cfg, self.stats,
                                              hparams=self.baseline_hparams)
                report = {k: v for k, v in edit.report.items() if k != "hparams"}
        seconds = time.perf_counter() - t0
        try:
            res = self.evaluate(records)
        finally:
            if edit is not None:
                edit.restore()
        params = dict(self.model.named_parameters())
        bad = [n for n, b in self.watch.items() if not torch.equal(params[n].detach(), b)]
        if bad:
            raise RuntimeError(f"restore was not exact for {bad[:3]}")
        base = method == "base"
        return {**res, "seconds": 0.0 if base else seconds,
                "peak_mib": math.nan if base else meter.peak_bytes / 2**20, "report": report,
                "case_ids": [r["case_id"] for r in records]}


def _method_configs(model, args: argparse.Namespace, overrides: dict[str, Any]) -> dict[str, Any]:
    """The configs of zeroUnlearn and gd: ``--config`` or ``--preset`` with the method swapped (a named preset's
    "-gd" twin, when it has the same layers, for the other method), else ``for_model(model, method=...)``."""
    import zu_fast

    UnlearnConfig = zu_fast.UnlearnConfig
    if not args.config and not args.preset:
        return {"zeroUnlearn": UnlearnConfig.for_model(model, method="closed_form", **overrides),
                "gd": UnlearnConfig.for_model(model, method="gd", **overrides)}
    cfg = (UnlearnConfig.from_json(args.config, **overrides) if args.config
           else UnlearnConfig.preset(args.preset, **overrides))
    out = {"zeroUnlearn": cfg.replace(method="closed_form"), "gd": cfg.replace(method="gd")}
    if args.preset and not args.config:
        twin = args.preset[: -len("-gd")] if args.preset.endswith("-gd") else args.preset + "-gd"
        if twin in UnlearnConfig.presets():
            other = UnlearnConfig.preset(twin, **overrides)
            if list(other.layers) == list(cfg.layers):
                out["gd" if other.method == "gd" else "zeroUnlearn"] = other
    return out


def _rewrites(rec: dict) -> list[dict]:
    rr = rec["requested_rewrite"]
    return rr if isinstance(rr, list) else [rr]


def _target_str(t: Any) -> str:
    return t["str"] if isinstance(t, dict) else str(t)


def _dataset_aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample std over seeds per (method, n) of the dataset metrics."""
    return _aggregate(rows, DATASET_METRICS)


def dataset_table(aggs: list[dict[str, Any]], order: list[str]) -> str:
    """The paper-shaped markdown table: one row per (n, method), mean ± std over seeds; columns
    without a value for any method (e.g. multi-hop outside MQuAKE) are left out."""
    cols = [(k, label, dg) for k, label, dg in DATASET_METRICS if any(not math.isnan(a[k]) for a in aggs)]
    with_std = any(len(a["seeds"]) > 1 for a in aggs)
    lines = ["| n | method | " + " | ".join(label for _, label, _ in cols) + " |",
             "|---:|---|" + "---:|" * len(cols)]
    rank = {m: i for i, m in enumerate(order)}
    for a in sorted(aggs, key=lambda a: (a["n"], rank.get(a["method"], 99))):
        cells = [_fmt(a[k], a[k + "_std"], dg, with_std and k != "peak_mib") for k, _, dg in cols]
        lines.append(f"| {a['n']} | {a['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _dataset_write(out: Path, args, runner: _DatasetRunner, methods: list[str], ns: list[int], seeds: list[int],
                   rows: list[dict[str, Any]], final: bool) -> tuple[str, list[dict]]:
    aggs = _dataset_aggregate(rows)
    table = dataset_table(aggs, methods)
    env = _environment()
    env["device"] = runner.meta["device"]
    m = runner.meta
    header = [f"# zu-fast eval on {Path(m['dataset']).name} ({m['kind']})", "",
              f"Model: {m['model']} ({m['model_params']:,} parameters) on {m['device']}; edited layers {m['layers']}; "
              f"statistics over {m['stats_tokens']:,} tokens, shared by every method. Forget records: n drawn "
              f"from the second half of the file ({m['dataset_records']} records) per seed, seeds {seeds}; mean ± "
              "std over seeds. Eff/Gen/Spe as the reference's evaluation computes them (MCF: every answer token "
              "the teacher-forced argmax; ZsRE/MQuAKE: mean per-token top-1 accuracy), averaged per record; "
              f"ES/PS/NS against each record's target_new; PPL over {m['ppl_texts']} held-out texts. time = wall "
              "seconds of the unlearning call, peak MiB = peak memory during it "
              f"({'allocated on the accelerator' if m['device'] != 'cpu' else 'process resident set'}). "
              f"GA/NPO/FT: AdamW lr {runner.baseline_hparams.lr:g}, {runner.baseline_hparams.epochs} epochs. "
              f"torch {env['torch']}, {env['cpu']}, {env['threads']} threads.", "",
              "Command: `zu-fast eval " + " ".join(args.argv_used) + "`", ""]
    failures = [r for r in rows if "error" in r]
    if failures:
        header += ["Failures: " + "; ".join(f"{r['method']} n={r['n']} seed={r['seed']}: {r['error']}"
                                            for r in failures), ""]
    (out / "results.md").write_text("\n".join(header) + "\n" + table + "\n")
    (out / "results.json").write_text(json.dumps({"environment": env, "meta": runner.meta, "methods": methods,
                                                  "n": ns, "seeds": seeds, "aggregates": aggs, "runs": rows},
                                                 indent=1, default=str))
    if final and not args.no_plot:
        draw_plot(plot_results, aggs, methods, out / "results.png")
    return table, failures


def dataset_main(args: argparse.Namespace, argv: list[str]) -> int:
    """``zu-fast eval --dataset FILE``: every method on the same forget records, layers and statistics."""
    from tqdm.auto import tqdm

    methods = ["base"] + [m for m in _methods(args.methods or DEFAULT_METHODS) if m != "base"]
    seeds = _ints(args.seeds, "--seeds", least=0)
    ns = _ints(args.n or DEFAULT_N)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.argv_used = list(argv)
    runner = _DatasetRunner(args)
    rows: list[dict[str, Any]] = []
    todo = [(n, s) for n in ns for s in seeds]
    bar = tqdm(total=len(todo) * len(methods), desc="zu-fast eval", disable=args.quiet, leave=False)
    for n, seed in todo:
        records = runner.dataset.sample(n, seed)
        for method in methods:
            bar.set_postfix_str(f"n={n} seed={seed} {method}")
            try:
                res = runner.run(method, records)
            except Exception as e:  # one failing method must not lose the others' results
                runner.log(f"[zu-fast eval] n={n} seed={seed} {method} FAILED: {e!r}")
                rows.append({"method": method, "n": n, "seed": seed, "error": repr(e)})
            else:
                rows.append({"method": method, "n": n, "seed": seed, **res})
                runner.log(f"[zu-fast eval] n={n} seed={seed} {method}: " + ", ".join(
                    f"{k} {res[k]:.4g}" for k, _, _ in DATASET_METRICS if k in res))
            bar.update(1)
        _dataset_write(out, args, runner, methods, ns, seeds, rows, final=False)
    bar.close()
    table, failures = _dataset_write(out, args, runner, methods, ns, seeds, rows, final=True)
    print(table)
    return 1 if failures else 0
