"""TitansLM: embedding, a pattern of blocks, final norm, head; built from one config dataclass."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from titans.blocks import BLOCKS, build_block
from titans.memory import MemoryState

BLOCK_KINDS = tuple(BLOCKS)


def parse_layer_pattern(pattern: str, n_layers: int) -> list[str]:
    """'mac' → every layer MAC; 'lmm*7,full' → 7 memory layers then 1 full-attention layer, repeated.

    The pattern is a comma-separated list of block kinds, each optionally `*count`; it is repeated to
    fill `n_layers`, whose count must be a multiple of the pattern's length.
    """
    kinds: list[str] = []
    for item in pattern.replace(" ", "").lower().split(","):
        match = re.fullmatch(r"([a-z]+)(?:\*(\d+))?", item)
        if not match or match.group(1) not in BLOCKS:
            raise ValueError(
                f"layers: bad item {item!r} in {pattern!r}; expected kind[*count] with kind one of "
                f"{', '.join(BLOCK_KINDS)}"
            )
        kinds += [match.group(1)] * int(match.group(2) or 1)
    if n_layers % len(kinds):
        raise ValueError(f"layers: pattern {pattern!r} has {len(kinds)} layers, which does not divide "
                         f"n_layers={n_layers}")
    return kinds * (n_layers // len(kinds))


@dataclass
class TitansConfig:
    """Everything that fixes the model. Fields left None are derived in `__post_init__`."""

    vocab_size: int = 32000
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    head_dim: int | None = None  # default dim // n_heads
    ffn_hidden: int | None = None  # default ≈ 8/3·dim rounded up to a multiple of 64 (SwiGLU)
    layers: str = "mac"  # block pattern, e.g. "mac", "mag", "lmm*7,full" (see parse_layer_pattern)
    window: int = 256  # sliding-window size for SWA / MAG / MAL attention
    n_persistent: int = 16  # persistent memory tokens (learned, data-independent) per attention layer
    segment_len: int = 256  # MAC segment length C (a multiple of memory_chunk)
    mac_memory_tokens: int = 0  # 0: one long-term token per segment token (v1); N>0: N learned probes
    memory_heads: int | None = None  # default n_heads
    memory_head_dim: int | None = None  # default head_dim
    memory_depth: int = 2  # L_M, layers of the memory MLP
    memory_hidden: int | None = None  # default 4·memory_head_dim
    memory_chunk: int = 64  # b: tokens per chunk of the parallel memory update
    memory_conv_kernel: int = 4
    memory_theta_max: float | None = None  # θ = theta_max · sigmoid(·); default 1/memory_chunk (stable)
    memory_residual_norm: bool = True  # memory output x + LayerNorm(MLP(x)): a stable inner loop
    memory_max_grad_norm: float | None = 1.0  # clip each token's memory gradient (surprise) norm; None: off
    recompute_memory: bool = True  # backward keeps chunk-boundary states only, recomputes each chunk
    rope_base: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    init_std: float = 0.02
    layer_kinds: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "window", "segment_len", "memory_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}; set head_dim")
            self.head_dim = self.dim // self.n_heads
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even (RoPE)")
        self.ffn_hidden = self.ffn_hidden or 64 * -(-8 * self.dim // (3 * 64))
        self.memory_heads = self.memory_heads or self.n_heads
        self.memory_head_dim = self.memory_head_dim or self.head_dim
        self.memory_hidden = self.memory_hidden or 4 * self.memory_head_dim
        self.layer_kinds = parse_layer_pattern(self.layers, self.n_layers)
        if "mac" in self.layer_kinds and self.segment_len % self.memory_chunk:
            raise ValueError(f"segment_len={self.segment_len} must be a multiple of memory_chunk="
                             f"{self.memory_chunk} so MAC segments are chunk-aligned")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.init]


class TitansLM(nn.Module):
    """Decoder-only language model. `forward(tokens, states) -> (logits, states)`.

    `states` holds one `MemoryState` per layer (None for attention-only layers): feeding a sequence in
    segment-aligned pieces with the carried states continues the long-term memory exactly.
    """

    def __init__(self, cfg: TitansConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList([build_block(kind, cfg) for kind in cfg.layer_kinds])
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.checkpoint_blocks = False  # set by the training job (train.activation_checkpointing)
        self.apply(self._init_linear)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    def _init_linear(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.cfg.init_std)

    def hidden_states(
        self, tokens: Tensor, states: list[MemoryState | None] | None = None
    ) -> tuple[Tensor, list[MemoryState | None]]:
        """The final-norm features (B, T, dim) and the new per-layer memory states."""
        x = self.embed(tokens)
        states = states or [None] * len(self.blocks)
        new_states = []
        recompute = self.checkpoint_blocks and torch.is_grad_enabled()
        for block, state in zip(self.blocks, states, strict=True):
            if recompute:  # activation checkpointing: keep block inputs only, recompute in backward
                x, state = checkpoint(block, x, state, use_reentrant=False)
            else:
                x, state = block(x, state)
            new_states.append(state)
        return self.norm(x), new_states

    def forward(
        self, tokens: Tensor, states: list[MemoryState | None] | None = None, targets: Tensor | None = None,
        weights: Tensor | None = None,
    ) -> tuple[Tensor, list[MemoryState | None]]:
        """(logits, states); with `targets` (and optional per-target `weights`), (mean cross-entropy,
        states) computed by `loss`."""
        if targets is not None:
            return self.loss(tokens, targets, states, weights=weights)
        features, states = self.hidden_states(tokens, states)
        return self.head(features), states

    def loss(
        self, tokens: Tensor, targets: Tensor, states: list[MemoryState | None] | None = None,
        chunk_tokens: int = 2048, weights: Tensor | None = None,
    ) -> tuple[Tensor, list[MemoryState | None]]:
        """Mean next-token cross-entropy without materialising all (B·T, vocab) logits at once; with
        `weights` (B, T), the weighted mean `Σ w·ce / Σ w` (e.g. synthetic tasks trained on answers only).

        The head and the loss run over `chunk_tokens` tokens at a time and are recomputed in backward,
        so a 32K-vocabulary head costs O(chunk · vocab) memory instead of O(B · T · vocab).
        """
        features, states = self.hidden_states(tokens, states)
        features, targets = features.flatten(0, 1), targets.flatten()
        pieces = [features.split(chunk_tokens), targets.split(chunk_tokens)]
        if weights is not None:
            weights = weights.flatten().float()
            pieces.append(weights.split(chunk_tokens))
        total = features.new_zeros((), dtype=torch.float32)
        for piece in zip(*pieces, strict=True):
            if torch.is_grad_enabled():
                total = total + checkpoint(self._cross_entropy_sum, *piece, use_reentrant=False)
            else:
                total = total + self._cross_entropy_sum(*piece)
        return total / (targets.numel() if weights is None else weights.sum()), states

    def _cross_entropy_sum(self, features: Tensor, targets: Tensor, weights: Tensor | None = None) -> Tensor:
        logits = self.head(features).float()
        if weights is None:
            return F.cross_entropy(logits, targets, reduction="sum")
        return (F.cross_entropy(logits, targets, reduction="none") * weights).sum()


def count_parameters(model: nn.Module, include_embedding: bool = True) -> int:
    """Unique trainable parameters (a tied head counts once)."""
    seen = {id(p): p for p in model.parameters() if p.requires_grad}
    total = sum(p.numel() for p in seen.values())
    if not include_embedding and isinstance(model, TitansLM):
        total -= model.embed.weight.numel()
    return total


def num_parameters(cfg: TitansConfig) -> int:
    """Parameter count of a config without allocating it (built on the meta device)."""
    with torch.device("meta"):
        return count_parameters(TitansLM(cfg))
