"""Sequence parallelism is exact: in float64, the loss and every parameter's gradient summed over sp ranks
equal the single-process run on the whole sequence, for every block the relay runs, at sp = 2 and 4, and
with the memory's gradient horizon cutting inside a shard and at a shard's start.

(The fp32 training comparisons in test_parallel.py then only see rounding, amplified by Adam.)
Each launch spawns gloo ranks with a deadline; a hang fails with the rank's exit codes.
"""

from __future__ import annotations

import os
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from launcher import free_port

from pretrain.loss import head_loss_sum, token_cross_entropy
from titans.model import TitansConfig, TitansLM

DEADLINE_S = 120
LOSS = partial(head_loss_sum, cross_entropy=token_cross_entropy)


def model(kind: str, horizon: int | None = None) -> TitansLM:
    """A two-layer float64 model; 64 tokens are 8 memory chunks, so `horizon` < 8 cuts the state's
    gradient inside the sequence."""
    torch.manual_seed(0)
    cfg = TitansConfig(vocab_size=257, dim=32, n_layers=2, n_heads=2, layers=kind, window=8, segment_len=16,
                       memory_chunk=8, n_persistent=2, mac_memory_tokens=0, memory_grad_horizon=horizon)
    return TitansLM(cfg).double()


def rank_main(rank: int, world: int, port: int, kind: str, horizon: int | None, checkpointed: bool,
              zigzag: bool, tokens: torch.Tensor, out: str) -> None:
    import torch.distributed as dist

    from parallel.mesh import init_mesh
    from parallel.sequence import SequenceLoss, shard_of

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    mesh = init_mesh(sp=world, timeout_s=DEADLINE_S)
    m = model(kind, horizon)
    m.checkpoint_blocks = checkpointed  # each half reruns in backward; full attention's halo is sent again
    inputs, targets = shard_of(tokens[:, :-1], mesh, zigzag), shard_of(tokens[:, 1:], mesh, zigzag)
    shard_loss = SequenceLoss(m, mesh, LOSS, zigzag)
    loss = shard_loss(inputs, targets, None, tokens[:, 1:].numel())
    loss.backward()
    shard_loss.shards.finish_sends()
    loss = loss.detach()
    dist.all_reduce(loss)
    grads = {}
    for name, p in m.named_parameters():
        grads[name] = p.grad if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(grads[name])
    if rank == 0:
        torch.save((loss, grads), out)
    dist.barrier()
    # Exit without interpreter teardown: gloo can abort ("terminate called without an active exception")
    # in its destructors after the work is done, as tests/train_worker.py notes.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# (kind, sp, gradient horizon in chunks, activation checkpointing, zigzag split): at sp 2 a shard is 4
# chunks, so horizon 3 cuts inside both shards (and inside a MAC segment of 2 chunks), horizon 2 at sp 4 at
# every shard's start. Zigzag: attention alone, each rank two of 2·sp pieces.
CASES = [(kind, 2, None, False, False) for kind in ("lmm", "mac", "mag", "mal", "swa", "full")] + [
    ("mac,mal", 4, None, False, False), ("mac,mag", 2, 3, False, False), ("lmm,mal", 4, 2, False, False),
    ("full,mal", 4, None, False, False), ("mac,mal", 4, None, True, False),
    ("full,mal", 4, None, True, False), ("full", 2, None, True, False),
    ("full", 2, None, False, True), ("full,swa", 4, None, False, True), ("swa,full", 4, None, True, True),
    ("swa,full", 8, None, False, True)]  # pieces of 4 rows: the window's 7 earlier rows span two


@pytest.mark.parametrize("kind, world, horizon, checkpointed, zigzag", CASES)
def test_float64_gradients_equal_one_process(kind: str, world: int, horizon: int | None, checkpointed: bool,
                                             zigzag: bool, tmp_path: Path) -> None:
    tokens = torch.randint(0, 257, (2, 65), generator=torch.Generator().manual_seed(1))
    reference = model(kind, horizon)
    features, _ = reference.hidden_states(tokens[:, :-1])
    want_loss = LOSS(features, reference.head, tokens[:, 1:], None) / tokens[:, 1:].numel()
    want_loss.backward()

    out = tmp_path / "result.pt"
    ctx = mp.get_context("spawn")
    port = free_port()
    args = (world, port, kind, horizon, checkpointed, zigzag, tokens, str(out))
    ranks = [ctx.Process(target=rank_main, args=(r, *args)) for r in range(world)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(DEADLINE_S)
    alive = [p.pid for p in ranks if p.is_alive()]
    for p in ranks:
        p.kill()
    assert not alive and all(p.exitcode == 0 for p in ranks), \
        f"ranks past the deadline: {alive}, exit codes {[p.exitcode for p in ranks]}"
    loss, grads = torch.load(out)
    # the cross-entropy runs in float32 by design (pretrain/loss.py): its sums round differently
    torch.testing.assert_close(loss, want_loss.detach(), rtol=1e-6, atol=0)
    for name, p in reference.named_parameters():
        error = (grads[name] - p.grad).norm() / p.grad.norm().clamp_min(1e-300)
        assert error <= 1e-12, (name, error.item())
