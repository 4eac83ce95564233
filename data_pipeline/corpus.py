"""Where documents come from: text files, directories, .jsonl(.gz), .parquet, and the embedded default corpus.

Every input file gets a stable *name* (its path relative to the folder it was found in, or the path as
given); document ids derive from it (`name`, or `name:line` for a jsonl record, `name:row` for a parquet
one), so the train/val split, which hashes the id, does not depend on where the corpus sits on disk.

The default corpus is the installed Python standard library's own `.py` sources: real English-and-code
text present on every machine that runs this project, under the PSF License (see README.md here).
"""

from __future__ import annotations

import argparse
import gzip
import json
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

DEFAULT_GLOBS = ("*.txt", "*.md", "*.py", "*.jsonl", "*.jsonl.gz", "*.parquet")
SKIP_STDLIB_PARTS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3"})


class InputFile(NamedTuple):
    path: Path
    name: str  # stable id: relative to the input folder, or the path as given


def is_jsonl(path: Path) -> bool:
    return path.name.endswith(".jsonl") or path.name.endswith(".jsonl.gz")


def is_parquet(path: Path) -> bool:
    return path.name.endswith(".parquet")


def default_corpus_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def default_corpus_files(max_bytes: int | None = None) -> list[InputFile]:
    """The standard library's .py files in sorted order, skipping tests and site-packages; the first
    files whose sizes sum to at most `max_bytes` (always at least one)."""
    root = default_corpus_root()
    files: list[InputFile] = []
    total = 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if set(rel.parts) & SKIP_STDLIB_PARTS or not path.is_file():
            continue
        size = path.stat().st_size
        if max_bytes is not None and files and total + size > max_bytes:
            break
        files.append(InputFile(path, rel.as_posix()))
        total += size
    if not files:
        raise FileNotFoundError(f"no Python sources found under {root} for the default corpus")
    return files


def expand_inputs(inputs: list[str], globs: tuple[str, ...] = DEFAULT_GLOBS) -> list[InputFile]:
    """Files given directly (any name), plus the files under directories matching `globs`, sorted."""
    files: list[InputFile] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = {p for pattern in globs for p in path.rglob(pattern) if p.is_file()}
            files += [InputFile(p, p.relative_to(path).as_posix()) for p in sorted(found)]
        elif path.is_file():
            files.append(InputFile(path, path.as_posix()))
        else:
            raise FileNotFoundError(f"input {item}: no such file or directory")
    if not files:
        raise FileNotFoundError(f"no input files matching {', '.join(globs)} found in {inputs}")
    return files


def as_input(item: InputFile | Path | str) -> InputFile:
    if isinstance(item, InputFile):
        return item
    return InputFile(Path(item), Path(item).as_posix())


def read_text(file: InputFile) -> str:
    """A whole file as UTF-8 text; an unreadable or non-UTF-8 file is an error naming it."""
    try:
        data = file.path.read_bytes()
    except OSError as err:
        raise ValueError(f"{file.path}: cannot be read ({err.strerror or err})") from err
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{file.path}: not UTF-8 text (byte {err.start}: {err.reason})") from err


