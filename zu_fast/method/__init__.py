"""The ZeroUnlearn method: templates, targets, keys, projector, closed form, orchestration."""

from . import closed_form, keys, projector, targets, templates
from .unlearn import unlearn

__all__ = ["closed_form", "keys", "projector", "targets", "templates", "unlearn"]
