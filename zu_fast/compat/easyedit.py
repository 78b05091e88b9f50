"""ZeroUnlearn in EasyEdit's calling convention: ``apply_zeroUnlearn_to_model`` and ``ZeroUnlearnHyperParams``.

EasyEdit (zjunlp/EasyEdit) runs an algorithm through ``ALG_DICT[hparams.alg_name]``, called by its
``BaseEditor`` as::

    edited_model, weights_copy = apply_algo(model, tok, [request], hparams, copy=False,
                                            return_orig_weights=True, keep_original_weight=False, train_ds=None)

and, after scoring the edited model, puts every ``weights_copy[name]`` back into the parameter of that
name (unless ``sequential_edit=True``). This module provides that function for ZeroUnlearn and its GD
variant, a hyperparameter class read from EasyEdit-style YAML, and the paper's models as YAML files
(``zu_fast/presets/easyedit/ZeroUnlearn/*.yaml`` and ``.../ZeroUnlearn-GD/*.yaml``, the shipped presets
``llama-3.1-8b-instruct``, ``llama-3.2-3b-instruct``, ``qwen3-4b`` and the project's ``zu-tiny``).

Register it in EasyEdit (recipe)::

    # at run time, without editing EasyEdit:
    from zu_fast.compat import easyedit
    easyedit.register()          # ALG_DICT["ZeroUnlearn"], ALG_DICT["ZeroUnlearn-GD"], and batch_edit allowed

    # or in EasyEdit's source, easyeditor/util/alg_dict.py:
    from zu_fast.compat.easyedit import apply_zeroUnlearn_to_model, apply_zeroUnlearn_GD_to_model
    ALG_DICT["ZeroUnlearn"] = apply_zeroUnlearn_to_model
    ALG_DICT["ZeroUnlearn-GD"] = apply_zeroUnlearn_GD_to_model
    # (and, for batch_edit, both names in easyeditor/editors/batch_editor.py's BatchEditor)

    from easyeditor import BaseEditor
    hparams = easyedit.ZeroUnlearnHyperParams.from_hparams(easyedit.hparams_path("llama-3.1-8b-instruct"))
    hparams.mom2_dataset = "data/wiki.txt"      # the statistics corpus, a local file: nothing is downloaded
    editor = BaseEditor.from_hparams(hparams)
    metrics, model, _ = editor.edit(prompts=["Alice Morvan was born in"], subject=["Alice Morvan"],
                                    ground_truth=["Lisbon"], target_new=[editor.tok.eos_token])

What a request means (EasyEdit's keys, as ``BaseEditor`` builds them):

- ``prompt``: the prompt with the subject spelled out (its first occurrence is where the subject is) or
  a template with ``{}`` for it; ``subject``: required (ZeroUnlearn reads keys at its last token);
- ``ground_truth``: the answer to FORGET (ZeroUnlearn's ``target_true``; also spelled ``target_true``,
  or ``{"str": ...}``, or a one-element list); required;
- ``target_new``: what the model should say instead: the neutral target. The tokenizer's EOS token
  string means EOS (the paper's default); empty or absent means ``hparams.neutral_target``. One call
  edits with one neutral target, so requests of one call must agree on it;
- ``rephrase_prompt``, ``locality``, ``portability``, ``loc_prompt``, ``target_neg``, ``case_id`` and
  any other key are kept with the request for EasyEdit's evaluation; the edit does not read them.

``requests`` may be a list of dicts, one dict, or one dict of lists (``{"prompt": [...], "subject":
[...], ...}``, single values shared by all). Bad input raises ``zu_fast.ZuFastError`` naming the request
before any change; on any error the weights stay bit-identical.

The statistics (Σkkᵀ of the corpus) come from ``hparams.mom2_dataset``, a local ``.txt`` (one text per
line) or ``.jsonl`` ("text") file (or pass ``stats=`` / ``corpus=`` as keyword arguments). They are
collected once, cached on disk under ``ZU_FAST_CACHE`` (``stats_dir`` has no effect), and kept in memory
for the next calls, as EasyEdit's MEMIT keeps its covariance: after ``sequential_edit`` edits they are
the unedited model's, which zu_fast's edit stack vouches for.

``weights_copy`` holds a clone of every parameter of the edited modules (``rewrite_module_tmp`` at each
layer), keyed by ``model.named_parameters()`` names; writing them back restores the model bit for bit.
The zu_fast ``Edit`` goes on the model's edit stack (``zu_fast.edits(model)[-1]``: report, save,
restore); one whose weights were put back through ``weights_copy`` is taken off the stack at the next
call. ``keep_original_weight`` and EasyEdit's other keyword arguments (``train_ds``, ...) have no effect.
"""

