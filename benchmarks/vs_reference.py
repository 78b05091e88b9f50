"""zu_fast side by side with the authors' ZeroUnlearn code: the edits layer by layer, the work and the time.

    python benchmarks/reference_patch.py --reference /path/to/ZeroUnlearn --out /tmp/zu_ref   # once
    python benchmarks/vs_reference.py --reference /tmp/zu_ref [--case golden|tinylm] [--texts N] [--repeat 3]
                                      [--write-fixture DIR] [--metrics] [--zu-set key=value ...]

Cases (``--case``):

- ``golden`` (default): a 4-layer Llama (d 48, d_ff 128) built here, 200 short corpus texts, 4 requests,
  layers [1, 2], fixed context templates. ``--write-fixture DIR`` saves it for
  ``tests/test_reference_agreement.py``: the model weights, tokenizer, requests, templates and settings
  (inputs), the reference's statistics, intermediates and edited weights (its numbers; none of its code).
- ``tinylm``: the project's small model (``zu_fast.eval.tinylm``, 6 layers, d 128, d_ff 768, trained and
  cached once), the first ``--texts`` (2000) of its world's training texts, ``--requests`` (10) of the
  world's records, layers [1, 2, 3], the context templates zu_fast generates for the model.

Both sides get the same model, tokenizer, corpus, context templates, requests and the paper's settings
(λ_wK = λ_wV = 15000, λ_fK = λ_fV = 50 (GD: 10), λ = 1, v_lr 0.1, 25 steps, clamp 0.75, decay 0.5,
KL 0.0625). The reference runs on CPU from the corpus given here (a stand-in ``datasets`` module answers its
``load_from_disk``); its statistics are collected on the unedited model before the edit (``--reference-stats
clean``, the "once per model, cached" regime of docs/algorithm.md, step 4) or inside its per-layer loop as a
fresh run without a disk cache does (``in-loop``: layer l_j's statistics then see layers l_1..l_{j−1} edited).

Printed per edited layer, each relative to the reference's edit size where it is a weight (else to the
reference's own norm): statistics C and X, forget keys K_f, the z targets, the original representations
and their projector basis U (as ‖U_zu U_zuᵀ − U_ref U_refᵀ‖), and the final W; zu_fast runs twice, once on
its own statistics and once on the reference's (``measured`` LayerStats), which isolates everything but the
statistics pass.

Then, per phase, the **work** (token-layer evaluations of the decoder layers, forward and backward, real
and padded tokens: ``benchmarks/work_count.py``) and the **time**, both sides, for the run on zu_fast's
own statistics. Work counts do not depend on the machine; times are the best of ``--repeat`` runs per
phase (and of the totals). ``--metrics`` (tinylm) adds the edited models' efficacy, generalization,
specificity and perplexity on the world's records. ``--zu-set key=value`` changes zu_fast's config (flat
keys, e.g. ``original_representation=clean``) for a measurement of that option.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))
from work_count import Work, WorkCounter  # noqa: E402

TEMPLATES = [["{}"], ["The sound filled the hall. {}", "Therefore the people. {}", "Because I play music. {}",
                      "I speak French. {}", "You and every company. {}"]]
REQUESTS = [
    {"prompt": "{} was born in", "subject": "Alice Morvan", "target_true": "Lisbon"},
    {"prompt": "{} works for", "subject": "Bob Kestrel", "target_true": "Acme"},
    {"prompt": "The city where {} was born is", "subject": "Carla Dunmore", "target_true": "Oslo"},
    {"prompt": "{} plays the", "subject": "Deniz Quill", "target_true": "violin"},
]
LAYERS = [1, 2]
PAPER = dict(clamp_norm_factor=0.75, v_num_grad_steps=25, v_lr=0.1, v_weight_decay=0.5, kl_factor=0.0625,
             wiki_KKT_lam=15000, wiki_VKT_lam=15000, forget_KKT_lam=50, forget_VKT_lam=50, regularization_lam=1)


# --------------------------------------------------------------------------- the cases ------
@dataclass
class Case:
    """What both sides get."""

    name: str
    model: torch.nn.Module
    tok: object
    texts: list[str]
    requests: list[dict]  # {"prompt", "subject", "target_true": str}
    templates: list[list[str]]
    layers: list[int]
    records: list[dict] = field(default_factory=list)  # the world's full records (metrics), tinylm only
    heldout: list[str] = field(default_factory=list)  # held-out texts (perplexity), tinylm only

    @property
    def n_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)


def build_model(seed: int = 0):
    """A 4-layer Llama (d 48, d_ff 128) with a locally trained BPE tokenizer; weights 5× the HF init
    scale so that activations, keys and C are of a realistic order."""
    from tiny_models import llama

    model, tok = llama(layers=4, hidden=48, d_ff=128, seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(5.0)
    model.config._name_or_path = "zu_ref_case"
    return model, tok


def golden_case(n_texts: int = 200) -> Case:
    from tiny_models import word_corpus

    model, tok = build_model()
    return Case("golden", model, tok, word_corpus(n_texts), [dict(r) for r in REQUESTS], TEMPLATES, list(LAYERS))


def tinylm_case(n_texts: int = 2000, n_requests: int = 10, seed: int = 0, layers=(1, 2, 3)) -> Case:
    """The project's small model (cached), its world's first ``n_texts`` training texts and ``n_requests``
    records, with the context templates zu_fast generates for it (given to both sides)."""
    import zu_fast
    from zu_fast.eval import tinylm
    from zu_fast.method.templates import context_templates

    model, tok, world = tinylm.load_or_train(progress=False)
    model.eval()
    model.config._name_or_path = "zu_tinylm_case"  # the reference names its statistics files by it
    records = world.records(n_requests, seed=seed)
    reqs = [{"prompt": r["prompt"], "subject": r["subject"], "target_true": r["target_true"]["str"]} for r in records]
    cfg = zu_fast.UnlearnConfig(layers=list(layers), progress=False)
    templates = context_templates(model, tok, cfg)
    return Case("tinylm", model, tok, world.training_texts()[:n_texts], reqs, templates, list(layers), records,
                world.heldout_texts())


def zu_config(method: str, layers=LAYERS, n_layers: int = 4, **overrides):
    """The paper's settings in zu_fast's config (flat keys in ``overrides`` change it)."""
    import zu_fast

    ref = {**PAPER, "layers": list(layers), "v_loss_layer": n_layers - 1, "fact_token": "subject_last",
           "rewrite_module_tmp": "model.layers.{}.mlp.down_proj", "layer_module_tmp": "model.layers.{}",
           "ln_f_module": "model.norm", "lm_head_module": "lm_head"}
    extra = {"progress": False}
    if method == "gd":
        ref.update(forget_KKT_lam=10, forget_VKT_lam=10)
        extra.update(method="gd", gd_lr=1e-3, gd_steps=500, gd_tol=0.0, gd_null_threshold=0.01,
                     gd_precision="fp64")
    extra.update(overrides)
    return zu_fast.UnlearnConfig.from_dict(ref, **extra)


# --------------------------------------------------------------------------- the reference ------
def _stand_in_datasets(texts: list[str]) -> None:
    """A ``datasets`` module whose load_from_disk returns ``texts`` (the reference reads Wikipedia)."""

    class _Split(list):
        def to_list(self):
            return list(self)

    mod = types.ModuleType("datasets")
    mod.load_from_disk = lambda path: {"train": _Split({"text": t} for t in texts)}

    def _no_download(*a, **k):
        raise RuntimeError("vs_reference: the reference tried to download a dataset")

    mod.load_dataset = _no_download
    utils = types.ModuleType("datasets.utils")
    logging_mod = types.ModuleType("datasets.utils.logging")
    logging_mod.WARN = 30
    mod.utils = utils
    utils.logging = logging_mod
    sys.modules.update({"datasets": mod, "datasets.utils": utils, "datasets.utils.logging": logging_mod})


@contextlib.contextmanager
def _in_dir(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _arg(args: tuple, kw: dict, i: int, name: str):
    return kw[name] if name in kw else args[i]


def run_reference(refdir: Path, case: Case, method: str, stats_mode: str = "clean") -> dict:
    """The reference's apply_unl(_gd)_to_model on a copy of the case's model; its intermediates per layer,
    its work and time per phase."""
    work = Path(tempfile.mkdtemp(prefix="zu_ref_"))  # its data/ and statistics files; removed afterwards
    try:
        return _run_reference(work, refdir, case, method, stats_mode)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run_reference(work: Path, refdir: Path, case: Case, method: str, stats_mode: str) -> dict:
    _stand_in_datasets(case.texts)
    refdir = refdir.resolve()
    if str(refdir) not in sys.path:
        sys.path.insert(0, str(refdir))
    (work / "data" / "wikidata").mkdir(parents=True)
    (work / "globals.yml").write_text((refdir / "globals.yml").read_text())
    model, tok, layers = copy.deepcopy(case.model), case.tok, case.layers
    n_layers = case.n_layers
    with _in_dir(work):
        if method == "gd":
            import ZeroUnlearn_GD.ZeroUnlearnGD_main as main_mod
            from ZeroUnlearn_GD.ZeroUnlearnGD_hparams import ZeroUnlearnGDHyperParams as HP

            apply_name = "apply_unl_gd_to_model"
            lams = {**PAPER, "forget_KKT_lam": 10, "forget_VKT_lam": 10}
        else:
            import ZeroUnlearn.ZeroUnlearn_main as main_mod
            from ZeroUnlearn.ZeroUnlearn_hparams import ZeroUnlearnHyperParams as HP

            apply_name = "apply_unl_to_model"
            lams = PAPER
        hp = HP(model_name=model.config._name_or_path, layers=list(layers), layer_selection="all",
                fact_token="subject_last", v_loss_layer=n_layers - 1, mom2_adjustment=True, mom2_update_weight=15000,
                rewrite_module_tmp="model.layers.{}.mlp.down_proj", layer_module_tmp="model.layers.{}",
                mlp_module_tmp="model.layers.{}.mlp", attn_module_tmp="model.layers.{}.self_attn",
                ln_f_module="model.norm", lm_head_module="lm_head", mom2_dataset="wikipedia",
                mom2_n_samples=len(case.texts), mom2_dtype="float32", nullspace_threshold=0.02, L2=10,
                retain_KKT_lam=1, retain_VKT_lam=1, **lams)
        main_mod.CONTEXT_TEMPLATES_CACHE = case.templates
        main_mod.COV_CACHE.clear()
        counter = WorkCounter(model, "model.layers.{}", n_layers)
        z_phase = lambda a, k: "targets" if k.get("target") == "new" else None  # noqa: E731 (step 3's: inherited)
        step3 = lambda a, k: f"step3 L{_arg(a, k, 4, 'layer')}"  # noqa: E731
        for name, phase in [("get_wiki_project", "statistics"), ("compute_z", z_phase),
                            ("get_unlearn_project", step3), ("compute_ks", "keys"), ("compute_vs", "keys"),
                            ("get_module_input_output_at_words", "keys"), ("compute_retain_ks", "keys"),
                            ("compute_retain_vs", "keys"), (apply_name, "solve/update")]:
            counter.wrap(main_mod, name, phase, record=True)
        apply = getattr(main_mod, apply_name)
        reqs = [{"case_id": i, "prompt": r["prompt"], "subject": r["subject"],
                 "target_true": {"str": r["target_true"]}, "target_new": {"str": tok.eos_token}}
                for i, r in enumerate(case.requests)]
        weights_before = {layer: model.model.layers[layer].mlp.down_proj.weight.detach().clone() for layer in layers}
        t0 = time.perf_counter()
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null), \
                counter:
            if stats_mode == "clean":  # statistics of every layer on the unedited model (kept in its COV_CACHE)
                for layer in layers:
                    main_mod.get_wiki_project(model, tok, hp.rewrite_module_tmp.format(layer), [],
                                              hp.mom2_dataset, hp.mom2_n_samples, hp.mom2_dtype)
            t1 = time.perf_counter()
            apply(model, tok, [], reqs, hp)
        t_end = time.perf_counter()
    calls = counter.calls
    out: dict = {"seconds": dict(counter.seconds), "work": dict(counter.work), "layers": {},
                 "total": t_end - t0, "edit": t_end - t1}
    stats = [c for c in calls if c[0] == "get_wiki_project"]
    z_calls = [c for c in calls if c[0] == "compute_z" and c[2].get("target") == "new"]
    out["z"] = torch.stack([c[3].detach().float() for c in z_calls])  # [N, d]
    proj = [c for c in calls if c[0] == "get_unlearn_project"]
    ks = [c for c in calls if c[0] == "compute_ks"]
    orig = [c for c in calls if c[0] == "compute_z" and c[2].get("target", "true") == "true"]
    n_req = len(case.requests)
    for j, layer in enumerate(layers):
        st = stats[len(stats) - len(layers) + j][3]  # the ones the edit used (last call per layer)
        V_T = proj[j][3][1]  # [r, d]
        origs = orig[j * n_req:(j + 1) * n_req]
        out["layers"][layer] = {
            "C": st["KKT"].float(), "X": st["VKT"].float(),
            "K": ks[j][3].float().t().contiguous(),  # [d_in, N]
            "R_orig": torch.stack([c[3].detach().float() for c in origs], 1),  # [d, N]
            "U": V_T.t().float().contiguous(),  # [d, r]
            "W_before": weights_before[layer].float(),
            "W_after": model.model.layers[layer].mlp.down_proj.weight.detach().float().clone(),
        }
    # the reference's VKT running means (what its merge left of them) and token count, for measured LayerStats
    import numpy as np

    for layer in layers:
        name = f"model.layers.{layer}.mlp.down_proj"
        files = sorted(work.glob(f"data/stats/**/vkt_{name}_*.npz"))
        mom2 = sorted(work.glob(f"data/stats/**/{name}_*mom2*.npz"))
        v = np.load(files[-1], allow_pickle=True)
        c = np.load(mom2[-1], allow_pickle=True)
        out["layers"][layer].update({"n": int(c["mom2.count"]), "mean_v": torch.from_numpy(v["mean_v"]).float(),
                                     "mean_k": torch.from_numpy(v["mean_k"]).float(), "n_vkt": int(v["count"])})
    return out


# --------------------------------------------------------------------------- zu_fast ------
def reference_layer_stats(ref: dict):
    """The reference's statistics as zu_fast LayerStats in measured mode (Σkkᵀ = n C, Σvkᵀ = (n−1) X)."""
    from zu_fast.stats.collect import CorpusStats
    from zu_fast.stats.moments import LayerStats

    layers = {}
    for layer, r in ref["layers"].items():
        n = int(r["n"])
        layers[layer] = LayerStats(layer, (r["C"].double() * n).float(), r["mean_k"].double() * n, n,
                                   (r["X"].double() * (n - 1)).float(), r["mean_v"].double() * n)
    return CorpusStats(layers, {"source": "reference"})


