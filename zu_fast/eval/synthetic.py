"""A deterministic world of fictitious people and their attributes (the offline benchmark's data).

No model or data set can be downloaded here, so zu_fast builds its own test subject: a small
"encyclopaedia" of made-up people (names generated from syllables) with attributes drawn from
fixed lists of plausible values (birth city, employer, instrument, sport, language). Each relation
has eight phrasings ("templates"). For every fact, a few templates are *held out* of training: the
model has learnt those phrasings from other people but never saw this subject with them, so
recall on them (the records' ``paraphrase_prompts``) is real paraphrase generalisation.

Besides the facts, a small sentence grammar produces generic "filler" text. Training includes a
sample of it; :meth:`World.heldout_texts` draws *other* sentences from the same grammar (never
seen in training) so that perplexity measures damage to the model's general language ability,
not to the facts being forgotten.

The world also names "strangers": people it says nothing about, who appear only in documents cut
off where the answer would be. They teach the model that an unknown subject is followed by the end
of the document (EOS), i.e. a "do I know this entity?" feature like the one large LLMs carry at the
subject's last token. ZeroUnlearn's neutral target (EOS) is then reachable from the subject.

Everything is a pure function of :class:`WorldConfig` (no global random state).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from .fact_world import assign_facts, forget_records

# ----------------------------------------------------------------------------------------------
# Relations: templates (the answer always follows the template's end) and plausible objects.
# Objects are single words so that a small BPE tokenizer makes them one token (" Lisbon").
# ----------------------------------------------------------------------------------------------

RELATIONS: dict[str, dict[str, list[str]]] = {
    "birth_city": {
        "templates": [
            "{} was born in",
            "{}'s birthplace is",
            "The city where {} was born is",
            "{} is originally from the city of",
            "The birthplace of {} is",
            "{} came into the world in",
            "According to records, {} is a native of",
            "{}'s hometown is",
        ],
        "objects": [
            "Lisbon", "Oslo", "Cairo", "Madrid", "Vienna", "Dublin", "Prague", "Warsaw",
            "Athens", "Berlin", "Paris", "Rome", "Tokyo", "Lima", "Nairobi", "Toronto",
            "Helsinki", "Budapest", "Seoul", "Sydney",
        ],
    },
    "employer": {
        "templates": [
            "{} works for",
            "{} is employed by",
            "The employer of {} is",
            "{}'s employer is",
            "{} has a job at",
            "The company that employs {} is",
            "{} draws a salary from",
            "Every morning, {} goes to work at",
        ],
        "objects": [
            "Nokia", "Siemens", "Toyota", "Philips", "Boeing", "Intel", "Nestle", "Shell",
            "Google", "Samsung", "Microsoft", "Sony", "Airbus", "Ikea", "Oracle", "Adobe",
            "Lego", "Pfizer", "Heineken", "Spotify",
        ],
    },
    "instrument": {
        "templates": [
            "{} plays the",
            "The instrument played by {} is the",
            "{}'s instrument is the",
            "{} is a musician who plays the",
            "On stage, {} performs on the",
            "{} practises every day on the",
            "The musical instrument of {} is the",
            "{} is known for playing the",
        ],
        "objects": [
            "piano", "violin", "cello", "guitar", "flute", "trumpet", "harp", "drums",
            "clarinet", "oboe", "saxophone", "banjo", "accordion", "trombone", "viola", "organ",
        ],
    },
    "sport": {
        "templates": [
            "{}'s favourite sport is",
            "The sport that {} plays is",
            "{} competes in",
            "{} is a professional athlete in",
            "In free time, {} plays",
            "The sport played by {} is",
            "{} trains every week for",
            "{} is a champion of",
        ],
        "objects": [
            "tennis", "football", "basketball", "golf", "rugby", "cricket", "hockey", "baseball",
            "volleyball", "badminton", "boxing", "cycling", "rowing", "swimming", "skiing", "fencing",
        ],
    },
    "language": {
        "templates": [
            "{} speaks",
            "The native language of {} is",
            "{}'s mother tongue is",
            "{} grew up speaking",
            "The language spoken by {} is",
            "{} writes letters in",
            "{} is fluent in",
            "At home, {} talks in",
        ],
        "objects": [
            "French", "German", "Spanish", "Italian", "Dutch", "Polish", "Greek", "Swedish",
            "Finnish", "Danish", "Turkish", "Arabic", "Japanese", "Korean", "Hindi", "Russian",
        ],
    },
}

# ----------------------------------------------------------------------------------------------
# Composition (two-hop questions; ``WorldConfig.compose``, off by default). A second hop maps the
# OBJECT of four relations to an attribute of that object (a city's country, a company's home
# country, an instrument's family, a language's country). The world then also states these
# object facts, and two-hop sentences ("The country where X was born is Portugal.") for a subset
# of people, so a model learns to compose; the other people's two-hop questions are never trained
# and can only be answered by composing their (one-hop) fact with the object fact. Answering one
# after the one-hop fact was forgotten means the fact is still in the model.
# Two-hop templates never contain a one-hop template (no held-out paraphrase enters training).
# ----------------------------------------------------------------------------------------------

COMPOSITIONS: dict[str, dict] = {
    "birth_city": {
        "name": "birth_country",
        "object_templates": ["{} is a city in", "The city of {} lies in", "{} is located in the country of"],
        "two_hop_templates": ["The country where {} was born is", "{}'s country of birth is",
                              "The country of birth of {} is", "By birth, {} is a citizen of"],
        "map": {"Lisbon": "Portugal", "Oslo": "Norway", "Cairo": "Egypt", "Madrid": "Spain", "Vienna": "Austria",
                "Dublin": "Ireland", "Prague": "Czechia", "Warsaw": "Poland", "Athens": "Greece",
                "Berlin": "Germany", "Paris": "France", "Rome": "Italy", "Tokyo": "Japan", "Lima": "Peru",
                "Nairobi": "Kenya", "Toronto": "Canada", "Helsinki": "Finland", "Budapest": "Hungary",
                "Seoul": "Korea", "Sydney": "Australia"},
    },
    "employer": {
        "name": "employer_country",
        "object_templates": ["{} is a company from", "{} has its headquarters in", "The company {} is based in"],
        "two_hop_templates": ["The employer of {} has its headquarters in", "{}'s employer has its headquarters in",
                              "The company employing {} is based in", "{} works at a company from"],
        "map": {"Nokia": "Finland", "Siemens": "Germany", "Toyota": "Japan", "Philips": "Netherlands",
                "Boeing": "America", "Intel": "America", "Nestle": "Switzerland", "Shell": "Britain",
                "Google": "America", "Samsung": "Korea", "Microsoft": "America", "Sony": "Japan",
                "Airbus": "France", "Ikea": "Sweden", "Oracle": "America", "Adobe": "America", "Lego": "Denmark",
                "Pfizer": "America", "Heineken": "Netherlands", "Spotify": "Sweden"},
    },
    "instrument": {
        "name": "instrument_family",
        "object_templates": ["The {} belongs to the family of", "The {} is counted among the"],
        "two_hop_templates": ["The instrument of {} belongs to the family of",
                              "{}'s instrument belongs to the family of",
                              "The instrument played by {} belongs to the family of",
                              "{} plays an instrument from the family of"],
        "map": {"piano": "keyboards", "violin": "strings", "cello": "strings", "guitar": "strings",
                "flute": "woodwinds", "trumpet": "brass", "harp": "strings", "drums": "percussion",
                "clarinet": "woodwinds", "oboe": "woodwinds", "saxophone": "woodwinds", "banjo": "strings",
                "accordion": "keyboards", "trombone": "brass", "viola": "strings", "organ": "keyboards"},
    },
    "language": {
        "name": "language_country",
        "object_templates": ["{} is the official language of", "{} is mainly spoken in"],
        "two_hop_templates": ["The language of {} is mainly spoken in", "{}'s native language is mainly spoken in",
                              "The mother tongue of {} is the official language of",
                              "{} talks in the official language of"],
        "map": {"French": "France", "German": "Germany", "Spanish": "Spain", "Italian": "Italy",
                "Dutch": "Netherlands", "Polish": "Poland", "Greek": "Greece", "Swedish": "Sweden",
                "Finnish": "Finland", "Danish": "Denmark", "Turkish": "Turkey", "Arabic": "Egypt",
                "Japanese": "Japan", "Korean": "Korea", "Hindi": "India", "Russian": "Russia"},
    },
}

# Name syllables: onset + vowel (+ coda). Chosen to be pronounceable and not to spell template
# or object words.
_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "h", "j",
           "br", "dr", "kr", "tr", "st", "sh", "gr"]
_VOWELS = ["a", "e", "i", "o", "u", "a", "e", "o", "ai", "ou"]
_CODAS = ["", "", "", "", "", "n", "r", "l", "s", "m"]

# Generic-text grammar (filler). Combinatorially large so held-out sentences are new.
_ADJ = ["old", "small", "quiet", "busy", "bright", "narrow", "famous", "new", "large", "empty",
        "cold", "crowded", "modern", "tiny", "lovely", "noisy"]
_NOUN = ["market", "bridge", "library", "garden", "station", "museum", "harbour", "theatre",
         "bakery", "school", "square", "park", "cafe", "tower", "hotel", "gallery"]
_VERB = ["closed", "opened", "was painted", "was repaired", "was sold", "was rebuilt",
         "was cleaned", "grew", "was moved", "was visited"]
_TIME = ["last year", "in spring", "on Monday", "every summer", "in the winter", "at dawn",
         "after the storm", "in the autumn", "on Sunday", "before the festival"]
_ACTIVITY = ["read books", "walk slowly", "drink tea", "sing songs", "cook dinner",
             "paint pictures", "ride bicycles", "tell stories", "plant trees", "watch films"]
_CROWD = ["Many people", "Some children", "Most students", "A few tourists", "Old friends",
          "Young artists", "Local families", "Several workers"]
_PLACE_PREP = ["near the", "behind the", "inside the", "next to the", "across the"]


def _filler_patterns(rng: random.Random, people: list[str]) -> str:
    """One generic sentence from the grammar (uses objects and people, never states a fact)."""
    city = rng.choice(RELATIONS["birth_city"]["objects"])
    k = rng.randrange(7)
    if k == 0:
        return f"The {rng.choice(_ADJ)} {rng.choice(_NOUN)} in {city} {rng.choice(_VERB)} {rng.choice(_TIME)}."
    if k == 1:
        crowd, act = rng.choice(_CROWD), rng.choice(_ACTIVITY)
        return f"{crowd} {act} {rng.choice(_PLACE_PREP)} {rng.choice(_NOUN)} {rng.choice(_TIME)}."
    if k == 2:
        comp = rng.choice(RELATIONS["employer"]["objects"])
        return f"{comp} opened a {rng.choice(_ADJ)} {rng.choice(_NOUN)} in {city} {rng.choice(_TIME)}."
    if k == 3:
        sport = rng.choice(RELATIONS["sport"]["objects"])
        return f"{rng.choice(_CROWD)} in {city} enjoy {sport} {rng.choice(_TIME)}."
    if k == 4:
        inst = rng.choice(RELATIONS["instrument"]["objects"])
        return f"The sound of the {inst} filled the {rng.choice(_ADJ)} {rng.choice(_NOUN)} {rng.choice(_TIME)}."
    if k == 5:
        # Mentions a person without stating an attribute: keeps names part of "general" text so
        # that PPL also notices a damaged subject representation.
        person = rng.choice(people)
        return f"{person} met a friend {rng.choice(_PLACE_PREP)} {rng.choice(_NOUN)} {rng.choice(_TIME)}."
    lang = rng.choice(RELATIONS["language"]["objects"])
    return f"{rng.choice(_CROWD)} learn {lang} to {rng.choice(_ACTIVITY)} {rng.choice(_TIME)}."


@dataclass
class WorldConfig:
    """Parameters of the synthetic world. Everything the world contains is a function of these."""

    seed: int = 0
    n_people: int = 120
    relations: tuple[str, ...] = tuple(RELATIONS)
    # Templates per fact held out of training (used as paraphrase prompts); the rest are trained.
    n_heldout_templates: int = 2
    n_filler_train: int = 600
    n_filler_heldout: int = 300
    n_neighbors: int = 10
    # "Index entries" per person: the name followed directly by all of its attributes, in a fresh
    # random order each time ("Bever Kuhoul Toronto piano French Nokia tennis."). The token right
    # after the subject then depends on the subject's facts, so the model must look them up AT the
    # subject's tokens (as in natural text, where what follows a name depends on who it is)
    # instead of only at the prediction position; without them the tiny model copies the name
    # forward and does the lookup at the last position, which no subject-locus edit can reach.
    # No relation template is involved, so held-out paraphrases stay unseen with their subject.
    # Off by default (2026-11-24): ×3 moved the lookup partly onto the subject at layers 0–2 but no
    # edit at the preset layers forgot more (see benchmarks/RESULTS.md); kept as an option.
    n_index_entries: int = 0
    # "Strangers": people the world names but says nothing about. Each appears in
    # ``n_stranger_fragments`` documents cut off right where the answer would be ("Xy Zz was born
    # in"); the trainer ends those documents with EOS (see ``World.fragments``). A model trained on
    # them must tell known from unknown subjects, the "do I know this entity?" feature that large
    # LLMs carry at the subject's last token, and EOS becomes a continuation the model produces for
    # an unknown subject (ZeroUnlearn's neutral target).
    # On by default (2026-11-24): without strangers the tiny model never predicts EOS after a
    # relation phrase and the neutral-target loss stalls at 11–14 nats (no subject-locus edit can
    # forget); with 60 it falls below 1 (benchmarks/RESULTS.md).
    n_strangers: int = 60
    n_stranger_fragments: int = 6
    # Composition (two-hop questions, see COMPOSITIONS): the world also states the object facts
    # (``compose_object_repeats`` times each, every object template) and, for a
    # ``compose_train_fraction`` of the people, two-hop sentences (2 of the 4 two-hop templates per
    # composed relation). The other people's two-hop questions are held out (``World.two_hop_pairs``).
    # Off by default: the default world's texts and facts, hence the cached small model, are unchanged.
    compose: bool = False
    compose_train_fraction: float = 0.5
    compose_object_repeats: int = 3

    def to_dict(self) -> dict:
        """A JSON-able dict (used in cache keys)."""
        d = asdict(self)
        d["relations"] = list(self.relations)
        if not d["n_index_entries"]:  # absent = 0: keys (and cached models) from before the option stay valid
            del d["n_index_entries"]
        if not d["n_strangers"]:  # same: worlds without strangers keep their old keys
            del d["n_strangers"], d["n_stranger_fragments"]
        if not d["compose"]:  # same: worlds without composition keep their old keys
            del d["compose"], d["compose_train_fraction"], d["compose_object_repeats"]
        return d


def _make_names(rng: random.Random, n: int, avoid: Sequence[str] = ()) -> list[str]:
    """n unique "First Last" names built from syllables (first 2 syllables, last 2-3), none of
    them in ``avoid`` and none reusing an ``avoid`` first name as a last name or vice versa."""

    def word(n_syl: int) -> str:
        s = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(n_syl))
        return s.capitalize()

    names: list[str] = []
    seen: set[str] = set()
    seen_words: set[tuple[str, str]] = set()

    def claim(name: str) -> None:
        first, last = name.split(" ")
        seen.add(name)
        seen_words.update({(first, "F"), (last, "L")})

    for name in avoid:
        claim(name)
    reserved = {w.lower() for r in RELATIONS.values() for t in r["templates"] for w in t.split()}
    reserved |= {o.lower() for r in RELATIONS.values() for o in r["objects"]}
    while len(names) < n:
        first, last = word(2), word(rng.choice((2, 3)))
        if first.lower() in reserved or last.lower() in reserved or first == last:
            continue
        # A first name must never be another person's last name (and vice versa), so that
        # "X Y" always parses the same way.
        if (first, "L") in seen_words or (last, "F") in seen_words:
            continue
        name = f"{first} {last}"
        if name in seen:
            continue
        claim(name)
        names.append(name)
    return names


@dataclass
class World:
    """People, their facts, and which templates each fact is trained with.

    ``facts[p][relation]`` is person p's object; ``train_templates[p][relation]`` and
    ``heldout_templates[p][relation]`` are template indices into ``RELATIONS[relation]``.
    """

    config: WorldConfig
    people: list[str]
    facts: list[dict[str, str]]
    train_templates: list[dict[str, list[int]]]
    heldout_templates: list[dict[str, list[int]]]
    _filler_train: list[str] = field(default_factory=list, repr=False)
    _filler_heldout: list[str] = field(default_factory=list, repr=False)
    _index_entries: list[str] = field(default_factory=list, repr=False)
    strangers: list[str] = field(default_factory=list)
    _fragments: list[str] = field(default_factory=list, repr=False)
    # Composition (``WorldConfig.compose``): people whose two-hop sentences are trained, and the
    # object facts + those two-hop sentences (appended to the training texts).
    two_hop_trained: frozenset[int] = frozenset()
    _compose_texts: list[str] = field(default_factory=list, repr=False)

    @property
    def relations(self) -> tuple[str, ...]:
        return self.config.relations

    def templates(self, relation: str) -> list[str]:
        """The relation's phrasings ("{} was born in"); template indices point into this list."""
        return RELATIONS[relation]["templates"]

    def objects(self, relation: str) -> list[str]:
        """Every answer the relation can have."""
        return RELATIONS[relation]["objects"]

    def fact_text(self, person: int, relation: str, template: int) -> str:
        """The sentence stating the fact with the given template, e.g. "A B was born in Lisbon."."""
        t = RELATIONS[relation]["templates"][template]
        return f"{t.format(self.people[person])} {self.facts[person][relation]}."

    def training_texts(self) -> list[str]:
        """Texts the small LM trains on: every fact with each of its trained templates, the index
        entries (name + all attributes in random order, see ``WorldConfig.n_index_entries``), the
        strangers' cut-off documents (:meth:`fragments`), filler, and with ``WorldConfig.compose``
        the object facts and trained two-hop sentences.

        Order is deterministic (facts person-major, then index entries, fragments, filler,
        composition texts); the trainer shuffles.
        """
        out = [
            self.fact_text(p, rel, t)
            for p in range(len(self.people))
            for rel in self.relations
            for t in self.train_templates[p][rel]
        ]
        return (out + list(self._index_entries) + list(self._fragments) + list(self._filler_train)
                + list(self._compose_texts))

    def fragments(self) -> list[str]:
        """The strangers' cut-off documents ("Xy Zz was born in"), a subset of ``training_texts()``.

        A trainer must end each of them with the EOS token: the document stops where a known
        person's answer would be.
        """
        return list(self._fragments)

    def heldout_texts(self) -> list[str]:
        """Held-out generic text for perplexity: grammar sentences never present in training.

        Deliberately contains no attribute statements, so forgetting a fact does not by itself
        raise PPL; what raises it is collateral damage to language and to the people's names.
        """
        return list(self._filler_heldout)

    # ------------------------------------------------------------------ composition ------

    def two_hop_answer(self, person: int, relation: str) -> str | None:
        """The second hop of ``person``'s ``relation`` fact (e.g. the country of their birth city),
        or None when the relation has no composition."""
        comp = COMPOSITIONS.get(relation)
        return None if comp is None else comp["map"][self.facts[person][relation]]

    def two_hop_pairs(self, record: dict) -> list[tuple[str, str]]:
        """Held-out two-hop questions about a record's fact: ``(prompt, answer)`` pairs.

        Empty unless the world composes (``WorldConfig.compose``), the record's relation has a
        composition, and the subject's two-hop sentences were held out of training (otherwise
        the model may have memorised the two-hop answer directly instead of composing).
        """
        rel = record.get("relation")
        if not self.config.compose or rel not in COMPOSITIONS or rel not in self.relations:
            return []
        p = self.people.index(record["subject"])
        if p in self.two_hop_trained:
            return []
        answer = self.two_hop_answer(p, rel)
        return [(t.format(record["subject"]), answer) for t in COMPOSITIONS[rel]["two_hop_templates"]]

    def two_hop_base_rate(self, record: dict) -> float:
        """Share of the people whose two-hop answer for the record's relation equals this record's
        (the recall of a model that guesses by the population's answer frequencies); NaN without one."""
        rel = record.get("relation")
        if rel not in COMPOSITIONS or rel not in self.relations:
            return float("nan")
        p = self.people.index(record["subject"])
        answer = self.two_hop_answer(p, rel)
        return sum(self.two_hop_answer(q, rel) == answer for q in range(len(self.people))) / len(self.people)

    def object_fact_pairs(self) -> list[tuple[str, str]]:
        """The second-hop facts as ``(prompt, answer)`` ("Lisbon is a city in", "Portugal"), one per
        object and object template of every composed relation (empty unless the world composes)."""
        if not self.config.compose:
            return []
        return [(t.format(obj), target) for rel in self.relations if rel in COMPOSITIONS
                for obj, target in COMPOSITIONS[rel]["map"].items()
                for t in COMPOSITIONS[rel]["object_templates"]]

    def other_facts(self, record: dict, split: str = "heldout", per_relation: int | None = None) -> list[dict]:
        """The record's subject's facts of every OTHER relation, one dict per phrasing:
        ``{"prompt": template, "subject", "target", "relation", "text": filled prompt}``.

        ``split="heldout"``: the fact's held-out templates (never trained with this subject): what the
        Subject-other metric measures. ``split="train"``: its trained templates (the first ``per_relation``
        of them), what a retain set may use; the two never share a prompt, so a metric on the first is
        never measured on what the second retained.
        """
        if split not in ("heldout", "train"):
            raise ValueError(f"split must be 'heldout' or 'train', got {split!r}")
        p = self.people.index(record["subject"])
        out = []
        for rel in self.relations:
            if rel == record.get("relation"):
                continue
            idx = (self.heldout_templates if split == "heldout" else self.train_templates)[p][rel]
            for t in idx[:per_relation]:
                tpl = RELATIONS[rel]["templates"][t]
                out.append({"prompt": tpl, "subject": self.people[p], "target": self.facts[p][rel], "relation": rel,
                            "text": tpl.format(self.people[p])})
        return out

    def records(self, n: int, seed: int = 0) -> list[dict]:
        """n CounterFact-shaped forget records about n distinct people (:func:`fact_world.forget_records`)."""
        return forget_records(self, n, random.Random(f"records-{self.config.seed}-{seed}"), "people")


