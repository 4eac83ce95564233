"""One rank of the tensor-parallel cases in tests/test_linear_cross_entropy.py (tests/launcher.py, tp=2).

    python tests/vocab_split_worker.py spec.json

Each job builds the same float64 head (an odd vocabulary, padded to a multiple of tp) on every rank,
splits it by vocabulary rows as `parallel.tensor.parallelize_vocab` does, and computes the loss sum and its
gradients three ways: the dense head on the whole vocabulary (the reference), the fused loss over the
split head, and the checkpointed loss through the split head and megatron's vocab-parallel cross-entropy.
Rank 0 writes, per job, the largest differences from the reference. Ends with a barrier and `os._exit`.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def differences(job: dict, mesh) -> dict[str, float]:
    from parallel.tensor import (
        TensorShard,
        VocabParallelCrossEntropy,
        _pad_rows,
        padded_vocab,
        vocab_parallel_head,
    )
    from pretrain.loss import head_loss_sum

    n, dim, vocab = 23, 8, job["vocab"]
    torch.manual_seed(0)
    dense = nn.Linear(dim, vocab, bias=False, dtype=torch.float64)
    features = torch.randn(n, dim, dtype=torch.float64)
    targets = torch.randint(vocab, (n,))
    targets[[3, 11]] = -100
    targets[5] = vocab - 1  # the last real row, beside the padding
    weights = torch.rand(n, dtype=torch.float64) * 3 if job["weighted"] else None

    x = features.clone().requires_grad_()
    ce = F.cross_entropy(dense(x), targets, reduction="none")
    want_loss = ce.sum() if weights is None else (ce * weights).sum()
    (want_loss * 0.37).backward()  # a scale other than one flows back
    want_x_grad = x.grad
    shard = TensorShard(mesh.tp_group, mesh.tp_rank, mesh.layout.tp)
    padded = padded_vocab(vocab, shard.size)
    rows = slice(shard.rank * padded // shard.size, (shard.rank + 1) * padded // shard.size)
    want_weight_grad = _pad_rows(dense.weight.grad, padded)[rows]  # the padding rows: no gradient

    head = vocab_parallel_head(copy.deepcopy(dense), vocab, shard)
    cross_entropy = VocabParallelCrossEntropy(vocab, shard)
    out = {}
    for path in ("fused", "checkpointed"):  # a forward hook makes the head unfusable
        hook = head.register_forward_pre_hook(lambda *_: None) if path == "checkpointed" else None
        if (cross_entropy.split_of(head) is None) != (path == "checkpointed"):
            raise AssertionError(f"{path}: split_of gave {cross_entropy.split_of(head)}")
        head.weight.grad = None
        x = features.clone().requires_grad_()
        loss = head_loss_sum(x, head, targets, weights, cross_entropy, chunk_tokens=job["chunk_tokens"])
        (loss * 0.37).backward()
        out[path] = max((loss.detach() - want_loss.detach()).abs().item(),
                        (x.grad - want_x_grad).abs().max().item(),
                        (head.weight.grad - want_weight_grad).abs().max().item())
        if hook:
            hook.remove()
    return out


def main() -> None:
    from launcher import serve_jobs

    from parallel.mesh import init_mesh

    serve_jobs(sys.argv[1], init_mesh(tp=int(os.environ["WORLD_SIZE"])), differences)


if __name__ == "__main__":
    main()
