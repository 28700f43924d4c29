"""Training data: token memmaps on disk, a tokenizer, and deterministic batches.

A prepared dataset is a folder with ``train.bin`` and ``val.bin`` (flat token arrays, uint8 for the byte
tokenizer, uint16 for GPT-2) and ``meta.json`` (``vocab_size``, ``tokenizer``, ``dtype``). Three sources:

- ``default``: the embedded corpus, no network: the source of the Python standard library that runs this
  code (found with ``sysconfig``), byte-level tokens. Built on first use in a fraction of a second.
- ``files``: any local text files.
- ``owt``: OpenWebText from the Hugging Face hub with tiktoken's GPT-2 encoding (needs ``datasets``,
  ``tiktoken`` and the network; nanoGPT's ``prepare.py`` recipe).

    python -m retention_train.data default --out=data/default
    python -m retention_train.data files notes/*.txt --out=data/notes
    python -m retention_train.data owt --out=data/owt
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

__all__ = [
    "ByteTokenizer",
    "Dataset",
    "get_tokenizer",
    "prepare_default",
    "prepare_openwebtext",
    "prepare_text_files",
    "stdlib_source_files",
]

DEFAULT_MAX_BYTES = 16_000_000
VAL_FRACTION = 0.1
# Folders of the standard library that are not ordinary source text (tests, vendored packages, tools).
SKIPPED_FOLDERS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3",
                   "ensurepip", "config-3", "turtledemo"}


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, nothing to download, any text round-trips."""

    name = "bytes"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, tokens) -> str:
        return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")


class TiktokenTokenizer:
    """tiktoken's GPT-2 encoding (50257 tokens; documents end with ``<|endoftext|>``)."""

    name = "gpt2"

    def __init__(self):
        import tiktoken

        self._encoding = tiktoken.get_encoding("gpt2")
        self.vocab_size = self._encoding.n_vocab
        self.eot = self._encoding.eot_token

    def encode(self, text: str) -> list[int]:
        return self._encoding.encode_ordinary(text)

    def decode(self, tokens) -> str:
        return self._encoding.decode([int(t) for t in tokens])


def get_tokenizer(name: str):
    """``"bytes"`` or ``"gpt2"`` (tiktoken; its vocabulary file must be installed or downloadable)."""
    if name == "bytes":
        return ByteTokenizer()
    if name == "gpt2":
        try:
            return TiktokenTokenizer()
        except Exception as error:  # ImportError, or no network for the vocabulary file
            raise ValueError(f"tokenizer='gpt2' needs tiktoken and its GPT-2 vocabulary: {error}") from error
    raise ValueError(f"tokenizer must be 'bytes' or 'gpt2', got {name!r}")


def _token_dtype(vocab_size: int):
    return np.uint8 if vocab_size <= 256 else np.uint16


def write_dataset(out: str | os.PathLike, train_tokens, val_tokens, tokenizer, **meta) -> Path:
    """Write ``train.bin``, ``val.bin`` and ``meta.json`` into ``out`` (files appear atomically)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = _token_dtype(tokenizer.vocab_size)
    for split, tokens in (("train", train_tokens), ("val", val_tokens)):
        array = np.asarray(tokens, dtype=dtype)
        if array.size < 2:
            raise ValueError(f"the {split} split needs at least 2 tokens, got {array.size}")
        tmp = out / f"{split}.bin.tmp"
        array.tofile(tmp)
        os.replace(tmp, out / f"{split}.bin")
    meta = {"vocab_size": tokenizer.vocab_size, "tokenizer": tokenizer.name, "dtype": np.dtype(dtype).name,
            "train_tokens": len(train_tokens), "val_tokens": len(val_tokens), **meta}
    tmp = out / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, out / "meta.json")
    return out


def stdlib_source_files() -> list[Path]:
    """The ``.py`` files of this interpreter's standard library, sorted (tests and vendored code left out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(s for s in subfolders if s not in SKIPPED_FOLDERS and not s.startswith("config-"))
        files.extend(Path(folder) / name for name in sorted(names) if name.endswith(".py"))
    return sorted(files, key=lambda path: path.relative_to(root).as_posix())


def _split(tokens: list[int] | np.ndarray, val_fraction: float):
    n_val = max(2, int(len(tokens) * val_fraction))
    return tokens[:-n_val], tokens[-n_val:]


def prepare_default(out: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES) -> Path:
    """The embedded corpus: up to ``max_bytes`` of standard-library source as bytes; the last 10 % is val.

    Files are concatenated in sorted order, each headed by ``# file: <path>``; the corpus differs slightly
    between Python versions (``meta.json`` records which one built it).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, size, used = [], 0, 0
    for path in stdlib_source_files():
        text = f"# file: {path.relative_to(root).as_posix()}\n".encode() + path.read_bytes() + b"\n"
        chunks.append(text[: max_bytes - size])
        size += len(chunks[-1])
        used += 1
        if size >= max_bytes:
            break
    if size == 0:
        raise ValueError(f"found no standard-library source under {root}")
    tokens = np.frombuffer(b"".join(chunks), dtype=np.uint8)
    train, val = _split(tokens, VAL_FRACTION)
    return write_dataset(out, train, val, ByteTokenizer(), source="python-stdlib", files=used,
                         python=sys.version.split()[0])


def prepare_text_files(paths, out: str | os.PathLike, tokenizer: str = "bytes") -> Path:
    """Local text files (UTF-8), joined by newlines; the last 10 % of tokens is the val split."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("prepare_text_files needs at least one file")
    for path in paths:
        if not path.is_file():
            raise ValueError(f"text file {str(path)!r} does not exist")
    tok = get_tokenizer(tokenizer)
    text = "\n".join(path.read_text(encoding="utf-8", errors="replace") for path in paths)
    train, val = _split(tok.encode(text), VAL_FRACTION)
    return write_dataset(out, train, val, tok, source="files", files=[str(p) for p in paths])


