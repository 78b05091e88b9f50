"""zu_fast: fast few-shot knowledge unlearning for HuggingFace causal LMs (ZeroUnlearn)."""

from __future__ import annotations

__version__ = "0.1.0"
