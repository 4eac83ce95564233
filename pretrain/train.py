"""The main job: `python -m pretrain.train --config configs/<run>.yaml [section.key=value ...]`.

Trains a TitansLM with AdamW, warmup + cosine, clipping and accumulation; logs to TensorBoard; writes
atomic checkpoints and resumes from the latest one by default; SIGTERM / SIGUSR1 save and exit cleanly.
Launch with `torchrun` or `srun` for several processes (data-parallel over gloo on CPU, NCCL on GPU);
`train.zero_stage` 1–3 trains through a DeepSpeed ZeRO engine instead of DDP (parallel/zero.py).
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from parallel.zero import CHECKPOINT_DIR as ZERO_CHECKPOINT_DIR
from parallel.zero import ZeroEngine
from pretrain.checkpoint import (
    begin_checkpoint,
    fsync_tree,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    staging_dir,
)
from pretrain.config import ConfigError, RunConfig, load_config
from pretrain.data import Batch, build_loaders
from pretrain.distributed import Distributed, init_distributed
from pretrain.logging import MetricsLogger, ProgressBar, peak_flops
from titans.flops import training_flops_per_token
from titans.memory import NeuralMemory
from titans.model import TitansLM, count_parameters


class NonFiniteLossError(RuntimeError):
    """Raised after `train.max_nonfinite_steps` non-finite losses in a row."""


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # per optimizer step (NaN for skipped steps)
    val_losses: dict[int, float] = field(default_factory=dict)
    skipped_steps: int = 0
    last_step: int = 0
    checkpoint: Path | None = None
    stopped_by_signal: bool = False


def lr_at(step: int, cfg: RunConfig) -> float:
    """Linear warmup to lr, then cosine to lr · min_lr_ratio at the last step."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    """AdamW; matrices decay, vectors (norm gains, biases) and the learned initial memory do not."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "init_weights" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=cfg.train.betas)


def memory_modules(model: nn.Module) -> list[tuple[int, NeuralMemory]]:
    return [(i, m) for i, block in enumerate(model.blocks) for m in block.modules()
            if isinstance(m, NeuralMemory)]


def loss_on(model: nn.Module, batch: torch.Tensor | Batch, autocast: torch.autocast) -> torch.Tensor:
    """Mean (or weighted mean) next-token loss; through the DDP wrapper's forward when there is one."""
    tokens, weights = batch if isinstance(batch, Batch) else (batch, None)
    with autocast:
        loss, _ = model(tokens[:, :-1], targets=tokens[:, 1:], weights=weights)
    return loss


