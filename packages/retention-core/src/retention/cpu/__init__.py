"""The numba CPU backend: the chunked algorithm of SPEC.md section 3, forward and backward in numba, parallel
over batch x kv-heads (``prange``), matmuls in BLAS. Kernels in :mod:`.kernels`, the autograd Function in
:mod:`.function`. Computes in fp32 (fp64 for fp64 inputs); compiled kernels are cached on disk by numba.
"""

from __future__ import annotations

from .._validate import Problem
from ..sympow import sympow_dim
from .function import PowerRetentionCPU

__all__ = ["default_chunk_size", "power_retention_cpu"]

# Per-worker feature scratch phi [D, chunk * r] stays under this many elements (128 MiB in fp32).
_FEATURE_SCRATCH = 2**25


def default_chunk_size(t: int, features: int = 2080) -> int:
    """The chunk used when ``chunk_size=None``: 128 (benchmarks/cpu_issue2.py, t=4096, d=64, deg=2: 128 beat
    32/64/256/512 for fwd+bwd; at deg=1 every chunk from 16 to 128 was within noise), smaller when the
    ``features`` (D) of one chunk would not fit the scratch budget (deg 4 at d=64: 32), and never above ``t``."""
    chunk = 128
    while chunk > 16 and chunk * features > _FEATURE_SCRATCH:
        chunk //= 2
    return min(t, chunk)


def power_retention_cpu(problem: Problem):
    """``(Y [b, t, hq, e], state [b, h, D, e], sum_of_keys [b, h, D])`` in the compute dtype, differentiable
    w.r.t. Q, K, V, log_G, the initial state and sum of keys."""
    t, d = problem.K.shape[1], problem.K.shape[3]
    chunk = problem.chunk_size or default_chunk_size(t, sympow_dim(d, problem.deg))
    return PowerRetentionCPU.apply(
        problem.Q, problem.K, problem.V, problem.log_G, problem.state, problem.sum_of_keys,
        problem.deg, problem.scale, chunk,
    )
