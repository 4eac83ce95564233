"""Plan a layout before renting the GPUs: per-rank parameters, memory and a go / no-go, step time.

    python -m parallel.plan --config configs/paper/mac-1.3b.yaml --gpus 64 parallel.tp=2 parallel.pp=4

It reads a run config (the one module of `parallel/` that imports `pretrain.config`: it plans a run).
Every (tp, pp) rank's shard is built on the meta device by the training job's own code
(`parallel.model.build_local_model`), so the parameter counts are those of the real sharded modules;
data-parallel ranks hold the same shard and differ only by their ZeRO partition. Per rank it prints:

- parameters, and bytes of parameters / gradients / AdamW states (fp32 each: the training keeps fp32
  weights under bf16 autocast), divided over dp as the ZeRO stage (or FSDP, `parallel.fsdp`) shards them;
- activations of one micro-batch (an estimate, below) times the micro-batches a 1F1B stage keeps in
  flight, without and with activation checkpointing (`train.activation_checkpointing`), with the
  memory's recompute (`model.recompute_memory`) as configured;
- the total against the GPU's memory (less a reserve for the CUDA context, the allocator and buffers):
  go / no-go; and the step time and tokens/s at an assumed MFU.

The activation estimate per layer and sequence of T tokens, width h, bf16 (2 bytes):
- attention + FFN: Megatron's (10 + 24/tp)·T·h bytes (flash attention: no T² score matrix);
- a memory branch: its projections, conv and gates, ≈ 18·T·h/tp bytes, the scan's fp32 inputs
  12·T·h/tp, and the scan's saved state: with recompute, one (weights, momentum) state per chunk and
  local head, fp32; without, about three times that plus the per-token MLP activations;
- activation checkpointing keeps each block's input (2·T·h) and recomputes one block at a time (every
  N-th block with `train.activation_checkpointing_every`, the others keeping all of theirs);
- under sequence parallelism, full attention's halo on the last sp rank, which receives every earlier
  shard's attention inputs ((sp − 1)·T rows a full layer): the received rows, their norm and their keys
  and values, (4 + 4/tp)·(sp − 1)·T·h bytes a full layer, or the received rows alone (2·(sp − 1)·T·h)
  where checkpointing recomputes the rest; under a zigzag split every rank holds the keys and values of
  the rows before its late piece, (4/tp)·(sp − 1/2)·T·h bytes a full layer.
The step time is the busiest rank's: under sequence parallelism with full attention the last shard's
queries see every earlier row, (2 − 1/sp) × the mean's attention scores, plus the earlier shards' keys
and values to project (`last_shard_extra_flops`); a zigzag split evens the scores out and projects each
row's keys and values twice (once for the gather, once beside its query).
It is an estimate to decide go / no-go with a margin, not an allocator trace.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch.distributed.fsdp import MixedPrecisionPolicy

from parallel.fsdp import precision_policy, reshards_after_forward
from parallel.model import build_local_model, n_stages
from parallel.sequence import zigzag_split
from parallel.tensor import TensorShard
from pretrain.config import ConfigError, ParallelConfig, RunConfig, load_config
from titans.blocks import AttentionBlock
from titans.flops import training_flops_per_token
from titans.model import TitansConfig, TitansLM

GPUS = {  # name: (memory in GiB, dense bf16 peak FLOP/s)
    "h100-80gb": (80, 989e12),
    "h200-141gb": (141, 989e12),
    "a100-80gb": (80, 312e12),
    "a100-40gb": (40, 312e12),
}
RESERVE = 0.10  # of the GPU's memory: CUDA context, allocator fragmentation, communication buffers
GIB = 1024**3


class _PlanGroup:
    """Stands in for a tensor-parallel group when shards are built on the meta device (no processes)."""

    def __init__(self, rank: int, size: int) -> None:
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


def _ensure_single_process_group() -> bool:
    """megatron-core reads a group's size only once torch.distributed is initialised; True if we did."""
    if torch_dist.is_initialized():
        return False
    torch_dist.init_process_group("gloo", store=torch_dist.HashStore(), rank=0, world_size=1)
    return True


