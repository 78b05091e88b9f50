"""Tokenisation helpers: prompts with a subject slot, subject last-token indices, padded batches."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import ZuFastError


def fill(template: str, subject: str) -> tuple[str, int, int]:
    """``template.format(subject)`` and the character span [start, end) of the subject in it."""
    head, sep, _ = template.partition("{}")
    if not sep:
        raise ZuFastError(f"template {template!r} has no '{{}}' for the subject")
    start = len(head.replace("{{", "{").replace("}}", "}"))
    text = template.format(subject)
    return text, start, start + len(subject)


def _pad_id(tok) -> int:
    if tok.pad_token_id is not None:
        return tok.pad_token_id
    if tok.eos_token_id is not None:
        return tok.eos_token_id
    return 0


def encode_prompts(tok, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, special tokens (BOS) added as the tokenizer does by default."""
    return [list(ids) for ids in tok(list(texts), add_special_tokens=True)["input_ids"]]


def subject_token_ranges(tok, templates: Sequence[str], subjects: Sequence[str], what: Sequence[str] | None = None):
    """Token ids of ``template.format(subject)`` and the indices of the subject's FIRST and LAST tokens.

    Uses the fast tokenizer's offsets (robust to merges across the subject boundary); a slow
    tokenizer falls back to the length of the tokenised prefix (last) and to the shortest run of
    tokens whose decoded text covers the subject (first). ``what`` names each item in errors.
    Returns ``(ids_list, firsts, lasts)``.
    """
    texts, ends, starts = [], [], []
    for t, s in zip(templates, subjects):
        text, a, b = fill(t, s)
        texts.append(text)
        starts.append(a)
        ends.append(b)
    try:
        enc = tok(texts, add_special_tokens=True, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, ValueError, TypeError, KeyError):
        enc, offsets = tok(texts, add_special_tokens=True), None
    ids_list = [list(x) for x in enc["input_ids"]]
    firsts, lasts = [], []
    for i, ids in enumerate(ids_list):
        a, b = starts[i], ends[i]
        first = idx = -1
        if offsets is not None:
            for j, (s, e) in enumerate(offsets[i]):
                if e > s and s < b and e > a:  # token overlaps the subject's characters
                    first = j if first < 0 else first
                    idx = j
        else:
            prefix = tok(texts[i][:b], add_special_tokens=True)["input_ids"]
            idx = len(prefix) - 1
            # the shortest run of tokens ending at the last one whose text covers the subject
            first = idx
            while first > 0 and subjects[i] not in tok.decode(ids[first : idx + 1]):
                first -= 1
        if idx < 0 or idx >= len(ids):
            name = what[i] if what is not None else f"prompt {texts[i]!r}"
            raise ZuFastError(f"{name}: subject {subjects[i]!r} not found among the tokens of {texts[i]!r}")
        firsts.append(first)
        lasts.append(idx)
    return ids_list, firsts, lasts


def subject_spans(tok, templates: Sequence[str], subjects: Sequence[str], what: Sequence[str] | None = None):
    """Token ids of ``template.format(subject)`` and the index of the subject's LAST token in each
    (see :func:`subject_token_ranges`)."""
    ids_list, _, lasts = subject_token_ranges(tok, templates, subjects, what)
    return ids_list, lasts


def continuation_ids(tok, text: str | None) -> list[int]:
    """Token ids of ``text`` as it continues a prompt (leading space added); None → [EOS]."""
    if text is None:
        if tok.eos_token_id is None:
            raise ZuFastError("the neutral target defaults to EOS but the tokenizer has no eos_token")
        return [tok.eos_token_id]
    if not text.strip():
        raise ZuFastError("the neutral target string is empty")
    spaced = text if text.startswith(" ") else " " + text
    ids = tok(spaced, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ZuFastError(f"target {text!r} tokenises to nothing")
    return list(ids)


def padded_batch(tok, ids_list: Sequence[Sequence[int]], device) -> dict[str, torch.Tensor]:
    """Right-padded input_ids + attention_mask on ``device``."""
    n = max(len(x) for x in ids_list)
    pad = _pad_id(tok)
    ids = torch.full((len(ids_list), n), pad, dtype=torch.long)
    mask = torch.zeros((len(ids_list), n), dtype=torch.long)
    for i, x in enumerate(ids_list):
        ids[i, : len(x)] = torch.tensor(list(x), dtype=torch.long)
        mask[i, : len(x)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
