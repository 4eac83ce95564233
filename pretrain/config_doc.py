"""Every config field with its default and what it does, for `python -m pretrain.train --fields`.

Why read the comments from the source: the config dataclasses document each field in a comment beside
it (or in the lines above it), which is where a reader of the code looks; this prints that text, so the
list a user sees cannot drift from the code.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import textwrap
import tokenize
from typing import Any

from pretrain.config import SECTIONS, RunConfig


def field_comments(cls: type) -> dict[str, str]:
    """A dataclass's field name → its comment: the one on its line, after the comment lines above it."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    lines = source.splitlines()
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for number, line in enumerate(lines, start=1):
        name = line.strip().split(":", 1)[0]
        if line.startswith("    ") and not line.startswith("     ") and name in names:
            above, row = [], number - 1
            while row in comments and lines[row - 1].strip().startswith("#"):
                above.insert(0, comments[row])
                row -= 1
            out[name] = " ".join([*above, *([comments[number]] if number in comments else [])])
    return out


def describe_fields(width: int = 110) -> str:
    """Every section's fields as `section.key = default  what it does`, wrapped to `width`."""
    defaults = RunConfig()
    blocks = []
    for section in SECTIONS:
        obj: Any = getattr(defaults, section)
        cls = type(obj)
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        lines = [f"{section}: {doc} ({cls.__module__}.{cls.__name__})"]
        comments = field_comments(cls)
        for f in dataclasses.fields(obj):
            if not f.init:
                continue
            value = getattr(obj, f.name) if f.default is dataclasses.MISSING else f.default
            head = f"  {section}.{f.name} = {list(value) if isinstance(value, tuple) else value}"
            text = comments.get(f.name, "")
            lines.append(head if not text else textwrap.fill(
                text, width, initial_indent=f"{head:<40} ", subsequent_indent=" " * 41))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
