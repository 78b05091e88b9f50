"""zu_fast: fast few-shot knowledge unlearning for HuggingFace causal LMs (ZeroUnlearn).

    import zu_fast
    cfg   = zu_fast.UnlearnConfig.for_model(model)
    stats = zu_fast.collect_stats(model, tok, corpus, cfg)
    edit  = zu_fast.unlearn(model, tok, requests, cfg, stats=stats)
    edit.report; edit.save("dir"); edit.restore()
    zu_fast.Edit.load("dir").apply(model)
    zu_fast.edits(model)      # the edits applied to the model, oldest first
"""

from __future__ import annotations

from ._version import __version__  # noqa: E402
from .config import UnlearnConfig  # noqa: E402
from .edit import Edit, EditReport, edits  # noqa: E402
from .errors import StaleStatsError, UnsafeEditError, ZuFastError  # noqa: E402
from .method.unlearn import unlearn  # noqa: E402
from .requests import UnlearnRequest  # noqa: E402
from .stats.collect import CorpusStats, collect_stats  # noqa: E402
from .unlearner import Unlearner  # noqa: E402  (one-call editor: Unlearner(model, tok, cfg).forget(...))

__all__ = [
    "CorpusStats",
    "Edit",
    "EditReport",
    "StaleStatsError",
    "UnlearnConfig",
    "UnlearnRequest",
    "Unlearner",
    "UnsafeEditError",
    "ZuFastError",
    "__version__",
    "collect_stats",
    "edits",
    "unlearn",
]
