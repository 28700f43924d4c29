"""The generation cache: dynamic and static (CUDA-graph) modes against the float64 oracle, beams, devices,
persistence, memory and bad inputs. Small shapes: a window of 8 steps folds every 8 tokens."""

from __future__ import annotations

import pytest
import torch

from retention import PowerRetentionCache, power_retention, power_retention_inference
from retention.backends import available_backends
from retention.inference import DecodeGraph
from retention.reference import power_retention_quadratic
from retention.sympow import sympow_dim
from retention.testing import assert_close_to_oracle, low_precision_baseline, plain_error, random_inputs

WINDOW = 8
TIGHT = 2e-5  # fp32 against float64 over ~40 tokens and several folds
CUDA = torch.cuda.is_available()
GPU = "cuda"  # the device of the GPU-backend tests


def gpu_backends() -> list:
    """The GPU backends as test parameters: ``"triton"`` and ``"cuda"``, each skipped with the reason when it
    cannot run here (no CUDA device, or the backend is not installed / not built)."""
    params = []
    for name in ("triton", "cuda"):
        marks = [pytest.mark.gpu]
        if not CUDA:
            marks.append(pytest.mark.skip(reason="needs a CUDA device (the CPU variant runs everywhere)"))
        elif name not in available_backends():
            marks.append(pytest.mark.skip(reason=f"backend {name!r} is not available here"))
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@pytest.fixture
def first_config_only(monkeypatch):
    """The Triton training kernels (prefill, training forward) take their first config instead of autotuning:
    the same results, a fraction of the compiles (these tests check values, not speed)."""
    from retention_kernels.triton import function

    monkeypatch.setattr(function, "AUTOTUNE", False, raising=False)


def sequence(generator, b=2, t=40, hq=4, h=2, d=8, e=None, gating=True, dtype=torch.float32, device="cpu"):
    return random_inputs(b=b, t=t, hq=hq, h=h, d=d, e=e, dtype=dtype, gating=gating, generator=generator,
                         device=device)


def oracle(inputs):
    return power_retention_quadratic(inputs["Q"], inputs["K"], inputs["V"], inputs.get("log_G"))


def run_cache(cache, inputs, steps):
    """Feed the sequence in chunks of ``steps`` (e.g. ``[5, 1, 1, 3, ...]``); return every output, in order."""
    outputs, start = [], 0
    log_G = inputs.get("log_G")
    for n in steps:
        part = slice(start, start + n)
        outputs.append(cache.step(inputs["Q"][:, part], inputs["K"][:, part], inputs["V"][:, part],
                                  None if log_G is None else log_G[:, part]).clone())
        start += n
    assert start == inputs["Q"].shape[1]
    return torch.cat(outputs, dim=1)


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("prefill", [5, 13], ids=["short-prefill", "prefill-folds"])
def test_prefill_then_decode_equals_training_forward(backend, generator, static, prefill):
    """SPEC 5.6: prefill, then one token at a time across several folds, equals the forward on the whole
    sequence (GQA, gating)."""
    inputs = sequence(generator)
    t = inputs["Q"].shape[1]
    cache = PowerRetentionCache(switch_over_seq_len=WINDOW, backend=backend, static=static)
    Y = run_cache(cache, inputs, [prefill] + [1] * (t - prefill))
    expected = oracle(inputs)
    assert_close_to_oracle("Y", Y, expected, 0.0, floor=TIGHT)
    training = power_retention(inputs["Q"], inputs["K"], inputs["V"], inputs["log_G"], backend=backend)
    assert_close_to_oracle("Y vs training", Y, training.double(), 0.0, floor=TIGHT)
    assert cache.position == t
    # A prefill of at least WINDOW tokens folds at once; then every WINDOW tokens fold.
    assert cache.window_size == ((t - prefill) % WINDOW if prefill >= WINDOW else t % WINDOW)