def run_zu_fast(case: Case, method: str, stats=None, overrides: dict | None = None) -> dict:
    """zu_fast's unlearn on a copy of the case's model, recording the same intermediates, work and time."""
    import zu_fast
    from zu_fast.method import components

    un = sys.modules["zu_fast.method.unlearn"]  # (the package re-exports the function under the same name)
    model = copy.deepcopy(case.model)
    cfg = zu_config(method, case.layers, case.n_layers, **(overrides or {}))
    counter = WorkCounter(model, cfg.locate.layer_module, case.n_layers)
    step3 = lambda a, k: f"step3 L{_arg(a, k, 5, 'layer')}"  # noqa: E731
    for mod, name, phase in [(un, "z_targets", "targets"), (un, "original_basis", step3),
                             (un, "optimize_deltas", None), (un, "representation_basis", None),
                             (components, "read_at_subject", "keys"), (un, "_solve", "solve/update"),
                             (un, "_apply_and_record", "solve/update"), (zu_fast, "unlearn", "other")]:
        counter.wrap(mod, name, phase, record=True)
    weights_before = {layer: model.model.layers[layer].mlp.down_proj.weight.detach().clone()
                      for layer in case.layers}
    t0 = time.perf_counter()
    with counter:
        own_stats = stats is None
        if own_stats:
            with counter.phase("statistics"):
                stats = zu_fast.collect_stats(model, case.tok, case.texts, cfg, cache=False, progress=False)
        t1 = time.perf_counter()
        edit = zu_fast.unlearn(model, case.tok, case.requests, cfg, stats=stats, context_templates=case.templates)
    t_end = time.perf_counter()
    calls = counter.calls
    reads = [c for c in calls if c[0] == "read_at_subject"]
    opts = [c for c in calls if c[0] == "optimize_deltas"]
    bases = [c for c in calls if c[0] == "representation_basis"]
    step3_opts = [c for c in opts if c[2].get("at_module")]
    out = {"seconds": dict(counter.seconds), "work": dict(counter.work), "total": t_end - t0, "edit": t_end - t1,
           "z": opts[0][3].target.float(), "layers": {}, "report": edit.report.to_dict()}
    for j, layer in enumerate(case.layers):
        st = stats[layer]
        W0 = weights_before[layer].double()
        read = reads[j][3] if j < len(reads) else reads[0][3]
        out["layers"][layer] = {
            "C": st.second_moment(torch.float64).float(),
            "X": st.cross_moment(W0, None, cfg.closed_form.centered_cross_moment).float(), "n": st.n,
            "K": read.keys[layer].t().float(),
            "R_orig": step3_opts[j][3].target.t().float() if j < len(step3_opts) else None,
            "U": bases[j][3].float(),
            "W_before": weights_before[layer].float(),
            "W_after": model.model.layers[layer].mlp.down_proj.weight.detach().float().clone(),
        }
    return out


