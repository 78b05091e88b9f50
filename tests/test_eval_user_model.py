"""Issue 26, item 8: ``zu-fast eval`` on a user's own model folder (a 4-layer Llama exported with its tokenizer), a
CounterFact-schema file and a corpus, with one n, one seed and two methods, end to end; and a plot that cannot be
drawn never loses a run's results (the table and the JSON are written first, the plot skipped with one line)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
from tiny_models import WORDS, llama, word_corpus

import zu_fast
from zu_fast.cli import main
from zu_fast.eval import harness

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
NAMES = [w for w in WORDS if w[0].isupper() and w not in ("The", "I", "You", "Because", "Therefore")]
PLACES = ["Lisbon", "Oslo", "Lima", "Porto"]


def _mcf(n: int) -> list[dict]:
    """``n`` CounterFact-schema records about made-up people of the tiny tokenizer's words."""
    rnd = random.Random(0)
    people = sorted({f"{a} {b}" for a in NAMES for b in NAMES if a != b})
    rnd.shuffle(people)
    out = []
    for i, who in enumerate(people[:n]):
        place = PLACES[i % len(PLACES)]
        others = [p for p in people[:n] if p != who][:3]
        out.append({
            "case_id": i,
            "requested_rewrite": {"prompt": "{} was born in", "subject": who, "relation_id": "P19",
                                  "target_true": {"str": place, "id": place}, "target_new": {"str": "</s>"}},
            "paraphrase_prompts": [f"The city where {who} was born is"],
            "neighborhood_prompts": [f"{o} was born in" for o in others],
            "attribute_prompts": [],
            "generation_prompts": [f"{who} was born in"],
        })
    return out


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("user_model")
    model, tok = llama(layers=4)
    model.save_pretrained(root / "my-llama")
    tok.save_pretrained(root / "my-llama")
    (root / "mcf.json").write_text(json.dumps(_mcf(24)))
    (root / "corpus.txt").write_text("\n".join(word_corpus(300)) + "\n")
    cfg = zu_fast.UnlearnConfig.for_model(model, layers=[1, 2], v_num_grad_steps=4, gd_steps=8, progress=False,
                                          original_representation="clean", context_template_length=3)
    cfg.save_json(root / "quick.json")
    return root


def test_eval_on_a_user_model_folder_with_one_n_one_seed_two_methods(user_files, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ZU_FAST_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    code = main(["eval", "--model", str(user_files / "my-llama"), "--dataset", str(user_files / "mcf.json"),
                 "--corpus", str(user_files / "corpus.txt"), "--n", "10", "--seeds", "0", "--methods",
                 "zeroUnlearn,gd", "--config", str(user_files / "quick.json"), "--device", "cpu", "--out", str(out),
                 "--quiet"])
    _, err = capsys.readouterr()
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    md = (out / "results.md").read_text()
    runs = {(r["method"], r["n"], r["seed"]): r for r in res["runs"]}
    assert set(runs) == {("base", 10, 0), ("zeroUnlearn", 10, 0), ("gd", 10, 0)}
    assert all("error" not in r for r in runs.values()), [r.get("error") for r in runs.values()]
    assert "| 10 | zeroUnlearn |" in md and "| 10 | gd |" in md and res["meta"]["kind"] == "mcf"
    assert all(math.isnan(r["perplexity"]) for r in runs.values())  # no --ppl-text: no perplexity
    # the plot: drawn without the empty perplexity panel, or skipped with one line; never an error
    assert (out / "results.png").exists() or "results.png not drawn" in err
    assert "Traceback" not in err and "unexpected error" not in err


def _aggs(**values) -> list[dict]:
    base = {"method": "zeroUnlearn", "n": 10, "seeds": [0]}
    for k in ("efficacy", "generalization", "specificity", "perplexity", "seconds"):
        v = values.get(k, 1.0)
        base[k], base[k + "_std"] = v, 0.0
    return [base, {**base, "method": "base"}]


@pytest.mark.parametrize("values", [{"perplexity": math.nan}, {"perplexity": 0.0, "seconds": -1.0},
                                    {"perplexity": math.inf}, {"efficacy": math.nan, "seconds": math.nan}],
                         ids=["no_perplexity", "non_positive_on_log_axes", "infinite", "nothing_to_draw"])
def test_plots_of_values_a_log_axis_cannot_show_are_drawn(tmp_path, values):
    pytest.importorskip("matplotlib")
    path = harness.plot_results(_aggs(**values), ["base", "zeroUnlearn"], tmp_path / "results.png")
    assert path is not None and Path(path).stat().st_size > 1000


def test_a_plot_that_fails_is_skipped_with_one_line(tmp_path, capsys):
    def broken(aggs, order, path):
        raise ValueError("Data cannot be log-scaled because all values are <= 0.")

    assert harness.draw_plot(broken, [], [], tmp_path / "results.png") is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("zu-fast eval: results.png not drawn (ValueError: Data cannot be")
