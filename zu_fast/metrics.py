"""Unlearning metrics as the ZeroUnlearn paper defines them (CounterFact / MCF), batched: the core's own
(``Unlearner`` and the method's users need nothing of ``zu_fast.eval``).

All "recall" metrics are teacher-forced exact match: a prompt counts as recalled when *every*
token of the answer is the argmax of the model's next-token distribution, with the answer's
earlier tokens fed in (teacher forcing). Reported as percentages (0-100).

- Efficacy ↓       forget prompts that still yield the true answer.
- Generalization ↓ the same on paraphrased forget prompts (mean over all paraphrase prompts).
- Specificity ↑    neighbourhood prompts (other subjects) that still yield their own answers.
- Subject-other ↑  the forgotten subjects' OTHER facts (a record's ``subject_other_prompts``) that still yield
                   their answers: the collateral loss Specificity, which looks at other people, cannot see (an edit
                   that turns the person into a stranger forgets every fact about them).
- PPL ↓            perplexity on held-out generic text.
- ES / PS ↑        forget / paraphrase prompts where P(neutral target) > P(true answer).
- NS ↑             neighbourhood prompts where P(true answer) > P(neutral target).

For ES/PS/NS the probability of a multi-token string is compared by its mean per-token log
probability (length-normalised), as in the CounterFact reference evaluation. The neutral target
is a string or ``None`` for the tokenizer's EOS token (ZeroUnlearn's default).

How an answer is tokenised: it is scored as it appears *after* the prompt in running text, i.e.
``prompt + " " + answer`` (no space is added when the prompt ends with, or the answer starts
with, whitespace). The answer's token ids are the tail of the full string's tokenisation after
the prompt's tokens, so BPE merges across the boundary are respected; if the full tokenisation
does not start with the prompt's (a merge across the boundary), the answer is tokenised on its
own, without special tokens, and appended.

Sequences are right-padded by hand (whatever the tokenizer's ``padding_side``), so positions of
the real tokens are 0..len-1 exactly as in an unpadded forward, and causal attention never sees
the padding.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from .model import model_device

__all__ = ["acceptance_failures", "efficacy", "encode_continuations", "evaluate", "forget_prompt", "format_table",
           "generalization", "pad_id", "perplexity", "probability_scores", "recall", "score_continuations",
           "specificity", "subject_other", "subject_other_pairs", "target_string"]


# ---------------------------------------------------------------------------------------------
# Record normalisation
# ---------------------------------------------------------------------------------------------


def target_string(t: Any) -> str:
    """``"Lisbon"`` or ``{"str": "Lisbon"}`` -> ``"Lisbon"``."""
    if isinstance(t, str):
        return t
    if isinstance(t, dict) and "str" in t:
        return str(t["str"])
    raise ValueError(f"a target must be a str or a dict with key 'str', got {t!r}")


def forget_prompt(rec: dict) -> str:
    prompt = rec["prompt"]
    return prompt.format(rec["subject"]) if "{}" in prompt else prompt


def _forget_pairs(records: Sequence[dict]) -> list[tuple[str, str]]:
    return [(forget_prompt(r), target_string(r["target_true"])) for r in records]


def _paraphrase_pairs(records: Sequence[dict]) -> list[tuple[str, str]]:
    return [(p, target_string(r["target_true"])) for r in records for p in r.get("paraphrase_prompts", [])]


def _neighborhood_pairs(records: Sequence[dict]) -> list[tuple[str, str]]:
    """CounterFact gives plain strings (target = the record's true answer); ours give dicts."""
    out = []
    for r in records:
        for n in r.get("neighborhood_prompts", []):
            if isinstance(n, str):
                out.append((n, target_string(r["target_true"])))
            else:
                out.append((n["prompt"], target_string(n.get("target", r["target_true"]))))
    return out


def subject_other_pairs(records: Sequence[dict]) -> list[tuple[str, str]]:
    """``(prompt, answer)`` of every record's ``subject_other_prompts``: dicts ``{"prompt", "target"}`` (or
    ``"ground_truth"`` / ``"answer"``) or ``(prompt, answer)`` pairs, prompts with the subject spelled out."""
    out = []
    for r in records:
        for p in r.get("subject_other_prompts", []) or []:
            if isinstance(p, dict):
                answer = next((p[k] for k in ("target", "ground_truth", "answer", "target_true") if k in p), None)
                out.append((p["prompt"], target_string(answer)))
            else:
                prompt, answer = p
                out.append((prompt, target_string(answer)))
    return out


# ---------------------------------------------------------------------------------------------
# Tokenisation and the batched teacher-forced scorer
# ---------------------------------------------------------------------------------------------


def pad_id(tok) -> int:
    for t in (tok.pad_token_id, tok.eos_token_id):
        if t is not None:
            return int(t)
    return 0  # any id works: padded positions are masked out of attention and of the scores


def _join(prompt: str, target: str) -> str:
    if not target or target[0].isspace() or (prompt and prompt[-1].isspace()):
        return prompt + target
    return prompt + " " + target


def encode_continuations(tok, pairs: Sequence[tuple[str, str | None]]) -> list[tuple[list[int], list[int]]]:
    """Token ids ``(prompt_ids, answer_ids)`` for each ``(prompt, answer)``; answer ``None`` = EOS.

    ``prompt_ids`` include the tokenizer's special prefix (e.g. BOS) as the model would see it.
    """
    if not pairs:
        return []
    prompts = [p for p, _ in pairs]
    p_ids = tok(prompts)["input_ids"]
    texts = [(i, _join(p, t)) for i, (p, t) in enumerate(pairs) if t is not None]
    full_ids = tok([s for _, s in texts])["input_ids"] if texts else []
    full = {i: ids for (i, _), ids in zip(texts, full_ids)}
    out = []
    for i, (_, t) in enumerate(pairs):
        p = list(p_ids[i])
        if t is None:
            if tok.eos_token_id is None:
                raise ValueError("neutral target None means the EOS token, but the tokenizer has none")
            out.append((p, [int(tok.eos_token_id)]))
            continue
        f = list(full[i])
        if len(f) > len(p) and f[: len(p)] == p:
            a = f[len(p):]
        else:
            # A merge across the prompt/answer boundary: score the answer as tokenised alone.
            suffix = _join(prompts[i], t)[len(prompts[i]) :]  # " Lisbon"
            a = list(tok(suffix, add_special_tokens=False)["input_ids"])
        if not a:
            raise ValueError(f"answer {t!r} tokenises to nothing after prompt {prompts[i]!r}")
        out.append((p, a))
    return out


@torch.no_grad()
def score_continuations(
    model: torch.nn.Module,
    seqs: Sequence[tuple[list[int], list[int]]],
    *,
    pad_id: int = 0,
    batch_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced scores of answer ids after prompt ids, batched.

    Returns ``(exact [M] bool, mean_logprob [M] float32)`` on CPU: whether every answer token is
    the argmax, and the mean per-token log-probability of the answer.
    """
    m = len(seqs)
    exact = torch.zeros(m, dtype=torch.bool)
    mean_lp = torch.zeros(m, dtype=torch.float32)
    if m == 0:
        return exact, mean_lp
    device = model_device(model)
    # Longest first, so batches hold similar lengths (less padding); results are scattered back.
    order = sorted(range(m), key=lambda i: -(len(seqs[i][0]) + len(seqs[i][1])))
    for start in range(0, m, batch_size):
        idx = order[start : start + batch_size]
        b = len(idx)
        # The last answer token is never an input: inputs are prompt + answer[:-1].
        inputs = [seqs[i][0] + seqs[i][1][:-1] for i in idx]
        length = max(len(x) for x in inputs)
        ids = torch.full((b, length), pad_id, dtype=torch.long)  # [B, L]
        attn = torch.zeros((b, length), dtype=torch.long)  # [B, L]
        labels = torch.full((b, length), -100, dtype=torch.long)  # [B, L]: next token to predict
        for row, i in enumerate(idx):
            p, a = seqs[i]
            x = inputs[row]
            ids[row, : len(x)] = torch.tensor(x)
            attn[row, : len(x)] = 1
            # position len(p)-1+j predicts answer token j
            labels[row, len(p) - 1 : len(p) - 1 + len(a)] = torch.tensor(a)
        logits = model(input_ids=ids.to(device), attention_mask=attn.to(device), use_cache=False).logits
        sel = labels != -100  # [B, L]
        tgt = labels[sel].to(logits.device)  # [T]
        picked = logits[sel.to(logits.device)].float()  # [T, V]: only answer positions
        lp = torch.log_softmax(picked, dim=-1).gather(1, tgt[:, None])[:, 0]  # [T]
        hit = picked.argmax(dim=-1) == tgt  # [T]
        row_of = torch.arange(b)[:, None].expand(b, length)[sel].to(logits.device)  # [T]
        n_tok = torch.zeros(b, device=logits.device).index_add_(0, row_of, torch.ones_like(lp))
        misses = torch.zeros(b, device=logits.device).index_add_(0, row_of, (~hit).float())
        lp_sum = torch.zeros(b, device=logits.device).index_add_(0, row_of, lp)
        where = torch.tensor(idx)
        exact[where] = (misses == 0).cpu()
        mean_lp[where] = (lp_sum / n_tok).cpu()
    return exact, mean_lp


def recall(model, tok, pairs: Sequence[tuple[str, str]], *, batch_size: int = 32) -> float:
    """% of ``(prompt, answer)`` pairs whose answer is the teacher-forced argmax (every token)."""
    if not pairs:
        return float("nan")
    exact, _ = score_continuations(model, encode_continuations(tok, pairs), pad_id=pad_id(tok),
                                   batch_size=batch_size)
    # Count / total in Python floats: a float32 mean makes 6/20 read 30.0000012, which fails "≤ 30".
    return 100.0 * int(exact.sum()) / exact.numel()


def efficacy(model, tok, records: Sequence[dict], *, batch_size: int = 32) -> float:
    """% of forget prompts (record prompt with the subject) still yielding the true answer. Lower = more forgotten."""
    return recall(model, tok, _forget_pairs(records), batch_size=batch_size)


def generalization(model, tok, records: Sequence[dict], *, batch_size: int = 32) -> float:
    """% of all paraphrase prompts still yielding the true answer. Lower = more forgotten."""
    return recall(model, tok, _paraphrase_pairs(records), batch_size=batch_size)


def specificity(model, tok, records: Sequence[dict], *, batch_size: int = 32) -> float:
    """% of neighbourhood prompts yielding their own true answer. Higher = less collateral damage."""
    return recall(model, tok, _neighborhood_pairs(records), batch_size=batch_size)


def subject_other(model, tok, records: Sequence[dict], *, batch_size: int = 32) -> float:
    """% of the forgotten subjects' other facts (``subject_other_prompts``) still yielding their answers. Higher =
    less collateral loss on the person; NaN when no record carries such prompts."""
    return recall(model, tok, subject_other_pairs(records), batch_size=batch_size)


@torch.no_grad()
def perplexity(model, tok, texts: Iterable[str], *, batch_size: int = 16, max_length: int | None = None) -> float:
    """Token-level perplexity exp(total NLL / predicted tokens) over ``texts``.

    Each text is tokenised with the tokenizer's special prefix (BOS) and truncated to
    ``max_length`` tokens (default: the model's ``max_position_embeddings``, at most 2048); every
    token after the first is predicted.
    """
    texts = list(texts)
    if not texts:
        return float("nan")
    if max_length is None:
        max_length = min(int(getattr(getattr(model, "config", None), "max_position_embeddings", 2048) or 2048), 2048)
    enc = [ids[:max_length] for ids in tok(texts)["input_ids"]]
    device = model_device(model)
    pad = pad_id(tok)
    order = sorted(range(len(enc)), key=lambda i: -len(enc[i]))
    nll_sum, n_pred = 0.0, 0
    for start in range(0, len(order), batch_size):
        batch = [enc[i] for i in order[start : start + batch_size] if len(enc[i]) >= 2]
        if not batch:
            continue
        length = max(len(x) for x in batch)
        ids = torch.full((len(batch), length), pad, dtype=torch.long)  # [B, L]
        attn = torch.zeros_like(ids)  # [B, L]
        for row, x in enumerate(batch):
            ids[row, : len(x)] = torch.tensor(x)
            attn[row, : len(x)] = 1
        ids, attn = ids.to(device), attn.to(device)
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits  # [B, L, V]
        sel = attn[:, 1:].bool().to(logits.device)  # [B, L-1]: positions whose next token is real
        tgt = ids[:, 1:].to(logits.device)[sel]  # [T]
        picked = logits[:, :-1][sel].float()  # [T, V]
        nll_sum += torch.nn.functional.cross_entropy(picked, tgt, reduction="sum").item()
        n_pred += int(tgt.numel())
    return float(torch.exp(torch.tensor(nll_sum / max(n_pred, 1))).item())


def probability_scores(
    model, tok, records: Sequence[dict], neutral_target: str | None = None, *, batch_size: int = 32
) -> dict[str, float]:
    """CounterFact-style comparisons with the neutral target: ``{"es", "ps", "ns"}`` in %.

    ES/PS: forget/paraphrase prompts where the neutral target is more probable than the true
    answer (higher = better forgetting). NS: neighbourhood prompts where their true answer is more
    probable than the neutral target (higher = better kept). Probabilities of multi-token strings
    are compared by mean per-token log-probability.
    """
    out = {}
    pad = pad_id(tok)
    for name, pairs, want_neutral in (
        ("es", _forget_pairs(records), True),
        ("ps", _paraphrase_pairs(records), True),
        ("ns", _neighborhood_pairs(records), False),
    ):
        if not pairs:
            out[name] = float("nan")
            continue
        seqs = encode_continuations(tok, pairs + [(p, neutral_target) for p, _ in pairs])
        _, lp = score_continuations(model, seqs, pad_id=pad, batch_size=batch_size)
        lp_true, lp_neutral = lp[: len(pairs)], lp[len(pairs):]
        win = lp_neutral > lp_true if want_neutral else lp_true > lp_neutral
        out[name] = 100.0 * int(win.sum()) / win.numel()
    return out


def evaluate(
    model,
    tok,
    records: Sequence[dict],
    heldout_texts: Iterable[str] | None = None,
    neutral_target: str | None = None,
    *,
    batch_size: int = 32,
) -> dict[str, float]:
    """All metrics: efficacy, generalization, specificity, subject_other, perplexity, es, ps, ns (+ counts).

    Percentages in 0-100; ``perplexity`` is NaN when no held-out texts are given; ``subject_other`` is present
    only when some record carries ``subject_other_prompts``. The model is put in eval mode for the measurement
    and its previous mode restored.
    """
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        res = {
            "efficacy": efficacy(model, tok, records, batch_size=batch_size),
            "generalization": generalization(model, tok, records, batch_size=batch_size),
            "specificity": specificity(model, tok, records, batch_size=batch_size),
            "perplexity": perplexity(model, tok, heldout_texts or [], batch_size=batch_size),
        }
        if subject_other_pairs(records):
            res["subject_other"] = subject_other(model, tok, records, batch_size=batch_size)
        res.update(probability_scores(model, tok, records, neutral_target, batch_size=batch_size))
    finally:
        if was_training:
            model.train()
    res["n_records"] = len(records)
    res["n_paraphrase"] = len(_paraphrase_pairs(records))
    res["n_neighborhood"] = len(_neighborhood_pairs(records))
    res["n_subject_other"] = len(subject_other_pairs(records))
    return res


_ROWS = [
    ("efficacy", "Efficacy (%) ↓"),
    ("generalization", "Generalization (%) ↓"),
    ("specificity", "Specificity (%) ↑"),
    ("subject_other", "Subject-other (%) ↑"),
    ("retained", "Retain prompts (%) ↑"),
    ("perplexity", "PPL ↓"),
    ("es", "ES: P(neutral)>P(true) (%) ↑"),
    ("ps", "PS: paraphrase (%) ↑"),
    ("ns", "NS: neighbours keep (%) ↑"),
]


def acceptance_failures(before: dict, after: dict) -> list[str]:
    """The small-model acceptance bar (issue 2) as a list of what failed (empty: met).

    Efficacy ≤ 10, Generalization ≤ 30 (percent), Specificity at most 5 points below ``before``,
    perplexity at most 10% above ``before``. Percentages are exact count ratios (``recall``), so
    the bounds are compared without tolerance.
    """
    checks = [
        (after["efficacy"] <= 10, f"efficacy {after['efficacy']:.1f} > 10"),
        (after["generalization"] <= 30, f"generalization {after['generalization']:.1f} > 30"),
        (after["specificity"] >= before["specificity"] - 5,
         f"specificity {after['specificity']:.1f} < {before['specificity']:.1f} - 5"),
        (after["perplexity"] <= 1.10 * before["perplexity"],
         f"perplexity {after['perplexity']:.3f} > 1.1 × {before['perplexity']:.3f}"),
    ]
    return [msg for ok, msg in checks if not ok]


def format_table(before: dict, after: dict) -> str:
    """A markdown table of the metrics before and after unlearning, with the change."""
    lines = ["| metric | before | after | change |", "|---|---:|---:|---:|"]
    for key, label in _ROWS:
        if key not in before and key not in after:
            continue
        b, a = before.get(key, float("nan")), after.get(key, float("nan"))
        if key in ("subject_other", "retained") and b != b and a != a:  # NaN: no such prompts were given
            continue
        digits = 3 if key == "perplexity" else 1
        lines.append(f"| {label} | {b:.{digits}f} | {a:.{digits}f} | {a - b:+.{digits}f} |")
    return "\n".join(lines)
