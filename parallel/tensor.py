"""Tensor parallelism for a built TitansLM: heads, FFN and vocabulary split over the tp ranks.

    parallelize_tensor(model, TensorShard(mesh.tp_group, mesh.tp_rank, tp))   # in place, like torchtitan's
    loss = causal_lm_loss(model, x, y, cross_entropy=vocab_parallel_loss(model))  # parallelize_* functions

Every layer of the dense model is replaced by a megatron-core layer holding this rank's slice of the
dense weights (so a tp run starts from exactly the single-process model, and the model code in `titans/`
stays plain: it reads head counts from local widths). The memory is multi-head and its heads never
interact inside the test-time update, so splitting it by head makes the update communication-free: each
rank holds and trains the memory MLPs of its own heads. The communication per block is megatron's: an
all-reduce of the input gradient behind each column-parallel projection and an all-reduce of the output
of each row-parallel one (under torch.compile through `parallel.tp_collectives`, which dynamo traces).

| piece                                                        | split                                      |
|--------------------------------------------------------------|--------------------------------------------|
| attention q/k/v, memory q/k/v, MAC memory-query projection    | column, by head                            |
| memory gates [θ ‖ η ‖ α] and depthwise conv over [q ‖ k ‖ v]  | column, this rank's heads from each third  |
| initial memory M_0 (H, d_in, d_out), persistent k/v (H, P, d) | dim 0 (heads)                              |
| MAC probe keys (N, H, d)                                      | dim 1 (heads)                              |
| attention out, memory out, SwiGLU down                        | row                                        |
| SwiGLU gate / up                                              | column                                     |
| embedding, head                                               | vocabulary (padded to a multiple of tp)    |
| RMSNorms                                                      | replicated                                 |
| memory's per-head output RMSNorm (one gain for all heads)     | replicated, gradient summed over tp        |

The vocabulary is padded to a multiple of tp; the padded logits are -inf in the loss, so the padding
changes nothing (no target and no probability mass ever lands there). Each sharded parameter carries
megatron's attributes (`tensor_model_parallel`, `partition_dim`) and ours (`tp_parts`: how many
interleaved blocks the split dimension holds, `full_shape`), which the checkpoint manifest records.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from parallel.tp_collectives import copy_to_tp, reduce_from_tp
from pretrain.linear_cross_entropy import IGNORE_INDEX, VocabSplit
from titans.attention import Attention
from titans.blocks import MACBlock, SwiGLU
from titans.memory import NeuralMemory
from titans.model import TitansLM


@dataclass(frozen=True)
class TensorShard:
    """Which slice this process holds: its tp group, rank and size."""

    group: Any
    rank: int
    size: int


def padded_vocab(vocab_size: int, tp: int) -> int:
    return math.ceil(vocab_size / tp) * tp


def shard_tensor(full: Tensor, dim: int, shard: TensorShard, parts: int = 1) -> Tensor:
    """This rank's slice of `full` along `dim`, which holds `parts` equal interleaved blocks (e.g. 3 for
    [θ ‖ η ‖ α]): the rank takes its share of every block, in order."""
    pieces = full.chunk(parts, dim)
    return torch.cat([p.chunk(shard.size, dim)[shard.rank] for p in pieces], dim).clone()


def local_slice(full: Tensor, param: Tensor, shard: TensorShard) -> Tensor:
    """The part of a dense tensor that `param` holds on this rank: its tensor-parallel slice, the
    vocabulary padded with zero rows to a multiple of tp first; replicated parameters take all of it."""
    if getattr(param, "tensor_model_parallel", False):
        rows = param.full_shape[0]
        if full.shape[0] < rows:
            full = torch.nn.functional.pad(full, (0, 0, 0, rows - full.shape[0]))
        full = shard_tensor(full, param.partition_dim, shard, param.tp_parts)
    return full


def mark_sharded(param: Tensor, dim: int, full_shape: torch.Size, parts: int = 1) -> None:
    param.tensor_model_parallel = True
    param.partition_dim = dim
    param.partition_stride = 1
    param.tp_parts = parts
    param.full_shape = tuple(full_shape)


def _megatron_config(dtype: torch.dtype):
    from megatron.core.model_parallel_config import ModelParallelConfig

    # cpu initialisation and no init: the weights are copied from the dense model; sequence_parallel
    # (sharding norm activations inside TP regions) needs CUDA and is left off.
    return ModelParallelConfig(use_cpu_initialization=True, perform_initialization=False, params_dtype=dtype,
                               gradient_accumulation_fusion=False, sequence_parallel=False)


def _no_init(tensor: Tensor) -> Tensor:
    return tensor


def _column_traced(self, x: Tensor) -> Tensor:
    return F.linear(copy_to_tp(x, self.tp_group), self.weight, self.bias)


def _row_traced(self, x: Tensor) -> Tensor:
    out = reduce_from_tp(F.linear(x, self.weight), self.tp_group)
    return out if self.bias is None else out + self.bias


@functools.cache
def _linear_class(kind: str) -> type:
    """megatron-core's Column/RowParallelLinear, returning the output alone as nn.Linear does (theirs
    return (output, bias)). Eagerly it runs megatron's forward, whose backward overlaps the input
    gradient's all-reduce with the weight gradient's matmul (without the overlap a tp step is slower,
    bench/RESULTS.md, session 25); under torch.compile, where megatron's forward breaks the graph, the
    same function through `parallel.tp_collectives`. Built on first use: megatron-core is imported only
    by model-parallel runs."""
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import layers

    if not torch.cuda.is_available():  # its advice to set CUDA_DEVICE_MAX_CONNECTIONS means nothing here
        layers.linear_with_grad_accumulation_and_async_allreduce.warned = True
    base = {"column": tensor_parallel.ColumnParallelLinear, "row": tensor_parallel.RowParallelLinear}[kind]
    traced = _column_traced if kind == "column" else _row_traced

    def forward(self, x: Tensor) -> Tensor:
        return traced(self, x) if torch.compiler.is_compiling() else base.forward(self, x)[0]

    return type(base.__name__, (base,), {"forward": forward, "__module__": __name__})


def _parallel_linear(dense: nn.Linear, shard: TensorShard, kind: str, parts: int = 1) -> nn.Module:
    """A megatron Column/RowParallelLinear holding this rank's slice of `dense`."""
    wrapped = _linear_class(kind)
    extra = {"gather_output": False} if kind == "column" else {"input_is_parallel": True}
    with torch.device(dense.weight.device):
        layer = wrapped(dense.in_features, dense.out_features, config=_megatron_config(dense.weight.dtype),
                        init_method=_no_init, bias=dense.bias is not None, skip_bias_add=False,
                        tp_group=shard.group, **extra)
    dim = 0 if kind == "column" else 1
    with torch.no_grad():
        layer.weight.copy_(shard_tensor(dense.weight, dim, shard, parts))
        if dense.bias is not None:
            if kind == "column":
                layer.bias.copy_(shard_tensor(dense.bias, 0, shard, parts))
            else:
                layer.bias.copy_(dense.bias)
    mark_sharded(layer.weight, dim, dense.weight.shape, parts)
    if dense.bias is not None and kind == "column":
        mark_sharded(layer.bias, 0, dense.bias.shape, parts)
    return layer


