"""Test helpers shared by every package: the tolerance rule of SPEC.md section 5 and random problems.

Tolerance rule: the backend's error against the float64 oracle may be at most ``factor`` times the error of
plain PyTorch in the same precision (the quadratic formula evaluated in the inputs' dtype), plus an absolute
floor. Errors are norm-wise: ``||x - oracle|| / ||oracle||``.
"""

from __future__ import annotations

import torch

from .reference import power_retention_quadratic

__all__ = ["assert_close_to_oracle", "check_against_oracle", "plain_error", "random_inputs", "relative_error"]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def plain_error(expected: torch.Tensor, plain: torch.Tensor, output_dtype: torch.dtype | None = None) -> float:
    """Error of the same-precision PyTorch computation (inf when it overflowed), and at least the error of
    rounding ``expected`` to ``output_dtype`` (no result returned in that dtype can do better)."""
    if not torch.isfinite(plain).all():
        return float("inf")
    rounding = 0.0 if output_dtype is None else relative_error(expected.to(output_dtype), expected)
    return max(relative_error(plain, expected), rounding)


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


def check_against_oracle(run, inputs: dict, *, grads: bool = True, return_final_state: bool = False,
                         factor: float = 3.0, floor: float = 1e-5, plain_scales: tuple[float, float] = (1.0, 1.0),
                         generator: torch.Generator | None = None, **kwargs) -> dict[str, float]:
    """Check ``run(**inputs, return_final_state=..., **kwargs)`` (``power_retention`` or alike) against the oracle.

    Compares ``Y`` (with ``return_final_state`` also the state and sum of keys) and, with ``grads``, the
    gradients of every input tensor for random cotangents, each by :func:`assert_close_to_oracle`, the baseline
    being the quadratic formula in plain PyTorch at the inputs' precision (fp32 for fp32 and up).
    ``plain_scales = (a, c)``: powers of two that multiply Q and K in the plain baseline only. Without an
    initial state ``Y(aQ, cK) = Y(Q, K)`` exactly (the state scales by ``c^deg`` and is scaled back), so
    extreme magnitudes get a baseline that does not overflow in fp16/bf16. Returns the errors by name.
    """
    dtype = inputs["Q"].dtype
    plain_dtype = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32
    query_scale, key_scale = plain_scales
    if (query_scale, key_scale) != (1.0, 1.0) and inputs.get("initial_state") is not None:
        raise ValueError("plain_scales needs inputs without an initial_state")
    oracle_kwargs = {name: kwargs[name] for name in ("deg", "scale") if name in kwargs}

    def leaves(cast) -> dict:
        return {name: x if not isinstance(x, torch.Tensor) else cast(x.detach()).requires_grad_(grads)
                for name, x in inputs.items()}

    mine, oracle, plain = leaves(lambda x: x), leaves(torch.Tensor.double), leaves(lambda x: x)
    outputs = {}
    result = run(**mine, return_final_state=return_final_state, **kwargs)
    outputs["mine"] = result if return_final_state else (result,)
    outputs["oracle"] = power_retention_quadratic(**oracle, return_final_state=True, **oracle_kwargs)
    scaled = {**plain, "Q": plain["Q"] * query_scale, "K": plain["K"] * key_scale}
    Y, state, keys = power_retention_quadratic(**scaled, return_final_state=True, dtype=plain_dtype, **oracle_kwargs)
    state_scale = key_scale ** oracle_kwargs.get("deg", 2)
    outputs["plain"] = (Y, state.double() / state_scale, keys.double() / state_scale)
    count = 3 if return_final_state else 1
    names = ["Y", "state", "sum_of_keys"][:count]
    errors = {}
    for name, actual, expected, baseline in zip(names, outputs["mine"], outputs["oracle"], outputs["plain"]):
        errors[name] = relative_error(actual, expected)
        assert_close_to_oracle(name, actual, expected, plain_error(expected, baseline, actual.dtype), factor, floor)
    if not grads:
        return errors

    cotangents = [torch.randn(x.shape, generator=generator, dtype=torch.float64) for x in outputs["oracle"][:count]]
    for key, leaf in (("mine", mine), ("oracle", oracle), ("plain", plain)):
        loss = sum((out.double() * cot.to(out.device)).sum() for out, cot in zip(outputs[key][:count], cotangents))
        tensors = [x for x in leaf.values() if isinstance(x, torch.Tensor)]
        for x, grad in zip(tensors, torch.autograd.grad(loss, tensors, allow_unused=True)):
            x.grad = grad
    for name, x in mine.items():
        if not isinstance(x, torch.Tensor):
            continue
        expected = oracle[name].grad
        assert x.grad is not None, f"grad of {name}: the backend returned no gradient"
        errors[f"grad {name}"] = relative_error(x.grad, expected)
        baseline = plain_error(expected, plain[name].grad, x.grad.dtype)
        assert_close_to_oracle(f"grad {name}", x.grad, expected, baseline, factor, floor)
    return errors


def random_inputs(b=2, t=33, hq=4, h=2, d=16, e=None, dtype=torch.float32, device="cpu", gating=True,
                  gate_strength=1.0, magnitude=1.0, state=False, deg=2, generator=None, requires_grad=False,
                  offset=0.0):
    """Fresh random ``Q, K, V, log_G`` (and a state) as a dict of ``power_retention`` keyword arguments.

    Gates are ``logsigmoid`` of normal draws times ``gate_strength`` (so ``log_G <= 0``). ``offset`` (times
    ``magnitude``) is added to every coordinate of Q and K: with ``offset ~ 0.7`` most scores are positive, so
    odd degrees get denominators away from zero while some scores stay negative.
    """
    from .sympow import sympow_dim

    e = d if e is None else e

    def draw(*shape, scale=magnitude, shift=0.0, dt=dtype):
        x = (torch.randn(*shape, generator=generator, dtype=torch.float64) + shift) * scale
        return x.to(device=device, dtype=dt).requires_grad_(requires_grad)

    inputs = {"Q": draw(b, t, hq, d, shift=offset), "K": draw(b, t, h, d, shift=offset),
              "V": draw(b, t, h, e, scale=1.0)}
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
