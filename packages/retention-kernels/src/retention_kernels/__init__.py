"""GPU kernels for power retention; ``retention`` discovers them through :func:`backends`."""

__version__ = "2.0.0.dev0"


def backends() -> list:
    """The backends this package provides (``retention.backends.Backend`` objects)."""
    return []
