from __future__ import annotations

import json

import numpy as np
import pytest

from retention_train.data import ByteTokenizer, Dataset, prepare_text_files, stdlib_source_files


def test_byte_tokenizer_round_trips_any_text():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'héllo' + \"✓\"\n"
    tokens = tok.encode(text)
    assert max(tokens) < 256 and len(tokens) == len(text.encode())
    assert tok.decode(tokens) == text


def test_default_corpus_is_stdlib_source(data_root):
    files = stdlib_source_files()
    assert any(path.name == "inspect.py" for path in files)
    assert not any("site-packages" in path.parts for path in files)
    meta = json.loads((data_root / "default" / "meta.json").read_text())
    assert meta["vocab_size"] == 256 and meta["dtype"] == "uint8"
    train = np.fromfile(data_root / "default" / "train.bin", dtype=np.uint8)
    val = np.fromfile(data_root / "default" / "val.bin", dtype=np.uint8)
    assert train.size + val.size == 300_000 and 0.05 < val.size / 300_000 < 0.15
    assert bytes(train[:40]).decode().startswith("# file: ")


def test_text_files_and_batches(tmp_path):
    (tmp_path / "a.txt").write_text("abcdefghij" * 30)
    (tmp_path / "b.txt").write_text("0123456789" * 30)
    prepare_text_files([tmp_path / "a.txt", tmp_path / "b.txt"], tmp_path / "ds")
    data = Dataset(tmp_path / "ds")
    x, y = data.batch("train", block_size=8, count=6, seed=3, step=5)
    assert x.shape == y.shape == (6, 8)
    assert (x[:, 1:] == y[:, :-1]).all()  # targets are the inputs shifted by one
    # A pure function of (seed, stream, step), and a rank's rows are a slice of the global batch.
    x2, _ = data.batch("train", block_size=8, count=6, seed=3, step=5, rows=slice(2, 4))
    assert (x2 == x[2:4]).all()
    x3, _ = data.batch("train", block_size=8, count=6, seed=3, step=6)
    assert not (x3 == x).all()


def test_bad_inputs_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        prepare_text_files([tmp_path / "missing.txt"], tmp_path / "ds")
    with pytest.raises(ValueError, match="not a prepared dataset"):
        Dataset(tmp_path)
