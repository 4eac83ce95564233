"""Sequence parallelism: one sequence split over sp ranks, the long-term memory's state relayed exactly.

    shard_loss = SequenceLoss(model, mesh, loss_sum)
    loss = shard_loss(tokens_shard, targets_shard, weights_shard, denominator)   # this shard's share
    loss.backward(); shard_loss.shards.finish_sends()   # then sum the gradients over sp

Each sp rank holds a contiguous shard of every sequence (a multiple of the memory chunk and of MAC's
segment). Layer by layer, rank r receives the memory state (weights M, momentum S and the conv
history) at its shard's start from rank r − 1, runs its chunks from that state, and sends its end state
on to r + 1: the state API's contract (feeding a sequence in pieces with the carried state equals
feeding it whole) makes this exact. Sends are non-blocking, so rank r starts layer l as soon as r − 1
has finished it (a wavefront: L layers on P ranks take about (L + P − 1)/L of one shard's time).

The backward runs the same relay in reverse, layer by layer, with explicit `torch.autograd.backward`
calls between detached layer boundaries: rank r backpropagates layer l once it has the gradient of its
end state from r + 1, then sends the gradient of its start state to r − 1. The point-to-point traffic
per layer is the memory's size, independent of the sequence length.

Which blocks: LMM and MAC, whose only link across a shard boundary is the memory state (MAC's
attention stays inside its segment, segments align with shards), and SWA, MAG and MAL, whose
sliding-window attention also reads a halo: the previous shard's last w − 1 attention inputs, sent
forward with the state, their gradient sent back into that shard's backward of the same layer. The
halo is exchanged between `Block.before_halo` and `Block.after_halo`: at the block input for SWA and
MAG, after the memory layer for MAL (whose attention reads the memory layer's output). Full causal
attention reads every earlier row: every shard sends its attention inputs to every later shard
directly (one hop, each link carrying one shard's rows), so rank r receives r shards' inputs and
projects their keys and values, never their queries. Rank r does r + 1 shards' attention, as in context
parallelism without load balancing: contiguous shards are what the memory's relay needs. A checkpointed
full-attention layer keeps none of the rows it received: its senders send them again as their backward
starts, and its half after the halo reruns on them (`LayerRecord.rerun`), one layer's at a time.

Load balancing (`parallel.sp_split=zigzag`, the default for models of attention layers alone: there is no
memory to relay): causal attention over contiguous shards gives the last rank 2·sp − 1 times the first's
work, so each rank holds two of 2·sp equal pieces instead, an early and a late one (r and 2·sp − 1 − r:
every rank the same attention work, as Megatron's and torchtitan's context parallelism). A late piece
reads nearly the whole sequence, so each full-attention layer all-gathers every rank's pieces' keys and
values over the sp group (a sliding-window layer those of the last w − 1 rows of each piece; backward:
their gradients reduce-scattered back to their owners), every rank then runs its two pieces over the keys
before each. Autograd and activation checkpointing see plain differentiable collectives: no relay.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.distributed as torch_dist
from torch import Tensor, nn
from torch.distributed import all_gather_single, reduce_scatter_single
from torch.utils.checkpoint import checkpoint

from parallel.mesh import Mesh
from parallel.pipeline import HeadLossSum
from titans.attention import KeyValues
from titans.blocks import Block, earlier_rows_read
from titans.memory import MemoryState
from titans.model import TitansLM

BACKWARD_TAG = 1 << 20
SP_SPLITS = ("auto", "contiguous", "zigzag")
ATTENTION_ONLY = frozenset({"full", "swa"})  # the block kinds a zigzag split can run: no memory to relay


def zigzag_split(kinds: list[str], setting: str) -> bool:
    """Whether sequence shards are zigzag pieces (`parallel.sp_split`): "auto" where every layer is attention
    and one is full (sliding windows alone cost every shard the same over contiguous shards, with a halo of
    w − 1 rows instead of a whole sequence's), else contiguous; the config check refuses "zigzag" for memory
    layers."""
    if setting == "auto":
        return set(kinds) <= ATTENTION_ONLY and "full" in kinds
    return setting == "zigzag"


def zigzag_pieces(sp: int, rank: int) -> tuple[int, int]:
    """The two of 2·sp equal pieces of a sequence that sp rank `rank` holds under a zigzag split: one early,
    one late, so that every rank's causal attention covers the same number of rows."""
    return rank, 2 * sp - 1 - rank


def zigzag_owner(sp: int, piece: int) -> tuple[int, int]:
    """Which sp rank holds zigzag piece `piece`, and whether as its early (0) or late (1) one."""
    return (piece, 0) if piece < sp else (2 * sp - 1 - piece, 1)


def state_from(tensors: list[Tensor], depth: int, chunks: int) -> MemoryState:
    """The state a shard starts from; `chunks`: the global index of its first chunk (the gradient
    horizon's cuts fall on the same chunks as in one process)."""
    conv = tensors[2 * depth] if len(tensors) > 2 * depth else None
    return MemoryState(list(tensors[:depth]), list(tensors[depth : 2 * depth]), conv, chunks)


def state_template(model: TitansLM, layer: str, batch: int, device: torch.device) -> list[Tensor]:
    """Empty buffers shaped like layer `layer`'s memory state on this rank (its local heads)."""
    memory = model.blocks[layer].memory
    weights = [torch.empty(batch, *w.shape, dtype=memory.state_dtype(), device=device)
               for w in memory.init_weights]
    heads = memory.init_weights[0].shape[0]
    conv = torch.empty(batch, memory.conv_kernel - 1, 3 * heads * memory.head_dim, dtype=memory.state_dtype(),
                       device=device)
    return [*weights, *[torch.empty_like(w) for w in weights], conv]


def joined(rows: list[Tensor]) -> Tensor | None:
    """Earlier shards' rows in sequence order, as one tensor (None: there are none)."""
    return (torch.cat(rows, dim=1) if len(rows) > 1 else rows[0]) if rows else None


def called(function: Callable, *args: Any) -> Any:
    return function(*args)


def checkpointed(function: Callable, *args: Any) -> Any:
    return checkpoint(function, *args, use_reentrant=False)


class LayerRecord(NamedTuple):
    """What a layer's backward under the relay needs: its input leaf and output, the incoming state leaves
    and the outgoing state, the received halo leaves with their senders (`pasts`; empty when `rerun`) and
    the senders, the rows sent as halo with their receivers, and, for checkpointed full attention, that
    the halo is sent again in backward and what the half after it reruns on there: (h, state, start)."""

    name: str
    input: Tensor
    output: Tensor
    incoming: list[Tensor] | None
    outgoing: list[Tensor]
    pasts: list[tuple[int, Tensor]]
    sources: list[int]
    sent: Tensor | None
    dests: list[int]
    again: bool  # checkpointed full attention: its halo is sent again in backward
    rerun: tuple[Tensor, MemoryState | None, int] | None


class SequenceShards:
    """Runs this rank's shard of a batch through a (pp = 1) TitansLM with the state relay."""

    def __init__(self, model: TitansLM, mesh: Mesh, zigzag: bool = False) -> None:
        self.model, self.mesh, self.zigzag = model, mesh, zigzag
        self.prev, self.next = mesh.sp_neighbour(-1), mesh.sp_neighbour(+1)
        self.pending: list = []  # outstanding sends: their buffers must live until they complete
        self.bytes_sent = 0  # point-to-point traffic of this rank (benchmarks read it)
        self.wait_s = 0.0  # seconds in receives and collectives: moving rows, waiting for peers (benchmarks)

    def _send(self, tensors: list[Tensor], tag: int, dest: int | None = None) -> None:
        """Non-blocking sends to `dest`, by default the next shard forward and the previous backward."""
        if dest is None:
            dest = self.next if tag < BACKWARD_TAG else self.prev
        for i, t in enumerate(tensors):
            if t.numel():
                buf = t.detach().contiguous()
                self.bytes_sent += buf.numel() * buf.element_size()
                self.pending.append((torch_dist.isend(buf, dest, tag=tag + i), buf))

    def _recv(self, buffers: list[Tensor], tag: int, source: int) -> list[Tensor]:
        started = time.perf_counter()
        works = [torch_dist.irecv(b, source, tag=tag + i) for i, b in enumerate(buffers) if b.numel()]
        for w in works:
            w.wait()
        self.wait_s += time.perf_counter() - started
        return buffers

    def finish_sends(self) -> None:
        for work, _ in self.pending:
            work.wait()
        self.pending.clear()

    def halo_peers(self, name: str) -> tuple[list[int], list[int], bool]:
        """Who sends block `name`'s attention halo to this shard and who gets this shard's, in sequence
        order, and whether the halo is whole shards (full attention: every earlier shard sends all its
        rows, directly, so a shard waits one hop and not a chain) or the last w − 1 rows of the previous
        shard (sliding-window attention). Nobody for blocks without attention across the boundary."""
        rows, sp = earlier_rows_read(self.model.cfg.layer_kinds[int(name)], self.model.cfg), self.mesh.sp_rank
        if rows is None:
            return ([self.mesh.sp_neighbour(j - sp) for j in range(sp)],
                    [self.mesh.sp_neighbour(j - sp) for j in range(sp + 1, self.mesh.layout.sp)], True)
        if not rows:
            return [], [], False
        return [r for r in (self.prev,) if r is not None], [r for r in (self.next,) if r is not None], False

    def forward_blocks(self, x: Tensor, grad: bool) -> tuple[Tensor, list[LayerRecord]]:
        """This shard through the blocks with the relay; returns the last block's output and, when `grad`,
        what the backward needs per layer (`LayerRecord`). Tags follow the blocks' global names, so the
        stages of a pipeline never mix their messages."""
        records = []
        every = int(self.model.checkpoint_blocks) if grad else 0  # train.activation_checkpointing(_every)
        for name, block in self.model.blocks.items():
            # checkpointed: each half keeps its inputs only and reruns in backward; the relay's sends and
            # receives sit between the halves, so a rerun never sends again
            run = checkpointed if every and int(name) % every == 0 else called
            x_in = x.detach().requires_grad_(grad)
            tag = int(name) * 64
            sources, dests, whole = self.halo_peers(name)
            # checkpointed full attention keeps none of the earlier shards' rows it reads: their senders
            # send them again in backward, where the half after the halo reruns (one layer's at a time)
            again = whole and run is checkpointed
            incoming = None
            if self.prev is not None and block.has_memory:
                incoming = self._recv(state_template(self.model, name, x.shape[0], x.device), tag, self.prev)
                for t in incoming:
                    t.requires_grad_(grad)
            start, state = self.mesh.sp_rank * x.shape[1], None
            if incoming is not None:
                state = state_from(incoming, block.memory.depth, start // block.memory.chunk_size)
            h, state = run(block.before_halo, x_in, state)
            rows = h.shape[1] if whole else self.model.cfg.window - 1
            sent = (h if whole else h[:, -rows:]) if dests else None  # what later shards' attention reads
            for dest in dests:
                self._send([sent], tag + 63, dest)
            pasts = [(source, self._recv([h.new_empty(h.shape[0], rows, h.shape[2])], tag + 63, source)[0]
                      .requires_grad_(grad and not again)) for source in sources]  # the rows attention reads
            past = joined([p for _, p in pasts])
            rerun = (h, state, start) if again and sources else None
            if rerun:
                with torch.no_grad():
                    x, out_state = block.after_halo(h, state, past, start)
            else:
                x, out_state = run(block.after_halo, h, state, past, start)
            outgoing = out_state.tensors() if out_state is not None else []
            if self.next is not None:
                self._send(outgoing, tag)
            records.append(LayerRecord(name, x_in, x, incoming, outgoing, [] if rerun else pasts, sources,
                                       sent, dests, again, rerun))
        return x, records

    def zigzag_blocks(self, x: Tensor) -> Tensor:
        """This rank's two zigzag pieces x (B, 2n, dim) through the blocks (attention alone): each layer
        gathers every rank's pieces' keys and values, then runs each piece over the rows before it."""
        sp, n = self.mesh.layout.sp, x.shape[1] // 2
        early, late = zigzag_pieces(sp, self.mesh.sp_rank)
        every = int(self.model.checkpoint_blocks) if torch.is_grad_enabled() else 0

        def layer(block: Block, reach: int | None, x: Tensor) -> Tensor:
            h = block.before_halo(x, None)[0]
            return block.after_halo_pieces(h, [early * n, late * n],
                                           lambda own: zigzag_pasts(own, self, (early, late), reach))

        for name, block in self.model.blocks.items():
            run = checkpointed if every and int(name) % every == 0 else called
            x = run(layer, block, earlier_rows_read(self.model.cfg.layer_kinds[int(name)], self.model.cfg), x)
        return x

    def backward_blocks(self, grad_out: Tensor, records: list[LayerRecord]) -> Tensor:
        """The relay in reverse; adds the blocks' parameter gradients, returns the input's gradient."""
        for r in reversed(records):  # the rows later shards' reruns read, sent now: they wait for nothing
            for dest in r.dests if r.again else []:
                self._send([r.sent], BACKWARD_TAG + int(r.name) * 64 + 62, dest)
        grad_x = grad_out
        for r in reversed(records):
            tag = BACKWARD_TAG + int(r.name) * 64
            x_out, outgoing, pasts = r.output, r.outgoing, r.pasts
            if r.rerun is not None:  # the half after the halo again, on the earlier rows received again
                h, state, start = r.rerun
                pasts = [(source, self._recv([h.new_empty(h.shape)], tag + 62, source)[0].requires_grad_())
                         for source in r.sources]
                with torch.enable_grad():  # a backward runs without building graphs
                    past = joined([p for _, p in pasts])
                    x_out, out_state = self.model.blocks[r.name].after_halo(h, state, past, start)
                outgoing = out_state.tensors() if out_state is not None else []
            tensors, grads = [x_out], [grad_x]
            if self.next is not None and outgoing:  # our end state's gradient, from who continued it
                received = self._recv([torch.empty_like(t) for t in outgoing], tag, self.next)
                pairs = [(t, g) for t, g in zip(outgoing, received, strict=True) if t.requires_grad]
                tensors += [t for t, _ in pairs]
                grads += [g for _, g in pairs]
            if r.sent is not None:  # later shards' attention read our rows: the sum of their gradients
                tensors.append(r.sent)
                grads.append(sum(self._recv([torch.empty_like(r.sent)], tag + 63, dest)[0]
                                 for dest in r.dests))
            torch.autograd.backward(tensors, grads)
            if r.incoming is not None:
                self._send([t.grad if t.grad is not None else torch.zeros_like(t) for t in r.incoming], tag)
            for source, past in pasts:
                self._send([past.grad if past.grad is not None else torch.zeros_like(past)], tag + 63, source)
            grad_x = r.input.grad
        return grad_x


def shard_of(t: Tensor, mesh: Mesh, zigzag: bool = False) -> Tensor:
    """This sp rank's part of the sequence dimension (dim 1): a contiguous slice, or its two zigzag pieces
    one after the other."""
    if not zigzag:
        return t.chunk(mesh.layout.sp, dim=1)[mesh.sp_rank]
    pieces = t.chunk(2 * mesh.layout.sp, dim=1)
    return torch.cat([pieces[i] for i in zigzag_pieces(mesh.layout.sp, mesh.sp_rank)], dim=1)


class _GatheredRows(torch.autograd.Function):
    """Every sp rank's (B, n, dim) rows → (sp, B, n, dim); backward: each rank's rows' gradients summed
    over every rank that read them (a reduce-scatter). The collectives are the names imported above, not
    torch.distributed's attributes, which `parallel.fsdp.CollectiveBytes` replaces to count FSDP's alone."""

    @staticmethod
    def forward(ctx, rows: Tensor, group: Any, shards: SequenceShards) -> Tensor:  # type: ignore[override]
        ctx.group, ctx.shards, world = group, shards, torch_dist.get_world_size(group)
        shards.bytes_sent += (world - 1) * rows.numel() * rows.element_size()  # as if sent to each peer
        gathered, started = rows.new_empty(world * rows.shape[0], *rows.shape[1:]), time.perf_counter()
        all_gather_single(gathered, rows.contiguous(), group=group)
        shards.wait_s += time.perf_counter() - started
        return gathered.view(world, *rows.shape)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        mine = grad.new_empty(grad.shape[1:])
        ctx.shards.bytes_sent += (grad.shape[0] - 1) * mine.numel() * mine.element_size()
        started = time.perf_counter()
        reduce_scatter_single(mine, grad.flatten(0, 1).contiguous(), group=ctx.group)
        ctx.shards.wait_s += time.perf_counter() - started
        return mine, None, None


def zigzag_rows(t: Tensor, shards: SequenceShards, last: int | None = None) -> Callable[[int, int], Tensor]:
    """Gathers every sp rank's two zigzag pieces t (..., 2n, d), rows on the last-but-one dimension, or the
    `last` rows of each (a window's reach, at most a piece: all a sliding window reads across a piece's
    start); returns rows(first, end): the sequence's rows first .. end − 1 (..., end − first, d), a copy of
    the pieces they lie in only (a window's rows then keep no more of the gathered sequence alive)."""
    n, sp = t.shape[-2] // 2, shards.mesh.layout.sp
    kept = n if last is None else last
    sent = t if last is None else torch.cat([t[..., n - last : n, :], t[..., 2 * n - last :, :]], dim=-2)
    everyone = _GatheredRows.apply(sent, shards.mesh.sp_group, shards)

    def rows(first: int, end: int) -> Tensor:
        pieces = range(first // n, -(-end // n))
        start = pieces.start * n + n - kept  # the sequence position of the first row gathered of them
        if first < start or (kept < n and len(pieces) > 1):
            raise ValueError(f"rows {first}..{end - 1} were not gathered (the last {kept} of each piece)")
        joined = torch.cat([everyone[rank, ..., slot * kept : (slot + 1) * kept, :]
                            for rank, slot in (zigzag_owner(sp, piece) for piece in pieces)], dim=-2)
        return joined[..., first - start : end - start, :]

    return rows


def zigzag_pasts(own: KeyValues, shards: SequenceShards, pieces: tuple[int, int], reach: int | None
                 ) -> list[KeyValues | None]:
    """The keys and values before each of this rank's two zigzag `pieces` (early, late), whose own are `own`
    (B, H, 2n, d): every earlier row's (full attention, `reach` None) or the `reach` rows' before each."""
    n, (early, late) = own.k.shape[2] // 2, pieces
    # a window within a piece reads only the last rows of the piece before: gather those alone
    rows = zigzag_rows(torch.stack(own), shards, reach if reach is not None and reach <= n else None)
    first = [0 if reach is None else max(0, piece * n - reach) for piece in (early, late)]
    late_past = rows(first[1], late * n)
    if early == 0:
        early_past = None
    elif first[0] >= first[1]:  # within the late piece's rows (full attention): a view of them
        early_past = KeyValues(*late_past[..., first[0] - first[1] : early * n - first[1], :])
    else:
        early_past = KeyValues(*rows(first[0], early * n))
    return [early_past, KeyValues(*late_past)]


class _RelayedBlocks(torch.autograd.Function):
    """The blocks of a pipeline stage under sequence parallelism, as one autograd node: the pipeline
    schedule's backward reaches it and runs the relay's explicit backward (which adds the parameter
    gradients itself and returns the input's)."""

    @staticmethod
    def forward(ctx, shards: SequenceShards, x: Tensor) -> Tensor:  # type: ignore[override]
        with torch.enable_grad():
            top, records = shards.forward_blocks(x, grad=True)
        ctx.shards, ctx.records = shards, records
        return top.detach()

    @staticmethod
    def backward(ctx, grad_top: Tensor) -> tuple[None, Tensor]:  # type: ignore[override]
        grad_x = ctx.shards.backward_blocks(grad_top, ctx.records)
        ctx.records = None
        return None, grad_x


def relayed(shards: SequenceShards, x: Tensor) -> Tensor:
    """The blocks over this rank's shard `x` with the relay: in training one autograd node whose backward
    runs the relay's (a caller's `loss.backward()` reaches it), else a plain forward. Zigzag pieces need no
    relay: their collectives are differentiable."""
    if shards.zigzag:
        return shards.zigzag_blocks(x)
    if torch.is_grad_enabled():
        return _RelayedBlocks.apply(shards, x)
    return shards.forward_blocks(x, grad=False)[0]


class SequenceStage(nn.Module):
    """A pipeline stage (see parallel/pipeline.StageModule) whose blocks run this rank's sequence shard
    with the relay to the same stage on the other sp ranks. Sends complete at `finish_sends` (the
    engine calls it once per step), since the schedule interleaves micro-batches' forwards and
    backwards."""

    def __init__(self, model: TitansLM, mesh: Mesh, zigzag: bool = False) -> None:
        super().__init__()
        self.model, self.shards = model, SequenceShards(model, mesh, zigzag)

    def forward(self, x: Tensor) -> Tensor:
        model = self.model
        if model.embed is not None:
            x = model.embed(x)
        x = relayed(self.shards, x)
        return model.norm(x) if model.norm is not None else x


class SequenceLoss(nn.Module):
    """The whole model (pp = 1) with its loss over this rank's sequence shard: this shard's share of the
    batch loss, Σ (w·) ce / `denominator`, whose `backward()` adds this shard's part of every gradient (the
    shards' parts still need summing over sp). One module whose forward runs everything, so that FSDP can
    wrap it as the root that gathers the embedding, final norm and head."""

    def __init__(self, model: TitansLM, mesh: Mesh, loss_sum: HeadLossSum, zigzag: bool = False) -> None:
        super().__init__()
        self.model, self.shards, self.loss_sum = model, SequenceShards(model, mesh, zigzag), loss_sum

    def forward(self, tokens: Tensor, targets: Tensor, weights: Tensor | None, denominator: Tensor | float
                ) -> Tensor:
        top = relayed(self.shards, self.model.embed(tokens))
        return self.loss_sum(self.model.norm(top), self.model.head, targets, weights) / denominator
