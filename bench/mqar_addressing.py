"""Does a trained model's memory bind keys to values? Reads a checkpoint's memories on 2-pair MQAR.

A memory that recalls the values but not which key each belongs to scores 0.5 on the first question and
answers the second by elimination (bench/RESULTS.md, the MQAR sections). This measures where binding
fails, per memory layer and head, at the first question (the `assign` token whose logits answer it):

- addressing: a linear memory's read of query q is ≈ Σ_t θ_t (q · k_t) v_t, so w_t = θ_t (q · k_t) is
  how much the write at position t answers q. "addressing" is the share of samples whose w, summed
  over the asked pair's positions (and the conv's spill after the last pair), exceeds the other pair's;
  0.5 means the read cannot tell the pairs apart. For MAC also with its segment-read query (`h q`), at
  the `assign` token and at each key token of the question (`h q at -1`, `-2`): MAC's attention at the
  answer sees the h of every earlier token of its segment, and at `assign` the first layer's query is
  the same token for every question, so the read that can address is the one at the key.
- pair mass: the share of Σ|w_t|, over the writes before the question, that falls on the pairs rather
  than the filler.
- key cos: mean cosine of the two pairs' write keys at the value token; discriminating keys are far
  apart, keys that encode only "a pair is here" are near 1.
- MAC only: |y| / |x|, the attention output's norm against the token's own at the pairs of the first
  segment (what the default write `RMSNorm(x + y)` is made of), and the accuracy with the segment read
  `h` zeroed in every layer.

    python bench/mqar_addressing.py runs/mqar_s8/sep/mac-s0 runs/mqar_s8/sep/mag-s0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain import synthetic  # noqa: E402
from pretrain.evaluate import task_accuracy  # noqa: E402
from pretrain.model_io import LoadedModel, load_model  # noqa: E402
from titans.blocks import MACBlock  # noqa: E402
from titans.memory import NeuralMemory  # noqa: E402

PAIRS = 2
PAIR_LEN = synthetic.KEY_LEN + 4  # open, key, assign, value, close
VALUE_OFFSET = synthetic.KEY_LEN + 2
# Query kind → offsets from the answering `assign` token at which it is read.
READ_OFFSETS = {"q": (0,), "h q": tuple(range(-synthetic.KEY_LEN, 1))}


class Recorder:
    """Forward hooks that keep, per call, each memory's write keys, read queries and θ, and each MAC
    block's segment-read queries and attention output norms (MAC calls its memory once per segment)."""

    def __init__(self, model: LoadedModel) -> None:
        self.memories = [m for m in model.model.modules() if isinstance(m, NeuralMemory)]
        self.calls: dict[tuple[int, str], list[Tensor]] = {}
        self.attention_ratio: dict[int, float] = {}  # id(memory) → MAC's |y| / |x| at the pairs
        self.handles = [m.register_forward_pre_hook(self._memory) for m in self.memories]
        for block in (b for b in model.model.modules() if isinstance(b, MACBlock)):
            if block.to_memory_query is not None:
                self.handles.append(block.to_memory_query.register_forward_hook(
                    lambda module, args, out, block=block: self._mac_query(block, out)))
            self.handles.append(block.attn.register_forward_hook(
                lambda module, args, out, block=block: self._mac_attention(block, args[0], out)))

    def _memory(self, memory: NeuralMemory, args: tuple) -> None:
        x, state = args[0], args[1] if len(args) > 1 else None
        q, k, _, _ = memory.project(x, None if state is None else state.conv)
        theta, _, _ = memory.gates(x)
        for name, t in (("q", q), ("k", k), ("theta", theta)):
            self.calls.setdefault((id(memory), name), []).append(t)

    def _mac_query(self, block: MACBlock, out: Tensor) -> None:
        q = F.normalize(out.view(*out.shape[:2], -1, block.memory.head_dim), dim=-1)
        self.calls.setdefault((id(block.memory), "h q"), []).append(q)

    def _mac_attention(self, block: MACBlock, x: Tensor, y: Tensor) -> None:
        if id(block.memory) not in self.attention_ratio:  # the first segment holds the pairs
            ratio = y.norm(dim=-1) / x.norm(dim=-1)
            self.attention_ratio[id(block.memory)] = ratio[:, : PAIRS * PAIR_LEN].mean().item()

    def get(self, memory: NeuralMemory, name: str) -> Tensor | None:
        parts = self.calls.get((id(memory), name))
        return None if parts is None else torch.cat(parts, dim=1)


def asked_pair(batch: synthetic.TaskBatch) -> Tensor:
    """Index of the pair whose key the first question asks (keys are distinct within a sample)."""
    rows = torch.arange(batch.tokens.shape[0])
    question = batch.tokens[rows[:, None], batch.positions[:, :1] - torch.arange(synthetic.KEY_LEN, 0, -1)]
    keys = batch.tokens[:, : PAIRS * PAIR_LEN].view(-1, PAIRS, PAIR_LEN)[:, :, 1 : 1 + synthetic.KEY_LEN]
    return (keys == question[:, None]).all(-1).long().argmax(1)


