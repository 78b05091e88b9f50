"""zu_fast side by side with the authors' ZeroUnlearn code on one small case, layer by layer.

    python benchmarks/reference_patch.py --reference /path/to/ZeroUnlearn --out /tmp/zu_ref   # once
    python benchmarks/vs_reference.py --reference /tmp/zu_ref [--texts 500] [--write-fixture DIR]

Both sides get the same small model (a 4-layer Llama built here, or ``--model DIR``), tokenizer,
corpus (``--texts`` short texts), fixed context templates, forget requests and the paper's settings
(λ_wK = λ_wV = 15000, λ_fK = λ_fV = 50 (GD: 10), λ = 1, v_lr 0.1, 25 steps, clamp 0.75, decay 0.5,
KL 0.0625). The reference runs on CPU from the corpus given here (a stand-in ``datasets`` module
answers its ``load_from_disk``); its statistics are collected on the unedited model before the edit
(``--reference-stats clean``, the "once per model, cached" regime of docs/algorithm.md, step 4) or inside
its per-layer loop as a fresh run without a disk cache does (``in-loop``: layer l_j's statistics then
see layers l_1..l_{j−1} already edited).

Printed per edited layer, each relative to the reference's edit size where it is a weight (else to
the reference's own norm): statistics C and X, forget keys K_f, the z targets, the original
representations and their projector basis U (as ‖U_zu U_zuᵀ − U_ref U_refᵀ‖), and the final W for
the closed form and GD; zu_fast runs twice, once on its own statistics and once on the reference's
(``measured`` LayerStats), which isolates everything but the statistics pass. Then time per phase and
end to end, both sides.

``--write-fixture DIR`` saves the case for ``tests/test_reference_agreement.py``: the model weights,
tokenizer, requests, templates and settings (inputs), the reference's statistics, intermediates and
edited weights (its numbers; none of its code).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

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


# --------------------------------------------------------------------------- the case ------
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


def zu_config(method: str, layers=LAYERS, n_layers: int = 4):
    import zu_fast

    ref = {**PAPER, "layers": layers, "v_loss_layer": n_layers - 1, "fact_token": "subject_last",
           "rewrite_module_tmp": "model.layers.{}.mlp.down_proj", "layer_module_tmp": "model.layers.{}",
           "ln_f_module": "model.norm", "lm_head_module": "lm_head"}
    extra = {"progress": False}
    if method == "gd":
        ref.update(forget_KKT_lam=10, forget_VKT_lam=10)
        extra.update(method="gd", gd_lr=1e-3, gd_steps=500, gd_tol=0.0, gd_null_threshold=0.01,
                     gd_precision="fp64")
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


class _Recorder:
    """Wraps functions in a module namespace to record their outputs and time per phase."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple, dict, object]] = []
        self.timings: dict[str, float] = {}
        self._saved: list[tuple[object, str, object]] = []

    def wrap(self, module, name: str, phase) -> None:
        """``phase``: a name, or a function of (args, kwargs) giving one (None: not timed)."""
        fn = getattr(module, name)

        def wrapper(*args, **kw):
            t0 = time.perf_counter()
            out = fn(*args, **kw)
            ph = phase(args, kw) if callable(phase) else phase
            if ph is not None:
                self.timings[ph] = self.timings.get(ph, 0.0) + time.perf_counter() - t0
            self.calls.append((name, args, kw, out))
            return out

        self._saved.append((module, name, fn))
        setattr(module, name, wrapper)

    def restore(self) -> None:
        for module, name, fn in reversed(self._saved):
            setattr(module, name, fn)


