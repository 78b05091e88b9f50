"""``zu_fast.Unlearner``: forget facts in one call and see what it did, EasyEdit-style.

    unl = zu_fast.Unlearner(model, tok, cfg, corpus="wiki.txt")       # or stats=collect_stats(...)
    res = unl.forget(prompts=["Alice Morvan was born in"], subjects=["Alice Morvan"],
                     ground_truth=["Lisbon"], paraphrases=[["Alice Morvan's birthplace is"]],
                     neighbours=[("Bob Kestrel was born in", "Oslo")],
                     retain=[("Alice Morvan works for", "Acme")],          # must not change (optional)
                     subject_other=[("Alice Morvan's employer is", "Acme")])  # measured, never retained
    print(res)            # the metrics on the given prompts, before and after
    res.edit.restore()    # bit-identical original weights

Prompts may be templates with ``{}`` where the subject goes, or full text in which the subject
occurs (its first occurrence becomes the ``{}``, :meth:`UnlearnRequest.from_text`). The answer
key may be spelled ``answers``, ``ground_truth`` (EasyEdit) or ``target_true`` (CounterFact).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .config import UnlearnConfig
from .edit import Edit
from .errors import ZuFastError
from .requests import UnlearnRequest, normalize_requests

__all__ = ["ForgetResult", "Unlearner"]


@dataclass
class ForgetResult:
    """What :meth:`Unlearner.forget` did: the edit (restore / save), the requests it forgot and the
    metrics (:func:`zu_fast.metrics.evaluate`) on the given prompts before and after."""

    edit: Edit
    requests: list[UnlearnRequest]
    records: list[dict[str, Any]] = field(repr=False)
    retain: list[Any] = field(default_factory=list, repr=False)  # the retain prompts used (method.retain)
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)

    def table(self) -> str:
        """Markdown table of the metrics before and after, with the change."""
        from .metrics import format_table

        return format_table(self.before, self.after)

    def __str__(self) -> str:
        return f"zu_fast forgot {len(self.requests)} facts\n{self.table()}"


def _as_list(x: Any, n: int | None, name: str) -> list[Any]:
    if x is None:
        return [None] * (n or 0)
    if isinstance(x, str):
        x = [x]
    x = list(x)
    if n is not None and len(x) != n:
        raise ZuFastError(f"{name}: {len(x)} given for {n} prompts")
    return x


def _pair(item: Any, where: str) -> dict[str, str]:
    """A neighbour (or Subject-other prompt) as ``{"prompt", "target"}`` from a (prompt, answer) pair or a dict."""
    if isinstance(item, Mapping):
        answer = next((item[k] for k in ("target", "ground_truth", "answer", "target_true") if k in item), None)
        prompt = item.get("prompt")
    elif isinstance(item, (tuple, list)) and len(item) == 2:
        prompt, answer = item
    else:
        raise ZuFastError(f"{where}: expected a (prompt, answer) pair or a dict with 'prompt' and "
                          f"'ground_truth'/'target', got {item!r}")
    if isinstance(answer, Mapping):
        answer = answer.get("str")
    if not isinstance(prompt, str) or not isinstance(answer, str) or not prompt or not answer:
        raise ZuFastError(f"{where}: needs a non-empty prompt and answer, got {item!r}")
    return {"prompt": prompt, "target": answer}


def _neighbour_lists(neighbours: Any, n: int, name: str = "neighbours") -> list[list[dict[str, str]]]:
    """Per request: its neighbours. Accepts one list per request, one shared list (kept with the
    first request: the metrics pool all neighbours anyway) or EasyEdit's ``{"prompt": [...],
    "ground_truth": [...]}``."""
    if neighbours is None:
        return [[] for _ in range(n)]
    if isinstance(neighbours, Mapping) and "prompt" in neighbours and not isinstance(neighbours["prompt"], str):
        answers = neighbours.get("ground_truth", neighbours.get("target"))
        if answers is None or len(answers) != len(neighbours["prompt"]):
            raise ZuFastError(f"{name}: {{'prompt': [...], 'ground_truth': [...]}} needs one answer per prompt")
        neighbours = list(zip(neighbours["prompt"], answers))
    neighbours = list(neighbours)
    per_request = len(neighbours) == n and all(
        isinstance(x, list) and all(not isinstance(y, str) for y in x) for x in neighbours)
    if per_request:
        return [[_pair(y, f"{name}[{i}]") for y in x] for i, x in enumerate(neighbours)]
    shared = [_pair(y, name) for y in neighbours]
    return [shared] + [[] for _ in range(n - 1)]


def _paraphrase_lists(paraphrases: Any, n: int) -> list[list[str]]:
    if paraphrases is None:
        return [[] for _ in range(n)]
    if isinstance(paraphrases, str):
        paraphrases = [paraphrases]
    paraphrases = list(paraphrases)
    if len(paraphrases) != n:
        raise ZuFastError(f"paraphrases: {len(paraphrases)} given for {n} prompts (one string or list per prompt)")
    out = []
    for i, p in enumerate(paraphrases):
        p = [] if p is None else [p] if isinstance(p, str) else list(p)
        if not all(isinstance(x, str) for x in p):
            raise ZuFastError(f"paraphrases[{i}]: expected strings, got {p!r}")
        out.append(p)
    return out


class Unlearner:
    """One-call forgetting on a model: ``Unlearner(model, tok, config).forget(prompts=..., ...)``.

    ``config`` defaults to :meth:`UnlearnConfig.for_model`. The method needs corpus statistics:
    pass ``stats`` (from :func:`zu_fast.collect_stats`) or a ``corpus`` to collect them from
    (once, on the first call; cached on disk). ``heldout_texts`` adds perplexity to the metrics.
    """

    def __init__(self, model: Any, tok: Any, config: UnlearnConfig | None = None, *, stats: Any = None,
                 corpus: Any = None, heldout_texts: Sequence[str] | None = None) -> None:
        self.model = model
        self.tok = tok
        self.config = config if config is not None else UnlearnConfig.for_model(model)
        self.stats = stats
        self.corpus = corpus
        self.heldout_texts = list(heldout_texts) if heldout_texts is not None else None

    def _get_stats(self) -> Any:
        if self.stats is None:
            if self.corpus is None:
                raise ZuFastError("Unlearner needs corpus statistics: pass stats=zu_fast.collect_stats(...) or "
                                  "corpus=... (an iterable of texts, a .txt/.jsonl path or a datasets.Dataset)")
            from .stats.collect import collect_stats

            self.stats = collect_stats(self.model, self.tok, self.corpus, self.config)
        return self.stats

    def requests(self, prompts: Any = None, subjects: Any = None, answers: Any = None, *,
                 ground_truth: Any = None, target_true: Any = None, requests: Any = None) -> list[UnlearnRequest]:
        """The forget requests of a :meth:`forget` call (validated, duplicates dropped with a warning; see
        there for the arguments)."""
        return normalize_requests(self._given_requests(prompts, subjects, answers, ground_truth=ground_truth,
                                                       target_true=target_true, requests=requests))

    def _given_requests(self, prompts: Any = None, subjects: Any = None, answers: Any = None, *,
                        ground_truth: Any = None, target_true: Any = None,
                        requests: Any = None) -> list[UnlearnRequest]:
        """One UnlearnRequest per request given, in order, before duplicates are dropped."""
        given = [(k, v) for k, v in (("answers", answers), ("ground_truth", ground_truth),
                                      ("target_true", target_true)) if v is not None]
        if len(given) > 1:
            raise ZuFastError(f"give the answers once: got {[k for k, _ in given]}")
        answers = given[0][1] if given else None
        if requests is not None:
            if prompts is not None or subjects is not None or answers is not None:
                raise ZuFastError("give either requests=[...] or prompts/subjects/answers, not both")
            recs = []
            for i, r in enumerate([requests] if isinstance(requests, Mapping) else list(requests)):
                if isinstance(r, Mapping) and "target_true" not in r and "ground_truth" in r:
                    r = {**{k: v for k, v in r.items() if k != "ground_truth"}, "target_true": r["ground_truth"]}
                if isinstance(r, Mapping) and isinstance(r.get("prompt"), str) and "{}" not in r["prompt"] \
                        and "subject" in r:
                    t = r.get("target_true")
                    t = t.get("str") if isinstance(t, Mapping) else t
                    r = UnlearnRequest.from_text(r["prompt"], r["subject"], t, case_id=r.get("case_id", i))
                recs.append(UnlearnRequest.from_record(r, i))
            return recs
        if prompts is None or subjects is None or answers is None:
            raise ZuFastError("forget needs prompts, subjects and answers (or ground_truth / target_true), "
                              "or requests=[...]")
        prompts = _as_list(prompts, None, "prompts")
        subjects = _as_list(subjects, len(prompts), "subjects")
        answers = _as_list(answers, len(prompts), "answers")
        out = []
        for i, (p, s, a) in enumerate(zip(prompts, subjects, answers)):
            if not isinstance(p, str):
                raise ZuFastError(f"prompts[{i}]: expected a string, got {p!r}")
            if "{}" in p:
                out.append(UnlearnRequest(p, s, a, case_id=i))
            else:
                try:
                    out.append(UnlearnRequest.from_text(p, s, a, case_id=i))
                except ZuFastError as e:
                    raise ZuFastError(f"prompts[{i}]: {e}") from None
        return out

    def forget(self, prompts: str | Sequence[str] | None = None, subjects: str | Sequence[str] | None = None,
               answers: str | Sequence[str] | None = None, *, ground_truth: str | Sequence[str] | None = None,
               target_true: str | Sequence[str] | None = None, requests: Any = None,
               paraphrases: Any = None, neighbours: Any = None, neighbors: Any = None,
               retain: Any = None, retain_templates: Sequence[str] | None = None, subject_other: Any = None,
               evaluate: bool = True) -> ForgetResult:
        """Forget the facts ``prompt → answer`` (edits the model in place) and measure it.

        - ``prompts``: templates with ``{}`` or full text containing the subject; ``subjects`` and
          ``answers`` (or ``ground_truth`` / ``target_true``): one per prompt. Or ``requests``:
          records ``{"prompt", "subject", "target_true" | "ground_truth"}``.
        - ``paraphrases``: one string or list of strings per prompt (generalisation).
        - ``neighbours`` (or ``neighbors``): facts that must survive, as ``(prompt, answer)`` pairs
          or ``{"prompt", "ground_truth"}`` dicts: one shared list, one list per prompt, or
          EasyEdit's ``{"prompt": [...], "ground_truth": [...]}`` (specificity).
        - ``retain``: prompts whose outputs must not change (``zu_fast.method.retain``): records
          ``{"prompt", "subject", "target_true"}``, plain prompts or ``(prompt, answer)`` pairs, or
          ``"subject"`` with ``retain_templates=["{} works for", ...]`` (the forgotten subjects' other
          prompts). Those with an answer are also measured ("Retain prompts").
        - ``subject_other``: the forgotten subjects' other facts to measure the collateral loss on
          ("Subject-other"), in the shapes ``neighbours`` takes. Give prompts the edit did not retain:
          a retained prompt measures the retain term, not the person.

        Returns a :class:`ForgetResult` with the edit and the metrics (efficacy, generalization,
        specificity, Subject-other, ES/PS/NS, perplexity when the Unlearner has ``heldout_texts``)
        before and after.
        """
        from . import metrics
        from .method.retain import retain_prompts
        from .method.unlearn import unlearn

        if neighbours is not None and neighbors is not None:
            raise ZuFastError("give neighbours or neighbors, not both")
        given = self._given_requests(prompts, subjects, answers, ground_truth=ground_truth, target_true=target_true,
                                     requests=requests)
        # per-request paraphrase/neighbour lists follow the requests as given; a dropped duplicate drops its lists
        paras = _paraphrase_lists(paraphrases, len(given))
        neigh = _neighbour_lists(neighbours if neighbours is not None else neighbors, len(given))
        others = _neighbour_lists(subject_other, len(given), "subject_other")
        reqs = normalize_requests(given)
        where = {id(r): i for i, r in enumerate(given)}
        paras, neigh = [paras[where[id(r)]] for r in reqs], [neigh[where[id(r)]] for r in reqs]
        others = [others[where[id(r)]] for r in reqs]
        keep = retain_prompts(retain, reqs, retain_templates)  # validated before any work
        records = [{"prompt": r.prompt, "subject": r.subject, "target_true": r.target_true, "case_id": r.case_id,
                    "paraphrase_prompts": p, "neighborhood_prompts": n, "subject_other_prompts": o}
                   for r, p, n, o in zip(reqs, paras, neigh, others)]
        kept_pairs = [rp.pair() for rp in keep if rp.pair() is not None]
        stats = self._get_stats()

        def measure() -> dict[str, float]:
            res = metrics.evaluate(self.model, self.tok, records, self.heldout_texts,
                                   neutral_target=self.config.neutral_target)
            if kept_pairs:
                res["retained"] = metrics.recall(self.model, self.tok, kept_pairs)
            return res

        before = measure() if evaluate else {}
        edit = unlearn(self.model, self.tok, reqs, self.config, stats=stats, retain=keep or None)
        after = measure() if evaluate else {}
        return ForgetResult(edit=edit, requests=reqs, records=records, retain=keep, before=before, after=after)
