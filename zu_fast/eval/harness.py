"""``zu-fast eval``: ZeroUnlearn (closed form, GD) against the baselines on the synthetic world's small model.

For every method × n × seed: restore the model, unlearn ``world.records(n, seed)``, evaluate
(Efficacy/Generalization/Specificity/PPL and ES/PS/NS via :mod:`zu_fast.eval.metrics`), time it.
Writes ``results.json`` (every run + aggregates + environment), ``results.md`` (mean ± std over seeds)
and ``results.png``. ``--sweep`` runs the sample-size sweep instead (closed form vs GD, quality and
time vs n) and writes ``sweep.{json,md,png}``.

Methods: ``base`` (no edit; always evaluated), ``zeroUnlearn`` (closed form), ``gd`` (ZeroUnlearn-GD),
``ga``, ``npo``, ``ft``, ``memit``, ``alphaedit`` (see :mod:`zu_fast.eval.baselines`).
Corpus statistics are collected once on the world's training texts (``collect_stats``; cached).
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
from pathlib import Path
from typing import Any

import torch

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
    ("perplexity", "PPL ↓", 3),
    ("es", "ES ↑", 1),
    ("ps", "PS ↑", 1),
    ("ns", "NS ↑", 1),
    ("seconds", "time (s)", 2),
]


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _methods(s: str) -> list[str]:
    out = []
    for x in s.split(","):
        x = x.strip()
        if not x:
            continue
        try:
            name = METHOD_NAMES[x.lower()]
        except KeyError:
            raise SystemExit(f"unknown method {x!r}; choose from {sorted(set(METHOD_NAMES.values()))}") from None
        if name not in out:
            out.append(name)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zu-fast eval", description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="zeroUnlearn,gd,ga,npo,ft,alphaedit",
                   help="comma-separated: zeroUnlearn, gd, ga, npo, ft, memit, alphaedit (base is always added)")
    p.add_argument("--n", default="10,50", help="comma-separated numbers of forget records")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated record-sampling seeds")
    p.add_argument("--out", default="zu_fast_eval", help="output folder")
    p.add_argument("--sweep", action="store_true",
                   help="sample-size sweep: closed form vs GD, quality and time vs n (--n defaults to 10..max)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--gd-steps", type=int, default=None, help="override UnlearnConfig.gd_steps")
    p.add_argument("--baseline-lr", type=float, default=None,
                   help="AdamW learning rate of GA / NPO / FT (default: BaselineHParams.lr)")
    p.add_argument("--baseline-epochs", type=int, default=None,
                   help="passes over the forget set for GA / NPO / FT (default: BaselineHParams.epochs)")
    p.add_argument("--tinylm", default=None, metavar="JSON",
                   help="TinyLMConfig overrides for the small model as JSON, e.g. "
                        '\'{"steps": 500, "world": {"n_people": 120}}\' (default: the default small model)')
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--quiet", action="store_true")
    return p


# --------------------------------------------------------------------------- running ------


def tinylm_config(spec: str | None):
    """A TinyLMConfig from a JSON string of overrides (``world`` nested), or None for the default."""
    if not spec:
        return None
    from zu_fast.eval.synthetic import WorldConfig
    from zu_fast.eval.tinylm import TinyLMConfig

    kw = json.loads(spec)
    world = kw.pop("world", None)
    return TinyLMConfig(world=WorldConfig(**(world or {})), **kw)


class _Runner:
    """Holds the model, world, config and statistics; runs one method on one record set."""

    def __init__(self, args: argparse.Namespace) -> None:
        import zu_fast
        from zu_fast.eval import tinylm

        self.log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
        t0 = time.perf_counter()
        self.tinylm_config = tinylm_config(args.tinylm)
        if self.tinylm_config is None:
            self.model, self.tok, self.world = tinylm.load_or_train(progress=not args.quiet)
        else:
            self.model, self.tok, self.world = tinylm.load_or_train(self.tinylm_config, progress=not args.quiet)
        self.model.eval()
        overrides: dict[str, Any] = {"progress": False}
        if args.gd_steps is not None:
            overrides["gd_steps"] = args.gd_steps
        self.cfg = zu_fast.UnlearnConfig.for_model(self.model, **overrides)
        from zu_fast.eval.baselines import BaselineHParams

        hp_over = {k: v for k, v in (("lr", args.baseline_lr), ("epochs", args.baseline_epochs)) if v is not None}
        self.baseline_hparams = BaselineHParams(**hp_over)
        self.stats = zu_fast.collect_stats(self.model, self.tok, self.world.training_texts(), self.cfg)
        self.setup_seconds = time.perf_counter() - t0
        self.max_n = len(self.world.people) // 2
        # every parameter any method may touch: the edited layers' MLPs (checked after each restore)
        prefixes = tuple(self.cfg.rewrite_module_tmp.format(layer).rsplit(".", 1)[0] + "." for layer in self.cfg.layers)
        self.watch = {n: p.detach().clone() for n, p in self.model.named_parameters() if n.startswith(prefixes)}
        self.meta = {
            "model": "tinylm " + str(getattr(tinylm, "CODE_VERSION", "")),
            "model_params": sum(p.numel() for p in self.model.parameters()),
            "layers": list(self.cfg.layers),
            "stats_tokens": self.stats[self.cfg.layers[0]].n,
            "stats_path": self.stats.path,
            "setup_seconds": round(self.setup_seconds, 2),
            "config": self.cfg.to_dict(),
            "baseline_hparams": dataclasses.asdict(self.baseline_hparams),
        }
        try:
            self.meta["tinylm"] = tinylm.load_meta(self.tinylm_config)
        except Exception:  # the meta file is a report only
            pass

    def _check_restored(self) -> None:
        params = dict(self.model.named_parameters())
        bad = [n for n, b in self.watch.items() if not torch.equal(params[n].detach(), b)]
        if bad:
            raise RuntimeError(f"restore was not exact for {bad[:3]}")

    def run(self, method: str, records: list[dict]) -> dict[str, Any]:
        """Unlearn ``records`` with ``method`` (timed), evaluate, restore; returns a result row."""
        import zu_fast
        from zu_fast.eval import baselines, metrics

        t0, c0 = time.perf_counter(), time.process_time()
        edit = None
        report: dict[str, Any] = {}
        if method == "zeroUnlearn" or method == "gd":
            cfg = self.cfg.replace(method="gd" if method == "gd" else "closed_form")
            edit = zu_fast.unlearn(self.model, self.tok, records, cfg, stats=self.stats)
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
        finally:
            if edit is not None:
                edit.restore()
        self._check_restored()
        return {**res, "seconds": seconds if method != "base" else 0.0,
                "cpu_seconds": cpu if method != "base" else 0.0, "report": report}


def _aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample std over seeds per (method, n)."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        if "error" not in r:
            groups.setdefault((r["method"], r["n"]), []).append(r)
    out = []
    for (method, n), rs in groups.items():
        agg: dict[str, Any] = {"method": method, "n": n, "seeds": [r["seed"] for r in rs]}
        for key, _, _ in METRICS + [("cpu_seconds", "", 2)]:
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
        for j, n in enumerate(ns):
            xs, ys, es = [], [], []
            for i, m in enumerate(methods):
                a = next((a for a in aggs if a["method"] == m and a["n"] == n), None)
                if a is None or (key == "seconds" and m == "base"):
                    continue
                xs.append(i + (j - (len(ns) - 1) / 2) * width)
                ys.append(a[key])
                es.append(a[key + "_std"])
            ax.bar(xs, ys, width, yerr=es, label=f"n={n}", capsize=2)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=45, ha="right")
        ax.set_title(title)
        if log:
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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
    aggs = _aggregate(rows)
    stem = "sweep" if args.sweep else "results"
    table = markdown_table(aggs, methods)
    env = _environment()
    header = [f"# zu-fast eval ({'sample-size sweep' if args.sweep else 'method comparison'})", "",
              f"Small model: {runner.meta['model_params']:,} parameters, edited layers {runner.meta['layers']}, "
              f"statistics over {runner.meta['stats_tokens']:,} tokens. Device: {env['device']} "
              f"({env['cpu']}, {env['threads']} threads), torch {env['torch']}. Seeds {seeds}; mean ± std over "
              "seeds. Eff/Gen/Spe: % of prompts whose answer is still the teacher-forced argmax; time = wall "
              "seconds of the unlearning call (evaluation excluded) on a shared machine. GA/NPO/FT: AdamW lr "
              f"{runner.baseline_hparams.lr:g}, {runner.baseline_hparams.epochs} epochs.", ""]
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
        (plot_sweep if args.sweep else plot_results)(*((aggs,) if args.sweep else (aggs, methods)),
                                                     out / f"{stem}.png")
    return table, failures




def main(argv: list[str] | None = None) -> int:
    """Entry point of ``zu-fast eval`` (argv without the sub-command). Returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.sweep:
        methods = ["base", "zeroUnlearn", "gd"]
        if "--methods" in (argv if argv is not None else sys.argv):
            methods = ["base"] + [m for m in _methods(args.methods) if m != "base"]
    else:
        methods = ["base"] + [m for m in _methods(args.methods) if m != "base"]
    seeds = _ints(args.seeds)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runner = _Runner(args)
    n_given = "--n" in (argv if argv is not None else sys.argv)
    if args.sweep and not n_given:
        ns = [n for n in (10, 20, 50, 100, 200, 500, 1000) if n <= runner.max_n]
    else:
        ns = _ints(args.n)
    skipped = [n for n in ns if n > runner.max_n]
    ns = [n for n in ns if n <= runner.max_n]
    if skipped:
        runner.log(f"skipping n={skipped}: the world supports at most {runner.max_n} forget records "
                   f"({len(runner.world.people)} people)")
    rows: list[dict[str, Any]] = []
    for n in ns:
        for seed in seeds:
            records = runner.world.records(n, seed)
            for method in methods:
                runner.log(f"[zu-fast eval] n={n} seed={seed} {method} ...")
                try:
                    res = runner.run(method, records)
                except Exception as e:  # one failing method must not lose the others' results
                    runner.log(f"  FAILED: {e!r}")
                    rows.append({"method": method, "n": n, "seed": seed, "error": repr(e)})
                    continue
                rows.append({"method": method, "n": n, "seed": seed, **res})
                runner.log("  " + ", ".join(f"{k} {res[k]:.4g}" for k, _, _ in METRICS)
                           + (f" | phases {res['report'].get('timings')}" if res["report"].get("timings") else ""))
            _write(out, args, runner, methods, ns, seeds, skipped, rows, final=False)
    table, failures = _write(out, args, runner, methods, ns, seeds, skipped, rows, final=True)
    print(table)
    return 1 if failures else 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
