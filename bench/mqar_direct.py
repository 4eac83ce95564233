"""MQAR trained directly: can a model of a given shape learn multi-query associative recall at all, and how
fast? No text, no 2,048-token rows: every step is a batch of short MQAR sequences (`pretrain.synthetic.mqar`,
distance drawn log-uniformly per step), trained on the answers only; accuracy at 2× and 8× the window is
printed every `--every` steps (64 held-out sequences each, chance 0.10).

    python bench/mqar_direct.py                                   # compare_long's LMM shape, 4 pairs
    python bench/mqar_direct.py --pairs 2 --min-distance 16 --steps 600
    python bench/mqar_direct.py --pairs 2 --min-distance 16 --prefix 256     # pairs after filler
    python bench/mqar_direct.py --layers mac --n-layers 1 --chunk 8 --window 16 --pairs 1 \\
        --min-distance 16 --max-distance 64 --batch 32 --steps 100   # the needle test's shape

Isolates the recall task from the long-context recipe (`bench/compare_long.py`), where it is one or a few
rows of a 4 × 2,048 batch: a few minutes per probe on one CPU thread instead of half an hour.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain import synthetic  # noqa: E402
from pretrain.evaluate import fractions  # noqa: E402
from titans.model import TitansConfig, TitansLM  # noqa: E402


def with_prefix(batch: synthetic.TaskBatch, most: int, align: int, space: synthetic.TokenSpace, seed: int
                ) -> synthetic.TaskBatch:
    """The batch with 0..most-1 filler tokens (a multiple of `align`) before each sequence's instance
    and the rest of `most - 1` after it, so the sequences keep one length."""
    gen = torch.Generator().manual_seed(seed)
    B, T = batch.tokens.shape
    offsets = torch.randint(most, (B,), generator=gen) // align * align
    tokens = torch.tensor(space.filler)[torch.randint(len(space.filler), (B, T + most - 1), generator=gen)]
    for b in range(B):
        tokens[b, int(offsets[b]) : int(offsets[b]) + T] = batch.tokens[b]
    return synthetic.TaskBatch(tokens, batch.positions + offsets[:, None], batch.answers)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/mqar_direct.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default="lmm", help="block kind (mac, mag, mal, lmm, swa)")
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--chunk", type=int, default=16, help="memory chunk")
    p.add_argument("--window", type=int, default=64, help="attention window = MAC segment")
    p.add_argument("--ffn", type=int, default=256, help="FFN width")
    p.add_argument("--horizon", default="16", help="memory gradient horizon in chunks, or null (exact)")
    p.add_argument("--theta-max", type=float, default=None,
                   help="the memory's largest inner lr (model.memory_theta_max; default 1/chunk)")
    p.add_argument("--pairs", type=int, default=4, help="key-value pairs per sequence")
    p.add_argument("--questions", type=int, default=None, help="keys asked per training instance (default "
                   "all; fewer: the last answer cannot be had by elimination); evaluation asks all")
    p.add_argument("--min-distance", type=int, default=64, help="tokens between the last pair and the "
                   "first question, drawn log-uniformly per step from this ...")
    p.add_argument("--max-distance", type=int, default=512, help="... to this")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--packed", type=int, default=0, help="N > 0: train on rows of N tokens holding instances "
                   "back to back (the training mix's data.synthetic_pack), --batch rows per step")
    p.add_argument("--prefix", type=int, default=0, help="N > 0: each training sequence starts with 0..N-1 "
                   "filler tokens (random per sequence) before its instance, so the pairs are written onto a "
                   "memory that has already taken writes; evaluation starts at the pairs")
    p.add_argument("--prefix-align", type=int, default=1, help="round the prefix down to a multiple of this "
                   "(the memory chunk: pairs start on a chunk boundary)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--every", type=int, default=25, help="evaluate every this many steps")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    if a.prefix and a.packed:
        p.error("--prefix puts filler before a sequence's one instance; --packed rows hold several")

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    cfg = TitansConfig(vocab_size=257, dim=64, n_layers=a.n_layers, n_heads=4, layers=a.layers,
                       window=a.window, segment_len=a.window, n_persistent=4, memory_chunk=a.chunk,
                       memory_depth=2, ffn_hidden=a.ffn, memory_theta_max=a.theta_max,
                       memory_grad_horizon=None if a.horizon == "null" else int(a.horizon))
    model = TitansLM(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
    space = synthetic.TokenSpace.for_vocab(257)
    rng = random.Random(a.seed)

    def answer_logits(batch: synthetic.TaskBatch) -> torch.Tensor:
        pad = (-batch.tokens.shape[1]) % a.window  # MAC: whole segments (the padding follows every answer)
        tokens = torch.cat([batch.tokens, batch.tokens[:, :pad]], 1)
        logits, _ = model(tokens)
        return logits.gather(1, batch.positions.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))

    @torch.no_grad()
    def accuracy(distance: int) -> str:
        """Accuracy at `distance`, and by the order the questions were asked when there are several."""
        model.eval()
        test = synthetic.mqar(64, distance, space, n_pairs=a.pairs, seed=10**6)
        hits = synthetic.accuracy(answer_logits(test), test.answers).float()
        by_question = fractions(hits.mean(0).tolist()) if a.pairs > 1 else ""
        result = f"{hits.mean().item():.3f}" + (f" ({by_question})" if by_question else "")
        model.train()
        return result

    started = time.perf_counter()
    for step in range(1, a.steps + 1):
        if a.packed:
            tokens, answers = synthetic.training_rows("mqar", a.batch, a.packed + 1, space, seed=step,
                                                      min_distance=a.min_distance, n_pairs=a.pairs,
                                                      max_distance=a.max_distance, pack=True,
                                                      questions=a.questions)
            logits, _ = model(tokens[:, :-1])
            loss = F.cross_entropy(logits[answers], tokens[:, 1:][answers])
        else:
            distance = int(math.exp(rng.uniform(math.log(a.min_distance), math.log(a.max_distance))))
            batch = synthetic.mqar(a.batch, distance, space, n_pairs=a.pairs, seed=step,
                                   questions=a.questions)
            if a.prefix:
                batch = with_prefix(batch, a.prefix, a.prefix_align, space, seed=step)
            loss = F.cross_entropy(answer_logits(batch).flatten(0, 1), batch.answers.flatten())
        optimizer.zero_grad()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if torch.isfinite(norm):
            optimizer.step()
        if step % a.every == 0 or step == a.steps:
            print(f"step {step} loss {loss.item():.3f} grad norm {norm:.2g} "
                  f"mqar 2× {accuracy(2 * a.window)} 8× {accuracy(8 * a.window)} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
