"""The FLOP/byte counts of ``retention.flops`` against hand counts and against torch's FLOP counter run on the
reference chunked algorithm."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from retention.flops import power_retention_cost
from retention.reference import power_retention_chunked
from retention.testing import random_inputs


def test_hand_count_with_gqa_and_a_partial_chunk():
    # b=2, t=10, hq=4, h=2, d=3, e=5, deg=2 (D=6), chunks of 4, 4, 2.
    cost = power_retention_cost(2, 10, 4, 3, h=2, e=5, deg=2, chunk_size=4, itemsize=2)
    intra = 2 * 4 * (16 + 16 + 4) * (3 + 5)
    state = 2 * 10 * 2 * 6 * 5 * (2 + 4)
    assert cost.state_dim == 6
    assert cost.flops == intra + state == 9504
    assert cost.sdpa_flops == 2 * 4 * 10 * 10 * (3 + 5)
    read = 2 * 10 * (4 * 3 + 2 * 3 + 2 * 5) * 2 + 2 * 10 * 2 * 4
    written = 2 * 10 * 4 * 5 * 2
    assert cost.bytes == read + written == 2080


def test_passes_scale_flops_and_bytes():
    args = dict(b=1, t=256, hq=8, d=32, h=2, deg=2, chunk_size=64, itemsize=4)
    fwd = power_retention_cost(**args, pass_="fwd")
    bwd = power_retention_cost(**args, pass_="bwd")
    both = power_retention_cost(**args, pass_="fwd+bwd")
    assert bwd.flops == 2 * fwd.flops and both.flops == 3 * fwd.flops
    assert bwd.sdpa_flops == 2 * fwd.sdpa_flops and both.sdpa_flops == 3 * fwd.sdpa_flops
    assert bwd.bytes == 2 * fwd.bytes and both.bytes == fwd.bytes + bwd.bytes


@pytest.mark.parametrize("chunk_size", [None, 16, 40])
def test_one_chunk_is_quadratic_attention(chunk_size):
    cost = power_retention_cost(3, 16, 4, 16, deg=3, chunk_size=chunk_size)
    assert cost.flops == cost.sdpa_flops == 3 * 4 * 16 * 16 * 32


@pytest.mark.parametrize("deg", [1, 2, 3])
def test_matches_torch_flop_counter_on_the_reference(deg):
    """The reference computes the full c x c block (twice the causal count) and carries the sum of keys as an
    extra value column (e + 1); with those two differences its matmul FLOPs equal ours."""
    b, t, hq, h, d, e, c = 2, 48, 4, 2, 8, 6, 16
    inputs = random_inputs(b=b, t=t, hq=hq, h=h, d=d, e=e, dtype=torch.float64)
    with FlopCounterMode(display=False) as counter:
        power_retention_chunked(**inputs, deg=deg, chunk_size=c)
    counted = counter.get_total_flops()
    ours = power_retention_cost(b, t, hq, d, h=h, e=e, deg=deg, chunk_size=c)
    D = ours.state_dim
    intra_full_block = b * hq * (t // c) * c * c * 2 * (d + e + 1)
    state_with_keys = b * t * 2 * D * (e + 1) * (h + hq)
    assert counted == intra_full_block + state_with_keys
    intra_ours = b * hq * (t // c) * c * c * (d + e)
    assert ours.flops == intra_ours + b * t * 2 * D * e * (h + hq)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(b=0), "b must be a positive int, got 0"),
        (dict(t=2.0), "t must be a positive int, got 2.0"),
        (dict(h=3), "hq must be a multiple of h, got hq=4, h=3"),
        (dict(chunk_size=0), "chunk_size must be a positive int or None, got 0"),
        (dict(pass_="backward"), "pass_ must be one of"),
        (dict(deg=0), "deg must be a positive int"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, message):
    args = dict(b=1, t=8, hq=4, d=8) | kwargs
    positional = [args.pop(name) for name in ("b", "t", "hq", "d")]
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        power_retention_cost(*positional, **args)


def test_docstring_example():
    import doctest

    import retention.flops

    result = doctest.testmod(retention.flops)
    assert result.attempted > 0 and result.failed == 0
