"""Every flat configuration key zu_fast reads, and where it goes.

One table (:data:`FLAT`) maps the flat names — zu_fast's own names before the sections (still written
by presets, saved edits and users' code) and the reference's hparams keys — onto ``section.field``.
:data:`REFERENCE_RULES` holds the reference keys that need a rule rather than a name, and
:data:`NO_EFFECT` the keys accepted without effect (each with the reason a warning gives). Nothing
else is accepted: an unknown key is an error naming it.

The reference's names (``wiki_KKT_lam`` → ``closed_form.corpus_weight_k``, ``v_lr`` → ``targets.lr``,
``clamp_norm_factor`` → ``targets.clamp``, ``nullspace_threshold`` → ``gd.null_threshold`` …) are rows of
:data:`FLAT` like ours; the README's configuration table lists them all.
"""

from __future__ import annotations

from typing import Any

from ..errors import ZuFastError

# flat name → (section, field); section None: a top-level field
FLAT: dict[str, tuple[str | None, str]] = {
    "layers": (None, "layers"),
    "method": (None, "method"),
    "neutral_target": (None, "neutral_target"),
    # where
    "rewrite_module_tmp": ("locate", "rewrite_module"),
    "layer_module_tmp": ("locate", "layer_module"),
    "lm_head_module": ("locate", "lm_head"),
    "ln_f_module": ("locate", "final_norm"),
    # step 0
    "context_template_prompts": ("templates", "prompts"),
    "context_template_length": ("templates", "length"),
    "context_template_seed": ("templates", "seed"),
    "fact_token": ("templates", "fact_token"),  # the reference's (ROME's) name
    # step 2
    "v_num_grad_steps": ("targets", "steps"),
    "v_lr": ("targets", "lr"),
    "v_weight_decay": ("targets", "weight_decay"),
    "clamp_norm_factor": ("targets", "clamp"),
    "kl_factor": ("targets", "kl_factor"),
    "v_early_stop_loss": ("targets", "stop_loss"),
    "targets_batch_size": ("targets", "batch_size"),
    "targets_length_buckets": ("targets", "length_buckets"),
    "v_loss_layer": ("targets", "loss_layer"),
    "target_warn_loss": ("targets", "warn_loss"),
    "target_retry_clamp": ("targets", "retry_clamp"),
    # step 3
    "original_representation": ("representation", "source"),
    "projector_eps": ("representation", "projector_eps"),
    "basis_rtol": ("representation", "basis_rtol"),
    # step 4
    "stats_mode": ("stats", "mode"),
    "mom2_n_samples": ("stats", "n_samples"),
    "stats_max_length": ("stats", "max_length"),
    "stats_batch_tokens": ("stats", "batch_tokens"),
    "stats_token_budget": ("stats", "token_budget"),
    # step 5
    "mom2_update_weight_wk": ("closed_form", "corpus_weight_k"),
    "mom2_update_weight_wv": ("closed_form", "corpus_weight_v"),
    "wiki_KKT_lam": ("closed_form", "corpus_weight_k"),
    "wiki_VKT_lam": ("closed_form", "corpus_weight_v"),
    "forget_weight_fk": ("closed_form", "forget_weight_k"),
    "forget_weight_fv": ("closed_form", "forget_weight_v"),
    "forget_KKT_lam": ("closed_form", "forget_weight_k"),
    "forget_VKT_lam": ("closed_form", "forget_weight_v"),
    "forget_leverage": ("closed_form", "forget_leverage"),
    "retain_weight_rk": ("closed_form", "retain_weight_k"),
    "retain_weight_rv": ("closed_form", "retain_weight_v"),
    "retain_KKT_lam": ("closed_form", "retain_weight_k"),
    "retain_VKT_lam": ("closed_form", "retain_weight_v"),
    "regularization_lam": ("closed_form", "regularization"),
    "centered_cross_moment": ("closed_form", "centered_cross_moment"),
    "closed_form": ("closed_form", "solver"),  # the flat name of the solver ("fast" / "exact")
    "gram_chunk": ("closed_form", "gram_chunk"),
    "gram_precision": ("closed_form", "gram_precision"),
    # GD
    "gd_lr": ("gd", "lr"),
    "gd_steps": ("gd", "steps"),
    "gd_null_threshold": ("gd", "null_threshold"),
    "gd_null_energy": ("gd", "null_energy"),
    "gd_orth_weight": ("gd", "orth_weight"),
    "gd_remap_weight": ("gd", "remap_weight"),
    "gd_norm_weight": ("gd", "norm_weight"),
    "gd_retain_weight": ("gd", "retain_weight"),
    "gd_tol": ("gd", "tol"),
    "gd_window": ("gd", "window"),
    "gd_precision": ("gd", "precision"),
    "gd_variable": ("gd", "variable"),
    # safety
    "max_rel_weight_change": ("safety", "max_rel_weight_change"),
    "min_gap_closed": ("safety", "min_gap_closed"),
    "hard_limit_multiple": ("safety", "hard_limit_multiple"),
    "allow_large_change": ("safety", "allow_large_change"),
    "strict": ("safety", "strict"),
    # runtime
    "batch_size": ("runtime", "batch_size"),
    "backup_device": ("runtime", "backup_device"),
    "progress": ("runtime", "progress"),
    # the reference's name for the neutral target in EasyEdit-style files
    "target_new": (None, "neutral_target"),
}

