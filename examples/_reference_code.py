"""Run MEMIT-family code from the user's own checkout with zu_fast's drop-ins (shared by the two examples).

Their code cannot be committed here, so the examples copy the folders they need from the checkout the
user names (``--memit DIR`` / ``MEMIT_PATH``, ``--alphaedit DIR`` / ``ALPHAEDIT_PATH``) into a temporary
folder, change the lines listed as ``Patch`` (each printed as a unified diff: these ARE the one-line
changes), and import from there. Nothing in the checkout is modified.

Three kinds of change, kept apart (only the first is printed as a diff):
- the drop-ins: what a user of that code base would change to run on zu_fast;
- transformers shims (``shim=True``): their 2022–24 code indexes ``output[0]`` of a decoder layer, which
  transformers ≥ 4.56 returns as a tensor rather than a tuple; ``_out(o)`` takes the hidden states either way;
- CPU shims (``cpu_only=True``, applied only when no CUDA device is present): their code hard-codes
  ``"cuda"`` and loads data with 2 worker processes; on a CPU machine ``"cuda"`` becomes ``"cpu"`` and
  the loader runs in-process (one thread, as the timings are taken).
"""

from __future__ import annotations

import ast
import difflib
import fnmatch
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import dataclass
from pathlib import Path
from statistics import median

import torch

import zu_fast
import zu_fast.compat


@dataclass(frozen=True)
class Patch:
    files: str  # glob, relative to the copied root
    old: str  # exact text (every occurrence is replaced; it must occur at least once)
    new: str
    why: str
    cpu_only: bool = False
    shim: bool = False


_LOSS_LAYER_OUT = "tr[hparams.layer_module_tmp.format(loss_layer)].output[0]"
TRANSFORMERS_SHIMS = [
    Patch("*/compute_z.py", "from util import nethook",
          "from util import nethook\n\n_out = lambda o: o[0] if isinstance(o, tuple) else o  # decoder layer output",
          "a decoder layer's hidden states, whether it returns a tuple or (transformers >= 4.56) a tensor", shim=True),
    Patch("*/compute_z.py", "cur_out[0]", "_out(cur_out)", "idem", shim=True),
    Patch("*/compute_z.py", _LOSS_LAYER_OUT, _LOSS_LAYER_OUT.replace(".output[0]", ".output").join(("_out(", ")")),
          "idem", shim=True),
]
# MEMIT (2022) tokenizes the new answer assuming GPT-2's tokenizer (no BOS); a Llama tokenizer prepends <s>, so
# its target would start with BOS. AlphaEdit (2024) strips it with these two lines; the same lines for MEMIT.
_TARGET_IDS = """    target_ids = tok(request["target_new"]["str"], return_tensors="pt").to("cuda")[
        "input_ids"
    ][0]
"""
BOS_SHIM = Patch("memit/compute_z.py", _TARGET_IDS, _TARGET_IDS + """
    if target_ids[0] == tok.bos_token_id or target_ids[0] == tok.unk_token_id:
        target_ids = target_ids[1:]
""", "MEMIT assumes a tokenizer without BOS; AlphaEdit's two lines that drop it", shim=True)
CPU_SHIMS = [
    Patch("*/*.py", '"cuda"', '"cpu"', 'their code hard-codes the device "cuda"', cpu_only=True),
    Patch("*/*.py", ".cuda()", ".cpu()", "their code moves tensors with .cuda()", cpu_only=True),
    Patch("rome/layer_stats.py", "num_workers=2", "num_workers=0",
          "their statistics loader tokenizes in 2 worker processes; one thread here", cpu_only=True),
]


def checkout(flag_value: str | None, env: str, marker: str) -> Path:
    """The user's checkout, from ``--flag`` or the environment variable; exits with a message if absent."""
    path = flag_value or os.environ.get(env)
    if not path or not (Path(path) / marker).exists():
        sys.exit(f"point this example at a checkout: --{env.split('_')[0].lower()} DIR or {env}=DIR "
                 f"(the folder that holds {marker})")
    return Path(path).resolve()


