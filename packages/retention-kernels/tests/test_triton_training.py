"""The Triton training path (forward + backward) against the float64 oracle, SPEC.md section 5 tolerance rule.

Without CUDA the kernels run under ``TRITON_INTERPRET=1`` (see conftest.py) on small fp32 shapes; every kernel
output starts as NaN (``function.POISON``), so an element no kernel wrote fails the finiteness check.
"""

from __future__ import annotations

import pytest
import torch
import triton.language as tl

pytest.importorskip("triton")

import retention_kernels
from retention import power_retention
from retention._validate import validate
from retention.reference import power_retention_quadratic
from retention.sympow import sympow
from retention.testing import assert_close_to_oracle, plain_error, random_inputs
from retention_kernels.triton import function

NAMES = ("Q", "K", "V", "log_G", "initial_state", "sum_of_keys")


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(function, "POISON", True)


def outputs_and_grads(run, inputs, cotangents):
    Y, S, z = run(inputs)
    leaves = [inputs[n] for n in NAMES if n in inputs]
    loss = sum((out.double() * cot).sum() for out, cot in zip((Y, S, z), cotangents))
    return [Y, S, z, *torch.autograd.grad(loss, leaves)]


def check_against_oracle(inputs, deg, chunk_size, device):
    inputs = {n: x.to(device).detach().requires_grad_(True) for n, x in inputs.items()}
    b, t, hq, d = inputs["Q"].shape
    h, e = inputs["K"].shape[2], inputs["V"].shape[3]
    D = function.sympow_dim(d, deg)
    cot = (torch.randn(b, t, hq, e, dtype=torch.float64), torch.randn(b, h, D, e, dtype=torch.float64),
           torch.randn(b, h, D, dtype=torch.float64))
    cot = [c.to(device) for c in cot]

    def backend(x):
        return power_retention(**x, deg=deg, chunk_size=chunk_size, return_final_state=True, backend="triton")

    def oracle(x, dtype=torch.float64):
        return power_retention_quadratic(**x, deg=deg, return_final_state=True, dtype=dtype)

    got = outputs_and_grads(backend, inputs, cot)
    upcast = {n: x.detach().double().requires_grad_(True) for n, x in inputs.items()}
    ref = outputs_and_grads(oracle, upcast, cot)
    plain_inputs = {n: x.detach().float().requires_grad_(True) for n, x in inputs.items()}
    plain = outputs_and_grads(lambda x: oracle(x, torch.float32), plain_inputs, cot)
    labels = ["Y", "state", "sum_of_keys", *["d" + n for n in NAMES if n in inputs]]
    for label, g, r, p in zip(labels, got, ref, plain):
        assert_close_to_oracle(label, g.cpu(), r.cpu(), plain_error(r.cpu(), p.cpu()), factor=3.0, floor=1e-5)


CASES = {
    # name: (random_inputs kwargs, deg, chunk_size)
    "deg2-gqa-gates-state-chunk16": (dict(b=2, t=37, hq=4, h=2, d=16, state=True), 2, 16),
    "deg2-quadratic-chunk=t": (dict(b=1, t=24, hq=2, h=2, d=16, gating=False), 2, 24),
    "deg2-auto-chunk-strong-gates": (dict(b=1, t=40, hq=2, h=1, d=32, gate_strength=20.0), 2, None),
    "deg2-d24-padded-blocks-state": (dict(b=1, t=21, hq=1, h=1, d=24, state=True), 2, 8),
    "deg1-no-gates-chunk8": (dict(b=1, t=29, hq=2, h=1, d=16, gating=False, state=True, deg=1), 1, 8),
    "deg1-quadratic-chunk=t": (dict(b=1, t=20, hq=2, h=1, d=16, deg=1), 1, 20),
    # 18 chunks: the slot scans cross a group of scan_kernel's STEPS (16) slots, both ways
    "deg1-gates-state-18-chunks": (dict(b=1, t=70, hq=2, h=1, d=16, state=True, deg=1), 1, 4),
    "deg3-state-chunk7": (dict(b=1, t=23, hq=2, h=1, d=8, state=True, deg=3), 3, 7),
    "deg4-chunk16": (dict(b=1, t=20, hq=1, h=1, d=8, state=True, deg=4), 4, 16),
    "deg3-d17-padded-feature-tile": (dict(b=1, t=12, hq=1, h=1, d=17, state=True, deg=3), 3, 8),
}


