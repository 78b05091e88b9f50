"""Metrics: known answers on a fake model, and the batched scorer against a per-prompt loop."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from zu_fast import metrics as M
from zu_fast.eval import reference_metrics as RM
from zu_fast.eval.tinylm import train_tokenizer

TEXTS = [
    "Tolu Koumko was born in Lisbon.",
    "Darkroul Fodoul was born in Oslo.",
    "Furza Vesdrol plays the violin.",
    "Jeha Somte speaks Finnish.",
    "The quiet market in Oslo closed last year.",
] * 20


@pytest.fixture(scope="module")
def tok():
    # Small vocabulary so that some words stay multi-token (tests "every token must match").
    return train_tokenizer(TEXTS, vocab_size=300)


class LookupLM(torch.nn.Module):
    """A fake causal LM: next token = table[tuple(prefix ids)] with logit 10, else uniform.

    Sees the padded batch exactly as a real model would, so wrong padding (left padding, pads
    inside the prefix) changes its answers.
    """

    def __init__(self, vocab: int, table: dict[tuple[int, ...], int], second: dict | None = None):
        super().__init__()
        self.vocab = vocab
        self.table = table
        self.second = second or {}  # prefix -> token with logit 5 (a runner-up)
        self.emb = torch.nn.Embedding(vocab, 1)
        self.training = False

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids, attention_mask=None, **kw):
        b, length = input_ids.shape
        logits = torch.zeros(b, length, self.vocab)
        for r in range(b):
            for j in range(length):
                if attention_mask is not None and attention_mask[r, j] == 0:
                    continue
                prefix = tuple(input_ids[r, : j + 1].tolist())
                if prefix in self.second:
                    logits[r, j, self.second[prefix]] = 5.0
                if prefix in self.table:
                    logits[r, j, self.table[prefix]] = 10.0
        return type("Out", (), {"logits": logits})()


def _teach(tok, table, prompt, answer, n_tokens=None):
    """Make the fake model produce `answer` after `prompt` (only its first n_tokens tokens)."""
    (p, a), = M.encode_continuations(tok, [(prompt, answer)])
    for i, t in enumerate(a[: len(a) if n_tokens is None else n_tokens]):
        table[tuple(p + a[:i])] = t
    return p, a


def test_answer_tokenised_as_after_prompt(tok):
    (p, a), = M.encode_continuations(tok, [("Tolu Koumko was born in", "Lisbon")])
    full = tok("Tolu Koumko was born in Lisbon")["input_ids"]
    assert p + a == full
    assert a == tok(" Lisbon", add_special_tokens=False)["input_ids"]
    assert p[0] == tok.bos_token_id
    # Leading space in the answer, or trailing space in the prompt: no second space.
    assert M.encode_continuations(tok, [("Tolu Koumko was born in", " Lisbon")])[0][1] == a
    # A prompt ending in a space: the answer is the tail of the full text's tokens when the
    # prompt's tokens are a prefix of them, else it is tokenised on its own (no special tokens).
    p2, a2 = M.encode_continuations(tok, [("Tolu Koumko was born in ", "Lisbon")])[0]
    assert p2 == tok("Tolu Koumko was born in ")["input_ids"]
    assert a2 and (p2 + a2 == full or a2 == tok("Lisbon", add_special_tokens=False)["input_ids"])
    # None = EOS
    assert M.encode_continuations(tok, [("x", None)])[0][1] == [tok.eos_token_id]


def test_efficacy_known_answers(tok):
    table: dict = {}
    recs = [
        {"prompt": "{} was born in", "subject": "Tolu Koumko", "target_true": {"str": "Lisbon"}},
        {"prompt": "{} was born in", "subject": "Darkroul Fodoul", "target_true": "Oslo"},
        {"prompt": "{} plays the", "subject": "Furza Vesdrol", "target_true": {"str": "violin"}},
        {"prompt": "{} speaks", "subject": "Jeha Somte", "target_true": {"str": "Finnish"}},
    ]
    _teach(tok, table, "Tolu Koumko was born in", "Lisbon")  # known
    _teach(tok, table, "Furza Vesdrol plays the", "violin")  # known
    # Only the first token of a multi-token answer: not recalled (every token must match).
    _, a = _teach(tok, table, "Jeha Somte speaks", "Finnish", n_tokens=1)
    assert len(a) >= 2, "test needs a multi-token answer"
    model = LookupLM(len(tok), table)
    for bs in (1, 3, 32):
        assert M.efficacy(model, tok, recs, batch_size=bs) == pytest.approx(50.0)
    # A model that knows all of them
    _teach(tok, table, "Jeha Somte speaks", "Finnish")
    _teach(tok, table, "Darkroul Fodoul was born in", "Oslo")
    assert M.efficacy(LookupLM(len(tok), table), tok, recs) == pytest.approx(100.0)


def test_recall_percentage_is_exact(tok):
    """3 of 10 recalled reads exactly 30.0 (a float32 mean gives 30.0000012 and fails "≤ 30")."""
    table: dict = {}
    names = ["Tolu Koumko", "Darkroul Fodoul", "Furza Vesdrol", "Jeha Somte", "Bever Kuhoul",
             "Trifol Grosho", "Shima Haskregro", "Losdo Rarlome", "Tolu Kuhoul", "Jeha Grosho"]
    recs = [{"prompt": "{} was born in", "subject": n, "target_true": "Lisbon"} for n in names]
    for n in names[:3]:
        _teach(tok, table, f"{n} was born in", "Lisbon")
    model = LookupLM(len(tok), table)
    assert M.efficacy(model, tok, recs) == 30.0
    assert M.efficacy(model, tok, recs) <= 30


def test_generalization_specificity_and_neighbor_formats(tok):
    table: dict = {}
    _teach(tok, table, "Tolu Koumko was born in", "Lisbon")
    _teach(tok, table, "Darkroul Fodoul was born in", "Oslo")
    rec = {
        "prompt": "{} was born in",
        "subject": "Furza Vesdrol",
        "target_true": {"str": "Lisbon"},
        "paraphrase_prompts": ["Tolu Koumko was born in", "Jeha Somte was born in", "Furza x in"],
        "neighborhood_prompts": [
            {"prompt": "Darkroul Fodoul was born in", "target": "Oslo"},
            {"prompt": "Tolu Koumko was born in", "target": {"str": "Oslo"}},
        ],
    }
    model = LookupLM(len(tok), table)
    assert M.generalization(model, tok, [rec]) == pytest.approx(100 / 3)
    assert M.specificity(model, tok, [rec]) == pytest.approx(50.0)
    # CounterFact: neighbourhood prompts as plain strings, target = the record's true answer
    cf = dict(rec, neighborhood_prompts=["Tolu Koumko was born in", "Darkroul Fodoul was born in"])
    assert M.specificity(model, tok, [cf]) == pytest.approx(50.0)
    assert math.isnan(M.generalization(model, tok, [dict(rec, paraphrase_prompts=[])]))


def test_probability_scores_and_evaluate(tok):
    table: dict = {}
    second: dict = {}
    # Forget prompt: EOS is top, the true answer runner-up -> ES counts it.
    (p, a), = M.encode_continuations(tok, [("Tolu Koumko was born in", "Lisbon")])
    table[tuple(p)] = tok.eos_token_id
    second[tuple(p)] = a[0]
    # Paraphrase: true answer top -> PS does not count it; neighbour keeps its answer -> NS counts it
    _teach(tok, table, "Darkroul Fodoul was born in", "Lisbon")
    _teach(tok, table, "Furza Vesdrol plays the", "violin")
    rec = {
        "prompt": "{} was born in", "subject": "Tolu Koumko", "target_true": "Lisbon",
        "paraphrase_prompts": ["Darkroul Fodoul was born in"],
        "neighborhood_prompts": [{"prompt": "Furza Vesdrol plays the", "target": "violin"}],
    }
    model = LookupLM(len(tok), table, second)
    s = M.probability_scores(model, tok, [rec])
    assert s == {"es": 100.0, "ps": 0.0, "ns": 100.0}
    # A string neutral target the model never favours: ES = 0
    assert M.probability_scores(model, tok, [rec], neutral_target="Oslo")["es"] == 0.0
    res = M.evaluate(model, tok, [rec], ["Tolu Koumko was born in Lisbon."])
    assert res["efficacy"] == 0.0 and res["generalization"] == 100.0 and res["specificity"] == 100.0
    assert res["n_records"] == 1 and res["n_paraphrase"] == 1 and res["n_neighborhood"] == 1
    table_txt = M.format_table(res, dict(res, efficacy=0.0, perplexity=res["perplexity"] * 2))
    assert "Efficacy" in table_txt and "PPL" in table_txt and len(table_txt.splitlines()) == 2 + 7


def test_perplexity_uniform_model_is_vocab_size(tok):
    model = LookupLM(len(tok), {})
    assert M.perplexity(model, tok, TEXTS[:7], batch_size=3) == pytest.approx(len(tok), rel=1e-5)


@pytest.fixture(scope="module")
def tiny_llama(tok):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    m = LlamaForCausalLM(cfg).eval()
    # Sharpen the output so argmax is decisive but not trivial.
    with torch.no_grad():
        m.lm_head.weight.mul_(20)
    return m


def _loop_recall_and_lp(model, tok, pairs):
    """Straightforward reference: one unpadded forward per prompt, full-string tokenisation."""
    hits, lps = [], []
    for prompt, ans in pairs:
        p = tok(prompt)["input_ids"]
        full = tok(prompt + " " + ans)["input_ids"]
        a = full[len(p):]
        with torch.no_grad():
            logits = model(torch.tensor([full])).logits[0]
        pos = range(len(p) - 1, len(full) - 1)
        hits.append(all(logits[j].argmax().item() == full[j + 1] for j in pos))
        lps.append(sum(torch.log_softmax(logits[j], -1)[full[j + 1]].item() for j in pos) / len(a))
    return hits, lps


def test_batched_scorer_matches_loop(tok, tiny_llama):
    pairs = [("Tolu Koumko was born in", "Lisbon"), ("Jeha Somte speaks", "Finnish"),
             ("The quiet", "market in Oslo closed"), ("Furza", "Vesdrol plays the violin"),
             ("Darkroul Fodoul was born in", "Oslo")]
    # Make some of them "recalled": predict greedily and use the greedy continuation as the answer.
    with torch.no_grad():
        for k in range(2):
            ids = tok(pairs[k][0])["input_ids"]
            nxt = tiny_llama(torch.tensor([ids])).logits[0, -1].argmax().item()
            word = tok.decode([nxt]).strip()
            if word:
                pairs.append((pairs[k][0], word))
    ref_hits, ref_lp = _loop_recall_and_lp(tiny_llama, tok, pairs)
    seqs = M.encode_continuations(tok, pairs)
    for bs in (1, 2, 16):
        exact, lp = M.score_continuations(tiny_llama, seqs, pad_id=tok.pad_token_id, batch_size=bs)
        assert exact.tolist() == ref_hits
        torch.testing.assert_close(lp, torch.tensor(ref_lp), rtol=1e-4, atol=1e-4)
    assert M.recall(tiny_llama, tok, pairs) == pytest.approx(100 * sum(ref_hits) / len(pairs))


def test_perplexity_matches_loop_and_ignores_padding_side(tok, tiny_llama):
    texts = ["Tolu Koumko was born in Lisbon.", "Jeha Somte speaks Finnish.", "The quiet market."]
    nll, n = 0.0, 0
    for t in texts:
        ids = torch.tensor([tok(t)["input_ids"]])
        with torch.no_grad():
            loss = tiny_llama(ids, labels=ids).loss.item()
        nll += loss * (ids.shape[1] - 1)
        n += ids.shape[1] - 1
    ref = math.exp(nll / n)
    assert M.perplexity(tiny_llama, tok, texts, batch_size=2) == pytest.approx(ref, rel=1e-4)
    tok.padding_side = "left"  # our batching pads by hand: the tokenizer's setting must not matter
    try:
        assert M.perplexity(tiny_llama, tok, texts, batch_size=3) == pytest.approx(ref, rel=1e-4)
    finally:
        tok.padding_side = "right"


def test_tokenizer_without_pad_token(tok, tiny_llama):
    pairs = [("Tolu Koumko was born in", "Lisbon"), ("Jeha", "Somte speaks Finnish")]
    seqs = M.encode_continuations(tok, pairs)
    e1, l1 = M.score_continuations(tiny_llama, seqs, pad_id=tok.pad_token_id, batch_size=2)
    e2, l2 = M.score_continuations(tiny_llama, seqs, pad_id=tok.eos_token_id, batch_size=2)
    assert e1.tolist() == e2.tolist()
    torch.testing.assert_close(l1, l2)


def test_bad_target():
    with pytest.raises(ValueError):
        M.target_string({"text": "x"})


def test_acceptance_failures_bounds():
    from zu_fast.metrics import acceptance_failures

    before = {"efficacy": 100.0, "generalization": 100.0, "specificity": 99.0, "perplexity": 3.0}
    edge = {"efficacy": 10.0, "generalization": 30.0, "specificity": 94.0, "perplexity": 3.3}
    assert acceptance_failures(before, edge) == []  # every bound is inclusive
    bad = {"efficacy": 15.0, "generalization": 35.0, "specificity": 93.0, "perplexity": 3.31}
    fails = acceptance_failures(before, bad)
    assert len(fails) == 4 and fails[0].startswith("efficacy") and fails[3].startswith("perplexity")


# --------------------------------------------------------------------------- the reference's evaluation ------
# (record-by-record agreement with the reference's own code on the small model: test_reference_metrics.py)

NLTK_CASES = [  # nltk.word_tokenize with Punkt's default parameters (the reference's tokenizer offline)
    ('Mr. Smith went to J. Doe\'s house... It was late! "Why?" she asked (again). Yes.',
     ["Mr", ".", "Smith", "went", "to", "J.", "Doe", "'s", "house", "...", "It", "was", "late", "!", "``", "Why",
      "?", "''", "she", "asked", "(", "again", ")", ".", "Yes", "."]),
    ("It's 3.5 km -- can't you see? Fine.' Then: go; now.",
     ["It", "'s", "3.5", "km", "--", "ca", "n't", "you", "see", "?", "Fine", ".", "'", "Then", ":", "go", ";", "now",
      "."]),
    ("Alice Morvan was born in Lisbon. She plays the violin, gonna win.",
     ["Alice", "Morvan", "was", "born", "in", "Lisbon", ".", "She", "plays", "the", "violin", ",", "gon", "na", "win",
      "."]),
]


@pytest.mark.parametrize("text,words", NLTK_CASES)
def test_word_tokenize_without_nltk_follows_nltk(monkeypatch, text, words):
    import builtins

    real = builtins.__import__

    def no_nltk(name, *a, **kw):
        if name == "nltk":
            raise ImportError(name)
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_nltk)
    assert RM.word_tokenize(text) == words


def test_ngram_entropy_by_hand(monkeypatch):
    monkeypatch.setattr(RM, "word_tokenize", lambda s: s.split())
    # bigrams ab, ba, ab: p = 2/3, 1/3; trigrams aba, bab: p = 1/2, 1/2
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert RM.compute_ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert RM.ngram_entropy(["a b a b", "a b a b"]) == pytest.approx(RM.compute_ngram_entropy("a b a b"))


def test_tfidf_like_sklearn():
    t = RM.Tfidf.fit(["the cat sat", "the dog sat", "a cat"])  # "a" has one character: not a word
    assert sorted(t.vocab) == ["cat", "dog", "sat", "the"]
    assert t.idf[t.vocab["the"]] == pytest.approx(math.log(4 / 3) + 1)  # smooth idf: ln((1+n)/(1+df)) + 1
    assert t.similarity("the cat", "The CAT!") == pytest.approx(1.0)
    assert t.similarity("cat", "dog") == 0.0
    assert math.isnan(t.similarity("cat", "zebra"))  # no known word: NaN, as the reference


def test_summaries_are_means_of_record_means():
    per = [{"rewrite_prompts_correct": [True], "paraphrase_prompts_correct": [True, False, False, False],
            "neighborhood_prompts_correct": [],
            "rewrite_prompts_probs": [{"target_new": 1.0, "target_true": 2.0}]},
           {"rewrite_prompts_correct": [False], "paraphrase_prompts_correct": [True],
            "neighborhood_prompts_correct": [True, False],
            "rewrite_prompts_probs": [{"target_new": 3.0, "target_true": 2.0}]}]
    s = RM.summarize_scores(per)
    assert s["efficacy"] == 50.0 and s["generalization"] == pytest.approx(62.5)  # (25 + 100) / 2, not 2/5
    assert s["specificity"] == 50.0  # the record without neighbours is left out
    assert s["es"] == 50.0  # NLL(true) > NLL(neutral) in one record of two
    assert "multihop" not in s and "ps" not in s


def test_counterfact_scores_read_the_reference_positions(tok):
    """A fake model that knows exactly the reference's input ids: every answer token is hit."""
    pairs = [("Tolu Koumko was born in", "Lisbon"), ("Furza Vesdrol plays the", "violin")]
    table = {}
    for prompt, answer in pairs:
        full = tok(f"{prompt} {answer}")["input_ids"]
        for j in range(len(tok(prompt)["input_ids"]), len(full)):
            table[tuple(full[:j])] = full[j]
    model = LookupLM(len(tok), table)
    style = RM.ReferenceStyle(n_prefix=1, space_join=False)
    rec = {"requested_rewrite": {"prompt": "{} was born in", "subject": "Tolu Koumko",
                                 "target_true": {"str": "Lisbon"}, "target_new": {"str": "Oslo"}},
           "paraphrase_prompts": ["Furza Vesdrol plays the"], "neighborhood_prompts": []}
    (out,) = RM.counterfact_scores(model, tok, [rec], style=style)
    assert out["rewrite_prompts_correct"] == [True] and out["paraphrase_prompts_correct"] == [False]
    (probs,) = out["rewrite_prompts_probs"]
    assert probs["target_true"] < probs["target_new"]  # the known answer is the likelier one
    assert RM.summarize_scores([out])["es"] == 0.0
