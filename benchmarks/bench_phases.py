"""pytest-benchmark: every phase of an edit on a real model, at two shapes, with its work beside its time.

    pytest benchmarks/bench_phases.py --benchmark-only [--benchmark-autosave]
    pytest benchmarks/bench_phases.py --benchmark-only -k tiny          # the small shape only (seconds)

Shapes (the cases of ``benchmarks/vs_reference.py``, the paper's settings):

- ``tiny``: a 4-layer Llama (d 48, d_ff 128), 200 corpus texts, 4 requests, layers [1, 2];
- ``tinylm``: the project's small model (6 layers, d 128, d_ff 768; trained and cached on first use), 1000
  of its world's texts, 10 records, layers [1, 2, 3].

Phases: ``statistics`` (``collect_stats``, one pass), ``keys`` (the forget keys at every edited layer),
``targets`` (step 2, δ at the z layer), ``step3`` (the original representations at the first edited layer,
``original_representation="optimized"``), ``solve`` (the first layer's closed form or GD), ``update`` (applying
the whole edit to the weights: ``Edit.apply``), ``edit`` (``unlearn`` on cached statistics) and ``end_to_end``
(statistics and edit). Each phase replays the call one ``unlearn`` made on the unedited model (captured once
per shape), so the inputs are the real ones.

Each result's ``extra_info`` holds the phase's work in token-layer evaluations (forward and backward, real and
padded tokens; ``benchmarks/work_count.py``), counted once outside the timed rounds: it does not depend on the
machine, so it is the number to compare across runs on a shared CPU. See docs/performance-tracking.md.
"""

from __future__ import annotations

import copy
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import vs_reference as vr  # noqa: E402
from work_count import WorkCounter  # noqa: E402

import zu_fast  # noqa: E402

SHAPES = {"tiny": lambda: vr.golden_case(200), "tinylm": lambda: vr.tinylm_case(1000, 10)}
ROUNDS = {"tiny": 3, "tinylm": 1}
# phase → (module attribute path in zu_fast.method, which call to replay)
CAPTURED = {"keys": ("components.read_at_subject", 0), "targets": ("unlearn.z_targets", 0),
            "step3": ("unlearn.original_basis", 0), "solve": ("unlearn._solve", 0)}


def _resolve(path: str):
    import importlib

    mod_name, attr = path.rsplit(".", 1)
    return importlib.import_module(f"zu_fast.method.{mod_name}"), attr


class Problem:
    """One shape and method: the case, its config, its statistics, and one unlearn's calls (on the unedited
    model, which the edit is restored from)."""

    def __init__(self, shape: str, method: str):
        warnings.simplefilter("ignore")
        self.shape, self.method = shape, method
        self.case = SHAPES[shape]()
        self.model = copy.deepcopy(self.case.model)
        self.cfg = vr.zu_config(method, self.case.layers, self.case.n_layers)
        self.stats = zu_fast.collect_stats(self.model, self.case.tok, self.case.texts, self.cfg, cache=False,
                                           progress=False)
        self.calls: dict[str, list] = {k: [] for k in CAPTURED}
        saved = []
        for phase, (path, _) in CAPTURED.items():
            mod, attr = _resolve(path)
            fn = getattr(mod, attr)

            def rec(*a, _fn=fn, _phase=phase, **k):
                self.calls[_phase].append((_fn, a, k))
                return _fn(*a, **k)

            saved.append((mod, attr, fn))
            setattr(mod, attr, rec)
        try:
            self.edit = self.unlearn()
        finally:
            for mod, attr, fn in saved:
                setattr(mod, attr, fn)
        self.edit.restore()  # the model is the unedited one again: every replay sees what the first call saw

    def unlearn(self):
        return zu_fast.unlearn(self.model, self.case.tok, self.case.requests, self.cfg, stats=self.stats,
                               context_templates=self.case.templates)

    def replay(self, phase: str):
        fn, a, k = self.calls[phase][CAPTURED[phase][1]]
        return fn(*a, **k)


_problems: dict[tuple[str, str], Problem] = {}


def problem(shape: str, method: str = "closed_form") -> Problem:
    if (shape, method) not in _problems:
        _problems[(shape, method)] = Problem(shape, method)
    return _problems[(shape, method)]


def _restore_last(edits: list):
    """A pedantic setup: undo the previous round's edit (returns None: no arguments for the round)."""

    def setup() -> None:
        if edits:
            edits.pop().restore()

    return setup


def _run(benchmark, p: Problem, name: str, fn, setup=None) -> None:
    """Count ``fn``'s work once (into extra_info), then time it."""
    counter = WorkCounter(p.model, p.cfg.locate.layer_module, p.case.n_layers)
    if setup is not None:
        setup()
    with counter, counter.phase(name):
        fn()
    w = counter.work.get(name)
    benchmark.extra_info.update({f"work_{k}": v for k, v in asdict(w).items()} if w else {"work_fwd_padded": 0})
    benchmark.group = f"phases {p.shape} {p.method}"
    benchmark.pedantic(fn, setup=setup, rounds=ROUNDS[p.shape], iterations=1, warmup_rounds=0)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_statistics(benchmark, shape):
    p = problem(shape)
    _run(benchmark, p, "statistics", lambda: zu_fast.collect_stats(p.model, p.case.tok, p.case.texts, p.cfg,
                                                                    cache=False, progress=False))


@pytest.mark.parametrize("phase", ["keys", "targets", "step3"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_phase(benchmark, shape, phase):
    p = problem(shape)
    _run(benchmark, p, phase, lambda: p.replay(phase))


@pytest.mark.parametrize("method", ["closed_form", "gd"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_solve(benchmark, shape, method):
    p = problem(shape, method)
    _run(benchmark, p, "solve", lambda: p.replay("solve"))


@pytest.mark.parametrize("shape", list(SHAPES))
def test_update(benchmark, shape):
    """Applying the edit's factors to every edited layer (and its checks); restored before each round."""
    p = problem(shape)

    def setup():
        if p.edit.model is not None:
            p.edit.restore()

    _run(benchmark, p, "update", lambda: p.edit.apply(p.model), setup=setup)
    setup()


@pytest.mark.parametrize("method", ["closed_form", "gd"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_edit(benchmark, shape, method):
    """``unlearn`` on cached statistics (how users run it), the edit restored after each round."""
    p = problem(shape, method)
    edits = []
    _run(benchmark, p, "edit", lambda: edits.append(p.unlearn()),
         setup=_restore_last(edits))
    while edits:
        edits.pop().restore()


@pytest.mark.parametrize("method", ["closed_form", "gd"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_end_to_end(benchmark, shape, method):
    """Statistics (not cached) and the edit."""
    p = problem(shape, method)
    edits = []

    def run():
        stats = zu_fast.collect_stats(p.model, p.case.tok, p.case.texts, p.cfg, cache=False, progress=False)
        edits.append(zu_fast.unlearn(p.model, p.case.tok, p.case.requests, p.cfg, stats=stats,
                                     context_templates=p.case.templates))

    _run(benchmark, p, "end_to_end", run, setup=_restore_last(edits))
    while edits:
        edits.pop().restore()
    assert torch.equal(p.model.model.layers[p.case.layers[0]].mlp.down_proj.weight,
                       p.case.model.model.layers[p.case.layers[0]].mlp.down_proj.weight)  # restored
