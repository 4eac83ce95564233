"""The blocks (docs/DESIGN.md §3, paper §4): MAC, MAG, MAL, LMM, the SWA baseline and full causal attention.

Every block is pre-norm with a SwiGLU FFN and residuals, and has the same interface
`forward(x, state, past, start) -> (x, state)`, where `state` is the block's `MemoryState` (None for the
attention-only blocks), so a model can carry the long-term memory across calls.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from titans.attention import Attention, KeyValues
from titans.memory import MemoryState, NeuralMemory

if TYPE_CHECKING:
    from titans.model import TitansConfig


class RMSNorm(nn.RMSNorm):
    """torch's RMSNorm, with a gain of lower precision than its input cast up to it (exactly): a gain
    gathered in bf16 (FSDP's parallel.fsdp_param_dtype) on the float32 residual stream would otherwise
    leave torch's fused kernel for its unfused composite. A float32 gain is used as it is."""

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight
        if torch.promote_types(weight.dtype, x.dtype) == x.dtype:
            weight = weight.to(x.dtype)
        return F.rms_norm(x, self.normalized_shape, weight, self.eps)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class OutputGate(nn.Module):
    """The paper's `y ⊗ M(·)`: both branches normalised by learnable vectors, the memory one σ-gated."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.norm_attn = RMSNorm(dim, eps=eps)
        self.norm_memory = RMSNorm(dim, eps=eps)

    def forward(self, attn: Tensor, memory: Tensor) -> Tensor:
        # Both inputs come straight from projections, so under bf16 autocast they are bf16 while the norms'
        # weights are float32: rms_norm then skips its fused kernel for a slower composite. Normalising in
        # the weights' dtype keeps the fused kernel and the precision (a no-op without autocast).
        attn, memory = attn.to(self.norm_attn.weight.dtype), memory.to(self.norm_memory.weight.dtype)
        return self.norm_attn(attn) * torch.sigmoid(self.norm_memory(memory))


# What a block's attention reads of the positions before its input: their (normed) attention inputs (a
# sequence shard's halo), their keys and values (a streaming cache), or nothing.
Past = Tensor | KeyValues | None


def attend(attn: Attention, x: Tensor, past: Past, start: int) -> Tensor:
    """Attention over x (x[:, 0] at sequence position `start`), with the positions before it (if any) as
    extra keys: their keys and values only, no queries (a halo's or a cache's outputs are not wanted).
    Positions are absolute: queries meet the persistent keys, which carry no position, at their true
    rotation."""
    if past is None:
        return attn(x, position_offset=start)
    if isinstance(past, KeyValues):
        q, k, v = attn.project(x, torch.arange(start, start + x.shape[1], device=x.device))
        return attn.attend(q, torch.cat([past.k, k], dim=2), torch.cat([past.v, v], dim=2))
    rows = past.shape[1]
    positions = torch.arange(start - rows, start + x.shape[1], device=x.device)
    return attn.attend(*attn.project(torch.cat([past, x], dim=1), positions, keys_only=rows))


def make_memory(cfg: TitansConfig) -> NeuralMemory:
    return NeuralMemory(
        dim=cfg.dim,
        heads=cfg.memory_heads,
        head_dim=cfg.memory_head_dim,
        depth=cfg.memory_depth,
        hidden=cfg.memory_hidden,
        chunk_size=cfg.memory_chunk,
        conv_kernel=cfg.memory_conv_kernel,
        theta_max=cfg.memory_theta_max,
        recompute=cfg.recompute_memory,
        residual_norm=cfg.memory_residual_norm,
        max_grad_norm=cfg.memory_max_grad_norm,
        grad_horizon=cfg.memory_grad_horizon,
        kernel=cfg.memory_kernel,
    )


class Block(nn.Module):
    """Shared pre-norm FFN half; subclasses define the token-mixing half `mix`."""

    has_memory = False

    def __init__(self, cfg: TitansConfig) -> None:
        super().__init__()
        self.mix_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn = SwiGLU(cfg.dim, cfg.ffn_hidden)

    def mix(self, x: Tensor, state: MemoryState | None, past: Past = None, start: int = 0
            ) -> tuple[Tensor, MemoryState | None]:
        raise NotImplementedError

    def forward(self, x: Tensor, state: MemoryState | None = None, past: Past = None,
                start: int = 0) -> tuple[Tensor, MemoryState | None]:
        """`past`: the attention inputs of the positions just before x (a sequence shard's halo), or their
        keys and values (a streaming cache's window); attention sees them as keys, nothing else reads them.
        `start`: the sequence position of x[:, 0], for the attention's rotary positions."""
        x, state, _ = self.run(x, state, past, start)
        return x, state

    def run(self, x: Tensor, state: MemoryState | None, past: Past = None, start: int = 0
            ) -> tuple[Tensor, MemoryState | None, Tensor]:
        """`forward`, plus the attention inputs of x's positions: a later call's `past` (or its keys)."""
        h, state = self.before_halo(x, state)
        out, state = self.after_halo(h, state, past, start)
        return out, state, h

    def before_halo(self, x: Tensor, state: MemoryState | None) -> tuple[Tensor, MemoryState | None]:
        """What runs before the attention needs earlier positions: nothing, so the attention input is the
        block input; MAL overrides it with its memory layer. (Sequence shards exchange the halo here.)"""
        return x, state

    def after_halo(self, h: Tensor, state: MemoryState | None, past: Past, start: int
                   ) -> tuple[Tensor, MemoryState | None]:
        """The token mixer and the FFN, from the attention input h and the earlier positions' `past`."""
        if isinstance(past, Tensor):
            past = self.mix_norm(past)
        mixed, state = self.mix(self.mix_norm(h), state, past, start)
        return self.add_mixed(h, mixed), state

    def after_halo_pieces(self, h: Tensor, starts: list[int],
                          earlier: Callable[[KeyValues], list[KeyValues | None]]) -> Tensor:
        """`after_halo` (attention, no memory) for h's equal pieces at sequence positions `starts`, in one
        call, so that FSDP gathers the block once for all of them: a sequence shard made of pieces from far
        apart (load-balanced sequence parallelism). The pieces' own keys and values are projected here, and
        `earlier` (the caller's: it gathers every shard's) makes them each piece's earlier positions' keys
        and values: projected once, by the shard that holds them."""
        n = h.shape[1] // len(starts)
        positions = torch.cat([torch.arange(start, start + n, device=h.device) for start in starts])
        _, k, v = self.attn.project(self.mix_norm(h), positions, keys_only=h.shape[1])
        pasts = earlier(KeyValues(k, v))
        return torch.cat([self.after_halo(h[:, i * n : (i + 1) * n], None, past, start)[0]
                          for i, (start, past) in enumerate(zip(starts, pasts, strict=True))], dim=1)

    def add_mixed(self, h: Tensor, mixed: Tensor) -> Tensor:
        """The token mixer's residual, then the FFN half."""
        h = h + mixed
        return h + self.ffn(self.ffn_norm(h))


def halo_halves(block: Block, zigzag: bool = False) -> list[str]:
    """The methods sequence parallelism's relay (parallel/sequence.py) calls in place of a block's forward:
    `after_halo`, and `before_halo` where the block overrides it (MAL's memory layer; elsewhere it is the
    identity and uses no parameter). `zigzag`: the method a load-balanced shard calls, once per layer (it
    calls `after_halo` per piece: that is still what is compiled)."""
    if zigzag:
        return ["after_halo_pieces"]
    return ["after_halo"] + (["before_halo"] if type(block).before_halo is not Block.before_halo else [])


class AttentionBlock(Block):
    """SWA baseline (window w, persistent tokens) or, with window=None, plain full causal attention."""

    def __init__(self, cfg: TitansConfig, window: int | None) -> None:
        super().__init__(cfg)
        n_persistent = cfg.n_persistent if window is not None else 0
        self.attn = Attention(cfg.dim, cfg.n_heads, cfg.head_dim, window, n_persistent, cfg.rope_base)

    def mix(self, x: Tensor, state: MemoryState | None, past: Past = None, start: int = 0
            ) -> tuple[Tensor, MemoryState | None]:
        return attend(self.attn, x, past, start), state


class LMMBlock(Block):
    """Memory alone: the neural memory is the only token mixer."""

    has_memory = True

    def __init__(self, cfg: TitansConfig) -> None:
        super().__init__(cfg)
        self.memory = make_memory(cfg)

    def mix(self, x: Tensor, state: MemoryState | None, past: Past = None, start: int = 0
            ) -> tuple[Tensor, MemoryState | None]:
        return self.memory(x, state)


class MALBlock(Block):
    """Memory as a layer: memory layer (own residual), then sliding-window attention, then the FFN."""

    has_memory = True

    def __init__(self, cfg: TitansConfig) -> None:
        super().__init__(cfg)
        self.memory_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.memory = make_memory(cfg)
        self.attn = Attention(cfg.dim, cfg.n_heads, cfg.head_dim, cfg.window, cfg.n_persistent, cfg.rope_base)

    def before_halo(self, x: Tensor, state: MemoryState | None) -> tuple[Tensor, MemoryState | None]:
        memory_out, state = self.memory(self.memory_norm(x), state)
        return x + memory_out, state  # the attention's input: `past` holds earlier positions' of it

    def mix(self, x: Tensor, state: MemoryState | None, past: Past = None, start: int = 0
            ) -> tuple[Tensor, MemoryState | None]:
        return attend(self.attn, x, past, start), state


class MAGBlock(Block):
    """Memory as a gate: sliding-window attention and the memory read the same input; gated product."""

    has_memory = True

    def __init__(self, cfg: TitansConfig) -> None:
        super().__init__(cfg)
        self.attn = Attention(cfg.dim, cfg.n_heads, cfg.head_dim, cfg.window, cfg.n_persistent, cfg.rope_base)
        self.memory = make_memory(cfg)
        self.gate = OutputGate(cfg.dim, cfg.norm_eps)

    def mix(self, x: Tensor, state: MemoryState | None, past: Past = None, start: int = 0
            ) -> tuple[Tensor, MemoryState | None]:
        memory_out, state = self.memory(x, state)
        return self.gate(attend(self.attn, x, past, start), memory_out), state


# What MAC writes into its memory from the segment x and its attention output y (mac_memory_input).
MAC_MEMORY_INPUTS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "residual": lambda x, y: x + y,
    "attention": lambda x, y: y,
    "input": lambda x, y: x,
}


class MACBlock(Block):
    """Memory as context, segment by segment (length C):

    1. read the long-term memory as it stood before the segment, `h = M_{s-1}(q)`;
    2. attend causally over `[persistent ‖ h ‖ segment]`;
    3. write the token's representation after attention, `u = RMSNorm(x + y)`, into the memory and gate
       the attention output with it, `y ⊗ M(u)` (`mac_memory_input`: "residual"; "attention" writes the
       paper's bare `y`, "input" the token before attention, `x`, for ablations).

    `h` is either one token per segment token (paper v1; token i sees h_j only for j ≤ i, since h_j is
    read with x_j's query), or `mac_memory_tokens` = N fixed tokens (camera-ready, N = 256): N learned
    probe keys read `M_{s-1}`; they depend on no token of the segment, so every position sees all N.
    `M(y)` is read chunk-causally (each chunk reads the memory at its start): reading the end-of-segment
    memory `M_s` as the paper writes it would let position i see tokens after i in its segment.

    Why `u` and not the paper's bare `y_t = Attn(S̃)`: in a pre-norm residual block the attention output
    is only the update to the token's representation, small at init and a near-uniform average over the
    segment, so the token's own identity barely reaches the memory's keys and values. A tiny MAC writing
    `y` never learns single-needle retrieval beyond its segment (it stays at chance for 800+ steps), one
    writing `u` solves it in ~100 steps (`tests/test_needle_learning.py`, bench/RESULTS.md).
    """

    has_memory = True

    def __init__(self, cfg: TitansConfig) -> None:
        super().__init__(cfg)
        self.segment_len = cfg.segment_len
        self.attn = Attention(cfg.dim, cfg.n_heads, cfg.head_dim, None, cfg.n_persistent, cfg.rope_base)
        self.memory = make_memory(cfg)
        self.gate = OutputGate(cfg.dim, cfg.norm_eps)
        self.memory_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.write_input = MAC_MEMORY_INPUTS[cfg.mac_memory_input]
        self.segment_region: Callable[..., tuple[Tensor, Tensor, MemoryState]] = mac_segment_region
        shape = (cfg.memory_heads, cfg.memory_head_dim)
        if cfg.mac_memory_tokens > 0:
            self.memory_probes = nn.Parameter(torch.randn(cfg.mac_memory_tokens, *shape))
            self.to_memory_query = None
        else:
            self.memory_probes = None
            self.to_memory_query = nn.Linear(cfg.dim, shape[0] * shape[1], bias=False)

    def memory_queries(self, segment: Tensor) -> Tensor:
        """Unit-norm queries (B, N, H, d) that read the long-term memory for this segment."""
        B, T, _ = segment.shape
        if self.memory_probes is not None:
            q = self.memory_probes.unsqueeze(0).expand(B, -1, -1, -1)
        else:
            q = self.to_memory_query(segment).view(B, T, -1, self.memory.head_dim)
        return F.normalize(q, dim=-1)

    def segment_step(self, segment: Tensor, query: Tensor, q: Tensor, k: Tensor, v: Tensor, state: MemoryState
                     ) -> tuple[Tensor, Tensor, MemoryState]:
        """One segment: read the memory, attend, write. `segment_region` is `mac_segment_region`, or that
        compiled once for all segments (parallel/compile.py); it sees the segment's cut phase, not its
        index."""
        phase = self.memory.cut_phase(state.chunks, segment.shape[1])
        y, read, end = self.segment_region(self, segment, query, q, k, v, replace(state, chunks=phase))
        return y, read, replace(end, chunks=end.chunks - phase + state.chunks)

    def mix(self, x: Tensor, state: MemoryState | None, past: Past = None, start: int = 0
            ) -> tuple[Tensor, MemoryState | None]:  # segments are attention-local: no halo
        if state is None:
            state = self.memory.initial_state(x.shape[0])
        attended, reads = [], []
        C = self.segment_len
        segments = x.split(C, dim=1)  # split: its backward does not zero-fill x
        # What depends on no memory state is computed for every segment at once, outside the loop: the
        # read queries and the attention's q, k, v (RoPE positions restart at each segment's start) before
        # it, the memory's output projection and the gate after it.
        if self.memory_probes is not None:
            queries = [self.memory_queries(segment) for segment in segments]  # one shared tensor, no work
        else:
            queries = self.memory_queries(x).split(C, dim=1)
        positions = torch.arange(x.shape[1], device=x.device) % C
        qkv = zip(*(t.split(C, dim=2) for t in self.attn.project(x, positions)), strict=True)
        for segment, query, (q, k, v) in zip(segments, queries, qkv, strict=True):
            state = self.memory.cut_gradient(state)  # the read and the write see the same horizon
            y, read, state = self.segment_step(segment, query, q, k, v, state)
            attended.append(y)
            reads.append(read)
        # The memory's output projection and the gate are per token: one call for all segments, not one each.
        memory_out = self.memory.output(torch.cat(reads, dim=1))
        return self.gate(torch.cat(attended, dim=1), memory_out), state


def mac_segment_region(block: MACBlock, segment: Tensor, query: Tensor, q: Tensor, k: Tensor, v: Tensor,
                       state: MemoryState) -> tuple[Tensor, Tensor, MemoryState]:
    """MAC's segment step: the attention output y, the memory's per-head reads, the end state. The state's
    `chunks` is the segment's phase (NeuralMemory.cut_phase), the smallest chunk index at which the
    gradient horizon cuts the segment where its true index would: a compiled step specialises on it, and
    so serves every segment cut alike instead of compiling once per segment."""
    memory_tokens = block.memory.read(query, state)
    y = block.attn.attend(q, k, v, memory_tokens, memory_tokens_causal=block.memory_probes is None)
    written = block.memory_norm(block.write_input(segment, y))
    read, state = block.memory(written, state, project_out=False)
    return y, read, state


BLOCKS = {
    "mac": MACBlock,
    "mag": MAGBlock,
    "mal": MALBlock,
    "lmm": LMMBlock,
    "swa": lambda cfg: AttentionBlock(cfg, cfg.window),
    "full": lambda cfg: AttentionBlock(cfg, None),
}


def earlier_rows_read(kind: str, cfg: TitansConfig) -> int | None:
    """How many positions before a piece of the sequence a block's attention reads: w − 1 for
    sliding-window attention, all (None) for full attention, none (0) for MAC (its attention stays inside
    a segment) and LMM. What a sequence shard's halo and a streaming cache's past must hold."""
    if kind in ("swa", "mag", "mal"):
        return cfg.window - 1
    return None if kind == "full" else 0


def build_block(kind: str, cfg: TitansConfig) -> Block:
    return BLOCKS[kind](cfg)
