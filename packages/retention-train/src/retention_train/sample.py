"""Generate text from a checkpoint written by ``retention_train.train``.

    python -m retention_train.sample --out_dir=out --prompt="def " --max_new_tokens=500

With power attention every layer keeps a :class:`retention.PowerRetentionCache` (a state of fixed size plus a
window shorter than ``switch_over_seq_len``), so each new token costs the same whatever the length of the text
so far; ``--report_timing`` prints the per-token decode times at the start and the end to show it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from .data import get_tokenizer
from .model import GPT, GPTConfig

__all__ = ["generate_text", "load_model", "main"]


def load_model(out_dir: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, object]:
    """The model of ``out_dir/ckpt.pt`` (in eval mode) and its tokenizer."""
    path = Path(out_dir) / "ckpt.pt"
    if not path.is_file():
        raise ValueError(f"out_dir must hold a checkpoint ckpt.pt, found none at {path}")
    checkpoint = torch.load(path, map_location=device, weights_only=False)
    model = GPT(GPTConfig(**checkpoint["model_config"]))
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval(), get_tokenizer(checkpoint.get("tokenizer", "bytes"))


@torch.no_grad()
def generate_text(model: GPT, tokenizer, prompt: str, max_new_tokens: int, temperature: float = 0.8,
                  top_k: int | None = None, seed: int = 0, num_samples: int = 1,
                  switch_over_seq_len: int = 256) -> list[str]:
    """``num_samples`` continuations of ``prompt`` (decoded, prompt included)."""
    device = next(model.parameters()).device
    tokens = tokenizer.encode(prompt)
    if not tokens:
        raise ValueError("prompt must encode to at least one token, got an empty prompt")
    idx = torch.tensor([tokens] * num_samples, device=device)
    generator = torch.Generator(device).manual_seed(seed)
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator,
                         switch_over_seq_len=switch_over_seq_len)
    return [tokenizer.decode(row.tolist()) for row in out]


def decode_timing(model: GPT, length: int, switch_over_seq_len: int = 256) -> list[float]:
    """Seconds per decoded token for ``length`` tokens after a 1-token prompt (greedy, batch 1)."""
    device = next(model.parameters()).device
    caches = model.new_caches(switch_over_seq_len)
    logits, _ = model(torch.zeros(1, 1, dtype=torch.long, device=device), caches=caches)
    times = []
    for position in range(1, length + 1):
        start = time.perf_counter()
        next_token = logits[:, -1].argmax(-1, keepdim=True)
        logits, _ = model(next_token, start=position, caches=caches)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Sample from a retention_train checkpoint")
    parser.add_argument("--out_dir", default="out")
    parser.add_argument("--prompt", default="def ")
    parser.add_argument("--max_new_tokens", type=int, default=500)
    parser.add_argument("--num_samples", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--switch_over_seq_len", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--report_timing", action="store_true")
    args = parser.parse_args(argv)
    model, tokenizer = load_model(args.out_dir, args.device)
    with torch.no_grad():
        for text in generate_text(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_k,
                                  args.seed, args.num_samples, args.switch_over_seq_len):
            print(text)
            print("-" * 40)
        if args.report_timing and model.config.attention_kernel == "power":
            times = decode_timing(model, args.max_new_tokens, args.switch_over_seq_len)
            tenth = max(1, len(times) // 10)
            first = sorted(times[:tenth])[tenth // 2]
            last = sorted(times[-tenth:])[tenth // 2]
            print(f"decode: median {first * 1e3:.2f} ms/token over the first {tenth} tokens, "
                  f"{last * 1e3:.2f} ms/token over the last {tenth} (of {len(times)})")


if __name__ == "__main__":
    main()
