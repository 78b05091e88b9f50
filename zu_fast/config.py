"""UnlearnConfig: every knob of the method, presets per architecture, JSON/YAML loading.

Defaults are the reference values (ALGORITHM.md and the authors' ``hparams/ZeroUnlearn/*.json``).
``UnlearnConfig.from_json`` also reads the reference code base's hparams files unchanged (and the
MEMIT / AlphaEdit / EasyEdit key names): every key it knows is mapped, keys that no ZeroUnlearn code
path reads are accepted with a warning that says so, and unknown keys are refused, so nothing is
silently dropped. Named presets (``UnlearnConfig.preset(name)``) are data files in
``zu_fast/presets/``.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ZuFastError


@dataclass
class UnlearnConfig:
    """Configuration of one unlearning run (and of the statistics it needs).

    Module names are templates with ``{}`` for the layer index, e.g.
    ``"model.layers.{}.mlp.down_proj"``.
    """

    # --- where to edit -------------------------------------------------------------------
    layers: list[int] = field(default_factory=lambda: [19, 20, 21])
    rewrite_module_tmp: str = "model.layers.{}.mlp.down_proj"  # the edited linear map W: k → v
    layer_module_tmp: str = "model.layers.{}"  # decoder layer; z lives at the last edited one's output
    lm_head_module: str = "lm_head"

    # --- the neutral target -------------------------------------------------------------
    neutral_target: str | None = None  # None: the tokenizer's EOS token; else any string

    # --- step 0: context templates ------------------------------------------------------
    context_template_prompts: list[str] = field(
        default_factory=lambda: ["The", "Therefore", "Because", "I", "You"]
    )
    context_template_length: int = 10  # tokens generated per context template
    context_template_seed: int = 0

    # --- step 2: target hidden states z -------------------------------------------------
    v_num_grad_steps: int = 25
    v_lr: float = 0.1  # the reference's hparams files (1e-1)
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    v_early_stop_loss: float = 0.05
    targets_batch_size: int = 64  # requests optimised together (independent rows of δ)
    # Each step forwards the running requests' prompts in up to this many batches padded to their own
    # longest prompt (1: one batch padded to the longest of all; see method/targets.length_buckets).
    targets_length_buckets: int = 4
    # The reference reads the target NLL from ``ln_f(output of decoder layer v_loss_layer)`` through the
    # LM head (the KL term always from the model's own logits). None or the last layer: the model's own
    # logits. Only Qwen3-4B's reference file names a layer below the top (31 of 36), kept for fidelity.
    v_loss_layer: int | None = None
    ln_f_module: str = "model.norm"  # used only when v_loss_layer is below the last layer
    # Requests whose target loss stays above this after the optimisation are reported as not converged
    # (a warning and ``edit.report.flags``): their neutral target is not the model's likely continuation.
    target_warn_loss: float = 0.7
    # Those requests get one more target optimisation with the clamp radius widened this many times and twice
    # the steps (kept when it ends lower; method/targets.retry_unreached). None: no retry (the reference).
    target_retry_clamp: float | None = None

    # --- step 3: original representation and projector ----------------------------------
    projector_eps: float = 0.01  # P = (1+ε) I − U Uᵀ
    original_representation: str = "optimized"  # "optimized" (reference) or "clean"
    basis_rtol: float = 1e-6  # singular values below rtol·σ_max are dropped from U

    # --- step 4: corpus statistics -------------------------------------------------------
    stats_mode: str = "derived"  # "derived" (Σvkᵀ = W Σkkᵀ) or "measured" (accumulate V·Kᵀ)
    mom2_n_samples: int = 100_000  # texts read from the corpus at most
    stats_max_length: int = 4096  # tokens per text at most (longer texts are truncated)
    stats_batch_tokens: int = 8192  # token budget per forward batch
    stats_token_budget: int | None = None  # stop after this many (non-padding) tokens

    # --- step 5: closed form ------------------------------------------------------------
    mom2_update_weight_wk: float = 15000.0  # λ_wK
    mom2_update_weight_wv: float = 15000.0  # λ_wV
    forget_weight_fk: float = 50.0  # λ_fK
    forget_weight_fv: float = 50.0  # λ_fV
    # When set: per layer, raise λ_fK and λ_fV together (the configured values are a floor) until the
    # forget requests' mean leverage — the fraction of each residual the edit realises against the corpus
    # term, method/leverage.py — reaches this. The paper's weights were tuned on 3–8B models; narrower
    # models need more (on the project's small model λ_f = 50 realises ~20%). None: the weights as set.
    forget_leverage: float | None = None
    regularization_lam: float = 1.0  # λ
    # X = (1/(n−1)) Σ v kᵀ (uncentred, what the reference computes: its running-mean merge shrinks the
    # means to ~0); True: the exactly centred (1/(n−1)) Σ (v−μ_v)(k−μ_k)ᵀ its code was written for.
    centered_cross_moment: bool = False
    closed_form: str = "fast"  # "fast" (one W·C·Wᵀ product) or "exact" (dense, for verification)
    gram_chunk: int = 4096  # columns of C per chunk in the W·C·Wᵀ product
    gram_precision: str = "auto"  # "auto", "fp64", "fp32", "bf16x2" (bf16 tensor cores, split hi+lo)

    # --- method choice and the GD variant ----------------------------------------------
    method: str = "closed_form"  # "closed_form" or "gd"
    gd_lr: float = 1e-3
    gd_steps: int = 500
    gd_null_threshold: float = 1e-2  # P_null: eigenvectors of C with eigenvalue ≤ this (the reference's rule)
    # Scale-free alternative (replaces gd_null_threshold when set): P_null spans the smallest
    # eigen-directions of C that together carry at most this fraction of the corpus keys' energy
    # tr C = E‖k‖², so E‖P_null k‖² ≤ gd_null_energy · E‖k‖² on the corpus whatever C's scale.
    gd_null_energy: float | None = None
    gd_orth_weight: float = 1.0
    gd_remap_weight: float = 100.0
    gd_norm_weight: float = 0.1
    gd_tol: float = 1e-4  # early stop: relative loss decrease < gd_tol over gd_window steps (0: run all gd_steps)
    gd_window: int = 20
    gd_precision: str = "fp32"  # "fp32" or "fp64" (the reference's round-off)
    # What Adam optimises: "dense" Δ [d, d_in] (the reference's iterates, exactly) or "null", the
    # edit's coordinates X [d, null rank] in C's null-space eigenbasis (same objective, a different
    # trajectory: Adam is not rotation invariant; far cheaper per step; its lr is scaled by
    # sqrt(d_in / null rank) so that a step makes the dense Δ's progress; see RESULTS.md).
    gd_variable: str = "dense"

    # --- safety --------------------------------------------------------------------------
    # An edited layer whose weight moves by more than this fraction of its Frobenius norm is flagged
    # (a warning with the numbers and ``edit.report.flags``). Measured sizes of edits that keep the model
    # intact (benchmarks/RESULTS.md): 0.33 on the reference case, 0.8–2.2 on the small model (GD and the
    # closed form alike: its layers are small next to the residual stream); an ill-posed solve gives 10×+.
    max_rel_weight_change: float = 3.0
    # An edit that moves the z layer's output (at the subject's last token) less than this fraction of the
    # way to the targets z is flagged ("target_not_reached": a warning and ``edit.report.flags``).
    min_gap_closed: float = 0.5

    # --- misc -----------------------------------------------------------------------------
    batch_size: int = 32  # prompts per forward when reading keys/values
    backup_device: str | None = "cpu"  # where Edit keeps original weights (None: the weight's device)
    progress: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        self.layers = [int(x) for x in self.layers]
        self.context_template_prompts = list(self.context_template_prompts)
        self.validate()

    # ----------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ZuFastError on settings that cannot work."""
        if not self.layers:
            raise ZuFastError("config.layers is empty: name at least one layer to edit")
        if sorted(set(self.layers)) != self.layers:
            raise ZuFastError(f"config.layers must be strictly increasing, got {self.layers}")
        for name in ("rewrite_module_tmp", "layer_module_tmp"):
            if "{}" not in getattr(self, name):
                raise ZuFastError(f"config.{name}={getattr(self, name)!r} must contain '{{}}' for the layer")
        choices = {
            "stats_mode": ("derived", "measured"),
            "closed_form": ("fast", "exact"),
            "method": ("closed_form", "gd"),
            "original_representation": ("optimized", "clean"),
            "gram_precision": ("auto", "fp64", "fp32", "bf16x2"),
            "gd_precision": ("fp32", "fp64"),
            "gd_variable": ("dense", "null"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ZuFastError(f"config.{name}={getattr(self, name)!r}; choose one of {allowed}")
        positive = ("stats_batch_tokens", "stats_max_length", "batch_size", "targets_batch_size", "gram_chunk",
                    "targets_length_buckets")
        for name in positive:
            if int(getattr(self, name)) <= 0:
                raise ZuFastError(f"config.{name} must be positive, got {getattr(self, name)}")
        if self.target_retry_clamp is not None and not float(self.target_retry_clamp) > 1.0:
            raise ZuFastError(
                f"config.target_retry_clamp must be > 1 (a wider clamp) or None, got {self.target_retry_clamp}")
        if self.forget_leverage is not None and not 0.0 < float(self.forget_leverage) < 1.0:
            raise ZuFastError(
                f"config.forget_leverage must be in (0, 1) (a fraction of each residual), got {self.forget_leverage}")
        if self.gd_null_energy is not None and not 0.0 < float(self.gd_null_energy) < 1.0:
            raise ZuFastError(
                f"config.gd_null_energy must be in (0, 1) (a fraction of tr C), got {self.gd_null_energy}")
        if self.regularization_lam < 0 or self.projector_eps < -1:
            raise ZuFastError("config.regularization_lam must be ≥ 0 and projector_eps > -1")
        if self.v_loss_layer is not None and int(self.v_loss_layer) < 0:
            raise ZuFastError(f"config.v_loss_layer must be a layer index ≥ 0 (or None), got {self.v_loss_layer}")
        if not self.max_rel_weight_change > 0 or not self.target_warn_loss >= 0 or not self.min_gap_closed <= 1:
            raise ZuFastError("config.max_rel_weight_change must be > 0, target_warn_loss ≥ 0 and min_gap_closed ≤ 1")

    @property
    def z_layer(self) -> int:
        return self.layers[-1]

    def replace(self, **changes: Any) -> UnlearnConfig:
        """A copy with ``changes`` applied (validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ---------------------------------------------------------------- loading ---------
    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides: Any) -> UnlearnConfig:
        """Build from our own keys or the reference code's hparams keys.

        Keys of the reference (ZeroUnlearn, MEMIT, AlphaEdit, EasyEdit) that no ZeroUnlearn code path
        reads are accepted with one warning naming them and why; unknown keys are refused. Numbers
        written as strings (YAML 1.1 reads ``1e-1`` as a string) are converted by the field's type.
        """
        own = {f.name: f for f in dataclasses.fields(cls)}
        merged = {**data, **overrides}
        kwargs: dict[str, Any] = {}
        unknown, no_effect = [], {}
        # a ZeroUnlearn file names both λ_w (wiki_*_lam) and MEMIT's mom2_update_weight: λ_w wins
        has_wiki = "wiki_KKT_lam" in merged or "wiki_VKT_lam" in merged
        for key, value in merged.items():
            if key in own:
                kwargs[key] = value
            elif key == "mom2_update_weight" and has_wiki:
                no_effect[key] = "the ZeroUnlearn code reads wiki_KKT_lam / wiki_VKT_lam instead"
            elif key in _REFERENCE_KEYS:
                target = _REFERENCE_KEYS[key]
                if callable(target):
                    fields, why = target(value)
                    kwargs.update(fields)
                    if why:
                        no_effect[key] = why
                else:
                    kwargs[target] = value
            elif key in _NO_EFFECT_KEYS:
                why = _NO_EFFECT_KEYS[key]
                if why:
                    no_effect[key] = why
            else:
                unknown.append(key)
        if unknown:
            raise ZuFastError(
                f"unknown config keys {sorted(unknown)}; known: our fields {sorted(own)}, the reference hparams "
                f"keys {sorted(_REFERENCE_KEYS)} and the keys accepted without effect {sorted(_NO_EFFECT_KEYS)}"
            )
        if no_effect:
            warnings.warn(
                "config keys with no effect in zu_fast: "
                + "; ".join(f"{k} ({why})" for k, why in sorted(no_effect.items())),
                stacklevel=2,
            )
        return cls(**{k: _coerce(own[k], k, v) for k, v in kwargs.items()})

    @classmethod
    def from_json(cls, path: str | Path, **overrides: Any) -> UnlearnConfig:
        """Load a JSON (or .yaml/.yml) file with our keys or the reference hparams keys.

        A file in a folder named ``ZeroUnlearn_DG`` (the reference's GD hparams) selects the GD variant
        with the reference's hard-coded GD settings, as the reference does by folder name.
        """
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise ZuFastError(f"cannot read config file {str(path)!r}: {e.strerror or e}") from None
        if path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError as e:  # pragma: no cover - depends on the environment
                raise ZuFastError("reading YAML configs needs pyyaml: pip install pyyaml") from e
            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise ZuFastError(f"{path}: not valid YAML ({e})") from None
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise ZuFastError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ZuFastError(f"{path}: expected a mapping of config keys")
        if path.parent.name in _REFERENCE_GD_DIRS and "method" not in data and "method" not in overrides:
            # The reference picks the algorithm by the hparams folder (hparams/<alg_name>/<model>.json);
            # its GD hard-codes Adam lr 1e-3, 500 steps and no early stop.
            data = {**data, **_REFERENCE_GD}
        try:
            return cls.from_dict(data, **overrides)
        except ZuFastError as e:
            raise ZuFastError(f"{path}: {e}") from None

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    # ---------------------------------------------------------------- presets ---------
    @classmethod
    def for_model(cls, model: Any, **overrides: Any) -> UnlearnConfig:
        """Preset for a HuggingFace causal LM (or its config): the paper's exact settings for the models
        it tunes (see :meth:`preset`), else module names for the family (``SUPPORTED_FAMILIES``), layers
        by the paper's depth rule, GD's null space by the scale-free energy rule, the closed form's forget
        weights by the leverage rule and (GD) a wider retry for targets that were not reached.

        Given a model (not just its config), module names are checked on it and the LM head and final
        norm are taken from it (transformers renames them between versions), an unknown decoder-only
        architecture is probed for the usual names (with a warning saying what was guessed, unless
        ``overrides`` set the templates), and the layers are validated here: a config that cannot work
        on this model raises ZuFastError now, not at the first expensive call.
        """
        mcfg = getattr(model, "config", model)
        module = model if hasattr(model, "named_modules") else None
        fields = preset_for(mcfg, explicit=set(overrides), model=module)
        if {**fields, **overrides}.get("method", "closed_form") == "closed_form":
            # GD only: a retried target lies farther out, and the closed form's d×d multiplier spreads the
            # larger edit onto other inputs (small model, 16 seeds: specificity 85 → 80; RESULTS.md)
            fields.pop("target_retry_clamp", None)
        cfg = cls(**{**fields, **overrides})
        if module is not None:
            _check_on_model(module, cfg)
        else:
            n = _n_layers(mcfg)
            if n is not None and max(cfg.layers) >= n:
                raise ZuFastError(f"layers {cfg.layers} out of range: the model has {n} layers (0..{n - 1})")
        return cfg

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> UnlearnConfig:
        """A named preset from ``zu_fast/presets/<name>.json`` (names: :meth:`presets`).

        ``"llama-3.1-8b-instruct"``, ``"llama-3.2-3b-instruct"`` and ``"qwen3-4b"`` are the paper's
        hparams files exactly (``...-gd`` for ZeroUnlearn-GD); others follow the paper's layer rule.
        """
        data = _load_preset(name)
        return cls(**{**data["config"], **overrides})

    @staticmethod
    def presets() -> dict[str, str]:
        """Names of the shipped presets → their one-line descriptions."""
        return {p.stem: _load_preset(p.stem).get("description", "") for p in sorted(PRESETS_DIR.glob("*.json"))}


def _coerce(f: dataclasses.Field, name: str, value: Any) -> Any:
    """``value`` converted to field ``f``'s scalar type when it is a numeric string or an int for a float."""
    kind = str(f.type)
    if isinstance(value, bool) or value is None:
        return value
    try:
        if kind in ("float", "float | None") and isinstance(value, (str, int)):
            return float(value)
        if kind in ("int", "int | None") and isinstance(value, str):
            return int(value)
    except ValueError:
        raise ZuFastError(f"config.{name}: expected a number, got {value!r}") from None
    return value


# Reference hparams key → our field, or a function value → (fields, why-no-effect or None).
def _mom2_weight(v: Any) -> tuple[dict[str, Any], None]:
    return {"mom2_update_weight_wk": float(v), "mom2_update_weight_wv": float(v)}, None


def _nullspace_threshold(v: Any) -> tuple[dict[str, Any], str]:
    # The reference's GD hard-codes 0.01 whatever the file says (0.02 in every shipped file).
    return {"gd_null_threshold": 0.01}, (f"the reference's GD ignores it ({v}) and hard-codes 0.01, which "
                                         "zu_fast uses too (gd_null_threshold=0.01)")


def _fact_token(v: Any) -> tuple[dict[str, Any], None]:
    if v != "subject_last":
        raise ZuFastError(f"fact_token={v!r}: zu_fast reads keys at the subject's last token ('subject_last') only")
    return {}, None


def _layer_selection(v: Any) -> tuple[dict[str, Any], None]:
    if v != "all":
        raise ZuFastError(f"layer_selection={v!r}: zu_fast edits every listed layer ('all') only")
    return {}, None


_REFERENCE_GD_DIRS = ("ZeroUnlearn_DG", "ZeroUnlearn_GD")
_REFERENCE_GD = {"method": "gd", "gd_lr": 1e-3, "gd_steps": 500, "gd_tol": 0.0, "gd_orth_weight": 1.0,
                 "gd_remap_weight": 100.0, "gd_norm_weight": 0.1}

_REFERENCE_KEYS: dict[str, Any] = {
    # ZeroUnlearn (hparams/ZeroUnlearn/*.json, hparams/ZeroUnlearn_DG/*.json)
    "wiki_KKT_lam": "mom2_update_weight_wk",
    "wiki_VKT_lam": "mom2_update_weight_wv",
    "forget_KKT_lam": "forget_weight_fk",
    "forget_VKT_lam": "forget_weight_fv",
    "nullspace_threshold": _nullspace_threshold,
    "fact_token": _fact_token,
    "layer_selection": _layer_selection,
    # MEMIT / AlphaEdit / ROME names
    "mom2_update_weight": _mom2_weight,
    "forget_weight": lambda v: ({"forget_weight_fk": float(v), "forget_weight_fv": float(v)}, None),
    "target_new": "neutral_target",
}

# Accepted keys that change nothing: "" = silently (bookkeeping, or what zu_fast always does), else the
# reason, given in one warning (a user should know that a number in their file is not used).
_NO_EFFECT_KEYS: dict[str, str] = {
    "alg_name": "",
    "model_name": "",
    "mlp_module_tmp": "",  # read by no ZeroUnlearn code path
    "attn_module_tmp": "",
    "mom2_dataset": "",  # the corpus is an argument of collect_stats
    "mom2_dtype": "",  # accumulators are always fp32, solves fp64
    "mom2_adjustment": "",  # a ROME/MEMIT switch; ZeroUnlearn always uses the statistics
    "L2": "read by no ZeroUnlearn code path of the reference (λ is regularization_lam)",
    "retain_KKT_lam": "read by no code path of the reference (retain records are only appended to the corpus)",
    "retain_VKT_lam": "read by no code path of the reference (retain records are only appended to the corpus)",
    "context_template_length_params": "zu_fast generates one 10-token template per prompt, as the reference does",
    "max_length": "statistics truncate texts to stats_max_length (and the model's context)",
    # EasyEdit / MEMIT bookkeeping: where things live, not what the method computes
    "stats_dir": "statistics are cached under ZU_FAST_CACHE or the cache_path argument",
    "device": "zu_fast works on the devices the model lives on",
    "model_parallel": "zu_fast works on the devices the model lives on",
    "batch_size_eval": "",
    "max_epochs": "",
    "kl_coef": "",
    "fp16": "zu_fast keeps the model's dtype",
    "bf16": "zu_fast keeps the model's dtype",
}


# --------------------------------------------------------------------------- presets ------
PRESETS_DIR = Path(__file__).parent / "presets"


def _load_preset(name: str) -> dict[str, Any]:
    path = PRESETS_DIR / f"{name.lower()}.json"
    if not path.exists():
        names = sorted(p.stem for p in PRESETS_DIR.glob("*.json"))
        raise ZuFastError(f"no preset named {name!r}; shipped presets: {names}")
    data = json.loads(path.read_text())
    if "config" not in data:
        raise ZuFastError(f"{path}: a preset needs a 'config' mapping")
    return data


def _model_signature(mcfg: Any) -> dict[str, Any]:
    get = lambda *names: next((getattr(mcfg, n) for n in names if getattr(mcfg, n, None) is not None), None)  # noqa: E731
    return {
        "model_type": getattr(mcfg, "model_type", None),
        "num_hidden_layers": get("num_hidden_layers", "n_layer", "num_layers"),
        "hidden_size": get("hidden_size", "n_embd", "d_model"),
        "intermediate_size": get("intermediate_size", "n_inner", "ffn_dim"),
    }


def _matching_preset(mcfg: Any) -> dict[str, Any] | None:
    """The shipped preset whose ``match`` block equals this model's signature (every key it names)."""
    sig = _model_signature(mcfg)
    for path in sorted(PRESETS_DIR.glob("*.json")):
        data = json.loads(path.read_text())
        match = data.get("match")
        if match and all(sig.get(k) == v for k, v in match.items()):
            return data["config"]
    return None


def _three_layers_ending_at(n_layers: int, last: int) -> list[int]:
    """Up to three consecutive layers ending at ``last``, kept inside [0, n_layers − 2] so that a layer
    lies above z (the target optimisation runs the layers above it). Shallow models get fewer: 3 layers
    → [0, 1], 2 layers → [0], 1 layer → [0] (z is then the top layer, the only choice)."""
    last = max(0, min(max(n_layers - 2, 0), last))
    return list(range(max(0, last - 2), last + 1))


def _default_layers(n_layers: int) -> list[int]:
    """The paper's rule: three consecutive layers ending at 21/32 of the depth, rounded half up
    (19–21 of 32 and 16–18 of 28, as its Llama files; Qwen3-4B's 9–11 of 36 is its exception)."""
    return _three_layers_ending_at(n_layers, int(n_layers * 21 / 32 + 0.5))


# Decoder-only families: where the edited module and the decoder layers are (``for_model`` checks them on
# the model and takes the LM head and final norm from the model itself). For mixture-of-experts families
# the edited module is the MoE block: its routed experts (fused 3-D parameters) and shared expert are
# edited per expert (zu_fast.method.moe).
_LLAMA_STYLE = {"rewrite_module_tmp": "model.layers.{}.mlp.down_proj", "layer_module_tmp": "model.layers.{}",
                "lm_head_module": "lm_head", "ln_f_module": "model.norm"}
_MOE = {**_LLAMA_STYLE, "rewrite_module_tmp": "model.layers.{}.mlp"}
FAMILIES: dict[str, dict[str, str]] = {
    **{t: _LLAMA_STYLE for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
                                 "olmo", "olmo2")},
    "gemma3": {"rewrite_module_tmp": "model.language_model.layers.{}.mlp.down_proj",
               "layer_module_tmp": "model.language_model.layers.{}", "lm_head_module": "lm_head",
               "ln_f_module": "model.language_model.norm"},  # Gemma3ForConditionalGeneration (text and vision)
    "gpt2": {"rewrite_module_tmp": "transformer.h.{}.mlp.c_proj", "layer_module_tmp": "transformer.h.{}",
             "lm_head_module": "lm_head", "ln_f_module": "transformer.ln_f"},
    "gptj": {"rewrite_module_tmp": "transformer.h.{}.mlp.fc_out", "layer_module_tmp": "transformer.h.{}",
             "lm_head_module": "lm_head", "ln_f_module": "transformer.ln_f"},
    "gpt_neox": {"rewrite_module_tmp": "gpt_neox.layers.{}.mlp.dense_4h_to_h", "layer_module_tmp": "gpt_neox.layers.{}",
                 "lm_head_module": "lm_head", "ln_f_module": "gpt_neox.final_layer_norm"},
    "opt": {"rewrite_module_tmp": "model.decoder.layers.{}.fc2", "layer_module_tmp": "model.decoder.layers.{}",
            "lm_head_module": "lm_head", "ln_f_module": "model.decoder.final_layer_norm"},
    "falcon": {"rewrite_module_tmp": "transformer.h.{}.mlp.dense_4h_to_h", "layer_module_tmp": "transformer.h.{}",
               "lm_head_module": "lm_head", "ln_f_module": "transformer.ln_f"},
    "phi": {"rewrite_module_tmp": "model.layers.{}.mlp.fc2", "layer_module_tmp": "model.layers.{}",
            "lm_head_module": "lm_head", "ln_f_module": "model.final_layernorm"},
    **{t: _MOE for t in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v2", "deepseek_v3")},
}
SUPPORTED_FAMILIES = tuple(sorted(FAMILIES))
# OPT keeps the reference's settings except step 3: the optimised original representation adds δ at
# fc2's output, which OPT computes on flattened tokens [batch·seq, d] where method/targets.py places δ
# only in [batch, seq, d] outputs; the clean module output (the same on the small model, design notes)
# needs no injection there.
_FAMILY_EXTRA: dict[str, dict[str, Any]] = {"opt": {"original_representation": "clean"}}
# Families the paper never tuned: GD's null space by the scale-free energy rule (1% of tr C), which
# transfers across weight scales and corpora where the reference's absolute eigenvalue threshold does not
# (docs/design-notes.md, "The GD null space"). The closed form's forget weights by the leverage rule
# (method/leverage.py, design notes "The closed form's leverage"): the paper's λ_f = 50 realises a fifth of
# the residual on a narrow model. The paper's named presets keep the reference's threshold and weights.
_UNTUNED_DEFAULTS: dict[str, Any] = {"gd_null_energy": 0.01, "forget_leverage": 0.7, "target_retry_clamp": 2.0}
_ENCODER_ONLY = ("bert", "roberta", "xlm-roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2",
                 "mpnet", "modernbert", "camembert", "ernie")


def _n_layers(mcfg: Any) -> int | None:
    text = getattr(mcfg, "text_config", None)  # multimodal configs (Gemma3) keep the decoder's depth there
    for c in (mcfg, text):
        for name in ("num_hidden_layers", "n_layer", "num_layers"):
            v = getattr(c, name, None) if c is not None else None
            if isinstance(v, int):
                return v
    return None


def _not_causal(mcfg: Any, model: Any) -> str | None:
    """Why this model cannot be edited (an encoder-decoder or encoder-only model), else None."""
    model_type = getattr(mcfg, "model_type", None)
    kind = None
    if getattr(mcfg, "is_encoder_decoder", False):
        kind = "an encoder-decoder model"
    elif model_type in _ENCODER_ONLY:
        kind = "an encoder-only model"
    elif model is not None and hasattr(model, "get_output_embeddings"):
        try:
            head = model.get_output_embeddings()
        except NotImplementedError:
            head = None
        if head is None:
            kind = f"a model without an LM head ({type(model).__name__})"
    if kind is None:
        return None
    return (f"{type(model).__name__ if model is not None else 'model_type=' + repr(model_type)} is {kind}; zu_fast "
            "edits decoder-only causal language models (a ...ForCausalLM with its LM head) of the families "
            f"{', '.join(SUPPORTED_FAMILIES)}, and other decoder-only models whose MLP output projection it can name "
            "(set rewrite_module_tmp / layer_module_tmp)")


def preset_for(mcfg: Any, *, explicit: set[str] | frozenset[str] = frozenset(), model: Any = None) -> dict[str, Any]:
    """Preset fields for a transformers config (or anything with model_type/num_hidden_layers).

    ``explicit``: the fields the caller sets itself (no warning about guessing what it set).
    ``model``: the model itself, when known: the LM head and final norm are then taken from it, and an
    unknown architecture is probed for its decoder layers and MLP output projection.
    """
    model_type = getattr(mcfg, "model_type", None)
    n_layers = _n_layers(mcfg)
    why = _not_causal(mcfg, model)
    if why:
        raise ZuFastError(why)
    found: dict[str, Any] = {}
    if model is not None:
        from .model.locate import resolve_names  # lazy: model.locate imports this module

        found = resolve_names(model, n_layers)
        n_layers = n_layers or found.get("n_layers")
    if n_layers is not None and n_layers < 1:
        raise ZuFastError(f"model_type={model_type!r} has {n_layers} layers: nothing to edit")
    from_model = {k: found[k] for k in ("lm_head_module", "ln_f_module") if k in found}
    if str(getattr(mcfg, "zu_fast_model", "")).startswith("zu-tiny"):
        # Measured on the project's small models (docs/design-notes.md, "Presets"): GD at the lower half.
        fields = dict(_load_preset("zu-tiny")["config"])
        fields.update({k: v for k, v in FAMILIES.get(model_type, {}).items() if k.endswith("_module_tmp")})
        fields["layers"] = _three_layers_ending_at(n_layers, n_layers // 2)
        return {**fields, **from_model}
    paper = _matching_preset(mcfg)
    if paper is not None:  # one of the models the paper tunes: its hparams file exactly
        return {**paper, **from_model}
    if model_type in FAMILIES:
        return {**_UNTUNED_DEFAULTS, **FAMILIES[model_type], **_FAMILY_EXTRA.get(model_type, {}), **from_model,
                "layers": _default_layers(n_layers)}
    templates = ("rewrite_module_tmp", "layer_module_tmp")
    if "rewrite_module_tmp" in found and "layer_module_tmp" in found:
        guess = {k: found[k] for k in templates}
    elif n_layers is not None:
        guess = {k: _LLAMA_STYLE[k] for k in templates}
    else:
        raise ZuFastError(f"no preset for model_type={model_type!r} and its depth is unknown: pass "
                          "UnlearnConfig(...) explicitly")
    fields = {**_UNTUNED_DEFAULTS, **_LLAMA_STYLE, **guess, **from_model, "layers": _default_layers(n_layers)}
    guessed = [k for k in (*templates, "layers") if k not in explicit]
    if guessed:
        warnings.warn(
            f"no preset for model_type={model_type!r}; "
            + ("found by name on the model: " if model is not None and "rewrite_module_tmp" in found
               else "assuming Llama-style module names: ")
            + ", ".join(f"{k}={fields[k]!r}" for k in guessed)
            + " (set them in UnlearnConfig if they are wrong)",
            stacklevel=3,
        )
    return fields


def _check_on_model(model: Any, cfg: UnlearnConfig) -> None:
    """Cheap checks of ``cfg`` on ``model`` (module names and layer range), so that a config that cannot
    work is refused when it is made."""
    from .model.locate import edit_targets, get_module  # lazy: model.locate imports this module

    edit_targets(model, cfg, allow_offloaded=True)
    get_module(model, cfg.lm_head_module)
