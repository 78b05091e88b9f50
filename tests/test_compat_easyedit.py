"""EasyEdit's calling convention (zu_fast.compat.easyedit): signatures, return values, weights_copy,
request keys, hparams YAML, registration. EasyEdit itself is not installable here: its editor was run
against this adapter by hand (benchmarks/results/easyedit_issue28.md); these tests pin what it relies on."""

from __future__ import annotations

import hashlib
import inspect
import json
import sys
import textwrap
import warnings

import pytest
import torch
from tiny_models import corpus, llama

import zu_fast
from zu_fast import UnlearnConfig, UnlearnRequest, ZuFastError
from zu_fast.compat import easyedit
from zu_fast.compat.easyedit import (
    ZeroUnlearnHyperParams,
    apply_zeroUnlearn_GD_to_model,
    apply_zeroUnlearn_to_model,
    hparams_path,
    to_unlearn_requests,
)

# the tiny random model is no real LM: its targets are not reached, which zu_fast says in warnings
pytestmark = pytest.mark.filterwarnings("ignore:zu_fast:UserWarning")

APPLY = [apply_zeroUnlearn_to_model, apply_zeroUnlearn_GD_to_model]
TEMPLATES = [["{}"], ["Because I. {}"]]  # fixed context templates: no generation in the tests
DOWN = "model.layers.{}.mlp.down_proj.weight"


