"""The Triton inference kernels (``attend_window``, ``fold_window``) against the float64 oracle.

On a machine without CUDA they run under ``TRITON_INTERPRET=1`` on CPU tensors (CI); with CUDA, on the GPU.
Shapes stay tiny: the interpreter runs every program in numpy.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import zlib

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def interpreter():
    """``TRITON_INTERPRET=1`` on a machine without CUDA, only for as long as needed (the import of triton and
    these tests): set for the whole run it would make other tests' ``backend="auto"`` pick the (slow)
    interpreted Triton backend on CPU. Triton must not have been imported without it before this module."""
    previous = os.environ.get("TRITON_INTERPRET")
    if DEVICE == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous


with interpreter():  # triton decorates its own library functions at import: interpreted ones on CPU
    pytest.importorskip("triton")
    from retention_kernels.triton import decode

    if DEVICE == "cpu":
        decode = importlib.reload(decode)  # decorated again, as interpreted functions, if imported before

from retention._validate import Problem  # noqa: E402
from retention.reference import power_retention_quadratic, update_state  # noqa: E402
from retention.sympow import sympow_dim  # noqa: E402
from retention.testing import assert_close_to_oracle, plain_error, random_inputs  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _interpreted_kernels():
    with interpreter():
        yield


def window_case(b=2, w=11, tq=1, hq=4, h=2, d=16, e=None, deg=2, dtype=torch.float32, state=True, gating=True,
                gate_strength=1.0, seed=0):
    """A window of ``w`` steps, ``tq`` queries at its end, a state before it; returns the kernel inputs and the
    oracle/plain outputs of those queries (the quadratic formula over the window with the initial state)."""
    generator = torch.Generator().manual_seed(seed)
    inputs = random_inputs(b=b, t=max(w, tq), hq=hq, h=h, d=d, e=e, dtype=dtype, device=DEVICE, gating=gating,
                           gate_strength=gate_strength, state=state, deg=deg, generator=generator)
    inputs["Q"] = inputs["Q"][:, -tq:] if w else inputs["Q"][:, :tq]
    if w == 0:
        inputs["K"], inputs["V"] = inputs["K"][:, :0], inputs["V"][:, :0]
        inputs["log_G"] = None if not gating else inputs["log_G"][:, :0]
    return inputs


def expected_outputs(inputs, deg, dtype):
    """Oracle (float64) and same-precision plain outputs of the window's last ``tq`` queries."""
    Q, K = inputs["Q"], inputs["K"]
    b, tq, hq, d = Q.shape
    w = K.shape[1]
    results = []
    for compute in (torch.float64, dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32):
        if w == 0:  # only the state: the quadratic formula of one step with a zero key
            zeros = {"K": K.new_zeros(b, 1, K.shape[2], d), "V": inputs["V"].new_zeros(b, 1, K.shape[2],
                                                                                  inputs["V"].shape[-1])}
            args = {**inputs, **zeros, "log_G": None}
            outputs = [power_retention_quadratic(**{**args, "Q": Q[:, i:i + 1]}, deg=deg, dtype=compute)
                       for i in range(tq)]
            results.append(torch.cat(outputs, dim=1))
            continue
        # Queries at the window's end: pad Q at the front so the quadratic formula sees aligned positions.
        full_Q = torch.cat([Q.new_zeros(b, w - tq, hq, d), Q], dim=1)
        Y = power_retention_quadratic(**{**inputs, "Q": full_Q}, deg=deg, dtype=compute)
        results.append(Y[:, w - tq:])
    return results


def run_attend(inputs, deg, **options):
    Q, K, V, log_G = inputs["Q"], inputs["K"], inputs["V"], inputs.get("log_G")
    b, w, h = K.shape[:3]
    state, keys = inputs.get("initial_state"), inputs.get("sum_of_keys")
    problem = Problem(Q, K, V, log_G, state, keys, deg, Q.shape[-1] ** -0.5, None, False)
    G = torch.zeros(b, w, h, device=Q.device) if log_G is None else log_G.float().cumsum(1)
    return decode.attend_window(problem, G, **options)


