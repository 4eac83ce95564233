"""TitansLM: embedding, a pattern of blocks, final norm, head; built from one config dataclass."""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from titans.blocks import BLOCKS, MAC_MEMORY_INPUTS, RMSNorm, build_block
from titans.memory import CHUNK_STEPS, MemoryState, NeuralMemory, init_memory_parameter

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
    # What MAC writes into its memory (and gates with): "residual" RMSNorm(x + y), "attention" the paper's
    # bare RMSNorm(y), "input" RMSNorm(x), the token before attention (see MACBlock; an ablation knob).
    mac_memory_input: str = "residual"
    memory_heads: int | None = None  # default n_heads
    memory_head_dim: int | None = None  # default head_dim
    memory_depth: int = 2  # L_M, layers of the memory MLP
    memory_hidden: int | None = None  # default 4·memory_head_dim
    memory_chunk: int = 64  # b: tokens per chunk of the parallel memory update
    memory_conv_kernel: int = 4
    memory_theta_max: float | None = None  # θ = theta_max · sigmoid(·); default 1/memory_chunk (stable)
    memory_residual_norm: bool = True  # memory output x + LayerNorm(MLP(x)): a stable inner loop
    memory_max_grad_norm: float | None = 1.0  # clip each token's memory gradient (surprise) norm; None: off
    # Chunk updates the memory state's gradient flows back through: cut at every multiple of it in the
    # sequence (None: the exact gradient, which overflows over thousands of chunks; docs/DESIGN.md §2.6).
    memory_grad_horizon: int | None = 16
    # The chunk step: "torch" (autograd), "analytic" (explicit backward), "compiled" (the step through
    # torch.compile; CPU and GPU), "triton" (GPU kernels; chunk, head_dim and memory_hidden powers of two
    # >= 16, depth <= 2). Same function, tested against each other.
    memory_kernel: str = "torch"
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
        if self.mac_memory_input not in MAC_MEMORY_INPUTS:
            raise ValueError(f"mac_memory_input={self.mac_memory_input!r} is not one of "
                             f"{', '.join(MAC_MEMORY_INPUTS)}")
        if self.memory_kernel not in CHUNK_STEPS:
            raise ValueError(f"memory_kernel={self.memory_kernel!r} is not one of {', '.join(CHUNK_STEPS)}")
        for name in ("head_dim", "ffn_hidden", "memory_heads", "memory_head_dim", "memory_hidden",
                     "memory_depth", "memory_conv_kernel"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("n_persistent", "mac_memory_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("rope_base", "norm_eps", "init_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        nulls = {"memory_theta_max": "1/memory_chunk", "memory_max_grad_norm": "no clipping"}
        for name, null in nulls.items():  # 0 would stop the memory learning
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 (or null: {null}), got {value}")
        if self.memory_grad_horizon is not None and self.memory_grad_horizon < 1:
            raise ValueError(f"memory_grad_horizon={self.memory_grad_horizon} must be >= 1 chunk "
                             "(or null: never cut)")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.init]


class TitansLM(nn.Module):
    """Decoder-only language model. `forward(tokens, states) -> (logits, states)`.

    `states` holds one `MemoryState` per layer (None for attention-only layers): feeding a sequence in
    segment-aligned pieces with the carried states continues the long-term memory exactly.

    Built to be transformed from outside (parallel/): blocks live in a name-keyed container, so a
    pipeline stage that keeps blocks "4".."7" keeps their parameter names; `embed`, `norm` and `head` may
    be set to None (a stage without them passes hidden states through); built on the meta device it
    allocates and initialises nothing, and `init_weights(seed)` initialises it where it lands.
    """

    def __init__(self, cfg: TitansConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed: nn.Module | None = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleDict({str(i): build_block(k, cfg) for i, k in enumerate(cfg.layer_kinds)})
        self.norm: nn.Module | None = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.head: nn.Module | None = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # activation checkpointing, set by the training job: False / 0 off, True / 1 every block, N every
        # N-th block by its global index (0, N, 2N, ...: the same blocks in every pipeline layout)
        self.checkpoint_blocks: bool | int = False
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Initialise every parameter by its name (`init_parameter`, `init_memory_parameter`).

        With `seed`, each parameter draws from its own generator seeded by (seed, its name), so a
        parameter's initial value does not depend on which other parameters this process holds: a
        pipeline stage or a tensor-parallel shard starts from exactly the slice of the dense model.
        Without it, the global RNG is used in parameter order.
        """
        memories = [f"{name}." for name, m in self.named_modules() if isinstance(m, NeuralMemory)]
        for name, param in self.named_parameters():
            generator = None
            if seed is not None:
                generator = torch.Generator(param.device)
                generator.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            prefix = next((m for m in memories if name.startswith(m)), None)
            if prefix is not None:
                init_memory_parameter(name[len(prefix):], param, self.cfg.init_std, generator)
            else:
                init_parameter(name, param, self.cfg.init_std, generator)

    def hidden_states(
        self, x: Tensor, states: list[MemoryState | None] | None = None
    ) -> tuple[Tensor, list[MemoryState | None]]:
        """Token ids (B, T) → the final-norm features (B, T, dim), and the new per-layer memory states.

        Without an embedding, x is already a hidden state (B, T, dim); without a final norm, the last
        block's output is returned (a pipeline stage's output).
        """
        if self.embed is not None:
            x = self.embed(x)
        states = states or [None] * len(self.blocks)
        new_states = []
        every = int(self.checkpoint_blocks) if torch.is_grad_enabled() else 0
        for (name, block), state in zip(self.blocks.items(), states, strict=True):
            if every and int(name) % every == 0:  # activation checkpointing: keep block inputs, recompute
                x, state = checkpoint(block, x, state, use_reentrant=False)
            else:
                x, state = block(x, state)
            new_states.append(state)
        return (self.norm(x) if self.norm is not None else x), new_states

    def forward(
        self, tokens: Tensor, states: list[MemoryState | None] | None = None
    ) -> tuple[Tensor, list[MemoryState | None]]:
        """(logits, states); without a head, (features, states). The training loss is
        `pretrain.loss.causal_lm_loss` (chunked over the vocabulary)."""
        features, states = self.hidden_states(tokens, states)
        return (self.head(features) if self.head is not None else features), states


def init_parameter(name: str, param: Tensor, std: float, generator: torch.Generator | None) -> None:
    """The initial value of a parameter outside the neural memories, by its name."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("persistent_k", "persistent_v"):
        param.normal_(0.0, 0.02, generator=generator)
    elif leaf == "memory_probes":  # MAC's probe keys (normalised before use)
        param.normal_(0.0, 1.0, generator=generator)
    elif param.dim() == 1:  # norm gains
        param.fill_(1.0)
    else:  # linear and embedding matrices
        param.normal_(0.0, std, generator=generator)


def count_parameters(model: nn.Module, include_embedding: bool = True) -> int:
    """Unique trainable parameters (a tied head counts once)."""
    seen = {id(p): p for p in model.parameters() if p.requires_grad}
    total = sum(p.numel() for p in seen.values())
    if not include_embedding and isinstance(model, TitansLM) and model.embed is not None:
        total -= model.embed.weight.numel()
    return total


def num_parameters(cfg: TitansConfig) -> int:
    """Parameter count of a config without allocating it (built on the meta device)."""
    with torch.device("meta"):
        return count_parameters(TitansLM(cfg))
