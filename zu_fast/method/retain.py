"""The retain set (``unlearn(..., retain=...)``): prompts whose outputs the edit must leave as they are.

Forgetting "X was born in Lisbon" should not turn X into a stranger: X's other facts, and anything else the user
names, are *retain* prompts. Each is read like a forget request (``method/keys.py``: the key at the configured key
position, averaged over the context templates), at every edited layer on the model as it is when that layer is
edited, and enters the layer's problem as the demand that its output W k_r stays W k_r (the closed form's λ_r terms,
GD's ‖ΔW K_r‖²; ``closed_form.py``, ``gd.py``; docs/design-notes.md, "Retain set").

What ``retain`` may be:

- records ``{"prompt": "{} works for", "subject": "Alice Morvan", "target_true": "Acme"}`` (the answer, under
  ``target_true`` / ``ground_truth`` / ``answer`` / ``target``, is optional: the method only needs the prompt);
  a prompt that spells the subject out instead of ``{}`` is accepted as in ``UnlearnRequest.from_text``;
- plain prompts, as strings or ``(prompt, answer)`` pairs or records without a subject: read at their last token;
- ``"subject"``: the forgotten subjects' other prompts, ``retain_templates`` (templates with ``{}``, e.g.
  ``["{} works for", "{} speaks"]``) filled with each forgotten subject, leaving out a forget request's own prompt.

On a mixture-of-experts layer each touched component gets the retain records routed to it, gate-weighted like the
forget requests (``retain_columns``): the same Cauchy–Schwarz bound as the forget term, with residual 0.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ZuFastError
from ..model.locate import split_key
from ..requests import UnlearnRequest, max_positions
from .components import ComponentProblem
from .keys import SubjectReadings
from .moe import Readings

__all__ = ["RetainPrompt", "check_retain", "retain_columns", "retain_prompts"]

_ANSWER_KEYS = ("target_true", "ground_truth", "answer", "target")


@dataclass(frozen=True)
class RetainPrompt:
    """One prompt whose output must not change: ``prompt.format(subject)``, read at the key position.

    A plain prompt (no subject given) is stored as ``prompt="{}"`` with the whole text as its subject, so its key
    is read at its last token whatever the key position.
    """

    prompt: str  # template with one "{}"
    subject: str
    answer: str | None = None  # for reporting only (Subject-other); the method never reads it
    index: int = 0

    @property
    def text(self) -> str:
        return self.prompt.format(self.subject)

    @property
    def plain(self) -> bool:
        return self.prompt == "{}"

    def describe(self) -> str:
        return f"retain[{self.index}] ({self.text!r})"

    def pair(self) -> tuple[str, str] | None:
        """``(prompt text, answer)`` for the recall metrics, or None without an answer."""
        return (self.text, self.answer) if self.answer else None


def _answer(item: Mapping[str, Any], where: str) -> str | None:
    answer = next((item[k] for k in _ANSWER_KEYS if item.get(k) is not None), None)
    if isinstance(answer, Mapping):
        answer = answer.get("str")
    if answer is not None and (not isinstance(answer, str) or not answer.strip()):
        raise ZuFastError(f"{where}: the answer must be a non-empty string, got {answer!r}")
    return answer


def _one(item: Any, i: int) -> RetainPrompt:
    where = f"retain[{i}]"
    subject = answer = None
    if isinstance(item, RetainPrompt):
        return RetainPrompt(item.prompt, item.subject, item.answer, i)
    if isinstance(item, UnlearnRequest):
        prompt, subject, answer = item.prompt, item.subject, item.target_true
    elif isinstance(item, str):
        prompt = item
    elif isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(x, str) for x in item):
        prompt, answer = item
    elif isinstance(item, Mapping):
        rec = item.get("requested_rewrite", item)
        prompt, subject, answer = rec.get("prompt"), rec.get("subject"), _answer(rec, where)
    else:
        raise ZuFastError(f"{where}: a retain item is a record {{prompt, subject, target_true}}, a prompt string or a "
                          f"(prompt, answer) pair, got {type(item).__name__} {item!r:.80}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ZuFastError(f"{where}: needs a non-empty prompt, got {prompt!r}")
    if subject is not None and not isinstance(subject, str):
        raise ZuFastError(f"{where}: subject must be a string, got {subject!r}")
    if subject is None or not subject.strip():
        if "{}" in prompt:
            raise ZuFastError(f"{where}: prompt {prompt!r} has a '{{}}' but no subject to fill it; give 'subject'")
        return RetainPrompt("{}", prompt, answer, i)
    try:  # the forget requests' validation: exactly one "{}", or the subject spelled out in the text
        req = (UnlearnRequest(prompt, subject, answer or "·") if "{}" in prompt
               else UnlearnRequest.from_text(prompt, subject, answer or "·"))
    except ZuFastError as e:
        raise ZuFastError(f"{where}: {e}") from None
    return RetainPrompt(req.prompt, req.subject, answer, i)


def retain_prompts(retain: Any, requests: Sequence[UnlearnRequest],
                   templates: Sequence[str] | None = None) -> list[RetainPrompt]:
    """The retain prompts of an ``unlearn`` call, validated (see the module docstring); [] for None.

    Duplicates are dropped; a retain prompt that is also a forget request (same prompt and subject) is refused.
    """
    if retain is None:
        if templates is not None:
            raise ZuFastError("retain_templates are used with retain='subject'; pass retain='subject' too")
        return []
    if isinstance(retain, str) and retain == "subject":
        if templates is None or isinstance(templates, str) or not list(templates):
            raise ZuFastError("retain='subject' fills retain_templates=[...] (prompts with '{}' about the forgotten "
                              "subjects' other facts, e.g. ['{} works for', '{} speaks']) with each forgotten "
                              "subject: give them, or give retain records")
        own = {(r.subject, r.prompt) for r in requests}
        items: list[Any] = []
        for subject in dict.fromkeys(r.subject for r in requests):
            for t in templates:
                if not isinstance(t, str) or t.count("{}") != 1:
                    raise ZuFastError(f"retain_templates: {t!r} must be a string with exactly one '{{}}'")
                if (subject, t) not in own:
                    items.append({"prompt": t, "subject": subject})
    elif isinstance(retain, (str, Mapping, UnlearnRequest)):
        if isinstance(retain, str):
            raise ZuFastError(f"retain={retain!r}: give a list of retain records or prompts, or 'subject'")
        items = [retain]
    else:
        if templates is not None:
            raise ZuFastError("retain_templates are used with retain='subject', not with retain records")
        try:
            items = list(retain)
        except TypeError:
            raise ZuFastError(f"retain must be a list of records or prompts, or 'subject'; got "
                              f"{type(retain).__name__}") from None
    out, seen = [], set()
    forget = {(r.prompt, r.subject): r for r in requests}
    for i, item in enumerate(items):
        rp = _one(item, i)
        if (rp.prompt, rp.subject) in forget or (rp.plain and any(r.text == rp.text for r in requests)):
            raise ZuFastError(f"{rp.describe()} is also a forget request ({forget.get((rp.prompt, rp.subject), '')}"
                              f"): a prompt cannot be forgotten and kept")
        if (rp.prompt, rp.subject) not in seen:
            seen.add((rp.prompt, rp.subject))
            out.append(rp)
    return out


def check_retain(retain: Sequence[RetainPrompt], requests: Sequence[UnlearnRequest], tok, model, fact_token: str,
                 reserve: int = 0) -> None:
    """Refuse a retain prompt longer than the model's context; warn when retain prompts share their key with a
    forget request (subject-first prompts of the same subject read at the subject's last token: the causal model
    has not seen the relation there, so the two demands are about one and the same key and cancel)."""
    if not retain:
        return
    limit = max_positions(model)
    if limit is not None:
        lengths = [len(ids) for ids in tok([r.text for r in retain], add_special_tokens=True)["input_ids"]]
        for r, n in zip(retain, lengths):
            if n > limit - reserve:
                raise ZuFastError(f"{r.describe()}: {n} tokens; the model reads at most {limit} (its trained context, "
                                  f"less {reserve} for the context templates): shorten it")
    if fact_token != "subject_last":
        return
    prefixes = {(r.subject, r.prompt.split("{}")[0]) for r in requests}
    shared = [r for r in retain if not r.plain and (r.subject, r.prompt.split("{}")[0]) in prefixes]
    if shared:
        more = f" and {len(shared) - 3} more" if len(shared) > 3 else ""
        shown = ", ".join(r.describe() for r in shared[:3]) + more
        warnings.warn(f"zu_fast: {len(shared)} retain prompt(s) read at the subject's last token have the same key "
                      f"as a forget request (the text up to the subject is the same): {shown}; the retain demand "
                      "then cancels part of the forgetting. Read keys at the prompt's last token "
                      "(fact_token='last') to tell the facts apart", stacklevel=3)


def retain_columns(readings: SubjectReadings | Readings, p: ComponentProblem) -> torch.Tensor | None:
    """The retain keys of component problem ``p``  # [d_in, M_c] on its weight's device, or None when no retain
    record reaches it: a dense layer's keys as read, or (mixture of experts) the gate-weighted keys of the retain
    records routed to the component, scaled by √ω as the forget columns are (``method/moe.py``)."""
    if isinstance(readings, SubjectReadings):
        K = readings.keys[p.key]  # [M, d_in]
        return K.t().to(p.target.device) if K.shape[0] else None
    rd = readings.layers[split_key(p.key)[0]]
    if p.key not in rd.mass:
        return None
    rows = (rd.mass[p.key] > 0).nonzero().flatten()
    if not rows.numel():
        return None
    s = rd.mass[p.key][rows].sqrt()  # [M_c]
    return (rd.keys(p.key)[rows] * s[:, None]).t().to(p.target.device)  # [d_in, M_c]