from __future__ import annotations

import copy as copy_module
import dataclasses
import hashlib
import importlib
import json
import os
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# the public API (zu_fast/__init__.py is initialised before any subpackage, and never imports compat)
from .. import CorpusStats, Edit, StaleStatsError, UnlearnConfig, UnlearnRequest, ZuFastError, collect_stats, edits
from .. import unlearn as zu_unlearn
from ..config.unlearn_config import parse_config_text
from ..model import get_module, tensor_fingerprint
from ..requests import check_lengths, max_positions, normalize_requests
from ..stats.store import check_stats_for_model

__all__ = [
    "ALGORITHMS",
    "ALG_NAME",
    "ALG_NAME_GD",
    "HPARAMS_DIR",
    "ZeroUnlearnHyperParams",
    "apply_zeroUnlearn_GD_to_model",
    "apply_zeroUnlearn_to_model",
    "hparams_path",
    "register",
    "to_unlearn_requests",
]

ALG_NAME = "ZeroUnlearn"
ALG_NAME_GD = "ZeroUnlearn-GD"
# Spellings of the GD variant's name: EasyEdit style, and the reference's folder names.
_GD_NAMES = {ALG_NAME_GD, "ZeroUnlearn_GD", "ZeroUnlearn_DG", "ZeroUnlearn-DG"}
HPARAMS_DIR = Path(__file__).resolve().parents[1] / "presets" / "easyedit"

# EasyEdit's own keys: read by BaseEditor and its evaluation, never by the method.
_EASYEDIT_KEYS = ("alg_name", "model_name", "device", "model_parallel", "batch_size", "max_length", "stats_dir",
                  "mom2_dataset", "mom2_dtype", "fp16", "evaluation_type", "use_chat_template", "api_key")


