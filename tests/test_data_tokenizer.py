"""Tokenisers: bytes, a BPE trained offline and loaded from tokenizer.json, SentencePiece (optional)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from test_data_helpers import write_docs

from data_pipeline.prepare import prepare
from data_pipeline.tokenizer import ByteTokenizer, load_tokenizer
from data_pipeline.train_tokenizer import EOS_TOKEN, main

SAMPLE = "def remember(x):\n    return x * 2  # ünïcode 記憶\n"


def test_byte_tokenizer() -> None:
    tok = load_tokenizer("bytes")
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 257 and tok.eos_id == 256
    ids = tok.encode(SAMPLE)
    assert max(ids) < 256 and tok.decode(ids + [tok.eos_id]) == SAMPLE


def test_train_bpe_then_load_and_prepare(tmp_path: Path) -> None:
    write_docs(tmp_path / "text", 30)
    (tmp_path / "text" / "code.py").write_text(SAMPLE * 20)
    out = tmp_path / "tok" / "tokenizer.json"
    assert main([str(tmp_path / "text"), "--vocab-size", "400", "--out", str(out)]) == 0
    tok = load_tokenizer(str(out))
    assert 257 < tok.vocab_size <= 400 and tok.eos_id == tok._tok.token_to_id(EOS_TOKEN)
    ids = tok.encode(SAMPLE)
    assert len(ids) < len(SAMPLE.encode()) and tok.decode(ids) == SAMPLE  # merges learned, lossless
    manifest = prepare([tmp_path / "text" / "code.py"], tmp_path / "ds", str(out), sample_tokens=17,
                       shard_samples=50, val_fraction=0.0, progress=False)
    assert manifest.tokenizer["type"] == "huggingface" and len(manifest.tokenizer["sha256"]) == 64
    assert (manifest.vocab_size, manifest.eos_id, manifest.dtype) == (tok.vocab_size, tok.eos_id, "uint16")


def test_tokenizer_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_tokenizer(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        load_tokenizer(str(bad))
    fake = tmp_path / "m.model"
    fake.write_bytes(b"\x00")
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install sentencepiece"):
        load_tokenizer(str(fake))
    assert main(["--vocab-size", "10", "--out", str(tmp_path / "t.json"), str(tmp_path)]) == 2


def test_sentencepiece_model(tmp_path: Path) -> None:
    spm = pytest.importorskip("sentencepiece")
    write_docs(tmp_path / "text", 40)
    corpus = tmp_path / "all.txt"
    corpus.write_text("".join(p.read_text() for p in sorted((tmp_path / "text").glob("*.txt"))))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=320,
                                   model_type="bpe", character_coverage=1.0, byte_fallback=True,
                                   minloglevel=2)
    tok = load_tokenizer(str(tmp_path / "sp.model"))
    assert tok.vocab_size == 320 and tok.eos_id >= 0
    text = "memory gate 記憶"
    assert tok.decode(tok.encode(text)) == text
    assert tok.describe()["type"] == "sentencepiece"