def run_reference(refdir: Path, model, tok, texts, method: str, stats_mode: str = "clean") -> dict:
    """The reference's apply_unl(_gd)_to_model on a copy of ``model``; its intermediates per layer."""
    work = Path(tempfile.mkdtemp(prefix="zu_ref_"))  # its data/ and statistics files; removed afterwards
    try:
        return _run_reference(work, refdir, model, tok, texts, method, stats_mode)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run_reference(work: Path, refdir: Path, model, tok, texts, method: str, stats_mode: str) -> dict:
    _stand_in_datasets(texts)
    refdir = refdir.resolve()
    if str(refdir) not in sys.path:
        sys.path.insert(0, str(refdir))
    (work / "data" / "wikidata").mkdir(parents=True)
    (work / "globals.yml").write_text((refdir / "globals.yml").read_text())
    model = copy.deepcopy(model)
    n_layers = model.config.num_hidden_layers
    with _in_dir(work):
        if method == "gd":
            import ZeroUnlearn_GD.ZeroUnlearnGD_main as main_mod
            from ZeroUnlearn_GD.ZeroUnlearnGD_hparams import ZeroUnlearnGDHyperParams as HP

            apply = main_mod.apply_unl_gd_to_model
            lams = {**PAPER, "forget_KKT_lam": 10, "forget_VKT_lam": 10}
        else:
            import ZeroUnlearn.ZeroUnlearn_main as main_mod
            from ZeroUnlearn.ZeroUnlearn_hparams import ZeroUnlearnHyperParams as HP

            apply = main_mod.apply_unl_to_model
            lams = PAPER
        hp = HP(model_name="zu_ref_case", layers=list(LAYERS), layer_selection="all", fact_token="subject_last",
                v_loss_layer=n_layers - 1, mom2_adjustment=True, mom2_update_weight=15000,
                rewrite_module_tmp="model.layers.{}.mlp.down_proj", layer_module_tmp="model.layers.{}",
                mlp_module_tmp="model.layers.{}.mlp", attn_module_tmp="model.layers.{}.self_attn",
                ln_f_module="model.norm", lm_head_module="lm_head", mom2_dataset="wikipedia",
                mom2_n_samples=len(texts), mom2_dtype="float32", nullspace_threshold=0.02, L2=10,
                retain_KKT_lam=1, retain_VKT_lam=1, **lams)
        main_mod.CONTEXT_TEMPLATES_CACHE = TEMPLATES
        main_mod.COV_CACHE.clear()
        rec = _Recorder()
        z_phase = lambda a, k: "targets_z" if k.get("target") == "new" else None  # noqa: E731 (step 3's: projector)
        for name, phase in [("get_wiki_project", "stats"), ("compute_z", z_phase),
                            ("get_unlearn_project", "projector"), ("compute_ks", "keys"), ("compute_vs", "keys"),
                            ("get_module_input_output_at_words", "keys")]:
            rec.wrap(main_mod, name, phase)
        reqs = [{"case_id": i, "prompt": r["prompt"], "subject": r["subject"],
                 "target_true": {"str": r["target_true"]}, "target_new": {"str": tok.eos_token}}
                for i, r in enumerate(REQUESTS)]
        weights_before = {layer: model.model.layers[layer].mlp.down_proj.weight.detach().clone() for layer in LAYERS}
        t0 = time.perf_counter()
        try:
            with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
                if stats_mode == "clean":  # statistics of every layer on the unedited model (kept in its COV_CACHE)
                    for layer in LAYERS:
                        main_mod.get_wiki_project(model, tok, hp.rewrite_module_tmp.format(layer), [],
                                                  hp.mom2_dataset, hp.mom2_n_samples, hp.mom2_dtype)
                apply(model, tok, [], reqs, hp)
        finally:
            rec.restore()
        total = time.perf_counter() - t0
    out: dict = {"timings": {**rec.timings, "total": total}, "layers": {}}
    stats = [c for c in rec.calls if c[0] == "get_wiki_project"]
    z_calls = [c for c in rec.calls if c[0] == "compute_z" and c[2].get("target") == "new"]
    out["z"] = torch.stack([c[3].detach().float() for c in z_calls])  # [N, d]
    proj = [c for c in rec.calls if c[0] == "get_unlearn_project"]
    ks = [c for c in rec.calls if c[0] == "compute_ks"]
    orig = [c for c in rec.calls if c[0] == "compute_z" and c[2].get("target", "true") == "true"]
    for j, layer in enumerate(LAYERS):
        st = stats[len(stats) - len(LAYERS) + j][3]  # the ones the edit used (last call per layer)
        V_T = proj[j][3][1]  # [r, d]
        origs = orig[j * len(REQUESTS):(j + 1) * len(REQUESTS)]
        out["layers"][layer] = {
            "C": st["KKT"].float(), "X": st["VKT"].float(),
            "K": ks[j][3].float().t().contiguous(),  # [d_in, N]
            "R_orig": torch.stack([c[3].detach().float() for c in origs], 1),  # [d, N]
            "U": V_T.t().float().contiguous(),  # [d, r]
            "W_before": weights_before[layer].float(),
            "W_after": model.model.layers[layer].mlp.down_proj.weight.detach().float().clone(),
        }
    # the reference's VKT running means (what its merge left of them) and token count, for measured LayerStats
    vkt_means = {}
    for layer in LAYERS:
        name = f"model.layers.{layer}.mlp.down_proj"
        files = sorted(work.glob(f"data/stats/**/vkt_{name}_*.npz"))
        mom2 = sorted(work.glob(f"data/stats/**/{name}_*mom2*.npz"))
        import numpy as np

        v = np.load(files[-1], allow_pickle=True)
        c = np.load(mom2[-1], allow_pickle=True)
        vkt_means[layer] = {"n": int(c["mom2.count"]), "mean_v": torch.from_numpy(v["mean_v"]).float(),
                            "mean_k": torch.from_numpy(v["mean_k"]).float(), "n_vkt": int(v["count"])}
    for layer, m in vkt_means.items():
        out["layers"][layer].update(m)
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


