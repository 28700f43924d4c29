"""Context parallelism on 3 gloo processes equals the single-process forward and gradients.

Three ranks, so the middle one both receives a state and sends one on (and, in the backward, the reverse).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from retention_train.model import GPT, GPTConfig

RANKS = 3


@pytest.mark.parametrize("chunk_size", [5])
def test_context_parallel_equals_one_process(tmp_path, chunk_size):
    settings = dict(vocab_size=48, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, degree=2,
                    chunk_size=chunk_size, backend="reference")
    seq_len, batch = 3 * 13, 2  # 13 tokens per rank, not a multiple of the chunk size
    worker = Path(__file__).with_name("cp_worker.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={RANKS}",
               str(worker), str(tmp_path), json.dumps({**settings, "seq_len": seq_len, "batch": batch})]
    run = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(RANKS)]

    # The same computation in one process, on the whole sequences.
    torch.manual_seed(0)
    model = GPT(GPTConfig(**settings)).double()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.gate_proj.bias.uniform_(-1.0, 2.0)
    idx = torch.randint(0, settings["vocab_size"], (batch, seq_len + 1))
    logits, loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()

    torch.testing.assert_close(torch.cat([r["logits"] for r in ranks], dim=1), logits.detach(), rtol=1e-10,
                               atol=1e-10)
    for r in ranks:
        torch.testing.assert_close(r["loss"], loss.detach(), rtol=1e-10, atol=1e-10)
    for name, p in model.named_parameters():
        for r in ranks:  # every rank holds the same averaged gradient
            torch.testing.assert_close(r["grads"][name], p.grad, rtol=1e-9, atol=1e-12, msg=name)
    # The first layer's keys reach the last rank only through the passed states: their gradient must
    # include the later ranks' losses, which flow back only through the backward state passing.
    assert ranks[0]["grads"]["blocks.0.attn.qkv_proj.weight"].abs().max() > 0