@pytest.mark.parametrize("case", list(CASES))
def test_backend_matches_oracle_forward_and_backward(case, interpreter):
    kwargs, deg, chunk_size = CASES[case]
    inputs = random_inputs(dtype=torch.float32, **kwargs)
    if deg % 2:  # odd deg: signed weights; q.k > 0 keeps the denominators away from 0
        inputs["Q"], inputs["K"] = inputs["Q"].abs(), inputs["K"].abs()
    check_against_oracle(inputs, deg, chunk_size, interpreter)


GATE_CASES = {
    # name: (deg, head dim, chunk_size, block-pair layout)
    "deg2-pairs": (2, 16, 16, True),
    "deg2-minimal-layout": (2, 16, 16, False),
    "deg1": (1, 16, 16, False),
    "deg3": (3, 8, 8, False),
}


def strong_gate_inputs(deg, d, gates):
    """GQA, an initial state, t = 37 (not a multiple of the chunk), ``log_G`` = -20 per step or uniform in
    [-20, 0]: the gate gradient is then tiny next to the weights that do not span the gate (the diagonal), so
    any form that sums those and lets them cancel (a reverse cumulative sum of ``dN'.N' - v'.dv'``) returns
    rounding instead."""
    inputs = random_inputs(b=1, t=37, hq=4, h=2, d=d, dtype=torch.float32, state=True, deg=deg)
    shape = inputs["log_G"].shape
    inputs["log_G"] = torch.full(shape, -20.0) if gates == "constant" else -20.0 * torch.rand(shape)
    if deg % 2:  # odd deg: signed weights; q.k > 0 keeps the denominators away from 0
        inputs["Q"], inputs["K"] = inputs["Q"].abs(), inputs["K"].abs()
    return inputs


# (the minimal-layout deg-2 kernels are the deg-1/3 ones plus a deg-2 branch: one gate pattern covers it)
@pytest.mark.parametrize(("case", "gates"), [(case, gates) for case in GATE_CASES for gates in ("constant", "uniform")
                                             if (case, gates) != ("deg2-minimal-layout", "uniform")])
def test_strong_gates_gate_gradient(case, gates, interpreter, monkeypatch):
    """d log_G (and everything else, with a final-state cotangent) of strong gates against the float64 oracle,
    through both kernel families: the deg-2 block-pair kernels and the minimal-layout ones."""
    deg, d, chunk_size, pairs = GATE_CASES[case]
    monkeypatch.setattr(function, "PAIR_LAYOUT", pairs)
    check_against_oracle(strong_gate_inputs(deg, d, gates), deg, chunk_size, interpreter)


@pytest.mark.parametrize("blocks", [(16, 32), (32, 16)], ids=["BQ16-BK32", "BQ32-BK16"])
def test_gate_gradient_with_unequal_blocks(blocks, interpreter, monkeypatch):
    """The key/value-gradient kernel's spanning sums with query tiles smaller and larger than the key block (the
    autotuned GPU configs include BQ = 2 BK), over several tiles of a chunk."""
    if interpreter == "cuda":
        pytest.skip("the block sizes are the interpreter's; on a GPU the autotuned configs run")
    BQ, BK = blocks
    monkeypatch.setitem(function._INTERPRETER_META, "BQ", BQ)
    monkeypatch.setitem(function._INTERPRETER_META, "BK", BK)
    check_against_oracle(strong_gate_inputs(2, 16, "uniform"), 2, 35, interpreter)


