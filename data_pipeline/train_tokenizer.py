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

from data_pipeline.corpus import DEFAULT_GLOBS, InputFile, default_corpus_files, expand_inputs, iter_documents

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
    parser.add_argument("inputs", nargs="*", help="text files, directories, .jsonl or .jsonl.gz files")
    parser.add_argument("--default-corpus", action="store_true",
                        help="train on the Python standard library's sources (no download)")
    parser.add_argument("--max-bytes", type=int, default=None, help="with --default-corpus: size cap")
    parser.add_argument("--vocab-size", type=int, required=True, help="ids in total, EOS included")
    parser.add_argument("--min-frequency", type=int, default=2, help="rarest pair that may be merged")
    parser.add_argument("--out", required=True, help="where to write tokenizer.json")
    parser.add_argument("--text-field", default="text", help="field holding the text in .jsonl records")
    parser.add_argument("--glob", action="append", default=None,
                        help=f"pattern searched in directories (default: {' '.join(DEFAULT_GLOBS)})")
    args = parser.parse_args(argv)
    if args.default_corpus == bool(args.inputs):
        parser.error("give input files/directories or --default-corpus (exactly one of them)")
    try:
        files = default_corpus_files(args.max_bytes) if args.default_corpus else \
            expand_inputs(args.inputs, tuple(args.glob or DEFAULT_GLOBS))
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