def jsonl_chunks(file: InputFile, chunk_bytes: int = 1 << 22) -> Iterator[tuple[int, list[bytes]]]:
    """(first line number, raw lines) in chunks of about `chunk_bytes`; parsing is left to the workers."""
    opener = gzip.open if file.path.name.endswith(".gz") else open
    lines: list[bytes] = []
    size, first = 0, 1
    try:
        with opener(file.path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                lines.append(line)
                size += len(line)
                if size >= chunk_bytes:
                    yield first, lines
                    lines, size, first = [], 0, lineno + 1
    except (OSError, EOFError) as err:  # includes gzip.BadGzipFile and truncated gzip streams
        raise ValueError(f"{file.path}: cannot be read ({err})") from err
    if lines:
        yield first, lines


def parse_jsonl(file: InputFile, first: int, lines: list[bytes], text_field: str
                ) -> Iterator[tuple[str, str]]:
    """(document id, text) of each non-blank line; a bad line is an error naming file and line."""
    for lineno, line in enumerate(lines, first):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{file.path}:{lineno}: not valid JSON ({err.msg})") from err
        except UnicodeDecodeError as err:
            raise ValueError(f"{file.path}:{lineno}: not UTF-8 ({err.reason})") from err
        if not isinstance(record, dict) or text_field not in record:
            raise ValueError(f"{file.path}:{lineno}: missing text field {text_field!r} "
                             "(choose another with --text-field)")
        if not isinstance(record[text_field], str):
            raise ValueError(f"{file.path}:{lineno}: field {text_field!r} is "
                             f"{type(record[text_field]).__name__}, not a string")
        yield f"{file.name}:{lineno}", record[text_field]


def parquet_chunks(file: InputFile, text_field: str, chunk_rows: int = 4096
                   ) -> Iterator[tuple[int, list[str]]]:
    """(first row number, texts) of a .parquet file's `text_field` column (the format of most datasets on
    the Hugging Face hub), read a record batch at a time; rows count from 1, as jsonl lines do."""
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ValueError(f"{file.path}: reading .parquet needs pyarrow (pip install pyarrow)") from err
    try:
        table = pq.ParquetFile(file.path)
    except (OSError, pq.lib.ArrowException) as err:
        raise ValueError(f"{file.path}: cannot be read as parquet ({err})") from err
    if text_field not in table.schema_arrow.names:
        columns = ", ".join(table.schema_arrow.names)
        raise ValueError(f"{file.path}: no column {text_field!r} (it has {columns}; choose one with "
                         "--text-field)")
    first = 1
    for batch in table.iter_batches(batch_size=chunk_rows, columns=[text_field]):
        texts = batch.column(0).to_pylist()
        for row, text in enumerate(texts, first):
            if not isinstance(text, str):
                raise ValueError(f"{file.path}: row {row}: column {text_field!r} is "
                                 f"{type(text).__name__}, not a string")
        yield first, texts
        first += len(texts)


def iter_documents(file: InputFile | Path | str, text_field: str = "text") -> Iterator[tuple[str, str]]:
    """(document id, text) pairs: one per plain file, one per record of a .jsonl(.gz) or .parquet file."""
    file = as_input(file)
    if is_jsonl(file.path):
        for first, lines in jsonl_chunks(file):
            yield from parse_jsonl(file, first, lines, text_field)
    elif is_parquet(file.path):
        for first, texts in parquet_chunks(file, text_field):
            yield from ((f"{file.name}:{row}", text) for row, text in enumerate(texts, first))
    else:
        yield file.name, read_text(file)


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """The input options every corpus-reading CLI shares: files/directories, or the default corpus."""
    parser.add_argument("inputs", nargs="*", help="text files, directories, .jsonl or .jsonl.gz files")
    parser.add_argument("--default-corpus", action="store_true",
                        help="use the installed Python standard library's .py sources (PSF License, no "
                             "download); see data_pipeline/README.md")
    parser.add_argument("--max-bytes", type=int, default=None,
                        help="with --default-corpus: take the first files (sorted) up to this many bytes")
    parser.add_argument("--text-field", default="text", help="field holding the text in .jsonl records")
    parser.add_argument("--glob", action="append", default=None,
                        help=f"file pattern searched in directories; repeatable (default: "
                             f"{' '.join(DEFAULT_GLOBS)})")


def check_input_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.default_corpus == bool(args.inputs):
        parser.error("give input files/directories or --default-corpus (exactly one of them)")


def input_files(args: argparse.Namespace) -> list:
    """The files `add_input_arguments` selected (raises OSError / ValueError naming a bad input)."""
    if args.default_corpus:
        return default_corpus_files(args.max_bytes)
    return expand_inputs(args.inputs, tuple(args.glob or DEFAULT_GLOBS))
