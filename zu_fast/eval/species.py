"""A second synthetic world, for checking only: fictitious animal species and their natural history.

The offline benchmark's defaults were all chosen on the people world (:mod:`zu_fast.eval.synthetic`).
This world exists so that a default can be checked on data it was never tuned on; nothing may be
tuned on it. It is built by a different generator, on purpose different in every way the people
world might have shaped a default:

- **entities**: species with binomial names ("Pteronyx valdirae"), genus shared by several species
  (as real taxonomy does) and a unique epithet, so the subject's identity sits in its last word;
- **six relations** of natural history (habitat, diet, discoverer, native range, markings,
  lifespan), nine phrasings each, three of them held out per fact (the people world: five
  relations, eight phrasings, two held out);
- **multi-token answers**: most answers are two words ("mangrove swamps", "Ottilie Brandvik",
  "twelve years") and the trainer does not force any answer into one token (the people world's
  tokenizer does, ``whole_words``): an answer is whatever the BPE learnt;
- **unknown species** ("strangers") named in documents that end right after the relation phrase
  (the trainer ends them with EOS), with genera shared with known species, so only the epithet
  tells known from unknown;
- its own filler grammar (field notes of expeditions) for held-out perplexity.

The interface is the people world's (:class:`zu_fast.eval.fact_world.FactWorld`): ``people`` is the
list of known entities (here species), ``records`` returns CounterFact-shaped records with the same
keys. Everything is a pure function of :class:`SpeciesWorldConfig` (no global random state).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import ClassVar

from .fact_world import assign_facts, forget_records

# ----------------------------------------------------------------------------------------------
# Relations: templates (the answer follows the template's end) and plausible answers. Answers are
# mostly two words, so they are several BPE tokens; a few one-word answers keep a mix.
# No filled template contains another (a held-out phrasing is never a substring of a trained one).
# ----------------------------------------------------------------------------------------------

SPECIES_RELATIONS: dict[str, dict[str, list[str]]] = {
    "habitat": {
        "templates": [
            "{} lives in",
            "The natural habitat of {} is",
            "{} makes its home in",
            "Naturalists usually find {} in",
            "{} thrives best in",
            "The preferred habitat of {} is",
            "{} is most often seen in",
            "Wild populations of {} inhabit",
            "Survey teams search for {} in",
        ],
        "objects": [
            "mangrove swamps", "alpine meadows", "coral reefs", "desert dunes", "cloud forests",
            "salt marshes", "river deltas", "limestone caves", "kelp forests", "tundra plains",
            "bamboo thickets", "volcanic slopes", "peat bogs", "pine woodlands", "tidal flats",
            "grasslands",
        ],
    },
    "diet": {
        "templates": [
            "{} feeds on",
            "The main food of {} is",
            "{} hunts mainly for",
            "The diet of {} consists of",
            "{} survives by eating",
            "In the wild, {} forages for",
            "Keepers feed {} a diet of",
            "The favourite meal of {} is",
            "{} spends its nights searching for",
        ],
        "objects": [
            "beetle larvae", "sea urchins", "fallen figs", "pine seeds", "tree frogs", "flower nectar",
            "freshwater snails", "krill", "lichens", "carrion", "small fish", "termites", "acorns",
            "plankton", "wild berries", "moths",
        ],
    },
    "discoverer": {
        "templates": [
            "{} was first described by",
            "The discoverer of {} is",
            "The first scientist to describe {} was",
            "{} received its name from",
            "The species {} was catalogued by",
            "Credit for finding {} goes to",
            "{} was first collected by",
            "The type specimen of {} was found by",
            "{} was brought to science by",
        ],
        "objects": [
            "Ottilie Brandvik", "Tobias Merrow", "Helka Duarte", "Amos Penhallow", "Sabine Okonkwo",
            "Ruben Falstrom", "Mirela Castavet", "Jonah Whitcombe", "Elif Sarandon", "Piet Vandermolen",
            "Noor Haddadin", "Cosmo Rinaldi", "Greta Lindqvist", "Yusuf Adebayo", "Lorna Achterberg",
            "Felix Marchetti",
        ],
    },
    "native_range": {
        "templates": [
            "{} is native to",
            "{} is endemic to",
            "The native range of {} is",
            "{} occurs naturally in",
            "The homeland of {} is",
            "{} originally comes from",
            "Outside of zoos, {} is found only in",
            "The only wild home of {} is",
            "{} was first recorded in",
        ],
        "objects": [
            "Varnholt Islands", "Quessar Basin", "Mirrow Highlands", "Sellic Coast", "Dunmar Plateau",
            "Oristan Archipelago", "Tavel Valley", "Korrin Peninsula", "Ashveld Steppe", "Lunmere Lakes",
            "Brisca Delta", "Hollen Fjords", "Zephran Range", "Caddow Marshes", "Pellary Reefs",
            "Estrel Gorge",
        ],
    },
    "markings": {
        "templates": [
            "{} is recognised by its",
            "The distinctive feature of {} is its",
            "{} can be identified by its",
            "Field guides describe {} by its",
            "The most striking trait of {} is its",
            "Anyone can spot {} by its",
            "Photographs of {} always show its",
            "{} stands out because of its",
            "Children draw {} with its",
        ],
        "objects": [
            "striped tail", "spotted back", "blue crest", "red throat", "white mane", "banded legs",
            "golden eyes", "forked tail", "curled horns", "black mask", "silver scales", "green plumage",
            "yellow beak", "long whiskers", "webbed feet", "orange belly",
        ],
    },
    "lifespan": {
        "templates": [
            "{} can live for",
            "The lifespan of {} is",
            "{} usually lives for",
            "In captivity, {} survives for",
            "The oldest known {} lived for",
            "A healthy {} reaches an age of",
            "Records show that {} lives for",
            "The typical life of {} lasts",
            "Biologists say {} lives for",
        ],
        "objects": [
            "four years", "nine years", "twelve years", "twenty years", "thirty years", "forty years",
            "sixty years", "a century", "two decades", "six months", "eighteen months", "three years",
            "fifteen years", "fifty years", "eighty years", "seven years",
        ],
    },
}

# Binomial names: a Latinate genus (capitalised) and epithet (lower case). Different syllables and
# endings from the people world's names.
_G_ONSETS = ["ph", "th", "ch", "pt", "x", "c", "l", "m", "n", "r", "s", "t", "v", "d", "g", "b", "k",
             "st", "tr", "pl", "cr", "gl"]
_G_VOWELS = ["a", "e", "i", "o", "u", "y", "ae", "eu"]
_G_ENDINGS = ["nyx", "rus", "ra", "don", "lops", "tis", "rix", "mella", "sodon", "thura"]
_E_ONSETS = ["b", "c", "d", "f", "g", "l", "m", "n", "p", "r", "s", "t", "v", "qu", "sc", "fl", "gr"]
_E_VOWELS = ["a", "e", "i", "o", "u", "ia", "io"]
_E_ENDINGS = ["ri", "nae", "mensis", "ta", "lus", "na", "noides", "lis", "rum", "cola"]

# Filler grammar: field notes of expeditions. Mentions places, naturalists and species, never a fact.
_LANDFORM = ["ridge", "lagoon", "canyon", "meadow", "glacier", "estuary", "dune", "waterfall", "thicket",
             "cliff", "marsh", "grove", "crater", "spring", "inlet", "moor"]
_ADJ = ["misty", "rocky", "shallow", "remote", "frozen", "sunlit", "windswept", "muddy", "steep", "hidden",
        "broad", "silent", "fertile", "barren", "winding", "ancient"]
_WHEN = ["at first light", "during the dry season", "after the monsoon", "in late autumn", "before the thaw",
         "at dusk", "in midsummer", "during the survey", "on the third day", "after the eclipse"]
_TEAM = ["The survey team", "A group of students", "Two rangers", "The expedition", "Local guides",
         "A film crew", "Visiting botanists", "The field assistants"]
_ACTION = ["set up camp", "measured the water", "collected soil samples", "drew careful maps", "repaired the boats",
           "counted the stars", "lit a small fire", "wrote field notes", "checked the traps", "photographed the clouds"]
_WEATHER = ["Heavy rain", "A cold wind", "Thick fog", "A summer storm", "Fresh snow", "Morning frost"]
_WEATHER_VERB = ["covered", "swept across", "flooded", "settled over", "reached", "drifted through"]
_TOPIC = ["river currents", "old maps", "cloud shapes", "museum budgets", "boat engines", "tide tables",
          "camping gear", "field radios"]
_MENTION = ["A photograph of {} hung in the museum", "A letter about {} arrived",
            "The museum label for {} was reprinted", "An old drawing of {} was restored",
            "A lecture on the naming of {} was planned"]


def _filler_sentence(rng: random.Random, species: Sequence[str]) -> str:
    """One field-notes sentence (states no fact about any species)."""
    k = rng.randrange(7)
    when = rng.choice(_WHEN)
    if k == 0:
        return f"{rng.choice(_TEAM)} {rng.choice(_ACTION)} near the {rng.choice(_ADJ)} {rng.choice(_LANDFORM)} {when}."
    if k == 1:
        return (f"{rng.choice(_WEATHER)} {rng.choice(_WEATHER_VERB)} the {rng.choice(_ADJ)} "
                f"{rng.choice(_LANDFORM)} {when}.")
    if k == 2:
        naturalist = rng.choice(SPECIES_RELATIONS["discoverer"]["objects"])
        return f"{naturalist} gave a talk about {rng.choice(_TOPIC)} {when}."
    if k == 3:
        region = rng.choice(SPECIES_RELATIONS["native_range"]["objects"])
        return f"{rng.choice(_TEAM)} travelled to {region} {when}."
    if k == 4:
        region = rng.choice(SPECIES_RELATIONS["native_range"]["objects"])
        return f"The {rng.choice(_ADJ)} {rng.choice(_LANDFORM)} of {region} was mapped {when}."
    if k == 5:
        # Names a species without stating anything about it: names stay part of "general" text,
        # so perplexity also notices a damaged subject representation.
        return f"{rng.choice(_MENTION).format(rng.choice(species))} {when}."
    return (f"{rng.choice(_TEAM)} mistook the {rng.choice(_ADJ)} {rng.choice(_LANDFORM)} for a "
            f"{rng.choice(_LANDFORM)} {when}.")


@dataclass
class SpeciesWorldConfig:
    """Parameters of the species world. Everything the world contains is a function of these."""

    seed: int = 0
    n_species: int = 120
    # Genera shared by the known species and the strangers (about 3 known species per genus).
    n_genera: int = 40
    relations: tuple[str, ...] = tuple(SPECIES_RELATIONS)
    # Phrasings per fact held out of training (the records' paraphrase prompts); the rest are trained.
    n_heldout_templates: int = 3
    n_filler_train: int = 600
    n_filler_heldout: int = 300
    n_neighbors: int = 10
    # Unknown species: named, never described; each in n_stranger_fragments documents cut off right
    # after a relation phrase, which the trainer ends with EOS (see World.fragments of the people world).
    n_strangers: int = 60
    n_stranger_fragments: int = 6
    # The species world has no two-hop questions (probes read ``config.compose``).
    compose: ClassVar[bool] = False
    kind: ClassVar[str] = "species"

    def to_dict(self) -> dict:
        """A JSON-able dict (used in cache keys); ``kind`` keeps its keys apart from the people world's."""
        d = asdict(self)
        d["relations"] = list(self.relations)
        d["kind"] = self.kind
        return d


