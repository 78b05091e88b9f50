"""The offline benchmark's named worlds and the small model trained on each (``zu-fast eval --world NAME``).

- ``people`` (default): the people world (:mod:`zu_fast.eval.synthetic`) and its 6-layer Llama,
  tagged ``zu-tiny-llama`` so ``UnlearnConfig.for_model`` picks the zu-tiny preset. Every default
  was chosen here.
- ``species``: the species world (:mod:`zu_fast.eval.species`) and an 8-layer, 192-wide Llama,
  **untagged**, so ``for_model`` gives the generic Llama defaults, as on a model the project never
  saw. For checking defaults only: nothing may be tuned on it (docs/second-world.md).

From Python: ``model, tok, world = tinylm.load_or_train(worlds.tinylm_config("species"))``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from .species import SpeciesWorldConfig
from .tinylm import TinyLMConfig


def _species_model() -> TinyLMConfig:
    # Deeper and wider than the people model (6 × 128, d_ff 768), d_ff = 4·d as in common LLMs;
    # sized so that it trains in about 10 CPU minutes on 2 cores (docs/second-world.md).
    return TinyLMConfig(world=SpeciesWorldConfig(), vocab_size=1152, hidden_size=192, num_layers=8, num_heads=6,
                        intermediate_size=768, steps=500, lr=3e-3, tag_as_tiny=False, single_token_answers=False)


WORLDS: dict[str, Callable[[], TinyLMConfig]] = {
    "people": TinyLMConfig,
    "species": _species_model,
}


def tinylm_config(name: str = "people", overrides: dict | None = None) -> TinyLMConfig:
    """The small model's config for the named world, with ``overrides`` (TinyLMConfig fields, ``world``
    a dict of the world config's fields) applied on top."""
    if name not in WORLDS:
        raise ValueError(f"unknown world {name!r}; choose from {sorted(WORLDS)}")
    cfg = WORLDS[name]()
    kw = dict(overrides or {})
    world = kw.pop("world", None)
    if world:
        kw["world"] = dataclasses.replace(cfg.world, **world)
    return dataclasses.replace(cfg, **kw)
