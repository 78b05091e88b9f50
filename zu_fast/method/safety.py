"""What a finished edit must satisfy, and what happens when it does not (issue 26).

``unlearn`` flags problems in ``edit.report.flags`` (each also a warning). This module holds the checks whose
outcome can be a refusal, and the refusals themselves; a refusal puts the weights back (``unlearn``'s rollback)
and raises :class:`~zu_fast.errors.UnsafeEditError` carrying the report:

- ``large_weight_change`` — a layer moved by more than ``max_rel_weight_change`` of its norm: flagged. Beyond
  ``hard_limit_multiple`` × that (default 10 × 3 = 30 norms: edits on the trained small model move a layer by at
  most 2.6 × the limit, edits on random weights that still close the gap by ≤ 7 ×, wrecking ones by 11–2240 ×;
  benchmarks/results/safety_issue26.md), or a non-finite change: refused even without ``strict``, unless
  ``allow_large_change``.
- ``moved_away_from_targets`` — the edit moved the z layer's output *away* from the targets (a negative
  ``z_gap_closed``): flagged as what it is, with the distances, not as "only −256% of the way".
- ``non_finite_output`` — the z layer's output is NaN/Inf after the edit: the model is broken; always refused.
- ``nothing_edited`` — the edit changed no weight (no request reached an editable component).
- ``strict`` (config ``safety.strict``, ``unlearn(..., strict=True)``, ``--strict``): any flag refuses the edit.

Before any work, ``check_residual_stream`` refuses architectures whose decoder layers do not output one residual
stream of the edited modules' width (hyper-connections: Qwen4-exp, DeepSeek-V4, HY-V4 keep several streams): the
edit's targets live in that stream, so the maths would not apply.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..config import UnlearnConfig
from ..errors import UnsafeEditError, ZuFastError
from ..model import StopForward, forward_until, get_module, model_device, padded_batch

__all__ = ["UnsafeEditError", "check_gap", "check_residual_stream", "check_weight_change", "enforce_strict"]


@torch.no_grad()
def check_residual_stream(model: torch.nn.Module, tok: Any, text: str, cfg: UnlearnConfig, targets: list) -> None:
    """One forward of ``text`` up to the z layer: its output must be [batch, seq, d] with d the width the edited
    modules write (what the targets z and the edit assume); else ZuFastError naming both, before any change."""
    name = cfg.locate.layer_module.format(cfg.z_layer)
    seen: dict[str, Any] = {}

    def hook(module, args, output):
        seen["y"] = output[0] if isinstance(output, (tuple, list)) else output
        raise StopForward

    handle = get_module(model, name).register_forward_hook(hook)
    try:
        ids = tok(text, add_special_tokens=True)["input_ids"][:32]
        forward_until(model, padded_batch(tok, [ids], model_device(model)))
    finally:
        handle.remove()
    y = seen.get("y")
    widths = sorted({int(t.d) for t in targets})
    if not isinstance(y, torch.Tensor):
        raise ZuFastError(f"{name!r} (the z layer) was not called, or returned no tensor, in a forward pass of "
                          f"{type(model).__name__}; zu_fast cannot edit this architecture")
    if y.dim() != 3 or y.shape[-1] not in widths:
        raise ZuFastError(
            f"{type(model).__name__}: the decoder layer {name!r} outputs states of shape {tuple(y.shape)}, but the "
            f"edited modules write {widths[0] if len(widths) == 1 else widths}-wide outputs; zu_fast edits models "
            "whose layers add the MLP output to one residual stream of that width (this one keeps several "
            "streams, e.g. hyper-connections): not supported")


def check_weight_change(report: Any, key: int, row: dict, name: str, cfg: UnlearnConfig, where: str) -> None:
    """Flag layer ``key``'s move ``row["rel_weight_change"]`` (‖ΔW‖/‖W‖) when large; refuse it beyond the hard
    limit (raises UnsafeEditError: the caller puts the weights back)."""
    rel = float(row["rel_weight_change"])
    limit = cfg.safety.max_rel_weight_change
    hard = limit * cfg.safety.hard_limit_multiple
    if not math.isfinite(rel) or rel > limit:
        report.flag("large_weight_change",
                    f"{where}: the edit moved {name} by {rel:.3g} of its norm (limit max_rel_weight_change={limit:g}); "
                    "check the requests and the statistics, or restore() the edit",
                    layer=key, rel_weight_change=rel, limit=limit)
    if (not math.isfinite(rel) or rel > hard) and not cfg.safety.allow_large_change:
        raise UnsafeEditError(
            f"{where}: refusing the edit: it moved {name} by {rel:.3g} times its norm, beyond the hard limit {hard:g} "
            f"(hard_limit_multiple={cfg.safety.hard_limit_multiple:g} × max_rel_weight_change={limit:g}); such a "
            "change wrecks the layer (an ill-posed solve: too few corpus statistics, requests the model cannot "
            "represent, or random weights). The weights were put back. Check the requests, statistics and layers, "
            "or pass allow_large_change=True (command line: --allow-large-change) to apply it anyway",
            report=report)


def check_gap(report: Any, z: torch.Tensor, h0: torch.Tensor, after: torch.Tensor, closed: float) -> bool:
    """Report a gap that is not a fraction of the way: the output moved away from the targets, or is NaN/Inf.

    z, h0, after  # [N, d]: the targets and the z layer's output before and after the edit; ``closed`` =
    1 − Σ‖z − after‖ / Σ‖z − h0‖. Returns True when it flagged (the caller then says nothing about "how far");
    a non-finite output raises UnsafeEditError (the model is broken whatever the settings).
    """
    if not math.isfinite(closed) or not bool(torch.isfinite(after).all()):
        report.flag("non_finite_output", "the edit made the z layer's output NaN/Inf for these requests: the edited "
                    "model is broken", z_gap_closed=None)
        raise UnsafeEditError("refusing the edit: it made the z layer's output NaN/Inf (the edited model is broken; "
                              "an ill-posed solve or non-finite statistics). The weights were put back",
                              report=report)
    if closed >= 0:
        return False
    before = float((z - h0).norm(dim=1).mean())
    now = float((z - after).norm(dim=1).mean())
    report.flag("moved_away_from_targets",
                f"the edit moved the z layer's output away from the targets instead of towards them: its mean distance "
                f"to them grew from {before:.4g} to {now:.4g} ({now / max(before, 1e-30):.2f}×); the requests are not "
                "forgotten and the edit may damage the model (restore() it; fewer requests, other layers or "
                "method='gd' may help)",
                z_gap_closed=closed, distance_before=before, distance_after=now)
    return True


def enforce_strict(edit: Any, strict: bool) -> None:
    """The last checks of a finished edit: an edit that changed no weight is flagged (``nothing_edited``: e.g. every
    subject token was routed to experts that compute nothing); under ``strict``, a flagged edit is restored (the
    weights bit-identical again) and refused."""
    if not edit.factors:
        edit.report.flag("nothing_edited", "the edit changed no weight: none of the requests reached an editable "
                         "component of the edited layers (e.g. every subject token was routed to an expert that "
                         "computes nothing); the requests are not forgotten")
    flags = edit.report.flags
    if not strict or not flags:
        return
    edit.restore()
    kinds = sorted({f["kind"] for f in flags})
    first = flags[0]["message"]
    raise UnsafeEditError(
        f"strict: refusing the edit, it was flagged {', '.join(kinds)} ({len(flags)} flag(s); first: {first}); the "
        "weights were put back (the report is in this error's .report)", report=edit.report)
