"""What one edited layer contributes to an edit: its component problems, behind one interface.

``unlearn`` runs one loop (``method/unlearn.py``): per edited layer it reads the layer, builds step 3's basis
from the layer's clean output, computes the residual, and solves and applies one :class:`ComponentProblem`
per weight the layer's strategy names. Two strategies implement :class:`LayerStrategy`:

- :class:`DenseLayers` (here): a dense MLP's output projection is one component (gate 1, weight 1); the
  problem is exactly the dense one of ``docs/algorithm.md``, step 5 and the GD section.
- ``method.moe.MoELayers``: a mixture-of-experts block's routed experts and shared expert, each a component
  with gate-weighted columns and corpus weight (``docs/design-notes.md``, "Mixture of experts").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..config import UnlearnConfig
from ..errors import ZuFastError
from ..model.locate import EditTarget, MoETarget
from ..requests import UnlearnRequest
from ..stats.collect import CorpusStats
from .keys import SubjectReadings, read_at_subject


@dataclass
class ComponentProblem:
    """One weight's edit problem in the dense solvers' form (any weights folded into the columns)."""

    key: int  # the key of the weight in the edit and the statistics (the layer, or an expert key)
    target: EditTarget
    K: torch.Tensor  # [d_in, n_c] forget keys (· √ω for a MoE component)
    R: torch.Tensor  # [d, n_c] residual (/ G · √ω, plus (√ω − 1) b in the closed form, for a MoE component)
    weight: float  # π_c: the corpus term's weight (1 for a dense layer)
    rows: torch.Tensor  # [n_c] the requests this component sees
    mass: torch.Tensor  # [n_c] their gate mass ω (1 for a dense layer)
    report: dict[str, float]  # what the layer's row in the report adds for this component


class LayerStrategy(Protocol):
    """How the method reads and splits the edited layers of one kind (dense or mixture of experts)."""

    def bound_targets(self, targets: Sequence[EditTarget | MoETarget]) -> list[EditTarget]:
        """Every weight the edit may change (backed up before any change)."""

    def check_stats(self, stats: CorpusStats, targets: Sequence[EditTarget | MoETarget]) -> None:
        """A clear error, before any work, when the statistics do not fit the layers."""

    def read(self, model, tok, requests: Sequence[UnlearnRequest], cfg: UnlearnConfig,
             templates: Sequence[Sequence[str]], targets: Sequence[EditTarget | MoETarget]) -> Any:
        """Keys (and what the problems need) of ``targets`` at the subject tokens, and ``.z_out``  # [N, d]."""

    def clean_output(self, readings: Any, t: EditTarget | MoETarget) -> torch.Tensor:
        """The layer's output on the bare prompts  # [N, d] (step 3's clean original representation)."""

    def problems(self, t: EditTarget | MoETarget, readings: Any, resid: torch.Tensor, stats: CorpusStats, *,
                 bias_in_r: bool) -> list[ComponentProblem]:
        """The component problems of layer ``t`` for the residual ``resid``  # [N, d]."""


class DenseLayers:
    """Dense layers: one component per layer, the reference's problem exactly."""

    def bound_targets(self, targets: Sequence[EditTarget]) -> list[EditTarget]:
        return list(targets)

    def check_stats(self, stats: CorpusStats, targets: Sequence[EditTarget]) -> None:
        for t in targets:
            st = stats[t.layer]
            if st.d_in != t.d_in:
                raise ZuFastError(f"layer {t.layer}: statistics have width {st.d_in}, {t.name} takes {t.d_in}")
            st.check()

    def read(self, model, tok, requests, cfg, templates, targets) -> SubjectReadings:
        return read_at_subject(model, tok, requests, cfg, templates, targets)

    def clean_output(self, readings: SubjectReadings, t: EditTarget) -> torch.Tensor:
        return readings.bare_values[t.layer]

    def problems(self, t: EditTarget, readings: SubjectReadings, resid: torch.Tensor, stats: CorpusStats, *,
                 bias_in_r: bool) -> list[ComponentProblem]:
        n = resid.shape[0]
        K = readings.keys[t.layer].t()  # [d_in, N]
        R = resid.t().to(t.device)  # [d, N]
        return [ComponentProblem(t.layer, t, K, R, 1.0, torch.arange(n), torch.ones(n), {})]


__all__ = ["ComponentProblem", "DenseLayers", "LayerStrategy"]
