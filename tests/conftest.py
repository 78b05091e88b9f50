"""Test-session setup: run Triton kernels under the interpreter when there is no GPU.

TRITON_INTERPRET must be set before a Triton kernel is defined (kernel modules are imported lazily,
on first call, so setting it here at collection time is early enough).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
