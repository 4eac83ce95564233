"""Tokenisers behind one small interface: bytes (no dependency), Hugging Face tokenizer.json, SentencePiece.

Specs accepted by `load_tokenizer`: "bytes", a path to a `tokenizer.json`, or a path to a `.model`
(SentencePiece). Nothing is ever downloaded: only local files are read.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Protocol

import numpy as np

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>", "<|end_of_text|>")


class Tokenizer(Protocol):
    """What `prepare` and evaluation need: text ↔ ids, the vocabulary size and the end-of-document id."""

    name: str
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def describe(self) -> dict[str, Any]: ...


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tokenizer_mismatch(a: dict[str, Any], b: dict[str, Any]) -> tuple[str, str] | None:
    """None when two manifests' tokenizer records (`describe()`) name one tokenizer (wherever its file
    lies: the checksum decides), else the two in words, for an error message."""
    def key(info: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in info.items() if k != "path"}

    def words(info: dict[str, Any]) -> str:
        where = f" {info['path']}" if info.get("path") else ""
        return f"{info.get('type', '?')}{where} (vocabulary {info.get('vocab_size', '?')})"

    return None if key(a) == key(b) else (words(a), words(b))


class ByteTokenizer:
    """UTF-8 bytes 0..255 plus EOS = 256: the default for tiny runs; needs no training or files."""

    name = "bytes"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def describe(self) -> dict[str, Any]:
        return {"type": "bytes", "vocab_size": self.vocab_size, "eos_id": self.eos_id}


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer.json (e.g. one trained by data_pipeline.train_tokenizer)."""

    def __init__(self, path: str | Path, eos_token: str | None = None) -> None:
        try:
            from tokenizers import Tokenizer as _Tokenizer
        except ImportError as err:  # pragma: no cover - tokenizers is a dependency
            raise ImportError(f"tokenizer {path}: tokenizer.json needs `pip install tokenizers`") from err
        self.path = Path(path)
        self.name = str(path)
        try:
            self._tok = _Tokenizer.from_file(str(path))
        except Exception as err:  # the Rust side raises a bare Exception on bad JSON
            raise ValueError(f"tokenizer {path}: not a valid tokenizer.json ({err})") from err
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        candidates = [eos_token] if eos_token else list(EOS_CANDIDATES)
        found = [i for i in (self._tok.token_to_id(t) for t in candidates) if i is not None]
        if not found:
            raise ValueError(f"tokenizer {path}: no end-of-document token among {candidates}")
        self.eos_id = found[0]

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def describe(self) -> dict[str, Any]:
        return {"type": "huggingface", "path": str(self.path), "sha256": _file_sha256(self.path),
                "vocab_size": self.vocab_size, "eos_id": self.eos_id}


class SentencePieceTokenizer:
    """A SentencePiece `.model` file (e.g. a Llama-style 32K model shipped inside a wheel)."""

    def __init__(self, path: str | Path) -> None:
        try:
            import sentencepiece
        except ImportError as err:
            raise ImportError(f"tokenizer {path}: SentencePiece models need `pip install sentencepiece`"
                              ) from err
        self.path = Path(path)
        self.name = str(path)
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except Exception as err:  # RuntimeError / OSError depending on the version
            raise ValueError(f"tokenizer {path}: not a valid SentencePiece model ({err})") from err
        self.vocab_size = self._sp.get_piece_size()
        self.eos_id = self._sp.eos_id()
        if self.eos_id < 0:
            raise ValueError(f"tokenizer {path}: the model defines no EOS piece")

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def describe(self) -> dict[str, Any]:
        return {"type": "sentencepiece", "path": str(self.path), "sha256": _file_sha256(self.path),
                "vocab_size": self.vocab_size, "eos_id": self.eos_id}


def load_tokenizer(spec: str) -> Tokenizer:
    """'bytes', a tokenizer.json or a SentencePiece .model; anything else is a clear error."""
    if spec == "bytes":
        return ByteTokenizer()
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {spec!r}: expected 'bytes', a tokenizer.json or a .model file")
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    return HFTokenizer(path)


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (≤ 65536 ids), else uint32; always little-endian on disk."""
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


def encode_array(tok: Tokenizer, text: str) -> np.ndarray:
    """`tok.encode(text)` as an array (uint8 for bytes: no Python list, 10× faster; else int64, so that a
    bad id is seen before it is narrowed to the shard dtype)."""
    if isinstance(tok, ByteTokenizer):
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    return np.asarray(tok.encode(text), dtype=np.int64)
