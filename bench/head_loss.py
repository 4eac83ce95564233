"""The head's loss fused (gradients in forward) against the checkpointed loss that recomputes the head.

    python bench/head_loss.py --threads 1                      # the loss alone, then SWA and MAC steps
    python bench/head_loss.py --variants swa mac lmm --repeats 5
    python bench/head_loss.py --threads 1 --tp 2 --variants    # the loss alone over a head split by tp

Both paths run in one process, in the same rounds (`model_throughput.measure_rounds`), on the same model
and tokens: the checkpointed one is what `pretrain.loss.head_loss_sum` falls back to for a head with
forward hooks, so a no-op hook selects it. Table 1: the head and its loss alone (features of
`--seq × --batch` tokens → loss → backward). Table 2: a whole training step of each variant at
`bench/model_throughput.py`'s config (dim 256, 4 layers, window = segment `--window`, memory kernel
`--kernel`). Medians after one warm-up step each. With `--tp N`, table 1 runs in N processes (gloo), each
holding 1/N of the head's vocabulary rows, against the checkpointed vocab-parallel path (megatron's
cross-entropy); the step tables are single-process.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from model_throughput import Entry, LossFn, bench_config, git_revision, measure_rounds, ours_loss  # noqa: E402

from parallel.mesh import init_mesh  # noqa: E402
from parallel.tensor import TensorShard, VocabParallelCrossEntropy, vocab_parallel_head  # noqa: E402
from pretrain.loss import head_loss_sum, token_cross_entropy  # noqa: E402
from titans.memory import CHUNK_STEPS  # noqa: E402
from titans.model import TitansLM  # noqa: E402


@contextlib.contextmanager
def checkpointed(head: nn.Module, enabled: bool) -> Iterator[None]:
    """Make `head` take the checkpointed loss: a forward hook marks it unfusable."""
    hook = head.register_forward_pre_hook(lambda *_: None) if enabled else None
    try:
        yield
    finally:
        if hook is not None:
            hook.remove()


def fused_and_plain(model: nn.Module, head: nn.Module, loss: LossFn, args: argparse.Namespace
                    ) -> dict[str, float]:
    """Median seconds of a training step of `model` (`loss` of the batch's tokens, then backward) with the
    fused and with the checkpointed loss, timed in the same rounds."""
    def through(plain: bool) -> Entry:
        def loss_fn(tokens: Tensor) -> Tensor:
            with checkpointed(head, plain):
                return loss(tokens)
        return model, loss_fn, False

    results, _ = measure_rounds([through(False), through(True)], args.batch, args.seq, args.vocab,
                                args.repeats, torch.device("cpu"))
    return {"fused": results[0][0], "checkpointed": results[1][0]}


def row(name: str, seconds: dict[str, float]) -> str:
    fused, plain = seconds["fused"], seconds["checkpointed"]
    return f"| {name} | {plain:.3f} | {fused:.3f} | {plain / fused:.2f} |"


def head_alone(rank: int, args: argparse.Namespace, port: int) -> None:
    """Table 1's row: the head and its loss alone, on this process's share of the head (all of it
    without tp; with tp, rank `rank` of `args.tp`, its vocabulary rows, split as a tp run splits them)."""
    torch.manual_seed(0)
    head = nn.Linear(256, args.vocab, bias=False)
    features = torch.randn(args.batch * args.seq, 256, requires_grad=True)
    targets = torch.randint(args.vocab, (args.batch * args.seq,))
    cross_entropy, name = token_cross_entropy, "head + loss alone"
    if args.tp > 1:
        if args.threads:
            torch.set_num_threads(args.threads)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(args.tp), LOCAL_RANK=str(rank),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        mesh = init_mesh(tp=args.tp)
        shard = TensorShard(mesh.tp_group, mesh.tp_rank, args.tp)
        head = vocab_parallel_head(head, args.vocab, shard)
        cross_entropy, name = VocabParallelCrossEntropy(args.vocab, shard), f"{name}, tp={args.tp}"
    seconds = fused_and_plain(head, head, lambda _: head_loss_sum(features, head, targets,
                                                                  cross_entropy=cross_entropy), args)
    if rank == 0:
        print(row(name, seconds), flush=True)
    if args.tp > 1:
        mesh.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="*", default=["swa", "mac"])
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--window", "--segment", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--kernel", choices=CHUNK_STEPS, default="torch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--tp", type=int, default=1, help="table 1 over a head split by N processes")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config_args = argparse.Namespace(vocab=args.vocab, window=args.window, chunk=64, no_recompute=False,
                                     mac_memory_tokens=0, kernel=args.kernel)
    print(f"# command: python {shlex.join(sys.argv)}  (commit {git_revision()})")
    print(f"# torch {torch.__version__}, threads {torch.get_num_threads()}, {args.batch} × {args.seq} "
          f"tokens, vocab {args.vocab}, window {args.window}, kernel {args.kernel}, median of {args.repeats}")
    print("\n| what | checkpointed s | fused s | speedup |\n|---|---:|---:|---:|")
    if args.tp > 1:
        port = 29500 + os.getpid() % 1000
        torch.multiprocessing.spawn(head_alone, (args, port), nprocs=args.tp)
    else:
        head_alone(0, args, 0)
    for variant in args.variants:
        torch.manual_seed(0)
        model = TitansLM(bench_config(variant, config_args))
        print(row(f"{variant} training step", fused_and_plain(model, model.head, ours_loss(model), args)),
              flush=True)

if __name__ == "__main__":
    main()
