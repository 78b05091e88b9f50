"""ZeroUnlearn end to end: templates → targets z → projectors → per-layer closed form → W ← D W."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ..config import UnlearnConfig
from ..edit import Edit
from ..errors import ZuFastError
from ..model import continuation_ids, edit_targets, get_module, layer_count
from ..model.locate import MoETarget, describe_key, post_mlp_norm
from ..requests import UnlearnRequest, check_lengths, max_positions, normalize_requests
from ..stats.collect import CorpusStats, collect_stats
from ..stats.store import check_stats_for_model
from .closed_form import multiplier, narrow_multiplier
from .components import ComponentProblem, DenseLayers, LayerStrategy
from .moe import MoELayers
from .projector import representation_basis
from .residual import through_norm, to_module_space
from .retain import check_retain, retain_columns, retain_prompts
from .safety import check_gap as _safety_check_gap
from .safety import check_residual_stream, check_weight_change, enforce_strict
from .targets import optimize_deltas, retry_unreached
from .templates import context_templates as make_context_templates


class _Clock:
    def __init__(self, devices: Iterable[torch.device]) -> None:
        self.timings: dict[str, float] = {}
        self.cuda = sorted({d.index or 0 for d in devices if d.type == "cuda"})
        for i in self.cuda:
            torch.cuda.reset_peak_memory_stats(i)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Add the wall time of the block (device work included) to ``timings[name]``."""
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0

    def _sync(self) -> None:
        for i in self.cuda:
            torch.cuda.synchronize(i)

    def peak(self) -> dict[str, int]:
        return {f"cuda:{i}": int(torch.cuda.max_memory_allocated(i)) for i in self.cuda}


def _flag_unconverged(report, reqs: Sequence[UnlearnRequest], final_loss: torch.Tensor, cfg: UnlearnConfig) -> None:
    """Flag the requests whose target optimisation ended above ``cfg.targets.warn_loss``."""
    bad = (final_loss > cfg.targets.warn_loss).nonzero().flatten().tolist()
    if not bad:
        return
    shown = ", ".join(f"{reqs[i].describe()} loss {float(final_loss[i]):.3g}" for i in bad[:5])
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    report.flag("target_not_converged",
          f"the target optimisation did not reach the neutral target for {len(bad)} of {len(reqs)} requests "
          f"(final loss > target_warn_loss={cfg.targets.warn_loss:g}): {shown}{more}; those may not be forgotten "
          "(more v_num_grad_steps, a larger clamp_norm_factor or target_retry_clamp, or another neutral_target can "
          "help)",
          requests=[reqs[i].case_id for i in bad], losses=[float(final_loss[i]) for i in bad],
          limit=cfg.targets.warn_loss)