def prepare(src: Path, folders: list[str], patches: list[Patch], *, cpu: bool, show: bool = True) -> Path:
    """Copy ``folders`` (and ``globals.yml``) of ``src`` to a temporary folder, apply ``patches``
    (the CPU shims only when ``cpu``), print each change as a diff, and put the copy first on sys.path."""
    root = Path(tempfile.mkdtemp(prefix=f"zu_fast_{src.name}_"))
    for name in folders:
        shutil.copytree(src / name, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(src / "globals.yml", root / "globals.yml")
    for patch in patches:
        if patch.cpu_only and not cpu:
            continue
        hits = [p for p in sorted(root.rglob("*.py")) if fnmatch.fnmatch(str(p.relative_to(root)), patch.files)]
        changed = 0
        for path in hits:
            text = path.read_text()
            if patch.old not in text:
                continue
            new = text.replace(patch.old, patch.new)
            path.write_text(new)
            changed += 1
            if show and not (patch.cpu_only or patch.shim):
                rel = str(path.relative_to(root))
                diff = difflib.unified_diff(text.splitlines(), new.splitlines(), f"a/{rel}", f"b/{rel}", n=0,
                                            lineterm="")
                print(f"# {patch.why}\n" + "\n".join(diff))
        if not changed:
            raise SystemExit(f"{patch.files}: {patch.old!r} not found; is this the expected checkout?")
    if show:
        shims = [p for p in patches if p.shim or (p.cpu_only and cpu)]
        print("# shims (not drop-ins): " + "; ".join(dict.fromkeys(p.why for p in shims if p.why != "idem")))
    sys.path.insert(0, str(root))
    return root


def datasets_stand_in() -> None:
    """``rome/layer_stats.py`` imports ``datasets.load_dataset`` at import time (to download Wikipedia). Where
    the ``datasets`` package is absent, a stand-in module lets the import succeed; the examples hand their
    layer_stats the local corpus by replacing its ``load_dataset`` (nothing is downloaded either way)."""
    if importlib.util.find_spec("datasets") is None and "datasets" not in sys.modules:
        mod = types.ModuleType("datasets")

        def load_dataset(*args, **kwargs):
            raise RuntimeError("no downloads here: the examples pass the corpus to layer_stats themselves")

        mod.load_dataset = load_dataset
        sys.modules["datasets"] = mod


def local_corpus(module: types.ModuleType, texts: list[str]) -> None:
    """Make ``module.load_dataset`` (their ``layer_stats``' loader) return ``texts`` as a dataset."""
    rows = [{"text": t} for t in texts]
    module.load_dataset = lambda *args, **kwargs: {"train": rows}


def function_from(path: Path, name: str, namespace: dict) -> types.FunctionType:
    """One top-level function of a file whose imports are too heavy to run (their evaluate.py imports
    every baseline and GLUE): its source, compiled in ``namespace``."""
    tree = ast.parse(path.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    code = compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec")
    exec(code, namespace)  # noqa: S102 - their own function, from the user's checkout
    return namespace[name]


class working_folder:  # noqa: N801 - used like contextlib.chdir (Python ≥ 3.11)
    """chdir for the block: their util/globals.py reads ``globals.yml`` from the working folder."""

    def __init__(self, path: Path) -> None:
        self.path, self.before = path, None

    def __enter__(self) -> None:
        self.before = os.getcwd()
        os.chdir(self.path)

    def __exit__(self, *exc) -> None:
        os.chdir(self.before)


def small_model_requests(world, n: int) -> list[dict]:
    """``n`` CounterFact-style edit requests on the small model's world: each fact rewritten to another
    person's answer of the same relation (MEMIT / AlphaEdit edit facts; they do not unlearn)."""
    recs = world.records(n)
    out = []
    for i, r in enumerate(recs):
        truth = r["target_true"]["str"]
        other = next((x["target"] for x in r["neighborhood_prompts"] if x["target"] != truth), None)
        if other is None:
            continue
        out.append({"case_id": i, "prompt": r["prompt"], "subject": r["subject"],
                    "target_new": {"str": other}, "target_true": {"str": truth}})
    return out


# ----------------------------------------------------------------------------------- timing ------
STATS_VARIANTS = {  # --time: the statistics of the edited layers, each variant in its own process
    "theirs": "{name} rome/layer_stats.py (their code), one call per layer",
    "theirs+op": "{name} layer_stats, SecondMoment.add → zu_fast.ops.cov_accumulate (drop-in 2)",
    "compat": "zu_fast.compat.layer_stats (drop-in 1), one call per layer",
    "one_pass": "zu_fast.collect_stats once + compat.layer_stats_from (drop-in 1b)",
}


def measure(variant: str, their_layer_stats: types.ModuleType, model, tok, texts: list[str], layers: list[int],
            module: str, workdir: Path, repeats: int) -> dict:
    """Seconds (per repeat: CPU time of this one-thread process, and wall time) to get C = E[k kᵀ] of every layer
    in ``layers`` the way ``variant`` does, and the C's. Nothing cached between repeats (a fresh stats folder,
    their force_recompute). CPU time is what a shared machine measures reliably: wall time also counts the
    other processes' turns on the cores."""
    torch.set_num_threads(1)
    local_corpus(their_layer_stats, texts)
    seconds, wall, moments = [], [], {}
    for _ in range(repeats):
        stats_dir = Path(tempfile.mkdtemp(dir=workdir))
        corpus = stats_dir / "corpus.txt"
        corpus.write_text("".join(t + "\n" for t in texts))
        t0, w0 = time.process_time(), time.perf_counter()
        if variant in ("theirs", "theirs+op"):
            for layer in layers:
                st = their_layer_stats.layer_stats(model, tok, module.format(layer), stats_dir, "wikipedia", ["mom2"],
                                                   sample_size=len(texts), precision="float32", download=False,
                                                   progress=lambda it, total=None: it, force_recompute=True)
                moments[layer] = st.mom2.moment().double()
        else:
            if variant == "compat":
                get = zu_fast.compat.layer_stats
            else:  # one pass over every layer, then their per-layer calls answered from it
                cfg = zu_fast.UnlearnConfig.for_model(model, layers=layers, rewrite_module_tmp=module, progress=False,
                                                      mom2_n_samples=len(texts))
                get = zu_fast.compat.layer_stats_from(zu_fast.collect_stats(model, tok, corpus, cfg, cache=False))
            for layer in layers:
                st = get(model, tok, module.format(layer), stats_dir, corpus, ["mom2"], sample_size=len(texts),
                         precision="float32", progress=None)
                moments[layer] = st.mom2.moment().double()
        seconds.append(time.process_time() - t0)
        wall.append(time.perf_counter() - w0)
    return {"seconds": seconds, "wall": wall, "moments": moments}


def timing_table(script: str, src: Path, cpu: bool, repeats: int, name: str, layers: list[int], module: str,
                 n_texts: int) -> None:
    """Run ``script --time-one VARIANT`` for every variant (own process, OMP_NUM_THREADS=1) and print a markdown
    table: median seconds, speed-up over their code, and how far each C is from theirs."""
    results = {}
    for variant in STATS_VARIANTS:
        with tempfile.NamedTemporaryFile(suffix=".pt", delete=False) as f:
            out = Path(f.name)
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        subprocess.run([sys.executable, script, "--checkout", str(src), "--time-one", variant, "--repeats",
                        str(repeats), "--out", str(out)] + (["--cpu"] if cpu else []), check=True, env=env)
        results[variant] = torch.load(out)
        out.unlink()
    theirs = results["theirs"]
    base = median(theirs["seconds"])
    print(f"\n{name}: statistics of layers {layers} ({module}) over the small model's {n_texts} training texts, "
          f"{'CPU' if cpu else 'GPU'}, 1 thread, median of {repeats} (CPU seconds of the process; wall seconds):\n")
    print("| statistics | CPU s | wall s | speed-up vs theirs (CPU s) | max rel. diff of C vs theirs |\n"
          "|---|---|---|---|---|")
    for variant, what in STATS_VARIANTS.items():
        r = results[variant]
        diff = max(float((r["moments"][la] - theirs["moments"][la]).abs().max() / theirs["moments"][la].abs().max())
                   for la in layers)
        print(f"| {what.format(name=name)} | {median(r['seconds']):.2f} | {median(r['wall']):.2f} "
              f"| {base / median(r['seconds']):.2f}× | {diff:.1e} |")