@dataclass
class RankPlan:
    tp_rank: int
    pp_rank: int
    stages: list[int]
    parameters: int  # held on this rank (a tied embedding's second copy included)
    memory_layers: int
    layers: int
    full_layers: int  # full causal attention: under sp, the last rank holds every earlier shard's rows
    first_stage: bool
    last_stage: bool


def meta_shards(cfg: RunConfig, only: tuple[int, int] | None = None
                ) -> Iterator[tuple[int, int, TensorShard, list[TitansLM], list[int]]]:
    """Every (tp, pp) rank's model pieces (or only the (tp_rank, pp_rank) one), built on the meta device
    in this one process: (tp_rank, pp_rank, shard, models, stage indices)."""
    started = _ensure_single_process_group()
    p = cfg.parallel
    try:
        for pp_rank in range(p.pp):
            for tp_rank in range(p.tp):
                if only is None or (tp_rank, pp_rank) == only:
                    shard = TensorShard(_PlanGroup(tp_rank, p.tp), tp_rank, p.tp)
                    models, stages = build_local_model(cfg.model, p, pp_rank, shard, device=None, seed=0)
                    yield tp_rank, pp_rank, shard, models, stages
    finally:
        if started:
            torch_dist.destroy_process_group()


def local_parameter_counts(cfg: RunConfig, only: tuple[int, int] | None = None) -> list[RankPlan]:
    """Build every (tp, pp) shard (or only the (tp_rank, pp_rank) one) on the meta device and count what
    it holds."""
    plans = []
    for tp_rank, pp_rank, _, models, stages in meta_shards(cfg, only):
        params = {id(t): t.numel() for m in models for t in m.parameters()}
        blocks = [b for m in models for b in m.blocks.values()]
        full = sum(isinstance(b, AttentionBlock) and b.attn.window is None for b in blocks)
        plans.append(RankPlan(tp_rank, pp_rank, stages, sum(params.values()),
                              sum(b.has_memory for b in blocks), len(blocks), full,
                              any(m.embed is not None for m in models),
                              any(m.head is not None for m in models)))
    return plans


def activation_bytes(model: TitansConfig, tp: int, tokens: int, layers: int, memory_layers: int,
                     checkpointing: int, value_bytes: int = 2) -> float:
    """Estimated activation bytes of one micro-batch of `tokens` tokens on a rank (see module docstring);
    `checkpointing` 0 (off), 1 (every block) or N (every N-th block); `value_bytes` 2 under bf16 autocast,
    4 in fp32 (the fp32 terms of the memory's scan stay as they are)."""
    h = model.dim
    attention_ffn = (10 + 24 / tp) * tokens * h * value_bytes / 2
    heads = model.memory_heads / tp
    inner = [model.memory_hidden] * (model.memory_depth - 1)
    sizes = [model.memory_head_dim, *inner, model.memory_head_dim]
    state = sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))  # one head's memory MLP
    chunks = tokens / model.memory_chunk
    scan_states = chunks * heads * 2 * state * 4
    if not model.recompute_memory:
        scan_states = 3 * scan_states + tokens * heads * model.memory_hidden * 4 * 4
    memory = 18 * tokens * h / tp * value_bytes / 2 + 12 * tokens * h / tp + scan_states
    per_layer = attention_ffn + memory * memory_layers / max(layers, 1)
    if checkpointing:
        kept = layers / checkpointing  # blocks that keep their input only
        return kept * value_bytes * tokens * h + (layers - kept) * per_layer + per_layer
    return layers * per_layer


def fsdp_policy(p: ParallelConfig, value_bytes: int) -> MixedPrecisionPolicy:
    """The dtypes FSDP gathers and reduces in for a run whose activations are `value_bytes` (2: bf16)."""
    return precision_policy(p.fsdp_param_dtype, p.fsdp_reduce_dtype, "bf16" if value_bytes == 2 else "fp32")


