"""Drop-ins for the editing code people already run.

- ``zu_fast.compat.layer_stats`` (``compat.memit``): MEMIT / ROME / AlphaEdit's ``layer_stats``, same
  signature and return shape, backed by zu_fast's statistics engine and cache; ``layer_stats_from(stats)``
  answers their per-layer calls from one ``collect_stats`` pass over all the edited layers;
- ``zu_fast.compat.easyedit``: EasyEdit's calling convention (``apply_zeroUnlearn_to_model``,
  ``ZeroUnlearnHyperParams`` and its YAML files, ``register()`` for EasyEdit's algorithm table).
  Imported on demand (``from zu_fast.compat.easyedit import ...``), so ``import zu_fast.compat`` stays light.
"""

from __future__ import annotations

from .memit import CompatStat, MeanView, SecondMomentView, layer_stats, layer_stats_from

__all__ = ["CompatStat", "MeanView", "SecondMomentView", "layer_stats", "layer_stats_from"]
