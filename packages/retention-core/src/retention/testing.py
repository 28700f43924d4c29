"""Test helpers shared by every package: the tolerance rule of SPEC.md section 5 and random problems.

Tolerance rule: the backend's error against the float64 oracle may be at most ``factor`` times the error of
plain PyTorch in the same precision (the quadratic formula evaluated in the inputs' dtype), plus an absolute
floor. Errors are norm-wise: ``||x - oracle|| / ||oracle||``.
"""

from __future__ import annotations

import torch

from .reference import power_retention_chunked, power_retention_quadratic

__all__ = [
    "assert_close_to_oracle",
    "check_against_oracle",
    "negligible_norm",
    "plain_error",
    "random_inputs",
    "relative_error",
]


def relative_error(actual: torch.Tensor, expected: torch.Tensor, negligible: float = 1e-30) -> float:
    """``||actual - expected|| / max(||expected||, negligible)``, in float64."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(negligible)).item()


def negligible_norm(expected: torch.Tensor, dtype: torch.dtype) -> float:
    """``sqrt(n) * tiny / eps`` of the compute dtype of ``dtype`` inputs (fp32, or fp64 for fp64): below this
    norm a tensor's entries sit near the subnormal range, where relative precision is lost, so errors are
    measured against this scale instead (e.g. gradients scaled by ``exp(-90)`` under strong gating)."""
    compute = torch.finfo(torch.promote_types(dtype, torch.float32))
    return expected.numel() ** 0.5 * compute.tiny / compute.eps


def plain_error(expected: torch.Tensor, plain: torch.Tensor, output_dtype: torch.dtype | None = None,
                negligible: float = 1e-30) -> float:
    """Error of the same-precision PyTorch computation (inf when it overflowed), and at least the error of
    rounding ``expected`` to ``output_dtype`` (no result returned in that dtype can do better)."""
    if not torch.isfinite(plain).all():
        return float("inf")
    rounding = 0.0 if output_dtype is None else relative_error(expected.to(output_dtype), expected, negligible)
    return max(relative_error(plain, expected, negligible), rounding)


def assert_close_to_oracle(name: str, actual: torch.Tensor, expected: torch.Tensor, baseline: float,
                           factor: float = 3.0, floor: float = 1e-5) -> None:
    """``actual`` finite and within ``factor * baseline + floor`` of ``expected`` (norm-wise relative).

    A baseline above 1 is kept (a quantity that plain PyTorch cannot resolve at this precision, e.g. a gradient
    that is zero up to rounding, as with ``t = 1`` under strong gating); an infinite one (the plain run
    overflowed) counts as 1, so rescale the plain run instead (``check_against_oracle(plain_scales=...)``).
    Norms below :func:`negligible_norm` are compared against that scale (absolutely).
    """
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values (NaN poison or overflow)"
    error = relative_error(actual, expected, negligible_norm(expected, actual.dtype))
    bound = factor * (baseline if baseline != float("inf") else 1.0) + floor
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
    being the largest of: the error of the quadratic formula in plain PyTorch at the inputs' precision (fp32 for
    fp32 and up); the unit roundoff of the inputs' dtype; for gradients, the oracle's own error when fed the
    cotangents rounded to the outputs' dtypes; and the error of the plain PyTorch chunked algorithm
    (:func:`power_retention_chunked`, in fp32 or fp64 for fp64, same chunk size, 64 for None). A linear-cost
    form loses what the quadratic form keeps where ``<q, k> ~ 0`` (``phi(q)^T phi(k)`` cancels), and in fp64
    this measures the oracle's own rounding (a gate's gradient that is tiny next to the terms that cancel in
    it, under strong gating, is only known to ``eps`` times those terms).
    ``plain_scales = (a, c)``: powers of two that multiply Q and K in the plain baseline only. Without an
    initial state ``Y(aQ, cK) = Y(Q, K)`` exactly (the state scales by ``c^deg`` and is scaled back), so
    extreme magnitudes get a baseline that does not overflow in fp16/bf16. Returns the errors by name.
    """
    dtype = inputs["Q"].dtype
    plain_dtype = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32
    # Inputs and cotangents pass through ``dtype``: no result is owed more accuracy than its unit roundoff
    # (a baseline that matters for tiny tensors, where the plain run's error is a single lucky rounding).
    roundoff = torch.finfo(dtype).eps / 2
    query_scale, key_scale = plain_scales
    if (query_scale, key_scale) != (1.0, 1.0) and inputs.get("initial_state") is not None:
        raise ValueError("plain_scales needs inputs without an initial_state")
    oracle_kwargs = {name: kwargs[name] for name in ("deg", "scale") if name in kwargs}

    def leaves(cast) -> dict:
        return {name: x if not isinstance(x, torch.Tensor) else cast(x.detach()).requires_grad_(grads)
                for name, x in inputs.items()}

    mine, plain, chunked = leaves(lambda x: x), leaves(lambda x: x), leaves(lambda x: x)
    oracle = leaves(torch.Tensor.double)
    outputs = {}
    result = run(**mine, return_final_state=return_final_state, **kwargs)
    outputs["mine"] = result if return_final_state else (result,)
    outputs["oracle"] = power_retention_quadratic(**oracle, return_final_state=True, **oracle_kwargs)
    scaled = {**plain, "Q": plain["Q"] * query_scale, "K": plain["K"] * key_scale}
    Y, state, keys = power_retention_quadratic(**scaled, return_final_state=True, dtype=plain_dtype, **oracle_kwargs)
    state_scale = key_scale ** oracle_kwargs.get("deg", 2)
    outputs["plain"] = (Y, state.double() / state_scale, keys.double() / state_scale)
    chunk_size = min(kwargs.get("chunk_size") or 64, inputs["Q"].shape[1])
    outputs["chunked"] = power_retention_chunked(**chunked, chunk_size=chunk_size, return_final_state=True,
                                                 **oracle_kwargs)
    count = 3 if return_final_state else 1
    names = ["Y", "state", "sum_of_keys"][:count]
    errors = {}
    for i, (name, actual, expected) in enumerate(zip(names, outputs["mine"], outputs["oracle"])):
        negligible = negligible_norm(expected, actual.dtype)
        errors[name] = relative_error(actual, expected, negligible)
        baseline = max(plain_error(expected, outputs["plain"][i], actual.dtype, negligible), roundoff,
                       plain_error(expected, outputs["chunked"][i], None, negligible))
        assert_close_to_oracle(name, actual, expected, baseline, factor, floor)
    if not grads:
        return errors

    cotangents = [torch.randn(x.shape, generator=generator, dtype=torch.float64) for x in outputs["oracle"][:count]]
    # The backend's outputs are in low precision, so the cotangents reaching it are rounded to those dtypes; the
    # oracle's gradient for such rounded cotangents shows how much that alone costs (much, where a gradient
    # cancels, e.g. the gate of a single step).
    rounded = [cot.to(out.dtype).double() for cot, out in zip(cotangents, outputs["mine"])]
    grads = {}
    passes = [("mine", mine, cotangents), ("oracle", oracle, cotangents), ("plain", plain, cotangents),
              ("oracle, rounded cotangents", oracle, rounded), ("chunked", chunked, cotangents)]
    for key, leaf, cots in passes:
        loss = sum((out.double() * cot.to(out.device)).sum() for out, cot in zip(outputs[key.split(",")[0]], cots))
        names = [name for name, x in leaf.items() if isinstance(x, torch.Tensor)]
        grads[key] = dict(zip(names, torch.autograd.grad(loss, [leaf[name] for name in names], allow_unused=True,
                                                         retain_graph=key == "oracle")))
    for name, actual in grads["mine"].items():
        expected = grads["oracle"][name]
        assert actual is not None, f"grad of {name}: the backend returned no gradient"
        negligible = negligible_norm(expected, actual.dtype)
        errors[f"grad {name}"] = relative_error(actual, expected, negligible)
        baseline = max(plain_error(expected, grads["plain"][name], actual.dtype, negligible), roundoff,
                       relative_error(grads["oracle, rounded cotangents"][name], expected, negligible),
                       plain_error(expected, grads["chunked"][name], None, negligible))
        assert_close_to_oracle(f"grad {name}", actual, expected, baseline, factor, floor)
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

        k0 = (torch.randn(b, 8, h, d, generator=generator, dtype=torch.float64) + offset) * magnitude
        v0 = torch.randn(b, 8, h, e, generator=generator, dtype=torch.float64)
        s0, z0 = update_state(k0, v0, torch.zeros(b, 8, h, dtype=torch.float64), deg, dtype=torch.float64)
        assert s0.shape[-2] == D
        inputs["initial_state"] = s0.to(device=device, dtype=dtype).requires_grad_(requires_grad)
        inputs["sum_of_keys"] = z0.to(device=device, dtype=torch.float32 if dtype != torch.float64 else dtype)
        inputs["sum_of_keys"].requires_grad_(requires_grad)
    return inputs