def _shard_parameter(module: nn.Module, name: str, dim: int, shard: TensorShard) -> None:
    full = getattr(module, name)
    param = nn.Parameter(shard_tensor(full.detach(), dim, shard), requires_grad=full.requires_grad)
    mark_sharded(param, dim, full.shape)
    setattr(module, name, param)


class TPSharedRMSNorm(nn.RMSNorm):
    """An RMSNorm whose one gain is applied to every local head: each tp rank sees only its heads'
    share of the gain's gradient, so the gradient is summed over tp (copy-to-tp: identity forward,
    all-reduce backward) and every rank keeps the same gain."""

    group: Any = None

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, self.normalized_shape, copy_to_tp(self.weight, self.group), self.eps)


def _shared_norm(norm: nn.RMSNorm, shard: TensorShard) -> TPSharedRMSNorm:
    with torch.device(norm.weight.device):
        out = TPSharedRMSNorm(norm.normalized_shape, eps=norm.eps, dtype=norm.weight.dtype)
    out.group = shard.group
    with torch.no_grad():
        out.weight.copy_(norm.weight)
    return out


def _heads_per_rank(heads: int, shard: TensorShard, what: str) -> int:
    if heads % shard.size:
        raise ValueError(f"{what}={heads} is not divisible by parallel.tp={shard.size}")
    return heads // shard.size