def rank_memory(cfg: RunConfig, dp: int, parameters: int, layers: int, memory_layers: int,
                value_bytes: int = 2, full_layers: int = 0) -> dict[str, float]:
    """Bytes one rank needs: parameters, gradients, AdamW states (fp32, divided over dp as the ZeRO stage
    shards them), activations without and with checkpointing, and the total under the run's setting (on
    the last sp rank, which holds full attention's halo)."""
    p, d = cfg.parallel, cfg.data
    params, grads, optim = 4.0 * parameters, 4.0 * parameters, 8.0 * parameters
    if p.zero_stage >= 1:
        optim /= dp
    if p.zero_stage >= 2:
        grads /= dp
    if p.zero_stage >= 3:
        params /= dp
    if p.fsdp:  # ZeRO-3's sharding (over fsdp_shard ranks under HSDP), plus two blocks gathered whole (the
        block = parameters / max(layers, 1)  # running one, the next prefetched; all of them when kept from
        shards = p.fsdp_shard or dp  # forward to backward) and one block's gradients whole, with the copy
        # FSDP reduce-scatters
        policy = fsdp_policy(p, value_bytes)
        gather, reduce = (4.0 if dtype in (None, torch.float32) else 2.0
                          for dtype in (policy.param_dtype, policy.reduce_dtype))
        whole = not reshards_after_forward(p.fsdp_reshard, p.pp > 1, last=False)  # kept to backward
        optim = optim / shards
        grads = grads / shards + (gather + reduce) * block
        params = params / shards + gather * (parameters if whole else 2 * block)
    micro = (p.pp_microbatches or 2 * p.pp) if p.pp > 1 else 1
    in_flight = min(p.pp, micro) if p.pp > 1 else 1  # 1F1B: the first stage keeps pp micro-batches
    tokens = d.batch_size // micro * d.seq_len // p.sp  # a sequence shard's tokens
    # the rows a full layer receives, with their norm, keys and values: kept per layer, except by a
    # checkpointed one, which has them sent again in backward (one such layer's at a time)
    if zigzag_split(cfg.model.layer_kinds, p.sp_split):  # the keys and values before the late piece
        halo = (p.sp - 0.5) * tokens * cfg.model.dim * value_bytes * 2 / p.tp
    else:  # the last shard's received rows, their norm, keys and values
        halo = (p.sp - 1) * tokens * cfg.model.dim * value_bytes * (2 + 2 / p.tp)
    every = cfg.train.activation_checkpointing_every
    acts, acts_ckpt = (in_flight * (activation_bytes(cfg.model, p.tp, tokens, layers, memory_layers, n,
                                                     value_bytes)
                                    + halo * (full_layers - checkpointed + min(checkpointed, 1)))
                       for n, checkpointed in ((0, 0), (every, -(-full_layers // every))))
    chosen = acts_ckpt if cfg.train.activation_checkpointing else acts
    return {"params": params, "grads": grads, "optim": optim, "acts": acts, "acts_ckpt": acts_ckpt,
            "total": params + grads + optim + chosen}


def available_memory(device: torch.device, local_processes: int) -> float:
    """Bytes this process may use: the GPU's memory less the reserve, or on CPU its share of the memory
    the system reports available (MemAvailable)."""
    if device.type == "cuda":
        return (1 - RESERVE) * torch.cuda.get_device_properties(device).total_memory
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024 / max(local_processes, 1)
    except (OSError, KeyError, ValueError):
        return float("inf")  # unknown: no check


def preflight_problem(cfg: RunConfig, dp: int, parameters: int, layers: int, memory_layers: int,
                      device: torch.device, local_processes: int, value_bytes: int, full_layers: int = 0
                      ) -> str | None:
    """Why this rank's run cannot fit in memory (the numbers and what to change), or None if it can."""
    need = rank_memory(cfg, dp, parameters, layers, memory_layers, value_bytes, full_layers)
    have = available_memory(device, local_processes)
    if need["total"] <= have:
        return None
    parts = ", ".join(f"{k} {need[k] / GIB:.1f}" for k in ("params", "grads", "optim"))
    acts = need["acts_ckpt"] if cfg.train.activation_checkpointing else need["acts"]
    return (f"this run needs about {need['total'] / GIB:.1f} GiB per process ({parts}, activations "
            f"{acts / GIB:.1f}) but {have / GIB:.1f} GiB are available on {device}: lower data.batch_size or "
            f"data.seq_len, {remedies(cfg)}, or set train.allow_oversubscribe=true to try anyway "
            "(python -m parallel.plan shows the estimate)")


def remedies(cfg: RunConfig) -> str:
    """What else frees memory: activation checkpointing only where it is off."""
    ckpt = "" if cfg.train.activation_checkpointing else "turn on train.activation_checkpointing, "
    return f"{ckpt}raise parallel.tp / parallel.pp / parallel.zero_stage, or set parallel.fsdp=true"


def plan(cfg: RunConfig, gpus: int, gpu: str, mfu: float) -> tuple[list[dict], dict]:
    """Per-rank rows and a summary for `gpus` GPUs of kind `gpu` at the assumed MFU."""
    p, d = cfg.parallel, cfg.data
    model_parallel = p.tp * p.pp * p.sp
    if gpus % model_parallel:
        raise ConfigError(f"--gpus {gpus} is not a multiple of tp·pp·sp = {model_parallel}")
    dp = gpus // model_parallel
    memory_gib, peak = GPUS[gpu]
    rows = []
    for rank in local_parameter_counts(cfg):
        need = rank_memory(cfg, dp, rank.parameters, rank.layers, rank.memory_layers,
                           full_layers=rank.full_layers)
        rows.append({"tp": rank.tp_rank, "pp": rank.pp_rank, "stages": rank.stages,
                     "parameters": rank.parameters, **{f"{k}_gib": v / GIB for k, v in need.items()},
                     "fits": need["total"] <= (1 - RESERVE) * memory_gib * GIB})
    tokens_per_step = d.batch_size * d.seq_len * cfg.train.grad_accum * dp
    per_token = training_flops_per_token(cfg.model, d.seq_len)
    extra = last_shard_extra_flops(cfg)  # the step waits for the busiest rank
    step_s = (per_token + extra) * tokens_per_step / (gpus * peak * mfu)
    summary = {"gpus": gpus, "gpu": gpu, "dp": dp, "tokens_per_step": tokens_per_step, "mfu": mfu,
               "step_s": step_s, "tokens_per_s": tokens_per_step / step_s,
               "last_shard_extra": extra / per_token, "go": all(r["fits"] for r in rows),
               "stages": n_stages(p)}
    return rows, summary


def last_shard_extra_flops(cfg: RunConfig) -> float:
    """Training FLOPs a token of the busiest sequence shard costs beyond the mean token, from full
    attention: the last contiguous shard's queries see every earlier row ((2 − 1/sp) × the mean's keys)
    and it projects every earlier shard's keys and values (sp − 1 rows per row of its own); under a zigzag
    split every rank's queries see the mean's keys, and each row's keys and values are projected twice
    (for the gather, and beside its query). 0 without sp or full attention."""
    m, sp = cfg.model, cfg.parallel.sp
    full = m.layer_kinds.count("full")
    if sp == 1 or not full:
        return 0.0
    inner = m.n_heads * m.head_dim
    mean_keys = (cfg.data.seq_len + 1) / 2  # a causal query's, averaged over the sequence
    if zigzag_split(m.layer_kinds, cfg.parallel.sp_split):
        return 3 * full * 2 * 2 * m.dim * inner
    scores = 2 * 2 * inner * mean_keys * (1 - 1 / sp)
    keys_values = 2 * 2 * m.dim * inner * (sp - 1)
    return 3 * full * (scores + keys_values)


CHECKPOINT_BYTES_PER_PARAMETER = 12  # float32 weights and AdamW's two moments


def checkpoint_line(cfg: RunConfig, parameters: int, dp: int) -> str:
    """What one checkpoint asks of the host: the largest part one rank writes (float32 weights and AdamW's
    two moments of its tp shard and stage, or its slice of them), and where FSDP gathers it."""
    p = cfg.parallel
    state = CHECKPOINT_BYTES_PER_PARAMETER * parameters  # the largest rank's
    if p.fsdp and dp > 1 and p.fsdp_checkpoint == "sharded":
        return (f"checkpoint: every rank writes its FSDP slice, {state / (p.fsdp_shard or dp) / GIB:.2f} GiB "
                "at most")
    where = ("gathered into rank 0's host memory first; parallel.fsdp_checkpoint=sharded writes slices"
             if p.fsdp and dp > 1 else "written by dp rank 0 of each tp shard and stage")
    return f"checkpoint: up to {state / GIB:.2f} GiB of state per file, {where}"


def format_plan(cfg: RunConfig, rows: list[dict], summary: dict) -> str:
    p = cfg.parallel
    ckpt = "on" if cfg.train.activation_checkpointing else "off"
    recompute = "on" if cfg.model.recompute_memory else "off"
    gathered = "fp32" if fsdp_policy(p, 2).param_dtype is None else "bf16"  # the planner's runs are bf16
    sharding = (f"FSDP over {p.fsdp_shard or summary['dp']} dp ranks, gathered in {gathered}" if p.fsdp
                else f"ZeRO stage {p.zero_stage}")
    lines = [f"layout tp={p.tp} pp={p.pp} sp={p.sp} dp={summary['dp']} on {summary['gpus']} × "
             f"{summary['gpu']}, {sharding}, {summary['stages']} pipeline stage(s), "
             f"activation checkpointing {ckpt}, memory recompute {recompute}",
             "",
             "| tp rank | pp stage | parameters | params GiB | grads GiB | optim GiB | acts GiB (no ckpt) "
             "| acts GiB (ckpt) | total GiB | fits |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|"]
    for r in rows:
        lines.append(f"| {r['tp']} | {r['pp']} | {r['parameters']:,} | {r['params_gib']:.2f} | "
                     f"{r['grads_gib']:.2f} | {r['optim_gib']:.2f} | {r['acts_gib']:.2f} | "
                     f"{r['acts_ckpt_gib']:.2f} | {r['total_gib']:.2f} | {'yes' if r['fits'] else 'NO'} |")
    extra = summary["last_shard_extra"]
    zigzag = zigzag_split(cfg.model.layer_kinds, p.sp_split)
    why = ("attention projects its zigzag pieces' keys and values twice" if zigzag else
           "attention in the last shard sees every earlier row")
    busiest = (f" (the busiest sequence shard's, {extra:.0%} more FLOPs a token than the mean: full {why})"
               if extra else "")
    lines += ["", f"{summary['tokens_per_step']:,} tokens per step; at MFU {summary['mfu']:.0%}: "
                  f"{summary['step_s']:.2f} s per step{busiest}, {summary['tokens_per_s']:,.0f} tokens/s",
              checkpoint_line(cfg, max(r["parameters"] for r in rows), summary["dp"]),
              "verdict: " + ("GO" if summary["go"] else f"NO-GO: {remedies(cfg)}, or lower data.batch_size")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m parallel.plan",
        description="Per-rank parameters, memory (go / no-go) and step time of a run config under a "
                    "layout; shards are built on the meta device, nothing is allocated.")
    parser.add_argument("--config", required=True, help="YAML run config")
    parser.add_argument("--gpus", type=int, default=0,
                        help="number of GPUs (default: tp·pp·sp, i.e. dp=1)")
    parser.add_argument("--gpu", choices=sorted(GPUS), default="h100-80gb", help="GPU kind (memory, peak)")
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOP utilisation (0.4)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tp=2 parallel.pp=4")
    args = parser.parse_intermixed_args(argv)
    if args.gpus < 0:
        parser.error(f"--gpus must be >= 1 (0: tp·pp·sp), got {args.gpus}")
    if not 0 < args.mfu <= 1:
        parser.error(f"--mfu is a fraction of the GPU's peak, in (0, 1], got {args.mfu}")
    try:
        cfg = load_config(args.config, args.overrides)
        p = cfg.parallel
        rows, summary = plan(cfg, args.gpus or p.tp * p.pp * p.sp, args.gpu, args.mfu)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    print(format_plan(cfg, rows, summary))
    return 0 if summary["go"] else 1


if __name__ == "__main__":
    sys.exit(main())
