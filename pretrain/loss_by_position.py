"""Validation loss by a token's position inside its document: does the model use context beyond its
attention span?

A model whose long-term memory helps should keep lowering its loss at positions far beyond its window
(more of the document is known); a window-only model flattens once the position passes its window.

- Documents: the validation split read in order, cut at the end-of-document token. `prepare` writes each
  split as its documents concatenated (each followed by EOS) and cut into samples, so reading the split
  in order gives the documents back whole; positions count from a document's start, never from the start
  of a packed training sequence. A document is scored on its own, from the initial memory, with the EOS
  that ends the previous document in the stream as its first input (so its first token is scored too),
  up to `max_position` tokens (its own EOS included).
- Exact carried state: each document is fed in pieces through `titans.streaming` (the memory, the
  attention window and the open chunk cross every cut), so its losses equal one call over the whole
  document (full attention keeps its whole past, as a KV cache does). Beyond the training length the
  model meets positions it never trained on: that is the point.
- Buckets: log-spaced position ranges [0, 32), [32, 64), ... up to `max_position`; each reports the mean
  loss of its tokens, their count, and where it lies relative to the attention span and training length.
  Buckets far out hold only long documents: compare models bucket by bucket (they see the same tokens),
  or pass `min_doc_len = max_position` so that every bucket comes from the same documents.
- Far repeats: at a small scale the loss by position is dominated by local statistics, so each bucket also
  reports the loss on the tokens that only context beyond the window predicts: those whose preceding
  `REPEAT_CONTEXT` tokens last appeared more than `repeat_span` tokens back, followed there by this same
  token. Copying from there predicts them and a window-only model cannot see it, so a model that uses the
  far context at all is lower on these tokens than one that does not (full attention, within its training
  length, shows what is to be gained).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from pretrain.model_io import end_of_document_id, run_tokenizer
from titans.model import TitansLM
from titans.streaming import stream_step

FIRST_BUCKET = 32  # the first bucket's end: the log-spaced edges double from here
REPEAT_CONTEXT = 8  # a far repeat's matched context: 8 bytes of source code rarely recur by chance
MAX_DOCUMENTS = 64  # validation documents scored by default


# ------------------------------------------------------------------------------------------- buckets


def bucket_edges(max_position: int, first: int = FIRST_BUCKET) -> list[int]:
    """[0, first, 2·first, 4·first, ...] doubling up to `max_position`, which is always the last edge."""
    if max_position < 1 or first < 1:
        raise ValueError(f"need max_position >= 1 and a first bucket >= 1, got {max_position} and {first}")
    edges, end = [0], first
    while end < max_position:
        edges.append(end)
        end *= 2
    return [*edges, max_position]


def parse_bucket_edges(spec: str) -> list[int]:
    """Edges from a comma list such as `0,64,256,2048`: integers from 0, strictly increasing."""
    try:
        edges = [int(x) for x in spec.replace(" ", "").split(",") if x]
    except ValueError:
        raise ValueError(f"bucket edges must be integers like 0,32,64,128, got {spec!r}") from None
    if len(edges) < 2 or edges[0] != 0:
        raise ValueError(f"bucket edges must start at 0 and have at least two values (0,32,...), "
                         f"got {spec!r}")
    if any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"bucket edges must be strictly increasing, got {spec!r}")
    return edges


def relation(start: int, end: int, span: int) -> str:
    """Where the bucket [start, end) lies relative to `span`: inside, crosses or beyond it."""
    if end <= span:
        return "inside"
    return "beyond" if start >= span else "crosses"


# ----------------------------------------------------------------------------------------- documents


def split_documents(rows: Iterable[Tensor], eos_id: int, max_len: int, max_documents: int | None = None,
                    min_len: int = 0) -> list[Tensor]:
    """The documents of a token stream given as consecutive rows (any shape, read in order), each up to
    and including its EOS, cut to its first `max_len` tokens; documents shorter than `min_len` (EOS
    included) are skipped. A last document without EOS (the split's dropped tail) is kept as it is."""
    docs: list[Tensor] = []
    parts: list[Tensor] = []  # the current document's tokens so far (at most max_len)
    length = 0  # the current document's full length so far

    def close() -> None:
        nonlocal parts, length
        if length >= max(min_len, 1):
            docs.append(torch.cat(parts)[:max_len] if parts else torch.empty(0, dtype=torch.long))
        parts, length = [], 0

    for row in rows:
        flat = row.flatten().long()
        ends = (flat == eos_id).nonzero().flatten().tolist()
        at = 0
        for end in [*ends, None]:
            piece = flat[at:] if end is None else flat[at : end + 1]
            if length < max_len and len(piece):
                parts.append(piece[: max_len - length])
            length += len(piece)
            if end is None:
                break
            close()
            at = end + 1
            if max_documents is not None and len(docs) >= max_documents:
                return docs
    if length:
        close()
    return docs[:max_documents] if max_documents is not None else docs


def far_repeats(inputs: list[int], targets: list[int], span: int,
                context: int = REPEAT_CONTEXT) -> list[bool]:
    """Per target: True where the `context` inputs ending at it last ended more than `span` positions back
    and were followed there by this same target (the copy is right, and a `span` window cannot see it)."""
    last: dict[tuple[int, ...], int] = {}  # a context → where it last ended
    mask = [False] * len(targets)
    for t in range(context - 1, len(targets)):
        key = tuple(inputs[t - context + 1 : t + 1])
        before = last.get(key)
        mask[t] = before is not None and t - before > span and targets[before] == targets[t]
        last[key] = t
    return mask


# ------------------------------------------------------------------------------------------- scoring


def document_end_id(model: Any, run_config: dict[str, Any], why: str) -> int:
    """The end-of-document token of the run's tokenizer; a clear error, saying `why` it is needed, if the
    model's vocabulary has none."""
    eos = end_of_document_id(run_tokenizer(run_config, model.vocab_size), model.vocab_size)
    if eos is None:
        raise ValueError(f"the model's vocabulary has no end-of-document token: {why}")
    return eos


def titans_model(model: Any) -> TitansLM:
    """The `TitansLM` behind a loaded model: exact streaming needs the blocks themselves."""
    inner = getattr(model, "model", model)
    if not isinstance(inner, TitansLM):
        raise ValueError("loss_by_position needs a TitansLM (pretrain.model_io.load_model's model): it "
                         f"streams the blocks exactly, got {type(inner).__name__}")
    return inner


@torch.no_grad()
def token_losses(model: TitansLM, inputs: Tensor, targets: Tensor, piece_len: int) -> Tensor:
    """Next-token losses (B, T) of `inputs` fed in pieces of `piece_len` through the exact streaming cache:
    equal to one call over the whole input, with logits held for one piece at a time."""
    return token_scores(model, inputs, targets, piece_len)[0]


@torch.no_grad()
def token_scores(model: TitansLM, inputs: Tensor, targets: Tensor, piece_len: int, greedy: bool = False
                 ) -> tuple[Tensor, Tensor | None]:
    """`token_losses` (a target of -100 is not scored: loss 0), and with `greedy` whether each target is
    the argmax of its logits (B, T)."""
    device = model.embed.weight.device
    cache, losses, hits = None, [], []
    for piece, target in zip(inputs.split(piece_len, 1), targets.split(piece_len, 1)):
        logits, cache = stream_step(model, piece.to(device), cache)
        target = target.to(device)
        losses.append(F.cross_entropy(logits.float().transpose(1, 2), target, reduction="none").cpu())
        if greedy:
            hits.append((logits.argmax(-1) == target).cpu())
    return torch.cat(losses, 1), torch.cat(hits, 1) if greedy else None


@torch.no_grad()
def loss_by_position(model: Any, documents: list[Tensor], edges: list[int], eos_id: int, piece_len: int,
                     attention_span: int, train_len: int | None = None, batch_size: int = 8,
                     repeat_span: int | None = None) -> dict[str, Any]:
    """Mean next-token loss per position bucket over `documents` (each scored from its start, on its own),
    and over each bucket's far repeats (beyond `repeat_span`, default `attention_span`: a comparison passes
    one window so that every model is scored on the same tokens).

    Documents are batched longest first and right-padded: every block is causal, so padding after a
    document never changes its losses. Returns the JSON-ready result (edges, per-bucket loss and tokens).
    """
    lm = titans_model(model)
    max_len = edges[-1]
    repeat_span = repeat_span or attention_span
    bounds = torch.tensor(edges[1:-1])
    total = torch.zeros(len(edges) - 1, dtype=torch.float64)
    count = torch.zeros(len(edges) - 1, dtype=torch.long)
    repeat_total, repeat_count = torch.zeros_like(total), torch.zeros_like(count)
    docs = sorted((d[:max_len] for d in documents if len(d)), key=len, reverse=True)
    if not docs:
        raise ValueError("no validation documents to score: the val split is empty or every document is "
                         "shorter than min_doc_len")
    for first in range(0, len(docs), batch_size):
        group = docs[first : first + batch_size]
        width = len(group[0])
        targets = torch.full((len(group), width), eos_id, dtype=torch.long)
        valid = torch.zeros(len(group), width, dtype=torch.bool)
        repeat = torch.zeros(len(group), width, dtype=torch.bool)
        for b, doc in enumerate(group):
            targets[b, : len(doc)] = doc
            valid[b, : len(doc)] = True
            tokens = doc.tolist()
            repeat[b, : len(doc)] = torch.tensor(far_repeats([eos_id, *tokens[:-1]], tokens, repeat_span))
        inputs = torch.cat([torch.full((len(group), 1), eos_id, dtype=torch.long), targets[:, :-1]], 1)
        losses = token_losses(lm, inputs, targets, piece_len)
        bucket = torch.bucketize(torch.arange(width), bounds, right=True).expand(len(group), -1)
        total.index_add_(0, bucket[valid], losses[valid].double())
        count.index_add_(0, bucket[valid], torch.ones_like(bucket[valid]))
        repeat_total.index_add_(0, bucket[repeat], losses[repeat].double())
        repeat_count.index_add_(0, bucket[repeat], torch.ones_like(bucket[repeat]))
    buckets = []
    for i, (start, end) in enumerate(zip(edges, edges[1:])):
        n, r = int(count[i]), int(repeat_count[i])
        buckets.append({"start": start, "end": end, "tokens": n, "loss": float(total[i] / n) if n else None,
                        "repeat_tokens": r, "repeat_loss": float(repeat_total[i] / r) if r else None,
                        "span": relation(start, end, attention_span),
                        "beyond_train": train_len is not None and start >= train_len})
    return {"edges": edges, "max_position": max_len, "attention_span": attention_span, "train_len": train_len,
            "piece_len": piece_len, "repeat_span": repeat_span, "repeat_context": REPEAT_CONTEXT,
            "documents": len(docs), "tokens": int(count.sum()),
            "loss": float(total.sum() / count.sum()), "buckets": buckets}


def evaluate_rows(model: Any, rows: Iterable[Tensor], run_config: dict[str, Any], piece_len: int,
                  max_position: int | None = None, edges: list[int] | None = None,
                  max_documents: int | None = MAX_DOCUMENTS, min_doc_len: int = 0, batch_size: int = 8,
                  repeat_span: int | None = None) -> dict[str, Any]:
    """`loss_by_position` of the documents in `rows` (the validation split in order, e.g.
    `pretrain.evaluate.val_batches`). Positions run to `max_position` (default 4× the training length;
    `edges`, when given, end where their last edge does)."""
    train_len = run_config.get("data", {}).get("seq_len")
    if edges is None:
        edges = bucket_edges(max_position or 4 * (train_len or piece_len))
    eos = document_end_id(model, run_config, "documents cannot be found")
    documents = split_documents(rows, eos, edges[-1], max_documents, min_doc_len)
    return loss_by_position(model, documents, edges, eos, piece_len, model.attention_span, train_len,
                            batch_size, repeat_span)


# ------------------------------------------------------------------------------------------ reports


def markdown(result: dict[str, Any]) -> list[str]:
    """The result as Markdown lines: one row per bucket."""
    span, train_len = result["attention_span"], result["train_len"]
    lines = [f"Loss by position in {result['documents']} validation documents ({result['tokens']:,} tokens, "
             f"mean loss {result['loss']:.4f}), fed in pieces of {result['piece_len']} carrying the exact "
             f"state; attention span {span} tokens, training length {train_len}. Far repeats: tokens whose "
             f"preceding {result['repeat_context']} tokens last appeared, followed by them, more than "
             f"{result['repeat_span']} tokens back.", "",
             "| positions | × span | tokens | loss | far repeats | their loss | vs span "
             "| beyond training length |",
             "|---|---:|---:|---:|---:|---:|---|---|"]
    for b in result["buckets"]:
        loss = "-" if b["loss"] is None else f"{b['loss']:.4f}"
        repeat = "-" if b["repeat_loss"] is None else f"{b['repeat_loss']:.4f}"
        lines.append(f"| [{b['start']}, {b['end']}) | {b['start'] / span:g}–{b['end'] / span:g} | "
                     f"{b['tokens']:,} | {loss} | {b['repeat_tokens']:,} | {repeat} | {b['span']} | "
                     f"{'yes' if b['beyond_train'] else 'no'} |")
    return lines + [""]


REGIONS = ("inside_span", "span_to_train", "beyond_train", "repeats_to_train", "repeats_beyond_train")


def regions(result: dict[str, Any], span: int | None = None) -> dict[str, float | None]:
    """Token-weighted mean loss of the buckets inside the attention span (`span`, default the result's),
    between the span and the training length, and beyond the training length (a bucket crossing a
    boundary counts in neither); and of the far repeats within and beyond the training length."""
    span = span or result["attention_span"]
    train_len = result["train_len"] or result["max_position"]
    picks = {"inside_span": ("", lambda b: b["end"] <= span),
             "span_to_train": ("", lambda b: b["start"] >= span and b["end"] <= train_len),
             "beyond_train": ("", lambda b: b["start"] >= train_len),
             "repeats_to_train": ("repeat_", lambda b: b["end"] <= train_len),
             "repeats_beyond_train": ("repeat_", lambda b: b["start"] >= train_len)}
    out: dict[str, float | None] = {}
    for name, (kind, pick) in picks.items():
        rows = [b for b in result["buckets"] if pick(b) and b.get(f"{kind}tokens")]
        n = sum(b[f"{kind}tokens"] for b in rows)
        out[name] = sum(b[f"{kind}loss"] * b[f"{kind}tokens"] for b in rows) / n if n else None
    return out


def scalars(result: dict[str, Any]) -> dict[str, float]:
    """TensorBoard scalars: `eval/loss_by_position/<bucket start>` (empty buckets left out)."""
    return {f"eval/loss_by_position/{b['start']}": b["loss"] for b in result["buckets"]
            if b["loss"] is not None}


def plot_loss_by_position(results: dict[str, dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """One PNG of loss against position (log x axis), one line per model (label → result); a bucket's
    optional `loss_min` / `loss_max` (e.g. over seeds) is shaded. Vertical lines mark the attention spans
    and training lengths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    spans, train_lens = set(), set()
    for label, result in results.items():
        rows = [b for b in result["buckets"] if b["loss"] is not None]
        x = [(b["start"] + b["end"]) / 2 for b in rows]
        (line,) = ax.plot(x, [b["loss"] for b in rows], marker="o", markersize=3, label=label)
        if rows and all("loss_min" in b for b in rows):
            ax.fill_between(x, [b["loss_min"] for b in rows], [b["loss_max"] for b in rows],
                            color=line.get_color(), alpha=0.15, linewidth=0)
        spans.add(result["attention_span"])
        if result.get("train_len"):
            train_lens.add(result["train_len"])
    for span in sorted(spans - train_lens):  # full attention's nominal span is its training length
        ax.axvline(span, color="black", linestyle=":", linewidth=1)
        ax.annotate(f"span {span}", (span, 1), xycoords=("data", "axes fraction"), rotation=90,
                    va="top", ha="right", fontsize=8)
    for length in sorted(train_lens):
        ax.axvline(length, color="grey", linestyle="--", linewidth=1)
        ax.annotate(f"train length {length}", (length, 1), xycoords=("data", "axes fraction"), rotation=90,
                    va="top", ha="right", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("position in the document (tokens, bucket centre)")
    ax.set_ylabel("next-token loss (nats)")
    ax.set_title(title or "validation loss by position")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
