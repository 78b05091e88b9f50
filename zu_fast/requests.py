"""UnlearnRequest: validation and normalisation of user forget requests.

Accepted record shape (the editing ecosystem's)::

    {"prompt": "{} was born in", "subject": "Alice Morvan", "target_true": "Lisbon"}
    {"prompt": ..., "subject": ..., "target_true": {"str": "Lisbon"}, "case_id": 7, ...}

Extra keys (paraphrase_prompts, neighborhood_prompts, ...) are kept in ``extra`` for evaluation.

What is refused (``ZuFastError`` naming the request, before any work) and what is fixed with a warning:
- a prompt without exactly one ``{}``, or with any other replacement field (``{x}``, ``{0}``, ``{:>5}``,
  a lone brace): refused (write literal braces as ``{{`` and ``}}``); a prompt without ``{}`` says whether it
  spells the subject out (then ``UnlearnRequest.from_text`` builds the template) or does not contain it;
- ``UnlearnRequest.from_text(text, subject, ...)`` with a subject that is not in the text: refused ("subject
  not found in the prompt");
- a prompt, subject or target that is not a string (``42``), or an empty subject / target: refused;
- the same request more than once (same prompt, subject and target): a warning naming them, and only the
  first is kept (a copy would only weigh the fact more: three copies enlarge ‖D − I‖ by ~60%);
- contradictory requests (same prompt and subject, different targets): refused, both named;
- a prompt that does not fit the model's context (``check_lengths``, called by ``unlearn``): refused.
"""

from __future__ import annotations

import string
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ZuFastError


@dataclass(frozen=True)
class UnlearnRequest:
    """One fact to forget: ``prompt.format(subject)`` should no longer yield ``target_true``."""

    prompt: str  # contains exactly one "{}" where the subject goes
    subject: str
    target_true: str
    case_id: Any = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def text(self) -> str:
        return self.prompt.format(self.subject)

    def __post_init__(self) -> None:
        name = self.describe()
        for what in ("prompt", "subject", "target_true"):
            value = getattr(self, what)
            if not isinstance(value, str):
                raise ZuFastError(f"{name}: {what} must be a string, got {type(value).__name__} {_short(value)}")
        _check_prompt(self.prompt, name, self.subject)
        if not self.subject.strip():
            raise ZuFastError(f"{name}: subject is empty")
        if not self.target_true.strip():
            raise ZuFastError(f"{name}: target_true must be a non-empty string")

    def describe(self) -> str:
        ident = f"#{self.case_id}" if self.case_id is not None else ""
        subject = _short(self.subject) if isinstance(self.subject, str) else f"{self.subject!r}"
        return f"request{ident} (subject {subject})"

    @classmethod
    def from_text(cls, text: str, subject: str, target_true: str, **kw: Any) -> UnlearnRequest:
        """Build from a prompt that contains the subject literally (its first occurrence becomes {}).

        A subject that is not in ``text`` is refused (ZuFastError: "subject … not found in the prompt")."""
        ident = f"#{kw['case_id']}" if kw.get("case_id") is not None else ""
        for what, value in (("text", text), ("subject", subject), ("target_true", target_true)):
            if not isinstance(value, str):
                raise ZuFastError(f"request{ident}: {what} must be a string, got {type(value).__name__} "
                                  f"{_short(value)}")
        if not subject.strip() or subject not in text:
            near = " (it is there in another case: subjects are matched exactly)" \
                if subject.strip() and subject.lower() in text.lower() else ""
            raise ZuFastError(f"subject {_short(subject)} not found in the prompt {_short(text)}{near}"
                              + (f" (request{ident})" if ident else ""))
        i = text.index(subject)
        template = text[:i].replace("{", "{{").replace("}", "}}") + "{}" + \
            text[i + len(subject):].replace("{", "{{").replace("}", "}}")
        return cls(template, subject, target_true, **kw)

    @classmethod
    def from_record(cls, record: Mapping[str, Any] | UnlearnRequest, index: int = 0) -> UnlearnRequest:
        if isinstance(record, UnlearnRequest):
            return record
        if not isinstance(record, Mapping):
            raise ZuFastError(f"request {index}: expected a dict or UnlearnRequest, got {type(record).__name__}")
        # CounterFact nests the rewrite: {"requested_rewrite": {prompt, subject, target_true, ...}}
        rec = dict(record.get("requested_rewrite", record))
        missing = [k for k in ("prompt", "subject", "target_true") if k not in rec]
        if missing:
            raise ZuFastError(f"request {index}: missing keys {missing} (have {sorted(rec)})")
        target = rec["target_true"]
        if isinstance(target, Mapping):
            if "str" not in target:
                raise ZuFastError(f"request {index}: target_true dict needs a 'str' key")
            target = target["str"]
        case_id = record.get("case_id", rec.get("case_id", index))
        extra = {k: v for k, v in record.items() if k not in ("prompt", "subject", "target_true", "case_id")}
        return cls(rec["prompt"], rec["subject"], target, case_id=case_id, extra=extra)


