"""``UnlearnConfig``: every knob of one unlearning run, in sections, with presets and file loading.

Defaults are the reference's values (``docs/algorithm.md``, "The reference's hparams"). Three top-level
fields say what is edited and toward what (``layers``, ``method``, ``neutral_target``); the rest is in
nine sections named for the method's steps (``zu_fast.config.sections``):

    cfg = UnlearnConfig(layers=[4, 5, 6], method="gd")
    cfg.targets.steps = 50                       # step 2
    cfg = cfg.replace(gd={"null_energy": 0.01})  # a validated copy; a section as a dict of its fields

Flat keys keep working everywhere a config is built — ``UnlearnConfig(v_lr=0.5)``,
``replace(clamp_norm_factor=1.0)``, ``from_dict``/``from_json`` (the reference's hparams files unchanged,
MEMIT/EasyEdit names too), the presets and saved edits — through one table, ``zu_fast.config.keys.FLAT``.
Keys that no ZeroUnlearn code path reads are accepted with one warning saying so; unknown keys are refused.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ZuFastError
from . import presets as _presets
from .keys import FLAT, NO_EFFECT, REFERENCE_GD, REFERENCE_GD_DIRS, REFERENCE_RULES
from .sections import GD, SECTIONS, ClosedForm, Locate, Representation, Runtime, Safety, Stats, Targets, Templates

_METHODS = ("closed_form", "gd")
_TOP = ("layers", "method", "neutral_target")


@dataclass(init=False)
class UnlearnConfig:
    """Configuration of one unlearning run (and of the statistics it needs).

    ``layers``: the edited layers (increasing); the last is the z layer. ``method``: ``"closed_form"``
    (ZeroUnlearn) or ``"gd"`` (ZeroUnlearn-GD). ``neutral_target``: what the forgotten prompts should
    continue with (None: the tokenizer's EOS). Sections (each a dataclass; pass an instance or a dict of
    its fields): ``locate`` (module names), ``templates`` (step 0), ``targets`` (step 2),
    ``representation`` (step 3), ``stats`` (step 4), ``closed_form`` (step 5), ``gd``, ``safety``,
    ``runtime``. Any flat key of ``zu_fast.config.keys.FLAT`` is accepted as a keyword too.
    """

    layers: list[int]
    method: str
    neutral_target: str | None
    locate: Locate = field(default_factory=Locate)
    templates: Templates = field(default_factory=Templates)
    targets: Targets = field(default_factory=Targets)
    representation: Representation = field(default_factory=Representation)
    stats: Stats = field(default_factory=Stats)
    closed_form: ClosedForm = field(default_factory=ClosedForm)
    gd: GD = field(default_factory=GD)
    safety: Safety = field(default_factory=Safety)
    runtime: Runtime = field(default_factory=Runtime)

    def __init__(self, layers: list[int] | None = None, method: str = "closed_form", neutral_target: str | None = None,
                 **sections_and_flat: Any) -> None:
        self._reset()
        self._set({"layers": [19, 20, 21] if layers is None else layers, "method": method,
                   "neutral_target": neutral_target})
        self._set(sections_and_flat)
        self.validate()

    # ----------------------------------------------------------------------------------
    def _reset(self) -> None:
        """Every field at its default (the reference's values)."""
        self.layers, self.method, self.neutral_target = [19, 20, 21], "closed_form", None
        for name, cls in SECTIONS.items():
            setattr(self, name, cls())

    def _set(self, changes: Mapping[str, Any]) -> None:
        """Apply sections (instances or dicts of their fields) first, then flat keys (``keys.FLAT``)."""
        flat = {}
        for key, value in changes.items():
            if key in SECTIONS and not (key == "closed_form" and isinstance(value, str)):
                setattr(self, key, _section(key, value, getattr(self, key)))
            elif key in _TOP:
                setattr(self, key, value)
            else:
                flat[key] = value
        unknown = sorted(k for k in flat if k not in FLAT)
        if unknown:
            raise ZuFastError(f"unknown config keys {unknown}; the config has {list(_TOP)} and the sections "
                              f"{list(SECTIONS)}, and accepts the flat keys {sorted(FLAT)}")
        for key, value in flat.items():
            section, name = FLAT[key]
            setattr(self if section is None else getattr(self, section), name, value)

    def validate(self) -> None:
        """Raise ZuFastError on settings that cannot work."""
        try:
            self.layers = [int(x) for x in self.layers]
        except (TypeError, ValueError):
            raise ZuFastError(f"config.layers must be a list of layer indices, got {self.layers!r}") from None
        if not self.layers:
            raise ZuFastError("config.layers is empty: name at least one layer to edit")
        if sorted(set(self.layers)) != self.layers:
            raise ZuFastError(f"config.layers must be strictly increasing, got {self.layers}")
        if self.method not in _METHODS:
            raise ZuFastError(f"config.method={self.method!r}; choose one of {_METHODS}")
        if self.neutral_target is not None and not isinstance(self.neutral_target, str):
            raise ZuFastError(f"config.neutral_target must be a string or None (EOS), got {self.neutral_target!r}")
        for name, cls in SECTIONS.items():
            sec = getattr(self, name)
            if not isinstance(sec, cls):
                raise ZuFastError(f"config.{name} must be a {cls.__name__}, got {type(sec).__name__}")
            try:
                sec.validate()
            except ZuFastError as e:
                raise ZuFastError(_with_flat_names(str(e))) from None

    @property
    def z_layer(self) -> int:
        return self.layers[-1]

    def replace(self, **changes: Any) -> UnlearnConfig:
        """A validated copy with ``changes`` applied: top-level fields, sections (instances or dicts of
        fields, merged into the current section) or flat keys."""
        new = copy.deepcopy(self)
        new._set(changes)
        new.validate()
        return new

    def to_dict(self) -> dict[str, Any]:
        """Nested: the top-level fields and one dict per section (``from_dict`` reads it back)."""
        return {**{k: copy.deepcopy(getattr(self, k)) for k in _TOP},
                **{name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}}

    def to_flat(self) -> dict[str, Any]:
        """Flat: every field under its first flat name in ``keys.FLAT`` (``from_dict`` reads it back)."""
        out: dict[str, Any] = {}
        for key, (section, name) in FLAT.items():
            if (section, name) not in {FLAT[k] for k in out}:
                out[key] = copy.deepcopy(getattr(self if section is None else getattr(self, section), name))
        return out

    # ---------------------------------------------------------------- loading ---------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], **overrides: Any) -> UnlearnConfig:
        """Build from our keys (nested sections or flat) or the reference code's hparams keys.

        Keys of the reference (ZeroUnlearn, MEMIT, AlphaEdit, EasyEdit) that no ZeroUnlearn code path reads are
        accepted with one warning naming them and why; unknown keys are refused. Numbers written as strings
        (YAML 1.1 reads ``1e-1`` as a string) are converted by the field's type.
        """
        if not isinstance(data, Mapping):
            raise ZuFastError(f"a config is a mapping of keys, got {type(data).__name__}")
        merged = {**data, **overrides}
        kwargs: dict[str, Any] = {}
        unknown, no_effect = [], {}
        # a ZeroUnlearn file names both λ_w (wiki_*_lam) and MEMIT's mom2_update_weight: λ_w wins
        has_wiki = "wiki_KKT_lam" in merged or "wiki_VKT_lam" in merged
        for key, value in merged.items():
            if key in SECTIONS and isinstance(value, Mapping):
                kwargs[key] = {k: _coerce(SECTIONS[key], k, v, f"{key}.{k}") for k, v in value.items()}
            elif key in _TOP or key in FLAT:
                section, name = FLAT.get(key, (None, key))
                kwargs[key] = value if section is None else _coerce(SECTIONS[section], name, value, key)
            elif key == "mom2_update_weight" and has_wiki:
                no_effect[key] = "the ZeroUnlearn code reads wiki_KKT_lam / wiki_VKT_lam instead"
            elif key in REFERENCE_RULES:
                fields_, why = REFERENCE_RULES[key](value)
                kwargs.update(fields_)
                if why:
                    no_effect[key] = why
            elif key in NO_EFFECT:
                if NO_EFFECT[key]:
                    no_effect[key] = NO_EFFECT[key]
            else:
                unknown.append(key)
        if unknown:
            raise ZuFastError(
                f"unknown config keys {sorted(unknown)}; known: {list(_TOP)}, the sections {list(SECTIONS)}, the flat "
                f"keys {sorted(FLAT)}, the reference's {sorted(REFERENCE_RULES)} and the keys accepted without effect "
                f"{sorted(NO_EFFECT)}")
        if no_effect:
            warnings.warn("config keys with no effect in zu_fast: "
                          + "; ".join(f"{k} ({why})" for k, why in sorted(no_effect.items())), stacklevel=2)
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | Path, **overrides: Any) -> UnlearnConfig:
        """Load a JSON (or .yaml/.yml) file with our keys or the reference hparams keys.

        A file in a folder named ``ZeroUnlearn_DG`` (the reference's GD hparams) selects the GD variant with
        the reference's hard-coded GD settings, as the reference does by folder name.
        """
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise ZuFastError(f"cannot read config file {str(path)!r}: {e.strerror or e}") from None
        data = parse_config_text(path, text, "configs")
        if not isinstance(data, dict):
            raise ZuFastError(f"{path}: expected a mapping of config keys")
        if path.parent.name in REFERENCE_GD_DIRS and "method" not in data and "method" not in overrides:
            # The reference picks the algorithm by the hparams folder (hparams/<alg_name>/<model>.json); its GD
            # hard-codes Adam lr 1e-3, 500 steps and no early stop.
            data = {**data, **REFERENCE_GD}
        try:
            return cls.from_dict(data, **overrides)
        except ZuFastError as e:
            raise ZuFastError(f"{path}: {e}") from None

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    # ---------------------------------------------------------------- presets ---------
    @classmethod
    def for_model(cls, model: Any, **overrides: Any) -> UnlearnConfig:
        """Preset for a HuggingFace causal LM (or its config): the paper's exact settings for the models it
        tunes (see :meth:`preset`), else module names for the family (``SUPPORTED_FAMILIES``), layers by the
        paper's depth rule, GD's null space by the scale-free energy rule, the closed form's forget weights by
        the leverage rule and (GD) a wider retry for targets that were not reached.

        Given a model (not just its config), module names are checked on it and the LM head and final norm are
        taken from it (transformers renames them between versions), an unknown decoder-only architecture is
        probed for the usual names (with a warning saying what was guessed, unless ``overrides`` set the
        templates), and the layers are validated here: a config that cannot work on this model raises
        ZuFastError now, not at the first expensive call.
        """
        mcfg = getattr(model, "config", model)
        module = model if hasattr(model, "named_modules") else None
        fields_ = _presets.preset_for(mcfg, explicit=set(overrides), model=module)
        if {**fields_, **overrides}.get("method", "closed_form") == "closed_form":
            # GD only: a retried target lies farther out, and the closed form's d×d multiplier spreads the larger
            # edit onto other inputs (small model, 16 seeds: specificity 85 → 80; RESULTS.md)
            fields_.pop("target_retry_clamp", None)
        cfg = cls._layered(fields_, overrides)
        if module is not None:
            _presets.check_on_model(module, cfg)
        else:
            n = _presets.n_layers_of(mcfg)
            if n is not None and max(cfg.layers) >= n:
                raise ZuFastError(f"layers {cfg.layers} out of range: the model has {n} layers (0..{n - 1})")
        return cfg

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> UnlearnConfig:
        """A named preset from ``zu_fast/presets/<name>.json`` (names: :meth:`presets`).

        ``"llama-3.1-8b-instruct"``, ``"llama-3.2-3b-instruct"`` and ``"qwen3-4b"`` are the paper's hparams
        files exactly (``...-gd`` for ZeroUnlearn-GD); others follow the paper's layer rule.
        """
        return cls._layered(_presets.load_preset(name)["config"], overrides)

    @classmethod
    def _layered(cls, preset: Mapping[str, Any], overrides: Mapping[str, Any]) -> UnlearnConfig:
        """The preset's fields, then the caller's on top: an override wins whether it is written flat or as a
        section (a section dict merges into the preset's section), validated once at the end."""
        cfg = cls.__new__(cls)
        cfg._reset()
        cfg._set(preset)
        cfg._set(overrides)
        cfg.validate()
        return cfg

    @staticmethod
    def presets() -> dict[str, str]:
        """Names of the shipped presets → their one-line descriptions."""
        return {p.stem: _presets.load_preset(p.stem).get("description", "")
                for p in sorted(_presets.PRESETS_DIR.glob("*.json"))}


