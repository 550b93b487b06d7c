"""Triton kernels for the URFM hot path, each beside its torch reference.

Imported as ``urfm_fast.kernels`` (this folder is mapped into the package by pyproject.toml);
it is never a top-level ``kernels`` package. Only ``_triton.py`` imports triton, inside a guard:
without triton the kernel files still import (their torch references work) and ``urfm_fast.model.ops``
runs the torch path.
"""
