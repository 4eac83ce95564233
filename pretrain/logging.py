"""TensorBoard scalars, a progress bar for the terminal, and the peak FLOP/s used for MFU."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

# Dense bf16 peak FLOP/s per GPU model (marketing figures without sparsity), for MFU.
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_flops(device: torch.device) -> float:
    """Peak FLOP/s of one device, or 0 when unknown (CPU): MFU is then not logged."""
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in GPU_PEAK_FLOPS.items() if k in name), 0.0)


class MetricsLogger:
    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def text(self, name: str, value: str) -> None:
        self.writer.add_text(name, f"```\n{value}\n```")

    def close(self) -> None:
        self.writer.close()


class ProgressBar:
    """A one-line progress bar on stderr (rewritten in place on a terminal, every 10% otherwise). The rate
    and ETA count from the end of the first step: it carries one-off work (compiling under train.compile,
    the allocator's growth) that would otherwise skew them for the whole run."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total, self.enabled = total, enabled
        self.first: tuple[int, float] | None = None  # (step, time) at the end of the first step
        self.tty = sys.stderr.isatty()
        self.last_printed = -1

    def update(self, step: int, **metrics: float) -> None:
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
        info = " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        bar = "#" * filled + "." * (width - filled)
        line = f"[{bar}] {step}/{self.total} {info} {speed}"
        if self.tty:
            sys.stderr.write("\r" + line)
            sys.stderr.flush()
        elif step * 10 // self.total != self.last_printed or step == self.total:
            self.last_printed = step * 10 // self.total
            print(line, file=sys.stderr, flush=True)

    def write(self, message: str) -> None:
        if self.enabled:
            if self.tty:
                sys.stderr.write("\n")
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")