def parse_config_text(path: Path, text: str, what: str) -> Any:
    """The contents of a config file read from ``path``: YAML for ``.yaml``/``.yml``, else JSON; a
    ``ZuFastError`` naming the file when it does not parse (``what`` names the kind of file in the message
    when pyyaml is missing)."""
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ZuFastError(f"reading YAML {what} needs pyyaml: pip install pyyaml") from e
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ZuFastError(f"{path}: not valid YAML ({e})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ZuFastError(f"{path}: not valid JSON ({e})") from None


def _with_flat_names(message: str) -> str:
    """A validation message naming ``config.<section>.<field>`` also names that field's flat keys (what a preset,
    a reference hparams file or older code calls it)."""
    def aliases(m: re.Match) -> str:
        names = [k for k, v in FLAT.items() if v == (m.group(1), m.group(2))]
        return m.group(0) + (f" ({', '.join(names)})" if names else "")

    return re.sub(r"config\.(\w+)\.(\w+)", aliases, message, count=1)


def _section(name: str, value: Any, current: Any) -> Any:
    """A section from an instance (copied) or a dict of its fields (merged into ``current``)."""
    cls = SECTIONS[name]
    if isinstance(value, cls):
        return copy.deepcopy(value)
    if isinstance(value, Mapping):
        own = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(value) - own)
        if bad:
            raise ZuFastError(f"config.{name} has no fields {bad}; its fields are {sorted(own)}")
        return dataclasses.replace(copy.deepcopy(current), **value)
    raise ZuFastError(f"config.{name} must be a {cls.__name__} or a dict of its fields, got {type(value).__name__}")


def _coerce(cls: type, name: str, value: Any, where: str) -> Any:
    """``value`` converted to the type of field ``name`` of section ``cls`` when it is a numeric string (or an
    int for a float field); other values as they are (validation judges them)."""
    f = next((f for f in dataclasses.fields(cls) if f.name == name), None)
    if f is None or isinstance(value, bool) or value is None:
        return value
    kind = str(f.type)
    try:
        if kind in ("float", "float | None") and isinstance(value, (str, int)):
            return float(value)
        if kind in ("int", "int | None") and isinstance(value, str):
            return int(value)
    except ValueError:
        raise ZuFastError(f"config.{where}: expected a number, got {value!r}") from None
    return value


__all__ = ["UnlearnConfig"]