# --------------------------------------------------------------------------------- hparams ------
@dataclass
class ZeroUnlearnHyperParams:
    """ZeroUnlearn's hyperparameters in EasyEdit's style (a dataclass, ``from_hparams(path)`` reads YAML).

    The first group is EasyEdit's: what ``BaseEditor`` and its evaluation read. The second is
    ZeroUnlearn's, in zu_fast's flat ``UnlearnConfig`` names; None means "zu_fast's default" (for the
    model, via ``UnlearnConfig.for_model``, when ``layers`` is None too). ``extra`` holds any other key
    ``UnlearnConfig.from_dict`` accepts (zu_fast fields, the reference's hparams names).
    """

    # --- EasyEdit -----------------------------------------------------------------------------
    alg_name: str = ALG_NAME  # "ZeroUnlearn" or "ZeroUnlearn-GD" (ALG_DICT keys)
    model_name: Any = None  # a path or hub id: BaseEditor loads it
    device: int | str = 0  # where BaseEditor puts the model (int: cuda:<n>)
    model_parallel: bool = False
    batch_size: int = 1  # requests per edit in batch_edit (BaseEditor.edit needs 1)
    max_length: int = 40  # EasyEdit's evaluation
    stats_dir: str = "./data/stats"  # no effect: statistics are cached under ZU_FAST_CACHE
    mom2_dataset: str | None = None  # the statistics corpus: a local .txt / .jsonl file (never downloaded)
    mom2_dtype: str = "float32"  # no effect: accumulators are fp32, solves fp64
    fp16: bool = False  # BaseEditor loads the model in fp16 (zu_fast keeps the model's dtype)
    evaluation_type: str | None = None  # EasyEdit: None (teacher forcing), "LLM-judge", "generate-text"
    use_chat_template: bool = False
    api_key: str | None = None

    # --- ZeroUnlearn (zu_fast's UnlearnConfig keys) ---------------------------------------------
    method: str | None = None  # "closed_form" or "gd" (alg_name ZeroUnlearn-GD: "gd")
    layers: list[int] | None = None
    rewrite_module_tmp: str | None = None
    layer_module_tmp: str | None = None
    lm_head_module: str | None = None
    ln_f_module: str | None = None
    neutral_target: str | None = None  # None: EOS (a request's target_new overrides it)
    v_num_grad_steps: int | None = None
    v_lr: float | None = None
    v_weight_decay: float | None = None
    clamp_norm_factor: float | None = None
    kl_factor: float | None = None
    v_loss_layer: int | None = None
    mom2_n_samples: int | None = None
    stats_max_length: int | None = None
    mom2_update_weight_wk: float | None = None
    mom2_update_weight_wv: float | None = None
    forget_weight_fk: float | None = None
    forget_weight_fv: float | None = None
    forget_leverage: float | None = None
    retain_weight_rk: float | None = None  # weights of a retain set (zu_fast's retain=; unused without one)
    retain_weight_rv: float | None = None
    regularization_lam: float | None = None
    centered_cross_moment: bool | None = None
    projector_eps: float | None = None
    original_representation: str | None = None
    target_retry_clamp: float | None = None
    gd_null_threshold: float | None = None
    gd_null_energy: float | None = None
    gd_lr: float | None = None
    gd_steps: int | None = None
    gd_tol: float | None = None
    gd_orth_weight: float | None = None
    gd_remap_weight: float | None = None
    gd_norm_weight: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        name = str(self.alg_name)
        if name in _GD_NAMES:
            self.alg_name = ALG_NAME_GD
        elif name != ALG_NAME:
            raise ZuFastError(f"alg_name={self.alg_name!r}: ZeroUnlearnHyperParams are for {ALG_NAME!r} and "
                              f"{ALG_NAME_GD!r}")
        if self.alg_name == ALG_NAME_GD:
            if self.method not in (None, "gd"):
                raise ZuFastError(f"alg_name {ALG_NAME_GD!r} is ZeroUnlearn's GD variant; method={self.method!r} "
                                  "contradicts it (use alg_name 'ZeroUnlearn' for the closed form)")
            self.method = "gd"
        if not isinstance(self.extra, dict):
            raise ZuFastError(f"extra must be a mapping of UnlearnConfig keys, got {type(self.extra).__name__}")
        if "target_new" in self.extra:  # the reference's name of the neutral target: one field, requests override it
            if self.neutral_target is not None:
                raise ZuFastError("both target_new and neutral_target are set: they name the same neutral target")
            extra = dict(self.extra)
            self.neutral_target = extra.pop("target_new")
            self.extra = extra

        clash = sorted(set(self.extra) & {f.name for f in dataclasses.fields(self)})
        if clash:
            raise ZuFastError(f"extra repeats the fields {clash}: set them as fields")
        if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool) or self.batch_size < 1:
            raise ZuFastError(f"batch_size must be ≥ 1 (requests per edit in EasyEdit's batch_edit), got "
                              f"{self.batch_size}")

    # ------------------------------------------------------------------------- loading --------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str | None = None) -> ZeroUnlearnHyperParams:
        """From a mapping of EasyEdit keys, zu_fast keys and the reference's hparams keys.

        Keys that are not fields go to ``extra`` and are checked by ``UnlearnConfig.from_dict`` now
        (unknown keys are refused there, with the list of known ones); numbers written as strings
        (YAML 1.1 reads ``1e-1`` as a string) are converted.
        """
        where = f"{source}: " if source else ""
        if not isinstance(data, Mapping):
            raise ZuFastError(f"{where}expected a mapping of hparams keys, got {type(data).__name__}")
        if "alg_name" not in data and "alg" not in data:
            raise ZuFastError(f"{where}EasyEdit hparams name their algorithm: add alg_name: {ALG_NAME} "
                              f"(or {ALG_NAME_GD})")
        own = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {"extra": dict(data.get("extra") or {})}
        for key, value in data.items():
            if key == "extra":
                continue
            if key == "alg":  # EasyEdit's legacy spelling of alg_name
                key = "alg_name"
            if key in own:
                kwargs[key] = _coerce(own[key], key, value, where)
            else:
                kwargs["extra"][key] = value
        try:
            hp = cls(**kwargs)
            hp.to_config()  # every key checked now, not at the first edit
        except ZuFastError as e:
            raise ZuFastError(f"{where}{e}") from None
        return hp

    @classmethod
    def from_hparams(cls, hparams_name_or_path: str | os.PathLike) -> ZeroUnlearnHyperParams:
        """Read an EasyEdit-style hparams file (``.yaml``/``.yml``/``.json``; no suffix: ``.yaml`` is added)."""
        path = Path(hparams_name_or_path)
        if path.suffix not in (".yaml", ".yml", ".json"):
            path = path.with_name(path.name + ".yaml")
        try:
            text = path.read_text()
        except OSError as e:
            shipped = ", ".join(sorted(_shipped_names()))
            raise ZuFastError(f"cannot read hparams file {str(path)!r}: {e.strerror or e} (shipped: "
                              f"hparams_path(name) for {shipped})") from None
        data = parse_config_text(path, text, "hparams")  # the suffix is .yaml, .yml or .json here
        return cls.from_dict(data if data is not None else {}, source=str(path))

    from_json = from_hparams  # EasyEdit's HyperParams.from_json; the suffix decides the format

    @classmethod
    def preset(cls, name: str, *, gd: bool = False) -> ZeroUnlearnHyperParams:
        """The shipped YAML for ``name`` (``hparams_path``)."""
        return cls.from_hparams(hparams_path(name, gd=gd))

    def to_dict(self) -> dict[str, Any]:
        """Every field (EasyEdit's ``HyperParams.to_dict``)."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> ZeroUnlearnHyperParams:
        """A copy with ``changes`` (fields; other keys go to ``extra``)."""
        own = {f.name for f in dataclasses.fields(self)}
        extra = dict(self.extra) | {k: v for k, v in changes.items() if k not in own}
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if k in own}, extra=extra)

    # ------------------------------------------------------------------------- to zu_fast -----
    def method_settings(self) -> dict[str, Any]:
        """The ZeroUnlearn settings that are set, as flat ``UnlearnConfig`` keys (None fields left out)."""
        skip = set(_EASYEDIT_KEYS) | {"extra"}
        flat = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in skip and getattr(self, f.name) is not None}
        return flat | dict(self.extra)

    def to_config(self, model: torch.nn.Module | None = None, **overrides: Any) -> UnlearnConfig:
        """The ``UnlearnConfig`` these hparams describe (``overrides``: flat keys on top).

        With ``layers`` set, or without a model: ``UnlearnConfig.from_dict`` of the settings. Without
        ``layers`` and with a model: ``UnlearnConfig.for_model(model, **settings)`` (module names and
        layers for the model's family; the settings must then use zu_fast's own key names).
        """
        flat = self.method_settings() | overrides
        if "layers" in flat or model is None:
            return UnlearnConfig.from_dict(flat)
        try:
            return UnlearnConfig.for_model(model, **flat)
        except TypeError as e:
            raise ZuFastError(f"{e}: without layers the hparams are applied over UnlearnConfig.for_model(model), "
                              "which takes zu_fast's own key names; set layers (and the module templates) to "
                              "use the reference's names") from None


def _coerce(f: dataclasses.Field, name: str, value: Any, where: str) -> Any:
    """A YAML string such as ``1e-1`` as the number the field wants (EasyEdit's scientific-notation fix)."""
    kind = str(f.type)
    if not isinstance(value, str) or not ("float" in kind or "int" in kind) or "str" in kind or "list" in kind:
        return value
    try:
        return int(value) if "float" not in kind else float(value)
    except ValueError:
        raise ZuFastError(f"{where}{name}: expected a number, got {value!r}") from None


def _shipped_names() -> set[str]:
    return {p.stem for p in HPARAMS_DIR.glob("*/*.yaml")}


def hparams_path(name: str, *, gd: bool = False) -> Path:
    """The shipped EasyEdit YAML of a preset: ``zu_fast/presets/easyedit/<ZeroUnlearn|ZeroUnlearn-GD>/<name>.yaml``.

    Copy the two folders into EasyEdit's ``hparams/`` to use them there as EasyEdit's own files.
    """
    path = HPARAMS_DIR / (ALG_NAME_GD if gd else ALG_NAME) / f"{name.lower()}.yaml"
    if not path.exists():
        raise ZuFastError(f"no shipped EasyEdit hparams named {name!r}; shipped: {sorted(_shipped_names())}")
    return path


# --------------------------------------------------------------------------------- requests -----
_CORE = ("prompt", "subject", "ground_truth", "target_true", "target_new")


def _records(requests: Any) -> list[Mapping[str, Any]]:
    """EasyEdit's requests as a list of dicts: a list, one dict, or one dict of lists (columns)."""
    if isinstance(requests, Mapping):
        prompt = requests.get("prompt")
        if isinstance(prompt, (list, tuple)):  # columns: {"prompt": [...], "subject": [...], ...}
            n = len(prompt)
            cols = {}
            for k, v in requests.items():
                if isinstance(v, (list, tuple)) and (k in _CORE or k == "rephrase_prompt"):
                    if len(v) != n:
                        raise ZuFastError(f"requests: {k!r} has {len(v)} values for {n} prompts")
                    cols[k] = list(v)
                else:
                    cols[k] = [v] * n  # one value shared by every request
            return [{k: cols[k][i] for k in cols} for i in range(n)]
        return [requests]
    if isinstance(requests, (str, bytes)):
        raise ZuFastError("requests must be EasyEdit request dicts ({'prompt', 'subject', 'ground_truth', "
                          "'target_new', ...}), got a string")
    try:
        items = list(requests)
    except TypeError:
        raise ZuFastError(f"requests must be a list of EasyEdit request dicts, got {type(requests).__name__}") from None
    if not items:
        raise ZuFastError("no requests given: pass at least one {'prompt', 'subject', 'ground_truth'} request")
    for i, r in enumerate(items):
        if not isinstance(r, (Mapping, UnlearnRequest)):
            raise ZuFastError(f"request {i}: expected a dict, got {type(r).__name__}")
    return items


def _text(value: Any, key: str, where: str) -> Any:
    """``{"str": x}`` → x, ``[x]`` → x (MEMIT / CounterFact / zsRE spellings); anything else as given."""
    if isinstance(value, Mapping):
        if "str" not in value:
            raise ZuFastError(f"{where}: {key} dict needs a 'str' key, got {sorted(value)}")
        value = value["str"]
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise ZuFastError(f"{where}: {key} has {len(value)} values {list(value)!r}; ZeroUnlearn forgets one answer "
                              "per prompt: give the one the model gives (e.g. the first)")
        value = value[0]
    return value


def to_unlearn_requests(requests: Any) -> tuple[list[UnlearnRequest], list[Any]]:
    """EasyEdit requests → zu_fast's ``UnlearnRequest`` s and each request's ``target_new`` (unwrapped from
    ``{"str": ...}``; None when absent). Raises ZuFastError naming the request; duplicates are dropped
    with a warning and contradictions refused (``normalize_requests``)."""
    out: list[UnlearnRequest] = []
    targets: list[Any] = []
    for i, rec in enumerate(_records(requests)):
        if isinstance(rec, UnlearnRequest):
            out.append(rec)
            targets.append(None)
            continue
        rec = dict(rec)
        nested = rec.pop("requested_rewrite", None)  # CounterFact's layout: the rewrite nested
        if isinstance(nested, Mapping):
            rec = {**rec, **nested}
        where = f"request {i}"
        prompt, subject = rec.get("prompt"), rec.get("subject")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ZuFastError(f"{where}: 'prompt' must be a non-empty string, got {prompt!r}")
        if subject is None:
            raise ZuFastError(f"{where}: no 'subject'; ZeroUnlearn reads its keys at the subject's last token "
                              "(EasyEdit: editor.edit(..., subject=[...]))")
        keys = [k for k in ("ground_truth", "target_true") if rec.get(k) is not None]
        if not keys:
            raise ZuFastError(f"{where} ({prompt!r}): no 'ground_truth': ZeroUnlearn forgets the request's "
                              "ground_truth, the answer the model gives now (EasyEdit: editor.edit(..., "
                              "ground_truth=[...])); target_new is the neutral answer it should give instead")
        truth = _text(rec[keys[0]], keys[0], where)
        case_id = rec.get("case_id", i)
        extra = {k: v for k, v in rec.items() if k not in ("prompt", "subject", "ground_truth", "target_true",
                                                             "case_id")}
        if isinstance(subject, str) and "{}" not in prompt:
            if not subject.strip() or subject not in prompt:
                raise ZuFastError(f"{where}: subject {subject!r} does not occur in prompt {prompt!r} (the prompt "
                                  "spells the subject out, or is a template with '{}' where it goes)")
            req = UnlearnRequest.from_text(prompt, subject, truth, case_id=case_id, extra=extra)
        else:
            req = UnlearnRequest(prompt, subject, truth, case_id=case_id, extra=extra)
        out.append(req)
        target = rec.get("target_new")
        targets.append(None if target is None else _text(target, "target_new", where))
    kept = normalize_requests(out)  # duplicates dropped (warning), contradictions refused
    by_id = {id(r): t for r, t in zip(out, targets)}
    return kept, [by_id[id(r)] for r in kept]


def _neutral_target(targets: Sequence[Any], tok: Any, default: str | None) -> str | None:
    """The neutral target of one edit from the requests' ``target_new``: EOS for the tokenizer's EOS
    string, ``default`` (hparams.neutral_target) for absent or empty ones; all must agree."""
    eos = getattr(tok, "eos_token", None)
    seen: dict[Any, list[int]] = {}
    for i, t in enumerate(targets):
        if t is None or (isinstance(t, str) and not t.strip()):
            value = default
        elif not isinstance(t, str):
            raise ZuFastError(f"request {i}: target_new must be a string (the neutral answer), got {t!r}")
        elif eos is not None and t.strip() == eos:
            value = None
        else:
            value = t.strip()
        seen.setdefault(value, []).append(i)
    if len(seen) > 1:
        shown = "; ".join(f"{'EOS' if v is None else repr(v)} (requests {ids[:5]})" for v, ids in seen.items())
        raise ZuFastError(f"the requests ask for different target_new: {shown}. ZeroUnlearn maps the requests of one "
                          "edit to one neutral target: edit them in separate calls, or give them the same target_new")
    return next(iter(seen))


# --------------------------------------------------------------------------------- statistics ---
_STATS_MEMO: OrderedDict[tuple, CorpusStats] = OrderedDict()
_STATS_MEMO_SIZE = 2  # like EasyEdit's COV_CACHE: the statistics of the last models edited


def _corpus_key(corpus: Any) -> tuple | None:
    """What identifies a corpus across calls: a file by path, size and mtime; texts by their hash."""
    if isinstance(corpus, (str, os.PathLike)):
        p = Path(corpus).resolve()
        st = p.stat()
        return ("file", str(p), st.st_size, st.st_mtime_ns)
    if isinstance(corpus, (list, tuple)) and all(isinstance(t, str) for t in corpus):
        h = hashlib.sha256("\x00".join(corpus).encode("utf-8", "surrogatepass")).hexdigest()
        return ("texts", len(corpus), h)
    return None  # a datasets.Dataset or an iterator: not kept in memory (the disk cache still applies)


def _check_corpus(corpus: Any) -> Any:
    """A local corpus, or a ZuFastError before any work (never a download)."""
    if corpus is None:
        raise ZuFastError("ZeroUnlearn needs corpus statistics: set hparams.mom2_dataset to a local .txt (one text "
                          "per line) or .jsonl ('text') file, or pass stats=zu_fast.collect_stats(...) or corpus=...")
    if isinstance(corpus, (str, os.PathLike)):
        p = Path(corpus)
        if not p.is_file():
            raise ZuFastError(f"mom2_dataset={str(corpus)!r} is not a local file: zu_fast never downloads a dataset; "
                              "give the corpus itself, e.g. a .txt with one Wikipedia article per line (README, "
                              "'Reproduce the paper')")
    return corpus


def _stats_for(model: torch.nn.Module, tok: Any, corpus: Any, cfg: UnlearnConfig, settings: dict[str, Any]) -> Any:
    """The corpus statistics for this edit: from memory when they still belong to the model (or to the
    weights under its zu_fast edits), else ``collect_stats`` (disk-cached)."""
    ckey = _corpus_key(corpus)
    key = None
    if ckey is not None:
        key = (ckey, json.dumps({k: v for k, v in settings.items() if k not in ("neutral_target", "method")},
                                sort_keys=True, default=str))
        st = _STATS_MEMO.get(key)
        if st is not None:
            try:
                check_stats_for_model(model, cfg, st)
                _STATS_MEMO.move_to_end(key)
                return st
            except StaleStatsError:
                del _STATS_MEMO[key]
    st = collect_stats(model, tok, corpus, cfg)
    if key is not None:
        _STATS_MEMO[key] = st
        while len(_STATS_MEMO) > _STATS_MEMO_SIZE:
            _STATS_MEMO.popitem(last=False)
    return st


# --------------------------------------------------------------------------------- weights ------
_OUR_EDITS: weakref.WeakSet[Edit] = weakref.WeakSet()


def _edited_parameters(model: torch.nn.Module, cfg: UnlearnConfig) -> dict[str, torch.nn.Parameter]:
    """Every parameter of the edited modules, by its ``model.named_parameters()`` name (EasyEdit's
    ``nethook.get_parameter`` finds it under that name)."""
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, torch.nn.Parameter] = {}
    template = cfg.locate.rewrite_module
    for layer in cfg.layers:
        module = get_module(model, template.format(layer))
        for p in module.parameters():
            name = names.get(id(p))
            if name is not None:
                out[name] = p
    return out


