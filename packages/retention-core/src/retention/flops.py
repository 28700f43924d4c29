"""FLOP and byte counts of power retention and of causal softmax attention, for benchmarks (SPEC.md section 6).

One function, :func:`power_retention_cost`, so every benchmark and plot counts the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from .sympow import sympow_dim

__all__ = ["Cost", "power_retention_cost"]

PASSES = ("fwd", "bwd", "fwd+bwd")
# Useful-FLOP multiplier of each pass: every matmul of the forward has two gradient matmuls of the same size.
_PASS_FACTOR = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}


@dataclass(frozen=True)
class Cost:
    """Counts of one call (all batches and heads together).

    Attributes:
        flops: useful FLOPs of the chunked power retention algorithm with the minimal ``D``.
        bytes: minimal memory traffic of power retention: every input read and every output written once.
        sdpa_flops: useful FLOPs of causal softmax attention (``scaled_dot_product_attention(is_causal=True)``)
            on the same ``Q, K, V``.
        state_dim: ``D = C(d + deg - 1, deg)``.
    """

    flops: float
    bytes: float
    sdpa_flops: float
    state_dim: int


def power_retention_cost(
    b: int,
    t: int,
    hq: int,
    d: int,
    *,
    h: int | None = None,
    e: int | None = None,
    deg: int = 2,
    chunk_size: int | None = None,
    pass_: str = "fwd",
    itemsize: int = 2,
) -> Cost:
    r"""FLOPs and bytes of one power retention call ``Q [b, t, hq, d], K [b, t, h, d], V [b, t, h, e]``.

    A FLOP is one multiply or one add (a multiply-add counts 2). With ``D = sympow_dim(d, deg)``, chunk size
    ``c`` (``None`` or ``c >= t``: one chunk, plain quadratic attention) and chunks of lengths ``L_n``:

    - state update ``S += phi(k) v^T``: ``2 D e`` per token and key/value head;
    - state query ``phi(q)^T S``: ``2 D e`` per token and query head (``4 D e`` per token-head in all);
    - intra-chunk block: ``L^2 / 2`` causal pairs per chunk and query head, each ``2 d`` (score) plus ``2 e``
      (weighted value), i.e. ``sum_n L_n^2 (d + e)`` per query head.

    The embedding ``phi``, the gates, the sum of keys and the normalisation are ``O(D + c)`` per token and are
    not counted (they are not "useful" matrix FLOPs). Causal softmax attention counts ``t^2 (d + e)`` per
    query head, the same convention as the intra-chunk block. The backward pass counts twice the forward's
    FLOPs and ``fwd+bwd`` three times.

    Bytes are the minimal traffic: forward reads Q, K, V (``itemsize`` bytes each) and ``log_G`` (fp32) and
    writes Y; backward reads those and dY and writes dQ, dK, dV and d``log_G``; ``fwd+bwd`` is the sum.

    Args:
        b: batch size.
        t: sequence length.
        hq: query heads.
        d: head dim of queries and keys.
        h: key/value heads (default ``hq``); ``hq`` must be a multiple of ``h``.
        e: value head dim (default ``d``).
        deg: the power ``p``.
        chunk_size: the chunk length ``c`` used by the call.
        pass_: ``"fwd"``, ``"bwd"`` or ``"fwd+bwd"``.
        itemsize: bytes per element of Q, K, V and Y (2 for bf16/fp16, 4 for fp32).

    Returns:
        A :class:`Cost`.

    Example:
        >>> cost = power_retention_cost(1, 4096, 8, 64, chunk_size=128)
        >>> cost.state_dim, round(cost.flops / 1e9, 1), round(cost.sdpa_flops / 1e9, 1)
        (2080, 18.0, 17.2)
    """
    for name, value in (("b", b), ("t", t), ("hq", hq), ("d", d), ("itemsize", itemsize)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    h = hq if h is None else h
    e = d if e is None else e
    for name, value in (("h", h), ("e", e)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    if hq % h:
        raise ValueError(f"hq must be a multiple of h, got hq={hq}, h={h}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if pass_ not in PASSES:
        raise ValueError(f"pass_ must be one of {PASSES}, got {pass_!r}")
    D = sympow_dim(d, deg)

    sdpa_forward = b * hq * t * t * (d + e)
    if chunk_size is None or chunk_size >= t:
        forward = sdpa_forward
    else:
        full, rest = divmod(t, chunk_size)
        intra = b * hq * (full * chunk_size**2 + rest**2) * (d + e)
        state = b * t * 2 * D * e * (h + hq)
        forward = intra + state

    read = b * t * (hq * d + h * d + h * e) * itemsize + b * t * h * 4  # Q, K, V and log_G (fp32)
    written = b * t * hq * e * itemsize  # Y
    forward_bytes = read + written
    backward_bytes = read + written + written + read  # reads inputs, Y and dY; writes dQ, dK, dV, dlog_G
    traffic = {"fwd": forward_bytes, "bwd": backward_bytes, "fwd+bwd": forward_bytes + backward_bytes}[pass_]

    factor = _PASS_FACTOR[pass_]
    return Cost(flops=float(factor * forward), bytes=float(traffic), sdpa_flops=float(factor * sdpa_forward),
                state_dim=D)
