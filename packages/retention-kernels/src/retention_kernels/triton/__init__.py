"""Triton kernels for power retention (training path: forward and backward)."""

from .function import default_chunk_size, power_retention_triton

__all__ = ["power_retention_triton", "default_chunk_size"]
