"""Edits: the record (``record``), its file format (``file_format``) and binding to a model (``binding``)."""

from ..provenance import edits
from .binding import Edit, apply_additive_
from .record import EditRecord, EditReport

__all__ = ["Edit", "EditRecord", "EditReport", "apply_additive_", "edits"]