@pytest.mark.parametrize(
    "case",
    [
        dict(),  # GQA, gating, a state, one query
        dict(tq=3, splits=3),  # tq > 1 (each query its own gate discount), partial sums combined
        dict(hq=2, h=2, state=False),  # window only
        dict(w=0, tq=2),  # state only (no window yet)
        dict(d=8, e=24, deg=3, splits=2),  # odd degree, e != d, e not a power of two
        dict(w=40, gate_strength=20.0, tq=2),  # strong gating: e^{G} underflows, no 0/0
        dict(b=1, hq=3, h=1, gating=False, deg=4, d=4, block_d=16),  # deg 4, several D tiles
    ],
    ids=["gqa", "tq3-splits", "no-state", "no-window", "deg3", "strong-gate", "deg4"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_attend_window_matches_oracle(case, dtype):
    case = dict(case)
    options = {name: case.pop(name) for name in ("splits", "block_d") if name in case}
    deg = case.get("deg", 2)
    inputs = window_case(dtype=dtype, seed=zlib.crc32(f"{case}{dtype}".encode()), **case)
    Y = run_attend(inputs, deg, **options)
    oracle, plain = expected_outputs(inputs, deg, dtype)
    assert Y.dtype == dtype
    assert_close_to_oracle("Y", Y, oracle, plain_error(oracle, plain), floor=1e-5 if dtype == torch.float32 else 1e-3)


@pytest.fixture
def poisoned_scratch(monkeypatch):
    """The kernels' partial sums start as NaN (the outputs already do): every entry read must have been written."""
    monkeypatch.setattr(decode, "_scratch", lambda *shape, device: torch.full(shape, float("nan"), device=device))


@pytest.mark.parametrize(
    "w, state",
    [(0, True), (6, True), (6, False), (8, True), (8, False)],  # no window needs a state
    ids=["no-window", "partial-window", "partial-window-no-state", "full-window", "full-window-no-state"],
)
@pytest.mark.parametrize("tq", [1, 3], ids=["tq1", "tq3"])
@pytest.mark.parametrize("ratio", [1, 2, 3, 4], ids=["r1", "r2", "r3", "r4"])
def test_attend_window_gqa(poisoned_scratch, ratio, tq, w, state):
    """GQA: one program serves the r query heads of a key/value head (times the tq queries), so rows of a block
    differ in head and query (each its own causal limit and gate discount); padded rows (r = 3, 3 x 3 rows)
    write nothing. Q non-contiguous; outputs and partial sums NaN-poisoned; a full window is folded too."""
    h = 2
    seed = zlib.crc32(f"gqa{ratio}{tq}{w}{state}".encode())
    inputs = window_case(b=2, w=w, tq=tq, hq=ratio * h, h=h, d=8, e=16, state=state, seed=seed)
    # Q non-contiguous: [b, hq, tq, 2d] in memory, NaN in the second half (a stray read would poison Y).
    Q = inputs["Q"]
    wide = torch.cat([Q, torch.full_like(Q, float("nan"))], dim=-1).transpose(1, 2).contiguous().transpose(1, 2)
    inputs["Q"] = wide[..., :8]
    assert not inputs["Q"].is_contiguous() and torch.equal(inputs["Q"], Q)
    Q, K, V, log_G = inputs["Q"], inputs["K"], inputs["V"], inputs.get("log_G")
    fold = w == 8
    problem = Problem(Q, K, V, log_G, inputs.get("initial_state"), inputs.get("sum_of_keys"), 2, 8**-0.5, None,
                      fold)
    G = log_G.float().cumsum(1) if w else torch.zeros(2, 0, h, device=DEVICE)
    result = decode.attend_window(problem, G, splits=1 + (ratio + tq) % 3)
    Y = result[0] if fold else result
    oracle, plain = expected_outputs(inputs, 2, torch.float32)
    assert_close_to_oracle("Y", Y, oracle, plain_error(oracle, plain))
    if fold:  # the folded state is the window's state after the initial one
        expected = update_state(K.double(), V.double(), log_G.double().cumsum(1), 2,
                                *(None if x is None else x.double() for x in (inputs.get("initial_state"),
                                                                               inputs.get("sum_of_keys"))),
                                torch.float64)
        assert_close_to_oracle("state", result[1], expected[0], 0.0, floor=1e-6)
        assert_close_to_oracle("sum_of_keys", result[2], expected[1], 0.0, floor=1e-6)


def test_attend_window_zero_query_gives_zero():
    """A query orthogonal to everything has denominator 0: the output row is 0, never NaN."""
    inputs = window_case(b=1, w=5, tq=2, hq=2, h=1)
    inputs["Q"] = inputs["Q"].clone()
    inputs["Q"][:, 0] = 0.0
    Y = run_attend(inputs, 2, splits=2)
    assert torch.equal(Y[:, 0], torch.zeros_like(Y[:, 0]))
    oracle, plain = expected_outputs(inputs, 2, torch.float32)
    assert_close_to_oracle("Y", Y, oracle, plain_error(oracle, plain))


def test_attend_window_non_contiguous_inputs():
    inputs = window_case(b=2, w=7, tq=2, hq=2, h=2, d=16)
    for name in ("Q", "K", "V"):  # same values, transposed memory layout
        x = inputs[name]
        inputs[name] = x.transpose(0, 1).contiguous().transpose(0, 1)
        assert not inputs[name].is_contiguous()
    state = inputs["initial_state"]
    inputs["initial_state"] = state.transpose(-1, -2).contiguous().transpose(-1, -2)
    Y = run_attend(inputs, 2)
    oracle, plain = expected_outputs(inputs, 2, torch.float32)
    assert_close_to_oracle("Y", Y, oracle, plain_error(oracle, plain))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_state", [True, False], ids=["state", "fresh"])
def test_fold_window_matches_oracle(dtype, with_state):
    generator = torch.Generator().manual_seed(7 + with_state)
    b, w, h, d, e, deg = 2, 37, 2, 8, 16, 2
    inputs = random_inputs(b=b, t=w, hq=h, h=h, d=d, e=e, dtype=dtype, device=DEVICE, state=with_state, deg=deg,
                           generator=generator)
    G = inputs["log_G"].cumsum(1)
    state, keys = inputs.get("initial_state"), inputs.get("sum_of_keys")
    new_state, new_keys = decode.fold_window(inputs["K"], inputs["V"], G, deg, state, keys)
    assert new_state.shape == (b, h, sympow_dim(d, deg), e) and new_state.dtype == dtype
    assert new_keys.dtype == torch.float32

    def fold(compute):
        return update_state(inputs["K"], inputs["V"], inputs["log_G"].to(compute).cumsum(1), deg, state, keys,
                            compute)

    oracle, plain = fold(torch.float64), fold(dtype if dtype == torch.bfloat16 else torch.float32)
    plain = [x.to(dtype).double() for x in plain]  # the plain path also rounds the state to the model dtype
    floor = 1e-6 if dtype == torch.float32 else 1e-3
    assert_close_to_oracle("state", new_state, oracle[0], plain_error(oracle[0], plain[0]), floor=floor)
    assert_close_to_oracle("sum_of_keys", new_keys, oracle[1], plain_error(oracle[1], plain[1]), floor=floor)


def test_fold_window_in_place():
    """Writing the folded state over the old one (what the static cache does) gives the same result."""
    generator = torch.Generator().manual_seed(3)
    inputs = random_inputs(b=1, t=9, hq=2, h=2, d=8, state=True, generator=generator, device=DEVICE)
    G = inputs["log_G"].cumsum(1)
    state, keys = inputs["initial_state"].clone(), inputs["sum_of_keys"].clone()
    expected = decode.fold_window(inputs["K"], inputs["V"], G, 2, state, keys)
    result = decode.fold_window(inputs["K"], inputs["V"], G, 2, state, keys, out_state=state, out_keys=keys)
    assert result[0].data_ptr() == state.data_ptr()
    torch.testing.assert_close(state, expected[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(keys, expected[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "static, splits, gating, hq, h",
    [(False, None, True, 2, 1), (True, None, True, 2, 1), (True, 3, False, 2, 1), (True, 2, True, 2, 2),
     (True, None, True, 8, 2), (True, 2, True, 6, 2)],
    ids=["dynamic", "static-fused", "static-fused-splits-ungated", "static-fused-r1", "static-fused-r4",
         "static-fused-r3-splits"],
)
def test_cache_decodes_through_the_triton_op(monkeypatch, static, splits, gating, hq, h):
    """The cache with ``attend_window`` (and its fold) as the backend op: prefill, then tokens one by one across
    several folds, equals the float64 oracle on the whole sequence. A static cache takes the fused
    ``decode_step`` (append + attend in one launch, the length bumped on the device); with GQA (r = hq / h of
    1 to 4) one program per key/value head serves its r query heads and only one of them appends the token."""
    monkeypatch.setitem(decode.TUNING, "splits", splits)
    from retention import PowerRetentionCache, inference
    from retention.backends import Backend

    triton_op = Backend("triton", 100, lambda problem: None, forward=None, attend_window=decode.attend_window)
    select = inference.select_backend

    def select_triton_for_inference(problem, name="auto", need="forward"):
        return triton_op if need == "attend_window" else select(problem, "reference", need)

    monkeypatch.setattr(inference, "select_backend", select_triton_for_inference)
    generator = torch.Generator().manual_seed(11 + static + 10 * hq + h)
    inputs = random_inputs(b=1, t=13, hq=hq, h=h, d=8, generator=generator, device=DEVICE, gating=gating)
    cache = PowerRetentionCache(switch_over_seq_len=4, static=static)
    outputs = [cache.step(**{name: x[:, :3] for name, x in inputs.items()})]
    for i in range(3, 13):
        outputs.append(cache.step(**{name: x[:, i:i + 1] for name, x in inputs.items()}))
    oracle = power_retention_quadratic(**inputs)
    assert_close_to_oracle("Y", torch.cat(outputs, dim=1), oracle, 0.0, floor=2e-5)
    assert cache.window_size == 13 % 4
    if static:  # the device-side length and the buffers agree with the host
        assert int(cache.window_length) == 1 and torch.equal(cache.window_K[:, :1], inputs["K"][:, 12:])
        G = inputs["log_G"][:, 12:] if gating else torch.zeros(1, 1, h, device=DEVICE)
        torch.testing.assert_close(cache.window_G[:, :1], G)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.gpu
def test_decode_graph_through_the_triton_op(monkeypatch):
    """The static cache's captured step with the Triton op (and its fold) replays the eager steps exactly and
    matches the oracle (bf16, tolerance rule against plain bf16 PyTorch)."""
    from retention import PowerRetentionCache, inference
    from retention.backends import Backend
    from retention.inference import DecodeGraph

    triton_op = Backend("triton", 100, lambda problem: None, forward=None, attend_window=decode.attend_window)
    select = inference.select_backend
    monkeypatch.setattr(inference, "select_backend", lambda problem, name="auto", need="forward": (
        triton_op if need == "attend_window" else select(problem, "reference", need)))
    generator = torch.Generator().manual_seed(5)
    inputs = random_inputs(b=3, t=41, hq=4, h=2, d=32, dtype=torch.bfloat16, generator=generator, device="cuda")
    eager, graphed = (PowerRetentionCache(switch_over_seq_len=8, static=True) for _ in range(2))
    prefill = {name: x[:, :5] for name, x in inputs.items()}
    outputs = {"eager": [eager.step(**prefill)], "graph": [graphed.step(**prefill)]}
    token = {name: x[:, 5:6] for name, x in inputs.items()}
    graph = DecodeGraph(graphed, **token)
    for i in range(5, 41):
        token = {name: x[:, i:i + 1] for name, x in inputs.items()}
        outputs["eager"].append(eager.step(**token))
        outputs["graph"].append(graph(**token).clone())
    Y_eager, Y_graph = (torch.cat(outputs[key], dim=1) for key in ("eager", "graph"))
    assert torch.equal(Y_graph, Y_eager)
    oracle = power_retention_quadratic(**inputs)
    plain = power_retention_quadratic(**inputs, dtype=torch.bfloat16)
    assert_close_to_oracle("Y", Y_graph, oracle, plain_error(oracle, plain), floor=1e-3)


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_cache_round_trips_between_backends(static):
    """A cache filled on the CPU (reference backend) goes on with the Triton backend (on the GPU, or the
    interpreter) and comes back: every backend reads the same state layout and window buffers."""
    from retention import PowerRetentionCache

    generator = torch.Generator().manual_seed(21 + static)
    inputs = random_inputs(b=2, t=20, hq=2, h=1, d=8, generator=generator)
    cache = PowerRetentionCache(switch_over_seq_len=4, static=static, backend="reference")

    def step(start, stop, device):
        return cache.step(**{name: x[:, start:stop].to(device) for name, x in inputs.items()}).cpu()

    outputs = [step(0, 3, "cpu")] + [step(i, i + 1, "cpu") for i in range(3, 6)]
    cache.to(DEVICE)
    cache.backend = "triton"
    outputs += [step(i, i + 1, DEVICE) for i in range(6, 15)]
    cache.to("cpu")
    cache.backend = "reference"
    outputs += [step(i, i + 1, "cpu") for i in range(15, 20)]
    oracle = power_retention_quadratic(**inputs)
    assert_close_to_oracle("Y", torch.cat(outputs, dim=1), oracle, 0.0, floor=2e-5)
