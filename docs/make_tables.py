"""The README's generated tables: configuration names (from ``zu_fast.config.keys``) and environment variables.

    python docs/make_tables.py            # print the configuration table (markdown)
    python docs/make_tables.py --write    # rewrite it in README.md, between its config-table markers
    python docs/make_tables.py --env      # every ZU_FAST_* variable the code reads, one per line

``tests/test_docs_tables.py`` fails when the README's table is not what this prints, or when the README's
environment table misses a variable the code reads.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
START, END = "<!-- config-table:start -->", "<!-- config-table:end -->"

# What each rule of keys.REFERENCE_RULES does (a rule is code; the test checks that this covers every rule).
RULE_NOTES = {
    "nullspace_threshold": "the reference's GD ignores the file's value and hard-codes 0.01; so does zu_fast",
    "layer_selection": "accepted only as `\"all\"` (every listed layer is edited); sets nothing",
    "mom2_update_weight": "MEMIT / AlphaEdit name: sets both corpus weights",
    "forget_weight": "sets both forget weights",
}

# Where the environment variables are read: the package, the Triton kernels (installed as zu_fast.kernels),
# the build, and the benchmark scripts.
ENV_SOURCES = ("zu_fast", "kernels", "csrc", "benchmarks", "setup.py")
ENV_PATTERN = re.compile(r"ZU_FAST_[A-Z_]+")


def _code(value) -> str:
    return f"`{value!r}`" if not isinstance(value, str) else f"`\"{value}\"`"


def config_table() -> str:
    """Markdown: one row per config field (section.field, default, every flat or reference name that sets it),
    then the keys accepted without effect."""
    from zu_fast.config import UnlearnConfig
    from zu_fast.config.keys import FLAT, NO_EFFECT, REFERENCE_GD_DIRS, REFERENCE_RULES
    from zu_fast.config.sections import SECTIONS

    missing = set(REFERENCE_RULES) ^ set(RULE_NOTES)
    if missing:
        raise SystemExit(f"docs/make_tables.py: RULE_NOTES and keys.REFERENCE_RULES differ in {sorted(missing)}")
    cfg = UnlearnConfig()
    rows: dict[tuple[str | None, str], list[str]] = {}
    for name in ("layers", "method", "neutral_target"):
        rows[(None, name)] = []
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            rows[(section, f.name)] = []
    for flat, target in FLAT.items():
        if flat != target[1] or target[0] is not None:  # a top-level field's own name is not an alias
            rows[target].append(f"`{flat}`")
    rule_rows: list[str] = []
    samples = {"nullspace_threshold": 0.02, "layer_selection": "all", "mom2_update_weight": 1.0, "forget_weight": 1.0}
    for key, rule in REFERENCE_RULES.items():
        fields, _ = rule(samples.get(key, 1.0))
        targets = sorted({FLAT[k] for k in fields}, key=lambda t: (t[0] or "", t[1]))
        for t in targets:
            rows[t].append(f"`{key}`†")
        if not targets:
            rule_rows.append(f"| — | | `{key}`† |")
    lines = ["| `section.field` | default | flat and reference names that set it |", "|---|---|---|"]
    for (section, name), aliases in rows.items():
        value = getattr(cfg, name) if section is None else getattr(getattr(cfg, section), name)
        where = name if section is None else f"{section}.{name}"
        lines.append(f"| `{where}` | {_code(value)} | {', '.join(aliases)} |")
    lines += rule_rows
    lines.append("")
    lines.append("† by a rule (`keys.REFERENCE_RULES`): " + "; ".join(f"`{k}`: {v}" for k, v in RULE_NOTES.items())
                 + ".")
    lines.append("")
    lines.append(f"The reference's GD folder ({', '.join(f'`{d}`' for d in REFERENCE_GD_DIRS)}) sets `method` "
                 "`\"gd\"` and the GD constants the reference hard-codes (`keys.REFERENCE_GD`). Accepted without "
                 "effect, silently: " + ", ".join(f"`{k}`" for k, why in NO_EFFECT.items() if not why)
                 + "; with one warning saying why: " + ", ".join(f"`{k}`" for k, why in NO_EFFECT.items() if why)
                 + ". Any other key is an error naming it.")
    return "\n".join(lines) + "\n"


def readme_config_block(text: str) -> str:
    """The README's generated block (between the markers, without them)."""
    try:
        return text.split(START, 1)[1].split(END, 1)[0].strip("\n") + "\n"
    except IndexError:
        raise SystemExit(f"README.md has no {START} ... {END} block") from None


def code_env_vars(root: Path = ROOT) -> set[str]:
    """Every ZU_FAST_* name in the code (Python and shell sources under ENV_SOURCES)."""
    names: set[str] = set()
    for src in ENV_SOURCES:
        p = root / src
        files = [p] if p.is_file() else [f for f in p.rglob("*") if f.suffix in (".py", ".sh", ".cu", ".cpp", ".h")]
        for f in files:
            names.update(ENV_PATTERN.findall(f.read_text(errors="replace")))
    return names


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write", action="store_true", help="rewrite the table in README.md")
    p.add_argument("--env", action="store_true", help="list the ZU_FAST_* variables the code reads")
    a = p.parse_args(argv)
    if a.env:
        print("\n".join(sorted(code_env_vars())))
        return
    table = config_table()
    if not a.write:
        sys.stdout.write(table)
        return
    text = README.read_text()
    before, rest = text.split(START, 1)
    after = rest.split(END, 1)[1]
    README.write_text(f"{before}{START}\n{table}{END}{after}")


if __name__ == "__main__":
    main()
