"""EasyEdit's own editor running ZeroUnlearn (zu_fast.compat.easyedit) on the project's small model.

EasyEdit (https://github.com/zjunlp/EasyEdit) cannot be committed here; point this script at a checkout:

    EASYEDIT_PATH=/path/to/EasyEdit python examples/easyedit_with_zu_fast.py --n 10
    python examples/easyedit_with_zu_fast.py --easyedit /path/to/EasyEdit --gd --batch

What it does, in EasyEdit's own terms:

1. ``zu_fast.compat.easyedit.register()`` adds ``ZeroUnlearn`` / ``ZeroUnlearn-GD`` to EasyEdit's
   ``ALG_DICT`` (and to ``BatchEditor``'s batchable methods) — the whole integration;
2. ``ZeroUnlearnHyperParams.from_hparams`` reads the shipped YAML ``zu_fast/presets/easyedit/<alg>/zu-tiny.yaml``
   (``model_name`` and ``mom2_dataset`` set to the small model and its training texts, ``device: cpu``);
3. ``BaseEditor.from_hparams(hparams)`` loads the model from ``model_name`` (its loader picks Llama by the
   folder's name, so the cached model is linked as ``<tmp>/zu-tiny-llama``) and ``editor.edit(...)`` (one
   request per edit, restored after each through ``weights_copy``) or ``editor.batch_edit(...)`` (all
   requests in one edit) runs EasyEdit's edit-and-evaluate loop, which prints its metrics.

The requests: ``prompt`` (subject spelled out), ``subject``, ``ground_truth`` = the answer to forget,
``target_new`` = the tokenizer's EOS token (ZeroUnlearn's neutral target), ``rephrase_prompt`` = a held-out
paraphrase, ``locality`` = neighbouring facts about other people (their answers must not change), and
``portability["forgotten_answer"]`` = the prompt and paraphrase with the TRUE answer: EasyEdit's token
accuracy of the forgotten answer, high before the edit and low after it.

``--stub-missing``: EasyEdit imports every algorithm and its optional dependencies (peft, sklearn, nltk,
openai, ...) at ``import easyeditor``. On a machine without them, this stands in an empty module for each
missing one (listed in the output) so that the import succeeds; nothing in the edit-and-evaluate path
calls them. Not needed where EasyEdit's requirements are installed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

from zu_fast.compat import easyedit
from zu_fast.eval import tinylm

# EasyEdit's optional imports (its requirements.txt, by import name), and the transformers module it
# imports that transformers 5 no longer has.
OPTIONAL = ("peft", "sklearn", "openai", "nltk", "einops", "datasets", "sentence_transformers", "higher", "hydra",
            "omegaconf", "timm", "fairscale", "zhipuai", "qwen_vl_utils", "iopath", "torchvision", "pandas",
            "gpustat", "cv2", "av", "rouge", "bitsandbytes", "transformers.modeling_attn_mask_utils")


class _Anything(type):
    """A class that answers any attribute, call or subscript with another such class (import-time use only)."""

    def __getattr__(cls, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything(name, (), {})

    def __call__(cls, *args, **kwargs):
        return _Anything("instance", (), {})

    def __getitem__(cls, key):
        return cls

    def __or__(cls, other):
        return cls


class _StubModule(types.ModuleType):
    __path__: list[str] = []

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything(name, (), {"__module__": self.__name__})


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Last on sys.meta_path: serves an empty module for the missing names only."""

    def __init__(self, names: set[str]) -> None:
        self.names, self.stubbed = names, []

    def covers(self, fullname: str) -> bool:
        return fullname in self.names or fullname.split(".")[0] in self.names

    def find_spec(self, fullname, path, target=None):
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True) if self.covers(fullname) else None

    def create_module(self, spec):
        self.stubbed.append(spec.name)
        return _StubModule(spec.name)

    def exec_module(self, module) -> None:
        pass


def stub_missing(names=OPTIONAL) -> _StubFinder:
    """Stand in empty modules for the ``names`` that cannot be imported; availability probes
    (``importlib.util.find_spec``, which transformers uses) still see them as absent."""
    missing = set()
    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.add(name)
    finder = _StubFinder(missing)
    sys.meta_path.append(finder)
    real_find_spec = importlib.util.find_spec

    def find_spec(name, package=None):
        return None if finder.covers(name) else real_find_spec(name, package)

    importlib.util.find_spec = find_spec
    return finder


