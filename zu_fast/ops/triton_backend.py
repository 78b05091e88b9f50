"""Triton backend registration (kernels live in zu_fast.kernels, one per file)."""

from __future__ import annotations
