"""Text recall: does the model use a real-text passage it read beyond its attention span?

Loss by position on natural text shows a gain only where the text repeats itself far back and the model
has learned to exploit it; at a small scale neither may hold, and then it cannot tell a memory that
carries nothing from one that is never asked. This task asks directly, on the validation text itself:

- repeat:  [EOS, P, F, P]: a passage P of validation text, the `distance` tokens F that follow it in the
  text, then P again;
- control: [EOS, Q, F, P]: the same with another passage Q (the next sample's) in front.

The loss on the second P (its first token left out: nothing tells a model that a repeat starts) is
compared between the two. Every distance reads the same passages (cut once, at the longest distance).
Everything within the model's receptive field of the second P is identical in both when `distance`
passes it, so the gain (control minus repeat) is exactly zero for sliding-window attention, and whatever
a model gains is information carried from beyond its window, by the long-term memory or, within its
training length, by full attention's KV cache. Both sequences are fed through the exact streaming state
(`pretrain.loss_by_position.token_losses`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from pretrain.loss_by_position import document_end_id, titans_model, token_losses


def passages(rows: Iterable[Tensor], samples: int, passage: int, distance: int) -> Tensor:
    """(samples, passage + distance) consecutive validation tokens per sample: the passage, then the
    text that follows it. Raises when the split holds fewer than two samples (the control needs another
    sample's passage)."""
    need = passage + distance
    out: list[Tensor] = []
    buffer = torch.empty(0, dtype=torch.long)
    for row in rows:
        buffer = torch.cat([buffer, row.flatten().long()])
        while len(buffer) >= need and len(out) < samples:
            out.append(buffer[:need])
            buffer = buffer[need:]
        if len(out) == samples:
            break
    if len(out) < 2:
        raise ValueError(f"text_recall needs at least 2 samples of {need} validation tokens (passage "
                         f"{passage} + distance {distance}), the val split gave {len(out)}: use a smaller "
                         f"distance or a larger validation split")
    return torch.stack(out)


@torch.no_grad()
def text_recall(model: Any, texts: Tensor, passage: int, eos_id: int, piece_len: int,
                batch_size: int = 8) -> dict[str, Any]:
    """Mean loss on the second copy of each passage, repeated and control, and their difference.

    texts: (N, passage + distance) from `passages`; the control of sample i puts sample i+1's passage
    (cyclically) in front."""
    lm = titans_model(model)
    if passage < 2:
        raise ValueError(f"text_recall needs a passage of at least 2 tokens, got {passage}")
    distance = texts.shape[1] - passage
    p, rest = texts[:, :passage], texts[:, passage:]
    eos = torch.full((len(texts), 1), eos_id, dtype=torch.long)
    repeat = torch.cat([eos, p, rest, p], 1)
    control = torch.cat([eos, p.roll(-1, 0), rest, p], 1)
    scored = slice(passage + distance + 1, 2 * passage + distance)  # the second copy but its first token
    per_passage = {}  # mean loss on each second copy
    for name, tokens in (("repeat", repeat), ("control", control)):
        losses = torch.cat([token_losses(lm, chunk[:, :-1], chunk[:, 1:], piece_len)
                            for chunk in tokens.split(batch_size)])
        per_passage[name] = losses[:, scored].double().mean(1)
    gains = per_passage["control"] - per_passage["repeat"]
    return {"passage": passage, "distance": distance, "passages": len(texts),
            "tokens": len(texts) * (passage - 1), "repeat_loss": per_passage["repeat"].mean().item(),
            "control_loss": per_passage["control"].mean().item(), "gain": gains.mean().item(),
            "gain_stderr": (gains.std() / len(gains) ** 0.5).item()}


def markdown(per_distance: dict[str, dict[str, Any]]) -> list[str]:
    """One row per distance."""
    lines = ["Text recall: loss on a validation passage read again `distance` tokens later (repeat) and "
             "after another passage (control); the gain is what was carried from beyond the window.", "",
             "| distance (× span) | distance (tokens) | passage | passages | control loss | repeat loss | "
             "gain | ± s.e. |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in per_distance.values():
        lines.append(f"| {r['multiple']:g} | {r['distance']} | {r['passage']} | {r['passages']} | "
                     f"{r['control_loss']:.4f} | {r['repeat_loss']:.4f} | {r['gain']:.4f} | "
                     f"{r['gain_stderr']:.4f} |")
    return lines + [""]


def evaluate_rows(model: Any, rows: Iterable[Tensor], run_config: dict[str, Any], samples: int, passage: int,
                  distances: Sequence[int], piece_len: int, batch_size: int = 8) -> list[dict[str, Any]]:
    """`text_recall` at each distance, of the same `samples` passages cut from `rows` (the validation split
    in order) at the longest distance: each distance reads the start of the same following text, so the
    distances differ only in how far back the passage is, and their gains compare pairwise."""
    eos = document_end_id(model, run_config, "the sequences cannot start with it")
    texts = passages(rows, samples, passage, max(distances))
    return [text_recall(model, texts[:, : passage + distance], passage, eos, piece_len, batch_size)
            for distance in distances]
