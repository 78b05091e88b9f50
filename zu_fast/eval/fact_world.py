"""What a synthetic world gives the offline benchmark: the interface the trainer, metrics, harness and probes use.

Two worlds implement it: the people world (:mod:`zu_fast.eval.synthetic`, where every default was
chosen) and the species world (:mod:`zu_fast.eval.species`, for checking only). The names are the
people world's (``people`` = the known entities, whatever their kind).
"""

from __future__ import annotations

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
