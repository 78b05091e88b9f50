"""Exceptions raised by zu_fast."""

from __future__ import annotations


class ZuFastError(ValueError):
    """A request, configuration, statistic or system that zu_fast cannot work with.

    Subclasses ValueError so that callers catching bad input the usual way still catch it.
    Whenever one is raised from ``unlearn`` the model's weights are left untouched.
    """


class StaleStatsError(ZuFastError):
    """A statistics cache that does not belong to this model, corpus or configuration."""