@torch.no_grad()
def evaluate(model: nn.Module, batches, autocast: torch.autocast, dist: Distributed) -> float:
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64), 0
    for batch in batches:
        total += loss_on(model, batch.to(dist.device), autocast).double().cpu()
        count += 1
    model.train()
    stats = torch.tensor([total.item(), float(count)], dtype=torch.float64)
    dist.all_reduce_sum(stats)
    return (stats[0] / max(stats[1], 1.0)).item()


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class StopSignal:
    """SIGTERM / SIGUSR1 (Slurm's preemption warnings) set a flag; the loop saves and exits."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def train(cfg: RunConfig, dist: Distributed | None = None) -> TrainResult:
    """Run (or resume) the configured training; returns the per-step losses and where it saved."""
    dist = dist or init_distributed()
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    torch.manual_seed(t.seed)
    out = Path(t.out_dir)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    model = TitansLM(cfg.model).to(dist.device)
    model.checkpoint_blocks = t.activation_checkpointing
    n_params = count_parameters(model)  # before ZeRO-3 partitions the parameters
    precision = ("bf16" if dist.device.type == "cuda" else "fp32") if t.precision == "auto" else t.precision
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, cfg) / t.lr)
    zero: ZeroEngine | None = None
    if t.zero_stage == 0:
        ddp_model = dist.wrap(model)
    else:  # the engine wraps model and optimizer; our scheduler keeps setting the optimizer's lr
        zero = ZeroEngine(model, optimizer, stage=t.zero_stage, micro_batch=cfg.data.batch_size,
                          grad_accum=t.grad_accum, grad_clip=t.grad_clip, precision=precision,
                          device=dist.device, local_rank=dist.local_rank)
        ddp_model = zero.engine
    train_loader, val_batches = build_loaders(cfg, dist.rank, dist.world_size, dist.barrier)

    result, step = TrainResult(), 0
    ckpt = latest_checkpoint(out) if t.resume else None
    if ckpt is not None:
        state = load_checkpoint(ckpt)
        saved_stage = state.get("config", {}).get("train", {}).get("zero_stage", 0)
        if saved_stage != t.zero_stage:
            raise RuntimeError(f"checkpoint {ckpt} was written with train.zero_stage={saved_stage}, this run "
                               f"has train.zero_stage={t.zero_stage}: resume with the same stage")
        if zero is None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        else:  # every rank loads its own shard
            zero.load(ckpt / ZERO_CHECKPOINT_DIR)
        scheduler.load_state_dict(state["scheduler"])
        if zero is not None:  # the scheduler's state does not carry the lr into the optimizer's groups
            for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
                group["lr"] = lr
        train_loader.load_state_dict(state["data"][dist.rank])
        set_rng_state(state["rng"][dist.rank])
        step = state["step"]
        result.losses = list(state.get("losses", []))
        dist.print(f"resumed from {ckpt} at step {step}")

    autocast = torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len * t.grad_accum * dist.world_size
    flops_per_step = training_flops_per_token(cfg.model, cfg.data.seq_len) * tokens_per_step
    peak = peak_flops(dist.device) * dist.world_size
    memories = memory_modules(model)
    logger = MetricsLogger(out / "tensorboard") if dist.is_main else None
    if logger:
        logger.text("config", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    dist.print(f"model: {n_params:,} parameters, layers {','.join(cfg.model.layer_kinds)}; "
               f"{tokens_per_step:,} tokens per step; device {dist.device}, world size {dist.world_size}"
               + (f", ZeRO stage {t.zero_stage}" if zero else ""))
    stop = StopSignal()
    bar = ProgressBar(t.steps, start=step, enabled=dist.is_main)
    data_iter = iter(train_loader)
    first_step = step
    nonfinite_in_a_row = 0

    def checkpoint_state() -> dict[str, Any]:
        state = {"scheduler": scheduler.state_dict(), "step": step, "losses": result.losses,
                 "data": dist.gather_objects(train_loader.state_dict()),
                 "rng": dist.gather_objects(rng_state()), "config": cfg.to_dict()}
        if zero is None:
            state.update(model=model.state_dict(), optimizer=optimizer.state_dict())
        else:  # model and optimizer are in the ranks' DeepSpeed shards (see save)
            state["zero"] = {"stage": t.zero_stage, "dir": ZERO_CHECKPOINT_DIR, "world_size": dist.world_size}
        return state

    def save() -> None:
        state = checkpoint_state()  # every rank takes part in the gathers
        if zero is not None:  # each rank writes its shard into the staging directory, then rank 0 commits
            if dist.is_main:
                begin_checkpoint(out, step)
            dist.barrier()
            shards = staging_dir(out, step) / ZERO_CHECKPOINT_DIR
            zero.save(shards)
            fsync_tree(shards)
            dist.barrier()
        if dist.is_main:
            result.checkpoint = save_checkpoint(out, step, state, t.keep_last, staged=zero is not None)
        dist.barrier()

    while step < t.steps:
        started = time.perf_counter()
        log_now = (step + 1) % t.log_every == 0 or step == 0
        for _, m in memories:
            m.record_stats = log_now
        loss_sum = torch.zeros((), device=dist.device)
        for micro in range(t.grad_accum):
            batch = next(data_iter).to(dist.device, non_blocking=True)
            if zero is not None:
                loss = loss_on(ddp_model, batch, autocast)
                zero.backward(loss)
            else:
                with dist.no_sync(ddp_model, last=micro == t.grad_accum - 1):
                    loss = loss_on(ddp_model, batch, autocast)
                    (loss / t.grad_accum).backward()
            loss_sum += loss.detach()
        loss_value = dist.mean(loss_sum / t.grad_accum)
        if zero is not None:  # DeepSpeed clips and steps, or skips a non-finite step on every rank
            grad_norm = zero.step()
        else:
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip).item()
        if not math.isfinite(grad_norm):  # a finite loss can still backpropagate inf/nan
            loss_value = float("nan")
        if not math.isfinite(loss_value):
            if zero is None:
                optimizer.zero_grad(set_to_none=True)
            nonfinite_in_a_row += 1
            result.skipped_steps += 1
            result.losses.append(float("nan"))
            dist.print(f"step {step + 1}: non-finite loss or gradient (grad norm {grad_norm}), step skipped "
                       f"({nonfinite_in_a_row} in a row)")
            if nonfinite_in_a_row >= t.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"stopping at step {step + 1}: {nonfinite_in_a_row} non-finite losses or gradients in a "
                    "row "
                    f"(train.max_nonfinite_steps={t.max_nonfinite_steps}); last good checkpoint: "
                    f"{latest_checkpoint(out)}")
        else:
            nonfinite_in_a_row = 0
            if zero is None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            result.losses.append(loss_value)
        scheduler.step()
        step += 1
        result.last_step = step
        elapsed = time.perf_counter() - started
        bar.update(step, loss=loss_value)
        if logger and log_now and math.isfinite(loss_value):
            logger.scalars(step, {"train/loss": loss_value, "train/lr": scheduler.get_last_lr()[0],
                                  "train/grad_norm": grad_norm,
                                  "perf/tokens_per_s": tokens_per_step / elapsed,
                                  "perf/flops_per_s": flops_per_step / elapsed})
            if peak:
                logger.scalars(step, {"perf/mfu": flops_per_step / elapsed / peak})
            for layer, m in memories:
                logger.scalars(step, {f"memory/layer{layer}/{k}": v.item() for k, v in m.stats.items()})
        if step % t.eval_every == 0 or step == t.steps:
            val = evaluate(model, val_batches(), autocast, dist)
            result.val_losses[step] = val
            if logger:
                logger.scalars(step, {"val/loss": val, "val/perplexity": math.exp(min(val, 50.0))})
            bar.write(f"step {step}: train loss {loss_value:.4f}, val loss {val:.4f}, "
                      f"val ppl {math.exp(min(val, 50.0)):.2f}")
        signalled = dist.any_flag(stop.received is not None)
        pause = t.stop_after_steps > 0 and step - first_step >= t.stop_after_steps
        if step % t.checkpoint_every == 0 or step == t.steps or signalled or pause:
            save()
        if signalled:
            bar.write(f"signal received: saved step {step} to {result.checkpoint}, exiting")
            result.stopped_by_signal = True
            break
        if pause:
            bar.write(f"train.stop_after_steps={t.stop_after_steps} reached: saved step {step} to "
                      f"{result.checkpoint}; run again to continue")
            break
    bar.close()
    stop.restore()
    for _, m in memories:
        m.record_stats = False
    if logger:
        logger.close()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.train",
        description="Train a Titans language model. Configuration comes from a YAML file with sections "
                    "model (titans.model.TitansConfig), data and train (pretrain.config); any field can "
                    "be overridden as section.key=value, e.g. train.steps=100 model.layers=mag.",
    )
    parser.add_argument("--config", help="YAML run config, e.g. configs/tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides: section.key=value")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    dist = init_distributed()
    try:
        result = train(cfg, dist)
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    out = Path(cfg.train.out_dir).resolve()
    if dist.is_main:
        first, last = result.losses[0], result.losses[-1]
        print(f"\ndone: {result.last_step} steps, loss {first:.3f} → {last:.3f}"
              + (f", {result.skipped_steps} skipped" if result.skipped_steps else ""))
        print(f"checkpoint:  {result.checkpoint}")
        print(f"config:      {out / 'config.yaml'}")
        print(f"tensorboard: tensorboard --logdir {out / 'tensorboard'}   (then open http://localhost:6006)")
    dist.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
