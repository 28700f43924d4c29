"""Triton helpers shared by the kernels: the sympow expansion of a tile and its transposed Jacobian.

The state is kept in the minimal public layout of ``retention.sympow`` (feature ``a`` multiplies
``x[idx[a, 0]] * ... * x[idx[a, p-1]]`` with weight ``w[a]``), so no conversion is needed at the API boundary.
A tile of features ``a0 .. a0+BD`` of ``phi(x)`` for a block of rows is built in registers from the rows' tile
(``p`` products with one-hot selection matrices on the tensor cores), never written to memory.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def select(x, IDX, a, a_mask, l, DEG: tl.constexpr, DP: tl.constexpr, OP: tl.constexpr,
            PRECISION: tl.constexpr):
    """``x[:, idx[a, l]]`` as fp32 ``[rows, BD]``: a product with a one-hot ``[DP, BD]`` matrix, so the
    gather runs on the tensor cores and is exact (one non-zero term per output)."""
    coordinate = tl.load(IDX + a * DEG + l, mask=a_mask, other=-1)
    one_hot = (tl.arange(0, DP)[:, None] == coordinate[None, :]).to(OP)
    return tl.dot(x, one_hot, input_precision=PRECISION)


@triton.jit
def sympow_tile(x, IDX, W, a, a_mask, DEG: tl.constexpr, DP: tl.constexpr, OP: tl.constexpr,
                PRECISION: tl.constexpr):
    """``phi(x)[:, a]`` as an fp32 ``[rows, BD]`` tile, ``w[a] * prod_l x[:, idx[a, l]]``, from a ``[rows, DP]``
    tile ``x`` (OP dtype) already in registers (0 for masked features)."""
    phi = tl.load(W + a, mask=a_mask, other=0.0)[None, :]
    for l in tl.static_range(DEG):
        phi = phi * select(x, IDX, a, a_mask, l, DEG, DP, OP, PRECISION)
    return phi


@triton.jit
def sympow_vjp(acc, dphi, x, IDX, W, a, a_mask,
               DEG: tl.constexpr, DP: tl.constexpr, OP: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + J_phi(x)^T dphi`` for a ``[rows, BD]`` tile ``dphi``; ``acc`` is ``[rows, DP]`` fp32.

    ``(J^T u)_m = sum_a u_a w_a sum_{l: idx[a,l]=m} prod_{l' != l} x[idx[a,l']]``: for each factor ``l`` the
    coefficients are scattered onto the coordinates by a product with the one-hot matrix of ``idx[:, l]``.
    """
    weighted = dphi * tl.load(W + a, mask=a_mask, other=0.0)[None, :]
    columns = tl.arange(0, DP)
    for l in tl.static_range(DEG):
        coefficient = weighted
        for other in tl.static_range(DEG):
            if other != l:
                coefficient = coefficient * select(x, IDX, a, a_mask, other, DEG, DP, OP, PRECISION)
        target = tl.load(IDX + a * DEG + l, mask=a_mask, other=-1)
        one_hot = (target[:, None] == columns[None, :]).to(OP)
        acc += tl.dot(coefficient.to(OP), one_hot, input_precision=PRECISION)
    return acc


@triton.jit
def integer_power(x, P: tl.constexpr):
    """``x ** P`` for a small constant integer ``P >= 0`` (repeated products, exact signs)."""
    if P == 0:
        result = x * 0.0 + 1.0
    else:
        result = x
        for _ in tl.static_range(P - 1):
            result = result * x
    return result


def next_power_of_2(n: int, minimum: int = 16) -> int:
    return max(minimum, triton.next_power_of_2(n))


@triton.jit
def spanning_tile(P, local_i, local_j, q_start, k_start, C, own, column, running, SPAN_ROW, BK: tl.constexpr):
    """Gate sums of one ``[BQ, BK]`` tile of ``P_ij = dA_ij A_ij`` (query rows ``local_i``, key columns
    ``local_j = k_start + arange(BK)``, chunk positions; the query tiles of a key block come in DECREASING order).

    The gate at position ``u`` scales exactly the pairs ``j < u <= i``, so its gradient from this key block is
    ``sum_{i >= u} sum_{j < u} P_ij``, a sum of terms that all span ``u`` (never the diagonal, no cancellation):
      * ``u`` inside the key block: tiles whose rows reach into the block add the masked ``(P U)[i, u]`` with
        ``U[j, u] = [j < u]``; later tiles (every ``i >= u``) only need their column sums (``column``), turned
        into the exclusive prefix over ``j`` by :func:`spanning_finish`;
      * ``u`` after the key block (every ``j < u``): the suffix over ``i >= u`` of the row sums, plus ``running``,
        the total of the tiles after this one; stored to ``SPAN_ROW + u`` here.
    """
    if q_start < k_start + BK:
        before = (local_j[:, None] < local_j[None, :]).to(tl.float32)
        spanned = tl.dot(P, before, input_precision="ieee")  # [BQ, BK]: sum_{j < u} P_ij
        own += tl.sum(tl.where(local_i[:, None] >= local_j[None, :], spanned, 0.0), axis=0)
    else:
        column += tl.sum(P, axis=0)
    rows = tl.sum(P, axis=1)
    later = tl.cumsum(rows, axis=0, reverse=True) + running
    tl.store(SPAN_ROW + local_i, later, mask=(local_i >= k_start + BK) & (local_i < C))
    running += tl.sum(rows, axis=0)
    return own, column, running


@triton.jit
def spanning_finish(own, column, local_j, k_start, C, SPAN_ROW, BK: tl.constexpr):
    """Store the key block's own gates (``own`` + the exclusive prefix of ``column``) and zeros before it."""
    before = local_j[:, None] < local_j[None, :]
    own += tl.sum(tl.where(before, column[:, None], 0.0), axis=0)
    tl.store(SPAN_ROW + local_j, own, mask=local_j < C)
    for start in range(0, k_start, BK):
        tl.store(SPAN_ROW + start + tl.arange(0, BK), tl.zeros((BK,), dtype=tl.float32))
