"""data/prepare.py: token files from text, the offline default corpus, and clear errors on bad data.
Run: python -m pytest tests/test_data.py -q"""
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from data import prepare

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 50 + "All: Speak, speak. é\n" * 20
SHARED_TIKTOKEN = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiktoken_cache"


def load(out):
    meta = pickle.load(open(out / "meta.pkl", "rb"))
    return meta, [np.fromfile(out / f"{s}.bin", dtype=np.uint16) for s in ("train", "val")]


def test_byte_and_char_datasets_round_trip_to_the_text(tmp_path):
    meta, (tr, va) = load(prepare.prepare_text("b", TEXT, "byte", "t", root=tmp_path))
    assert bytes(np.concatenate([tr, va]).astype(np.uint8)).decode() == TEXT and meta["vocab_size"] == 256
    assert meta["train_sha256"] == prepare.sha256_file(tmp_path / "b" / "train.bin")
    meta, (tr, va) = load(prepare.prepare_text("c", TEXT, "char", "t", root=tmp_path))
    assert "".join(meta["itos"][int(i)] for i in np.concatenate([tr, va])) == TEXT
    assert meta["vocab_size"] == len(set(TEXT)) and meta["unit"] == "char"


def test_val_from_splits_at_the_given_byte_and_refuses_a_split_inside_a_character(tmp_path):
    text = "caf\u00e9 " * 50 + "VAL" + "x" * 40                # multi-byte characters before the cut
    at = text.encode().index(b"VAL")
    meta, (tr, va) = load(prepare.prepare_text("v", text, "byte", "t", root=tmp_path, val_from=at))
    assert bytes(va.astype(np.uint8)).startswith(b"VAL") and len(tr) == at
    with pytest.raises(SystemExit, match="inside a UTF-8 character"):
        prepare.prepare_text("w", text, "byte", "t", root=tmp_path, val_from=4)   # between the two bytes of é
    with pytest.raises(SystemExit, match="outside"):
        prepare.prepare_text("w", text, "byte", "t", root=tmp_path, val_from=10 ** 6)


@pytest.mark.skipif(not SHARED_TIKTOKEN.is_dir(), reason="the shared tiktoken cache (GPT-2 BPE files) is not present")
def test_gpt2_dataset_uses_tiktoken_bpe(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(SHARED_TIKTOKEN))
    meta, (tr, _) = load(prepare.prepare_text("g", "Hello world" + TEXT, "gpt2", "t", root=tmp_path))
    assert tr[:2].tolist() == [15496, 995] and meta["vocab_size"] == 50257
    assert 2 < meta["units_per_token"] < 6                     # bytes per BPE token on English text


def test_pystdlib_corpus_is_deterministic_and_split_by_file(tmp_path):
    a = prepare.prepare_pystdlib(root=tmp_path / "a")
    b = prepare.prepare_pystdlib(root=tmp_path / "b")
    meta_a, (tr, va) = load(a)
    assert meta_a["train_sha256"] == load(b)[0]["train_sha256"] and meta_a["vocab_size"] == 256
    headers = [set(line for line in bytes(t.astype(np.uint8)).split(b"\n") if line.startswith(b"# file: "))
               for t in (tr, va)]
    assert headers[0] and headers[1] and not headers[0] & headers[1]   # no file in both splits
    assert 0.03 < len(va) / (len(tr) + len(va)) < 0.3


def test_truncated_or_corrupted_token_files_are_refused(tmp_path):
    out = prepare.prepare_text("toy", TEXT * 4, "byte", "t", root=tmp_path)
    prepare.load_dataset(str(out), 16)                          # fine as written
    data = bytearray((out / "train.bin").read_bytes())
    data[10] ^= 1
    (out / "train.bin").write_bytes(bytes(data))
    with pytest.raises(SystemExit, match="sha256"):
        prepare.load_dataset(str(out), 16)
    (out / "train.bin").write_bytes(bytes(data[:-2]))
    with pytest.raises(SystemExit, match="tokens, meta.pkl says"):
        prepare.load_dataset(str(out), 16)
    os.remove(out / "meta.pkl")
    with pytest.raises(SystemExit, match="prepare it with"):
        prepare.load_dataset(str(out), 16)


def test_two_processes_building_a_dataset_at_once_both_finish_with_whole_files(tmp_path, monkeypatch):
    # (the bug: two runs of a parallel sweep built pystdlib at once through one shared train.bin.tmp, and the run
    # that renamed it first found a file still being written: "train.bin has 10485760 tokens, meta.pkl says ...")
    # Replayed deterministically: a second builder (another pid) runs whole inside the first one's first rename.
    ids = np.arange(5000) % 256
    replace = os.replace
    monkeypatch.setattr(prepare.os, "getpid", lambda: 1001)
    def interleaved(src, dst):
        monkeypatch.setattr(prepare.os, "replace", replace)
        monkeypatch.setattr(prepare.os, "getpid", lambda: 1002)
        prepare.write_dataset("toy", ids, ids[:100], dict(vocab_size=256, tokenizer="byte"), root=tmp_path)
        monkeypatch.setattr(prepare.os, "getpid", lambda: 1001)
        replace(src, dst)
    monkeypatch.setattr(prepare.os, "replace", interleaved)
    prepare.write_dataset("toy", ids, ids[:100], dict(vocab_size=256, tokenizer="byte"), root=tmp_path)
    meta = pickle.load(open(tmp_path / "toy" / "meta.pkl", "rb"))
    assert meta["train_tokens"] == 5000 and os.path.getsize(tmp_path / "toy" / "train.bin") == 2 * 5000
    assert not list((tmp_path / "toy").glob("*.tmp"))
