"""The sections of :class:`~zu_fast.config.UnlearnConfig`, one per concept of the method.

Each section is a small dataclass whose field names carry no prefix (the section is the prefix):
``cfg.targets.lr`` is what the reference calls ``v_lr``. The table of every flat name (ours before
2026-12-03 and the reference's hparams keys) → section field is ``zu_fast.config.keys.FLAT``.
The steps named here are those of ``docs/algorithm.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from ..errors import ZuFastError
from ..model.locate import Locate

__all__ = ["FACT_TOKENS", "ClosedForm", "GD", "Locate", "Representation", "Runtime", "Safety", "Stats", "Targets",
           "Templates", "SECTIONS", "check_choice", "check_positive"]


def check_choice(section: str, obj: object, name: str, allowed: tuple) -> None:
    value = getattr(obj, name)
    if value not in allowed:
        raise ZuFastError(f"config.{section}.{name}={value!r}; choose one of {allowed}")


def check_positive(section: str, obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ZuFastError(f"config.{section}.{name} must be positive, got {value!r}")


FACT_TOKENS = ("subject_last", "last")


@dataclass
class Templates:
    """Steps 0–1: the prompts each request is read in — context templates, one short generation per prompt, used
    as ``"<generated>. {}"`` — and the token of those prompts where keys are read and z is placed."""

    prompts: list[str] = field(default_factory=lambda: ["The", "Therefore", "Because", "I", "You"])
    length: int = 10  # tokens generated per context template
    seed: int = 0
    # Where in each prompt the keys are read (step 1), δ is placed (steps 2–3) and z is measured: "subject_last"
    # (the paper's, ROME's ``fact_token``) or "last", the prompt's last token. In a subject-first prompt ("X was
    # born in") the subject's last token cannot see the relation (causal attention), so every fact of X shares one
    # key there; at the last token the key knows which fact is asked (docs/design-notes.md, "Retain set").
    fact_token: str = "subject_last"

    def validate(self) -> None:
        check_choice("templates", self, "fact_token", FACT_TOKENS)
        self.prompts = list(self.prompts)
        if not all(isinstance(p, str) for p in self.prompts):
            raise ZuFastError(f"config.templates.prompts must be strings, got {self.prompts!r}")
        if isinstance(self.length, bool) or not isinstance(self.length, int) or self.length < 0:
            raise ZuFastError(f"config.templates.length must be an int ≥ 0, got {self.length!r}")


@dataclass
class Targets:
    """Step 2: the target hidden states z (and step 3's optimisation, which uses the same optimiser)."""

    steps: int = 25  # optimisation steps per request (the reference's v_num_grad_steps)
    lr: float = 0.1  # Adam learning rate on δ (the reference's hparams files: 1e-1)
    # False: ``lr`` is in the units of the hidden state (the reference). True: ``lr`` is the fraction of
    # ‖h_init‖ a step moves δ (each request's Adam lr is lr·‖h_init‖/√d): scale-free, the same meaning on every
    # model (docs/algorithm.md, step 2).
    lr_relative: bool = False
    weight_decay: float = 0.5  # weight of ‖δ‖ / ‖h_init‖²
    clamp: float = 0.75  # ‖δ‖ ≤ clamp · ‖h_init‖ after each step (clamp_norm_factor)
    kl_factor: float = 0.0625  # weight of KL(current ‖ initial) at "{subject} is a"
    stop_loss: float = 0.05  # a request stops once its loss is below this (v_early_stop_loss)
    batch_size: int = 64  # requests optimised together (independent rows of δ)
    # Each step forwards the running requests' prompts in up to this many batches padded to their own
    # longest prompt (1: one batch padded to the longest of all; method/targets.length_buckets).
    length_buckets: int = 4
    # The reference reads the target NLL from ``ln_f(output of decoder layer loss_layer)`` through the LM head
    # (the KL term always from the model's own logits). None or the last layer: the model's own logits. Only
    # Qwen3-4B's reference file names a layer below the top (31 of 36), kept for fidelity.
    loss_layer: int | None = None
    # True: δ starts from what removing the z layer's original representation (its clean MLP output's components
    # along their basis) does to the stream, and moves only orthogonally to that basis, so the target is reachable
    # by an edit whose new output is orthogonal to the original one (docs/algorithm.md, step 2). False: the
    # reference's free δ from 0, whose target the closed form's projector may pull the edit away from.
    orthogonal: bool = False
    # Requests whose target loss stays above this after the optimisation are reported as not converged
    # (a warning and ``edit.report.flags``): their neutral target is not the model's likely continuation.
    warn_loss: float = 0.7
    # Those requests get one more optimisation with the clamp radius widened this many times and twice the
    # steps (kept when it ends lower; method/targets.retry_unreached). None: no retry (the reference).
    retry_clamp: float | None = None

    def validate(self) -> None:
        check_positive("targets", self, "batch_size", "length_buckets", "lr", "clamp")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ZuFastError(f"config.targets.steps must be an int ≥ 0, got {self.steps!r}")
        if self.retry_clamp is not None and not float(self.retry_clamp) > 1.0:
            raise ZuFastError(f"config.targets.retry_clamp must be > 1 (a wider clamp) or None, got {self.retry_clamp}")
        if self.loss_layer is not None and int(self.loss_layer) < 0:
            raise ZuFastError(f"config.targets.loss_layer must be a layer index ≥ 0 (or None), got {self.loss_layer}")
        if not self.warn_loss >= 0:
            raise ZuFastError(f"config.targets.warn_loss must be ≥ 0, got {self.warn_loss}")


@dataclass
class Representation:
    """Step 3: the original representation of each request at each edited layer, and the projector."""

    # "optimized" (the reference: δ at the module output optimised toward the TRUE answer) or "clean"
    # (the clean module output, no optimisation).
    source: str = "optimized"
    projector_eps: float = 0.01  # P = (1+ε) I − U Uᵀ
    basis_rtol: float = 1e-6  # singular values below rtol·σ_max are dropped from U

    def validate(self) -> None:
        check_choice("representation", self, "source", ("optimized", "clean"))
        if not self.projector_eps > -1:
            raise ZuFastError(f"config.representation.projector_eps must be > -1, got {self.projector_eps}")


@dataclass
class Stats:
    """Step 4: the corpus statistics (what they are computed from, and how)."""

    mode: str = "derived"  # "derived" (Σvkᵀ = W Σkkᵀ) or "measured" (accumulate V·Kᵀ)
    n_samples: int = 100_000  # texts read from the corpus at most (mom2_n_samples)
    max_length: int = 4096  # tokens per text at most (longer texts are truncated)
    batch_tokens: int = 8192  # token budget per forward batch
    token_budget: int | None = None  # stop after this many (non-padding) tokens

    def validate(self) -> None:
        check_choice("stats", self, "mode", ("derived", "measured"))
        check_positive("stats", self, "batch_tokens", "max_length", "n_samples")


@dataclass
class ClosedForm:
    """Step 5: the closed-form multiplier D = A B⁻¹ (weights λ, numerics)."""

    corpus_weight_k: float = 15000.0  # λ_wK (wiki_KKT_lam)
    corpus_weight_v: float = 15000.0  # λ_wV (wiki_VKT_lam)
    forget_weight_k: float = 50.0  # λ_fK (forget_KKT_lam)
    forget_weight_v: float = 50.0  # λ_fV (forget_VKT_lam)
    # When set: per layer, raise λ_fK and λ_fV together (the configured values are a floor) until the forget
    # requests' mean leverage — the fraction of each residual the edit realises against the corpus term,
    # method/leverage.py — reaches this. None: the weights as set.
    forget_leverage: float | None = None
    # λ_rK, λ_rV (the reference's retain_KKT_lam / retain_VKT_lam, which its code never reads): the weight of each
    # retain record's demand D W k_r = W k_r (its output unchanged), used only when unlearn() gets retain records.
    # When the leverage rule raises the forget weights it raises these by the same factor (the configured
    # retain : forget ratio is kept). 5 = a tenth of a forget request's λ_f = 50: on the small model a retain record
    # weighing as much as a forget request kept the subject's other facts but cost the forgotten fact's paraphrases
    # 20–30 points of Generalization (docs/design-notes.md, "Retain set").
    retain_weight_k: float = 5.0
    retain_weight_v: float = 5.0
    regularization: float = 1.0  # λ (regularization_lam)
    # X = (1/(n−1)) Σ v kᵀ (uncentred, what the reference computes: its running-mean merge shrinks the means to
    # ~0); True: the exactly centred (1/(n−1)) Σ (v−μ_v)(k−μ_k)ᵀ its code was written for.
    centered_cross_moment: bool = False
    # Which targets the projector P multiplies: "all" (the reference: A = P (VKT + λW) Wᵀ, so every output of the
    # layer loses its component along the forget representations U, corpus included) or "forget" (only the forget
    # requests' targets P (V_f + R); the corpus and regulariser targets keep the layer's outputs as they are).
    projector_on: str = "all"
    solver: str = "fast"  # "fast" (one W·C·Wᵀ product) or "exact" (dense, for verification)
    gram_chunk: int = 4096  # columns of C per chunk in the W·C·Wᵀ product
    gram_precision: str = "auto"  # "auto", "fp64", "fp32", "bf16x2" (bf16 tensor cores, split hi+lo)

    def validate(self) -> None:
        check_choice("closed_form", self, "solver", ("fast", "exact"))
        check_choice("closed_form", self, "projector_on", ("all", "forget"))
        check_choice("closed_form", self, "gram_precision", ("auto", "fp64", "fp32", "bf16x2"))
        check_positive("closed_form", self, "gram_chunk")
        if self.forget_leverage is not None and not 0.0 < float(self.forget_leverage) < 1.0:
            raise ZuFastError("config.closed_form.forget_leverage must be in (0, 1) (a fraction of each residual), "
                              f"got {self.forget_leverage}")
        if self.regularization < 0:
            raise ZuFastError(f"config.closed_form.regularization must be ≥ 0, got {self.regularization}")
        for name in ("retain_weight_k", "retain_weight_v"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ZuFastError(f"config.closed_form.{name} must be a number ≥ 0, got {value!r}")


@dataclass
class GD:
    """ZeroUnlearn-GD: Adam on an additive edit in the null space of the corpus key statistic C."""

    lr: float = 1e-3
    steps: int = 500
    null_threshold: float = 1e-2  # P_null: eigenvectors of C with eigenvalue ≤ this (the reference's rule)
    # Scale-free alternative (replaces null_threshold when set): P_null spans the smallest eigen-directions of C
    # that together carry at most this fraction of the corpus keys' energy tr C = E‖k‖².
    null_energy: float | None = None
    orth_weight: float = 1.0
    remap_weight: float = 100.0
    norm_weight: float = 0.1
    # Weight of ‖ΔW K_r‖², the change of the retain records' outputs (used only when unlearn() gets retain records;
    # per record it weighs like the remap term's per-request weight at the same value: 5 is a twentieth of it, the
    # balance of Generalization and Subject-other measured on the small model; docs/design-notes.md, "Retain set").
    retain_weight: float = 5.0
    # Early stop: relative loss decrease < tol over `window` steps (0: run all steps). Chosen so that the results
    # match the full-length dense reference within the tests' tolerance (tests/test_gd.py, benchmarks/gd_speed.py).
    tol: float = 1e-4
    window: int = 20
    precision: str = "fp32"  # "fp32" or "fp64" (the reference's round-off)
    # What Adam optimises: "dense" Δ [d, d_in] (the reference's iterates, exactly) or "null", the edit's
    # coordinates X [d, null rank] in C's null-space eigenbasis (same objective, another trajectory).
    variable: str = "dense"

    def validate(self) -> None:
        check_choice("gd", self, "precision", ("fp32", "fp64"))
        check_choice("gd", self, "variable", ("dense", "null"))
        check_positive("gd", self, "window")
        if isinstance(self.retain_weight, bool) or not isinstance(self.retain_weight, (int, float)) \
                or not self.retain_weight >= 0:
            raise ZuFastError(f"config.gd.retain_weight must be a number ≥ 0, got {self.retain_weight!r}")
        if self.null_energy is not None and not 0.0 < float(self.null_energy) < 1.0:
            raise ZuFastError(f"config.gd.null_energy must be in (0, 1) (a fraction of tr C), got {self.null_energy}")


@dataclass
class Safety:
    """Checks of the finished edit: each failure is a warning and a flag in ``edit.report.flags``; under ``strict``
    any flag puts the weights back and raises ``UnsafeEditError`` carrying the report (``zu_fast.method.safety``)."""

    # An edited layer whose weight moves by more than this fraction of its Frobenius norm is flagged. Measured
    # sizes of edits that keep the model intact (benchmarks/RESULTS.md): 0.33 on the reference case, 0.8–2.2 on
    # the small model; an ill-posed solve gives 10×+.
    max_rel_weight_change: float = 3.0
    # An edit that moves the z layer's output (at the subject's last token) less than this fraction of the way
    # to the targets z is flagged ("target_not_reached"; one that moves it away: "moved_away_from_targets").
    min_gap_closed: float = 0.5
    # A layer moved by more than hard_limit_multiple × max_rel_weight_change is refused even without strict
    # (the weights put back, UnsafeEditError), unless allow_large_change. Measured (benchmarks/results/
    # safety_issue26.md): edits on the trained small model move a layer by at most 2.6 × the limit (7.9 norms: the
    # closed form on 50 facts; GD ≤ 1.7 ×); on random weights, edits that still close the gap by ≤ 7 × (21 norms),
    # wrecking ones (mostly post-norm families, the z output moved away from the targets) by 11–2240 ×.
    hard_limit_multiple: float = 10.0
    allow_large_change: bool = False
    # Any flag refuses the edit (weights put back, UnsafeEditError with .report); unlearn(..., strict=...) overrides.
    strict: bool = False

    def validate(self) -> None:
        if not self.max_rel_weight_change > 0 or not self.min_gap_closed <= 1:
            raise ZuFastError("config.safety.max_rel_weight_change must be > 0 and min_gap_closed ≤ 1")
        if isinstance(self.hard_limit_multiple, bool) or not isinstance(self.hard_limit_multiple, (int, float)) \
                or not self.hard_limit_multiple >= 1:
            raise ZuFastError(f"config.safety.hard_limit_multiple must be a number ≥ 1, got "
                              f"{self.hard_limit_multiple!r}")
        for name in ("strict", "allow_large_change"):
            if not isinstance(getattr(self, name), bool):
                raise ZuFastError(f"config.safety.{name} must be true or false, got {getattr(self, name)!r}")


@dataclass
class Runtime:
    """How the work runs (no effect on the result)."""

    batch_size: int = 32  # prompts per forward when reading keys/values
    backup_device: str | None = "cpu"  # where Edit keeps original weights (None: the weight's device)
    progress: bool = True

    def validate(self) -> None:
        check_positive("runtime", self, "batch_size")


# section name → class (the order of UnlearnConfig's sections)
SECTIONS: dict[str, type] = {"locate": Locate, "templates": Templates, "targets": Targets,
                             "representation": Representation, "stats": Stats, "closed_form": ClosedForm, "gd": GD,
                             "safety": Safety, "runtime": Runtime}


def section_field_names(name: str) -> tuple[str, ...]:
    return tuple(f.name for f in fields(SECTIONS[name]))
