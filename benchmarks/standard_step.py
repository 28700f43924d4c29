"""One ``power_retention`` fwd+bwd on the Triton backend, on fresh random inputs: the step that
``gpu_kernel_profile.py`` and ``host_overhead.py`` time (import it after their ``--dry-run`` has set
``TRITON_INTERPRET``)."""

from __future__ import annotations

import torch

from retention import power_retention


def fwd_bwd_step(b, t, h, d, deg, chunk, device, dtype, strided=False):
    """``step() -> (Y, (dQ, dK, dV, dlog_G))`` for ``Q, K, V [b, t, h, d]`` (``strided``: views of one ``[b, t, 3 h,
    d]`` projection, retention_train's layout), gates ``logsigmoid(N(4, 1))``, cotangent ``N(0, 1)``; seed 0."""
    generator = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device)

    if strided:
        Q, K, V = randn(b, t, 3 * h, d).to(dtype).requires_grad_().split(h, dim=2)
    else:
        Q, K, V = (randn(b, t, h, d).to(dtype).requires_grad_() for _ in range(3))
    log_G = torch.nn.functional.logsigmoid(randn(b, t, h) + 4.0).requires_grad_()
    dY = randn(b, t, h, d).to(dtype)

    def step():
        Y = power_retention(Q, K, V, log_G, deg=deg, chunk_size=chunk, backend="triton")
        return Y, torch.autograd.grad(Y, (Q, K, V, log_G), dY)

    return step
