"""CUDA C++ sources of zu_fast's kernels, shipped as package data (zu_fast.csrc) for the JIT build.

Nothing to import here: zu_fast.ops.cuda_backend compiles these files on first use when no
prebuilt zu_fast._C is installed (see setup.py and the README's build notes).
"""
