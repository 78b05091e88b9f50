"""What a synthetic world gives the offline benchmark: the interface the trainer, metrics, harness and probes use.

Two worlds implement it: the people world (:mod:`zu_fast.eval.synthetic`, where every default was
chosen) and the species world (:mod:`zu_fast.eval.species`, for checking only). The names are the
people world's (``people`` = the known entities, whatever their kind).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class FactWorld(Protocol):
    """A deterministic world of entities, their facts, and the texts a small LM trains on.

    ``facts[i][relation]`` is entity i's answer; ``train_templates[i][relation]`` and
    ``heldout_templates[i][relation]`` index :meth:`templates` (held-out phrasings are never trained
    with their subject). ``config`` has ``to_dict()`` (cache keys), ``seed``, ``n_neighbors`` and
    ``compose`` (whether :meth:`two_hop_pairs` can be non-empty).
    """

    config: Any
    facts: list[dict[str, str]]
    train_templates: list[dict[str, list[int]]]
    heldout_templates: list[dict[str, list[int]]]
    strangers: list[str]

    @property
    def people(self) -> list[str]:
        """Names of the known entities (subjects of facts)."""

    @property
    def relations(self) -> tuple[str, ...]:
        """The relations every entity has a fact for."""

    def templates(self, relation: str) -> list[str]:
        """The relation's phrasings, each with one ``{}`` for the subject; the answer follows the end."""

    def objects(self, relation: str) -> list[str]:
        """Every answer the relation can have."""

    def fact_text(self, entity: int, relation: str, template: int) -> str:
        """The sentence stating the fact in the given phrasing."""

    def training_texts(self) -> list[str]:
        """Everything the small LM trains on (facts in trained phrasings, fragments, filler, ...)."""

    def fragments(self) -> list[str]:
        """Documents about unknown entities cut off after the relation phrase; a trainer ends them with EOS."""

    def heldout_texts(self) -> list[str]:
        """Generic text never trained on, stating no fact (for perplexity)."""

    def records(self, n: int, seed: int = 0) -> list[dict]:
        """n CounterFact-shaped forget records (``case_id``, ``prompt``, ``subject``, ``target_true``,
        ``relation``, ``paraphrase_prompts``, ``neighborhood_prompts``) about n distinct entities."""

    def two_hop_pairs(self, record: dict) -> list[tuple[str, str]]:
        """Held-out two-hop ``(prompt, answer)`` questions through the record's fact (may be empty)."""

    def two_hop_base_rate(self, record: dict) -> float:
        """Chance rate of the record's two-hop answer (NaN without one)."""


def assign_facts(rng: random.Random, n_entities: int, relations: Sequence[str], table: Mapping[str, dict],
                 n_heldout: int) -> tuple[list[dict[str, str]], list[dict[str, list[int]]], list[dict[str, list[int]]]]:
    """Each entity's answer per relation (drawn from ``table[relation]["objects"]``) and which of the relation's
    templates it is trained with and held out with (the first ``n_heldout`` of a shuffle are held out): facts,
    trained template indices, held-out template indices, one dict per entity."""
    facts, train_t, held_t = [], [], []
    for _ in range(n_entities):
        f, tr, he = {}, {}, {}
        for rel in relations:
            f[rel] = rng.choice(table[rel]["objects"])
            idx = list(range(len(table[rel]["templates"])))
            rng.shuffle(idx)
            he[rel] = sorted(idx[:n_heldout])
            tr[rel] = sorted(idx[n_heldout:])
        facts.append(f)
        train_t.append(tr)
        held_t.append(he)
    return facts, train_t, held_t


def forget_records(world: FactWorld, n: int, rng: random.Random, noun: str) -> list[dict]:
    """n CounterFact-shaped forget records about n distinct entities of ``world`` (:meth:`FactWorld.records`).

    ``prompt`` is one of the fact's trained templates; ``paraphrase_prompts`` its held-out templates filled with
    the subject; ``neighborhood_prompts`` the same relation about other entities (preferably with the same answer,
    as in CounterFact), never about one forgotten in the same call, in phrasings those entities were trained with.
    ``case_id`` = entity · n_relations + relation index, stable across calls. ``noun`` names the entities in the
    error message."""
    names = world.people
    n_known = len(names)
    if not 0 < n <= n_known // 2:
        raise ValueError(f"n must be in [1, {n_known // 2}] for a world of {n_known} {noun}, got {n}")
    subjects = rng.sample(range(n_known), n)
    forgotten = set(subjects)
    out = []
    for s in subjects:
        ri = rng.randrange(len(world.relations))
        rel = world.relations[ri]
        templates = world.templates(rel)
        obj = world.facts[s][rel]
        same = [q for q in range(n_known) if q not in forgotten and world.facts[q][rel] == obj]
        other = [q for q in range(n_known) if q not in forgotten and world.facts[q][rel] != obj]
        rng.shuffle(same)
        rng.shuffle(other)
        neigh = (same + other)[: world.config.n_neighbors]
        out.append({
            "case_id": s * len(world.relations) + ri,
            "prompt": templates[rng.choice(world.train_templates[s][rel])],
            "subject": names[s],
            "target_true": {"str": obj},
            "relation": rel,
            "paraphrase_prompts": [templates[t].format(names[s]) for t in world.heldout_templates[s][rel]],
            "neighborhood_prompts": [
                {"prompt": templates[rng.choice(world.train_templates[q][rel])].format(names[q]),
                 "target": world.facts[q][rel]}
                for q in neigh
            ],
        })
    return out
