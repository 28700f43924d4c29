"""A GPT language model whose attention is power retention (or softmax attention, for comparison).

nanoGPT-shaped and small enough to read in one sitting:

    tokens -> embedding -> n_layer x Block -> LayerNorm -> lm_head (tied to the embedding) -> logits
    Block:  x = x + Attention(LayerNorm(x));  x = x + MLP(LayerNorm(x))

``Attention`` projects ``x [b, t, n_embd]`` to queries ``[b, t, n_head, hd]`` and keys/values
``[b, t, n_kv_head, hd]`` (grouped-query attention when ``n_kv_head < n_head``), rotates queries and keys with
RoPE, and mixes time with

- ``attention_kernel="sdpa"``: causal softmax attention (``torch.nn.functional.scaled_dot_product_attention``);
- ``attention_kernel="power"``: power retention ``retention.power_retention(Q, K, V, log_G, deg=degree)``,
  with per-head gates ``log_G = logsigmoid(x W_g + b_g)`` ``[b, t, n_kv_head]`` (``disable_gating`` drops them).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from retention import PowerRetentionCache, power_retention

__all__ = ["GPT", "GPTConfig", "apply_rope", "rope_tables", "rotate"]

ATTENTION_KERNELS = ("sdpa", "power")


@dataclass
class GPTConfig:
    vocab_size: int = 256
    block_size: int = 256  # training context length (RoPE itself has no limit)
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # None: n_head (no grouping)
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False  # biases in Linear and LayerNorm layers
    attention_kernel: str = "power"
    degree: int = 2
    chunk_size: int | None = None  # None: the power-retention backend chooses
    disable_gating: bool = False
    gate_bias_init: float = 4.0  # initial gate sigmoid(4) = 0.98: a slow decay to start from
    rope_base: float = 10000.0
    tie_weights: bool = True
    checkpoint_activations: bool = False
    backend: str = "auto"  # power-retention backend: auto, cuda, triton, cpu, reference

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd", "degree"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.attention_kernel not in ATTENTION_KERNELS:
            raise ValueError(f"attention_kernel must be one of {ATTENTION_KERNELS}, got {self.attention_kernel!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError(f"the head dim n_embd / n_head must be even for RoPE, got {self.n_embd // self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.chunk_size is not None and (not isinstance(self.chunk_size, int) or self.chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {self.chunk_size!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)


def rope_tables(positions: torch.Tensor, head_dim: int, base: float = 10000.0,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin [1, t, 1, head_dim]`` of RoPE at integer ``positions [t]``, computed once per forward and shared
    by every layer. Pair ``(x_i, x_{i + hd/2})`` turns by ``position * base^(-2i / hd)``; ``sin`` carries the sign
    of the rotate-half form, so that ``rotate(x) = x * cos + swap_halves(x) * sin``."""
    half = head_dim // 2
    inv_freq = base ** (-torch.arange(half, device=positions.device, dtype=dtype) / half)
    angles = positions.to(dtype)[:, None] * inv_freq[None, :]  # [t, hd/2]
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([cos, cos], -1)[None, :, None, :], torch.cat([-sin, sin], -1)[None, :, None, :]