def run_zu_fast(model, tok, texts, method: str, stats=None) -> dict:
    """zu_fast's unlearn on a copy of ``model``, recording the same intermediates."""
    import zu_fast

    un = sys.modules["zu_fast.method.unlearn"]  # (the package re-exports the function under the same name)
    model = copy.deepcopy(model)
    cfg = zu_config(method, n_layers=model.config.num_hidden_layers)
    t0 = time.perf_counter()
    own_stats = stats is None
    if own_stats:
        stats = zu_fast.collect_stats(model, tok, texts, cfg, cache=False, progress=False)
    t_stats = time.perf_counter() - t0
    rec = _Recorder()
    rec.wrap(un, "read_at_subject", "keys")
    rec.wrap(un, "optimize_deltas", "targets")
    rec.wrap(un, "representation_basis", "projector")
    weights_before = {layer: model.model.layers[layer].mlp.down_proj.weight.detach().clone() for layer in LAYERS}
    t1 = time.perf_counter()
    try:
        edit = zu_fast.unlearn(model, tok, REQUESTS, cfg, stats=stats, context_templates=TEMPLATES)
    finally:
        rec.restore()
    t_edit = time.perf_counter() - t1
    tm = edit.report.timings
    timings = {"stats": t_stats, "targets_z": tm.get("targets_z", 0.0), "projector": tm.get("projectors", 0.0),
               "keys": tm.get("read_keys", 0.0) + tm.get("check", 0.0) + tm.get("templates", 0.0),
               "solve": tm.get("solve", 0.0) + tm.get("update", 0.0), "total": t_stats + t_edit}
    reads = [c for c in rec.calls if c[0] == "read_at_subject"]
    opts = [c for c in rec.calls if c[0] == "optimize_deltas"]
    bases = [c for c in rec.calls if c[0] == "representation_basis"]
    out = {"timings": timings, "z": opts[0][3].target.float(), "layers": {}, "report": edit.report.to_dict()}
    for j, layer in enumerate(LAYERS):
        st = stats[layer]
        W0 = weights_before[layer].double()
        n = st.n
        C = st.second_moment(torch.float64)
        X = st.cross_moment(W0, None, cfg.closed_form.centered_cross_moment)
        read = reads[j][3] if j > 0 else reads[0][3]
        out["layers"][layer] = {
            "C": C.float(), "X": X.float(), "n": n,
            "K": read.keys[layer].t().float(),
            "R_orig": opts[1 + j][3].target.t().float(),
            "U": bases[j][3].float(),
            "W_before": weights_before[layer].float(),
            "W_after": model.model.layers[layer].mlp.down_proj.weight.detach().float().clone(),
        }
    return out


# --------------------------------------------------------------------------- comparison ------
def _rel(a, b, scale=None) -> float:
    a, b = a.double(), b.double()
    s = b.norm() if scale is None else scale
    return float((a - b).norm() / max(float(s), 1e-30))


def compare(ref: dict, zu: dict) -> list[dict]:
    rows = []
    for layer in LAYERS:
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


def write_fixture(path: Path, model, tok, texts: list[str], refs: dict[str, dict]) -> None:
    """Inputs (model, tokenizer, requests, templates, settings) and the reference's outputs."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    model.config.to_json_file(str(path / "config.json"))
    tok.backend_tokenizer.save(str(path / "tokenizer.json"))
    tensors = {}
    meta = {"layers": LAYERS, "requests": REQUESTS, "templates": TEMPLATES, "paper_settings": PAPER,
            "n_texts": len(texts), "corpus": "tests/tiny_models.py word_corpus(n_texts, seed=1)",
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reference", required=True, type=Path, help="patched copy (benchmarks/reference_patch.py)")
    p.add_argument("--texts", type=int, default=200, help="corpus size (short texts; one reference batch each)")
    p.add_argument("--methods", default="closed_form,gd")
    p.add_argument("--reference-stats", default="clean", choices=["clean", "in-loop"])
    p.add_argument("--write-fixture", type=Path)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import warnings

    warnings.simplefilter("ignore")
    from tiny_models import word_corpus

    model, tok = build_model()
    texts = word_corpus(args.texts)
    refs = {}
    for method in args.methods.split(","):
        refs[method] = run_reference(args.reference, model, tok, texts, method, args.reference_stats)
        print(f"reference {method}: {refs[method]['timings']['total']:.1f} s", flush=True)
    if args.write_fixture:  # before zu_fast runs: the reference's numbers are the expensive part
        write_fixture(args.write_fixture, model, tok, texts, refs)
        print(f"fixture written to {args.write_fixture}", flush=True)
    for method, ref in refs.items():
        own = run_zu_fast(model, tok, texts, method)
        given = run_zu_fast(model, tok, texts, method, stats=reference_layer_stats(ref))
        print(table(compare(ref, own), f"{method}: zu_fast on its own statistics vs the reference"))
        print()
        print(table(compare(ref, given), f"{method}: zu_fast on the reference's statistics vs the reference"))
        print()
        rt = dict(ref["timings"])
        rt["solve"] = rt["total"] - sum(rt.get(k, 0.0) for k in ("stats", "targets_z", "projector", "keys"))
        print(f"time (s), {method}:\n\n| phase | reference | zu_fast | ratio |\n|---|---|---|---|")
        for ph in ("stats", "targets_z", "projector", "keys", "solve", "total"):
            a, b = rt.get(ph, float("nan")), own["timings"].get(ph, float("nan"))
            print(f"| {ph} | {a:.3f} | {b:.3f} | {a / b if b > 0 else float('nan'):.1f}× |")
        print(flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
