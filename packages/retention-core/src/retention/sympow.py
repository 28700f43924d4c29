"""The symmetric power embedding ``phi_p : R^d -> R^D`` with ``<phi_p(x), phi_p(y)> = <x, y>^p``.

Features are indexed by multisets ``a_1 <= ... <= a_p`` of coordinates, in the order of
``itertools.combinations_with_replacement(range(d), p)`` (lexicographic: for d=3, p=2 the order is
00, 01, 02, 11, 12, 22). Feature ``a`` is

    phi_p(x)_a = sqrt(multinomial(p; counts of a)) * x_{a_1} * ... * x_{a_p}

so ``D = C(d + p - 1, p)``. This order and these weights are the public state layout shared by every
backend (``state[..., D, e]``); backends that tile or pad internally convert at the API boundary.
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import torch

__all__ = ["sympow", "sympow_dim", "sympow_indices", "sympow_weights", "sympow_table"]


def sympow_dim(d: int, deg: int) -> int:
    """``D = C(d + deg - 1, deg)``, the number of features of the minimal embedding."""
    if not isinstance(d, int) or isinstance(d, bool) or d < 1:
        raise ValueError(f"d must be a positive int, got {d!r}")
    if not isinstance(deg, int) or isinstance(deg, bool) or deg < 1:
        raise ValueError(f"deg must be a positive int, got {deg!r}")
    return math.comb(d + deg - 1, deg)


@functools.cache
def sympow_table(d: int, deg: int) -> tuple[np.ndarray, np.ndarray]:
    """Index table ``[D, deg]`` (int64, each row a sorted multiset) and weights ``[D]`` (float64,
    ``sqrt(multinomial)``), built once per ``(d, deg)``. Read-only numpy arrays, shared by every backend."""
    D = sympow_dim(d, deg)
    index = np.fromiter(
        itertools.chain.from_iterable(itertools.combinations_with_replacement(range(d), deg)),
        dtype=np.int64,
        count=D * deg,
    ).reshape(D, deg)
    # multinomial(p; counts) = p! / prod(count!): count the runs of equal indices in each sorted row.
    log_weight = np.full(D, math.lgamma(deg + 1))
    run = np.ones(D, dtype=np.int64)
    for position in range(1, deg):
        same = index[:, position] == index[:, position - 1]
        run = np.where(same, run + 1, 1)
        log_weight -= np.log(run)  # dividing by run! one factor at a time
    weight = np.sqrt(np.exp(log_weight))
    index.setflags(write=False)
    weight.setflags(write=False)
    return index, weight


_device_tables: dict = {}


def _device_table(d: int, deg: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # A plain dict (not lru_cache) so that torch.compile traces a lookup, not the table construction.
    key = (d, deg, device)
    if key not in _device_tables:
        index, weight = sympow_table(d, deg)
        _device_tables[key] = (torch.from_numpy(index.copy()).to(device), torch.from_numpy(weight.copy()).to(device))
    return _device_tables[key]


def sympow_indices(d: int, deg: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[D, deg]`` int64 tensor: feature ``a`` multiplies ``x[index[a, 0]] * ... * x[index[a, deg-1]]``."""
    return _device_table(d, deg, torch.device(device))[0]


def sympow_weights(d: int, deg: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[D]`` float64 tensor of ``sqrt(multinomial(deg; counts))``."""
    return _device_table(d, deg, torch.device(device))[1]


def sympow(x: torch.Tensor, deg: int) -> torch.Tensor:
    """The embedding of ``x [..., d]`` into ``[..., D]``, differentiable, in ``x``'s dtype
    (products are formed in fp32 at least, so fp16 inputs do not overflow before the cast back)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating point tensor, got dtype {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"x must have at least one dimension [..., d], got shape {tuple(x.shape)}")
    d = x.shape[-1]
    sympow_dim(d, deg)  # validates deg
    index = sympow_indices(d, deg, x.device)
    compute = torch.promote_types(x.dtype, torch.float32)
    weight = sympow_weights(d, deg, x.device).to(compute)
    features = x.to(compute)[..., index].prod(dim=-1) * weight
    return features.to(x.dtype)