def _put_back_outside(model: torch.nn.Module, e: Edit) -> bool:
    """True when every weight ``e`` edited is back at its fingerprint from before ``e`` (EasyEdit wrote
    ``weights_copy`` back)."""
    try:
        for layer, info in e.modules.items():
            w = get_module(model, info["name"]).weight
            if tensor_fingerprint(w.detach()) != e.base_fingerprints.get(layer):
                return False
    except (ZuFastError, AttributeError, KeyError):
        return False
    return bool(e.modules)


def _release_put_back(model: torch.nn.Module) -> None:
    """Take off the model's edit stack the edits this adapter made whose weights EasyEdit put back:
    ``Edit.restore`` writes the same original weights (bit for bit) and frees their backups."""
    for e in reversed(edits(model)):
        if e not in _OUR_EDITS or not _put_back_outside(model, e):
            break
        e.restore()


# --------------------------------------------------------------------------------- entry points -
def _as_hparams(hparams: Any) -> ZeroUnlearnHyperParams:
    if isinstance(hparams, ZeroUnlearnHyperParams):
        return hparams
    if isinstance(hparams, (str, os.PathLike)):
        return ZeroUnlearnHyperParams.from_hparams(hparams)
    if isinstance(hparams, Mapping):
        return ZeroUnlearnHyperParams.from_dict({"alg_name": ALG_NAME, **hparams})
    raise ZuFastError(f"hparams must be ZeroUnlearnHyperParams (from_hparams(path)), a path or a mapping, got "
                      f"{type(hparams).__name__}")


