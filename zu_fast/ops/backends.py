"""Registration of the accelerated backends over the plain-PyTorch defaults.

Nothing heavy is imported here: each backend module registers functions that import their
kernels on first call, and availability checks run once, lazily (registry.Backend.is_available).
The preference order per device type lives in each backend module, next to the numbers behind it.
"""

from __future__ import annotations

from . import cuda_backend, triton_backend  # noqa: F401
