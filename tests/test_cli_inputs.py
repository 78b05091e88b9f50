"""Issue 26, items 5 and 7: every ``zu-fast`` command checks all its paths and inputs before any work and before
creating any folder.

Each case runs the command with one bad input and the expensive steps replaced by tripwires (loading a model,
training or loading the small model, the statistics pass): exit status 2, one line on stderr naming the input, no
tripwire touched, no folder created, the files already there unchanged. Also: ``zu-fast stats`` never prints "nan",
and ``zu-fast unlearn --out <the model folder> --overwrite`` is refused as ``--save-model`` there is.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from tiny_models import REQUESTS, corpus, llama

import zu_fast
from zu_fast import UnlearnConfig
from zu_fast.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
FIX = Path(__file__).parent / "fixtures" / "datasets"


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_inputs")
    model, tok = llama()
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    (root / "corpus.txt").write_text("\n".join(corpus(40)) + "\n")
    (root / "req.jsonl").write_text("\n".join(json.dumps(r) for r in REQUESTS) + "\n")
    (root / "cfg.json").write_text(json.dumps({"layers": [1, 2], "v_num_grad_steps": 2, "mom2_n_samples": 40,
                                               "original_representation": "clean"}))
    (root / "bad_cfg.json").write_text(json.dumps({"layers": [1, 2], "no_such_key": 1}))
    (root / "a_file").write_text("not a folder")
    (root / "empty_tfidf").mkdir()
    (root / "notes").mkdir()
    (root / "bad_schema.json").write_text(json.dumps([{"question": "q"}]))
    zu_fast.collect_stats(model, tok, corpus(40), UnlearnConfig(layers=[1, 2], progress=False),
                          cache_path=str(root / "stats"))
    with pytest.warns(UserWarning):
        edit = zu_fast.unlearn(model, tok, REQUESTS, UnlearnConfig(layers=[1, 2], progress=False, v_num_grad_steps=2,
                                                                    original_representation="clean"),
                               stats=zu_fast.collect_stats(model, tok, corpus(40), UnlearnConfig(layers=[1, 2],
                                                                                                   progress=False),
                                                           cache=False), context_templates=[["{}"]])
    edit.save(root / "edit")
    return root


@pytest.fixture()
def tripwires(monkeypatch, tmp_path):
    """Any expensive step fails the test: loading a model, training/loading the small model, a statistics pass."""
    import zu_fast.cli as cli
    from zu_fast.eval import harness, tinylm
    from zu_fast.stats import collect

    def trip(what):
        def f(*a, **kw):
            raise AssertionError(f"work started before the inputs were checked: {what}")
        return f

    monkeypatch.setattr(cli, "_load_model", trip("load the model"))
    monkeypatch.setattr(tinylm, "load_or_train", trip("train or load the small model"))
    monkeypatch.setattr(harness, "_load_local_model", trip("load --model"))
    monkeypatch.setattr(collect, "_collect", trip("statistics pass"))
    monkeypatch.setenv("ZU_FAST_CACHE", str(tmp_path / "cache"))


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


N = "new_out"  # the output folder every case names: it must not appear
CASES = {
    # eval (dataset mode and the small model's world)
    "eval_dataset_missing": (lambda w: ["eval", "--dataset", w / "missing.json", "--out", w / N],
                             r"--dataset '.*missing\.json': no such file"),
    "eval_dataset_of_unknown_schema": (lambda w: ["eval", "--dataset", w / "bad_schema.json", "--out", w / N],
                                       r"bad_schema\.json: record 0: cannot tell the dataset kind"),
    "eval_n_beyond_the_forget_split": (lambda w: ["eval", "--dataset", FIX / "mcf.json", "--n", "10", "--out",
                                                  w / N], r"--n 10: .*mcf\.json holds 12 records.*second half \(6"),
    "eval_model_missing": (lambda w: ["eval", "--dataset", FIX / "mcf.json", "--model", w / "nope", "--corpus",
                                      w / "corpus.txt", "--n", "2", "--out", w / N],
                           r"--model .*nope: not a folder .*does not exist"),
    "eval_model_without_corpus": (lambda w: ["eval", "--dataset", FIX / "mcf.json", "--model", w / "model", "--n",
                                             "2", "--out", w / N], r"--model needs --corpus"),
    "eval_corpus_missing": (lambda w: ["eval", "--dataset", FIX / "mcf.json", "--model", w / "model", "--corpus",
                                       w / "nope.txt", "--n", "2", "--out", w / N],
                            r"corpus file '.*nope\.txt' does not exist"),
    "eval_ppl_text_missing": (lambda w: ["eval", "--dataset", FIX / "mcf.json", "--ppl-text", w / "held.txt", "--n",
                                         "2", "--out", w / N], r"--ppl-text '.*held\.txt': no such file"),
    "eval_snippets_missing": (lambda w: ["eval", "--dataset", FIX / "mcf.json", "--snippets", w / "s.json", "--n",
                                        "2", "--out", w / N], r"--snippets '.*s\.json': no such file"),
    "eval_tfidf_folder_empty": (lambda w: ["eval", "--dataset", FIX / "mcf.json", "--tfidf", w / "empty_tfidf",
                                           "--n", "2", "--out", w / N], r"--tfidf .*idf\.npy and tfidf_vocab\.json"),
    "eval_config_missing": (lambda w: ["eval", "--dataset", FIX / "mcf.json", "--config", w / "c.json", "--n", "2",
                                       "--out", w / N], r"--config '.*c\.json': no such file"),
    "eval_config_invalid": (lambda w: ["eval", "--dataset", FIX / "mcf.json", "--config", w / "bad_cfg.json", "--n",
                                       "2", "--out", w / N], r"no_such_key"),
    "eval_unknown_preset": (lambda w: ["eval", "--dataset", FIX / "mcf.json", "--preset", "gpt-17", "--out", w / N],
                            r"--preset 'gpt-17': no such preset"),
    "eval_out_is_a_file": (lambda w: ["eval", "--out", w / "a_file"], r"--out '.*a_file' is a file"),
    "eval_bad_seeds": (lambda w: ["eval", "--seeds", "1,x", "--out", w / N], r"--seeds: expected"),
    "eval_bad_methods": (lambda w: ["eval", "--methods", "zeroUnlearn,magic", "--out", w / N],
                         r"unknown method 'magic'"),
    "eval_bad_tinylm_json": (lambda w: ["eval", "--tinylm", "{steps: 5", "--out", w / N], r"--tinylm .*not valid"),
    "eval_bad_probes": (lambda w: ["eval", "--probes", "quant,xray", "--out", w / N], r"unknown probes \['xray'\]"),
    "eval_dataset_option_without_dataset": (lambda w: ["eval", "--corpus", w / "corpus.txt", "--out", w / N],
                                            r"--corpus is an option of the dataset mode"),
    "eval_merge_file_missing": (lambda w: ["eval", "--merge", w / "r.json", "--out", w / N],
                                r"--merge '.*r\.json': no such file"),
    # demo
    "demo_n_zero": (lambda w: ["demo", "--n", "0"], r"--n 0: the demo's world has \d+ people; forget 1 to \d+"),
    "demo_n_too_large": (lambda w: ["demo", "--n", "100000"], r"--n 100000: the demo's world"),
    # stats
    "stats_corpus_missing": (lambda w: ["stats", "--model", w / "model", "--corpus", w / "nope.txt", "--out", w / N],
                             r"corpus file .*nope\.txt' does not exist"),
    "stats_config_missing": (lambda w: ["stats", "--model", w / "model", "--corpus", w / "corpus.txt", "--config",
                                        w / "c.json", "--out", w / N], r"config file '.*c\.json' does not exist"),
    "stats_config_invalid": (lambda w: ["stats", "--model", w / "model", "--corpus", w / "corpus.txt", "--config",
                                        w / "bad_cfg.json", "--out", w / N], r"no_such_key"),
    "stats_layers_not_integers": (lambda w: ["stats", "--model", w / "model", "--corpus", w / "corpus.txt",
                                             "--layers", "1,x", "--out", w / N], r"--layers '1,x': expected"),
    "stats_negative_layer": (lambda w: ["stats", "--model", w / "model", "--corpus", w / "corpus.txt", "--layers",
                                        "-1", "--out", w / N], r"--layers '-1': layers are indices ≥ 0"),
    "stats_n_samples_zero": (lambda w: ["stats", "--model", w / "model", "--corpus", w / "corpus.txt",
                                        "--n-samples", "0", "--out", w / N], r"--n-samples 0"),
    "stats_out_is_a_file": (lambda w: ["stats", "--model", w / "model", "--corpus", w / "corpus.txt", "--out",
                                       w / "a_file"], r"a_file' is a file"),
    # unlearn
    "unlearn_out_is_the_model_folder": (lambda w: ["unlearn", "--model", w / "model", "--requests", w / "req.jsonl",
                                                   "--stats", w / "stats", "--out", w / "model", "--overwrite"],
                                        r"--out '.*model' is the source model folder"),
    "unlearn_save_model_is_the_edit_folder": (lambda w: ["unlearn", "--model", w / "model", "--requests",
                                                         w / "req.jsonl", "--stats", w / "stats", "--out", w / N,
                                                         "--save-model", w / N],
                                              r"--save-model '.*new_out' and --out are the same folder"),
    "unlearn_config_missing": (lambda w: ["unlearn", "--model", w / "model", "--requests", w / "req.jsonl", "--stats",
                                          w / "stats", "--config", w / "c.json", "--out", w / N],
                               r"config file '.*c\.json' does not exist"),
    "unlearn_corpus_missing": (lambda w: ["unlearn", "--model", w / "model", "--requests", w / "req.jsonl",
                                          "--corpus", w / "nope.txt", "--out", w / N],
                               r"corpus file .*nope\.txt' does not exist"),
    "unlearn_requests_missing": (lambda w: ["unlearn", "--model", w / "model", "--requests", w / "r.jsonl",
                                            "--stats", w / "stats", "--out", w / N],
                                 r"requests file '.*r\.jsonl' does not exist"),
    # apply / restore
    "apply_edit_missing": (lambda w: ["apply", w / "no_edit", "--model", w / "model", "--out", w / N],
                           r"no_edit is not a saved zu_fast edit folder"),
    "apply_edit_not_an_edit": (lambda w: ["apply", w / "notes", "--model", w / "model", "--out", w / N],
                               r"notes is not a saved zu_fast edit folder \(no edit\.json\)"),
    "apply_out_is_the_edit_folder": (lambda w: ["apply", w / "edit", "--model", w / "model", "--out", w / "edit",
                                                "--overwrite"], r"--out '.*edit' is the edit's own folder"),
    "apply_model_missing": (lambda w: ["apply", w / "edit", "--model", w / "nope", "--out", w / N],
                            r"model folder '.*nope' does not exist"),
    "restore_out_is_the_model": (lambda w: ["restore", w / "edit", "--model", w / "model", "--out", w / "model",
                                            "--overwrite"], r"--out '.*model' is the source model folder"),
    "restore_edit_missing": (lambda w: ["restore", w / "no_edit", "--model", w / "model", "--out", w / N],
                             r"no_edit is not a saved zu_fast edit folder"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_refused_before_any_work_and_any_folder(w, tripwires, capsys, case, tmp_path):
    argv_fn, pattern = CASES[case]
    before = _files(w)
    code = main([str(a) for a in argv_fn(w)])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err and "unexpected error" not in err, err
    assert re.search(pattern, lines[0]), lines[0]
    assert not (w / N).exists()
    assert _files(w) == before
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("n_texts,says", [(3, "convergence not measured (the corpus fit in one batch"),
                                          (400, "rel. change over last")])
def test_stats_prints_no_nan(w, capsys, tmp_path, monkeypatch, n_texts, says):
    monkeypatch.setenv("ZU_FAST_CACHE", str(tmp_path / "cache"))
    (tmp_path / "c.txt").write_text("\n".join(corpus(n_texts, seed=3)) + "\n")
    code = main(["stats", "--model", str(w / "model"), "--corpus", str(tmp_path / "c.txt"), "--layers", "1,2",
                 "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    assert not re.search(r"\bnan\b", out, re.IGNORECASE) and says in out, out
    assert len([line for line in out.splitlines() if line.strip().startswith("layer ")]) == 2