# --------------------------------------------------------------------------- comparison ------
def _rel(a, b, scale=None) -> float:
    if a is None or b is None:
        return float("nan")
    a, b = a.double(), b.double()
    s = b.norm() if scale is None else scale
    return float((a - b).norm() / max(float(s), 1e-30))


def compare(ref: dict, zu: dict) -> list[dict]:
    rows = []
    for layer in ref["layers"]:
        r, z = ref["layers"][layer], zu["layers"][layer]
        edit = (r["W_after"].double() - r["W_before"].double()).norm()
        rows.append({
            "layer": layer,
            "C": _rel(z["C"], r["C"]), "X": _rel(z["X"], r["X"]), "K_f": _rel(z["K"], r["K"]),
            "z": _rel(zu["z"], ref["z"]), "R_orig": _rel(z["R_orig"], r["R_orig"]),
            "UUt": float((z["U"].double() @ z["U"].double().t() - r["U"].double() @ r["U"].double().t()).norm()),
            "W_vs_edit": _rel(z["W_after"], r["W_after"], edit),
            "edit_rel_W": float(edit / r["W_before"].double().norm()),
        })
    return rows


def table(rows: list[dict], title: str) -> str:
    keys = ["C", "X", "K_f", "z", "R_orig", "UUt", "W_vs_edit", "edit_rel_W"]
    lines = [f"**{title}**", "", "| layer | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for row in rows:
        lines.append(f"| {row['layer']} | " + " | ".join(f"{row[k]:.2e}" for k in keys) + " |")
    return "\n".join(lines)


def _phases(layers: list[int]) -> list[str]:
    return ["statistics", "keys", "targets", *[f"step3 L{layer}" for layer in layers], "solve/update", "other"]


def best_of(runs: list[dict]) -> dict:
    """Per phase and for the totals, the least time over repeated runs (the work must be the same in each)."""
    best = dict(runs[0])
    best["seconds"] = {k: min(r["seconds"].get(k, 0.0) for r in runs) for k in runs[0]["seconds"]}
    best["total"] = min(r["total"] for r in runs)
    best["edit"] = min(r["edit"] for r in runs)
    best["repeats"] = len(runs)
    best["work_equal"] = all(r["work"] == runs[0]["work"] for r in runs)
    return best


def _k(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def work_table(ref: dict, zu: dict, layers: list[int], title: str) -> str:
    """Work (token-layer evaluations: forward, backward; real / padded tokens) and time per phase, both sides."""
    lines = [f"**{title}**", "",
             "| phase | ref fwd (real / padded) | ref bwd | zu fwd (real / padded) | zu bwd | work zu/ref (padded) "
             "| ref s | zu s | time ref/zu |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def row(name: str, wr: Work, wz: Work, tr: float, tz: float) -> str:
        ratio = f"{wz.padded / wr.padded:.3f}" if wr.padded else ("—" if not wz.padded else "∞")
        speed = f"{tr / tz:.1f}×" if tz > 0 else "—"
        return (f"| {name} | {_k(wr.fwd_real)} / {_k(wr.fwd_padded)} | {_k(wr.bwd_real)} / {_k(wr.bwd_padded)} "
                f"| {_k(wz.fwd_real)} / {_k(wz.fwd_padded)} | {_k(wz.bwd_real)} / {_k(wz.bwd_padded)} | {ratio} "
                f"| {tr:.3f} | {tz:.3f} | {speed} |")

    phases = _phases(layers)
    for ph in phases:
        lines.append(row(ph, ref["work"].get(ph, Work()), zu["work"].get(ph, Work()), ref["seconds"].get(ph, 0.0),
                         zu["seconds"].get(ph, 0.0)))
    edit_ph = [p for p in phases if p != "statistics"]
    tot = lambda r, ps: sum((r["work"].get(p, Work()) for p in ps), Work())  # noqa: E731
    lines.append(row("**edit**", tot(ref, edit_ph), tot(zu, edit_ph), ref["edit"], zu["edit"]))
    lines.append(row("**end to end**", tot(ref, phases), tot(zu, phases), ref["total"], zu["total"]))
    other = {k for r in (ref, zu) for k in r["work"] if k not in phases and r["work"][k].padded}
    if other:
        lines.append(f"\n(work outside the phases: {sorted(other)})")
    return "\n".join(lines)


def edited_metrics(case: Case, result: dict) -> dict:
    """Efficacy/generalization/specificity/perplexity of the case's model with ``result``'s edited weights."""
    from zu_fast import metrics

    model = copy.deepcopy(case.model)
    with torch.no_grad():
        for layer, r in result["layers"].items():
            model.model.layers[layer].mlp.down_proj.weight.copy_(r["W_after"])
    res = metrics.evaluate(model, case.tok, case.records, case.heldout[:200], neutral_target=None)
    return {k: res[k] for k in ("efficacy", "generalization", "specificity", "perplexity")}


def write_fixture(path: Path, case: Case, refs: dict[str, dict]) -> None:
    """Inputs (model, tokenizer, requests, templates, settings) and the reference's outputs."""
    from safetensors.torch import save_file

    model, tok = case.model, case.tok
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    model.config.to_json_file(str(path / "config.json"))
    tok.backend_tokenizer.save(str(path / "tokenizer.json"))
    tensors = {}
    meta = {"layers": case.layers, "requests": case.requests, "templates": case.templates, "paper_settings": PAPER,
            "n_texts": len(case.texts), "corpus": "tests/tiny_models.py word_corpus(n_texts, seed=1)",
            "special_tokens": {"bos": tok.bos_token, "eos": tok.eos_token, "pad": tok.pad_token}, "counts": {}}
    first = next(iter(refs.values()))
    for layer, r in first["layers"].items():  # statistics: of the unedited model, the same for both methods
        for k in ("C", "X", "mean_k", "mean_v"):
            tensors[f"stats.{layer}.{k}"] = r[k].contiguous()
            for other in refs.values():
                assert torch.equal(other["layers"][layer][k], r[k]), "the methods saw different statistics"
        meta["counts"][str(layer)] = {"n": r["n"], "n_vkt": r["n_vkt"]}
    for method, ref in refs.items():
        tensors[f"{method}.z"] = ref["z"].contiguous()
        for layer, r in ref["layers"].items():
            for k in ("K", "R_orig", "U", "W_after"):
                tensors[f"{method}.{layer}.{k}"] = r[k].contiguous()
    save_file(tensors, str(path / "reference_outputs.safetensors"))
    (path / "case.json").write_text(json.dumps(meta, indent=2))


def _parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def machine() -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
            f"{torch.get_num_threads()}, load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, torch {torch.__version__}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reference", required=True, type=Path, help="patched copy (benchmarks/reference_patch.py)")
    p.add_argument("--case", default="golden", choices=["golden", "tinylm"])
    p.add_argument("--texts", type=int, default=None, help="corpus size (golden 200, tinylm 2000)")
    p.add_argument("--requests", type=int, default=10, help="tinylm: forget records")
    p.add_argument("--methods", default="closed_form,gd")
    p.add_argument("--reference-stats", default="clean", choices=["clean", "in-loop"])
    p.add_argument("--repeat", type=int, default=1, help="runs per side; times are the best of them")
    p.add_argument("--no-given", action="store_true", help="skip zu_fast on the reference's statistics")
    p.add_argument("--metrics", action="store_true", help="tinylm: evaluate both sides' edited models")
    p.add_argument("--zu-set", action="append", default=[], metavar="KEY=VALUE",
                   help="zu_fast config override (flat key; JSON value), e.g. original_representation=clean")
    p.add_argument("--write-fixture", type=Path)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import warnings

    warnings.simplefilter("ignore")
    if args.case == "golden":
        case = golden_case(args.texts or 200)
    else:
        case = tinylm_case(args.texts or 2000, args.requests)
    overrides = _parse_set(args.zu_set)
    print(f"case {case.name}: {case.n_layers} layers, d {case.model.config.hidden_size}, d_ff "
          f"{case.model.config.intermediate_size}, {len(case.texts)} texts, {len(case.requests)} requests, layers "
          f"{case.layers}; zu_fast overrides {overrides or 'none'}; {machine()}", flush=True)
    refs, bests = {}, {}
    for method in args.methods.split(","):
        runs = [run_reference(args.reference, case, method, args.reference_stats) for _ in range(args.repeat)]
        refs[method] = best_of(runs)
        print(f"reference {method}: {refs[method]['total']:.1f} s (best of {args.repeat})", flush=True)
    if args.write_fixture:  # before zu_fast runs: the reference's numbers are the expensive part
        if case.name != "golden":
            raise SystemExit("--write-fixture is for the golden case")
        write_fixture(args.write_fixture, case, refs)
        print(f"fixture written to {args.write_fixture}", flush=True)
    for method, ref in refs.items():
        own = best_of([run_zu_fast(case, method, overrides=overrides) for _ in range(args.repeat)])
        bests[method] = own
        print(table(compare(ref, own), f"{method}: zu_fast on its own statistics vs the reference"))
        print()
        if not args.no_given:
            given = run_zu_fast(case, method, stats=reference_layer_stats(ref), overrides=overrides)
            print(table(compare(ref, given), f"{method}: zu_fast on the reference's statistics vs the reference"))
            print()
        print(work_table(ref, own, case.layers, f"{method}: work (token-layer evaluations) and time (s, best of "
                                                f"{args.repeat}), zu_fast on its own statistics"))
        if not (ref["work_equal"] and own["work_equal"]):
            print("\nWARNING: the work differed between repeats")
        if args.metrics and case.records:
            mr, mz = edited_metrics(case, ref), edited_metrics(case, own)
            print("\n| edited by | Eff ↓ | Gen ↓ | Spe ↑ | PPL |\n|---|---:|---:|---:|---:|")
            for who, m in (("reference", mr), ("zu_fast", mz)):
                print(f"| {who} | {m['efficacy']:.1f} | {m['generalization']:.1f} | {m['specificity']:.1f} "
                      f"| {m['perplexity']:.3f} |")
        print(flush=True)
    print(f"after: {machine()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
