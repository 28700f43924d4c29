"""Power retention: symmetric power attention with gating, at linear cost.

    from retention import power_retention
    Y = power_retention(Q, K, V, log_G, deg=2, chunk_size=128)   # Q [b, t, hq, d], K/V [b, t, h, d|e]
"""

from . import backends
from ._version import __version__
from .api import power_retention
from .backends import available_backends
from .inference import PowerRetentionCache, power_retention_inference
from .sympow import sympow, sympow_dim

backends._kernel_backends()  # discover retention_kernels now, not inside a torch.compile trace

__all__ = [
    "PowerRetentionCache",
    "__version__",
    "available_backends",
    "power_retention",
    "power_retention_inference",
    "sympow",
    "sympow_dim",
]
