"""The issue-24 table: presets old and new on held-out seeds, every column the issue asks for.

Reads the ``results.json`` of ``zu-fast eval`` runs (with ``--probes quant,lens,generate`` for the robustness
columns) and prints one markdown table per n: mean ± std over seeds of Eff, Gen, Spe, PPL, Subject-other,
relearning after 20 steps (same-subject and unrelated, % of what the edit removed), int4 Eff / Gen, greedy and
EOS-forbidden decoding (% of forget prompts and paraphrases naming the answer) and the logit lens at the prompt's
end (max over layers of the % of forgotten answers ranked first among the relation's candidates), plus how many
seeds met the paper's bar (Eff ≤ 10, Gen ≤ 30, Spe ≥ 0.75 × base, PPL ≤ 1.10 × base) and the issue's goals
(Subject-other ≥ 0.8 × base, same-subject relearning ≤ 30% back).

    python benchmarks/retain_table.py LABEL=DIR [LABEL=DIR ...]
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

from zu_fast.eval.harness import with_recovery

COLUMNS = [  # (key, label, digits)
    ("efficacy", "Eff ↓", 1), ("generalization", "Gen ↓", 1), ("specificity", "Spe ↑", 1), ("perplexity", "PPL ↓", 3),
    ("subject_other", "Subj-other ↑", 1), ("relearn_same_subject_back", "RL@20 same ↓", 0),
    ("relearn_unrelated_back", "RL@20 unrel. ↓", 0), ("quant_int4_eff", "int4 Eff ↓", 1),
    ("quant_int4_gen", "int4 Gen ↓", 1), ("gen_greedy", "greedy ↓", 1), ("gen_greedy_no_eos", "no-EOS ↓", 1),
    ("lens_last", "lens@last ↓", 1),
]


def _flat(row: dict) -> dict:
    out = dict(row)
    out.update((row.get("probes") or {}).get("summary", {}))
    return out


def _checks(row: dict, base: dict) -> tuple[bool, bool]:
    bar = (row["efficacy"] <= 10 and row["generalization"] <= 30 and row["specificity"] >= 0.75 * base["specificity"]
           and row["perplexity"] <= 1.10 * base["perplexity"])
    back = row.get("relearn_same_subject_back", math.nan)
    goal = row.get("subject_other", math.nan) >= 0.8 * base.get("subject_other", math.nan) and back <= 30
    return bar, goal


def table(runs: list[tuple[str, Path]]) -> str:
    rows = []
    for label, folder in runs:
        data = json.loads((Path(folder) / "results.json").read_text())
        for r in with_recovery(data["runs"]):
            if "error" not in r:
                rows.append({**_flat(r), "label": label})
    parts = []
    for n in sorted({r["n"] for r in rows}):
        base = {r["seed"]: r for r in rows if r["n"] == n and r["method"] == "base"}
        lines = ["| n | preset | method | seeds | " + " | ".join(c[1] for c in COLUMNS) + " | bar | goals |",
                 "|---:|---|---|---|" + "---:|" * len(COLUMNS) + "---:|---:|"]
        groups: dict[tuple[str, str], list[dict]] = {}
        for r in rows:
            if r["n"] == n and (r["method"] != "base" or r["label"] == rows[0]["label"]):
                groups.setdefault((r["label"] if r["method"] != "base" else "–", r["method"]), []).append(r)
        for (label, method), rs in groups.items():
            cells = []
            for key, _, digits in COLUMNS:
                vals = [float(r[key]) for r in rs if key in r and not math.isnan(float(r[key]))]
                if not vals:
                    cells.append("–")
                    continue
                m = statistics.fmean(vals)
                sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                cells.append(f"{m:.{digits}f} ± {sd:.{digits}f}")
            checks = [_checks(r, base[r["seed"]]) for r in rs if r["seed"] in base] if method != "base" else []
            bar = f"{sum(b for b, _ in checks)}/{len(checks)}" if checks else "–"
            goal = f"{sum(g for _, g in checks)}/{len(checks)}" if checks else "–"
            seeds = f"{min(r['seed'] for r in rs)}–{max(r['seed'] for r in rs)}"
            lines.append(f"| {n} | {label} | {method} | {seeds} | " + " | ".join(cells) + f" | {bar} | {goal} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


if __name__ == "__main__":
    runs = [(a.split("=", 1)[0], Path(a.split("=", 1)[1])) for a in sys.argv[1:]]
    if not runs:
        raise SystemExit(__doc__)
    print(table(runs))
