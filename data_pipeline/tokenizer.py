"""Tokenisers behind one small interface: bytes (no dependency), Hugging Face tokenizer.json, SentencePiece.

Specs accepted by `load_tokenizer`: "bytes", a path to a `tokenizer.json`, or a path to a `.model`
(SentencePiece). Nothing is ever downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes 0..255 plus EOS = 256: the default for tiny runs; needs no training or files."""

    name = "bytes"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer.json (e.g. one trained by data_pipeline.train_tokenizer)."""

    def __init__(self, path: str | Path, eos_token: str | None = None) -> None:
        from tokenizers import Tokenizer as _Tokenizer

        self.name = str(path)
        self._tok = _Tokenizer.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size()
        candidates = [eos_token] if eos_token else ["<|endoftext|>", "</s>", "<eos>", "<|eos|>"]
        ids = [self._tok.token_to_id(t) for t in candidates if t]
        found = [i for i in ids if i is not None]
        if not found:
            raise ValueError(f"tokenizer {path}: no end-of-document token among {candidates}")
        self.eos_id = found[0]

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


class SentencePieceTokenizer:
    """A SentencePiece `.model` file (e.g. a Llama-style 32K model shipped inside a wheel)."""

    def __init__(self, path: str | Path) -> None:
        try:
            import sentencepiece
        except ImportError as err:
            raise ImportError(f"tokenizer {path}: SentencePiece models need `pip install sentencepiece`"
                              ) from err
        self.name = str(path)
        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = self._sp.get_piece_size()
        self.eos_id = self._sp.eos_id()
        if self.eos_id < 0:
            raise ValueError(f"tokenizer {path}: the model defines no EOS piece")

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)


def load_tokenizer(spec: str) -> Tokenizer:
    if spec == "bytes":
        return ByteTokenizer()
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {spec!r}: expected 'bytes', a tokenizer.json or a .model file")
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    return HFTokenizer(path)
