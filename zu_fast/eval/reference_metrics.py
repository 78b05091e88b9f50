"""The ZeroUnlearn reference's evaluation, exactly: its CounterFact/MCF, ZsRE and MQuAKE scores and its
generation metrics, per record, checked against the reference's own functions
(tests/test_reference_metrics.py). The paper's core metrics (Efficacy, Generalization, Specificity, PPL)
are ``zu_fast.metrics``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..metrics import pad_id, perplexity, target_string
from ..model import model_device

__all__ = [
    "ReferenceStyle",
    "Tfidf",
    "counterfact_scores",
    "evaluate_dataset",
    "generate_fast",
    "generation_scores",
    "load_snippets",
    "mquake_scores",
    "ngram_entropy",
    "read_texts",
    "reference_scores",
    "reference_style",
    "summarize_scores",
    "text_perplexity",
    "zsre_scores",
]


# ---------------------------------------------------------------------------------------------
# The reference's evaluation, exactly (experiments/py/eval_utils_{counterfact,zsre,mquake}.py)
# ---------------------------------------------------------------------------------------------
#
# The paper's numbers come from the ZeroUnlearn reference code's evaluation functions, which differ
# from the metrics above in how they tokenise and aggregate. The functions below compute what they
# compute, record by record (tests/test_reference_metrics.py compares them with the reference's
# own functions on the small model):
#
# - CounterFact / MCF: each prompt is run as ``tok(prompt + " " + target)``; the answer tokens are
#   ``tok(" " + target)`` without the tokenizer's special prefix, read at positions
#   ``len(tok(prompt)) - 1 + j`` (teacher forcing). ``*_correct``: every answer token is the argmax
#   (true target only); ``*_probs``: mean NLL of the true target and of ``target_new`` (the neutral
#   target). ES/PS: NLL(true) > NLL(neutral); NS: NLL(true) < NLL(neutral).
# - ZsRE / MQuAKE: per-token top-1 accuracy. For the answer tokens t = tok(" " + target) (prefix
#   dropped), prompt i is ``prompt + decode(t[:i])`` (Llama family: ``prompt + " " + decode(t[:i])``
#   for i > 0) and is correct when the argmax at its last token equals the first token of
#   ``tok(decode(t[i]))`` after the special prefix. ZsRE's neighbourhood prompts are already per
#   token (datasets.load_zsre). MQuAKE: the accuracy of every requested rewrite (efficacy), and of
#   the original ``answer`` after every multi-hop question (eval_utils_mquake_ini.py).
# - Aggregates as the reference's summarize(): the mean over records of each record's mean.
#
# Where the reference decides by ``'llama' in model.config._name_or_path`` we decide by what that
# test stands for: the tokenizer's special prefix (Llama: BOS; Qwen: none) is measured, and the
# " "-join applies to the Llama family (name or ``model_type``). On the paper's models (Llama-3.x,
# Qwen3) that is the reference's choice; on a model whose tokenizer adds a BOS but whose name lacks
# "llama" (Mistral), the reference scores the BOS as the first answer token, which we do not copy.
# Prompts are right-padded by hand, so positions equal the reference's under its right padding.


@dataclass(frozen=True)
class ReferenceStyle:
    """The two tokenizer/model facts the reference's evaluation depends on."""

    n_prefix: int  # special tokens the tokenizer puts before a text (Llama: 1, the BOS; Qwen: 0)
    space_join: bool  # Llama family: per-token prompts join the decoded answer prefix with " "


def reference_style(model: Any, tok: Any) -> ReferenceStyle:
    """What the reference's ``'llama' in model.config._name_or_path`` tests decide, for this model."""
    with_sp = list(tok("a")["input_ids"])
    without = list(tok("a", add_special_tokens=False)["input_ids"])
    n_prefix = 0
    for k in range(len(with_sp) - len(without) + 1):
        if with_sp[k : k + len(without)] == without:
            n_prefix = k
            break
    cfg = getattr(model, "config", None)
    name = str(getattr(cfg, "_name_or_path", "") or "").lower()
    llama = "llama" in name or getattr(cfg, "model_type", "") == "llama"
    return ReferenceStyle(n_prefix=n_prefix, space_join=llama)


