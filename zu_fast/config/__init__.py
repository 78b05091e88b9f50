"""Configuration: ``UnlearnConfig`` (sections), the flat-key table, presets and model families."""

from .presets import FAMILIES, SUPPORTED_FAMILIES, preset_for
from .sections import GD, ClosedForm, Locate, Representation, Runtime, Safety, Stats, Targets, Templates
from .unlearn_config import UnlearnConfig

__all__ = ["FAMILIES", "GD", "SUPPORTED_FAMILIES", "ClosedForm", "Locate", "Representation", "Runtime", "Safety",
           "Stats", "Targets", "Templates", "UnlearnConfig", "preset_for"]
