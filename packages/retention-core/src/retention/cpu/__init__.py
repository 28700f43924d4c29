"""The numba CPU backend: the chunked algorithm of SPEC.md section 3, forward and backward in numba, parallel
over batch x kv-heads (``prange``), matmuls in BLAS. Kernels in :mod:`.kernels`, the autograd Function in
:mod:`.function`. Computes in fp32 (fp64 for fp64 inputs); compiled kernels are cached on disk by numba.
"""

from __future__ import annotations

from .._validate import Problem
from .function import PowerRetentionCPU

__all__ = ["default_chunk_size", "power_retention_cpu"]


def default_chunk_size(t: int) -> int:
    """The chunk used when ``chunk_size=None`` (measured with benchmarks/cpu_issue2.py): at most ``t``."""
    return min(t, 128)


def power_retention_cpu(problem: Problem):
    """``(Y [b, t, hq, e], state [b, h, D, e], sum_of_keys [b, h, D])`` in the compute dtype, differentiable
    w.r.t. Q, K, V, log_G, the initial state and sum of keys."""
    t = problem.K.shape[1]
    chunk = problem.chunk_size or default_chunk_size(t)
    return PowerRetentionCPU.apply(
        problem.Q, problem.K, problem.V, problem.log_G, problem.state, problem.sum_of_keys,
        problem.deg, problem.scale, chunk,
    )