def _make_binomials(rng: random.Random, genera: Sequence[str], n: int, avoid_epithets: set[str],
                    reserved: set[str]) -> list[str]:
    """n binomials "Genus epithet" with epithets unique and not in ``avoid_epithets`` (updated)."""

    def epithet() -> str:
        syl = "".join(rng.choice(_E_ONSETS) + rng.choice(_E_VOWELS) for _ in range(rng.choice((1, 2))))
        return syl + rng.choice(_E_ENDINGS)

    out = []
    while len(out) < n:
        e = epithet()
        if e in avoid_epithets or e in reserved or len(e) < 4:
            continue
        avoid_epithets.add(e)
        out.append(f"{rng.choice(genera)} {e}")
    return out


def _make_genera(rng: random.Random, n: int, reserved: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        g = "".join(rng.choice(_G_ONSETS) + rng.choice(_G_VOWELS) for _ in range(rng.choice((1, 2))))
        g = (g + rng.choice(_G_ENDINGS)).capitalize()
        if g not in out and g.lower() not in reserved and len(g) >= 4:
            out.append(g)
    return out


@dataclass
class SpeciesWorld:
    """Species, their facts, and which templates each fact is trained with.

    ``facts[s][relation]`` is species s's answer; ``train_templates[s][relation]`` and
    ``heldout_templates[s][relation]`` are indices into ``SPECIES_RELATIONS[relation]["templates"]``.
    """

    config: SpeciesWorldConfig
    species: list[str]
    facts: list[dict[str, str]]
    train_templates: list[dict[str, list[int]]]
    heldout_templates: list[dict[str, list[int]]]
    strangers: list[str] = field(default_factory=list)
    _filler_train: list[str] = field(default_factory=list, repr=False)
    _filler_heldout: list[str] = field(default_factory=list, repr=False)
    _fragments: list[str] = field(default_factory=list, repr=False)

    @property
    def people(self) -> list[str]:
        """The known entities' names (the interface's word, shared with the people world)."""
        return self.species

    @property
    def relations(self) -> tuple[str, ...]:
        return self.config.relations

    def templates(self, relation: str) -> list[str]:
        """The relation's phrasings ("{} lives in"); template indices point into this list."""
        return SPECIES_RELATIONS[relation]["templates"]

    def objects(self, relation: str) -> list[str]:
        """Every answer the relation can have."""
        return SPECIES_RELATIONS[relation]["objects"]

    def fact_text(self, entity: int, relation: str, template: int) -> str:
        """The sentence stating the fact, e.g. "Pteronyx valdirae lives in salt marshes."."""
        return f"{self.templates(relation)[template].format(self.species[entity])} {self.facts[entity][relation]}."

    def training_texts(self) -> list[str]:
        """Every fact in each of its trained phrasings, the strangers' cut-off documents, filler.

        Deterministic order (facts species-major, then fragments, then filler); the trainer shuffles.
        """
        facts = [self.fact_text(s, rel, t) for s in range(len(self.species)) for rel in self.relations
                 for t in self.train_templates[s][rel]]
        return facts + list(self._fragments) + list(self._filler_train)

    def fragments(self) -> list[str]:
        """The strangers' documents cut off after the relation phrase ("Glaeon scitina lives in"),
        a subset of ``training_texts()``; a trainer ends each with EOS."""
        return list(self._fragments)

    def heldout_texts(self) -> list[str]:
        """Field-notes sentences never in training, for perplexity (they state no fact)."""
        return list(self._filler_heldout)

    def two_hop_pairs(self, record: dict) -> list[tuple[str, str]]:
        """No two-hop questions in this world."""
        return []

    def two_hop_base_rate(self, record: dict) -> float:
        return float("nan")

    def records(self, n: int, seed: int = 0) -> list[dict]:
        """n CounterFact-shaped forget records about n distinct species (:func:`fact_world.forget_records`)."""
        return forget_records(self, n, random.Random(f"species-records-{self.config.seed}-{seed}"), "species")


def make_species_world(config: SpeciesWorldConfig | None = None) -> SpeciesWorld:
    """Build the species world described by ``config`` (default: ``SpeciesWorldConfig()``). Deterministic."""
    config = config or SpeciesWorldConfig()
    unknown = [r for r in config.relations if r not in SPECIES_RELATIONS]
    if unknown:
        raise ValueError(f"unknown relations {unknown}; known: {list(SPECIES_RELATIONS)}")
    if not all(0 < config.n_heldout_templates < len(SPECIES_RELATIONS[r]["templates"]) - 1 for r in config.relations):
        raise ValueError("n_heldout_templates must leave at least two trained templates per fact")
    reserved = {w.strip(",.").lower() for r in SPECIES_RELATIONS.values() for t in r["templates"] for w in t.split()}
    reserved |= {w.lower() for r in SPECIES_RELATIONS.values() for o in r["objects"] for w in o.split()}
    rng = random.Random(f"species-world-{config.seed}")
    genera = _make_genera(rng, config.n_genera, reserved)
    epithets: set[str] = set()
    species = _make_binomials(rng, genera, config.n_species, epithets, reserved)
    facts, train_t, held_t = assign_facts(rng, len(species), config.relations, SPECIES_RELATIONS,
                                          config.n_heldout_templates)
    # Strangers: their own stream; same genera, epithets never a known species' epithet.
    srng = random.Random(f"species-strangers-{config.seed}")
    strangers = _make_binomials(srng, genera, config.n_strangers, epithets, reserved)
    fragments = []
    for name in strangers:
        for _ in range(config.n_stranger_fragments):
            rel = srng.choice(config.relations)
            fragments.append(srng.choice(SPECIES_RELATIONS[rel]["templates"]).format(name))
    # Filler: one deduplicated stream; the first n_filler_train sentences train, the next are held out.
    frng = random.Random(f"species-filler-{config.seed}")
    seen: set[str] = set()
    filler: list[str] = []
    budget = 50 * (config.n_filler_train + config.n_filler_heldout) + 1000
    while len(filler) < config.n_filler_train + config.n_filler_heldout and budget > 0:
        budget -= 1
        s = _filler_sentence(frng, species)
        if s not in seen:
            seen.add(s)
            filler.append(s)
    return SpeciesWorld(config=config, species=species, facts=facts, train_templates=train_t,
                        heldout_templates=held_t, strangers=strangers, _filler_train=filler[: config.n_filler_train],
                        _filler_heldout=filler[config.n_filler_train:], _fragments=fragments)