def _apply(model: torch.nn.Module, tok: Any, requests: Any, hparams: Any, copy: bool, return_orig_weights: bool,
           method: str | None, kwargs: dict[str, Any]) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    hp = _as_hparams(hparams)
    reqs, targets = to_unlearn_requests(requests)
    overrides: dict[str, Any] = {"neutral_target": _neutral_target(targets, tok, hp.neutral_target)}
    if method is not None:
        overrides["method"] = method
    cfg = hp.to_config(model, **overrides)
    stats = kwargs.get("stats")
    corpus = None
    if stats is None:
        corpus = _check_corpus(kwargs.get("corpus") if kwargs.get("corpus") is not None else hp.mom2_dataset)
    if tok is None:
        raise ZuFastError("ZeroUnlearn needs the model's tokenizer (tok), got None")
    check_lengths(reqs, tok, max_positions(model))  # before the statistics pass (unlearn checks with room to spare)
    if copy:
        model = copy_module.deepcopy(model)
    _release_put_back(model)
    if stats is None:
        stats = _stats_for(model, tok, corpus, cfg, hp.method_settings() | overrides)
    params = _edited_parameters(model, cfg)
    weights_copy = {n: p.detach().clone() for n, p in params.items()} if return_orig_weights else {}
    edit = zu_unlearn(model, tok, reqs, cfg, stats=stats, context_templates=kwargs.get("context_templates"))
    _OUR_EDITS.add(edit)
    return model, weights_copy


