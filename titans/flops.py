"""Training FLOPs per token, counted from the config (for MFU and scaling studies).

Counted: every matmul (2 FLOPs per multiply-add), attention scores and values over the keys each query
actually sees (window, persistent and long-term memory tokens), and the memory's test-time training:
the forward pass on the keys, the error backpropagation, the two weighted weight-gradient matmuls of
the chunked update, the read on the queries, and the per-chunk state update. Elementwise work other
than the state update (norms, activations, gates) is left out, as is customary. Training = 3 × forward
(the backward costs about twice the forward); for the memory this is an estimate, as its backward
differentiates through a backward pass.
"""

from __future__ import annotations

from titans.model import TitansConfig


def _mean_causal_keys(seq_len: int, window: int | None) -> float:
    """Average number of sequence keys a causal query sees (window w: min(t + 1, w))."""
    w = seq_len if window is None else min(window, seq_len)
    return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


def _memory_mlp_params(cfg: TitansConfig) -> tuple[int, int]:
    """Parameters of one head's memory MLP, and of its first layer."""
    d = cfg.memory_head_dim
    sizes = [d] + [cfg.memory_hidden] * (cfg.memory_depth - 1) + [d]
    return sum(a * b for a, b in zip(sizes[:-1], sizes[1:])), sizes[0] * sizes[1]


def memory_read_flops(cfg: TitansConfig, n_queries: float) -> float:
    """Reading the memory with n_queries per token: MLP per head, then the output projection."""
    h, d = cfg.memory_heads, cfg.memory_head_dim
    return n_queries * (2 * h * _memory_mlp_params(cfg)[0] + 2 * h * d * cfg.dim)


def memory_flops(cfg: TitansConfig) -> float:
    """Forward FLOPs per token of one NeuralMemory (projections, test-time update, read, output)."""
    h, d = cfg.memory_heads, cfg.memory_head_dim
    mlp, first = _memory_mlp_params(cfg)
    per_head = (
        2 * mlp  # forward on k
        + 2 * (mlp - first)  # error backpropagation through layers 2..L
        + 2 * 2 * mlp  # X_inᵀ diag(w) G_out for the two weightings (c_i and d_i)
        + 5 * mlp / cfg.memory_chunk  # state update (momentum and weights), once per chunk
    )
    projections = 2 * cfg.dim * 3 * h * d + 2 * cfg.memory_conv_kernel * 3 * h * d + 2 * cfg.dim * 3 * h
    return h * per_head + projections + memory_read_flops(cfg, 1.0)


def attention_flops(cfg: TitansConfig, keys_per_query: float) -> float:
    inner = cfg.n_heads * cfg.head_dim
    return 2 * cfg.dim * 3 * inner + 2 * inner * cfg.dim + 2 * 2 * inner * keys_per_query


def layer_flops(cfg: TitansConfig, kind: str, seq_len: int) -> float:
    """Forward FLOPs per token of one block of the given kind at this training length."""
    ffn = 2 * 3 * cfg.dim * cfg.ffn_hidden
    if kind == "full":
        return ffn + attention_flops(cfg, _mean_causal_keys(seq_len, None))
    if kind == "lmm":
        return ffn + memory_flops(cfg)
    swa = attention_flops(cfg, cfg.n_persistent + _mean_causal_keys(seq_len, cfg.window))
    if kind == "swa":
        return ffn + swa
    if kind in ("mag", "mal"):
        return ffn + swa + memory_flops(cfg)
    if kind == "mac":
        segment = min(cfg.segment_len, seq_len)
        if cfg.mac_memory_tokens:  # N learned probes read once per segment, all N seen by every query
            memory_tokens = cfg.mac_memory_tokens / segment  # per segment token
            long_term_keys = float(cfg.mac_memory_tokens)
            query_proj = 0.0
        else:  # one query per token, projected from the segment; query i sees memory tokens j ≤ i
            memory_tokens = 1.0
            long_term_keys = _mean_causal_keys(segment, None)
            query_proj = 2 * cfg.dim * cfg.memory_heads * cfg.memory_head_dim
        read = memory_read_flops(cfg, memory_tokens) + query_proj
        keys = cfg.n_persistent + long_term_keys + _mean_causal_keys(segment, None)
        # each memory token is projected once to a key and a value, however many queries see it
        kv_proj = 2 * 2 * cfg.dim * cfg.n_heads * cfg.head_dim * memory_tokens
        return ffn + attention_flops(cfg, keys) + kv_proj + read + memory_flops(cfg)
    raise ValueError(f"unknown block kind {kind!r}")


def training_flops_per_token(cfg: TitansConfig, seq_len: int) -> float:
    """Forward + backward FLOPs per trained token (3 × forward), head included, embedding lookup free."""
    forward = sum(layer_flops(cfg, kind, seq_len) for kind in cfg.layer_kinds)
    forward += 2 * cfg.dim * cfg.vocab_size
    return 3 * forward