@pytest.mark.parametrize(("case", "blocks"), [
    ("deg2-pairs", (16, 16)), ("deg2-pairs", (32, 16)), ("deg2-pairs", (16, 32)),
    ("deg2-minimal-layout", None), ("deg1", None),  # their tiles: 64 wide (function._plan)
], ids=["pairs-BQ16-BK16", "pairs-BQ32-BK16", "pairs-BQ16-BK32", "minimal-layout", "deg1"])
def test_tiles_below_the_diagonal(case, blocks, interpreter, monkeypatch):
    """Chunks of several tiles (C = 72, t = 100: the last chunk partial, the last tiles padded), strong gates: the
    tiles wholly below the diagonal split their decay into a query and a key factor applied to whole sums (output,
    dQ, dK, dV and the gates' column sums); the tiles across it keep the full causal decay."""
    if interpreter == "cuda" and blocks:
        pytest.skip("the block sizes are the interpreter's; on a GPU the autotuned configs run")
    deg, d, _, pairs = GATE_CASES[case]
    monkeypatch.setattr(function, "PAIR_LAYOUT", pairs)
    if blocks:
        monkeypatch.setitem(function._INTERPRETER_META, "BQ", blocks[0])
        monkeypatch.setitem(function._INTERPRETER_META, "BK", blocks[1])
    inputs = random_inputs(b=1, t=100, hq=2, h=1, d=d, dtype=torch.float32, state=True, deg=deg,
                           gate_strength=8.0)
    if deg % 2:
        inputs["Q"], inputs["K"] = inputs["Q"].abs(), inputs["K"].abs()
    check_against_oracle(inputs, deg, 72, interpreter)


@pytest.mark.parametrize("d", [16, 40], ids=["d16", "d40-padded-blocks"])
def test_half_width_pair_tiles(d, interpreter, monkeypatch):
    """Pair tiles of 8 x 16 features (BU = 8, tuned on GPUs) in every deg-2 kernel: the state passes, the state
    queries of the output and dQ, the state's share of dK, dV and their gate terms (two coordinate accumulators)."""
    if interpreter == "cuda":
        pytest.skip("the tile width is the interpreter's; on a GPU the autotuned configs run")
    monkeypatch.setitem(function._INTERPRETER_META, "BU", 8)
    inputs = random_inputs(b=1, t=37, hq=4, h=2, d=d, dtype=torch.float32, state=True, gate_strength=5.0)
    check_against_oracle(inputs, 2, 16, interpreter)


@pytest.mark.parametrize("case", ["deg2-pairs", "deg2-minimal-layout", "deg1"])
@pytest.mark.parametrize("blocks", [(32, 32), (16, 32), (32, 16)], ids=["BQ32-BK32", "BQ16-BK32", "BQ32-BK16"])
@pytest.mark.parametrize("by_scan", [True, False], ids=["scan", "dot"])
def test_spanning_sums_both_ways(case, blocks, by_scan, interpreter, monkeypatch):
    """The diagonal tiles' spanning sums by a row scan (default) and by a product with a ones matrix
    (RETENTION_TRITON_SPAN=dot) give the oracle's gate gradient under strong gates (uniform in [-20, 0]), through
    both kernel families and unequal tiles."""
    if interpreter == "cuda":
        pytest.skip("the switch is read when the kernels are compiled; on a GPU set RETENTION_TRITON_SPAN")
    from retention_kernels.triton import _tiles

    deg, d, chunk_size, pairs = GATE_CASES[case]
    monkeypatch.setattr(_tiles, "SPAN_BY_SCAN", tl.constexpr(by_scan))
    monkeypatch.setattr(function, "PAIR_LAYOUT", pairs)
    BQ, BK = blocks
    monkeypatch.setitem(function._INTERPRETER_META, "BQ", BQ)
    monkeypatch.setitem(function._INTERPRETER_META, "BK", BK)
    check_against_oracle(strong_gate_inputs(deg, d, "uniform"), deg, 35, interpreter)


def test_non_contiguous_inputs(interpreter):
    inputs = random_inputs(b=1, t=21, hq=2, h=1, d=16, dtype=torch.float32, state=True)
    for name in ("Q", "K", "V"):  # [b, h, t, d] storage seen through a transpose
        inputs[name] = inputs[name].transpose(1, 2).contiguous().transpose(1, 2)
    inputs["log_G"] = inputs["log_G"].transpose(1, 2).contiguous().transpose(1, 2)
    assert not inputs["Q"].is_contiguous()
    check_against_oracle(inputs, 2, 8, interpreter)