@contextlib.contextmanager
def working_folder(path: Path):
    """chdir for the block (contextlib.chdir is Python ≥ 3.11)."""
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def requests_of(world, n: int, tok) -> dict:
    """EasyEdit's ``editor.edit`` arguments for ``n`` facts of the small model's world."""
    recs = world.records(n)
    full = [r["prompt"].format(r["subject"]) for r in recs]
    truth = [r["target_true"]["str"] for r in recs]
    para = [r["paraphrase_prompts"][0] for r in recs]
    return {
        "prompts": full,
        "subject": [r["subject"] for r in recs],
        "ground_truth": truth,
        "target_new": [tok.eos_token] * n,
        "rephrase_prompts": para,
        "locality_inputs": {"neighborhood": {"prompt": [[x["prompt"] for x in r["neighborhood_prompts"]] for r in recs],
                                             "ground_truth": [[x["target"] for x in r["neighborhood_prompts"]]
                                                              for r in recs]}},
        "portability_inputs": {"forgotten_answer": {"prompt": [[f, p] for f, p in zip(full, para)],
                                                    "ground_truth": [[t, t] for t in truth]}},
    }


def summary(metrics: list[dict]) -> dict[str, dict[str, float]]:
    """Mean of each accuracy EasyEdit reports, pre and post (its own summary_metrics, as a dict)."""
    out: dict[str, dict[str, float]] = {}
    for phase in ("pre", "post"):
        vals: dict[str, list[float]] = {}
        for m in metrics:
            ph = m.get(phase, {})
            for k in ("rewrite_acc", "rephrase_acc"):
                if k in ph:
                    vals.setdefault(k, []).append(float(np.mean(ph[k])))
            for section in ("locality", "portability"):
                for k, v in (ph.get(section) or {}).items():
                    if k.endswith("acc"):
                        vals.setdefault(f"{section}.{k}", []).append(float(np.mean(v)))
        out[phase] = {k: round(float(np.mean(v)), 4) for k, v in vals.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--easyedit", default=os.environ.get("EASYEDIT_PATH"), help="EasyEdit checkout (or EASYEDIT_PATH)")
    ap.add_argument("--n", type=int, default=10, help="facts to forget")
    ap.add_argument("--gd", action="store_true", help="ZeroUnlearn-GD (else the closed form)")
    ap.add_argument("--batch", action="store_true", help="batch_edit: all facts in one edit (else one per edit)")
    ap.add_argument("--stub-missing", action="store_true", help="stand in EasyEdit's missing optional imports")
    ap.add_argument("--out", default=None, help="write EasyEdit's per-request metrics and the summary here (JSON)")
    args = ap.parse_args()
    if not args.easyedit or not (Path(args.easyedit) / "easyeditor").is_dir():
        sys.exit("give an EasyEdit checkout: --easyedit DIR or EASYEDIT_PATH=DIR (the folder with easyeditor/)")
    finder = stub_missing() if args.stub_missing else None
    sys.path.insert(0, str(Path(args.easyedit).resolve()))
    from easyeditor import BaseEditor  # noqa: E402 (EasyEdit's top-level import)

    easyedit.register()  # ALG_DICT["ZeroUnlearn"], ALG_DICT["ZeroUnlearn-GD"], batchable

    _, tok0, world = tinylm.load_or_train(progress=False)
    work = Path(tempfile.mkdtemp(prefix="zu_fast_easyedit_"))
    (work / "zu-tiny-llama").symlink_to(tinylm.model_dir())  # EasyEdit picks its Llama loader by the name
    corpus = work / "corpus.txt"
    corpus.write_text("".join(t.replace("\n", " ") + "\n" for t in world.training_texts()))
    hparams = easyedit.ZeroUnlearnHyperParams.preset("zu-tiny", gd=args.gd).replace(
        model_name=str(work / "zu-tiny-llama"), device="cpu", mom2_dataset=str(corpus),
        batch_size=args.n if args.batch else 1)
    print(f"EasyEdit {args.easyedit} | alg_name {hparams.alg_name} | {'batch_edit' if args.batch else 'edit'} | "
          f"{args.n} facts | stubbed: {sorted(set(finder.stubbed)) if finder else 'none'}")
    with working_folder(work):  # EasyEdit writes logs/run.log and logs/results.json into the working folder
        editor = BaseEditor.from_hparams(hparams)
        kw = requests_of(world, args.n, tok0)
        t0 = time.perf_counter()
        if args.batch:
            metrics, _, _ = editor.batch_edit(**kw, sequential_edit=False)
        else:
            metrics, _, _ = editor.edit(**kw, sequential_edit=False)
        seconds = time.perf_counter() - t0
    result = summary(metrics)
    print(json.dumps({"summary": result, "seconds": round(seconds, 1)}, indent=1))
    if args.out:
        plain = lambda x: x.tolist() if hasattr(x, "tolist") else str(x)  # noqa: E731 (numpy scalars in metrics)
        Path(args.out).write_text(json.dumps({"summary": result, "seconds": seconds, "metrics": metrics}, indent=1,
                                             default=plain))


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    main()
