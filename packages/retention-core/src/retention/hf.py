"""Adapter to the ``transformers`` ``Cache`` interface (optional dependency: ``pip install transformers``;
written for the layered caches of transformers >= 4.56, tested with 5.x).

A power-retention layer keeps no past keys and values to hand back, so its attention module asks the cache for
its outputs instead of for keys and values::

    from retention.hf import PowerRetentionHFCache

    past_key_values = PowerRetentionHFCache(deg=2, switch_over_seq_len=512)
    # inside the attention module of layer i (layout of power_retention: Q [b, t, hq, d], K/V [b, t, h, d|e]):
    Y = past_key_values.retention_step(Q, K, V, log_G, layer_idx=i)

To ``generate`` it is an ordinary ``Cache``: ``get_seq_length`` (tokens seen), ``reorder_cache`` /
``batch_select_indices`` / ``batch_repeat_interleave`` (beam search and alike), ``reset``, ``offload`` /
``prefetch``. ``update`` (keys and values for softmax attention) and ``crop`` (a state cannot forget tokens)
raise. Each layer wraps a :class:`retention.PowerRetentionCache` (``.cache``), memory as documented there.
"""

from __future__ import annotations

import functools

import torch

from .inference import PowerRetentionCache

try:
    from transformers.cache_utils import Cache, CacheLayerMixin
except ImportError as error:  # optional dependency
    raise ImportError(
        f"retention.hf needs transformers with layered caches (pip install 'transformers>=4.56'): {error}"
    ) from error

__all__ = ["PowerRetentionHFCache", "PowerRetentionLayer"]


class PowerRetentionLayer(CacheLayerMixin):
    """One layer: a :class:`PowerRetentionCache` behind the ``CacheLayerMixin`` interface."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, deg: int = 2, scale: float | None = None, switch_over_seq_len: int = 512,
                 backend: str = "auto", static: bool = False):
        super().__init__()
        self._settings = {"deg": deg, "scale": scale, "switch_over_seq_len": switch_over_seq_len,
                          "backend": backend, "static": static}
        self.cache = PowerRetentionCache(**self._settings)
        self.device = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to allocate ahead: the first :meth:`step` sizes the cache."""

    def step(self, Q, K, V, log_G=None) -> torch.Tensor:
        """``Y [b, t, hq, e]`` of ``Q [b, t, hq, d]`` after appending ``K``, ``V``, ``log_G`` (see
        :meth:`PowerRetentionCache.step`)."""
        Y = self.cache.step(Q, K, V, log_G)
        self.is_initialized, self.device = True, K.device
        return Y

    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError(
            "a power retention cache keeps a state, not past keys and values: call "
            "cache.retention_step(Q, K, V, log_G, layer_idx=...) for the layer's outputs"
        )

    def get_seq_length(self) -> int:
        return self.cache.position

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.position + query_length, 0

    def get_max_length(self) -> int:
        return -1  # no maximum: memory does not grow with the context

    def _select(self, indices: torch.Tensor) -> None:
        if self.cache.window_K is not None:
            self.cache.select(indices)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.cache.window_K is not None:
            batch = self.cache.window_K.shape[0]
            self._select(torch.arange(batch).repeat_interleave(repeats))

    def reset(self) -> None:
        self.cache = PowerRetentionCache(**self._settings)
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise ValueError(
                f"a power retention cache cannot crop tokens (got tokens_to_remove={tokens_to_remove}): "
                "they are folded into its state"
            )

    def offload(self) -> None:
        self.cache.to("cpu")

    def prefetch(self) -> None:
        if self.device is not None:
            self.cache.to(self.device)


class PowerRetentionHFCache(Cache):
    """A ``transformers`` ``Cache`` of power-retention layers (created as layers are first used, or
    ``num_layers`` up front). Settings as :class:`PowerRetentionCache`."""

    def __init__(self, deg: int = 2, scale: float | None = None, switch_over_seq_len: int = 512,
                 backend: str = "auto", static: bool = False, num_layers: int | None = None):
        layer = functools.partial(PowerRetentionLayer, deg=deg, scale=scale, switch_over_seq_len=switch_over_seq_len,
                                  backend=backend, static=static)
        if num_layers is None:
            super().__init__(layer_class_to_replicate=layer)
        else:
            super().__init__(layers=[layer() for _ in range(num_layers)])

    def retention_step(self, Q, K, V, log_G=None, *, layer_idx: int) -> torch.Tensor:
        """The outputs of layer ``layer_idx`` for ``Q`` after appending ``K``, ``V``, ``log_G`` to its cache."""
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or layer_idx < 0:
            raise ValueError(f"layer_idx must be a non-negative int, got {layer_idx!r}")
        if self.layer_class_to_replicate is not None:
            while len(self.layers) <= layer_idx:
                self.layers.append(self.layer_class_to_replicate())
        if layer_idx >= len(self.layers):
            raise ValueError(f"layer_idx must be below the cache's {len(self.layers)} layers, got {layer_idx}")
        return self.layers[layer_idx].step(Q, K, V, log_G)

    def memory_bytes(self) -> int:
        """Bytes held by every layer (see :meth:`PowerRetentionCache.memory_bytes`)."""
        return sum(layer.cache.memory_bytes() for layer in self.layers)
