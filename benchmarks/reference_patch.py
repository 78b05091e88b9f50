"""Make a local copy of the authors' ZeroUnlearn code runnable on CPU, offline (for vs_reference.py).

    python benchmarks/reference_patch.py --reference /path/to/XMUDeepLIT/ZeroUnlearn --out /tmp/zu_ref

The published code does not run as is. This script copies it to ``--out`` and applies the smallest
edits that make it run here, each listed in ``PATCHES`` (file, what, why). It changes no numerics:
the statistics, targets, projector and solve are the authors' own lines. Nothing of the reference is
committed to this repository; only this description of the edits is.

What vs_reference.py adds at run time, without editing files: a stand-in ``datasets`` module whose
``load_from_disk`` returns the corpus given on the command line (the reference otherwise downloads
Wikipedia), and fixed context templates (the reference samples them with the global RNG).
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

# (path glob, regex, replacement, why)
PATCHES: list[tuple[str, str, str, str]] = [
    ("ZeroUnlearn*/*_main.py", r'(!= " "):[^\n]*V_u\n', r"\1:\n",
     "a comment written without '#' after an if-condition is a syntax error"),
    ("ZeroUnlearn/compute_*.py", r"from \.UnLearn_hparams import UnLearningHyperParams",
     "from .ZeroUnlearn_hparams import ZeroUnlearnHyperParams as UnLearningHyperParams",
     "the module is imported under a name that does not exist"),
    ("ZeroUnlearn_GD/compute_*.py", r"from \.UnLearn_hparams import UnLearningHyperParams",
     "from .ZeroUnlearnGD_hparams import ZeroUnlearnGDHyperParams as UnLearningHyperParams",
     "the module is imported under a name that does not exist"),
    ("ZeroUnlearn_GD/*.py", r"from \.ZeroUnlearnGDHyperParams import",
     "from .ZeroUnlearnGD_hparams import", "the module is imported under a name that does not exist"),
    ("ZeroUnlearn*/*.py", r'"cuda"', '"cpu"', 'the device is hard-coded as "cuda"'),
    ("rome/layer_stats_retain.py", r'"cuda"', '"cpu"', 'the device is hard-coded as "cuda"'),
    ("ZeroUnlearn*/*_main.py", r"num_workers=2", "num_workers=0",
     "worker processes would re-import the stand-in datasets module"),
    ("rome/layer_stats_retain.py", r"num_workers=2", "num_workers=0",
     "worker processes would re-import the stand-in datasets module"),
    ("ZeroUnlearn*/*_main.py", r"pin_memory=True", "pin_memory=False", "no CUDA device to pin for"),
    ("rome/layer_stats_retain.py", r"pin_memory=True", "pin_memory=False", "no CUDA device to pin for"),
]


def patch(reference: Path, out: Path) -> list[str]:
    """Copy ``reference`` to ``out`` (refusing to overwrite a non-empty folder) and apply PATCHES."""
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} exists and is not empty; choose another --out")
    shutil.copytree(reference, out, ignore=shutil.ignore_patterns(".git"), dirs_exist_ok=True)
    log = []
    for pattern, regex, repl, why in PATCHES:
        for path in sorted(out.glob(pattern)):
            text = path.read_text()
            new, n = re.subn(regex, repl, text)
            if n:
                path.write_text(new)
                log.append(f"{path.relative_to(out)}: {n} × {why}")
    return log


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reference", required=True, type=Path, help="a checkout of XMUDeepLIT/ZeroUnlearn")
    p.add_argument("--out", required=True, type=Path, help="where to write the patched copy")
    args = p.parse_args(argv)
    for line in patch(args.reference, args.out):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
