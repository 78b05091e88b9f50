"""Issue 14: every bad input, corrupted file and foreign statistic is refused with a ZuFastError that names
the thing, and every parameter of the model is bit-identical afterwards (a SHA-256 of its bytes: NaNs
compare equal that way). One parametrised test per group; the cases are the issue's list."""

from __future__ import annotations

import copy
import hashlib
import json
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tiny_models import REQUESTS, corpus, gpt2, llama, param_hashes

import zu_fast
from zu_fast import Edit, StaleStatsError, UnlearnConfig, UnlearnRequest, ZuFastError
from zu_fast.stats.collect import CorpusStats

TEMPLATES = [["{}"], ["Because I. {}"]]


def folder_hashes(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


class Env:
    """A tiny Llama, its statistics and a saved edit of it, shared by the cases (each case works on a copy)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.model, self.tok = llama()
        self.cfg = UnlearnConfig.for_model(self.model, layers=[1, 2], progress=False, v_num_grad_steps=3,
                                           original_representation="clean")
        self.stats = zu_fast.collect_stats(self.model, self.tok, corpus(40), self.cfg, cache=False)
        work = copy.deepcopy(self.model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            edit = zu_fast.unlearn(work, self.tok, REQUESTS, self.cfg, stats=self.stats, context_templates=TEMPLATES)
        self.edit_dir = edit.save(tmp / "edit")
        edit.restore()

    def fresh(self) -> torch.nn.Module:
        return copy.deepcopy(self.model)

    def copy_edit(self, name: str) -> Path:
        dst = self.tmp / name
        dst.mkdir()
        for p in self.edit_dir.iterdir():
            (dst / p.name).write_bytes(p.read_bytes())
        return dst


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    return Env(tmp_path_factory.mktemp("bad_inputs"))


def _unlearn(env: Env, model=None, requests=REQUESTS, cfg=None, stats=None, tok="default"):
    model = model if model is not None else env.fresh()
    tok = env.tok if tok == "default" else tok
    return model, lambda: zu_fast.unlearn(model, tok, requests, cfg if cfg is not None else env.cfg,
                                          stats=stats if stats is not None else env.stats,
                                          context_templates=TEMPLATES)


def _req(**kw):
    return [{"prompt": "{} was born in", "subject": "Alice Morvan", "target_true": "Lisbon", **kw}]


def _nan_above(env: Env):
    model = env.fresh()
    with torch.no_grad():
        model.model.layers[3].mlp.up_proj.weight[0, 0] = float("nan")  # above the edited layers 1, 2
    return _unlearn(env, model=model)


def _from_text(env: Env):
    """A request built from full text whose subject is not in it, then unlearned (refused when it is built)."""
    model = env.fresh()
    return model, lambda: zu_fast.unlearn(model, env.tok, [UnlearnRequest.from_text("Alice was born in", "Bob Kestrel",
                                                                                     "Lisbon")], env.cfg,
                                          stats=env.stats, context_templates=TEMPLATES)


def _stats_of(env: Env, model) -> CorpusStats:
    return zu_fast.collect_stats(model, env.tok, corpus(20), env.cfg, cache=False)


def _other_module_stats(env: Env) -> CorpusStats:
    meta = copy.deepcopy(env.stats.meta)
    meta["settings"]["rewrite_module_tmp"] = "model.layers.{}.mlp.up_proj"
    return CorpusStats(env.stats.layers, meta)


def _mutated_cfg(env: Env) -> UnlearnConfig:
    cfg = env.cfg.replace()
    cfg.layers = [2, 1]  # changed after it was validated
    return cfg


# name → (setup(env) → (model to hash, action), error type, message pattern)
UNLEARN_CASES: dict[str, tuple[Callable, type, str]] = {
    "prompt_with_named_field": (lambda e: _unlearn(e, requests=_req(prompt="{x} was born in {}")),
                                ZuFastError, r"request#0 .*replacement field \{x\}"),
    "prompt_with_lone_brace": (lambda e: _unlearn(e, requests=_req(prompt="{} was born in {")),
                               ZuFastError, r"request#0 .*not a valid template"),
    "subject_not_a_string": (lambda e: _unlearn(e, requests=_req(subject=42)),
                             ZuFastError, r"request#0 \(subject 42\): subject must be a string, got int 42"),
    "contradictory_requests": (lambda e: _unlearn(e, requests=_req() + _req(target_true="Oslo")),
                               ZuFastError, r"contradictory requests: request#0 .* request#1 .*'Lisbon' and 'Oslo'"),
    "subject_longer_than_context": (lambda e: _unlearn(e, requests=_req(subject="Alice Morvan " * 200)),
                                    ZuFastError, r"request#0 .*tokens; the model reads at most 256"),
    "no_requests": (lambda e: _unlearn(e, requests=[]), ZuFastError, r"no requests"),
    # issue 26: "subject not in the prompt" is real where it can happen
    "prompt_spells_the_subject_out": (lambda e: _unlearn(e, requests=_req(prompt="Alice Morvan was born in")),
                                      ZuFastError,
                                      r"request#0 .*spells the subject out instead.*UnlearnRequest\.from_text"),
    "prompt_without_braces_or_subject": (lambda e: _unlearn(e, requests=_req(prompt="She was born in")), ZuFastError,
                                         r"request#0 .*found none, and the subject is not found in the prompt"),
    "from_text_subject_not_in_the_text": (_from_text, ZuFastError,
                                          r"^subject 'Bob Kestrel' not found in the prompt "
                                          r"'Alice was born in'$"),
    "nan_weights_above_edited_layers": (_nan_above, ZuFastError,
                                        r"NaN/Inf: model\.layers\.3\.mlp\.up_proj\.weight"),
    "stats_of_another_model": (lambda e: _unlearn(e, stats=_stats_of(e, llama(seed=1)[0])),
                               StaleStatsError, r"different model"),
    "stats_of_another_dtype": (lambda e: _unlearn(e, model=e.fresh().to(torch.bfloat16)),
                               StaleStatsError, r"different dtype: .*float32 weights, this model's are bfloat16"),
    "stats_without_a_layer": (lambda e: _unlearn(e, cfg=e.cfg.replace(layers=[1, 2, 3])),
                              ZuFastError, r"no layers \[3\] \(they cover \[1, 2\]\)"),
    "stats_of_another_module": (lambda e: _unlearn(e, stats=_other_module_stats(e)),
                                StaleStatsError, r"of module 'model\.layers\.\{\}\.mlp\.up_proj'"),
    "layer_out_of_range": (lambda e: _unlearn(e, cfg=e.cfg.replace(layers=[1, 9])),
                           ZuFastError, r"layer 9 out of range"),
    "lm_head_is_an_untied_input_embedding": (
        lambda e: _unlearn(e, cfg=e.cfg.replace(lm_head_module="model.embed_tokens")),
        ZuFastError, r"lm_head_module 'model\.embed_tokens' is the input embedding"),
    "config_changed_after_validation": (lambda e: _unlearn(e, cfg=_mutated_cfg(e)),
                                        ZuFastError, r"config\.layers must be strictly increasing"),
    "config_not_a_config": (lambda e: _unlearn(e, cfg={"layers": [1, 2]}),
                            ZuFastError, r"config must be an UnlearnConfig"),
    "no_tokenizer": (lambda e: _unlearn(e, tok=None), ZuFastError, r"tokenizer"),
}


@pytest.mark.parametrize("case", sorted(UNLEARN_CASES))
def test_unlearn_refuses_bad_input_before_any_change(env, case):
    setup, error, match = UNLEARN_CASES[case]
    model, action = setup(env)
    before = param_hashes(model)
    with pytest.raises(error, match=match):
        action()
    assert param_hashes(model) == before
    assert zu_fast.edits(model) == []


# ------------------------------------------------------------------ saved edits: load + apply ---------
def _edit_json(path: Path, change: Callable[[dict], None]) -> Path:
    meta = json.loads((path / "edit.json").read_text())
    change(meta)
    (path / "edit.json").write_text(json.dumps(meta))
    return path


def _tamper_edited_fp(env: Env) -> Path:
    def change(m):
        m["edited_fingerprints"]["2"] = "0" * 64

    return _edit_json(env.copy_edit("tampered_fp"), change)


def _corrupt_json(env: Env) -> Path:
    p = env.copy_edit("bad_json")
    (p / "edit.json").write_text((p / "edit.json").read_text()[:-20])
    return p


def _missing_key(env: Env) -> Path:
    return _edit_json(env.copy_edit("no_base"), lambda m: m.pop("base_fingerprints"))


def _truncated_factors(env: Env) -> Path:
    p = env.copy_edit("truncated")
    raw = (p / "factors.safetensors").read_bytes()
    (p / "factors.safetensors").write_bytes(raw[: len(raw) // 2])
    return p


def _flipped_factor_bytes(env: Env) -> Path:
    p = env.copy_edit("flipped")
    raw = bytearray((p / "factors.safetensors").read_bytes())
    raw[-5] ^= 0x10  # inside the last tensor's data: a finite, plausible-looking change
    (p / "factors.safetensors").write_bytes(bytes(raw))
    return p


def _mixed_writes(env: Env) -> Path:
    p = env.copy_edit("mixed")
    again = Edit.load(env.edit_dir)
    again.save(env.tmp / "mixed_other")
    (p / "factors.safetensors").write_bytes((env.tmp / "mixed_other" / "factors.safetensors").read_bytes())
    return p


def _nan_factor(env: Env) -> Edit:
    edit = Edit.load(env.edit_dir)
    edit.factors[1][0, 0] = float("nan")
    return edit


def _apply_saved(make: Callable[[Env], Path | Edit], model_fn=None, cast: bool = False):
    def setup(env: Env):
        model = model_fn(env) if model_fn is not None else env.fresh()

        def action():
            obj = make(env)
            edit = obj if isinstance(obj, Edit) else Edit.load(obj)
            edit.apply(model, cast=cast)

        return model, action

    return setup


APPLY_CASES: dict[str, tuple[Callable, type, str]] = {
    "nan_in_factors": (_apply_saved(_nan_factor), ZuFastError, r"layer 1's factor .*has 1 NaN/Inf entries"),
    "edited_fingerprint_mismatch_is_undone": (_apply_saved(_tamper_edited_fp), ZuFastError,
                                              r"layer 2: after applying, .* does not have the edited fingerprint.*put "
                                              r"back"),
    "another_model": (_apply_saved(lambda e: e.edit_dir, lambda e: llama(seed=1)[0]), ZuFastError,
                      r"layer 1: refusing to apply: model\.layers\.1\.mlp\.down_proj"),
    "another_dtype_without_cast": (_apply_saved(lambda e: e.edit_dir, lambda e: e.fresh().to(torch.bfloat16)),
                                   ZuFastError, r"made for float32 weights, .* is bfloat16; pass cast=True"),
    "another_architecture": (_apply_saved(lambda e: e.edit_dir, lambda e: llama(hidden=64, d_ff=48)[0]),
                             ZuFastError, r"layer 1: refusing to apply: the factor is \(32, 32\)"),
    "edit_json_not_json": (_apply_saved(_corrupt_json), ZuFastError, r"bad_json/edit\.json: corrupted, not valid JSON"),
    "edit_json_missing_key": (_apply_saved(_missing_key), ZuFastError,
                              r"no_base/edit\.json: corrupted, no 'base_fingerprints' entry"),
    "factors_truncated": (_apply_saved(_truncated_factors), ZuFastError,
                          r"truncated/factors\.safetensors: corrupted or truncated"),
    "factors_changed": (_apply_saved(_flipped_factor_bytes), ZuFastError,
                        r"flipped/factors\.safetensors: layer \d's factor does not match its SHA-256"),
    "files_of_two_writes": (_apply_saved(_mixed_writes), ZuFastError,
                            r"mixed/factors\.safetensors does not belong with the JSON .*two writes"),
}


@pytest.mark.parametrize("case", sorted(APPLY_CASES))
def test_saved_edit_is_verified_and_nothing_changes(env, case):
    setup, error, match = APPLY_CASES[case]
    model, action = setup(env)
    before = param_hashes(model)
    with pytest.raises(error, match=match):
        action()
    assert param_hashes(model) == before
    assert zu_fast.edits(model) == []


# ------------------------------------------------------------------ statistics cache and corpus ------
def _stats_dir(env: Env, name: str) -> Path:
    path = env.tmp / name
    zu_fast.collect_stats(env.model, env.tok, corpus(20), env.cfg, cache_path=str(path))
    return path


def _corrupt_meta(env: Env) -> Path:
    p = _stats_dir(env, "st_meta")
    (p / "meta.json").write_text("{\"format_version\": 1, ")
    return p


def _truncate_stats(env: Env) -> Path:
    p = _stats_dir(env, "st_trunc")
    raw = (p / "stats.safetensors").read_bytes()
    (p / "stats.safetensors").write_bytes(raw[:100])
    return p


def _collect(corpus_fn: Callable[[Env], object], cache_fn: Callable[[Env], Path] | None = None, model_fn=None):
    def setup(env: Env):
        model = model_fn(env) if model_fn is not None else env.fresh()

        def action():
            cache_path = str(cache_fn(env)) if cache_fn is not None else None
            zu_fast.collect_stats(model, env.tok, corpus_fn(env), env.cfg, cache=cache_path is not None,
                                  cache_path=cache_path)

        return model, action

    return setup


def _jsonl(env: Env) -> Path:
    p = env.tmp / "corpus.jsonl"
    p.write_text('{"text": "Alice was born in Lisbon."}\n{"text": 5}\n')
    return p


def _binary_line(env: Env) -> Path:
    p = env.tmp / "corpus_bin.txt"
    p.write_bytes("".join(f"text number {i}\n" for i in range(23)).encode() + b"a \xff\xfe binary line\n" + b"ok\n")
    return p


def _non_empty_folder(env: Env) -> Path:
    p = env.tmp / "someones_folder"
    p.mkdir(exist_ok=True)
    (p / "notes.txt").write_text("mine")
    return p


STATS_CASES: dict[str, tuple[Callable, type, str]] = {
    "cache_meta_corrupted": (_collect(lambda e: corpus(20), _corrupt_meta), ZuFastError,
                             r"st_meta/meta\.json: corrupted, not valid JSON"),
    "cache_tensors_truncated": (_collect(lambda e: corpus(20), _truncate_stats), ZuFastError,
                                r"st_trunc/stats\.safetensors: corrupted or truncated"),
    "cache_of_another_dtype": (_collect(lambda e: corpus(20), lambda e: _stats_dir(e, "st_dtype"),
                                        lambda e: e.fresh().to(torch.bfloat16)),
                               StaleStatsError, r"st_dtype were computed for a different dtype"),
    "cache_path_is_someone_elses_folder": (_collect(lambda e: corpus(20), _non_empty_folder), ZuFastError,
                                           r"someones_folder' is not empty \(it holds notes\.txt\)"),
    "corpus_jsonl_text_not_a_string": (_collect(_jsonl), ZuFastError,
                                       r"corpus\.jsonl:2: \"text\" has type int \(5\), expected a string"),
    "corpus_item_not_a_string": (_collect(lambda e: ["Alice was born in Lisbon.", 5]), ZuFastError,
                                 r"corpus item 1 has type int"),
    "corpus_is_a_folder": (_collect(lambda e: e.tmp), ZuFastError, r"is a folder; give a \.txt or \.jsonl file"),
    "corpus_txt_binary_line": (_collect(_binary_line), ZuFastError,
                               r"corpus_bin\.txt:24: not UTF-8 text \(byte 0xff at column 3"),
}


@pytest.mark.parametrize("case", sorted(STATS_CASES))
def test_statistics_refuse_bad_files_and_corpora(env, case):
    setup, error, match = STATS_CASES[case]
    model, action = setup(env)
    before = param_hashes(model)
    with pytest.raises(error, match=match):
        action()
    assert param_hashes(model) == before


# ------------------------------------------------------------------ output folders ------------------
def test_save_refuses_a_non_empty_folder_and_overwrite_replaces_only_its_own_files(env, tmp_path):
    edit = Edit.load(env.edit_dir)
    target = tmp_path / "model_folder"
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"weights the user cares about")
    (target / "edit.json").write_text("{}")  # a stale file of ours, to be replaced
    before = folder_hashes(target)
    with pytest.raises(ZuFastError, match=r"model_folder' is not empty \(it holds edit\.json, model\.safetensors\)"):
        edit.save(target)
    assert folder_hashes(target) == before
    with pytest.raises(ZuFastError, match="is a file"):
        edit.save(target / "model.safetensors")
    edit.save(target, overwrite=True)
    after = folder_hashes(target)
    assert after["model.safetensors"] == before["model.safetensors"]  # never deleted, never touched
    assert after["edit.json"] != before["edit.json"] and "factors.safetensors" in after
    assert sorted(p.name for p in target.iterdir()) == ["edit.json", "factors.safetensors", "model.safetensors"]
    assert Edit.load(target).layers == edit.layers
    empty = tmp_path / "empty"
    empty.mkdir()
    edit.save(empty)  # an empty folder is not "non-empty"
    assert sorted(p.name for p in empty.iterdir()) == ["edit.json", "factors.safetensors"]


# ------------------------------------------------------------------ warnings, not errors -------------
@pytest.mark.filterwarnings("ignore:zu_fast. (the target|layer):UserWarning")
def test_duplicate_requests_warn_and_make_the_same_edit_as_one_copy(env):
    model = env.fresh()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        once = zu_fast.unlearn(model, env.tok, REQUESTS[:2], env.cfg, stats=env.stats, context_templates=TEMPLATES)
    once.restore()
    thrice = [REQUESTS[0], REQUESTS[1], dict(REQUESTS[0]), {**REQUESTS[0], "target_true": " Lisbon "}]
    with pytest.warns(UserWarning, match=r"2 duplicate request\(s\) dropped.*request#2 .*= request#0"):
        dup = zu_fast.unlearn(model, env.tok, thrice, env.cfg, stats=env.stats, context_templates=TEMPLATES)
    dup.restore()
    assert dup.report.n_requests == 2
    assert all(torch.equal(once.factors[k], dup.factors[k]) for k in once.factors)


@pytest.mark.parametrize("factory", [llama, gpt2], ids=["llama", "gpt2"])
def test_long_texts_are_truncated_to_the_trained_context(factory):
    model, tok = factory()  # max_position_embeddings / n_positions = 256
    cfg = UnlearnConfig.for_model(model, layers=[1], progress=False)  # stats_max_length 4096 > 256
    long_text = " ".join(["Alice Morvan was born in Lisbon"] * 300)  # ~1800 tokens
    st = zu_fast.collect_stats(model, tok, [long_text, "Bob works for Acme."], cfg, cache=False)
    assert st.meta["collection"]["max_length"] == 256
    assert st[1].n <= 256 + len(tok("Bob works for Acme.")["input_ids"])