def _rewrites(rec: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    rr = rec["requested_rewrite"]
    return list(rr) if isinstance(rr, list) else [rr]


@torch.no_grad()
def _score_at(model, items: Sequence[tuple[list[int], int, list[int]]], *, pad_id: int, batch_size: int
              ) -> tuple[list[float], list[bool]]:
    """Teacher-forced scores of ``(ids, start, answer)``: the logits at ``start - 1 + j`` against
    ``answer[j]``. Returns the mean NLL (accumulated in float32 as the reference does) and whether
    every answer token is the argmax. ``ids`` shorter than needed are right-padded with ``pad_id``
    under a zero attention mask, as the reference's padded batch reads them."""
    import numpy as np

    nll = [0.0] * len(items)
    hit = [False] * len(items)
    device = model_device(model)
    order = sorted(range(len(items)), key=lambda i: -max(len(items[i][0]), items[i][1] - 1 + len(items[i][2])))
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        need = [max(len(items[i][0]), items[i][1] - 1 + len(items[i][2])) for i in idx]
        length = max(need)
        ids = torch.full((len(idx), length), pad_id, dtype=torch.long)  # [B, L]
        attn = torch.zeros_like(ids)  # [B, L]
        for r, i in enumerate(idx):
            x = items[i][0]
            ids[r, : len(x)] = torch.tensor(x, dtype=torch.long)
            attn[r, : len(x)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=attn.to(device), use_cache=False).logits
        for r, i in enumerate(idx):
            _, start, ans = items[i]
            pos = torch.arange(start - 1, start - 1 + len(ans), device=logits.device)
            rows = logits[r, pos].float()  # [A, V]
            tgt = torch.tensor(ans, device=logits.device)
            lp = torch.log_softmax(rows, dim=-1).gather(1, tgt[:, None])[:, 0].cpu().numpy()  # [A]
            acc = np.float32(0.0)
            for v in lp:  # the reference sums -log p token by token into a float32 array
                acc = np.float32(acc + np.float32(-v))
            nll[i] = float(np.float32(acc / np.float32(len(ans))))
            hit[i] = bool((rows.argmax(dim=-1) == tgt).all())
    return nll, hit


@torch.no_grad()
def _last_token_hits(model, tok, pairs: Sequence[tuple[str, str]], style: ReferenceStyle, *, batch_size: int
                     ) -> list[bool]:
    """The reference's ``test_batch_prediction_acc``: argmax at the prompt's last token vs the first
    token of ``tok(target)`` after the special prefix (the pad id when there is none)."""
    if not pairs:
        return []
    pad = pad_id(tok)
    p_ids = tok([p for p, _ in pairs])["input_ids"]
    t_ids = tok([t for _, t in pairs])["input_ids"]
    want = [int(t[style.n_prefix]) if len(t) > style.n_prefix else pad for t in t_ids]
    device = model_device(model)
    out = [False] * len(pairs)
    order = sorted(range(len(pairs)), key=lambda i: -len(p_ids[i]))
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        length = max(len(p_ids[i]) for i in idx)
        ids = torch.full((len(idx), length), pad, dtype=torch.long)  # [B, L]
        attn = torch.zeros_like(ids)  # [B, L]
        for r, i in enumerate(idx):
            ids[r, : len(p_ids[i])] = torch.tensor(p_ids[i], dtype=torch.long)
            attn[r, : len(p_ids[i])] = 1
        logits = model(input_ids=ids.to(device), attention_mask=attn.to(device), use_cache=False).logits
        last = attn.sum(1) - 1  # [B]
        ans = logits[torch.arange(len(idx), device=logits.device), last.to(logits.device)].argmax(-1).cpu()
        for r, i in enumerate(idx):
            out[i] = int(ans[r]) == want[i]
    return out


def _per_token_pairs(tok, prompts: Sequence[str], target: str, style: ReferenceStyle) -> list[tuple[str, str]]:
    """ZsRE's per-token prompts for ``target`` after each prompt (see the section comment)."""
    t = list(tok(" " + target)["input_ids"])[style.n_prefix:]
    out = []
    for el in prompts:
        for i in range(len(t)):
            prefix = tok.decode(t[:i])
            out.append((el + " " + prefix if style.space_join and i > 0 else el + prefix, tok.decode(t[i])))
    return out


def counterfact_scores(model, tok, records: Sequence[Mapping[str, Any]], *, style: ReferenceStyle | None = None,
                       batch_size: int = 32) -> list[dict[str, Any]]:
    """Per record, what the reference's ``compute_rewrite_quality_counterfact`` returns (without the
    generation tests): ``{rewrite,paraphrase,neighborhood}_prompts_probs`` (lists of
    ``{"target_new": NLL, "target_true": NLL}``) and ``..._correct`` (lists of bool)."""
    from ..errors import ZuFastError

    style = style or reference_style(model, tok)
    items: list[tuple[list[int], int, list[int]]] = []
    layout = []  # per record: the number of prompts in each group
    for k, rec in enumerate(records):
        rr = _rewrites(rec)[0]
        new, true = target_string(rr["target_new"]), target_string(rr["target_true"])
        groups = [[rr["prompt"].format(rr["subject"])], list(rec.get("paraphrase_prompts", [])),
                  list(rec.get("neighborhood_prompts", []))]
        prefixes = [p for g in groups for p in g]
        if not all(isinstance(p, str) for p in prefixes):
            raise ZuFastError(f"record {k} (case {rec.get('case_id')}): CounterFact prompts must be strings")
        answers = [list(tok(f" {x}")["input_ids"])[style.n_prefix:] for x in (new, true)]
        if not all(answers):
            raise ZuFastError(f"record {k} (case {rec.get('case_id')}): a target tokenises to nothing")
        p_lens = [len(x) for x in tok(prefixes)["input_ids"]]
        full = tok([f"{p} {x}" for p in prefixes for x in (new, true)])["input_ids"]
        for j in range(len(prefixes)):
            for c in range(2):
                items.append((list(full[2 * j + c]), p_lens[j], answers[c]))
        layout.append([len(g) for g in groups])
    nll, hit = _score_at(model, items, pad_id=pad_id(tok), batch_size=batch_size)
    out, at = [], 0
    for sizes in layout:
        res: dict[str, Any] = {}
        for key, size in zip(("rewrite_prompts", "paraphrase_prompts", "neighborhood_prompts"), sizes):
            probs, correct = [], []
            for _ in range(size):
                probs.append({"target_new": nll[at], "target_true": nll[at + 1]})
                correct.append(hit[at + 1])
                at += 2
            res[f"{key}_probs"], res[f"{key}_correct"] = probs, correct
        out.append(res)
    return out


def zsre_scores(model, tok, records: Sequence[Mapping[str, Any]], *, style: ReferenceStyle | None = None,
                batch_size: int = 32) -> list[dict[str, list[bool]]]:
    """Per record, what the reference's ``compute_rewrite_quality_zsre`` returns:
    ``{rewrite,paraphrase,neighborhood}_prompts_correct`` (per-token top-1 hits)."""
    style = style or reference_style(model, tok)
    pairs: list[tuple[str, str]] = []
    layout = []
    for rec in records:
        rr = _rewrites(rec)[0]
        target = target_string(rr["target_true"])
        groups = [_per_token_pairs(tok, [rr["prompt"].format(rr["subject"])], target, style),
                  _per_token_pairs(tok, list(rec.get("paraphrase_prompts", [])), target, style),
                  [(n["prompt"].format(rr), n["target"]) for n in rec.get("neighborhood_prompts", [])]]
        pairs += [p for g in groups for p in g]
        layout.append([len(g) for g in groups])
    hits = _last_token_hits(model, tok, pairs, style, batch_size=batch_size)
    out, at = [], 0
    for sizes in layout:
        res = {}
        for key, size in zip(("rewrite_prompts", "paraphrase_prompts", "neighborhood_prompts"), sizes):
            res[f"{key}_correct"] = hits[at : at + size]
            at += size
        out.append(res)
    return out


def mquake_scores(model, tok, records: Sequence[Mapping[str, Any]], *, style: ReferenceStyle | None = None,
                  batch_size: int = 32) -> list[dict[str, list[bool]]]:
    """Per record: ``rewrite_prompts_correct`` (per-token hits of each requested rewrite's true
    target, the rewrites in order: eval_utils_mquake.py applied to every rewrite) and
    ``multihop_correct`` (per-token hits of the original ``answer`` after every multi-hop question:
    eval_utils_mquake_ini.py)."""
    style = style or reference_style(model, tok)
    pairs: list[tuple[str, str]] = []
    layout = []
    for rec in records:
        rw = [p for rr in _rewrites(rec)
              for p in _per_token_pairs(tok, [rr["prompt"].format(rr["subject"])], target_string(rr["target_true"]),
                                        style)]
        mh = _per_token_pairs(tok, list(rec.get("paraphrase_prompts", [])), str(rec["answer"]), style)
        pairs += rw + mh
        layout.append((len(rw), len(mh)))
    hits = _last_token_hits(model, tok, pairs, style, batch_size=batch_size)
    out, at = [], 0
    for n_rw, n_mh in layout:
        out.append({"rewrite_prompts_correct": hits[at : at + n_rw],
                    "multihop_correct": hits[at + n_rw : at + n_rw + n_mh]})
        at += n_rw + n_mh
    return out


REFERENCE_SCORERS = {"mcf": counterfact_scores, "zsre": zsre_scores, "mquake": mquake_scores}


def reference_scores(model, tok, kind: str, records: Sequence[Mapping[str, Any]], *, batch_size: int = 32
                     ) -> list[dict[str, Any]]:
    """Per-record scores of ``kind`` ("mcf", "zsre", "mquake") as the reference computes them."""
    from ..errors import ZuFastError

    if kind not in REFERENCE_SCORERS:
        raise ZuFastError(f"unknown dataset kind {kind!r}; choose one of {sorted(REFERENCE_SCORERS)}")
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        return REFERENCE_SCORERS[kind](model, tok, records, batch_size=batch_size)
    finally:
        if was_training:
            model.train()


def _mean_of_means(rows: Iterable[Sequence[Any]]) -> float:
    """The reference's summarize(): mean over records of each record's mean, in % (records whose
    list is empty are left out; the reference would turn the whole mean into NaN)."""
    means = [sum(float(x) for x in r) / len(r) for r in rows if len(r)]
    return 100.0 * sum(means) / len(means) if means else float("nan")


def summarize_scores(per_record: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Efficacy / Generalization / Specificity (accuracy, %), ES / PS / NS (MCF), multi-hop
    accuracy (MQuAKE), from per-record scores, aggregated as the reference's summarize()."""
    out: dict[str, float] = {}
    for name, key in (("efficacy", "rewrite_prompts_correct"), ("generalization", "paraphrase_prompts_correct"),
                      ("specificity", "neighborhood_prompts_correct"), ("multihop", "multihop_correct")):
        if any(key in r for r in per_record):
            out[name] = _mean_of_means(r.get(key, []) for r in per_record)
    for name, key, neutral_wins in (("es", "rewrite_prompts_probs", True), ("ps", "paraphrase_prompts_probs", True),
                                    ("ns", "neighborhood_prompts_probs", False)):
        if any(key in r for r in per_record):
            out[name] = _mean_of_means(
                [(x["target_true"] > x["target_new"]) if neutral_wins else (x["target_true"] < x["target_new"])
                 for x in r.get(key, [])] for r in per_record)
    return out


# --------------------------------------------------------------------------- generation ------


@torch.no_grad()
def generate_fast(model, tok, prompts: Sequence[str], n_gen_per_prompt: int = 1, top_k: int = 5,
                  max_out_len: int = 200, generator: torch.Generator | None = None) -> list[str]:
    """The reference's ``util/generate.generate_fast``: batched top-k sampling with a KV cache,
    ``max_out_len`` tokens in all (prompt included), decoded and NFKD-normalised.

    The same operations in the same order, so with the same random stream (``generator``, or the
    global one when None, as the reference) it samples the same texts. Inputs go to the model's
    input-embedding device.
    """
    import unicodedata

    inp = [p for p in prompts for _ in range(n_gen_per_prompt)]
    enc = tok(inp, padding=True, return_tensors="pt")
    device = model_device(model)
    input_ids, attention_mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    batch_size = input_ids.size(0)
    pad = pad_id(tok)
    past, cur = None, slice(0, int(attention_mask.sum(1).min().item()))
    while input_ids.size(1) < max_out_len:
        out = model(input_ids=input_ids[:, cur], attention_mask=attention_mask[:, cur], past_key_values=past,
                    use_cache=True)
        logits, past = out.logits, out.past_key_values
        probs = torch.nn.functional.softmax(logits[:, -1, :], dim=1)
        tk = torch.topk(probs, top_k, dim=1).indices
        top = torch.gather(probs, 1, tk)
        top = top / top.sum(1)[:, None]
        new = torch.gather(tk, 1, torch.multinomial(top, 1, generator=generator))
        if cur.stop == input_ids.size(1):
            attention_mask = torch.cat([attention_mask, attention_mask.new_zeros(batch_size, 1)], dim=1)
            input_ids = torch.cat([input_ids, input_ids.new_ones(batch_size, 1) * pad], dim=1)
        last = attention_mask.sum(1) - 1
        for i in range(batch_size):
            new_idx = last[i] + 1
            if last[i].item() + 1 != cur.stop:
                continue
            if new_idx < max_out_len:
                input_ids[i][new_idx] = new[i]
                attention_mask[i][new_idx] = 1
        cur = slice(cur.stop, cur.stop + 1)
    txt = [tok.decode(x) for x in input_ids.detach().cpu().numpy().tolist()]
    return [unicodedata.normalize("NFKD", x).replace("\n\n", " ").replace("<|endoftext|>", "") for x in txt]


# NLTK's NLTKWordTokenizer (nltk.tokenize.destructive, Apache-2.0), the word tokenizer of
# nltk.word_tokenize, in order: starting quotes, punctuation, brackets, double dashes, ending
# quotes, contractions. Used when NLTK is not installed.
_STARTING_QUOTES = [
    (r"([«“‘„]|[`]+)", r" \1 "), (r"^\"", r"``"), (r"(``)", r" \1 "), (r"([ \(\[{<])(\"|\'{2})", r"\1 `` "),
    (r"(?i)(?<!\w)(\')(?!(?:re|ve|ll|m|t|s|d|n)\b)(?=\w)", r"\1 "),
]
_PUNCTUATION = [
    (r'([^\.])(\.)([\]\)}>"\'' "»”’ " r"]*)\s*$", r"\1 \2 \3 "),
    (r"([:,])([^\d])", r" \1 \2"), (r"([:,])$", r" \1 "), (r"\.{2,}", r" \g<0> "), (r"[;@#$%&]", r" \g<0> "),
    (r"[\u2012-\u2015]", r" \g<0> "), (r'([^\.])(\.)([\]\)}>"\']*)\s*$', r"\1 \2\3 "), (r"[?!]", r" \g<0> "),
    (r"([^'])' ", r"\1 ' "), (r"[*]", r" \g<0> "),
    (r"[\]\[\(\)\{\}\<\>]", r" \g<0> "), (r"--", r" -- "),
]
_ENDING_QUOTES = [
    (r"([»”’])", r" \1 "), (r"''", " '' "), (r'"', " '' "), (r"\s+", " "),
    (r"([^' ])('[sS]|'[mM]|'[dD]|') ", r"\1 \2 "), (r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) ", r"\1 \2 "),
]
_CONTRACTIONS = [
    r"(?i)\b(can)(?#X)(not)\b", r"(?i)\b(d)(?#X)('ye)\b", r"(?i)\b(gim)(?#X)(me)\b", r"(?i)\b(gon)(?#X)(na)\b",
    r"(?i)\b(got)(?#X)(ta)\b", r"(?i)\b(lem)(?#X)(me)\b", r"(?i)\b(more)(?#X)('n)\b", r"(?i)\b(wan)(?#X)(na)(?=\s)",
    r"(?i) ('t)(?#X)(is)\b", r"(?i) ('t)(?#X)(was)\b",
]


def _nltk_word_tokenizer(text: str) -> list[str]:
    import re

    for pattern, sub in _STARTING_QUOTES + _PUNCTUATION:
        text = re.sub(pattern, sub, text)
    text = " " + text + " "
    for pattern, sub in _ENDING_QUOTES:
        text = re.sub(pattern, sub, text)
    for pattern in _CONTRACTIONS:
        text = re.sub(pattern, r" \1 \2 ", text)
    return text.split()


def word_tokenize(text: str) -> list[str]:
    """Words for the n-gram entropy: ``nltk.word_tokenize`` when NLTK and its English Punkt model
    are installed (the reference's tokenizer); else NLTK's word tokenizer (ported above) on
    sentences split where Punkt splits without a trained model: after ``.``/``!``/``?`` and
    closing quotes or brackets, before whitespace, except after an ellipsis or a one-letter
    initial. The two differ only where the English Punkt model knows an abbreviation."""
    import re

    try:
        import nltk

        return nltk.word_tokenize(text)
    except (ImportError, LookupError):
        pass
    sents = re.split(r"(?<![.\s][.])(?<!\b\w[.])(?<=[.!?])([\]\)}>\"'»”’]*)\s+", text.strip())
    # re.split keeps the captured closing marks: glue them back onto their sentence
    joined = [sents[0]]
    for i in range(1, len(sents), 2):
        joined[-1] += sents[i]
        joined.append(sents[i + 1])
    return [t for s in joined if s for t in _nltk_word_tokenizer(s)]


def compute_ngram_entropy(sentence: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)
                          ) -> float:
    """The reference's ``compute_n_gram_entropy``: the weighted mean of the 2- and 3-gram entropies (bits)."""
    import numpy as np

    toks = word_tokenize(sentence)
    ent = []
    for n in ns:
        counts: dict[tuple[str, ...], int] = {}
        for i in range(len(toks) - n + 1):
            g = tuple(toks[i : i + n])
            counts[g] = counts.get(g, 0) + 1
        freqs = np.array(list(counts.values()), dtype=np.float64)
        freqs = freqs / freqs.sum()
        ent.append(np.sum(-freqs * np.log(freqs) / np.log(2)))
    return float(np.mean(np.array(ent) * np.array(weights)))


def ngram_entropy(texts: Sequence[str]) -> float:
    """Fluency as the reference measures it: the mean n-gram entropy of generated texts."""
    return float(sum(compute_ngram_entropy(t) for t in texts) / len(texts)) if texts else float("nan")


class Tfidf:
    """TF-IDF cosine similarity as the reference's consistency score (sklearn's ``TfidfVectorizer``
    with a given vocabulary and IDF: lower-cased words of 2+ word characters, raw counts × IDF,
    L2-normalised). Built from ``idf.npy`` + ``tfidf_vocab.json`` (:meth:`load`, the reference's
    files) or fitted on documents (:meth:`fit`, the reference's fallback: smooth IDF)."""

    def __init__(self, vocab: Mapping[str, int], idf: Any) -> None:
        import numpy as np

        self.vocab = dict(vocab)
        self.idf = np.asarray(idf, dtype=np.float64)

    @staticmethod
    def _words(text: str) -> list[str]:
        import re

        return re.findall(r"(?u)\b\w\w+\b", text.lower())

    @classmethod
    def fit(cls, documents: Sequence[str]) -> Tfidf:
        """IDF = ln((1 + n) / (1 + df)) + 1 over ``documents``, vocabulary sorted as sklearn's."""
        import numpy as np

        df: dict[str, int] = {}
        for d in documents:
            for w in set(cls._words(d)):
                df[w] = df.get(w, 0) + 1
        vocab = {w: i for i, w in enumerate(sorted(df))}
        n = len(documents)
        idf = np.array([np.log((1 + n) / (1 + df[w])) + 1 for w in sorted(df)])
        return cls(vocab, idf)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> Tfidf:
        """The reference's ``idf.npy`` and ``tfidf_vocab.json`` from ``folder``."""
        import numpy as np

        folder = Path(folder)
        return cls(json.loads((folder / "tfidf_vocab.json").read_text()), np.load(folder / "idf.npy"))

    def vector(self, text: str) -> Any:
        import numpy as np

        v = np.zeros(len(self.vocab))
        for w in self._words(text):
            j = self.vocab.get(w)
            if j is not None:
                v[j] += 1
        v *= self.idf
        norm = np.linalg.norm(v)
        return v / norm if norm > 0 else v

    def similarity(self, a: str, b: str) -> float:
        """Cosine similarity of the two texts' TF-IDF vectors (NaN when one has no known word, as the reference)."""
        import numpy as np

        va, vb = self.vector(a), self.vector(b)
        with np.errstate(invalid="ignore", divide="ignore"):
            return float(np.dot(va, vb) / np.linalg.norm(va) / np.linalg.norm(vb))


@torch.no_grad()
def text_perplexity(model, tok, text: str, max_input_length: int | None = None) -> float:
    """The reference's ``util/perplexity.perplexity`` (its essence score): exp of minus the summed
    log-probability of the text's tokens over the number of input tokens (BOS included), on the
    first ``max_input_length`` tokens."""
    enc = tok([text], return_tensors="pt", max_length=max_input_length, truncation=max_input_length is not None)
    ids = enc["input_ids"].to(model_device(model))
    logits = torch.log_softmax(model(input_ids=ids, attention_mask=enc["attention_mask"].to(ids.device)).logits, dim=2)
    lp = torch.gather(logits[:, :-1, :], 2, ids[:, 1:, None])[0]
    return float(torch.exp(-1 / ids.size(1) * lp.sum()).item())


def generation_scores(model, tok, records: Sequence[Mapping[str, Any]], *,
                      snippets: Mapping[tuple[str, str], Sequence[Mapping[str, str]]] | None = None,
                      tfidf: Tfidf | None = None, max_out_len: int = 100, seed: int = 0,
                      snippet_target: str = "target_true") -> list[dict[str, Any]]:
    """Per record, the reference's ``test_generation`` on its ``generation_prompts``:
    ``ngram_entropy`` (fluency), ``reference_score`` (consistency: TF-IDF similarity of the
    generated text with the snippets of the record's ``(relation_id, snippet_target id)``) and
    ``essence_score`` (perplexity of the subject's own snippets), and the texts.

    For unlearning the neutral target has no snippets, so consistency is measured against the
    *true* object's snippets by default (lower: the model talks less about the forgotten fact).
    Sampling uses a generator seeded with ``seed + record index`` on the model's device.
    """
    out = []
    device = model_device(model)
    for k, rec in enumerate(records):
        prompts = list(rec.get("generation_prompts", []))
        if not prompts:
            out.append({})
            continue
        g = torch.Generator(device=device).manual_seed(seed + k)
        texts = generate_fast(model, tok, prompts, n_gen_per_prompt=1, max_out_len=max_out_len, generator=g)
        res: dict[str, Any] = {"ngram_entropy": ngram_entropy(texts), "text": texts}
        rr = _rewrites(rec)[0]
        tgt = rr.get(snippet_target) or {}
        key = (str(rr.get("relation_id")), str(tgt.get("id", tgt.get("str"))))
        if snippets is not None and tfidf is not None and snippets.get(key):
            samples = snippets[key]
            res["reference_score"] = tfidf.similarity(" ".join(texts), " ".join(s["text"] for s in samples))
            essence = [s["text"] for s in samples if s.get("name") == rr["subject"]]
            if essence:
                res["essence_score"] = text_perplexity(model, tok, " ".join(essence), max_input_length=100)
        out.append(res)
    return out


def load_snippets(path: str | os.PathLike) -> dict[tuple[str, str], list[dict[str, str]]]:
    """An ``attribute_snippets.json`` file as ``{(relation_id, target_id): [{"name", "text"}, ...]}``."""
    from ..errors import ZuFastError

    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ZuFastError(f"{path}: cannot read attribute snippets ({e})") from None
    out: dict[tuple[str, str], list[dict[str, str]]] = {}
    for i, el in enumerate(data if isinstance(data, list) else []):
        if not isinstance(el, Mapping) or not {"relation_id", "target_id", "samples"} <= set(el):
            raise ZuFastError(f"{path}: record {i}: expected relation_id, target_id, samples")
        out.setdefault((str(el["relation_id"]), str(el["target_id"])), []).extend(el["samples"])
    if not out:
        raise ZuFastError(f"{path}: no attribute snippets (expected a non-empty list)")
    return out


def read_texts(path: str | os.PathLike) -> list[str]:
    """Texts of a file for perplexity: one per non-empty line (``.txt``) or the ``"text"`` field of a ``.jsonl``."""
    from ..errors import ZuFastError

    path = Path(path)
    if not path.exists():
        raise ZuFastError(f"{path}: no such text file")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        try:
            lines = [json.loads(line)["text"] for line in lines]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ZuFastError(f"{path}: every line must be a JSON object with a 'text' field ({e!r})") from None
    if not lines:
        raise ZuFastError(f"{path}: no text")
    return lines


def evaluate_dataset(model, tok, kind: str, records: Sequence[Mapping[str, Any]], *,
                     ppl_texts: Iterable[str] | None = None, generation: bool = False,
                     snippets: Mapping | None = None, tfidf: Tfidf | None = None, gen_seed: int = 0,
                     gen_len: int = 100, batch_size: int = 32) -> dict[str, Any]:
    """The paper's metrics on dataset records: the reference's per-record scores aggregated as its
    summarize() (efficacy, generalization, specificity, es/ps/ns for MCF, multihop for MQuAKE),
    perplexity on ``ppl_texts``, and with ``generation`` fluency (n-gram entropy × 100, as the
    reference reports it) and consistency (TF-IDF × 100) on the records' generation prompts
    (``gen_len`` tokens in all, prompt included: the reference's 100 by default).
    ``per_record`` holds the per-record scores."""
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        per = reference_scores(model, tok, kind, records, batch_size=batch_size)
        res: dict[str, Any] = summarize_scores(per)
        res["perplexity"] = perplexity(model, tok, ppl_texts or [], batch_size=batch_size)
        if generation:
            gen = generation_scores(model, tok, records, snippets=snippets, tfidf=tfidf, seed=gen_seed,
                                    max_out_len=gen_len)
            for row, g in zip(per, gen):
                row.update(g)
            ent = [g["ngram_entropy"] for g in gen if "ngram_entropy" in g]
            cons = [g["reference_score"] for g in gen if "reference_score" in g]
            res["fluency"] = 100.0 * sum(ent) / len(ent) if ent else float("nan")
            res["consistency"] = 100.0 * sum(cons) / len(cons) if cons else float("nan")
    finally:
        if was_training:
            model.train()
    res["n_records"] = len(records)
    res["per_record"] = per
    return res