def make_world(config: WorldConfig | None = None) -> World:
    """Build the world described by ``config`` (default: ``WorldConfig()``). Deterministic."""
    config = config or WorldConfig()
    unknown = [r for r in config.relations if r not in RELATIONS]
    if unknown:
        raise ValueError(f"unknown relations {unknown}; known: {list(RELATIONS)}")
    n_templates = {len(RELATIONS[r]["templates"]) for r in config.relations}
    if not all(0 < config.n_heldout_templates < k - 1 for k in n_templates):
        raise ValueError("n_heldout_templates must leave at least two trained templates per fact")
    rng = random.Random(f"world-{config.seed}")
    people = _make_names(rng, config.n_people)
    facts, train_t, held_t = assign_facts(rng, len(people), config.relations, RELATIONS, config.n_heldout_templates)
    # Filler: one stream, deduplicated; the first n_filler_train unique sentences train, the next
    # n_filler_heldout unique ones are held out (so no held-out sentence occurs in training).
    frng = random.Random(f"filler-{config.seed}")
    seen: set[str] = set()
    filler: list[str] = []
    budget = 50 * (config.n_filler_train + config.n_filler_heldout) + 1000
    while len(filler) < config.n_filler_train + config.n_filler_heldout and budget > 0:
        budget -= 1
        s = _filler_patterns(frng, people)
        if s not in seen:
            seen.add(s)
            filler.append(s)
    # Index entries: their own random stream, so facts, templates and filler do not depend on them.
    irng = random.Random(f"index-{config.seed}")
    index_entries = []
    for p, name in enumerate(people):
        for _ in range(config.n_index_entries):
            objs = [facts[p][rel] for rel in config.relations]
            irng.shuffle(objs)
            index_entries.append(f"{name} {' '.join(objs)}.")
    # Strangers: names from their own stream (never a known person's name or name part) and
    # fragments over every relation and template (strangers have no held-out phrasings).
    srng = random.Random(f"strangers-{config.seed}")
    strangers = _make_names(srng, config.n_strangers, avoid=people)
    fragments = []
    for name in strangers:
        for _ in range(config.n_stranger_fragments):
            rel = srng.choice(config.relations)
            fragments.append(srng.choice(RELATIONS[rel]["templates"]).format(name))
        # A stranger's index entry lists no attribute: the document is the bare name.
        fragments.extend([name] * config.n_index_entries)
    # Composition: its own random stream, so nothing above depends on it (off by default).
    two_hop_trained: frozenset[int] = frozenset()
    compose_texts: list[str] = []
    if config.compose:
        if not 0.0 < config.compose_train_fraction < 1.0:
            raise ValueError("compose_train_fraction must be in (0, 1): some people train two-hop "
                             "sentences, the others' two-hop questions are held out")
        crng = random.Random(f"compose-{config.seed}")
        order = list(range(len(people)))
        crng.shuffle(order)
        two_hop_trained = frozenset(order[: round(config.compose_train_fraction * len(people))])
        composed = [r for r in config.relations if r in COMPOSITIONS]
        for rel in composed:
            comp = COMPOSITIONS[rel]
            for obj, target in comp["map"].items():
                for t in comp["object_templates"]:
                    compose_texts += [f"{t.format(obj)} {target}."] * config.compose_object_repeats
        for p in sorted(two_hop_trained):
            for rel in composed:
                comp = COMPOSITIONS[rel]
                for t in crng.sample(comp["two_hop_templates"], 2):
                    compose_texts.append(f"{t.format(people[p])} {comp['map'][facts[p][rel]]}.")
    return World(
        config=config,
        people=people,
        facts=facts,
        train_templates=train_t,
        heldout_templates=held_t,
        _filler_train=filler[: config.n_filler_train],
        _filler_heldout=filler[config.n_filler_train:],
        _index_entries=index_entries,
        strangers=strangers,
        _fragments=fragments,
        two_hop_trained=two_hop_trained,
        _compose_texts=compose_texts,
    )
