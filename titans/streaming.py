"""Streaming inference: score or generate text of any length with constant memory, exactly.

A sequence fed in pieces must give the logits it gives fed whole. Three things cross a cut:
  - the long-term memory (weights, momentum, conv history): `MemoryState`;
  - sliding-window attention's last `w − 1` keys and values (a KV cache: each position is projected once);
  - the open chunk / MAC segment: the memory updates, and MAC attends, a whole chunk / segment at a time,
    so the positions after the last boundary are not yet in the state.

Each layer therefore commits at its own boundary (`commit_every`: its memory chunk, MAC's segment) and
keeps its inputs since the last one (its `tail`, fewer than `commit_every` tokens); where new tokens
complete a boundary the layer runs tail + new tokens from the committed state and moves the state forward
by the whole boundaries completed; past it only the new tokens run, from the tail's cached keys and
memory (MAC: `mac_open_rows`). Per layer that is the memory's size, w − 1 and fewer than
`commit_every` vectors whatever the length, so generating the millionth token costs what the hundredth
did. Full causal attention is the exception: its cache grows with the text, as any KV cache does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from titans.attention import KeyValues
from titans.blocks import Block, MACBlock, earlier_rows_read
from titans.memory import MemoryState
from titans.model import TitansConfig, TitansLM


def commit_every(kind: str, cfg: TitansConfig) -> int:
    """The boundary at which a layer's state moves forward: its memory chunk, MAC's segment (a multiple of
    the chunk); every position for attention alone (its state is the window's keys)."""
    if kind == "mac":
        return cfg.segment_len
    return cfg.memory_chunk if kind in ("mag", "mal", "lmm") else 1


def attention_keys(block: Block, h: Tensor, start: int) -> KeyValues:
    """The keys and values `block`'s attention takes from its attention inputs h (B, n, dim) at positions
    start .. start + n − 1 (no queries)."""
    positions = torch.arange(start, start + h.shape[1], device=h.device)
    _, k, v = block.attn.project(block.mix_norm(h), positions, keys_only=h.shape[1])
    return KeyValues(k, v)


@dataclass
class MACTail:
    """MAC's open segment beyond `LayerCache`'s tail keys and conv: its memory tokens' keys and values
    (one per row read so far, or the N probes'), and its write memory at the open chunk's start with the
    rows written since, for the chunk's update when it completes."""

    memory_keys: KeyValues
    chunk_state: MemoryState
    written: Tensor | None = None

    def tensors(self) -> list[Tensor]:
        written = [] if self.written is None else [self.written]
        return [*self.memory_keys, *self.chunk_state.tensors(), *written]

    def map(self, fn: Callable[[Tensor], Tensor]) -> MACTail:
        return MACTail(KeyValues(*map(fn, self.memory_keys)), self.chunk_state.map(fn),
                       None if self.written is None else fn(self.written))


@dataclass
class LayerCache:
    state: MemoryState | None = None  # the memory at the committed position (None: attention only)
    past: KeyValues | None = None  # keys, values just before the committed position (B, H, ≤ w − 1, d)
    tail: Tensor | None = None  # block inputs since the committed position (B, < commit_every, dim)
    # So that new rows run alone, never the tail again: the tail's attention keys and values, the memory's
    # conv history at the tail's end (MAC: its write memory's) and MAC's open segment.
    tail_keys: KeyValues | None = None
    tail_conv: Tensor | None = None
    mac: MACTail | None = None

    def tensors(self) -> list[Tensor]:
        found = [t for kv in (self.past, self.tail_keys) if kv is not None for t in kv]
        found += [t for t in (self.tail, self.tail_conv) if t is not None]
        return found + [t for part in (self.state, self.mac) if part is not None for t in part.tensors()]

    def map(self, fn: Callable[[Tensor], Tensor]) -> LayerCache:
        def keys(kv: KeyValues | None) -> KeyValues | None:
            return None if kv is None else KeyValues(*map(fn, kv))

        return LayerCache(None if self.state is None else self.state.map(fn), keys(self.past),
                          None if self.tail is None else fn(self.tail), keys(self.tail_keys),
                          None if self.tail_conv is None else fn(self.tail_conv),
                          None if self.mac is None else self.mac.map(fn))


@dataclass
class StreamCache:
    """Everything a model needs to continue a batch of sequences: one `LayerCache` per layer."""

    layers: list[LayerCache] = field(default_factory=list)
    seen: int = 0  # tokens fed so far: each layer's state holds them but its tail

    def nbytes(self) -> int:
        """The cache's size: flat in the text's length unless the model has full-attention layers."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors())

    def map(self, fn: Callable[[Tensor], Tensor]) -> StreamCache:
        """The same cache with `fn` applied to every tensor along the batch: beam reordering, repeats."""
        return StreamCache([layer.map(fn) for layer in self.layers], self.seen)


def _join(past: KeyValues | None, new: KeyValues | None) -> KeyValues | None:
    if past is None or new is None:
        return new if past is None else past
    return KeyValues(torch.cat([past.k, new.k], dim=2), torch.cat([past.v, new.v], dim=2))


def _keep_last(past: KeyValues | None, new: KeyValues, n: int | None) -> KeyValues:
    """The last n (None: all) positions' keys and values of past followed by new."""
    new = _join(past, new)
    if n is None or new.k.shape[2] <= n:
        return new
    return KeyValues(new.k[:, :, -n:], new.v[:, :, -n:])


@torch.no_grad()
def stream_step(model: TitansLM, tokens: Tensor, cache: StreamCache | None = None
                ) -> tuple[Tensor, StreamCache]:
    """Logits (B, T, vocab) of `tokens`, the continuation of whatever `cache` has seen; the new cache.

    Where the new tokens complete a layer's boundaries (`commit_every`), the layer runs its tail (the
    inputs since its last boundary) with them from the committed state: the chunk's memory update needs
    every row. Past its last boundary a layer runs the new tokens only, from what its cache holds of the
    tail: the price of exactness for chunked updates is one rerun of each chunk.
    """
    if cache is None or not cache.layers:
        cache = StreamCache([LayerCache() for _ in model.cfg.layer_kinds])
    T = tokens.shape[1]
    x = model.embed(tokens)
    layers = []
    for kind, block, layer in zip(model.cfg.layer_kinds, model.blocks.values(), cache.layers, strict=True):
        x, new_layer = layer_step(kind, block, model.cfg, layer, x, cache.seen)
        layers.append(new_layer)
    logits = model.head(model.norm(x))
    return logits, StreamCache(layers, cache.seen + T)


def layer_step(kind: str, block: Block, cfg: TitansConfig, layer: LayerCache, x: Tensor, seen: int
               ) -> tuple[Tensor, LayerCache]:
    """One layer of `stream_step`: the outputs of its new inputs x (B, T, dim), which follow `seen`
    positions, and its new cache."""
    T = x.shape[1]
    inputs = x if layer.tail is None else torch.cat([layer.tail, x], dim=1)  # from its last boundary on
    total = inputs.shape[1]
    committed = seen + T - total  # the position of its last boundary
    commit = total - total % commit_every(kind, cfg)  # the rows that complete boundaries
    state, past, outputs = layer.state, layer.past, []
    keep = earlier_rows_read(kind, cfg)  # 0: no attention across calls
    tail_keys, tail_conv = layer.tail_keys, layer.tail_conv
    if commit:
        out, state, attn_in = block.run(inputs[:, :commit], state, past, committed)
        if keep != 0:  # the keys of the positions a later call's attention reads: projected once
            rows = commit if keep is None else min(keep, commit)
            new = attention_keys(block, attn_in[:, commit - rows :], committed + commit - rows)
            past = _keep_last(past, new, keep)
        outputs.append(out)
    if commit or layer.tail is None:  # the open rows start at the committed position
        tail_keys, tail_conv = None, None if state is None else state.conv
    mac = None if commit or layer.tail is None else layer.mac
    if commit < total:  # only the rows not run yet, from the tail's keys and conv
        first = max(commit, total - T)
        base = state if state is not None or not block.has_memory else block.memory.initial_state(x.shape[0])
        if isinstance(block, MACBlock):
            out, tail_keys, tail_conv, mac = mac_open_rows(block, inputs[:, first:], base, tail_keys,
                                                           tail_conv, mac, first - commit)
        else:
            # the committed weights (the open rows lie in one chunk, whose reads are chunk-causal), the
            # tail end's conv
            read = None if base is None else replace(base, conv=tail_conv, read_only=True)
            out, end, attn_in = block.run(inputs[:, first:], read, _join(past, tail_keys), committed + first)
            if keep != 0:
                tail_keys = _join(tail_keys, attention_keys(block, attn_in, committed + first))
            tail_conv = None if end is None else end.conv
        outputs.append(out)
    out = torch.cat(outputs, dim=1)[:, -T:]
    if commit == total:
        return out, LayerCache(state, past)
    return out, LayerCache(state, past, inputs[:, commit:], tail_keys, tail_conv, mac)


def mac_open_rows(block: MACBlock, x: Tensor, state: MemoryState, keys: KeyValues | None, conv: Tensor | None,
                  mac: MACTail | None, offset: int) -> tuple[Tensor, KeyValues, Tensor | None, MACTail]:
    """MAC's outputs for new inputs x (B, T, dim) at rows offset .. offset + T − 1 of the open segment,
    which started from `state`, from its earlier rows' cached attention `keys`, memory tokens and write
    memory (`mac`; None at offset 0) and the write memory's `conv` history: the segment step of
    `mac_segment_region` one piece at a time. Returns the outputs and the cache's new parts."""
    xn, T = block.mix_norm(x), x.shape[1]
    q, k, v = block.attn.project(xn, torch.arange(offset, offset + T, device=x.device))  # in the segment
    keys = _join(keys, KeyValues(k, v))
    per_token = block.memory_probes is None  # a memory token per row (causal), else the N probes' for all
    memory_keys = None if mac is None else mac.memory_keys
    if per_token or memory_keys is None:  # read from the memory as it stood at the segment's start
        read = block.attn.memory_keys(block.memory.read(block.memory_queries(xn), state))
        memory_keys = _join(memory_keys, read) if per_token else read
    y = block.attn.attend(q, keys.k, keys.v, memory_keys, memory_tokens_causal=per_token)
    written = block.memory_norm(block.write_input(xn, y))
    # the write memory chunk by chunk: rows read the weights at their chunk's start, a completed chunk updates
    chunk_state, pending = (state, None) if mac is None else (mac.chunk_state, mac.written)
    reads, chunk, i = [], block.memory.chunk_size, 0
    while i < T:
        n = min(T - i, chunk - (offset + i) % chunk)
        piece = written[:, i : i + n]
        read, end = block.memory(piece, replace(chunk_state, conv=conv, read_only=True), project_out=False)
        reads.append(read)
        conv, pending = end.conv, piece if pending is None else torch.cat([pending, piece], dim=1)
        if (offset + i + n) % chunk == 0:
            chunk_state, pending = block.memory(pending, chunk_state, project_out=False)[1], None
        i += n
    out = block.add_mixed(x, block.gate(y, block.memory.output(torch.cat(reads, dim=1))))
    return out, keys, conv, MACTail(memory_keys, chunk_state, pending)


@torch.no_grad()
def stream_logits(model: TitansLM, tokens: Tensor, cache: StreamCache | None = None,
                  piece_len: int = 4096) -> tuple[Tensor, StreamCache]:
    """Score a long (B, T) input in pieces of at most `piece_len` tokens: memory bounded by the piece,
    logits equal to one whole call's."""
    outputs = []
    for piece in tokens.split(piece_len, dim=1):
        logits, cache = stream_step(model, piece, cache)
        outputs.append(logits)
    return torch.cat(outputs, dim=1), cache


@dataclass
class RowGroups:
    """Streams for a padded batch, whose rows have seen different numbers of tokens: a `StreamCache` per
    group of rows that have seen as many (None: nothing yet), so that rows of one length still run as one
    batch. `columns`: the batch's positions consumed, padding included."""

    groups: list[tuple[list[int], StreamCache | None]]
    columns: int = 0

    @property
    def batch(self) -> int:
        return sum(len(rows) for rows, _ in self.groups)

    def select(self, source: list[int]) -> RowGroups:
        """Row j of the result continues row `source[j]`: beam reordering, repeats, dropping rows."""
        where = {row: (g, i) for g, (rows, _) in enumerate(self.groups) for i, row in enumerate(rows)}
        groups = []
        for g, (_, cache) in enumerate(self.groups):
            mine = [j for j, row in enumerate(source) if where[row][0] == g]
            if mine:
                groups.append((mine, rows_of(cache, [where[source[j]][1] for j in mine])))
        return RowGroups(groups, self.columns)


def rows_of(cache: StreamCache | None, index: list[int]) -> StreamCache | None:
    """The cache of the batch rows `index` of `cache`."""
    if cache is None:
        return None
    rows = torch.tensor(index)
    return cache.map(lambda t: t[rows.to(t.device)])


@torch.no_grad()
def ragged_step(model: TitansLM, tokens: Tensor, keep: Tensor | None = None, rows: RowGroups | None = None
                ) -> tuple[Tensor, RowGroups]:
    """`stream_step` for a padded batch: each row continues its own stream with its tokens where `keep`
    (B, T) is true, the rest (padding, left or right) never seen, so every row's logits equal the model
    run on that row alone. Rows that have seen as many tokens and keep as many run as one batch. A dropped
    position gets its row's last kept position's logits in this call (zeros before any): the logits at the
    end of a right-padded prompt are those of its last token."""
    B, T = tokens.shape
    rows = rows or RowGroups([(list(range(B)), None)])
    if keep is None and len(rows.groups) == 1:  # every row has seen as many and keeps all: one batch
        logits, cache = stream_step(model, tokens, rows.groups[0][1])
        return logits, RowGroups([(rows.groups[0][0], cache)], rows.columns + T)
    keep = torch.ones_like(tokens, dtype=torch.bool) if keep is None else keep.bool()
    counts, logits, groups = keep.sum(1).tolist(), None, []
    for members, cache in rows.groups:
        by_count: dict[int, list[int]] = {}
        for i, row in enumerate(members):
            by_count.setdefault(counts[row], []).append(i)
        for count, at in by_count.items():
            mine = [members[i] for i in at]
            part = cache if len(at) == len(members) else rows_of(cache, at)
            if count:
                picked = tokens[mine] if count == T else torch.stack([tokens[r][keep[r]] for r in mine])
                out, part = stream_step(model, picked, part)
                logits = out.new_zeros(B, T, out.shape[-1]) if logits is None else logits
                for k, r in enumerate(mine):
                    logits[r, keep[r]] = out[k]
            groups.append((mine, part))
    after = RowGroups(groups, rows.columns + T)
    if logits is None:  # nothing kept anywhere
        return tokens.new_zeros(B, T, model.cfg.vocab_size, dtype=torch.float32), after
    last_kept = torch.where(keep, torch.arange(T, device=keep.device), -1).cummax(dim=1).values
    filled = logits.gather(1, last_kept.clamp_min(0)[..., None].expand_as(logits))
    return filled.masked_fill((last_kept < 0)[..., None], 0.0), after


def next_token(logits: Tensor, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, generator: torch.Generator | None = None) -> Tensor:
    """(B, vocab) logits → (B,) ids: greedy at temperature 0, else sampled after top-k / top-p."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = F.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cumulative - F.softmax(sorted_logits, dim=-1) >= top_p  # keep the smallest set reaching p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)


def sampling_problem(temperature: float, top_k: int | None, top_p: float | None) -> str | None:
    """What is wrong with these sampling settings, or None: a top-k or top-p at temperature 0 (greedy)
    would be ignored without a word, and an out-of-range one would sample something else than asked."""
    if temperature < 0:
        return f"temperature must be >= 0 (0: greedy), got {temperature}"
    if top_k is not None and top_k < 1:
        return f"top-k must be >= 1, got {top_k}"
    if top_p is not None and not 0 < top_p <= 1:
        return f"top-p must be in (0, 1], got {top_p}"
    if temperature == 0 and (top_k is not None or top_p is not None):
        return ("top-k and top-p choose what to sample from, and temperature 0 is greedy: set a temperature "
                "> 0 (e.g. 0.8)")
    return None


@torch.no_grad()
def generate(model: TitansLM, prompt: Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
             generator: torch.Generator | None = None, piece_len: int = 4096, keep: Tensor | None = None
             ) -> Tensor:
    """Continue a (B, T) prompt by up to `max_new_tokens` tokens; returns prompt + continuation.
    Stops early when every row has produced `eos_id`. `keep` (B, T): a padded batch's real tokens (prompts
    of different lengths, padded on either side): each row continues its own prompt as if alone."""
    problem = sampling_problem(temperature, top_k, top_p)
    if problem:
        raise ValueError(problem)
    rows, last = None, None
    for at in range(0, prompt.shape[1], piece_len):
        piece = slice(at, at + piece_len)
        logits, rows = ragged_step(model, prompt[:, piece], None if keep is None else keep[:, piece], rows)
        # a row whose prompt ended in an earlier piece (right padding) keeps that piece's last logits
        seen_here = None if keep is None or last is None else keep[:, piece].any(1, keepdim=True)
        last = logits[:, -1] if seen_here is None else torch.where(seen_here, logits[:, -1], last)
    out, done = [prompt], torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    for i in range(max_new_tokens):
        token = next_token(last, temperature, top_k, top_p, generator)
        if eos_id is not None:
            token = token.masked_fill(done, eos_id)
            done |= token == eos_id
        out.append(token[:, None])
        if i == max_new_tokens - 1 or (eos_id is not None and bool(done.all())):
            break
        logits, rows = ragged_step(model, token[:, None], rows=rows)
        last = logits[:, -1]
    return torch.cat(out, dim=1)