def check_thousand_tokens(inputs, Y, backend: str) -> None:
    """Issue 4's acceptance checks of 1,100 outputs: the float64 oracle and the training forward (fp32 tightly,
    bf16 by the tolerance rule against the plain bf16 quadratic formula)."""
    dtype = inputs["Q"].dtype
    expected = oracle(inputs)
    training = power_retention(inputs["Q"], inputs["K"], inputs["V"], inputs["log_G"], backend=backend)
    if dtype == torch.float32:
        baseline = 0.0
    else:
        baseline = plain_error(expected, low_precision_baseline(
            {n: inputs[n] for n in ("Q", "K", "V", "log_G")}, dtype), output_dtype=dtype)
    assert_close_to_oracle("Y", Y, expected, baseline, floor=TIGHT)
    assert_close_to_oracle("Y vs training", Y, training.double(), baseline, floor=TIGHT)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_then_decode_a_thousand_tokens(generator, dtype):
    """Issue 4's acceptance test: prefill 100 tokens, then decode 1,000 one by one across 8 folds (window 128):
    equal to the float64 oracle (fp32 tightly, bf16 by the tolerance rule) and to the training forward."""
    inputs = sequence(generator, b=1, t=1100, hq=4, h=2, d=16, dtype=dtype)
    cache = PowerRetentionCache(switch_over_seq_len=128)
    Y = run_cache(cache, inputs, [100] + [1] * 1000)
    check_thousand_tokens(inputs, Y, "auto")
    assert cache.position == 1100 and cache.window_size == 1100 % 128