def apply_zeroUnlearn_to_model(
    model: torch.nn.Module,
    tok: Any,
    requests: Any,
    hparams: ZeroUnlearnHyperParams | Mapping[str, Any] | str | os.PathLike,
    copy: bool = False,
    return_orig_weights: bool = False,
    keep_original_weight: bool = False,
    **kwargs: Any,
) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """EasyEdit's ``apply_algo`` for ZeroUnlearn: make ``model`` forget the requests' ground truth.

    Returns ``(model, weights_copy)``: the edited model (a deep copy when ``copy=True``; the model given
    is then untouched) and, with ``return_orig_weights=True``, ``{parameter name: original tensor}``
    for every parameter of the edited modules (writing them back restores the model bit for bit),
    else ``{}``. The method follows ``hparams.method`` ("closed_form" by default). ``kwargs``:
    ``stats`` (``zu_fast.collect_stats`` output), ``corpus`` (instead of ``hparams.mom2_dataset``),
    ``context_templates``; EasyEdit's others (``train_ds``, ...) and ``keep_original_weight`` have no
    effect. Request keys and their meaning: the module docstring.
    """
    del keep_original_weight  # EasyEdit passes it; restoring goes through weights_copy
    return _apply(model, tok, requests, hparams, copy, return_orig_weights, None, kwargs)


