"""The ZeroUnlearn method: templates, targets, keys, projector, closed form, orchestration."""

from . import closed_form, components, keys, moe, projector, targets, templates
from .unlearn import unlearn

__all__ = ["closed_form", "components", "keys", "moe", "projector", "targets", "templates", "unlearn"]
