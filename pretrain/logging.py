"""TensorBoard (and optionally Weights & Biases) scalars, a progress bar for the terminal, and the peak
FLOP/s used for MFU."""

from __future__ import annotations

import secrets
import sys
import time
from pathlib import Path
from typing import Any

import torch

# Dense bf16 peak FLOP/s per GPU model (marketing figures without sparsity), for MFU.
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_flops(device: torch.device) -> float:
    """Peak FLOP/s of one device, or 0 when unknown (CPU): MFU is then not logged."""
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in GPU_PEAK_FLOPS.items() if k in name), 0.0)


def step_figures(tokens: int, seconds: float, flops_per_token: float, peak: float,
                 device: torch.device) -> dict[str, float]:
    """One step's throughput over the job, by its TensorBoard names: MFU where the peak is known, and the
    peak memory allocated on a GPU (this rank's)."""
    figures = {"perf/tokens_per_s": tokens / seconds, "perf/flops_per_s": flops_per_token * tokens / seconds}
    if peak:
        figures["perf/mfu"] = figures["perf/flops_per_s"] / peak
    if device.type == "cuda":
        figures["perf/peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return figures


def describe_figures(figures: dict[str, float]) -> str:
    """`step_figures` beyond tokens/s, for a log line."""
    flops = figures["perf/flops_per_s"]
    parts = [f"{flops / 1e12:,.1f} TFLOP/s" if flops >= 1e12 else f"{flops / 1e9:,.2f} GFLOP/s"]
    if "perf/mfu" in figures:
        parts.append(f"MFU {figures['perf/mfu']:.1%}")
    if "perf/peak_memory_gib" in figures:
        parts.append(f"peak mem {figures['perf/peak_memory_gib']:.1f} GiB")
    return " | ".join(parts)


WANDB_ID_FILE = "wandb_id"  # in out_dir: a resumed run continues its Weights & Biases run


class MetricsLogger:
    """TensorBoard scalars, and the same to Weights & Biases when `wandb` names a project.

    A resumed run passes `purge_step` (the checkpoint's step + 1): TensorBoard then drops the events a
    crashed invocation logged after its last checkpoint, instead of the steps trained again showing twice
    as a zigzag. Weights & Biases keeps one run per out_dir (its id in `wandb_id`), and its charts use the
    training step as their x axis (`trainer/step`), since its own step counter may not go back."""

    def __init__(self, log_dir: Path, purge_step: int | None = None, wandb: dict[str, Any] | None = None,
                 run_config: dict[str, Any] | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)
        self.wandb = None
        if wandb:
            self.wandb = start_wandb(log_dir.parent, wandb, run_config or {})

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        if self.wandb is not None:
            self.wandb.log({**values, "trainer/step": step})

    def text(self, name: str, value: str) -> None:
        self.writer.add_text(name, f"```\n{value}\n```")

    def close(self) -> None:
        self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def start_wandb(out_dir: Path, settings: dict[str, Any], run_config: dict[str, Any]) -> Any:
    """A Weights & Biases run under out_dir/wandb: a new one, or the one whose id out_dir keeps. Offline
    where the nodes have no internet: WANDB_MODE=offline, then `wandb sync out_dir/wandb/offline-run-*`."""
    import wandb

    id_file = out_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
    run = wandb.init(project=settings["project"], entity=settings.get("entity") or None,
                     name=settings.get("name") or out_dir.name, id=run_id, resume="allow",
                     dir=str(out_dir), config=run_config)
    id_file.write_text(run_id + "\n")
    run.define_metric("trainer/step")
    run.define_metric("*", step_metric="trainer/step")
    return run


class ProgressBar:
    """A progress bar on stderr: one line rewritten in place on a terminal; elsewhere (a Slurm log, a pipe)
    a line every `every` steps (0: every 10 %) with the details a log reader needs (lr, grad norm, MFU,
    memory), as torchtitan and Megatron-LM log. The rate and ETA count from the end of the first step: it
    carries one-off work (compiling under train.compile, the allocator's growth) that would otherwise skew
    them for the whole run."""

    def __init__(self, total: int, enabled: bool = True, every: int = 0) -> None:
        self.total, self.enabled, self.every = total, enabled, every
        self.first: tuple[int, float] | None = None  # (step, time) at the end of the first step
        self.tty = sys.stderr.isatty()
        self.last_printed = -1

    def update(self, step: int, throughput: str = "", details: str = "", **metrics: float) -> None:
        """`throughput` (e.g. tokens/s) shows on a terminal too, `details` only in a log."""
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.first is None:
            self.first = (step, now)
        done, elapsed = step - self.first[0], now - self.first[1]
        rate = done / elapsed if done > 0 and elapsed > 0 else None
        speed = f"{rate:.2f} it/s eta {(self.total - step) / rate:.0f}s" if rate else "eta -"
        width = 30
        filled = int(width * step / self.total)
        bar = "#" * filled + "." * (width - filled)
        fields = [f"[{bar}] {step}/{self.total}", *(f"{k} {v:.4f}" for k, v in metrics.items()), throughput]
        if self.tty:
            sys.stderr.write("\r" + " | ".join(filter(None, [*fields, speed])))
            sys.stderr.flush()
            return
        mark = step // self.every if self.every else step * 10 // self.total
        if mark != self.last_printed or step == self.total:
            self.last_printed = mark
            print(" | ".join(filter(None, [*fields, details, speed])), file=sys.stderr, flush=True)

    def write(self, message: str) -> None:
        if self.enabled:
            if self.tty:
                sys.stderr.write("\n")
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")
