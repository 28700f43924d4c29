"""Test helpers shared by every package: the tolerance rule of SPEC.md section 5 and random problems.

Tolerance rule: the backend's error against the float64 oracle may be at most ``factor`` times the error of
plain PyTorch in the same precision (the quadratic formula evaluated in the inputs' dtype), plus an absolute
floor. Errors are norm-wise: ``||x - oracle|| / ||oracle||``.
"""

from __future__ import annotations

import torch

from .reference import power_retention_quadratic

__all__ = ["relative_error", "assert_close_to_oracle", "random_inputs", "plain_error"]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def plain_error(expected: torch.Tensor, plain: torch.Tensor) -> float:
    """Error of the same-precision PyTorch computation (inf when it overflowed)."""
    if not torch.isfinite(plain).all():
        return float("inf")
    return relative_error(plain, expected)


def assert_close_to_oracle(name: str, actual: torch.Tensor, expected: torch.Tensor, baseline: float,
                           factor: float = 3.0, floor: float = 1e-5) -> None:
    """``actual`` finite and within ``factor * baseline + floor`` of ``expected`` (norm-wise relative)."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values (NaN poison or overflow)"
    error = relative_error(actual, expected)
    bound = factor * min(baseline, 1.0) + floor
    assert error <= bound, f"{name}: relative error {error:.3g} > {bound:.3g} (plain-PyTorch error {baseline:.3g})"


def low_precision_baseline(inputs: dict, dtype: torch.dtype, **kwargs):
    """The plain PyTorch computation in ``dtype`` (for fp32 and up: fp32), used to size tolerances."""
    compute = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32
    return power_retention_quadratic(**inputs, dtype=compute, **kwargs)


def random_inputs(b=2, t=33, hq=4, h=2, d=16, e=None, dtype=torch.float32, device="cpu", gating=True,
                  gate_strength=1.0, magnitude=1.0, state=False, deg=2, generator=None, requires_grad=False):
    """Fresh random ``Q, K, V, log_G`` (and a state) as a dict of ``power_retention`` keyword arguments.

    Gates are ``logsigmoid`` of normal draws times ``gate_strength`` (so ``log_G <= 0``).
    """
    from .sympow import sympow_dim

    e = d if e is None else e

    def draw(*shape, scale=magnitude, dt=dtype):
        x = torch.randn(*shape, generator=generator, dtype=torch.float64) * scale
        return x.to(device=device, dtype=dt).requires_grad_(requires_grad)

    inputs = {"Q": draw(b, t, hq, d), "K": draw(b, t, h, d), "V": draw(b, t, h, e, scale=1.0)}
    if gating:
        gates = torch.nn.functional.logsigmoid(
            torch.randn(b, t, h, generator=generator, dtype=torch.float64) * gate_strength + 1.0
        ) * gate_strength
        inputs["log_G"] = gates.to(device=device, dtype=torch.float32 if dtype != torch.float64 else dtype)
        inputs["log_G"].requires_grad_(requires_grad)
    if state:
        D = sympow_dim(d, deg)
        # A plausible state: the state of a random earlier segment (non-negative key sums for even deg).
        from .reference import update_state

        k0 = torch.randn(b, 8, h, d, generator=generator, dtype=torch.float64) * magnitude
        v0 = torch.randn(b, 8, h, e, generator=generator, dtype=torch.float64)
        s0, z0 = update_state(k0, v0, torch.zeros(b, 8, h, dtype=torch.float64), deg, dtype=torch.float64)
        assert s0.shape[-2] == D
        inputs["initial_state"] = s0.to(device=device, dtype=dtype).requires_grad_(requires_grad)
        inputs["sum_of_keys"] = z0.to(device=device, dtype=torch.float32 if dtype != torch.float64 else dtype)
        inputs["sum_of_keys"].requires_grad_(requires_grad)
    return inputs
