"""An edit as data: its per-layer factors, what they were made for, and the report of the run that made them.

An edit is a set of per-layer factors:
- ``multiplicative`` (closed form): W ← D W, stored compactly as D − I  # [d, d] fp32. Applying
  I + fp32(D − I) reproduces the live edit bit for bit on the same device and backend.
- ``additive`` (GD variant): W ← W + ΔW, stored as ΔW  # [d, d_in] fp32.

The file format is ``zu_fast.edit.file_format``; applying, verifying and restoring on a model is
``zu_fast.edit.binding`` (the ``Edit`` class users see).
"""

from __future__ import annotations

import os
import sys
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import UnlearnConfig
from ..errors import ZuFastError

KINDS = ("multiplicative", "additive")


def _caller_level() -> int:
    """warnings.warn's stacklevel of the first frame outside the zu_fast package (the user's call)."""
    pkg = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(pkg + os.sep):
        frame, level = frame.f_back, level + 1
    return level


@dataclass
class EditReport:
    """Numbers from one unlearning run."""

    n_requests: int = 0
    layers: dict[int, dict[str, float]] = field(default_factory=dict)
    targets: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    peak_memory_bytes: dict[str, int] = field(default_factory=dict)
    # Problems found while editing (each also raised as a warning): {"kind", "message", numbers...};
    # kinds: "target_not_converged", "target_not_reached", "moved_away_from_targets", "large_weight_change",
    # "non_finite_output", "nothing_edited" (zu_fast.method.safety: which of them refuse the edit, and strict).
    flags: list[dict[str, Any]] = field(default_factory=list)

    def flag(self, kind: str, message: str, **numbers: Any) -> None:
        """Record a problem in ``flags`` and say it now (a warning carrying the numbers, attributed to the
        user's call: the first frame outside the zu_fast package)."""
        self.flags.append({"kind": kind, "message": message, **numbers})
        warnings.warn(f"zu_fast: {message}", stacklevel=_caller_level())

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_requests": self.n_requests,
            "layers": {str(k): v for k, v in self.layers.items()},
            "targets": self.targets,
            "timings": self.timings,
            "peak_memory_bytes": self.peak_memory_bytes,
            "flags": self.flags,
        }

    def __str__(self) -> str:
        lines = [f"zu_fast edit of {self.n_requests} requests"]
        if self.targets:
            lines.append("targets: " + ", ".join(f"{k} {v:.4g}" for k, v in self.targets.items()))
        if self.layers:
            keys = list(next(iter(self.layers.values())).keys())
            lines.append("| layer | " + " | ".join(keys) + " |")
            lines.append("|---" * (len(keys) + 1) + "|")
            for layer, row in self.layers.items():
                lines.append(f"| {layer} | " + " | ".join(f"{row[k]:.4g}" for k in keys) + " |")
        if self.timings:
            lines.append("time (s): " + ", ".join(f"{k} {v:.2f}" for k, v in self.timings.items()))
        if self.peak_memory_bytes:
            lines.append("peak memory: " + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in
                                                    self.peak_memory_bytes.items()))
        for f in self.flags:
            lines.append(f"FLAG {f['kind']}: {f['message']}")
        return "\n".join(lines)


class EditRecord:
    """Per-layer factors of an unlearning edit and everything recorded about them (no model attached)."""

    def __init__(self, config: UnlearnConfig, kind: str = "multiplicative") -> None:
        if kind not in KINDS:
            raise ZuFastError(f"unknown edit kind {kind!r}")
        self.config = config
        self.kind = kind
        self.id = uuid.uuid4().hex[:12]
        self.factors: dict[int, torch.Tensor] = {}  # layer → D − I [d,d] or ΔW [d,d_in], fp32, CPU
        # layer → {"name", "transposed", "dtype", "shape"} of the weight the edit was made for
        self.modules: dict[int, dict[str, Any]] = {}
        self.base_fingerprints: dict[int, str] = {}
        self.edited_fingerprints: dict[int, str] = {}
        self.cast_fingerprints: dict[int, dict[str, str]] = {}  # layer → {dtype: fingerprint of W₀ in it}
        self.made_with: dict[str, str] = {}  # {"device_type", "backend"} of the live edit (exactness scope)
        self.factor_sha256: dict[int, str] = {}  # set by save/load
        self.source: str | None = None  # the folder it was loaded from
        self.verification: dict[int, str] = {}  # layer → how apply() verified the result
        self.report = EditReport()

    @property
    def name(self) -> str:
        """A short label for messages: id, kind, layers (and the folder it came from)."""
        src = f" from {self.source}" if self.source else ""
        return f"edit {self.id} ({self.kind}, layers {self.layers}{src})"

    @property
    def layers(self) -> list[int]:
        return sorted(self.factors)

    @property
    def factor_name(self) -> str:
        """The factor's name in the file: D − I or ΔW."""
        return "D_minus_I" if self.kind == "multiplicative" else "delta_w"


__all__ = ["KINDS", "EditRecord", "EditReport"]
