"""Triton kernels for the URFM hot path, each beside its torch reference.

Imported as ``urfm_fast.kernels`` (this folder is mapped into the package by pyproject.toml);
it is never a top-level ``kernels`` package. Importing this package does not import triton:
each kernel module imports it lazily, so CPU-only machines without triton still work.
"""