def parallelize_attention(attn: Attention, shard: TensorShard) -> None:
    attn.heads = _heads_per_rank(attn.heads, shard, "model.n_heads")
    for name in ("to_q", "to_k", "to_v"):
        setattr(attn, name, _parallel_linear(getattr(attn, name), shard, "column"))
    attn.to_out = _parallel_linear(attn.to_out, shard, "row")
    if attn.persistent_k is not None:
        _shard_parameter(attn, "persistent_k", 0, shard)
        _shard_parameter(attn, "persistent_v", 0, shard)


def parallelize_memory(memory: NeuralMemory, shard: TensorShard) -> None:
    memory.heads = _heads_per_rank(memory.heads, shard, "model.memory_heads")
    for name in ("to_q", "to_k", "to_v"):
        setattr(memory, name, _parallel_linear(getattr(memory, name), shard, "column"))
    memory.to_gates = _parallel_linear(memory.to_gates, shard, "column", parts=3)  # [θ ‖ η ‖ α]
    conv = memory.conv.weight  # depthwise over [q ‖ k ‖ v]: follows the projections' channels
    memory.conv.weight = nn.Parameter(shard_tensor(conv.detach(), 0, shard, parts=3))
    mark_sharded(memory.conv.weight, 0, conv.shape, parts=3)
    memory.conv.in_channels = memory.conv.out_channels = memory.conv.groups = memory.conv.weight.shape[0]
    for i in range(len(memory.init_weights)):
        _shard_parameter(memory.init_weights, str(i), 0, shard)
    memory.out_norm = _shared_norm(memory.out_norm, shard)
    memory.to_out = _parallel_linear(memory.to_out, shard, "row")


def parallelize_ffn(ffn: SwiGLU, shard: TensorShard) -> None:
    ffn.gate = _parallel_linear(ffn.gate, shard, "column")
    ffn.up = _parallel_linear(ffn.up, shard, "column")
    ffn.down = _parallel_linear(ffn.down, shard, "row")


def _pad_rows(weight: Tensor, rows: int) -> Tensor:
    return F.pad(weight.detach(), (0, 0, 0, rows - weight.shape[0]))


def vocab_parallel_head(dense: nn.Linear, vocab_size: int, shard: TensorShard) -> nn.Module:
    """This rank's rows of a bias-free head (`dense`, modified) over the vocabulary padded to a multiple of
    tp: a column-parallel linear that does not gather its output."""
    padded = padded_vocab(vocab_size, shard.size)
    dense.weight = nn.Parameter(_pad_rows(dense.weight, padded))
    dense.out_features = padded
    return _parallel_linear(dense, shard, "column")


