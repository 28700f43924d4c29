"""Plain PyTorch references: the float64 quadratic oracle, the recurrence and the differentiable chunked form."""

from .chunked import power_retention_chunked
from .common import expand_heads, normalise, update_state
from .quadratic import power_retention_quadratic
from .recurrent import power_retention_recurrent

__all__ = [
    "expand_heads",
    "normalise",
    "power_retention_chunked",
    "power_retention_quadratic",
    "power_retention_recurrent",
    "update_state",
]
