"""Every causal-LM family transformers ships, end to end on a tiny random model (issue 26).

    OMP_NUM_THREADS=1 python benchmarks/family_sweep.py                 # all of MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    OMP_NUM_THREADS=1 python benchmarks/family_sweep.py llama gpt_bigcode  # some

Per family (``tests/all_families.py``): the default config shrunk to a tiny one, ``AutoModelForCausalLM.from_config``
(random weights, nothing downloaded) and one forward; then ``for_model → collect_stats → unlearn → restore``, with
every parameter and buffer hashed before and after. Outcomes: ``ok`` (edited, restored bit-exact), ``refused`` (a
ZuFastError, weights unchanged; where it was raised), ``no edit`` (nothing changed, flagged), ``not built`` (no
working tiny model of the family can be made here; why), ``error`` (anything else: a bug). Writes
``benchmarks/results/family_sweep.{json,md}`` and prints the grouped table of the README ("Supported model
families"). ``tests/test_all_families.py`` reruns a representative subset in CI and checks it against the JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import signal
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the tiny-config builder and tokenizer live with the tests

from all_families import causal_families, run_family  # noqa: E402


class _Timeout(Exception):
    pass


def _alarm(*_):
    raise _Timeout


def category(row: dict) -> str:
    """A short reason for the grouped table."""
    why = row.get("why", "")
    if row["outcome"] == "ok":
        return "ok"
    if row["outcome"] == "refused":
        if "hard limit" in why:
            return "refused in unlearn: the edit wrecks a layer (beyond the hard limit; weights put back)"
        if "encoder-only" in why or "encoder-decoder" in why:
            return "refused by for_model: an encoder model"
        if "matched nothing" in why:
            return "refused by for_model: no decoder layers with an MLP output projection it can name"
        if "not found in" in why or "shared expert" in why:
            return "refused by for_model: the edited module is not where the family's layers keep it"
        if "residual stream" in why:
            return "refused by unlearn before any change: several residual streams (hyper-connections)"
        if "this MoE implementation is not supported" in why:
            return "refused at the first statistics batch: its MoE experts are called in a way zu_fast cannot read"
        return f"refused ({row.get('stage')}): {why[:80]}"
    if row["outcome"] == "no edit":
        return "no edit (flagged nothing_edited): no request reached an editable component"
    if row["outcome"] == "not built":
        return "not built: no working tiny model from the shrunk default config (see the JSON for why)"
    return f"error ({row.get('stage')})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("families", nargs="*", help="model_type values (default: every causal-LM family)")
    p.add_argument("--timeout", type=int, default=180, help="seconds per family")
    p.add_argument("--out", default=str(HERE / "results" / "family_sweep"), help="path stem of the .json/.md")
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass
    families = args.families or causal_families()
    signal.signal(signal.SIGALRM, _alarm)
    rows = []
    t0 = time.perf_counter()
    for fam in families:
        signal.alarm(args.timeout)
        try:
            row = run_family(fam)
        except _Timeout:
            row = {"family": fam, "outcome": "error", "stage": None, "why": f"timeout ({args.timeout} s)"}
        finally:
            signal.alarm(0)
        rows.append(row)
        print(f"{fam:28s} {row['outcome']:10s} {row.get('stage') or '':14s} {row.get('seconds', '')!s:>6} "
              f"{row.get('why', '')[:100]}", flush=True)
    total = time.perf_counter() - t0
    env = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "transformers": transformers.__version__,
           "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
           "cpu": platform.processor() or platform.machine(), "seconds": round(total, 1)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not args.families:  # a partial run never overwrites the full record
        out.with_suffix(".json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1) + "\n")
        lines = [f"# Every causal-LM family of transformers {env['transformers']}, end to end on a tiny random model",
                 "", f"{env['date']}, CPU ({env['cpu']}, {env['threads']} thread(s)), torch {env['torch']}; "
                 f"{len(rows)} families in {total:.0f} s. Command: `OMP_NUM_THREADS=1 python "
                 "benchmarks/family_sweep.py`.", "",
                 "| family | class | outcome | where | edited module, or why |", "|---|---|---|---|---|"]
        for r in rows:
            what = r.get("module") if r["outcome"] == "ok" else r.get("why", "")
            what = (what or "").replace("|", "\\|")
            lines.append(f"| `{r['family']}` | {r.get('class') or ''} | {r['outcome']} | {r.get('stage') or ''} | "
                         f"{what[:220]} |")
        out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    groups: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        groups[category(r)].append(r["family"])
    print(f"\n{len(rows)} families in {total:.0f} s\n")
    print("| outcome | families |\n|---|---|")
    for cat, fams in sorted(groups.items(), key=lambda kv: (not kv[0].startswith("ok"), kv[0])):
        print(f"| {cat} ({len(fams)}) | " + ", ".join(f"`{f}`" for f in fams) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