def _short(value: Any, n: int = 60) -> str:
    r = repr(value)
    return r if len(r) <= n else r[: n - 4] + "…" + r[-3:]


def _check_prompt(prompt: str, name: str, subject: str | None = None) -> None:
    """Exactly one plain ``{}`` replacement field; anything else str.format would choke on or misread."""
    try:
        fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(prompt) if f is not None]
    except ValueError as e:  # a lone '{' or '}'
        raise ZuFastError(f"{name}: prompt {_short(prompt)} is not a valid template ({e}); write literal braces "
                          "as '{{' and '}}'") from None
    others = [f for f, spec, conv in fields if f != "" or spec or conv]
    if others:
        shown = ", ".join("{" + f + "}" if f else "{…}" for f in others)
        raise ZuFastError(f"{name}: prompt {_short(prompt)} has the replacement field {shown}; a prompt has exactly "
                          "one '{}' where the subject goes (write literal braces as '{{' and '}}')")
    if not fields and isinstance(subject, str) and subject.strip():
        if subject in prompt:
            raise ZuFastError(f"{name}: prompt {_short(prompt)} must contain exactly one '{{}}' where the subject "
                              "goes; it spells the subject out instead: write '{}' in its place, or build the request "
                              "with UnlearnRequest.from_text(text, subject, target_true)")
        raise ZuFastError(f"{name}: prompt {_short(prompt)} must contain exactly one '{{}}' where the subject goes, "
                          "found none, and the subject is not found in the prompt either")
    if len(fields) != 1:
        raise ZuFastError(
            f"{name}: prompt {_short(prompt)} must contain exactly one '{{}}' where the subject goes, found "
            f"{len(fields)} (use UnlearnRequest.from_text to build one from a prompt that spells the subject out)"
        )


def normalize_requests(requests: Iterable[Mapping[str, Any] | UnlearnRequest]) -> list[UnlearnRequest]:
    """Validate and normalise user requests; raise ZuFastError naming the bad one.

    Exact duplicates (same prompt, subject and target, whitespace around the target ignored) are
    dropped with a warning naming them; contradictory requests (same prompt and subject, different
    targets) are refused.
    """
    if isinstance(requests, (Mapping, UnlearnRequest)):
        requests = [requests]
    if isinstance(requests, (str, bytes)):
        raise ZuFastError("requests must be a list of {prompt, subject, target_true} records, got a string")
    try:
        items = list(requests)
    except TypeError:
        raise ZuFastError(f"requests must be a list of records, got {type(requests).__name__}") from None
    out = [UnlearnRequest.from_record(r, i) for i, r in enumerate(items)]
    if not out:
        raise ZuFastError("no requests given: pass at least one {prompt, subject, target_true} record")
    seen: dict[tuple[str, str], UnlearnRequest] = {}
    kept, dropped = [], []
    for r in out:
        key = (r.prompt, r.subject)
        first = seen.get(key)
        if first is None:
            seen[key] = r
            kept.append(r)
        elif first.target_true.strip() == r.target_true.strip():
            dropped.append((r, first))
        else:
            raise ZuFastError(
                f"contradictory requests: {first.describe()} and {r.describe()} have the same prompt "
                f"{_short(r.prompt)} and subject but different answers ({first.target_true!r} and "
                f"{r.target_true!r}); keep one"
            )
    if dropped:
        shown = ", ".join(f"{r.describe()} = {first.describe()}" for r, first in dropped[:5])
        more = f" and {len(dropped) - 5} more" if len(dropped) > 5 else ""
        warnings.warn(f"zu_fast: {len(dropped)} duplicate request(s) dropped (a copy only weighs the fact more): "
                      f"{shown}{more}", stacklevel=2)
    return kept


def max_positions(model: Any) -> int | None:
    """The context the model was trained for: ``max_position_embeddings`` / ``n_positions`` / ``n_ctx``."""
    mcfg = getattr(model, "config", model)
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length"):
        v = getattr(mcfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def check_lengths(requests: list[UnlearnRequest], tok: Any, limit: int | None, reserve: int = 0) -> None:
    """Refuse a request whose prompt (with its subject and answer, plus ``reserve`` tokens of context
    template) does not fit in ``limit`` tokens, the model's trained context; names the request."""
    if limit is None:
        return
    room = limit - reserve
    texts = [r.text + " " + r.target_true for r in requests]
    lengths = [len(ids) for ids in tok(texts, add_special_tokens=True)["input_ids"]]
    for r, n in zip(requests, lengths):
        if n > room:
            raise ZuFastError(
                f"{r.describe()}: its prompt with subject and answer is {n} tokens; the model reads at most {limit} "
                f"(its trained context, less {reserve} for the context templates): shorten the subject or prompt"
            )