def prepare_openwebtext(out: str | os.PathLike, num_proc: int = 8) -> Path:  # pragma: no cover - network
    """OpenWebText (about 9B GPT-2 tokens) into uint16 memmaps, as nanoGPT's ``prepare.py`` does."""
    try:
        import huggingface_hub
        from datasets import load_dataset
    except ImportError as error:
        raise ValueError(f"OpenWebText needs `pip install datasets tiktoken`: {error}") from error
    try:
        huggingface_hub.HfApi().dataset_info("Skylion007/openwebtext", timeout=10)
    except Exception as error:
        raise ValueError(f"the Hugging Face hub is not reachable: {error}") from error
    tok = get_tokenizer("gpt2")
    split = load_dataset("Skylion007/openwebtext", num_proc=num_proc)["train"].train_test_split(
        test_size=0.0005, seed=2357, shuffle=True
    )

    def encode(example):
        ids = [*tok.encode(example["text"]), tok.eot]
        return {"ids": ids, "len": len(ids)}

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", split["train"]), ("val", split["test"])):
        part = part.map(encode, remove_columns=["text"], num_proc=num_proc)
        total = int(np.sum(part["len"], dtype=np.uint64))
        tmp = out / f"{name}.bin.tmp"
        array = np.memmap(tmp, dtype=np.uint16, mode="w+", shape=(total,))
        position = 0
        for shard in range(1024):
            batch = part.shard(num_shards=1024, index=shard, contiguous=True).with_format("numpy")
            ids = np.concatenate(batch["ids"]) if len(batch) else np.zeros(0, dtype=np.uint16)
            array[position : position + len(ids)] = ids
            position += len(ids)
        array.flush()
        del array
        os.replace(tmp, out / f"{name}.bin")
    (out / "meta.json").write_text(json.dumps({"vocab_size": tok.vocab_size, "tokenizer": "gpt2",
                                               "dtype": "uint16", "source": "openwebtext"}, indent=2))
    return out


class Dataset:
    """A prepared dataset folder; batches are a pure function of ``(seed, stream, step)``.

    Reproducible by construction: the batch of step ``i`` does not depend on what was drawn before, so
    resuming at step ``i`` needs only ``i``, and a global batch can be split across ranks exactly.
    """

    STREAMS: ClassVar[dict[str, int]] = {"train": 0, "eval-train": 1, "eval-val": 2}

    def __init__(self, folder: str | os.PathLike):
        folder = Path(folder)
        if not (folder / "meta.json").is_file():
            raise ValueError(f"{str(folder)!r} is not a prepared dataset (no meta.json); see retention_train.data")
        self.folder = folder
        self.meta = json.loads((folder / "meta.json").read_text())
        self.vocab_size = int(self.meta["vocab_size"])
        dtype = np.dtype(self.meta["dtype"])
        self.splits = {split: np.memmap(folder / f"{split}.bin", dtype=dtype, mode="r") for split in ("train", "val")}

    def tokenizer(self):
        return get_tokenizer(self.meta["tokenizer"])

    def batch(self, split: str, block_size: int, count: int, seed: int, step: int, stream: str = "train",
              rows: slice | None = None):
        """``(x, y)`` int64 ``[count, block_size]`` (``y`` is ``x`` shifted by one token); ``rows`` picks a
        slice of those ``count`` rows (a rank's share of a global batch)."""
        data = self.splits[split]
        if len(data) <= block_size + 1:
            raise ValueError(f"the {split} split has {len(data)} tokens, too few for block_size={block_size}")
        rng = np.random.default_rng((seed, self.STREAMS[stream], step))
        starts = rng.integers(0, len(data) - block_size - 1, size=count)[rows if rows is not None else slice(None)]
        window = np.stack([data[s : s + block_size + 1] for s in starts]).astype(np.int64)
        window = torch.from_numpy(window)
        return window[:, :-1].contiguous(), window[:, 1:].contiguous()


def resolve_dataset(name: str, data_root: str | os.PathLike = "data") -> Path:
    """``"default"`` (built on first use under ``data_root``), ``"owt"`` (must be prepared) or a folder."""
    if name == "default":
        folder = Path(data_root) / "default"
        if not (folder / "meta.json").is_file():
            prepare_default(folder)
        return folder
    if name == "owt":
        folder = Path(data_root) / "owt"
        if not (folder / "meta.json").is_file():
            raise ValueError(
                f"OpenWebText is not prepared in {folder}: python -m retention_train.data owt --out={folder}"
            )
        return folder
    return Path(name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Prepare a token dataset for retention_train.train")
    parser.add_argument("source", choices=["default", "files", "owt"])
    parser.add_argument("files", nargs="*", help="text files (source 'files')")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--tokenizer", default="bytes", choices=["bytes", "gpt2"])
    parser.add_argument("--max_bytes", type=int, default=DEFAULT_MAX_BYTES)
    parser.add_argument("--num_proc", type=int, default=8)
    args = parser.parse_args(argv)
    if args.source == "default":
        folder = prepare_default(args.out, args.max_bytes)
    elif args.source == "files":
        folder = prepare_text_files(args.files, args.out, args.tokenizer)
    else:
        folder = prepare_openwebtext(args.out, args.num_proc)
    print(json.dumps(json.loads((Path(folder) / "meta.json").read_text()), indent=2))


if __name__ == "__main__":
    main()