def orthogonal_start(clean: torch.Tensor, cfg: UnlearnConfig, norm=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``targets.orthogonal`` (docs/algorithm.md, step 2): from the z layer's clean module outputs o  # [N, d], the
    fixed part of δ — the z layer's output without the components of o along their basis U, i.e. what removing
    the original representation does to the residual stream (through the block's post-MLP norm when it has
    one) — and U  # [d, r], which δ's free part must avoid. A target built so is reachable by an edit whose new
    output is orthogonal to the original one, which the closed form's projector imposes."""
    o = clean.detach().to(torch.float64)  # [N, d]
    U = representation_basis(o.t(), cfg.representation.basis_rtol)  # [d, r]
    kept = o - (o @ U) @ U.t()  # [N, d]
    offset = kept - o if norm is None else through_norm(norm, kept) - through_norm(norm, o)  # [N, d]
    return offset.float(), U.float()


def z_targets(model, tok, reqs: Sequence[UnlearnRequest], cfg: UnlearnConfig, templates, neutral: Sequence[int],
              report, *, clean_z_out: torch.Tensor | None = None) -> torch.Tensor:
    """Step 2: the target hidden states z  # [N, d] at the z layer (with the retry of unreached rows);
    records the optimisation's numbers in ``report.targets`` and flags the requests that did not converge.
    ``clean_z_out``  # [N, d]: the z layer's clean module outputs, for ``targets.orthogonal``."""
    offset = basis = None
    if cfg.targets.orthogonal and clean_z_out is not None:
        norm = post_mlp_norm(model, cfg.locate.layer_module, cfg.z_layer)
        offset, basis = orthogonal_start(clean_z_out, cfg, norm)
    z_res = optimize_deltas(model, tok, reqs, cfg, templates, cfg.z_layer, [neutral] * len(reqs),
                            desc=f"z at layer {cfg.z_layer}", offset=offset, free_basis=basis)
    z_res, retried, improved = retry_unreached(model, tok, reqs, cfg, templates, cfg.z_layer, [neutral] * len(reqs),
                                               z_res, desc=f"z at layer {cfg.z_layer}", offset=offset,
                                               free_basis=basis)
    report.targets = {
        "z_retried": float(retried),
        "z_retry_improved": float(improved),
        "z_loss_initial": float(z_res.initial_loss.mean()),
        "z_loss_final": float(z_res.final_loss.mean()),
        "z_loss_final_max": float(z_res.final_loss.max()),
        "z_nll_final": float(z_res.final_nll.mean()),
        "z_kl_final": float(z_res.final_kl.mean()),
        "z_steps_mean": float(z_res.steps.float().mean()),
        "z_converged_frac": float((z_res.final_loss < cfg.targets.stop_loss).float().mean()),
    }
    _flag_unconverged(report, reqs, z_res.final_loss, cfg)
    return z_res.target


def original_basis(model, tok, reqs: Sequence[UnlearnRequest], cfg: UnlearnConfig, templates, layer: int,
                   true_ids: Sequence[Sequence[int]], clean: torch.Tensor,
                   device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
    """Step 3 at ``layer``: the basis U  # [d, r] of the module outputs that yield the TRUE answers, and the
    optimisation's numbers for the report. ``clean``  # [N, d]: the module's clean outputs, used as they are
    (``original_representation="clean"``) or as the start of the optimisation with δ at the module output."""
    R_orig, info = clean, {}
    if cfg.representation.source == "optimized":
        res = optimize_deltas(model, tok, reqs, cfg, templates, layer, true_ids, at_module=True,
                              desc=f"original repr. layer {layer}")
        R_orig = res.target.to(clean.device)
        info = {"orig_delta_rel": float((res.delta.norm(dim=1) / res.h_init.norm(dim=1).clamp_min(1e-12)).mean()),
                "orig_steps_mean": float(res.steps.float().mean())}
    return representation_basis(R_orig.t().to(device), cfg.representation.basis_rtol), info


def _check_gap(report, z: torch.Tensor, h0: torch.Tensor, after: torch.Tensor, cfg: UnlearnConfig) -> None:
    """Record how much of the way to z the edit took the z layer's output; flag it when too little.

    z, h0, after  # [N, d]: the targets, and the z layer's output before and after the edit.
    """
    gap0 = (z - h0).norm(dim=1)  # [N] how far z was from the clean output
    gap1 = (z - after).norm(dim=1)  # [N] how far it is after the edit
    closed = float(1.0 - gap1.sum() / gap0.sum().clamp_min(1e-30))
    report.targets["z_gap_closed"] = closed
    if _safety_check_gap(report, z, h0, after, closed):  # moved away from z, or NaN/Inf: said as what it is
        return
    if closed >= cfg.safety.min_gap_closed:
        return
    lev = [row["leverage_mean"] for row in report.layers.values() if "leverage_mean" in row]
    why = ""
    if lev and cfg.closed_form.forget_leverage is None:
        why = (f"; the closed form realised {min(lev):.0%}–{max(lev):.0%} of the residual per layer against the "
               "corpus term (set forget_leverage, e.g. 0.7, or raise the forget weights)")
    elif lev:
        why = (f"; at leverage {min(lev):.0%}–{max(lev):.0%} per layer the projector and the other requests take "
               "the rest: too many requests for this model's width (method='gd' edits in the keys' null space)")
    report.flag("target_not_reached",
          f"the edit moved the z layer's output only {closed:.0%} of the way to the targets (limit "
          f"min_gap_closed={cfg.safety.min_gap_closed:g}){why}; the requests may not be forgotten",
          z_gap_closed=closed, limit=cfg.safety.min_gap_closed)


def _apply_and_record(edit: Edit, report, clock: _Clock, key: int, target: Any, factor: torch.Tensor, row: dict,
                      info: Mapping[str, Any], cfg: UnlearnConfig, where: str) -> None:
    """Apply one solved factor to ``target`` and record the layer's ``row`` in the report with the size of the
    change (‖ΔW‖/‖W‖, and ‖D − I‖ for a multiplicative edit) and the solver's ``info``; flag a large change."""
    w_norm = float(target.weight.float().norm())
    before = target.weight.float().clone() if target.weight.numel() <= 50_000_000 else None
    with clock.phase("update"):
        edit.apply_factor(key, factor)
    if edit.kind == "multiplicative":
        row["D_minus_I_fro"] = float(edit.factors[key].norm())
    row["rel_weight_change"] = (float((target.weight.float() - before).norm() / max(w_norm, 1e-30))
                                if before is not None else _rel_change_bound(edit, key, w_norm))
    row.update({k: float(v) for k, v in info.items()})
    report.layers[key] = row
    check_weight_change(report, key, row, target.name, cfg, where)  # flags; beyond the hard limit: refused


def _rel_change_bound(edit: Edit, layer: int, w_norm: float) -> float:
    """‖ΔW‖/‖W‖ without a copy of W: exact for additive edits, ≤ ‖D − I‖₂ for multiplicative ones."""
    f = edit.factors[layer].double()
    if edit.kind == "additive":
        return float(f.norm() / max(w_norm, 1e-30))
    return float(torch.linalg.matrix_norm(f, ord=2))


def _checked_config(model: torch.nn.Module, config: UnlearnConfig | None) -> UnlearnConfig:
    """The config to run with: validated again (fields may have been changed since it was built), and a
    MEMIT-style ``lm_head_module`` naming the input embedding (GPT-2's ``transformer.wte``, whose weight
    MEMIT reads as the unembedding) resolved to the output module that shares that weight."""
    if config is None:
        return UnlearnConfig.for_model(model)
    if not isinstance(config, UnlearnConfig):
        raise ZuFastError(f"config must be an UnlearnConfig (UnlearnConfig.from_dict(...) reads a dict), "
                          f"got {type(config).__name__}")
    config.validate()
    head = get_module(model, config.locate.lm_head)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and head is emb:
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if out is None or getattr(out, "weight", None) is not emb.weight:
            raise ZuFastError(f"lm_head_module {config.locate.lm_head!r} is the input embedding and this model's "
                              "output layer does not share its weight; set lm_head_module to the output layer")
        name = next(n for n, mod in model.named_modules() if mod is out)
        config = config.replace(lm_head_module=name)
    loss_layer = config.targets.loss_layer
    if loss_layer is not None and loss_layer < layer_count(model, config.locate.layer_module) - 1:
        get_module(model, config.locate.final_norm)  # read only then: a clear error now rather than mid-way
    return config


def _check_before_work(model: torch.nn.Module, tok, reqs: Sequence[UnlearnRequest], cfg: UnlearnConfig) -> None:
    """Refuse, before any expensive work and any change, what would fail later: a missing tokenizer,
    non-finite weights anywhere (they would end as NaN probabilities deep inside the optimisation), and a
    request that does not fit the model's trained context (with room for a context template)."""
    if tok is None or not callable(tok):
        raise ZuFastError("unlearn needs the model's tokenizer (tok), got None")
    bad = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.device.type == "meta":  # offloaded: only materialised inside its forward
                continue
            flat = p.detach().reshape(-1)
            step = 1 << 24  # chunks: isfinite makes a bool copy
            if not all(bool(torch.isfinite(flat[i:i + step]).all()) for i in range(0, flat.numel(), step)):
                bad.append(name)
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise ZuFastError(f"the model's weights contain NaN/Inf: {', '.join(bad[:3])}{more}; the model is broken "
                          "(a failed load or an overflowed fine-tune?); nothing was changed")
    check_lengths(list(reqs), tok, max_positions(model), reserve=cfg.templates.length + 4)
    check_residual_stream(model, tok, reqs[0].text, cfg, edit_targets(model, cfg.layers, cfg.locate))


@contextlib.contextmanager
def _gd_progress(cfg: UnlearnConfig, layer: int) -> Iterator[list[float]]:
    """A progress bar over the GD steps of one layer, fed by gd_update's loss trace (a list it appends to)."""
    bar = tqdm(total=int(cfg.gd.steps), desc=f"zu_fast GD layer {layer}", unit="step", disable=not cfg.runtime.progress,
               leave=False)

    class _Trace(list):
        def append(self, loss: float) -> None:
            super().append(loss)
            if len(self) > 1:  # the first loss is before any step
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4g}", refresh=False)

    try:
        yield _Trace()
    finally:
        bar.close()


def _solve(p: ComponentProblem, stats: CorpusStats, basis: torch.Tensor, cfg: UnlearnConfig,
           gd_update, K_r: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """One component's factor: ΔW (GD) or D (the closed form; the narrow form where d_in < d), and the solver's
    numbers. A component's corpus weight π scales λ_w (1 for a dense layer: the configuration as it is).
    ``K_r``  # [d_in, M]: the retain keys that reach the component (``method/retain.py``), or None."""
    c, st, U = p.target, stats[p.key], basis.to(p.target.device)
    if gd_update is not None:
        with _gd_progress(cfg, p.key) as trace:
            return gd_update(c.weight, st, p.K, p.R, U, cfg, bias=c.bias, trace=trace, K_r=K_r)
    if p.weight != 1.0:
        cfg = cfg.replace(closed_form={"corpus_weight_k": cfg.closed_form.corpus_weight_k * p.weight,
                                       "corpus_weight_v": cfg.closed_form.corpus_weight_v * p.weight})
    solve = multiplier if c.d_in >= c.d else narrow_multiplier
    info: dict = {}
    return solve(c.weight, st, p.K, p.R, U, cfg, bias=c.bias, info=info, K_r=K_r), info


def unlearn(
    model: torch.nn.Module,
    tok,
    requests: Sequence[Mapping[str, Any] | UnlearnRequest] | Mapping[str, Any],
    config: UnlearnConfig | None = None,
    *,
    stats: CorpusStats | None = None,
    corpus: Any = None,
    context_templates: list[list[str]] | None = None,
    strict: bool | None = None,
    retain: Any = None,
    retain_templates: Sequence[str] | None = None,
) -> Edit:
    """Make ``model`` forget ``requests`` in place; returns the Edit (restore/save/report).

    requests: records ``{"prompt": "{} was born in", "subject": ..., "target_true": str | {"str": ...}}``.
    retain: prompts whose outputs must not change (``method/retain.py``): records ``{"prompt", "subject",
    "target_true"}``, plain prompts, or ``"subject"`` with ``retain_templates=["{} works for", ...]``: the
    forgotten subjects' other prompts. They enter each edited layer's problem with the weights
    ``retain_weight_rk/_rv`` (closed form) or ``gd_retain_weight`` (GD); None leaves the method as it is.
    stats: from ``collect_stats`` (or pass ``corpus=`` to collect/load them here). Statistics that carry
    a model fingerprint must be of this model, or of the model before the zu_fast edits on it
    (sequential unlearning; ``zu_fast.stats.store.check_stats_for_model``); hand-built ones are trusted.
    On any error the model's weights are left exactly as they were; bad input is refused before any work.
    ``strict`` (default ``config.safety.strict``): any flag in ``edit.report.flags`` puts the weights back and
    raises ``UnsafeEditError`` carrying the report; an edit beyond the hard limit is refused even without it
    (``zu_fast.method.safety``).
    The steps are those of ``docs/algorithm.md``; dense layers and mixture-of-experts blocks differ only in
    how a layer is read and split into component problems (``method/components.py``, ``method/moe.py``).
    """
    cfg = _checked_config(model, config)
    reqs = normalize_requests(requests)
    targets = edit_targets(model, cfg.layers, cfg.locate)
    _check_before_work(model, tok, reqs, cfg)  # everything cheap, before statistics or any change
    keep = retain_prompts(retain, reqs, retain_templates)
    check_retain(keep, reqs, tok, model, cfg.templates.fact_token, reserve=cfg.templates.length + 4)
    if stats is None:
        if corpus is None:
            raise ZuFastError("unlearn needs corpus statistics: pass stats=zu_fast.collect_stats(...) or corpus=...")
        stats = collect_stats(model, tok, corpus, cfg)
    check_stats_for_model(model, cfg, stats)  # statistics of another model are refused (sequential: see there)
    layers: LayerStrategy = MoELayers() if any(isinstance(t, MoETarget) for t in targets) else DenseLayers()
    layers.check_stats(stats, targets)
    neutral = continuation_ids(tok, cfg.neutral_target)
    true_ids = [continuation_ids(tok, r.target_true) for r in reqs]
    gd_update = None
    if cfg.method == "gd":  # imported before any change to the model
        from .gd import gd_update

    clock = _Clock({t.device for t in targets})
    edit = Edit(cfg, kind="additive" if cfg.method == "gd" else "multiplicative")
    edit.bind(model, layers.bound_targets(targets))
    report = edit.report
    report.n_requests = len(reqs)
    m = len(targets)
    kept = None  # the retain prompts' readings at the layers still to edit
    try:
        with clock.phase("templates"):
            templates = context_templates or make_context_templates(model, tok, cfg)
        with clock.phase("read_keys"):
            readings = layers.read(model, tok, reqs, cfg, templates, targets)
        with clock.phase("targets_z"):
            z = z_targets(model, tok, reqs, cfg, templates, neutral, report,
                          clean_z_out=layers.clean_output(readings, targets[-1]))  # [N, d]
        h0 = readings.z_out.to(z.device)  # [N, d] z-layer output before any edit

        for j, t in enumerate(targets):
            if j > 0:  # keys (and routing) and z-layer outputs after the earlier layers were edited
                with clock.phase("read_keys"):
                    readings = layers.read(model, tok, reqs, cfg, templates, targets[j:])
            if keep:  # the retain prompts' keys on the same model, read like the forget keys
                with clock.phase("read_keys"):
                    kept = layers.read(model, tok, keep, cfg, templates, targets[j:])
            # Step 3 at this layer, on the model with the earlier layers already edited (as the reference):
            # the module output that yields the TRUE answer, δ at the module's output.
            with clock.phase("projectors"):
                basis, orig_info = original_basis(model, tok, reqs, cfg, templates, t.layer, true_ids,
                                                  layers.clean_output(readings, t), t.device)  # [d, r]
            resid = (z - readings.z_out.to(z.device)) / (m - j)  # [N, d] this layer's share of the way to z
            row0 = {"resid_norm_mean": float(resid.norm(dim=1).mean()), "basis_rank": float(basis.shape[1])}
            norm = post_mlp_norm(model, cfg.locate.layer_module, t.layer)
            if norm is not None:  # the block normalises the MLP's output: ask the module for what N turns into r
                resid = to_module_space(norm, layers.clean_output(readings, t).to(resid.device), resid)
                row0["resid_module_norm_mean"] = float(resid.norm(dim=1).mean())
            for p in layers.problems(t, readings, resid, stats, bias_in_r=gd_update is None):
                K_r = retain_columns(kept, p) if kept is not None else None  # [d_in, M] or None
                with clock.phase("solve"):
                    factor, info = _solve(p, stats, basis, cfg, gd_update, K_r)
                row = {**row0, **p.report, **orig_info}
                _apply_and_record(edit, report, clock, p.key, p.target, factor, row, info, cfg, describe_key(p.key))
        with clock.phase("check"):
            after = layers.read(model, tok, reqs, cfg, templates, targets[-1:]).z_out.to(z.device)
        _check_gap(report, z, h0, after, cfg)
        if keep:
            report.targets["n_retain"] = float(len(keep))
        names = list(dict.fromkeys(k for row in report.layers.values() for k in row))
        for row in report.layers.values():  # one set of columns (an empty GD null space reports fewer)
            for k in names:
                row.setdefault(k, math.nan)
    except BaseException:
        edit.restore()
        raise
    report.timings = {k: round(v, 4) for k, v in clock.timings.items()}
    report.peak_memory_bytes = clock.peak()
    enforce_strict(edit, cfg.safety.strict if strict is None else bool(strict))
    return edit
