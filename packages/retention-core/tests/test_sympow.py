import itertools
import math

import pytest
import torch

from retention import sympow, sympow_dim
from retention.sympow import sympow_table


@pytest.mark.parametrize("deg", [1, 2, 3, 4])
@pytest.mark.parametrize("d", [1, 2, 3, 7, 16, 64, 128])
def test_inner_product_identity(d, deg):
    if sympow_dim(d, deg) > 400_000:
        pytest.skip("table too large for a unit test")
    x = torch.randn(3, d, dtype=torch.float64)
    y = torch.randn(3, d, dtype=torch.float64)
    expected = (x * y).sum(-1) ** deg
    actual = (sympow(x, deg) * sympow(y, deg)).sum(-1)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10 * expected.abs().max().item())


@pytest.mark.parametrize(("d", "deg", "D"), [(64, 2, 2080), (64, 3, 45760), (32, 2, 528), (32, 4, 52360)])
def test_dimension(d, deg, D):
    assert sympow_dim(d, deg) == D == math.comb(d + deg - 1, deg)


def test_feature_order_is_combinations_with_replacement():
    index, weight = sympow_table(3, 2)
    assert [tuple(row) for row in index] == list(itertools.combinations_with_replacement(range(3), 2))
    assert weight.tolist() == pytest.approx([1, 2**0.5, 2**0.5, 1, 2**0.5, 1])


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_deg(bad):
    with pytest.raises(ValueError, match="deg"):
        sympow_dim(4, bad)


def test_bad_input_types():
    with pytest.raises(TypeError, match="x must be"):
        sympow([1.0, 2.0], 2)
    with pytest.raises(TypeError, match="floating point"):
        sympow(torch.ones(3, dtype=torch.int64), 2)


@pytest.mark.parametrize("deg", [1, 2, 3, 4])
def test_gradcheck(deg):
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: sympow(x, deg), (x,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_matches_float64_rounded(dtype):
    """Products are formed in fp32 at least: the result is the float64 embedding rounded once to ``dtype``
    (up to the last bit), also where an fp16 intermediate product would overflow (|x| ~ 20, x^4 ~ 1.6e5)."""
    x = (torch.randn(5, 6, dtype=torch.float64) * 20).to(dtype)
    expected = sympow(x.double(), 4)
    finite = expected.abs() < torch.finfo(dtype).max
    actual = sympow(x, 4)
    assert actual.dtype == dtype
    torch.testing.assert_close(actual.double()[finite], expected.to(dtype).double()[finite],
                               rtol=2 * torch.finfo(dtype).eps, atol=0)


def test_embedding_layout_on_a_batch():
    """``[..., d] -> [..., D]`` for any leading shape, feature by feature equal to the documented product."""
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    features = sympow(x, 3)
    assert features.shape == (2, 3, sympow_dim(4, 3))
    index, weight = sympow_table(4, 3)
    for a, (row, w) in enumerate(zip(index, weight)):
        torch.testing.assert_close(features[..., a], w * x[..., row[0]] * x[..., row[1]] * x[..., row[2]])