def test_chunk_sizes_agree(interpreter):
    inputs = random_inputs(b=1, t=19, hq=2, h=1, d=16, dtype=torch.float32, device=interpreter)
    oracle = power_retention_quadratic(**inputs)
    baseline = plain_error(oracle, power_retention_quadratic(**inputs, dtype=torch.float32))
    for chunk_size in (1, 5, 16, 19):
        Y = power_retention(**inputs, chunk_size=chunk_size, backend="triton")
        assert_close_to_oracle(f"Y chunk_size={chunk_size}", Y.cpu(), oracle.cpu(), baseline, floor=1e-5)


def test_states_entering_every_chunk(interpreter):
    """The state scan on its own: slot c of the forward's state buffer is the state after c chunks."""
    inputs = random_inputs(b=1, t=30, hq=1, h=1, d=16, dtype=torch.float32, device=interpreter, state=True)
    C = 8
    out = function._forward(inputs["Q"], inputs["K"], inputs["V"], inputs["log_G"], inputs["initial_state"],
                            inputs["sum_of_keys"], 2, 0.25, C)
    states, key_states = out[4], out[5]
    assert states.shape[2] == 5  # n + 1 slots for n = 4 chunks
    for c in range(5):
        end = min(c * C, 30)
        prefix = {n: (x[:, :end] if n in ("Q", "K", "V", "log_G") else x) for n, x in inputs.items()}
        if end == 0:
            expected_S, expected_z = inputs["initial_state"].double(), inputs["sum_of_keys"].double()
        else:
            _, expected_S, expected_z = power_retention_quadratic(**prefix, return_final_state=True)
        assert_close_to_oracle(f"state slot {c}", states[:, :, c].cpu(), expected_S.cpu(), 1e-6)
        assert_close_to_oracle(f"sum of keys slot {c}", key_states[:, :, c].cpu(), expected_z.cpu(), 1e-6)