def measure(model: LoadedModel, samples: int, batch_size: int, distance: int) -> list[dict]:
    space = synthetic.TokenSpace.for_vocab(model.vocab_size)
    recorder = Recorder(model)
    sums: dict[tuple[int, str], dict[str, list[Tensor]]] = {}
    ratios: dict[int, list[float]] = {}
    for i, start in enumerate(range(0, samples, batch_size)):
        recorder.calls.clear()
        recorder.attention_ratio.clear()
        batch = synthetic.mqar(min(batch_size, samples - start), distance, space, n_pairs=PAIRS, seed=i)
        rows = torch.arange(batch.tokens.shape[0])
        with torch.no_grad():
            model.logits(batch.tokens)
        asked, position = asked_pair(batch), batch.positions[:, 0]
        before = int(position[0])  # one distance per batch: every row asks at the same position
        for layer, memory in enumerate(recorder.memories):
            k, theta = recorder.get(memory, "k"), recorder.get(memory, "theta")
            key_cos = (k[:, VALUE_OFFSET] * k[:, PAIR_LEN + VALUE_OFFSET]).sum(-1)  # (B, H)
            end = PAIRS * PAIR_LEN + memory.conv_kernel - 1  # the conv carries the last pair past it
            bounds = [p * PAIR_LEN for p in range(PAIRS)] + [end]  # per pair: (B, P, H)
            reads = {kind: recorder.get(memory, kind) for kind in READ_OFFSETS}  # each gathered once
            for kind, offset in ((kind, o) for kind, offsets in READ_OFFSETS.items() for o in offsets):
                q = reads[kind]
                if q is None:
                    continue
                w = theta * torch.einsum("bhd,bthd->bth", q[rows, position + offset], k)  # (B, T, H)
                per_pair = torch.stack([w[:, lo:hi].sum(1) for lo, hi in zip(bounds, bounds[1:])], 1)
                mine, other = per_pair[rows, asked], per_pair[rows, 1 - asked]
                name = f"{kind} at {offset}" if offset else kind
                s = sums.setdefault((layer, name), {"head": [], "all": [], "mass": [], "cos": []})
                s["head"].append((mine > other).float())
                s["all"].append((mine.sum(-1) > other.sum(-1)).float())
                s["mass"].append(w[:, :end].abs().sum(1) / w[:, :before].abs().sum(1))
                s["cos"].append(key_cos)
            if id(memory) in recorder.attention_ratio:
                ratios.setdefault(layer, []).append(recorder.attention_ratio[id(memory)])
    for handle in recorder.handles:
        handle.remove()
    rows_out = []
    for (layer, kind), s in sums.items():
        mean = {name: torch.cat(parts).mean(0) for name, parts in s.items()}
        row = {"memory": layer, "query": kind, "addressing": mean["all"].item(),
               "addressing by head": mean["head"].tolist(), "pair mass by head": mean["mass"].tolist(),
               "key cos by head": mean["cos"].tolist()}
        if layer in ratios:
            row["|y|/|x|"] = sum(ratios[layer]) / len(ratios[layer])
        rows_out.append(row)
    return rows_out


def accuracy_without_segment_read(model: LoadedModel, samples: int, batch_size: int, distance: int
                                  ) -> dict[str, float]:
    """MQAR with every MAC block's retrieved tokens `h` zeroed: what the gate's read alone recalls."""
    def zero_h(module, args, kwargs):
        if kwargs.get("memory_tokens") is not None:
            kwargs["memory_tokens"] = torch.zeros_like(kwargs["memory_tokens"])
        return args, kwargs

    handles = [b.attn.register_forward_pre_hook(zero_h, with_kwargs=True)
               for b in model.model.modules() if isinstance(b, MACBlock)]
    try:
        return task_accuracy(model, "mqar", distance, samples, batch_size, n_pairs=PAIRS)
    finally:
        for handle in handles:
            handle.remove()


def rounded(values: list[float]) -> str:
    return " / ".join(f"{v:.2f}" for v in values)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/mqar_addressing.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="run directories (their latest checkpoint) or step_N dirs")
    p.add_argument("--distance", type=float, default=8, help="filler, in multiples of the attention span")
    p.add_argument("--samples", type=int, default=128, help="MQAR samples (one first question each)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("| checkpoint | step | memory | query | addressing, all heads | by head | pair mass by head "
          "| key cos at the value by head | MAC \\|y\\|/\\|x\\| |")
    print("|---|---:|---:|---|---:|---|---|---|---:|")
    ablations = []
    for path in args.checkpoints:
        model = load_model(path)
        distance = int(args.distance * model.attention_span)
        for r in measure(model, args.samples, args.batch_size, distance):
            ratio = f"{r['|y|/|x|']:.2f}" if "|y|/|x|" in r else ""
            print(f"| {path} | {model.step} | {r['memory']} | {r['query']} | {r['addressing']:.2f} | "
                  f"{rounded(r['addressing by head'])} | {rounded(r['pair mass by head'])} | "
                  f"{rounded(r['key cos by head'])} | {ratio} |", flush=True)
        if "mac" in model.config.layer_kinds:
            whole = task_accuracy(model, "mqar", distance, args.samples, args.batch_size, n_pairs=PAIRS)
            cut = accuracy_without_segment_read(model, args.samples, args.batch_size, distance)
            ablations.append((path, whole, cut))
    if ablations:
        print("\n| checkpoint | mqar (first / second question) | with the segment read h zeroed |")
        print("|---|---|---|")
        for path, whole, cut in ablations:
            print(f"| {path} | {whole['accuracy']:.3f} ({rounded(whole['by_question'])}) | "
                  f"{cut['accuracy']:.3f} ({rounded(cut['by_question'])}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
