"""`python -m data_pipeline.train_tokenizer`: train a byte-level BPE on local text, offline.

    python -m data_pipeline.train_tokenizer --default-corpus --vocab-size 8192 --out tok/tokenizer.json
    python -m data_pipeline.train_tokenizer corpus/ more.jsonl.gz --vocab-size 32000 --out tok/tokenizer.json

Uses Hugging Face `tokenizers` (GPT-2-style byte-level pre-tokenisation, so any text round-trips and no
id is ever unknown). `<|endoftext|>` is added as the end-of-document token that `prepare` appends. The
result loads with `--tokenizer tok/tokenizer.json` in `prepare` and with `tokenizers.Tokenizer.from_file`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from data_pipeline.corpus import (
    InputFile,
    add_input_arguments,
    check_input_arguments,
    input_files,
    iter_documents,
)

EOS_TOKEN = "<|endoftext|>"


def train_bpe(files: Sequence[InputFile | Path | str], vocab_size: int, out: str | Path,
              min_frequency: int = 2, text_field: str = "text", progress: bool = False) -> Path:
    """Train a byte-level BPE of `vocab_size` ids (EOS included) on `files`; writes and returns `out`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise ValueError(f"--vocab-size must be at least {len(alphabet) + 1} (256 bytes + EOS), "
                         f"got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=progress,
                                  special_tokens=[EOS_TOKEN], initial_alphabet=alphabet)

    def texts() -> Iterator[str]:
        for file in files:
            for _, text in iter_documents(file, text_field):
                yield text

    tok.train_from_iterator(texts(), trainer=trainer)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline.train_tokenizer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_input_arguments(parser)
    parser.add_argument("--vocab-size", type=int, required=True, help="ids in total, EOS included")
    parser.add_argument("--min-frequency", type=int, default=2, help="rarest pair that may be merged")
    parser.add_argument("--out", required=True, help="where to write tokenizer.json")
    args = parser.parse_args(argv)
    check_input_arguments(parser, args)
    try:
        files = input_files(args)
        path = train_bpe(files, args.vocab_size, args.out, args.min_frequency, args.text_field, progress=True)
    except (OSError, ValueError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from tokenizers import Tokenizer

    size = Tokenizer.from_file(str(path)).get_vocab_size()
    note = "" if size == args.vocab_size else f" of {args.vocab_size} asked: the corpus has no more merges"
    print(f"wrote {path} (vocab {size}{note}; EOS {EOS_TOKEN!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