def test_supports_names_the_reason(monkeypatch):
    triton_backend = next(b for b in retention_kernels.backends() if b.name == "triton")
    assert triton_backend.name == "triton"
    inputs = random_inputs(b=1, t=4, hq=1, h=1, d=8)
    problem = validate(inputs["Q"], inputs["K"], inputs["V"], inputs["log_G"], None, None, 2, None, None, False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not torch.cuda.is_available():
        assert "CUDA" in triton_backend.supports(problem)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_backend.supports(problem) is None
    wide = validate(inputs["Q"], inputs["K"], inputs["V"], None, None, None, 5, None, None, False)
    assert "deg" in triton_backend.supports(wide)
    double = {n: x.double() for n, x in inputs.items()}
    problem64 = validate(double["Q"], double["K"], double["V"], None, None, None, 2, None, None, False)
    assert "float64" in triton_backend.supports(problem64)


def test_minimal_layout_kernels_for_deg2(interpreter, monkeypatch):
    """RETENTION_TRITON_PAIRS=0: deg 2 through the minimal-layout (one-hot) kernels still matches the oracle."""
    monkeypatch.setattr(function, "PAIR_LAYOUT", False)
    inputs = random_inputs(b=1, t=19, hq=2, h=1, d=16, dtype=torch.float32, state=True)
    check_against_oracle(inputs, 2, 8, interpreter)


# The layout's conversion coefficients are stored in fp32 (as the kernels use them): float64 checks of the
# conversions hold to fp32 rounding, not to float64's.
FP32_COEFFICIENTS = dict(rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("d", [8, 16, 24, 48])
def test_pair_layout_is_an_isometry(d):
    """The block-pair features are ``A phi_min`` with ``A^T A = 1``: inner products are (x.y)^2, and the state
    and key-sum conversions invert each other (minimal -> internal -> minimal)."""
    layout = function._pair_layout(d, "cpu")
    D = function.sympow_dim(d, 2)
    A = torch.zeros(layout.DI, D, dtype=torch.float64)
    A[torch.arange(layout.DI), layout.src] = layout.coef.double()
    torch.testing.assert_close(A.T @ A, torch.eye(D, dtype=torch.float64))
    x, y = torch.randn(2, 3, d, dtype=torch.float64)
    pairs = layout.pairs.long()
    padded = torch.nn.functional.pad(torch.stack([x, y]), (0, layout.DP - d)).reshape(2, 3, -1, 16)
    weight = 1.0 + (2.0**0.5 - 1.0) * (pairs[:, 0] < pairs[:, 1]).double()  # sqrt(2) off the diagonal
    features = (padded[:, :, pairs[:, 0], :, None] * padded[:, :, pairs[:, 1], None, :]) * weight[:, None, None]
    features = features.reshape(2, 3, layout.DI)
    torch.testing.assert_close((features[0] * features[1]).sum(-1), (x * y).sum(-1) ** 2)
    torch.testing.assert_close(features[0], sympow(x, 2) @ A.T)
    S = torch.randn(D, 5, dtype=torch.float64)
    internal = S[layout.src] * layout.coef[:, None].double()
    back = internal[layout.src1] * layout.coef1[:, None].double()
    back = back + internal[layout.src2] * layout.coef2[:, None].double()
    torch.testing.assert_close(back, S, **FP32_COEFFICIENTS)
    z = torch.randn(D, dtype=torch.float64)
    M = z[layout.m_index] * layout.m_coef.double()
    torch.testing.assert_close(M.reshape(layout.DP, -1), M.reshape(layout.DP, -1).T)
    # A sum of D terms that may cancel: fp32 coefficient rounding is relative to the size of the terms.
    terms = sympow(x, 2) * z
    torch.testing.assert_close(terms.sum(-1), torch.einsum("ni,ij,nj->n", torch.nn.functional.pad(
        x, (0, layout.DP - d)), M.reshape(layout.DP, -1), torch.nn.functional.pad(x, (0, layout.DP - d))),
        rtol=0, atol=1e-6 * terms.abs().sum(-1).max().item())
    torch.testing.assert_close((M[layout.z_index1] + M[layout.z_index2]) * layout.z_coef.double(), z,
                               **FP32_COEFFICIENTS)


def test_compiles_without_graph_break(interpreter):
    """``torch.compile(fullgraph=True)`` over the public API (validation, dispatch and the custom ops; deg 2:
    states converted inside the op), fwd + bwd."""
    inputs = random_inputs(b=1, t=20, hq=2, h=1, d=16, dtype=torch.float32, device=interpreter, state=True,
                           requires_grad=True)
    args = [inputs[n] for n in NAMES]

    def loss(Q, K, V, log_G, state, sum_of_keys):
        Y, S, z = power_retention(Q, K, V, log_G, (state, sum_of_keys), return_final_state=True, chunk_size=8,
                                  backend="triton")
        return Y.square().sum() + S.square().sum() + z.sum()

    compiled = torch.autograd.grad(torch.compile(loss, fullgraph=True)(*args), args)
    eager = torch.autograd.grad(loss(*args), args)
    for name, c, e in zip(NAMES, compiled, eager):
        torch.testing.assert_close(c, e, msg=f"d{name}")


def test_dispatch_calls_no_importlib(interpreter, monkeypatch):
    """torch 2.11's Dynamo refuses to trace importlib (``find_spec``, ``_gcd_import``: the API-level fullgraph
    check failed on the H200 for that, while torch 2.13 here traces it): the dispatch of a Triton call must not
    reach them."""
    import importlib
    import importlib.util

    inputs = random_inputs(b=1, t=20, hq=2, h=1, d=16, dtype=torch.float32, device=interpreter, state=True)
    args = [inputs[n] for n in NAMES]
    power_retention(*args[:4], backend="triton", chunk_size=8)  # first call: imports done

    def refuse(*_args, **_kwargs):
        raise AssertionError("importlib called on the dispatch path")

    monkeypatch.setattr(importlib.util, "find_spec", refuse)
    monkeypatch.setattr(importlib, "import_module", refuse)
    Y = power_retention(*args[:4], backend="triton", chunk_size=8)
    assert Y.shape == args[0].shape


def test_every_kernel_compiles_and_fits_hopper(run_compiled):
    """Every deg-2 kernel of one fwd+bwd from an initial state compiles for sm_90 (the interpreter does not
    type-check like the compiler: it let a branch type mismatch and the cotangent's bit arithmetic through), and
    each tuned one has a config that fits an SM's shared memory at d = 128 in bf16/fp16/fp32 (an fp16 d=128 check
    once failed on the H200 with OutOfResources): without a GPU, in a process where the kernels are not
    interpreted (tests/hopper_fit.py)."""
    from pathlib import Path

    result = run_compiled(str(Path(__file__).with_name("hopper_fit.py")), timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    # every tuned launch of one fwd+bwd (the chunk contributions twice) for each dtype
    kernels = ["pair_chunk_contribution_kernel", "pair_output_kernel", "pair_chunk_contribution_kernel backward",
               "pair_query_grad_kernel", "pair_key_state_grad_kernel", "pair_key_value_grad_kernel"]
    # the direct launches, the cotangent in each dtype's rounding (bf16 dn; tf32 for fp16 inputs; none for fp32)
    rounding = {"bfloat16": 1, "float16": 2, "float32": 0}
    for dtype in ("bfloat16", "float16", "float32"):
        fits = [line for line in result.stdout.splitlines() if line.startswith(f"fits sm_90 {dtype} d128 ")]
        assert [line.split(" d128 ")[1].split(":")[0] for line in fits] == kernels, result.stdout
        compiled = [line.split(" d128 ")[1] for line in result.stdout.splitlines()
                    if line.startswith(f"compiled sm_90 {dtype} d128 ")]
        assert compiled == [
            "pair_slot_scan_kernel {'BACKWARD': False, 'HAS_INIT': True}",
            f"output_cotangent_kernel {{'ROUNDING': {rounding[dtype]}}}",
            "pair_slot_scan_kernel {'BACKWARD': True, 'HAS_INIT': True}",
            "chunk_inner_product_kernel {}", "chunk_inner_product_kernel {}", "gate_gradient_kernel {}",
        ], result.stdout


def test_deg3_tiles_that_avoid_the_hopper_miscompile(interpreter, monkeypatch):
    """deg 3-4 at 16 < d <= 32 with bf16 operands run 64-wide feature tiles and 32-wide expansion tiles (the
    shapes that passed on an H200 where Triton 3.6 miscompiled the default ones); the narrower expansion tile,
    narrower than the feature tile, still gives the oracle's outputs and gradients."""
    with monkeypatch.context() as patch:
        patch.setitem(function._OPERAND, torch.bfloat16, tl.bfloat16)  # the GPU's operand choice
        assert function._expansion_tile(52360, 32, 4, torch.bfloat16) == 32
        assert function._expansion_tile(3876, 16, 4, torch.bfloat16) == 64  # d 16 and d 64 passed as they were
        assert function._expansion_tile(45760, 64, 3, torch.bfloat16) == 64
        assert function._expansion_tile(52360, 32, 4, torch.float16) == 64  # fp32 operands passed as they were
    assert function._feature_tile(32, 4) == 64 and function._feature_tile(16, 4) == 16
    monkeypatch.setattr(function, "_expansion_tile", lambda *args: 32)
    inputs = random_inputs(b=1, t=12, hq=2, h=1, d=17, dtype=torch.float32, state=True, deg=3)
    inputs["Q"], inputs["K"] = inputs["Q"].abs(), inputs["K"].abs()
    check_against_oracle(inputs, 3, 8, interpreter)


@pytest.mark.parametrize("pairs", [True, False], ids=["deg2-pairs", "deg2-minimal-layout"])
def test_single_chunk_without_state_skips_the_state_passes(pairs, interpreter, monkeypatch):
    """One chunk (chunk_size = t), no initial state, no final state asked for: Y and every gradient match the
    oracle with the state passes not launched (their outputs start as NaN, so a read of one would show); asking
    for the final state launches them again."""
    monkeypatch.setattr(function, "PAIR_LAYOUT", pairs)
    passes = []
    for name in ("_state_pass", "_pair_state_pass"):
        original = getattr(function, name)
        monkeypatch.setattr(function, name, lambda *a, original=original, **k: passes.append(1) or original(*a, **k))
    inputs = {n: x.to(interpreter).requires_grad_(True)
              for n, x in random_inputs(b=2, t=24, hq=2, h=1, d=16, dtype=torch.float32).items()}
    Y = power_retention(**inputs, deg=2, chunk_size=24, backend="triton")
    dY = torch.randn_like(Y)
    grads = torch.autograd.grad(Y, list(inputs.values()), dY)
    assert passes == []
    upcast = {n: x.detach().double().requires_grad_(True) for n, x in inputs.items()}
    Y_ref = power_retention_quadratic(**upcast, deg=2)
    ref = torch.autograd.grad(Y_ref, list(upcast.values()), dY.double())
    plain_inputs = {n: x.detach().requires_grad_(True) for n, x in inputs.items()}
    Y_plain = power_retention_quadratic(**plain_inputs, deg=2, dtype=torch.float32)
    plain = torch.autograd.grad(Y_plain, list(plain_inputs.values()), dY)
    for label, g, r, p in zip(["Y", *inputs], [Y, *grads], [Y_ref, *ref], [Y_plain, *plain]):
        assert_close_to_oracle(label, g.cpu(), r.cpu(), plain_error(r.cpu(), p.cpu()), factor=3.0, floor=1e-5)
    Y, state, keys = power_retention(**inputs, deg=2, chunk_size=24, return_final_state=True, backend="triton")
    assert passes and torch.isfinite(state).all() and torch.isfinite(keys).all()


def never_fits(name):
    """A stand-in for the kernel ``name`` whose every launch runs out of shared memory."""
    import triton

    class NeverFits:
        __name__ = name

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise triton.runtime.errors.OutOfResources(300000, 232448, "shared memory")
            return launch
    return NeverFits()


def test_no_fitting_config_says_what_to_do(monkeypatch):
    """A GPU whose shared memory fits none of a kernel's configs (fp32 inputs at d = 128 on an A100) gets an
    error that names the kernel and the way out, not Triton's bare OutOfResources."""
    import triton

    configs = [function._config(4, 1, BQ=16, BK=32), function._config(4, 2, BQ=64, BK=32)]
    with pytest.raises(RuntimeError, match=r"pair_key_value_grad_kernel has no config .*\(2 tried.*bf16") as error:
        function._launch_first_fitting(never_fits("pair_key_value_grad_kernel"), lambda meta: (1,), (), {}, configs)
    assert isinstance(error.value.__cause__, triton.runtime.errors.OutOfResources)


@pytest.mark.parametrize("precision, dp, tried", [("ieee", 128, ["small"]), ("ieee", 64, ["big", "small"]),
                                                  ("tf32", 128, ["big", "small"])])
def test_wide_fp32_products_try_only_the_small_configs(monkeypatch, precision, dp, tried):
    """Full-fp32 products at d > 64 skip the pipelined configs (each took minutes to compile on an H200, and most
    did not fit): the tuner's filter and the untuned launch path (``AUTOTUNE = False``) both see only the small
    ones (then the fallbacks)."""
    import triton

    big, small = function._config(4, 3, BQ=64, BK=64), function._config(4, 1, BQ=16, BK=32)
    prune = function._ieee_wide_prune([small])
    tuned = type("Tuned", (), dict(configs=[big], fallbacks=(small,),
                                   early_config_prune=staticmethod(prune)))()
    launched = []

    class Recording:
        def __getitem__(self, grid):
            def launch(*args, BQ, num_stages, **kwargs):
                launched.append("big" if BQ == 64 else "small")
                if BQ == 64:
                    raise triton.runtime.errors.OutOfResources(300000, 232448, "shared memory")
            return launch

    monkeypatch.setattr(function, "AUTOTUNE", False)
    function._launch(tuned, Recording(), lambda meta: (1,), (), dict(PRECISION=precision, DP=dp), ("BQ", "BK"))
    assert launched == tried
    assert prune([big, small], None, PRECISION=precision, DP=dp) == ([small] if tried == ["small"] else [big, small])

    # when nothing fits, each config was tried once (the filter's small configs are the fallbacks themselves)
    with pytest.raises(RuntimeError, match=rf"\({len(tried)} tried"):
        function._launch(tuned, never_fits("pair_output_kernel"), lambda meta: (1,), (),
                         dict(PRECISION=precision, DP=dp), ("BQ", "BK"))