def apply_zeroUnlearn_GD_to_model(
    model: torch.nn.Module,
    tok: Any,
    requests: Any,
    hparams: ZeroUnlearnHyperParams | Mapping[str, Any] | str | os.PathLike,
    copy: bool = False,
    return_orig_weights: bool = False,
    keep_original_weight: bool = False,
    **kwargs: Any,
) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """``apply_zeroUnlearn_to_model`` with ``method="gd"`` (ZeroUnlearn-GD), whatever ``hparams.method``
    says; the GD YAML files (``hparams_path(name, gd=True)``) carry the paper's GD settings."""
    del keep_original_weight
    return _apply(model, tok, requests, hparams, copy, return_orig_weights, "gd", kwargs)


ALGORITHMS: dict[str, Callable[..., tuple[torch.nn.Module, dict[str, torch.Tensor]]]] = {
    ALG_NAME: apply_zeroUnlearn_to_model,
    ALG_NAME_GD: apply_zeroUnlearn_GD_to_model,
}


def register(package: str = "easyeditor", *, batchable: bool = True) -> dict[str, Callable[..., Any]]:
    """Add ZeroUnlearn and ZeroUnlearn-GD to EasyEdit's algorithm table (``easyeditor.util.alg_dict.ALG_DICT``,
    the dict ``BaseEditor`` looks ``hparams.alg_name`` up in) and, with ``batchable``, let
    ``BaseEditor.batch_edit`` run them (``BatchEditor.is_batchable_method``). Idempotent; returns ALG_DICT.
    """
    try:
        alg_dict = importlib.import_module(f"{package}.util.alg_dict")
    except ImportError as e:
        raise ZuFastError(f"cannot import EasyEdit ({package}.util.alg_dict): {e}; install EasyEdit or put its "
                          "folder on sys.path") from None
    table = alg_dict.ALG_DICT
    table.update(ALGORITHMS)
    if batchable:
        batch_editor = importlib.import_module(f"{package}.editors.batch_editor").BatchEditor
        before = batch_editor.is_batchable_method
        if not getattr(before, "_zu_fast", False):
            def is_batchable_method(alg_name: str, _before: Callable[[str], bool] = before) -> bool:
                return alg_name in ALGORITHMS or _before(alg_name)

            is_batchable_method._zu_fast = True  # type: ignore[attr-defined]
            batch_editor.is_batchable_method = staticmethod(is_batchable_method)
    return table