def _hashes(model: torch.nn.Module) -> dict[str, str]:
    """SHA-256 of every parameter's bytes."""
    return {n: hashlib.sha256(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
            for n, p in model.named_parameters()}


def _easyedit_restore(model: torch.nn.Module, weights_copy: dict[str, torch.Tensor]) -> None:
    """What EasyEdit's restore_after_edit does: nethook.get_parameter(model, name) ← value (copy_to_param)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights_copy.items():
            p = params[name]  # nethook.get_parameter: a LookupError if the name is not there
            p[...] = value.to(device=p.device, dtype=p.dtype)


def _hp(**changes) -> ZeroUnlearnHyperParams:
    """Small, fast settings on the tiny random Llama (4 layers, d_ff 48)."""
    base = dict(layers=[1, 2], rewrite_module_tmp="model.layers.{}.mlp.down_proj", v_num_grad_steps=5,
                original_representation="clean", gd_steps=20, extra={"progress": False})
    return ZeroUnlearnHyperParams(**(base | changes))


def _request(**changes) -> dict:
    """An EasyEdit request as BaseEditor._prepare_requests builds it."""
    return {"prompt": "Alice Morvan was born in", "target_new": "</s>", "ground_truth": "Lisbon", "portability": {},
            "locality": {}, "subject": "Alice Morvan", "rephrase_prompt": "The city where Alice Morvan was born is",
            **changes}


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ZU_FAST_CACHE", str(tmp_path / "cache"))  # statistics are cached: not in the user's cache
    easyedit._STATS_MEMO.clear()


# --------------------------------------------------------------------------------- signatures ---
@pytest.mark.parametrize("fn", APPLY, ids=lambda f: f.__name__)
def test_signature_is_easyedits_apply_algo(fn):
    params = list(inspect.signature(fn).parameters.values())
    assert [p.name for p in params[:7]] == ["model", "tok", "requests", "hparams", "copy", "return_orig_weights",
                                            "keep_original_weight"]
    assert [p.default for p in params[4:7]] == [False, False, False]
    assert params[7].kind is inspect.Parameter.VAR_KEYWORD  # BaseEditor passes train_ds=...
    assert easyedit.ALGORITHMS[easyedit.ALG_NAME] is apply_zeroUnlearn_to_model
    assert easyedit.ALGORITHMS[easyedit.ALG_NAME_GD] is apply_zeroUnlearn_GD_to_model


# --------------------------------------------------------------------------------- weights_copy --
@pytest.mark.parametrize("fn", APPLY, ids=["closed_form", "gd"])
def test_weights_copy_restores_every_parameter_bit_for_bit(fn):
    model, tok = llama()
    before = _hashes(model)
    # exactly BaseEditor.edit's call
    edited, weights_copy = fn(model, tok, [_request()], _hp(), copy=False, return_orig_weights=True,
                              keep_original_weight=False, train_ds=None, corpus=corpus(40),
                              context_templates=TEMPLATES)
    assert edited is model
    assert sorted(weights_copy) == [DOWN.format(1), DOWN.format(2)]
    after = _hashes(model)
    assert sorted(n for n in before if before[n] != after[n]) == sorted(weights_copy)  # only those changed
    params = dict(model.named_parameters())
    for name, value in weights_copy.items():
        assert value.dtype == params[name].dtype and value.data_ptr() != params[name].data_ptr()  # a clone
    _easyedit_restore(model, weights_copy)
    assert _hashes(model) == before
    kind = "additive" if fn is apply_zeroUnlearn_GD_to_model else "multiplicative"
    assert zu_fast.edits(model)[-1].kind == kind


def test_without_return_orig_weights_the_copy_is_empty_and_the_edit_stays():
    model, tok = llama()
    before = _hashes(model)
    edited, weights_copy = apply_zeroUnlearn_to_model(model, tok, _request(), _hp(), corpus=corpus(40),
                                                      context_templates=TEMPLATES)
    assert weights_copy == {} and edited is model and _hashes(model) != before
    zu_fast.edits(model)[-1].restore()  # the zu_fast Edit is on the model's stack: restore, save, report
    assert _hashes(model) == before


def test_copy_true_leaves_the_model_given_untouched():
    model, tok = llama()
    before = _hashes(model)
    edited, weights_copy = apply_zeroUnlearn_to_model(model, tok, [_request()], _hp(), copy=True,
                                                      return_orig_weights=True, corpus=corpus(40),
                                                      context_templates=TEMPLATES)
    assert edited is not model and _hashes(model) == before and zu_fast.edits(model) == []
    assert _hashes(edited) != before
    _easyedit_restore(edited, weights_copy)
    assert _hashes(edited) == before


def test_edits_put_back_by_easyedit_leave_the_stack_and_statistics_are_collected_once(monkeypatch):
    """BaseEditor's default loop: edit, score, write weights_copy back, next request. The edit it undid
    leaves zu_fast's stack at the next call (no backups pile up); the statistics pass runs once."""
    calls = []
    real = easyedit.collect_stats
    monkeypatch.setattr(easyedit, "collect_stats", lambda *a, **k: calls.append(1) or real(*a, **k))
    model, tok = llama()
    before = _hashes(model)
    texts = corpus(40)
    for subject, truth in [("Alice Morvan", "Lisbon"), ("Bob Kestrel", "Oslo"), ("Carla Dunmore", "Lima")]:
        req = _request(prompt=f"{subject} was born in", subject=subject, ground_truth=truth)
        _, weights_copy = apply_zeroUnlearn_to_model(model, tok, [req], _hp(), return_orig_weights=True,
                                                     corpus=texts, context_templates=TEMPLATES)
        _easyedit_restore(model, weights_copy)
    assert len(calls) == 1 and len(zu_fast.edits(model)) == 1 and _hashes(model) == before
    # sequential_edit=True: nothing is written back; the edits stack on the unedited model's statistics
    for subject, truth in [("Bob Kestrel", "Acme"), ("Alice Morvan", "Globex")]:
        req = _request(prompt=f"{subject} works for", subject=subject, ground_truth=truth)
        apply_zeroUnlearn_to_model(model, tok, [req], _hp(), return_orig_weights=True, corpus=texts,
                                   context_templates=TEMPLATES)
    assert len(calls) == 1 and len(zu_fast.edits(model)) == 2
    for e in reversed(zu_fast.edits(model)):
        e.restore()
    assert _hashes(model) == before


# --------------------------------------------------------------------------------- requests -----
def _same(a: list[UnlearnRequest], b: list[UnlearnRequest]) -> bool:
    return [(r.prompt, r.subject, r.target_true) for r in a] == [(r.prompt, r.subject, r.target_true) for r in b]


WANT = [UnlearnRequest("{} was born in", "Alice Morvan", "Lisbon")]


@pytest.mark.parametrize("req", [
    _request(),  # EasyEdit: the subject spelled out in the prompt
    _request(prompt="{} was born in"),  # MEMIT / CounterFact: a template
    _request(ground_truth={"str": "Lisbon"}),
    _request(ground_truth=["Lisbon"]),
    {k: v for k, v in _request(target_true="Lisbon").items() if k != "ground_truth"},
    {"case_id": 3, "requested_rewrite": {"prompt": "{} was born in", "subject": "Alice Morvan",
                                         "target_true": {"str": "Lisbon"}, "target_new": {"str": "</s>"}}},
], ids=["easyedit", "template", "str-dict", "one-element-list", "target_true", "counterfact"])
def test_every_spelling_of_a_request_maps_to_the_same_fact(req):
    reqs, targets = to_unlearn_requests([req])
    assert _same(reqs, WANT) and targets == ["</s>"]
    one, _ = to_unlearn_requests(req)  # one dict instead of a list
    assert _same(one, WANT)


def test_batches_list_single_dict_and_dict_of_lists_agree_and_keep_evaluation_keys():
    subjects, truths = ["Alice Morvan", "Bob Kestrel"], ["Lisbon", "Acme"]
    prompts = ["Alice Morvan was born in", "Bob Kestrel works for"]
    as_list = [_request(prompt=p, subject=s, ground_truth=t, locality={"n": {"prompt": "x", "ground_truth": "y"}})
               for p, s, t in zip(prompts, subjects, truths)]
    columns = {"prompt": prompts, "subject": subjects, "ground_truth": truths, "target_new": "</s>",
               "rephrase_prompt": ["Alice Morvan's birthplace is", "Bob Kestrel's employer is"]}
    a, ta = to_unlearn_requests(as_list)
    b, tb = to_unlearn_requests(columns)
    assert _same(a, b) and [r.prompt for r in a] == ["{} was born in", "{} works for"] and ta == tb == ["</s>"] * 2
    assert a[0].extra["locality"] == {"n": {"prompt": "x", "ground_truth": "y"}}
    assert a[0].extra["rephrase_prompt"] == "The city where Alice Morvan was born is"
    assert b[1].extra["rephrase_prompt"] == "Bob Kestrel's employer is" and a[1].case_id == 1
    with pytest.raises(ZuFastError, match="'subject' has 1 values for 2 prompts"):
        to_unlearn_requests(columns | {"subject": ["Alice Morvan"]})


def _captured(monkeypatch, fn, requests, hp, tok):
    """The (requests, config) the adapter hands to zu_fast.unlearn, without editing."""
    got = {}

    def fake(model, tok, reqs, cfg, **kw):
        got.update(reqs=reqs, cfg=cfg)
        return zu_fast.Edit(cfg)

    monkeypatch.setattr(easyedit, "zu_unlearn", fake)
    model, _ = llama()
    fn(model, tok, requests, hp, stats=object())  # stats given: no statistics pass either
    return got


@pytest.mark.parametrize("target_new, hparams_target, want", [
    ("</s>", None, None),  # the tokenizer's EOS string: EOS (the paper's neutral target)
    ("</s>", "I don't know.", None),  # a request's target_new wins over hparams.neutral_target
    ("I don't know.", None, "I don't know."),
    (" I don't know.", None, "I don't know."),  # EasyEdit's MEMIT adds the leading space: the same target
    ("", "I don't know.", "I don't know."),  # empty: hparams.neutral_target
    (None, None, None),
], ids=["eos", "request-wins", "string", "leading-space", "empty", "none"])
def test_target_new_is_the_neutral_target_and_ground_truth_is_forgotten(monkeypatch, target_new, hparams_target,
                                                                        want):
    _, tok = llama()
    got = _captured(monkeypatch, apply_zeroUnlearn_to_model, [_request(target_new=target_new)],
                    _hp(neutral_target=hparams_target), tok)
    assert got["cfg"].replace(neutral_target=want) == got["cfg"]
    assert [r.target_true for r in got["reqs"]] == ["Lisbon"]  # what is forgotten
    # the reference's hparams name the neutral target target_new: the same field, so requests override it too
    hp = ZeroUnlearnHyperParams.from_dict({"alg_name": "ZeroUnlearn", "layers": [1, 2], "target_new": hparams_target})
    assert hp.neutral_target == hparams_target and "target_new" not in hp.extra


@pytest.mark.parametrize("fn, want", [(apply_zeroUnlearn_to_model, "closed_form"),
                                      (apply_zeroUnlearn_GD_to_model, "gd")], ids=["closed_form", "gd"])
def test_the_gd_entry_point_selects_gd(monkeypatch, fn, want):
    _, tok = llama()
    got = _captured(monkeypatch, fn, [_request()], _hp(), tok)
    assert got["cfg"].replace(method=want) == got["cfg"]


BAD_REQUESTS = {
    "no subject": ([{k: v for k, v in _request().items() if k != "subject"}], "no 'subject'"),
    "subject not in prompt": ([_request(subject="Bob Kestrel")], "does not occur in prompt"),
    "no ground_truth": ([_request(ground_truth=None)], "no 'ground_truth'"),
    "two answers": ([_request(ground_truth=["Lisbon", "Porto"])], "one answer per prompt"),
    "two {}": ([_request(prompt="{} was born in {}")], "exactly one"),
    "different target_new": ([_request(), _request(prompt="Bob Kestrel works for", subject="Bob Kestrel",
                                                   ground_truth="Acme", target_new="nothing")],
                             "different target_new"),
    "contradiction": ([_request(), _request(ground_truth="Porto")], "contradictory"),
    "not a dict": (["Alice Morvan was born in"], "expected a dict"),
    "a string": ("Alice Morvan was born in", "got a string"),
    "empty": ([], "no requests"),
    "prompt not a string": ([_request(prompt=42)], "'prompt' must be a non-empty string"),
}
BAD_HPARAMS = {
    "unknown key": (_hp(extra={"progress": False, "v_lrr": 0.1}), "unknown config keys"),
    "layer out of range": (_hp(layers=[7]), "out of range"),
    "no corpus": (_hp(), "needs corpus statistics"),
    "dataset name": (_hp(mom2_dataset="wikipedia"), "never downloads"),
}


@pytest.mark.parametrize("requests, match", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
@pytest.mark.parametrize("copy", [False, True])
def test_bad_requests_raise_zufasterror_and_leave_the_weights_alone(requests, match, copy):
    model, tok = llama()
    before = _hashes(model)
    with pytest.raises(ZuFastError, match=match):
        apply_zeroUnlearn_to_model(model, tok, requests, _hp(), copy=copy, return_orig_weights=True,
                                   corpus=corpus(40), context_templates=TEMPLATES)
    assert _hashes(model) == before and zu_fast.edits(model) == []


@pytest.mark.parametrize("hp, match", BAD_HPARAMS.values(), ids=BAD_HPARAMS.keys())
def test_bad_hparams_raise_zufasterror_and_leave_the_weights_alone(hp, match):
    model, tok = llama()
    before = _hashes(model)
    corpus_kw = {} if "corpus" in match or "downloads" in match else {"corpus": corpus(40)}
    with pytest.raises(ZuFastError, match=match):
        apply_zeroUnlearn_to_model(model, tok, [_request()], hp, return_orig_weights=True,
                                   context_templates=TEMPLATES, **corpus_kw)
    assert _hashes(model) == before and zu_fast.edits(model) == []
    with pytest.raises(ZuFastError, match="tokenizer"):
        apply_zeroUnlearn_to_model(model, None, [_request()], _hp(), corpus=corpus(40))
    assert _hashes(model) == before


# --------------------------------------------------------------------------------- hparams ------
PAPER = ["llama-3.1-8b-instruct", "llama-3.2-3b-instruct", "qwen3-4b"]


@pytest.mark.parametrize("gd", [False, True], ids=["ZeroUnlearn", "ZeroUnlearn-GD"])
@pytest.mark.parametrize("name", PAPER)
def test_shipped_yaml_is_the_shipped_preset(name, gd):
    hp = ZeroUnlearnHyperParams.from_hparams(hparams_path(name, gd=gd))
    assert hp.alg_name == ("ZeroUnlearn-GD" if gd else "ZeroUnlearn") and hp.batch_size == 1
    assert hp.to_config() == UnlearnConfig.preset(f"{name}-gd" if gd else name)
    assert ZeroUnlearnHyperParams.preset(name, gd=gd) == hp


def test_shipped_yaml_for_the_small_model_is_its_preset():
    tiny = UnlearnConfig.preset("zu-tiny")  # GD, as for_model gives it for the small model
    assert ZeroUnlearnHyperParams.preset("zu-tiny", gd=True).to_config() == tiny
    # the closed form: for_model(small model, method="closed_form") drops the GD-only target retry
    assert ZeroUnlearnHyperParams.preset("zu-tiny").to_config() == tiny.replace(method="closed_form",
                                                                                 target_retry_clamp=None)


def test_from_hparams_reads_easyedit_style_files(tmp_path):
    (tmp_path / "mine.yaml").write_text(textwrap.dedent("""\
        alg_name: ZeroUnlearn_DG        # the reference's folder name for GD
        model_name: ./hugging_cache/llama-3-8b
        device: 0
        layers: [4, 5, 6]
        v_lr: 1e-1                      # YAML 1.1 reads this as a string
        wiki_KKT_lam: 15000             # the reference's key names
        wiki_VKT_lam: 15000
        forget_KKT_lam: 20
        forget_VKT_lam: 20
        mom2_adjustment: true           # MEMIT / AlphaEdit keys ZeroUnlearn does not read
        mlp_module_tmp: "model.layers.{}.mlp"
        fact_token: subject_last
        """))
    hp = ZeroUnlearnHyperParams.from_hparams(tmp_path / "mine")  # no suffix: .yaml, as EasyEdit
    assert hp.alg_name == "ZeroUnlearn-GD" and hp.method == "gd" and hp.v_lr == 0.1 and hp.device == 0
    want = UnlearnConfig(method="gd", layers=[4, 5, 6], v_lr=0.1, forget_weight_fk=20.0, forget_weight_fv=20.0)
    assert hp.to_config() == want
    (tmp_path / "mine.json").write_text(json.dumps({"alg_name": "ZeroUnlearn", "layers": [1], "v_lr": 0.2}))
    assert ZeroUnlearnHyperParams.from_json(tmp_path / "mine.json").to_config() == UnlearnConfig(layers=[1], v_lr=0.2)


@pytest.mark.parametrize("text, match", [
    ("model_name: x\nlayers: [1]\n", "alg_name"),
    ("alg_name: MEMIT\nlayers: [1]\n", "ZeroUnlearnHyperParams are for"),
    ("alg_name: ZeroUnlearn-GD\nmethod: closed_form\n", "contradicts"),
    ("alg_name: ZeroUnlearn\nv_lrr: 0.1\n", r"unknown config keys \['v_lrr'\]"),
    ("alg_name: ZeroUnlearn\nv_lr: fast\n", "expected a number"),
    ("alg_name: ZeroUnlearn\nbatch_size: 0\n", "batch_size"),
    ("alg_name: ZeroUnlearn\nlayers: [3, 1]\n", "strictly increasing"),
    ("- a list\n", "mapping"),
], ids=["no-alg", "other-alg", "gd-closed-form", "unknown", "not-a-number", "batch-size", "layers", "list"])
def test_from_hparams_refuses_bad_files_naming_the_file(tmp_path, text, match):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ZuFastError, match=match) as e:
        ZeroUnlearnHyperParams.from_hparams(tmp_path / "bad.yaml")
    assert "bad.yaml" in str(e.value)
    with pytest.raises(ZuFastError, match="cannot read"):
        ZeroUnlearnHyperParams.from_hparams(tmp_path / "missing.yaml")
    with pytest.raises(ZuFastError, match="no shipped EasyEdit hparams"):
        hparams_path("gpt-5")


def test_without_layers_the_hparams_go_over_the_models_preset():
    model, _ = llama()
    hp = ZeroUnlearnHyperParams(alg_name="ZeroUnlearn", v_lr=0.3)
    assert hp.to_config(model) == UnlearnConfig.for_model(model, v_lr=0.3)
    assert hp.replace(layers=[0, 1]).to_config(model) == UnlearnConfig(layers=[0, 1], v_lr=0.3)


# --------------------------------------------------------------------------------- register -----
def test_register_adds_both_algorithms_to_easyedits_tables(tmp_path, monkeypatch):
    """register() against a package laid out as easyeditor is (util/alg_dict.py's ALG_DICT, the dict
    BaseEditor looks alg_name up in; editors/batch_editor.py's BatchEditor enum)."""
    pkg = tmp_path / "fake_easyeditor"
    (pkg / "util").mkdir(parents=True)
    (pkg / "editors").mkdir()
    for d in (pkg, pkg / "util", pkg / "editors"):
        (d / "__init__.py").write_text("")
    (pkg / "util" / "alg_dict.py").write_text("ALG_DICT = {'ROME': print, 'MEMIT': print}\n")
    (pkg / "editors" / "batch_editor.py").write_text(textwrap.dedent("""\
        from enum import Enum
        class BatchEditor(Enum):
            MEMIT = 'MEMIT'
            @staticmethod
            def is_batchable_method(alg_name: str):
                return alg_name == BatchEditor.MEMIT.value
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    table = easyedit.register("fake_easyeditor")
    table2 = easyedit.register("fake_easyeditor")  # idempotent
    from fake_easyeditor.editors.batch_editor import BatchEditor
    from fake_easyeditor.util.alg_dict import ALG_DICT

    assert table is table2 is ALG_DICT
    assert ALG_DICT["ZeroUnlearn"] is apply_zeroUnlearn_to_model
    assert ALG_DICT["ZeroUnlearn-GD"] is apply_zeroUnlearn_GD_to_model and ALG_DICT["ROME"] is print
    assert [BatchEditor.is_batchable_method(a) for a in ("ZeroUnlearn", "ZeroUnlearn-GD", "MEMIT", "ROME")] == \
        [True, True, True, False]
    for mod in [m for m in sys.modules if m.startswith("fake_easyeditor")]:
        del sys.modules[mod]
    with pytest.raises(ZuFastError, match="cannot import EasyEdit"):
        easyedit.register("no_such_easyeditor")


def test_layer_stats_is_still_at_zu_fast_compat():
    from zu_fast.compat import layer_stats
    from zu_fast.compat.memit import layer_stats as memit_layer_stats

    assert layer_stats is memit_layer_stats
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        import zu_fast.compat  # noqa: F401  (light: no EasyEdit adapter import needed)