@pytest.mark.parametrize("mode", ["dynamic", "static", "graph"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", gpu_backends())
def test_prefill_then_decode_a_thousand_tokens_on_gpu(generator, first_config_only, backend, dtype, mode):
    """The acceptance test on the GPU with a GPU backend: prefill 100 tokens (training kernels), decode 1,000
    one by one across 8 folds with its decode op: the dynamic cache, the static cache's fused step (eager), and
    the same step replayed from CUDA graphs (:class:`DecodeGraph`, the fold graph every 128 tokens)."""
    inputs = sequence(generator, b=2, t=1100, hq=4, h=2, d=16, dtype=dtype, device=GPU)
    cache = PowerRetentionCache(switch_over_seq_len=128, backend=backend, static=mode != "dynamic")
    if mode == "graph":
        prefill = {name: x[:, :100] for name, x in inputs.items()}
        outputs = [run_cache(cache, prefill, [100])]
        graph = DecodeGraph(cache, *(inputs[name][:, 100:101] for name in ("Q", "K", "V", "log_G")))
        for i in range(100, 1100):
            outputs.append(graph(*(inputs[name][:, i:i + 1] for name in ("Q", "K", "V", "log_G"))).clone())
        Y = torch.cat(outputs, dim=1)
    else:
        Y = run_cache(cache, inputs, [100] + [1] * 1000)
    assert Y.device == inputs["Q"].device and Y.dtype == dtype
    check_thousand_tokens(inputs, Y, backend)
    assert cache.position == 1100 and cache.window_size == 1100 % 128
    if mode != "dynamic":  # the device-side window length agrees with the host's (read back once, here)
        assert int(cache.window_length) == 1100 % 128


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("backend", gpu_backends())
def test_state_round_trips_between_cpu_and_gpu(generator, first_config_only, backend, static):
    """A cache filled on the CPU (the CPU backend, with a fold) decodes on the GPU with a GPU backend (more
    folds), then comes back to the CPU: the outputs equal an all-CPU run and the oracle, and the state the GPU
    folded equals the CPU's at the same point (every backend reads and writes the same state layout)."""
    cpu = "cpu" if "cpu" in available_backends() else "reference"
    inputs = sequence(generator, b=2, t=60, hq=4, h=2, d=16)
    steps = {"cpu": [13] + [1] * 7, "gpu": [1] * 25, "back": [1] * 15}  # folds at 13 (prefill), 21, 29, 37, 45
    pieces, start = {}, 0
    for name, part in steps.items():
        pieces[name] = {key: x[:, start:start + sum(part)] for key, x in inputs.items()}
        start += sum(part)

    everywhere_cpu = PowerRetentionCache(switch_over_seq_len=WINDOW, backend=cpu, static=static)
    Y_cpu = [run_cache(everywhere_cpu, pieces[name], steps[name]) for name in ("cpu", "gpu")]
    cache = PowerRetentionCache(switch_over_seq_len=WINDOW, backend=cpu, static=static)
    Y = [run_cache(cache, pieces["cpu"], steps["cpu"])]
    cache.to(GPU)
    cache.backend = backend
    Y.append(run_cache(cache, {key: x.to(GPU) for key, x in pieces["gpu"].items()}, steps["gpu"]).cpu())
    cache.to("cpu")
    cache.backend = cpu
    assert cache.state.device.type == "cpu" and cache.position == 45
    for name in ("state", "sum_of_keys"):  # folded on the GPU at token 45, the same as on the CPU
        assert_close_to_oracle(name, getattr(cache, name), getattr(everywhere_cpu, name).double(), 0.0, floor=TIGHT)
    Y.append(run_cache(cache, pieces["back"], steps["back"]))
    Y_cpu.append(run_cache(everywhere_cpu, pieces["back"], steps["back"]))
    Y, Y_cpu = torch.cat(Y, dim=1), torch.cat(Y_cpu, dim=1)
    assert_close_to_oracle("Y vs all-CPU", Y, Y_cpu.double(), 0.0, floor=TIGHT)
    assert_close_to_oracle("Y", Y, oracle(inputs), 0.0, floor=TIGHT)


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_multi_token_steps_with_gating(generator, static):
    """Steps of several tokens (tq > 1, each query its own gate discount) mixed with single tokens."""
    inputs = sequence(generator, t=37, gating=True)
    cache = PowerRetentionCache(switch_over_seq_len=WINDOW, backend="reference", static=static)
    Y = run_cache(cache, inputs, [3, 1, 2, 1, 4, 1, 1, 6, 2, 1, 1, 3, 7, 1, 3])
    assert_close_to_oracle("Y", Y, oracle(inputs), 0.0, floor=TIGHT)


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", gpu_backends())
def test_multi_token_steps_on_gpu(generator, first_config_only, backend, dtype, static):
    """Steps of several tokens on a window (tq > 1, each query its own gate discount and causal limit) mixed
    with single tokens, GQA r = 4, on the GPU: the backend's attend op serves the query rows of a key/value head
    (heads x queries) together."""
    inputs = sequence(generator, t=37, hq=8, h=2, d=16, dtype=dtype, device=GPU)
    cache = PowerRetentionCache(switch_over_seq_len=WINDOW, backend=backend, static=static)
    Y = run_cache(cache, inputs, [3, 1, 2, 1, 4, 1, 1, 6, 2, 1, 1, 3, 7, 1, 3])
    expected = oracle(inputs)
    baseline = 0.0 if dtype == torch.float32 else plain_error(expected, low_precision_baseline(
        {n: inputs[n] for n in ("Q", "K", "V", "log_G")}, dtype), output_dtype=dtype)
    assert_close_to_oracle("Y", Y, expected, baseline, floor=TIGHT)


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_fp64_decode_keeps_fp64_gates(generator, static):
    """fp64 inputs decode to fp64 precision: the window's gates are not rounded to fp32 on the way."""
    inputs = sequence(generator, t=21, dtype=torch.float64)
    cache = PowerRetentionCache(switch_over_seq_len=WINDOW, backend="reference", static=static)
    Y = run_cache(cache, inputs, [10] + [1] * 11)
    assert cache.window_log_G.dtype == torch.float64
    assert_close_to_oracle("Y", Y, oracle(inputs), 0.0, floor=1e-12)


def test_static_equals_dynamic_without_gating(generator):
    inputs = sequence(generator, t=30, gating=False, hq=2, h=2, e=12)
    steps = [4] + [1] * 26
    dynamic = run_cache(PowerRetentionCache(switch_over_seq_len=WINDOW, backend="reference"), inputs, steps)
    static_cache = PowerRetentionCache(switch_over_seq_len=WINDOW, backend="reference", static=True)
    static = run_cache(static_cache, inputs, steps)
    torch.testing.assert_close(static, dynamic, rtol=1e-5, atol=1e-6)
    assert static_cache.window_log_G is None
    assert_close_to_oracle("Y", static, oracle(inputs), 0.0, floor=TIGHT)


def test_static_buffers_never_move(generator):
    inputs = sequence(generator, t=20)
    cache = PowerRetentionCache(switch_over_seq_len=WINDOW, backend="reference", static=True)
    run_cache(cache, {name: x[:, :3] for name, x in inputs.items()}, [3])
    addresses = {name: x.data_ptr() for name, x in cache._tensors().items()}
    sub = {name: x[:, 3:] for name, x in inputs.items()}
    run_cache(cache, sub, [1] * 15 + [2])
    cache.select(torch.tensor([1, 0]))
    assert {name: x.data_ptr() for name, x in cache._tensors().items()} == addresses
    assert cache.window_K.shape[1] == WINDOW
    assert int(cache.window_length) == cache.window_size == 20 % WINDOW
    # Past the length the window buffers stay zero (the query at the buffer's end relies on it).
    assert not cache.window_K[:, cache.window_size:].any() and not cache.window_log_G[:, cache.window_size:].any()


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_select_reorders_beams(generator, static):
    """After ``select``, row i continues the history of row ``indices[i]``."""
    inputs = sequence(generator, b=3, t=23)
    history, future = 11, 12
    first = {name: x[:, :history] for name, x in inputs.items()}
    cache = PowerRetentionCache(switch_over_seq_len=WINDOW, backend="reference", static=static)
    run_cache(cache, first, [4] + [1] * (history - 4))
    indices = torch.tensor([2, 0, 2])
    cache.reorder(indices)
    # The same future tokens for every beam; expected: the selected histories followed by them.
    rest = {name: x[:1, history:].expand(3, *x[:, history:].shape[1:]).contiguous() for name, x in inputs.items()}
    Y = run_cache(cache, rest, [1] * future)
    whole = {name: torch.cat([x[indices, :history], rest[name]], dim=1) for name, x in inputs.items()}
    assert_close_to_oracle("Y", Y, oracle(whole)[:, history:], 0.0, floor=TIGHT)


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_save_load_round_trip(generator, tmp_path, static):
    inputs = sequence(generator, t=26)
    first = {name: x[:, :13] for name, x in inputs.items()}
    rest = {name: x[:, 13:] for name, x in inputs.items()}
    cache = PowerRetentionCache(switch_over_seq_len=WINDOW, backend="reference", static=static)
    run_cache(cache, first, [2] + [1] * 11)
    cache.save(tmp_path / "cache.pt")
    loaded = PowerRetentionCache.load(tmp_path / "cache.pt", backend="reference")
    assert (loaded.static, loaded.position, loaded.window_size) == (static, 13, cache.window_size)
    for name, x in cache._tensors().items():
        assert torch.equal(getattr(loaded, name), x), name
    continued = run_cache(cache, rest, [1] * 13)
    resumed = run_cache(loaded, rest, [1] * 13)
    assert torch.equal(resumed, continued)
    assert_close_to_oracle("Y", resumed, oracle(inputs)[:, 13:], 0.0, floor=TIGHT)


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_to_converts_window_and_state(generator, static):
    inputs = sequence(generator, t=20)
    cache = PowerRetentionCache(switch_over_seq_len=WINDOW, backend="reference", static=static)
    run_cache(cache, {name: x[:, :11] for name, x in inputs.items()}, [11])
    assert cache.to("cpu") is cache
    cache.to(dtype=torch.float64)
    assert cache.window_K.dtype == cache.state.dtype == torch.float64
    assert cache.window_log_G.dtype == cache.sum_of_keys.dtype == torch.float32
    rest = {name: x[:, 11:].double() if name != "log_G" else x[:, 11:] for name, x in inputs.items()}
    Y = run_cache(cache, rest, [1] * 9)
    assert Y.dtype == torch.float64
    assert_close_to_oracle("Y", Y, oracle(inputs)[:, 11:], 0.0, floor=TIGHT)


def test_memory_bytes_documented():
    b, h, d, e, W = 2, 3, 8, 8, WINDOW
    D = sympow_dim(d, 2)
    generator = torch.Generator().manual_seed(0)
    inputs = random_inputs(b=b, t=11, hq=h, h=h, d=d, generator=generator)
    static = PowerRetentionCache(switch_over_seq_len=W, backend="reference", static=True)
    run_cache(static, inputs, [11])
    assert static.memory_bytes() == PowerRetentionCache.static_bytes(b, h, d, e, 2, W, dtype=torch.float32)
    dynamic = PowerRetentionCache(switch_over_seq_len=W, backend="reference")
    run_cache(dynamic, inputs, [9, 1, 1])  # folds 9, keeps 2
    window = b * 2 * h * ((d + e) * 4 + 4)
    assert dynamic.memory_bytes() == PowerRetentionCache.state_bytes(b, h, d, e, 2, torch.float32) + window
    assert D * e * 2 + D * 4 + W * ((d + e) * 2 + 8) == PowerRetentionCache.static_bytes(1, 1, d, e, 2, W) - 8


def test_bad_inputs_raise_clear_errors(generator):
    inputs = sequence(generator, b=2, t=6, hq=2, h=2, d=8)
    Q, K, V, log_G = inputs["Q"], inputs["K"], inputs["V"], inputs["log_G"]
    D = sympow_dim(8, 2)
    wrong_state = torch.zeros(2, 2, D + 1, 8)
    with pytest.raises(ValueError, match=r"initial_state must have shape \[b=2, h=2, D=36"):
        power_retention_inference(Q[:, -1:], K, V, log_G, (wrong_state, torch.zeros(2, 2, D + 1)))
    with pytest.raises(ValueError, match="window longer than allowed"):
        power_retention_inference(Q[:, -1:], K, V, log_G, switch_over_seq_len=4)
    cache = PowerRetentionCache(switch_over_seq_len=WINDOW, backend="reference", static=True)
    cache.step(Q[:, :3], K[:, :3], V[:, :3], log_G[:, :3])
    with pytest.raises(ValueError, match=r"K must match the cached window's \[b, ·, h, d\]"):
        cache.step(Q[:1, 3:4], K[:1, 3:4], V[:1, 3:4], log_G[:1, 3:4])
    with pytest.raises(ValueError, match="log_G must be given at every step"):
        cache.step(Q[:, 3:4], K[:, 3:4], V[:, 3:4])
    with pytest.raises(TypeError, match="V must have the same dtype"):
        cache.step(Q[:, 3:4], K[:, 3:4], V[:, 3:4].double(), log_G[:, 3:4])
    with pytest.raises(ValueError, match="CUDA tensor"):
        DecodeGraph(cache, Q[:, 3:4], K[:, 3:4], V[:, 3:4], log_G[:, 3:4])
    with pytest.raises(TypeError, match="static must be a bool"):
        PowerRetentionCache(static="yes")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_graph_replays_static_steps(generator, first_config_only, dtype):
    inputs = sequence(generator, b=2, t=40, dtype=dtype, device="cuda", d=16)
    eager = PowerRetentionCache(switch_over_seq_len=WINDOW, static=True)
    graphed = PowerRetentionCache(switch_over_seq_len=WINDOW, static=True)
    prefill = {name: x[:, :5] for name, x in inputs.items()}
    Y_eager = [run_cache(eager, prefill, [5])]
    Y_graph = [run_cache(graphed, prefill, [5])]
    token = {name: x[:, 5:6] for name, x in inputs.items()}
    graph = DecodeGraph(graphed, token["Q"], token["K"], token["V"], token["log_G"])
    for i in range(5, 40):
        token = {name: x[:, i:i + 1] for name, x in inputs.items()}
        Y_eager.append(eager.step(token["Q"], token["K"], token["V"], token["log_G"]))
        Y_graph.append(graph(token["Q"], token["K"], token["V"], token["log_G"]).clone())
    torch.testing.assert_close(torch.cat(Y_graph, 1), torch.cat(Y_eager, 1), rtol=0, atol=0)
    assert graphed.position == 40 and graphed.window_size == 40 % WINDOW
    oracle_Y = oracle({name: x.cpu() for name, x in inputs.items()})
    floor = TIGHT if dtype == torch.float32 else 2e-2
    assert_close_to_oracle("Y", torch.cat(Y_graph, 1).cpu(), oracle_Y, 0.0, floor=floor)


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_transformers_cache_adapter(generator, static):
    transformers = pytest.importorskip("transformers")
    from retention.hf import PowerRetentionHFCache

    layers = [sequence(generator, b=2, t=14) for _ in range(2)]
    hf_cache = PowerRetentionHFCache(switch_over_seq_len=WINDOW, backend="reference", static=static)
    assert isinstance(hf_cache, transformers.Cache) and hf_cache.get_seq_length() == 0
    direct = [PowerRetentionCache(switch_over_seq_len=WINDOW, backend="reference", static=static) for _ in layers]
    for start, n in ((0, 5), (5, 1), (6, 1), (7, 3)):
        for i, inputs in enumerate(layers):
            part = {name: x[:, start:start + n] for name, x in inputs.items()}
            Y = hf_cache.retention_step(part["Q"], part["K"], part["V"], part["log_G"], layer_idx=i)
            assert torch.equal(Y, direct[i].step(part["Q"], part["K"], part["V"], part["log_G"]))
    assert len(hf_cache) == 2 and hf_cache.get_seq_length() == 10
    assert hf_cache.get_mask_sizes(1, 0) == (11, 0)
    assert hf_cache.memory_bytes() == sum(cache.memory_bytes() for cache in direct)

    # Beam search reorders every layer's batch; generate() may also repeat it.
    hf_cache.reorder_cache(torch.tensor([1, 1]))
    hf_cache.batch_repeat_interleave(2)
    for cache in direct:
        cache.select(torch.tensor([1, 1, 1, 1]))
    for i, inputs in enumerate(layers):
        part = {name: x[1:2, 10:11].repeat(4, *([1] * (x.dim() - 1))) for name, x in inputs.items()}
        Y = hf_cache.retention_step(part["Q"], part["K"], part["V"], part["log_G"], layer_idx=i)
        torch.testing.assert_close(Y, direct[i].step(part["Q"], part["K"], part["V"], part["log_G"]),
                                   rtol=0, atol=0)

    with pytest.raises(NotImplementedError, match="retention_step"):
        hf_cache.update(torch.zeros(1), torch.zeros(1), 0)
    with pytest.raises(ValueError, match="cannot crop"):
        hf_cache.crop(-1)
    with pytest.raises(ValueError, match="layer_idx must be a non-negative int"):
        hf_cache.retention_step(part["Q"], part["K"], part["V"], part["log_G"], layer_idx=-1)
    hf_cache.reset()
    assert hf_cache.get_seq_length() == 0 and hf_cache.layers[0].cache.state is None
