"""``cotangent.output_cotangent_kernel`` (``dn = dy / den`` rounded to the operands, ``delta = -(dn . y)``) against
the same formula in torch: each rounding, zero denominators, a non-contiguous and a broadcast (stride 0) ``dY``,
head dims that are not powers of two, and the two-views-of-one-buffer form of the minimal-layout kernels. The
whole backward is checked against the float64 oracle in test_triton_training.py, and every rounding compiled for sm_90
there (``test_every_kernel_compiles_and_fits_hopper``)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from retention_kernels.triton import cotangent


def reference_cotangent(dY, Y, den, rounding):
    inverse = torch.where(den == 0, 0.0, 1.0 / torch.where(den == 0, 1.0, den))
    dn = dY.float() * inverse[..., None]
    if rounding == cotangent.BF16:
        dn = dn.to(torch.bfloat16).float()
    elif rounding == cotangent.TF32:
        bits = dn.view(torch.int32)
        dn = ((bits + 0x1000) & ~0x1FFF).view(torch.float32)
    return dn, -(dn.double() * Y.double()).sum(-1)


ROUNDINGS = {"bf16": (cotangent.BF16, torch.bfloat16), "tf32": (cotangent.TF32, torch.float16),
             "none": (cotangent.NO_ROUNDING, torch.float32)}


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "broadcast", "one-buffer"])
@pytest.mark.parametrize("rounding", list(ROUNDINGS))
@pytest.mark.parametrize("e", [16, 24])
def test_output_cotangent_matches_torch(layout, rounding, e, interpreter):
    mode, dtype = ROUNDINGS[rounding]
    b, t, hq = 2, 37, 3
    torch.manual_seed(0)
    Y = torch.randn(b, t, hq, e).to(dtype)
    den = torch.rand(b, t, hq) * 10.0 + 0.1
    den[0, :5] = 0.0  # rows that see no weight: dn = delta = 0
    if layout == "transposed":
        dY = torch.randn(b, hq, t, e).to(dtype).transpose(1, 2)
    elif layout == "broadcast":
        dY = torch.randn(1, 1, 1, e).to(dtype).expand(b, t, hq, e)
    else:
        dY = torch.randn(b, t, hq, e).to(dtype)
    dn_ref, delta_ref = reference_cotangent(dY, Y, den, mode)
    device = interpreter
    dY_dev, Y_dev, den_dev = (x.to(device) for x in (dY, Y, den))
    if layout == "one-buffer":  # the minimal-layout kernels read [dn, delta] as one fp32 row of e + 1
        buffer = torch.full((b, t, hq, e + 1), float("nan"), device=device)
        dn, delta = cotangent.output_cotangent(dY_dev, Y_dev, den_dev, mode, buffer[..., :e], buffer[..., e])
    else:
        dn, delta = cotangent.output_cotangent(dY_dev, Y_dev, den_dev, mode)
        assert dn.dtype == (torch.bfloat16 if mode == cotangent.BF16 else torch.float32)
    # dn: the same fp32 product, rounded the same way (bit for bit); delta: an fp32 sum of e products
    torch.testing.assert_close(dn.float().cpu(), dn_ref, rtol=0, atol=0)
    assert (delta.cpu()[0, :5] == 0).all()
    torch.testing.assert_close(delta.double().cpu(), delta_ref, rtol=1e-5, atol=1e-6)
