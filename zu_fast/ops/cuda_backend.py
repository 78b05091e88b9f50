"""CUDA C++ extension backend registration (sources in csrc/)."""

from __future__ import annotations
