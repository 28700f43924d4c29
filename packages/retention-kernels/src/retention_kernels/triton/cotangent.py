"""The output's cotangent in the form every gradient kernel reads: ``dN'_i = [dn_i, delta_i]`` with

    dn_i = dy_i / den_i   (rounded to the kernels' operand precision),    delta_i = -(dn_i . y_i)

(both 0 where ``den_i == 0``, where ``y_i = 0``). One pass over ``dY`` and ``Y``: the torch expression it
replaces made fp32 copies of both and of their product (about 0.4 GB by their sizes at ``[1, 65536, 8, 64]``
bf16). On an H200 the kernel takes 0.05 ms there; the torch operations of a whole fwd+bwd, these copies among
them, took about 1 ms before (benchmarks/results/gpu_kernel_profile{,_2026-12-03_pm}.json).

Every use is ``dn_i . v_j + delta_i = dn_i . (v_j - y_i)``, which nearly cancels where the weights are peaked
(strong gates, large magnitudes). ``delta`` is therefore computed from the *rounded* ``dn``: rounding ``dn`` only
inside the products (and not in ``delta``) turned its relative rounding error into an absolute one (bf16: dQ, dK
relative errors ~0.25 vs 3e-3 for Y).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# how dn is rounded before delta is taken from it
NO_ROUNDING, BF16, TF32 = 0, 1, 2


@triton.jit
def output_cotangent_kernel(
    DY, Y, DEN, DN, DELTA,
    rows, t, hq, e, sdy_b, sdy_t, sdy_h, sdy_e, dn_row_stride, delta_row_stride,
    ROUNDING: tl.constexpr, BR: tl.constexpr, EP: tl.constexpr,
):
    """Grid ``(cdiv(rows, BR),)`` over the ``rows = b t hq`` rows. ``DY [b, t, hq, e]`` any strides, ``Y`` and
    ``DEN [b, t, hq]`` (fp32) contiguous; ``DN`` rows of ``dn_row_stride`` (unit column stride; its dtype is the
    stored one) and ``DELTA`` (fp32) entries ``delta_row_stride`` apart."""
    row = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    row_mask = row < rows
    columns = tl.arange(0, EP)
    mask = row_mask[:, None] & (columns < e)[None, :]
    head, position, batch = row % hq, (row // hq) % t, row // (hq * t)
    dy_rows = batch * sdy_b + position * sdy_t + head * sdy_h
    dy = tl.load(DY + dy_rows[:, None] + columns[None, :] * sdy_e, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + row[:, None] * e + columns[None, :], mask=mask, other=0.0).to(tl.float32)
    den = tl.load(DEN + row, mask=row_mask, other=1.0)
    inverse = tl.where(den == 0.0, 0.0, 1.0 / tl.where(den == 0.0, 1.0, den))
    dn = dy * inverse[:, None]
    # rounding on the bits: the interpreter's fp32 -> bf16 cast truncates, the GPU's rounds to nearest even
    bits = dn.to(tl.int32, bitcast=True)
    if ROUNDING == 1:  # bf16, to nearest even (then the store's cast is exact)
        dn = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -0x10000).to(tl.float32, bitcast=True)
    elif ROUNDING == 2:  # tf32 (10-bit mantissa, the fp32 operands' tensor-core precision), half away from zero
        dn = ((bits + 0x1000) & -0x2000).to(tl.float32, bitcast=True)
    tl.store(DN + row[:, None] * dn_row_stride + columns[None, :], dn.to(DN.dtype.element_ty), mask=mask)
    tl.store(DELTA + row * delta_row_stride, -tl.sum(dn * y, axis=1), mask=row_mask)


def output_cotangent(dY: torch.Tensor, Y: torch.Tensor, den: torch.Tensor, rounding: int,
                     dn: torch.Tensor | None = None, delta: torch.Tensor | None = None):
    """``(dn [b, t, hq, e], delta [b, t, hq] fp32)`` for ``dY``, ``Y [b, t, hq, e]`` and ``den [b, t, hq]`` fp32
    (``Y``, ``den`` contiguous). ``rounding``: ``BF16`` (``dn`` stored as bf16), ``TF32`` or ``NO_ROUNDING``
    (fp32). Or into given ``dn`` / ``delta`` views (unit column stride, e.g. the two parts of one ``[.., e + 1]``
    buffer)."""
    b, t, hq, e = Y.shape
    if dn is None:
        dn = torch.empty(Y.shape, device=Y.device, dtype=torch.bfloat16 if rounding == BF16 else torch.float32)
    if delta is None:
        delta = torch.empty(b, t, hq, device=Y.device, dtype=torch.float32)
    rows = b * t * hq
    EP = triton.next_power_of_2(max(e, 16))
    BR = max(1, 4096 // EP)  # 4096 elements per program
    output_cotangent_kernel[(triton.cdiv(rows, BR),)](
        dY, Y, den, dn, delta, rows, t, hq, e, *dY.stride(), dn.stride(2), delta.stride(2),
        ROUNDING=rounding, BR=BR, EP=EP, num_warps=4,
    )
    return dn, delta
