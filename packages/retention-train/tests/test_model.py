from __future__ import annotations

import math

import pytest
import torch

from retention_train.model import GPT, GPTConfig, apply_rope, rope_tables, rotate


def tiny(**overrides) -> GPTConfig:
    settings = dict(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, chunk_size=4,
                    backend="reference")
    return GPTConfig(**{**settings, **overrides})


def make_model(config: GPTConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(config).double()
    with torch.no_grad():  # gates well below 1, so the gating matters in every check
        for block in model.blocks:
            if block.attn.gate_proj is not None:
                block.attn.gate_proj.bias.uniform_(-1.0, 2.0)
                block.attn.gate_proj.weight.normal_(0.0, 0.5)
    return model


def test_rope_depends_only_on_distance():
    q, k = torch.randn(1, 1, 1, 16, dtype=torch.float64), torch.randn(1, 1, 1, 16, dtype=torch.float64)
    def score(i, j):
        return (apply_rope(q, torch.tensor([i])) * apply_rope(k, torch.tensor([j]))).sum()
    assert torch.allclose(score(3, 1), score(10, 8), rtol=1e-12)
    assert torch.allclose(score(0, 0), (q * k).sum(), rtol=1e-12)  # position 0 is the identity
    assert not torch.allclose(score(3, 1), score(3, 2))


def rope_oracle(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotate-half RoPE written out in float64: pair (x_i, x_{i+hd/2}) turns by position * base^(-2i/hd)."""
    half = x.shape[-1] // 2
    angles = positions.double()[:, None] * base ** (-torch.arange(half, dtype=torch.float64) / half)
    cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
    x1, x2 = x.double()[..., :half], x.double()[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def test_rope_equals_the_rotate_half_formula_on_strided_views():
    """One rotation of the query and key heads of a fused [b, t, heads, hd] projection (a strided view)."""
    positions = torch.arange(5, 5 + 37)
    fused = torch.randn(2, 37, 7, 16, dtype=torch.float64)
    qk = fused[:, :, :5]  # not contiguous
    rotated = rotate(qk, rope_tables(positions, 16, dtype=torch.float64))
    torch.testing.assert_close(rotated, rope_oracle(qk, positions), rtol=1e-13, atol=1e-13)
    # bf16 input, fp32 tables: the rotation in fp32, one rounding to bf16 at the end.
    rotated = rotate(qk.bfloat16(), rope_tables(positions, 16))
    assert rotated.dtype == torch.bfloat16
    expected = rope_oracle(qk.bfloat16(), positions)
    torch.testing.assert_close(rotated.double(), expected, rtol=2**-8, atol=1e-6)


def test_weight_tying_and_config_errors():
    model = GPT(tiny())
    assert model.lm_head.weight is model.wte.weight
    assert GPT(tiny(tie_weights=False)).lm_head.weight is not GPT(tiny(tie_weights=False)).wte.weight
    with pytest.raises(ValueError, match="attention_kernel"):
        GPTConfig(attention_kernel="flash")
    with pytest.raises(ValueError, match="n_kv_head"):
        GPTConfig(n_head=4, n_kv_head=3)
    with pytest.raises(ValueError, match="chunk_size"):
        GPTConfig(chunk_size=0)


@pytest.mark.parametrize("overrides", [{}, {"disable_gating": True, "degree": 1}, {"attention_kernel": "sdpa"}])
def test_forward_shapes_and_initial_loss(overrides):
    model = make_model(tiny(**overrides))
    idx, targets = torch.randint(0, 64, (2, 20)), torch.randint(0, 64, (2, 20))
    logits, loss = model(idx, targets)
    assert logits.shape == (2, 20, 64)
    # At initialisation the prediction is near uniform: loss close to ln(vocab).
    assert abs(loss.item() - math.log(64)) < 0.1
    assert (model.blocks[0].attn.gate_proj is None) == (overrides != {})


def test_chunk_size_does_not_change_the_model():
    idx = torch.randint(0, 64, (2, 23))
    reference = make_model(tiny(chunk_size=None))(idx)[0]
    for chunk_size in (1, 5, 32):
        logits = make_model(tiny(chunk_size=chunk_size))(idx)[0]
        torch.testing.assert_close(logits, reference, rtol=1e-10, atol=1e-10)


def test_activation_checkpointing_gives_the_same_gradients():
    idx = torch.randint(0, 64, (2, 16))
    grads = []
    for checkpointing in (False, True):
        model = make_model(tiny(checkpoint_activations=checkpointing))
        model(idx, idx)[1].backward()
        grads.append([p.grad for p in model.parameters()])
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(recomputed, plain, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("gating", [True, False])
def test_decoding_with_the_cache_equals_the_full_forward(gating):
    """Prefill 7 tokens, then decode one by one through several folds of the window (switch-over 5)."""
    model = make_model(tiny(disable_gating=not gating)).eval()
    idx = torch.randint(0, 64, (2, 26))
    full = model(idx)[0]
    caches = model.new_caches(switch_over_seq_len=5)
    steps = [model(idx[:, :7], caches=caches)[0]]
    for i in range(7, idx.shape[1]):
        steps.append(model(idx[:, i : i + 1], start=i, caches=caches)[0])
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-9, atol=1e-9)
    assert caches[0].state is not None and caches[0].position == 26


def test_generate_with_and_without_cache_agree():
    model = make_model(tiny()).eval()
    prompt = torch.randint(0, 64, (2, 5))
    cached = model.generate(prompt, 20, top_k=1)
    recomputed = model.generate(prompt, 20, top_k=1, use_cache=False)
    assert cached.shape == (2, 25) and (cached[:, :5] == prompt).all()
    assert torch.equal(cached, recomputed)
    sampled = model.generate(prompt, 10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, model.generate(prompt, 10, generator=torch.Generator().manual_seed(0)))