def parallelize_vocab(model: TitansLM, shard: TensorShard) -> None:
    """Embedding and head split by vocabulary rows (padded to a multiple of tp); a tied head shares the
    embedding's local rows, as the dense model shares the whole matrix."""
    from megatron.core import tensor_parallel

    vocab, dim = model.cfg.vocab_size, model.cfg.dim
    padded = padded_vocab(vocab, shard.size)
    tied = model.head is not None and model.embed is not None and model.head.weight is model.embed.weight
    if model.embed is not None:
        dense = model.embed.weight
        with torch.device(dense.device):
            embed = tensor_parallel.VocabParallelEmbedding(padded, dim, init_method=_no_init,
                                                           config=_megatron_config(dense.dtype),
                                                           tp_group=shard.group)
        with torch.no_grad():
            embed.weight.copy_(shard_tensor(_pad_rows(dense, padded), 0, shard))
        mark_sharded(embed.weight, 0, (padded, dim))
        model.embed = embed
    if model.head is not None:
        tied_copy = getattr(model.head.weight, "tied_copy", False)  # the last stage's copy (pipeline)
        model.head = vocab_parallel_head(model.head, vocab, shard)
        model.head.weight.tied_copy = tied_copy
        if tied:
            model.head.weight = model.embed.weight


def parallelize_tensor(model: TitansLM, shard: TensorShard) -> TitansLM:
    """Split `model` (whole or one pipeline stage) over the tp ranks, in place; returns it."""
    if shard.size == 1:
        return model
    for block in model.blocks.values():
        for module in list(block.modules()):
            if isinstance(module, Attention):
                parallelize_attention(module, shard)
            elif isinstance(module, NeuralMemory):
                parallelize_memory(module, shard)
            elif isinstance(module, SwiGLU):
                parallelize_ffn(module, shard)
        if isinstance(block, MACBlock):
            if block.memory_probes is not None:
                _shard_parameter(block, "memory_probes", 1, shard)
            else:
                block.to_memory_query = _parallel_linear(block.to_memory_query, shard, "column")
    parallelize_vocab(model, shard)
    model.tensor_shard = shard
    return model


class VocabParallelCrossEntropy:
    """Per-token cross-entropy over logits split by vocabulary (megatron's vocab_parallel_cross_entropy),
    with the padded vocabulary rows masked out, so the loss equals the unpadded dense model's, and the
    targets -100 ignored as `F.cross_entropy` ignores them."""

    def __init__(self, vocab_size: int, shard: TensorShard) -> None:
        self.vocab_size, self.shard = vocab_size, shard

    def __call__(self, logits: Tensor, targets: Tensor) -> Tensor:
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        local = logits.shape[-1]
        start = self.shard.rank * local
        if start + local > self.vocab_size:  # this rank holds padded rows
            padded = torch.arange(start, start + local, device=logits.device) >= self.vocab_size
            logits = logits.masked_fill(padded, float("-inf"))
        ignored = targets == IGNORE_INDEX  # megatron's has no ignore index: no loss, no gradient there
        return vocab_parallel_cross_entropy(logits, targets.masked_fill(ignored, 0)).masked_fill(ignored, 0.0)

    def split_of(self, head: nn.Module) -> VocabSplit | None:
        """This rank's vocabulary slice, for the fused loss (`pretrain.linear_cross_entropy`), when `head`
        is the plain column-parallel head `parallelize_vocab` builds: bias-free, output not gathered, its
        input gradient all-reduced over tp, no hooks. None otherwise: the loss then calls the head."""
        plain = (getattr(head, "bias", True) is None and getattr(head, "gather_output", True) is False
                 and getattr(head, "sequence_parallel", True) is False
                 and getattr(head, "disable_grad_reduce", True) is False
                 and not head._forward_pre_hooks and not head._forward_hooks)
        return VocabSplit(self.shard.group, self.shard.rank * head.weight.shape[0], self.vocab_size) \
            if plain else None


def vocab_parallel_loss(model: TitansLM) -> VocabParallelCrossEntropy | None:
    """The cross-entropy for a tensor-parallel model's head (None for a dense model: use the default)."""
    shard = getattr(model, "tensor_shard", None)
    return VocabParallelCrossEntropy(model.cfg.vocab_size, shard) if shard is not None else None
