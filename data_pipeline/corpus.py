"""Where documents come from: text files, directories, .jsonl(.gz), and the embedded default corpus.

The default corpus is the installed Python standard library's own `.py` sources: real English-and-code
text present on every machine that runs this project, under the PSF License (see README.md here).
"""

from __future__ import annotations

import gzip
import json
import sysconfig
from collections.abc import Iterator
from pathlib import Path

TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".jsonl", ".gz"}


def default_corpus_files(max_bytes: int | None = None) -> list[Path]:
    """The standard library's .py files, sorted, skipping tests and site-packages (deterministic)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    total = 0
    for path in sorted(root.rglob("*.py")):
        parts = set(path.relative_to(root).parts)
        if parts & {"site-packages", "test", "tests", "idlelib", "lib2to3"}:
            continue
        files.append(path)
        total += path.stat().st_size
        if max_bytes is not None and total >= max_bytes:
            break
    if not files:
        raise FileNotFoundError(f"no Python sources found under {root} for the default corpus")
    return files


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files given directly, plus the text-like files under directories, sorted."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"input {item} does not exist")
    if not files:
        raise FileNotFoundError(f"no input files found in {inputs}")
    return files


def iter_documents(path: Path, text_field: str = "text") -> Iterator[tuple[str, str]]:
    """(document id, text) pairs: one per plain file, one per line of a .jsonl(.gz) file."""
    name = path.name
    if name.endswith(".jsonl") or name.endswith(".jsonl.gz"):
        opener = gzip.open if name.endswith(".gz") else open
        try:
            with opener(path, "rt", encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
                    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                        raise ValueError(f"{path}:{lineno}: no string field {text_field!r}")
                    yield f"{path}:{lineno}", record[text_field]
        except (OSError, EOFError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: cannot be read ({err})") from err
    else:
        try:
            yield str(path), path.read_text(encoding="utf-8", errors="replace")
        except OSError as err:
            raise ValueError(f"{path}: cannot be read ({err})") from err
