"""The ``zu-fast`` command line (issue 14): unlearn → apply → restore on a saved tiny model, every error one
line on stderr with exit status 2 and no file changed, --debug, the installed entry point, and MEMIT's
GPT-2 hparams file end to end."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import REQUESTS, corpus, gpt2, llama

import zu_fast
from zu_fast import UnlearnConfig, ZuFastError
from zu_fast.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
FAST = {"layers": [1, 2], "v_num_grad_steps": 3, "context_template_length": 3, "original_representation": "clean",
        "mom2_n_samples": 40}


def files(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ZU_FAST_CACHE", str(root / "cache"))
        model, tok = llama()
        model.save_pretrained(root / "model")
        tok.save_pretrained(root / "model")
        (root / "corpus.txt").write_text("\n".join(corpus(40)) + "\n")
        (root / "req.jsonl").write_text("\n".join(json.dumps(r) for r in REQUESTS) + "\n")
        (root / "cfg.json").write_text(json.dumps(FAST))
        cfg = UnlearnConfig(**FAST, progress=False)
        zu_fast.collect_stats(model, tok, corpus(40), cfg, cache_path=str(root / "stats"))
        yield root


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def edited(work):
    """``zu-fast unlearn ... --out edit --save-model edited`` once (the exit status, the folder)."""
    out = work / "run"
    code = main([str(a) for a in ("unlearn", "--model", work / "model", "--requests", work / "req.jsonl", "--stats",
                                  work / "stats", "--config", work / "cfg.json", "--out", out / "edit",
                                  "--save-model", out / "edited", "--quiet")])
    return code, out


def test_unlearn_apply_restore(work, edited, capsys, tmp_path):
    w = work
    code, run_dir = edited
    assert code == 0
    assert (run_dir / "edit" / "edit.json").exists()
    record = json.loads((run_dir / "edited" / "zu_fast_edits.json").read_text())["edits"]
    edit_id = json.loads((run_dir / "edit" / "edit.json").read_text())["id"]
    assert [r["id"] for r in record] == [edit_id]
    (tmp_path / "edit").symlink_to(run_dir / "edit")
    (tmp_path / "edited").symlink_to(run_dir / "edited")
    code, out, err = run(capsys, "apply", tmp_path / "edit", "--model", w / "model", "--out", tmp_path / "applied")
    assert code == 0, err
    assert "layer 1: exact (edited fingerprint)" in out
    a = load_file(str(tmp_path / "edited" / "model.safetensors"))
    b = load_file(str(tmp_path / "applied" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the saved edit reproduces the live one bit for bit
    code, out, err = run(capsys, "restore", tmp_path / "edit", "--model", tmp_path / "applied", "--out",
                         tmp_path / "restored", "--quiet")
    assert code == 0, err
    assert f"removed edit {edit_id}" in out
    base = load_file(str(w / "model" / "model.safetensors"))
    back = load_file(str(tmp_path / "restored" / "model.safetensors"))
    assert all(torch.allclose(base[k], back[k], rtol=0, atol=1e-6) for k in base)
    assert json.loads((tmp_path / "restored" / "zu_fast_edits.json").read_text())["edits"] == []
    # the restored model no longer carries it: a second restore is refused
    code, _, err = run(capsys, "restore", tmp_path / "edit", "--model", tmp_path / "restored", "--out",
                       tmp_path / "again")
    assert code == 2 and "does not carry" in err


def _bad_requests(w: Path) -> Path:
    p = w / "bad_req.jsonl"
    p.write_text(json.dumps(REQUESTS[0]) + "\n" + json.dumps({**REQUESTS[1], "prompt": "{x} works for {}"}) + "\n")
    return p


def _not_json(w: Path) -> Path:
    p = w / "not_json.jsonl"
    p.write_text(json.dumps(REQUESTS[0]) + "\n{prompt: oops}\n")
    return p


def _jsonl_corpus(w: Path) -> Path:
    p = w / "corpus.jsonl"
    p.write_text('{"text": "Alice was born in Lisbon."}\n{"text": 5}\n')
    return p


def _occupied(w: Path) -> Path:
    p = w / "occupied"
    p.mkdir(exist_ok=True)
    (p / "thesis.tex").write_text("years of work")
    return p


def _no_config(w: Path) -> Path:
    p = w / "not_a_model"
    p.mkdir(exist_ok=True)
    (p / "weights.bin").write_bytes(b"x")
    return p


def _unlearn(w: Path, *extra, requests=None, out=None) -> list:
    return ["unlearn", "--model", w / "model", "--requests", requests or w / "req.jsonl", "--config", w / "cfg.json",
            "--out", out or w / "new_edit", *extra]


# name → (argv builder, message pattern); every case: exit 2, one line on stderr, no traceback, no file changed
ERROR_CASES = {
    "model_folder_missing": (lambda w: ["unlearn", "--model", w / "nope", "--requests", w / "req.jsonl",
                                        "--corpus", w / "corpus.txt", "--out", w / "e"],
                             r"model folder '.*nope' does not exist"),
    "model_folder_without_config": (lambda w: ["stats", "--model", _no_config(w), "--corpus", w / "corpus.txt"],
                                    r"not_a_model' is not a HuggingFace model folder \(no config\.json\)"),
    "request_with_named_field": (lambda w: _unlearn(w, "--corpus", w / "corpus.txt", requests=_bad_requests(w)),
                                 r"bad_req\.jsonl: request#1 .*replacement field \{x\}"),
    "request_line_not_json": (lambda w: _unlearn(w, "--corpus", w / "corpus.txt", requests=_not_json(w)),
                              r"not_json\.jsonl:2: not valid JSON"),
    "out_folder_not_empty": (lambda w: _unlearn(w, "--corpus", w / "corpus.txt", out=_occupied(w)),
                             r"edit folder '.*occupied' is not empty \(it holds thesis\.tex\)"),
    "save_model_into_source": (lambda w: _unlearn(w, "--stats", w / "stats", "--save-model", w / "model",
                                                  "--overwrite"),
                               r"--save-model '.*model' is the source model folder"),
    "corpus_line_not_a_string": (lambda w: _unlearn(w, "--corpus", _jsonl_corpus(w)),
                                 r"corpus\.jsonl:2: \"text\" has type int \(5\)"),
    "stats_of_another_dtype": (lambda w: _unlearn(w, "--stats", w / "stats", "--dtype", "bf16"),
                               r"statistics in .*stats were computed for a different dtype: they were collected on "
                               r"float32 weights, this model's are bfloat16"),
    "stats_without_a_layer": (lambda w: _unlearn(w, "--stats", w / "stats", "--layers", "1,2,3"),
                              r"have no layers \[3\] \(they cover \[1, 2\]\)"),
    "stats_folder_of_other_layers": (lambda w: ["stats", "--model", w / "model", "--corpus", w / "corpus.txt",
                                                "--config", w / "cfg.json", "--layers", "1,3", "--out", w / "stats"],
                                     r"stats were computed with different settings: layers \[1, 2\] \(expected "
                                     r"\[1, 3\]\)\. .*--overwrite"),
    "stats_folder_missing": (lambda w: _unlearn(w, "--stats", w / "no_stats"),
                             r"no_stats is not a zu_fast statistics folder \(no meta\.json\)"),
    "neither_corpus_nor_stats": (lambda w: _unlearn(w), r"give --corpus .* or --stats DIR"),
    "stats_out_not_empty": (lambda w: ["stats", "--model", w / "model", "--corpus", w / "corpus.txt", "--out",
                                       _occupied(w)], r"statistics folder '.*occupied' is not empty"),
    "apply_missing_edit": (lambda w: ["apply", w / "missing_edit", "--model", w / "model", "--out", w / "model"],
                          r"missing_edit is not a saved zu_fast edit folder \(no edit\.json\)"),
    "usage_error": (lambda w: ["unlearn", "--model", w / "model"], r"the following arguments are required: "
                    r"--requests, --out \(see zu-fast unlearn --help\)"),
    "unknown_method": (lambda w: _unlearn(w, "--method", "magic"), r"argument --method: invalid choice: 'magic'"),
    "bad_layers": (lambda w: _unlearn(w, "--stats", w / "stats", "--layers", "1,x"), r"--layers '1,x': expected"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_errors_are_one_line_exit_2_and_change_nothing(work, capsys, case):
    argv_fn, pattern = ERROR_CASES[case]
    argv = argv_fn(work)
    watched = [work / "model", work / "stats", work / "occupied"]
    before = {p: files(p) for p in watched if p.exists()}
    cache_before = sorted((work / "cache").rglob("*")) if (work / "cache").exists() else []
    try:
        code, _, err = run(capsys, *argv)
    except SystemExit as e:  # argparse usage errors exit from inside parse_args
        code, err = e.code, capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.search(pattern, lines[0]), lines[0]
    assert {p: files(p) for p in before} == before
    # refused before any statistics pass: the cache has no new entry
    assert (sorted((work / "cache").rglob("*")) if (work / "cache").exists() else []) == cache_before


def test_apply_refuses_the_source_folder_and_another_dtype_without_cast(work, edited, capsys, tmp_path):
    (tmp_path / "edit").symlink_to(edited[1] / "edit")
    before = files(work / "model")
    code, _, err = run(capsys, "apply", tmp_path / "edit", "--model", work / "model", "--out", work / "model",
                       "--overwrite")
    assert code == 2 and "is the source model folder" in err
    code, _, err = run(capsys, "apply", tmp_path / "edit", "--model", work / "model", "--out", tmp_path / "b",
                       "--dtype", "bf16")
    assert code == 2 and "pass cast=True (command line: --cast)" in err and not (tmp_path / "b").exists()
    code, out, err = run(capsys, "apply", tmp_path / "edit", "--model", work / "model", "--out", tmp_path / "b",
                         "--dtype", "bf16", "--cast")
    assert code == 0 and "within rounding (cast from float32" in out, err
    assert load_file(str(tmp_path / "b" / "model.safetensors"))["model.layers.1.mlp.down_proj.weight"].dtype == \
        torch.bfloat16
    assert files(work / "model") == before


def test_debug_shows_the_traceback(work):
    with pytest.raises(ZuFastError, match="does not exist"):
        main(["unlearn", "--model", str(work / "nope"), "--requests", str(work / "req.jsonl"), "--corpus",
              str(work / "corpus.txt"), "--out", str(work / "e"), "--debug"])


def test_installed_entry_point_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "zu_fast.cli", "unlearn", "--model", str(tmp_path / "missing"),
                           "--requests", str(tmp_path / "r.jsonl"), "--corpus", "c.txt", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"zu-fast unlearn: error: requests file '{tmp_path / 'r.jsonl'}' "
                                                "does not exist"]


def test_memit_gpt2_hparams_file_end_to_end(tmp_path):
    """MEMIT's hparams/MEMIT/gpt2-xl.json, unchanged except layers / v_loss_layer / sizes for a 3-layer GPT-2:
    its lm_head_module is transformer.wte (the tied unembedding), several keys have no effect here. (Through
    the library, with two overrides for time; the command line reads the file with the same from_json.)"""
    model, tok = gpt2()
    memit = {"layers": [0, 1], "clamp_norm_factor": 0.75, "layer_selection": "all", "fact_token": "subject_last",
             "v_num_grad_steps": 3, "v_lr": 5e-1, "v_loss_layer": 2, "v_weight_decay": 0.5, "kl_factor": 0.0625,
             "mom2_adjustment": True, "mom2_update_weight": 20000, "rewrite_module_tmp": "transformer.h.{}.mlp.c_proj",
             "layer_module_tmp": "transformer.h.{}", "mlp_module_tmp": "transformer.h.{}.mlp",
             "attn_module_tmp": "transformer.h.{}.attn", "ln_f_module": "transformer.ln_f",
             "lm_head_module": "transformer.wte", "mom2_dataset": "wikipedia", "mom2_n_samples": 30,
             "mom2_dtype": "float32"}
    (tmp_path / "gpt2-xl.json").write_text(json.dumps(memit))
    cfg = UnlearnConfig.from_json(tmp_path / "gpt2-xl.json", progress=False, original_representation="clean",
                                  context_template_length=3)
    assert cfg.closed_form.corpus_weight_k == 20000 and cfg.targets.lr == 0.5
    assert cfg.locate.lm_head == "transformer.wte"
    stats = zu_fast.collect_stats(model, tok, corpus(30), cfg, cache=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    edit = zu_fast.unlearn(model, tok, REQUESTS, cfg, stats=stats)
    assert edit.config.locate.lm_head == "lm_head"  # the output module sharing wte's weight
    assert sorted(edit.report.layers) == [0, 1] and edit.report.n_requests == 3
    assert edit.report.targets["z_steps_mean"] > 0
    edit.save(tmp_path / "edit")
    edit.restore()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert zu_fast.Edit.load(tmp_path / "edit").apply(model).verification
