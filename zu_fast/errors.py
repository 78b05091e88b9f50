"""Exceptions raised by zu_fast."""

from __future__ import annotations


class ZuFastError(ValueError):
    """A request, configuration, statistic or system that zu_fast cannot work with.

    Subclasses ValueError so that callers catching bad input the usual way still catch it.
    Whenever one is raised from ``unlearn`` the model's weights are left untouched.
    """


class StaleStatsError(ZuFastError):
    """A statistics cache that does not belong to this model, corpus or configuration."""


class UnsafeEditError(ZuFastError):
    """An edit refused after it was computed (``strict``, or a change beyond the hard limit): the weights were put
    back; ``report`` is the run's :class:`~zu_fast.EditReport` (flags, per-layer numbers) for a look at what went
    wrong."""

    def __init__(self, message: str, report=None) -> None:
        super().__init__(message)
        self.report = report
