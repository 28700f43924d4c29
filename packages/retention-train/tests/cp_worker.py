"""Run by test_context_parallel.py under torchrun: one rank's share of a context-parallel forward/backward.

Every rank builds the same fp64 model and the same full sequences, keeps its slice of the time axis, and
saves its logits, its loss and the rank-averaged parameter gradients to ``<out>/rank<r>.pt``.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from retention_train.context_parallel import ContextParallel
from retention_train.model import GPT, GPTConfig


def main(out: str, config_json: str) -> None:
    import json

    dist.init_process_group("gloo")
    settings = json.loads(config_json)
    seq_len, batch = settings.pop("seq_len"), settings.pop("batch")
    torch.manual_seed(0)
    model = GPT(GPTConfig(**settings)).double()
    with torch.no_grad():  # gates well below 1, as in test_model
        for block in model.blocks:
            block.attn.gate_proj.bias.uniform_(-1.0, 2.0)
    idx = torch.randint(0, settings["vocab_size"], (batch, seq_len + 1))
    cp = ContextParallel()
    local = seq_len // cp.world_size
    part = slice(cp.rank * local, (cp.rank + 1) * local)
    logits, loss = model(idx[:, :-1][:, part], idx[:, 1:][:, part], context_parallel=cp)
    loss.backward()
    cp.average_gradients(model.parameters())
    grads = {name: p.grad for name, p in model.named_parameters()}
    torch.save({"logits": logits.detach(), "loss": cp.average(loss), "grads": grads}, f"{out}/rank{cp.rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
