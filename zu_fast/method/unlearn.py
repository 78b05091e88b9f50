"""ZeroUnlearn end to end: templates → targets z → projectors → per-layer closed form → W ← D W."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from ..config import UnlearnConfig
from ..edit import Edit
from ..errors import ZuFastError
from ..model import continuation_ids, edit_targets
from ..requests import UnlearnRequest, normalize_requests
from ..stats.collect import CorpusStats, collect_stats
from .closed_form import multiplier
from .keys import read_at_subject
from .projector import representation_basis
from .targets import optimize_deltas
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


def unlearn(
    model: torch.nn.Module,
    tok,
    requests: Sequence[Mapping[str, Any] | UnlearnRequest] | Mapping[str, Any],
    config: UnlearnConfig | None = None,
    *,
    stats: CorpusStats | None = None,
    corpus: Any = None,
    context_templates: list[list[str]] | None = None,
) -> Edit:
    """Make ``model`` forget ``requests`` in place; returns the Edit (restore/save/report).

    requests: records ``{"prompt": "{} was born in", "subject": ..., "target_true": str | {"str": ...}}``.
    stats: from ``collect_stats`` (or pass ``corpus=`` to collect/load them here).
    On any error the model's weights are left exactly as they were.
    """
    cfg = config or UnlearnConfig.for_model(model)
    reqs = normalize_requests(requests)
    targets = edit_targets(model, cfg)
    if stats is None:
        if corpus is None:
            raise ZuFastError("unlearn needs corpus statistics: pass stats=zu_fast.collect_stats(...) or corpus=...")
        stats = collect_stats(model, tok, corpus, cfg)
    for t in targets:
        st = stats[t.layer]
        if st.d_in != t.d_in:
            raise ZuFastError(f"layer {t.layer}: statistics have width {st.d_in}, {t.name} takes {t.d_in}")
        st.check()
    neutral = continuation_ids(tok, cfg.neutral_target)
    true_ids = [continuation_ids(tok, r.target_true) for r in reqs]
    gd_update = None
    if cfg.method == "gd":  # imported before any change to the model
        from .gd import gd_update

    clock = _Clock({t.device for t in targets})
    edit = Edit(cfg, kind="additive" if cfg.method == "gd" else "multiplicative")
    edit.bind(model, targets)
    report = edit.report
    report.n_requests = len(reqs)
    m = len(targets)
    try:
        with clock.phase("templates"):
            templates = context_templates or make_context_templates(model, tok, cfg)
        with clock.phase("read_keys"):
            readings = read_at_subject(model, tok, reqs, cfg, templates, targets)
        with clock.phase("targets_z"):
            z_res = optimize_deltas(model, tok, reqs, cfg, templates, cfg.z_layer, [neutral] * len(reqs),
                                    desc=f"z at layer {cfg.z_layer}")
        z = z_res.target  # [N, d]
        report.targets = {
            "z_loss_initial": float(z_res.initial_loss.mean()),
            "z_loss_final": float(z_res.final_loss.mean()),
            "z_steps_mean": float(z_res.steps.float().mean()),
            "z_converged_frac": float((z_res.final_loss < cfg.v_early_stop_loss).float().mean()),
        }
        bases = {}
        with clock.phase("projectors"):
            for t in targets:
                R_orig = readings.bare_values[t.layer]  # [N, d] clean module output
                if cfg.original_representation == "optimized":
                    res = optimize_deltas(model, tok, reqs, cfg, templates, t.layer, true_ids,
                                          desc=f"original repr. layer {t.layer}")
                    # δ at the decoder layer's output = δ at down_proj's output (residual stream)
                    R_orig = R_orig + res.delta.to(R_orig.device)
                bases[t.layer] = representation_basis(R_orig.t().to(t.device), cfg.basis_rtol)  # [d, r]

        for j, t in enumerate(targets):
            if j > 0:  # keys and z-layer outputs after the earlier layers were edited
                with clock.phase("read_keys"):
                    readings = read_at_subject(model, tok, reqs, cfg, templates, targets[j:])
            K = readings.keys[t.layer].t()  # [d_in, N]
            h = readings.z_out.to(z.device)  # [N, d]
            resid = ((z - h) / (m - j)).t().to(t.device)  # [d, N]
            with clock.phase("solve"):
                if gd_update is not None:
                    factor, info = gd_update(t.weight, stats[t.layer], K, resid, bases[t.layer], cfg, bias=t.bias)
                else:
                    factor = multiplier(t.weight, stats[t.layer], K, resid, bases[t.layer], cfg, bias=t.bias)
                    info = {}
            w_norm = float(t.weight.float().norm())
            before = t.weight.float().clone() if t.weight.numel() <= 50_000_000 else None
            with clock.phase("update"):
                edit.apply_factor(t.layer, factor)
            row = {
                "resid_norm_mean": float(resid.norm(dim=0).mean()),
                "basis_rank": float(bases[t.layer].shape[1]),
            }
            if edit.kind == "multiplicative":
                row["D_minus_I_fro"] = float(edit.factors[t.layer].norm())
            if before is not None:
                row["rel_weight_change"] = float((t.weight.float() - before).norm() / max(w_norm, 1e-30))
            row.update({k: float(v) for k, v in info.items()})
            report.layers[t.layer] = row
    except BaseException:
        edit.restore()
        raise
    report.timings = {k: round(v, 4) for k, v in clock.timings.items()}
    report.peak_memory_bytes = clock.peak()
    return edit
