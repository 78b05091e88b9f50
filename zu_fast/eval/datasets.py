"""The reference code's dataset files: CounterFact / MultiCounterFact, ZsRE, MQuAKE.

Each loader turns a file into an :class:`EvalDataset`: the records in the shape the reference's
evaluation functions take (``experiments/py/eval_utils_*.py``), the forget requests zu_fast's
methods take (:meth:`EvalDataset.requests`), and the reference's choice of forget records
(:meth:`EvalDataset.sample`). A record that does not fit its schema raises
:class:`zu_fast.ZuFastError` naming the file and the record's index.

Schemas (the files people have on disk):

- **CounterFact / MultiCounterFact** (``counterfact.json``, ``multi_counterfact*.json``): a list of
  ``{"case_id", "requested_rewrite": {"prompt": "{} was born in", "subject", "target_true":
  {"str"}, "target_new": {"str"}, "relation_id"?}, "paraphrase_prompts": [str],
  "neighborhood_prompts": [str], "attribute_prompts": [str], "generation_prompts": [str]}``.
  Neighbourhood prompts are other subjects sharing the true object, so their answer is the
  record's ``target_true``. For unlearning, ``target_new`` is the neutral target (the reference
  ships ``multi_counterfact_target_new.json`` with it set); ES/PS/NS compare against it.
- **ZsRE** (``zsre_mend_eval.json``): a list of ``{"subject", "src", "answers": [str], "rephrase",
  "alt", "loc": "nq question: ...", "loc_ans"}``. Turned into records exactly as the reference's
  ``dsets/zsre.py`` does: the prompt is ``src`` with the subject replaced by ``{}``, the neutral
  target ``<|endoftext|>``, one paraphrase (``rephrase``), and one neighbourhood prompt per token
  of ``" " + loc_ans`` under the model's tokenizer (``loc + "?" + decode(tokens[:i])`` →
  ``decode(tokens[i])``), which is why :func:`load_zsre` needs the tokenizer.
- **MQuAKE** (``MQuAKE-CF-3k*.json``): a list of ``{"case_id", "requested_rewrite": [{"prompt",
  "subject", "target_true", "target_new", ...}], "questions": [str], "answer", "new_answer", ...}``;
  every requested rewrite is a fact to forget, and the multi-hop ``questions`` (answer ``answer``)
  measure whether the forgotten facts still compose.

:func:`load_dataset` detects the kind from the first record. ``.json`` (a list) and ``.jsonl``
(one record per line) are read.

The ``world_*`` functions write the synthetic world's facts in these schemas (the test fixtures and
the small-model table in ``benchmarks/RESULTS.md``; ``tests/fixtures/make_dataset_fixtures.py``).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ZuFastError

__all__ = [
    "KINDS",
    "EvalDataset",
    "detect_kind",
    "load_counterfact",
    "load_dataset",
    "load_mquake",
    "load_zsre",
    "read_json_records",
    "world_attribute_snippets",
    "world_counterfact",
    "world_mquake",
    "world_zsre",
]

KINDS = ("mcf", "zsre", "mquake")
ZSRE_NEUTRAL = "<|endoftext|>"  # the reference's dsets/zsre.py sets target_new to this string


@dataclass
class EvalDataset:
    """Records of one dataset file in the reference's evaluation shape.

    ``kind`` is ``"mcf"`` (CounterFact and MultiCounterFact), ``"zsre"`` or ``"mquake"``;
    ``records`` are dicts with ``case_id``, ``requested_rewrite`` (a dict, or a list for MQuAKE),
    ``paraphrase_prompts``, ``neighborhood_prompts``, ``attribute_prompts``,
    ``generation_prompts`` (and ``answer``/``new_answer`` for MQuAKE).
    """

    kind: str
    path: Path
    records: list[dict[str, Any]] = field(repr=False)

    def __len__(self) -> int:
        return len(self.records)

    def sample(self, n: int, seed: int) -> list[dict[str, Any]]:
        """The reference's forget records: ``n`` drawn with ``random.sample`` (seeded) from the
        second half of the file (``experiments/evaluate.py``: the first half is the retain split).

        Raises ZuFastError when the second half holds fewer than ``n`` records.
        """
        forget = self.records[len(self.records) // 2:]
        if not 0 < n <= len(forget):
            raise ZuFastError(f"{self.path}: asked for {n} forget records, the second half of the file (the "
                              f"reference's forget split) holds {len(forget)}")
        return random.Random(seed).sample(forget, n)

    def requests(self, records: Sequence[Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
        """zu_fast forget requests (``prompt``, ``subject``, ``target_true``, ``case_id``) of
        ``records`` (default: all), one per requested rewrite, as the reference flattens them."""
        out = []
        for rec in self.records if records is None else records:
            rr = rec["requested_rewrite"]
            for r in rr if isinstance(rr, list) else [rr]:
                out.append({"case_id": rec["case_id"], "prompt": r["prompt"], "subject": r["subject"],
                            "target_true": _target(r["target_true"])})
        return out

    def with_neutral(self, neutral: str) -> EvalDataset:
        """A copy whose ``target_new`` (the string ES/PS/NS compare against) is ``neutral``."""
        recs = []
        for rec in self.records:
            rec = json.loads(json.dumps(rec))  # deep copy of plain JSON data
            rr = rec["requested_rewrite"]
            for r in rr if isinstance(rr, list) else [rr]:
                r["target_new"] = {**(r.get("target_new") or {}), "str": neutral}
            if "new_answer" in rec:
                rec["new_answer"] = neutral
            recs.append(rec)
        return EvalDataset(self.kind, self.path, recs)


# --------------------------------------------------------------------------- reading ------


def read_json_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``.json`` file (a list) or a ``.jsonl`` file (one object per line)."""
    path = Path(path)
    if not path.exists():
        raise ZuFastError(f"{path}: no such dataset file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ZuFastError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise ZuFastError(f"{path}: expected a list of records, got {type(data).__name__}")
    if not data:
        raise ZuFastError(f"{path}: the file holds no records")
    return data


def detect_kind(record: Mapping[str, Any]) -> str:
    """``"mquake"``, ``"mcf"`` or ``"zsre"`` from one record's keys; ZuFastError if none fits."""
    if isinstance(record, Mapping):
        if "requested_rewrite" in record and "questions" in record:
            return "mquake"
        if "requested_rewrite" in record:
            return "mcf"
        if "src" in record and "loc" in record:
            return "zsre"
    keys = sorted(record) if isinstance(record, Mapping) else type(record).__name__
    raise ZuFastError(f"cannot tell the dataset kind from a record with keys {keys}: expected CounterFact "
                      "('requested_rewrite'), ZsRE ('src', 'loc') or MQuAKE ('requested_rewrite', 'questions')")


def load_dataset(path: str | os.PathLike, kind: str | None = None, tok: Any = None) -> EvalDataset:
    """Load a CounterFact/MCF, ZsRE or MQuAKE file (``kind`` detected from the first record when
    None). ZsRE needs the model's tokenizer ``tok`` (its neighbourhood prompts are per token)."""
    path = Path(path)
    raw = read_json_records(path)
    if kind is None:
        try:
            kind = detect_kind(raw[0])
        except ZuFastError as e:
            raise ZuFastError(f"{path}: record 0: {e}") from None
    kind = {"cf": "mcf", "counterfact": "mcf", "multi_counterfact": "mcf"}.get(kind, kind)
    if kind == "mcf":
        return EvalDataset("mcf", path, [_counterfact_record(path, i, r) for i, r in enumerate(raw)])
    if kind == "zsre":
        if tok is None:
            raise ZuFastError(f"{path}: a ZsRE file needs the model's tokenizer (tok=...)")
        return EvalDataset("zsre", path, [_zsre_record(path, i, r, tok) for i, r in enumerate(raw)])
    if kind == "mquake":
        return EvalDataset("mquake", path, [_mquake_record(path, i, r) for i, r in enumerate(raw)])
    raise ZuFastError(f"{path}: unknown dataset kind {kind!r}; choose one of {list(KINDS)}")


def load_counterfact(path: str | os.PathLike) -> EvalDataset:
    """A CounterFact or MultiCounterFact file."""
    return load_dataset(path, "mcf")


def load_zsre(path: str | os.PathLike, tok: Any) -> EvalDataset:
    """A ZsRE file (``zsre_mend_eval.json`` schema), turned into records as the reference's dsets/zsre.py."""
    return load_dataset(path, "zsre", tok)


def load_mquake(path: str | os.PathLike) -> EvalDataset:
    """An MQuAKE file (``MQuAKE-CF-3k*.json`` schema)."""
    return load_dataset(path, "mquake")


# --------------------------------------------------------------------------- schemas ------


def _bad(path: Path, i: int, msg: str) -> ZuFastError:
    return ZuFastError(f"{path}: record {i}: {msg}")


def _target(t: Any) -> str:
    return t["str"] if isinstance(t, Mapping) else t


def _str_list(path: Path, i: int, rec: Mapping, key: str, required: bool = False) -> list[str]:
    if key not in rec:
        if required:
            raise _bad(path, i, f"missing key {key!r} (have {sorted(rec)})")
        return []
    v = rec[key]
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise _bad(path, i, f"{key!r} must be a list of strings, got {v!r:.80}")
    return list(v)


def _rewrite(path: Path, i: int, rr: Any, where: str = "requested_rewrite") -> dict[str, Any]:
    if not isinstance(rr, Mapping):
        raise _bad(path, i, f"{where} must be an object, got {type(rr).__name__}")
    missing = [k for k in ("prompt", "subject", "target_true") if k not in rr]
    if missing:
        raise _bad(path, i, f"{where} misses {missing} (have {sorted(rr)})")
    prompt, subject = rr["prompt"], rr["subject"]
    if not isinstance(prompt, str) or prompt.count("{}") != 1:
        raise _bad(path, i, f"{where}.prompt must be a string with exactly one '{{}}' for the subject, "
                            f"got {prompt!r}")
    if not isinstance(subject, str) or not subject.strip():
        raise _bad(path, i, f"{where}.subject must be a non-empty string, got {subject!r}")
    out = dict(rr)
    for key in ("target_true", "target_new"):
        if key not in rr:
            continue
        t = rr[key]
        if isinstance(t, str):
            t = {"str": t}
        if not isinstance(t, Mapping) or not isinstance(t.get("str"), str) or not t["str"].strip():
            raise _bad(path, i, f"{where}.{key} must be a non-empty string or {{'str': ...}}, got {t!r}")
        out[key] = dict(t)
    return out


def _case_id(rec: Mapping, i: int) -> Any:
    return rec.get("case_id", i)


def _counterfact_record(path: Path, i: int, rec: Any) -> dict[str, Any]:
    if not isinstance(rec, Mapping):
        raise _bad(path, i, f"expected an object, got {type(rec).__name__}")
    if "requested_rewrite" not in rec:
        raise _bad(path, i, f"missing key 'requested_rewrite' (have {sorted(rec)})")
    rr = rec["requested_rewrite"]
    rewrites = [_rewrite(path, i, r, f"requested_rewrite[{j}]") for j, r in enumerate(rr)] \
        if isinstance(rr, list) else _rewrite(path, i, rr)
    if isinstance(rewrites, list) and not rewrites:
        raise _bad(path, i, "requested_rewrite is an empty list")
    # The reference's CounterFact evaluation reads a single rewrite; multi-rewrite records are
    # unlearned rewrite by rewrite and evaluated on the first (as MultiCounterFact ships them: one).
    neigh = rec.get("neighborhood_prompts", [])
    if not isinstance(neigh, list) or not all(isinstance(x, str) for x in neigh):
        raise _bad(path, i, "CounterFact 'neighborhood_prompts' must be a list of strings (other subjects "
                            "sharing the true object)")
    return {
        "case_id": _case_id(rec, i),
        "requested_rewrite": rewrites,
        "paraphrase_prompts": _str_list(path, i, rec, "paraphrase_prompts"),
        "neighborhood_prompts": list(neigh),
        "attribute_prompts": _str_list(path, i, rec, "attribute_prompts"),
        "generation_prompts": _str_list(path, i, rec, "generation_prompts"),
    }


def _zsre_record(path: Path, i: int, rec: Any, tok: Any) -> dict[str, Any]:
    if not isinstance(rec, Mapping):
        raise _bad(path, i, f"expected an object, got {type(rec).__name__}")
    missing = [k for k in ("subject", "src", "answers", "rephrase", "loc", "loc_ans") if k not in rec]
    if missing:
        raise _bad(path, i, f"ZsRE record misses {missing} (have {sorted(rec)})")
    for k in ("subject", "src", "rephrase", "loc", "loc_ans"):
        if not isinstance(rec[k], str):
            raise _bad(path, i, f"{k!r} must be a string, got {rec[k]!r:.80}")
    answers = rec["answers"]
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise _bad(path, i, f"'answers' must be a non-empty list of strings, got {answers!r:.80}")
    if rec["subject"] not in rec["src"] or not rec["subject"].strip():
        raise _bad(path, i, f"subject {rec['subject']!r} does not occur in src {rec['src']!r}")
    if "nq question: " not in rec["loc"]:  # the reference asserts this too
        raise _bad(path, i, f"'loc' must contain 'nq question: ' (ZsRE's neighbourhood question), got {rec['loc']!r}")
    if "{" in rec["src"] or "}" in rec["src"]:
        raise _bad(path, i, "src contains a brace; the prompt template would be ambiguous")
    # As dsets/zsre.py: one neighbourhood prompt per token of " " + loc_ans under this tokenizer
    # (special tokens included, exactly as the reference decodes them).
    ans_toks = tok(" " + rec["loc_ans"])["input_ids"]
    return {
        "case_id": _case_id(rec, i),
        "requested_rewrite": {
            "prompt": rec["src"].replace(rec["subject"], "{}"),
            "subject": rec["subject"],
            "target_new": {"str": ZSRE_NEUTRAL},
            "target_true": {"str": answers[0]},
        },
        "paraphrase_prompts": [rec["rephrase"]],
        "neighborhood_prompts": [
            {"prompt": rec["loc"] + "?" + tok.decode(ans_toks[:j]), "target": tok.decode(ans_toks[j])}
            for j in range(len(ans_toks))
        ],
        "attribute_prompts": [],
        "generation_prompts": [],
    }


def _mquake_record(path: Path, i: int, rec: Any) -> dict[str, Any]:
    if not isinstance(rec, Mapping):
        raise _bad(path, i, f"expected an object, got {type(rec).__name__}")
    missing = [k for k in ("requested_rewrite", "questions", "answer") if k not in rec]
    if missing:
        raise _bad(path, i, f"MQuAKE record misses {missing} (have {sorted(rec)})")
    rr = rec["requested_rewrite"]
    if not isinstance(rr, list) or not rr:
        raise _bad(path, i, "MQuAKE 'requested_rewrite' must be a non-empty list of rewrites")
    if not isinstance(rec["answer"], str) or not rec["answer"].strip():
        raise _bad(path, i, f"'answer' must be a non-empty string, got {rec['answer']!r}")
    questions = _str_list(path, i, rec, "questions", required=True)
    if not questions:
        raise _bad(path, i, "'questions' is empty")
    return {
        "case_id": _case_id(rec, i),
        "requested_rewrite": [_rewrite(path, i, r, f"requested_rewrite[{j}]") for j, r in enumerate(rr)],
        "paraphrase_prompts": questions,  # as the reference's dsets/mquake.py
        "answer": rec["answer"],
        "new_answer": rec.get("new_answer", ""),
        "neighborhood_prompts": [],
        "attribute_prompts": [],
        "generation_prompts": [],
    }


# --------------------------------------------------------------------------- the synthetic world ------


def _world_facts(world: Any, seed: int) -> list[tuple[int, str]]:
    """(person, relation) per person in a seeded order; the relation drawn per person."""
    rng = random.Random(f"datasets-{world.config.seed}-{seed}")
    people = list(range(len(world.people)))
    rng.shuffle(people)
    return [(p, rng.choice(list(world.relations))) for p in people]


def _retain_neighbours(world: Any, facts: list[tuple[int, str]], n: int, k: int, rel: str, p: int,
                       rng: random.Random) -> list[int]:
    """Up to k people whose ``rel`` fact equals p's, none of them the subject of a record in the
    second half of the first ``n`` (the reference's forget split): neighbours are never forgotten."""
    forget = {q for q, _ in facts[n // 2 : n]}
    pool = [q for q, _ in facts if q != p and q not in forget and world.facts[q][rel] == world.facts[p][rel]]
    rng.shuffle(pool)
    return pool[:k]


def _filled(world: Any, rel: str, template: int, person: int) -> str:
    from .synthetic import RELATIONS

    return RELATIONS[rel]["templates"][template].format(world.people[person])


def world_counterfact(world: Any, *, n: int | None = None, seed: int = 0, neutral: str = "</s>",
                      n_neighbours: int = 10) -> list[dict[str, Any]]:
    """The world's facts as MultiCounterFact records (one per person, ``n`` first in a seeded order).

    The edit prompt is a trained template; ``paraphrase_prompts`` the fact's held-out templates;
    ``neighborhood_prompts`` people with the same object (as CounterFact picks them) who are not
    subjects of the file's second half (the reference's forget split), so never forgotten;
    ``generation_prompts`` two trained phrasings;
    ``target_new`` the neutral target string.
    """
    from .synthetic import RELATIONS

    rng = random.Random(f"counterfact-{world.config.seed}-{seed}")
    facts = _world_facts(world, seed)
    out = []
    for i, (p, rel) in enumerate(facts[:n] if n else facts):
        trained = list(world.train_templates[p][rel])
        t = rng.choice(trained)
        obj = world.facts[p][rel]
        out.append({
            "case_id": i,
            "requested_rewrite": {
                "prompt": RELATIONS[rel]["templates"][t], "subject": world.people[p], "relation_id": rel,
                "target_true": {"str": obj, "id": obj}, "target_new": {"str": neutral},
            },
            "paraphrase_prompts": [_filled(world, rel, h, p) for h in world.heldout_templates[p][rel]],
            "neighborhood_prompts": [
                _filled(world, rel, rng.choice(world.train_templates[q][rel]), q)
                for q in _retain_neighbours(world, facts, n or len(facts), n_neighbours, rel, p, rng)],
            "attribute_prompts": [],
            "generation_prompts": [_filled(world, rel, g, p) for g in trained if g != t][:2],
        })
    return out


def world_zsre(world: Any, *, n: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """The world's facts as ZsRE rows: ``src`` a trained phrasing (a cloze: the small model knows no
    questions), ``rephrase`` a held-out one, ``loc`` a fact of a person outside the forget split behind
    ``"nq question: "`` (the reference requires the prefix)."""
    rng = random.Random(f"zsre-{world.config.seed}-{seed}")
    facts = _world_facts(world, seed)
    forget = {q for q, _ in facts[(n or len(facts)) // 2 : n or len(facts)]}
    retain = [q for q, _ in facts if q not in forget]
    out = []
    for p, rel in facts[:n] if n else facts:
        q = rng.choice([x for x in retain if x != p])
        qrel = rng.choice(list(world.relations))
        out.append({
            "subject": world.people[p],
            "src": _filled(world, rel, rng.choice(world.train_templates[p][rel]), p),
            "pred": world.facts[p][rel],
            "rephrase": _filled(world, rel, world.heldout_templates[p][rel][0], p),
            "alt": "",
            "answers": [world.facts[p][rel]],
            "loc": "nq question: " + _filled(world, qrel, rng.choice(world.train_templates[q][qrel]), q),
            "loc_ans": world.facts[q][qrel],
            "cond": "",
        })
    return out


def world_mquake(world: Any, *, n: int | None = None, seed: int = 0, neutral: str = "</s>",
                 hops: int = 2) -> list[dict[str, Any]]:
    """The world's facts as MQuAKE records: ``hops`` facts of one person per record (the
    requested rewrites), and ``questions`` about the first fact in held-out phrasings.

    The default world has no compositional relations, so its "multi-hop" questions are held-out
    single-hop phrasings: the fixture exercises the schema and the metric, not composition.
    """
    from .synthetic import RELATIONS

    rng = random.Random(f"mquake-{world.config.seed}-{seed}")
    facts = _world_facts(world, seed)
    out = []
    for i, (p, rel) in enumerate(facts[:n] if n else facts):
        rels = [rel] + rng.sample([r for r in world.relations if r != rel], hops - 1)
        rewrites = []
        for r in rels:
            t = rng.choice(world.train_templates[p][r])
            rewrites.append({"prompt": RELATIONS[r]["templates"][t], "subject": world.people[p],
                             "target_true": {"str": world.facts[p][r], "id": world.facts[p][r]},
                             "target_new": {"str": neutral}, "question": _filled(world, r, t, p)})
        held = [_filled(world, rel, h, p) for h in world.heldout_templates[p][rel]]
        out.append({
            "case_id": i,
            "requested_rewrite": rewrites,
            "questions": held + [_filled(world, rel, world.train_templates[p][rel][0], p)],
            "answer": world.facts[p][rel],
            "answer_alias": [],
            "new_answer": neutral,
            "new_answer_alias": [],
            "single_hops": [{"question": r["question"], "cloze": r["question"], "answer": r["target_true"]["str"]}
                            for r in rewrites],
        })
    return out


def world_attribute_snippets(world: Any) -> list[dict[str, Any]]:
    """The world's facts in the reference's ``attribute_snippets.json`` schema: per (relation,
    object), the sentences stating that fact about every person who has it (consistency texts)."""
    groups: dict[tuple[str, str], list[dict[str, str]]] = {}
    for p, name in enumerate(world.people):
        for rel in world.relations:
            t = world.train_templates[p][rel][0]
            groups.setdefault((rel, world.facts[p][rel]), []).append(
                {"name": name, "text": world.fact_text(p, rel, t)})
    return [{"relation_id": rel, "target_id": obj, "samples": samples}
            for (rel, obj), samples in sorted(groups.items())]
