"""UnlearnRequest: validation and normalisation of user forget requests.

Accepted record shape (the editing ecosystem's)::

    {"prompt": "{} was born in", "subject": "Alice Morvan", "target_true": "Lisbon"}
    {"prompt": ..., "subject": ..., "target_true": {"str": "Lisbon"}, "case_id": 7, ...}

Extra keys (paraphrase_prompts, neighborhood_prompts, ...) are kept in ``extra`` for evaluation.
"""

from __future__ import annotations

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
        if not isinstance(self.prompt, str) or not isinstance(self.subject, str):
            raise ZuFastError(f"{name}: prompt and subject must be strings")
        if self.prompt.count("{}") != 1:
            raise ZuFastError(
                f"{name}: prompt {self.prompt!r} must contain exactly one '{{}}' where the subject goes "
                "(use UnlearnRequest.from_text to build one from a prompt that spells the subject out)"
            )
        if not self.subject.strip():
            raise ZuFastError(f"{name}: subject is empty")
        if not isinstance(self.target_true, str) or not self.target_true.strip():
            raise ZuFastError(f"{name}: target_true must be a non-empty string")

    def describe(self) -> str:
        ident = f"#{self.case_id}" if self.case_id is not None else ""
        return f"request{ident} (subject {self.subject!r})"

    @classmethod
    def from_text(cls, text: str, subject: str, target_true: str, **kw: Any) -> UnlearnRequest:
        """Build from a prompt that contains the subject literally (its first occurrence becomes {})."""
        if not subject or subject not in text:
            raise ZuFastError(f"subject {subject!r} not found in prompt {text!r}")
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
        return cls(str(rec["prompt"]), str(rec["subject"]), target, case_id=case_id, extra=extra)


def normalize_requests(requests: Iterable[Mapping[str, Any] | UnlearnRequest]) -> list[UnlearnRequest]:
    """Validate and normalise user requests; raise ZuFastError naming the bad one."""
    if isinstance(requests, (Mapping, UnlearnRequest)):
        requests = [requests]
    out = [UnlearnRequest.from_record(r, i) for i, r in enumerate(requests)]
    if not out:
        raise ZuFastError("no requests given: pass at least one {prompt, subject, target_true} record")
    return out
