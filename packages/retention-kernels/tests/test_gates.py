"""``gates.gate_gradient_kernel`` (d log_G from the gradient kernels' per-chunk pieces) against the same formula in
float64 torch, on random pieces: several chunks with the last one partial, query-head groups, chunk sizes that
are not powers of two, many key blocks (the kernel then walks a chunk in several tiles), and pieces whose sizes
span 30 orders of magnitude (strong gates). The whole backward, gates included, is checked against the float64
oracle in test_triton_training.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")

from retention_kernels.triton import function

CASES = {
    # name: (b, t, hq, h, chunk C, key block)
    "partial-last-chunk-gqa2": (2, 45, 4, 2, 16, 8),
    "chunk35-three-key-blocks": (1, 80, 1, 1, 35, 16),
    "16-key-blocks": (1, 130, 2, 1, 64, 4),
    "64-key-blocks-several-tiles": (1, 600, 1, 1, 512, 8),
}


def reference_gate_gradient(G, state_inner, query_terms, key_terms, spans, key_block, C, n):
    """The kernel's formula (see gates.py) in float64 torch: suffix and prefix sums along each chunk."""
    b, t, h = key_terms.shape
    group = query_terms.shape[2] // h
    T_pad = n * C

    def by_chunk(x):  # [b, t, h] -> [b h, n, C], zeros padding the last chunk
        return torch.nn.functional.pad(x.transpose(1, 2), (0, T_pad - t)).reshape(b * h, n, C)

    queries = by_chunk(query_terms.double().reshape(b, t, h, group).sum(-1))
    keys = by_chunk(key_terms.double())
    later_queries = queries.flip(-1).cumsum(-1).flip(-1)  # i >= u
    earlier_keys = torch.nn.functional.pad(keys.cumsum(-1)[..., :-1], (1, 0))  # j < u
    kept = G.reshape(b * h, n, C)[..., -1].double().exp() * state_inner
    blocks = torch.arange(spans.shape[2])
    after = torch.arange(C) >= (blocks[:, None] + 1) * key_block  # [nb, C]
    spans = spans.double()
    later_rows = torch.where(after, spans, 0.0).flip(-1).cumsum(-1).flip(-1)
    span = torch.where(after, later_rows, spans).sum(2)
    total = span + later_queries + earlier_keys + kept[..., None]
    return total.reshape(b, h, T_pad)[..., :t].transpose(1, 2)


def wide_range(*shape):
    """Signed values whose sizes span e^-70 .. 1 (the pieces of strong gates)."""
    return torch.randn(*shape) * torch.exp(-70.0 * torch.rand(*shape))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("magnitudes", ["normal", "wide-range"])
def test_gate_gradient_kernel_matches_float64_formula(case, magnitudes, interpreter, monkeypatch):
    monkeypatch.setattr(function, "POISON", True)  # a position the kernel did not write stays NaN
    b, t, hq, h, C, key_block = CASES[case]
    n = -(-t // C)
    n_blocks = -(-C // key_block)
    draw = torch.randn if magnitudes == "normal" else wide_range
    torch.manual_seed(0)
    query_terms, key_terms = draw(b, t, hq), draw(b, t, h)
    spans = draw(b * h, n, n_blocks, C)
    log_g = torch.nn.functional.logsigmoid(torch.randn(b, h, n, C) + 2.0)
    G = log_g.cumsum(-1).reshape(b, h, n * C)
    state_inner = torch.randn(b * h, n, dtype=torch.float64)
    plan = SimpleNamespace(n=n, C=C, T_pad=n * C)  # what the launcher reads of a function._Plan
    pieces = [x.to(interpreter) for x in (G, state_inner, query_terms, key_terms, spans)]
    got = function._gate_gradient(*pieces, key_block, plan).cpu()
    expected = reference_gate_gradient(G, state_inner, query_terms, key_terms, spans, key_block, C, n)
    assert got.shape == (b, t, h) and got.dtype == torch.float32
    # fp64 sums rounded once to fp32: a relative error of a few fp32 units wherever the result is not tiny
    torch.testing.assert_close(got.double(), expected, rtol=4e-7, atol=1e-12 * expected.abs().max().item())
