"""`zu-fast eval --dataset` end to end on the small model with each fixture file: the table, JSON and
plot are written, and their numbers equal direct calls of the same method and metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import zu_fast
import zu_fast.cli
from zu_fast.eval import baselines, datasets, harness, reference_metrics, tinylm

FIX = Path(__file__).parent / "fixtures" / "datasets"
KEYS = ["efficacy", "generalization", "specificity", "es", "ps", "ns", "multihop", "fluency", "consistency"]

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:zu_fast")]


@pytest.fixture(scope="module")
def small():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # a 10M-parameter model: one thread is as fast, and immune to a busy machine
    model, tok, world = tinylm.load_or_train(progress=False)
    yield model, tok, world
    torch.set_num_threads(old)


def _equal(run: dict, direct: dict) -> None:
    for k in KEYS:
        if k in direct:
            assert run[k] == pytest.approx(direct[k], abs=1e-9), k
    assert run["perplexity"] == pytest.approx(direct["perplexity"], rel=1e-6)
    assert run["per_record"] == json.loads(json.dumps(direct["per_record"]))


@pytest.fixture()
def files(small, tmp_path):
    """A held-out text file and a quick config (few target and GD steps) for the runs below."""
    model, tok, world = small
    ppl, cfg = tmp_path / "held.txt", tmp_path / "quick.json"
    ppl.write_text("\n".join(world.heldout_texts()[:30]) + "\n")
    zu_fast.UnlearnConfig.for_model(model, v_num_grad_steps=10, gd_steps=5, progress=False).save_json(cfg)
    return ppl, cfg


def test_mcf_with_a_model_folder_corpus_and_generation(small, files, tmp_path):
    model, tok, world = small
    ppl, quick = files
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(world.training_texts()[:400]) + "\n")
    out = tmp_path / "out"
    argv = ["--dataset", str(FIX / "mcf.json"), "--model", str(tinylm.model_dir()), "--device", "cpu",
            "--corpus", str(corpus), "--ppl-text", str(ppl), "--config", str(quick), "--n", "2", "--seeds", "0",
            "--methods", "gd", "--generation", "--gen-len", "16", "--snippets", str(FIX / "attribute_snippets.json"),
            "--out", str(out), "--quiet"]
    assert zu_fast.cli.main(["eval", *argv]) == 0
    res = json.loads((out / "results.json").read_text())
    md = (out / "results.md").read_text()
    assert (out / "results.png").stat().st_size > 1000
    assert "| 2 | base |" in md and "| 2 | gd |" in md and "Fluency" in md and "peak MiB" in md
    assert res["meta"]["kind"] == "mcf" and res["meta"]["ppl_texts"] == 30
    runs = {(r["method"], r["seed"]): r for r in res["runs"]}
    assert set(runs) == {("base", 0), ("gd", 0)}
    assert runs[("gd", 0)]["seconds"] > 0 and runs[("gd", 0)]["peak_mib"] > 0
    # the same numbers from direct calls: the sampled records, the same config and statistics
    ds = datasets.load_dataset(FIX / "mcf.json")
    records = ds.sample(2, 0)
    assert runs[("base", 0)]["case_ids"] == [r["case_id"] for r in records]
    snips = reference_metrics.load_snippets(FIX / "attribute_snippets.json")
    tfidf = reference_metrics.Tfidf.fit([s["text"] for v in snips.values() for s in v])
    held = reference_metrics.read_texts(ppl)

    def direct():
        return reference_metrics.evaluate_dataset(model, tok, "mcf", records, ppl_texts=held, generation=True,
                                                  snippets=snips, tfidf=tfidf, gen_len=16)

    _equal(runs[("base", 0)], direct())
    cfg = zu_fast.UnlearnConfig.from_json(quick).replace(method="gd")
    stats = zu_fast.collect_stats(model, tok, str(corpus), cfg)
    edit = zu_fast.unlearn(model, tok, ds.requests(records), cfg, stats=stats)
    try:
        _equal(runs[("gd", 0)], direct())
    finally:
        edit.restore()


@pytest.mark.parametrize("kind", ["zsre", "mquake"])
def test_zsre_and_mquake_on_the_small_model(small, files, tmp_path, kind):
    model, tok, world = small
    ppl, _ = files
    out = tmp_path / "out"
    rc = harness.main(["--dataset", str(FIX / f"{kind}.json"), "--n", "2", "--seeds", "1,2", "--methods", "ga",
                       "--baseline-epochs", "2", "--baseline-lr", "3e-3", "--ppl-text", str(ppl), "--out", str(out),
                       "--quiet", "--no-plot"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    md = (out / "results.md").read_text()
    assert "| 2 | ga |" in md and ("Multi-hop" in md) == (kind == "mquake") and not (out / "results.png").exists()
    assert "±" in md
    runs = {r["method"]: r for r in res["runs"] if r["seed"] == 1}
    agg = next(a for a in res["aggregates"] if a["method"] == "ga")  # mean over the two seeds
    assert agg["efficacy"] == pytest.approx(sum(r["efficacy"] for r in res["runs"] if r["method"] == "ga") / 2)
    ds = datasets.load_dataset(FIX / f"{kind}.json", tok=tok)
    records = ds.sample(2, 1)

    def direct():
        held = reference_metrics.read_texts(ppl)
        return reference_metrics.evaluate_dataset(model, tok, kind, records, ppl_texts=held)

    _equal(runs["base"], direct())
    cfg = zu_fast.UnlearnConfig.for_model(model, progress=False)
    edit = baselines.run_baseline("ga", model, tok, ds.requests(records), cfg, None,
                                  hparams=baselines.BaselineHParams(lr=3e-3, epochs=2))
    try:
        _equal(runs["ga"], direct())
    finally:
        edit.restore()
    assert runs["ga"]["efficacy"] < runs["base"]["efficacy"]  # three-fold lr: GA does forget here


def test_dataset_mode_errors(tmp_path):
    with pytest.raises(zu_fast.ZuFastError, match="needs --corpus"):
        harness.main(["--dataset", str(FIX / "mcf.json"), "--model", str(tmp_path), "--quiet"])
    with pytest.raises(zu_fast.ZuFastError, match="not a folder"):
        harness.main(["--dataset", str(FIX / "mcf.json"), "--model", str(tmp_path / "nope"), "--corpus", "x",
                      "--quiet"])