def rotate(x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``x [b, t, h, hd]`` rotated by :func:`rope_tables`, in the tables' precision, returned in ``x``'s dtype.

    Four elementwise kernels whatever the dtype (bf16 ``x`` times fp32 tables promotes on the fly, no cast
    kernel); ``x`` may be a strided view (the query and key heads of one fused projection)."""
    cos, sin = tables
    halves = x.unflatten(-1, (2, x.shape[-1] // 2))
    swapped = halves.flip(-2).flatten(-2)  # [x2, x1]
    return torch.addcmul(x * cos, swapped, sin).to(x.dtype)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding of ``x [b, t, h, hd]`` at integer ``positions [t]`` (rotate-half form).

    Pair ``(x_i, x_{i + hd/2})`` is rotated by the angle ``position * base^(-2i / hd)``, so the dot product of a
    rotated query and key depends only on their distance. Computed in fp32 (fp64 for fp64), returned in ``x``'s
    dtype.
    """
    compute = torch.promote_types(x.dtype, torch.float32)
    return rotate(x, rope_tables(positions, x.shape[-1], base, compute))


class Attention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        hd = config.head_dim
        # Queries, keys and values in one matmul: [n_head | n_kv_head | n_kv_head] heads of hd.
        self.qkv_proj = nn.Linear(config.n_embd, (config.n_head + 2 * config.n_kv_head) * hd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_head * hd, config.n_embd, bias=config.bias)
        # Gates: one per key/value head and step, always with a bias (it sets the initial decay rate).
        self.gate_proj = None
        if config.attention_kernel == "power" and not config.disable_gating:
            self.gate_proj = nn.Linear(config.n_embd, config.n_kv_head, bias=True)
        self.resid_dropout = nn.Dropout(config.dropout)

    def project(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        """``x [b, t, n_embd]`` -> ``Q [b, t, n_head, hd]``, ``K, V [b, t, n_kv_head, hd]`` (RoPE applied; strided
        views of one projection, which the kernels read in place) and ``log_G [b, t, n_kv_head]`` fp32 (None
        without gating). ``rope``: :func:`rope_tables` of the positions."""
        c = self.config
        b, t, _ = x.shape
        qk, v = self.qkv_proj(x).view(b, t, c.n_head + 2 * c.n_kv_head, c.head_dim).split(
            [c.n_head + c.n_kv_head, c.n_kv_head], dim=2)
        q, k = rotate(qk, rope).split([c.n_head, c.n_kv_head], dim=2)  # one rotation for queries and keys
        log_G = None
        if self.gate_proj is not None:  # gates in fp32 (fp64 for fp64 models), as power_retention expects
            gate_logits = self.gate_proj(x)
            log_G = F.logsigmoid(gate_logits.to(torch.promote_types(gate_logits.dtype, torch.float32)))
        return q, k, v, log_G

    def forward(self, x: torch.Tensor, rope, context_parallel=None, cache=None) -> torch.Tensor:
        c = self.config
        b, t, _ = x.shape
        q, k, v, log_G = self.project(x, rope)
        if c.attention_kernel == "sdpa":
            if context_parallel is not None or cache is not None:
                raise ValueError("context parallelism and the decoding cache need attention_kernel='power'")
            ratio = c.n_head // c.n_kv_head  # GQA: query head i reads key/value head i // ratio
            if ratio > 1:  # (repeat_interleave copies even for ratio 1)
                k, v = k.repeat_interleave(ratio, dim=2), v.repeat_interleave(ratio, dim=2)
            y = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                dropout_p=c.dropout if self.training else 0.0,
            ).transpose(1, 2)
        elif cache is not None:
            y = cache.step(q, k, v, log_G)
        elif context_parallel is not None:
            y = context_parallel.power_retention(
                q, k, v, log_G, deg=c.degree, chunk_size=c.chunk_size, backend=c.backend
            )
        else:
            y = power_retention(q, k, v, log_G, deg=c.degree, chunk_size=c.chunk_size, backend=c.backend)
        return self.resid_dropout(self.c_proj(y.reshape(b, t, c.n_head * c.head_dim)))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = Attention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, rope, context_parallel=None, cache=None):
        x = x + self.attn(self.ln_1(x), rope, context_parallel, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight  # one matrix reads and writes tokens
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2: residual projections scaled by depth
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, Attention) and module.gate_proj is not None:
            nn.init.constant_(module.gate_proj.bias, self.config.gate_bias_init)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, start: int = 0,
                context_parallel=None, caches=None):
        """Logits ``[b, t, vocab]`` of tokens ``idx [b, t]`` at positions ``start .. start + t - 1``, and the
        mean cross entropy against ``targets [b, t]`` (None without targets; -1 targets are ignored).

        ``context_parallel``: a :class:`retention_train.context_parallel.ContextParallel` when ``idx`` is this
        rank's slice of longer sequences. ``caches``: one :class:`retention.PowerRetentionCache` per layer for
        decoding (``idx`` holds only the new tokens).
        """
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"idx must be an integer tensor [b, t], got {getattr(idx, 'shape', type(idx))}")
        b, t = idx.shape
        if context_parallel is not None:
            start = context_parallel.rank * t
            context_parallel.begin()
        positions = torch.arange(start, start + t, device=idx.device)
        compute = torch.promote_types(self.wte.weight.dtype, torch.float32)  # fp64 for fp64 models
        rope = rope_tables(positions, self.config.head_dim, self.config.rope_base, compute)
        x = self.drop(self.wte(idx))
        for i, block in enumerate(self.blocks):
            cache = None if caches is None else caches[i]
            if self.config.checkpoint_activations and self.training and torch.is_grad_enabled():
                if context_parallel is not None:
                    # Recomputing a block would repeat its sends and receives.
                    raise ValueError("checkpoint_activations cannot be combined with context parallelism")
                x = checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope, context_parallel, cache)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits, None
        logits_fp32 = logits.to(torch.promote_types(logits.dtype, torch.float32))  # the loss in fp32 at least
        loss = F.cross_entropy(logits_fp32.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        if context_parallel is not None:
            loss = context_parallel.finish(loss)
        return logits, loss

    def new_caches(self, switch_over_seq_len: int = 256) -> list[PowerRetentionCache]:
        """One decoding cache per layer (power attention only): constant memory and time per new token."""
        if self.config.attention_kernel != "power":
            raise ValueError(f"decoding caches need attention_kernel='power', got {self.config.attention_kernel!r}")
        return [
            PowerRetentionCache(deg=self.config.degree, switch_over_seq_len=switch_over_seq_len,
                                backend=self.config.backend)
            for _ in self.blocks
        ]

    def configure_optimizer(self, weight_decay: float, learning_rate: float, betas: tuple[float, float]):
        """AdamW; matrices (and the embedding) decay, vectors (biases, norms) do not."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None, use_cache: bool = True,
                 switch_over_seq_len: int = 256) -> torch.Tensor:
        """Continue ``idx [b, t]`` by ``max_new_tokens`` sampled tokens; returns ``[b, t + max_new_tokens]``.

        With power attention and ``use_cache``, the prompt is prefilled once and each new token costs the same
        whatever the context (a state of fixed size per layer). Otherwise the last ``block_size`` tokens are
        re-read for every new token (softmax attention, nanoGPT style).
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        cached = use_cache and self.config.attention_kernel == "power"
        caches = self.new_caches(switch_over_seq_len) if cached else None
        logits, _ = self(idx, caches=caches) if cached else self(idx[:, -self.config.block_size:])
        for _ in range(max_new_tokens):
            scores = logits[:, -1, :].float() / temperature
            if top_k is not None:
                kth = torch.topk(scores, min(top_k, scores.size(-1))).values[:, -1:]
                scores = scores.masked_fill(scores < kth, float("-inf"))
            next_token = torch.multinomial(F.softmax(scores, dim=-1), 1, generator=generator)
            if cached:
                logits, _ = self(next_token, start=idx.shape[1], caches=caches)
            idx = torch.cat([idx, next_token], dim=1)
            if not cached:
                logits, _ = self(idx[:, -self.config.block_size:])
        return idx