# The flat names the statistics cache key records (``stats.collect``): changing these names would orphan every
# cache on disk, so they stay the flat ones.
STATS_SETTINGS = ("rewrite_module_tmp", "stats_mode", "stats_max_length", "stats_token_budget", "mom2_n_samples")


def _nullspace_threshold(v: Any) -> tuple[dict[str, Any], str]:
    # The reference's GD hard-codes 0.01 whatever the file says (0.02 in every shipped file).
    return {"gd_null_threshold": 0.01}, (f"the reference's GD ignores it ({v}) and hard-codes 0.01, which "
                                         "zu_fast uses too (gd.null_threshold=0.01)")


def _layer_selection(v: Any) -> tuple[dict[str, Any], None]:
    if v != "all":
        raise ZuFastError(f"layer_selection={v!r}: zu_fast edits every listed layer ('all') only")
    return {}, None


# Reference keys that need a rule: key → function(value) → (flat fields, why-no-effect or None).
REFERENCE_RULES: dict[str, Any] = {
    "nullspace_threshold": _nullspace_threshold,
    "layer_selection": _layer_selection,
    # MEMIT / AlphaEdit / ROME names
    "mom2_update_weight": lambda v: ({"mom2_update_weight_wk": float(v), "mom2_update_weight_wv": float(v)}, None),
    "forget_weight": lambda v: ({"forget_weight_fk": float(v), "forget_weight_fv": float(v)}, None),
}

# The reference's GD (hparams/ZeroUnlearn_DG/*.json) picks the algorithm by folder and hard-codes these.
REFERENCE_GD_DIRS = ("ZeroUnlearn_DG", "ZeroUnlearn_GD")
REFERENCE_GD = {"method": "gd", "gd_lr": 1e-3, "gd_steps": 500, "gd_tol": 0.0, "gd_orth_weight": 1.0,
                "gd_remap_weight": 100.0, "gd_norm_weight": 0.1}

# Accepted keys that change nothing: "" = silently (bookkeeping, or what zu_fast always does), else the reason,
# given in one warning (a user should know that a number in their file is not used).
NO_EFFECT: dict[str, str] = {
    "alg_name": "",
    "model_name": "",
    "mlp_module_tmp": "",  # read by no ZeroUnlearn code path
    "attn_module_tmp": "",
    "mom2_dataset": "",  # the corpus is an argument of collect_stats
    "mom2_dtype": "",  # accumulators are always fp32, solves fp64
    "mom2_adjustment": "",  # a ROME/MEMIT switch; ZeroUnlearn always uses the statistics
    "seed": "",  # an UnlearnConfig field before 2026-12-03 that nothing read (saved edits carry it)
    "L2": "read by no ZeroUnlearn code path of the reference (λ is regularization_lam)",
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

__all__ = ["FLAT", "NO_EFFECT", "REFERENCE_GD", "REFERENCE_GD_DIRS", "REFERENCE_RULES", "STATS_SETTINGS"]
