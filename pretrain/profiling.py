"""`train.profile_start` / `train.profile_steps`: torch.profiler over chosen training steps, per rank.

Why in the training job and not only in `bench/`: a user's own layout, data and sizes are what need
explaining when their tokens/s is low, and a benchmark cannot reproduce them. As torchtitan and Megatron-LM
do, a window of steps is profiled after warm-up (the first steps compile, fill the allocator and the data
workers), and each rank writes its own trace, so a slow pipeline stage or a rank waiting on the others
shows. The step before the window runs under the profiler too and is discarded (its own start-up cost).

Each rank writes, under `<out_dir>/profile/steps<first>-<last>/`:
- `rank<R>.trace.json.gz`: the Chrome trace, gzipped (open it in https://ui.perfetto.dev or chrome://tracing);
- `rank<R>.txt`: ops by self time over the window (on a GPU, by device time), the table to read first.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

TABLE_ROWS = 30


class StepProfiler:
    """Profiles training steps `start` .. `start + count - 1` (numbered from 1, as the log prints them)."""

    def __init__(self, start: int, count: int, out_dir: Path, rank: int, device: torch.device) -> None:
        self.start, self.last = start, start + count - 1
        self.dir = Path(out_dir) / "profile" / f"steps{self.start}-{self.last}"
        self.rank, self.cuda = rank, device.type == "cuda"
        self.profiler: profile | None = None
        self.table: str | None = None  # this rank's table of ops, once the window is over

    def next_step(self, step: int) -> bool:
        """Call before running step `step` (and `stop` after the loop): a profiled step ends where the next
        one begins, its logging, validation and checkpoint included. True when this call ended the window."""
        if self.profiler is not None:
            if step > self.last:
                return self.stop()
            self.profiler.step()
        elif self.table is None and step in (self.start - 1, self.start):
            warmup = 1 if step < self.start else 0
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            self.profiler = profile(activities=activities, record_shapes=True,
                                    # numbered from `step`: the trace's ProfilerStep#N are the log's steps
                                    schedule=schedule(skip_first=step, wait=0, warmup=warmup,
                                                      active=self.last - self.start + 1, repeat=1),
                                    on_trace_ready=self.write)
            self.profiler.step_num = step
            self.profiler.start()
        return False

    def stop(self) -> bool:
        """Ends the profiler, at the window's end or where the run stops inside it (what ran is written);
        True when this call ended it."""
        if self.profiler is None:
            return False
        profiler, self.profiler = self.profiler, None
        profiler.stop()
        return True

    def write(self, profiler: profile) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        profiler.export_chrome_trace(str(self.dir / f"rank{self.rank}.trace.json.gz"))
        sort_by = "self_device_time_total" if self.cuda else "self_cpu_time_total"
        table = profiler.key_averages().table(sort_by=sort_by, row_limit=TABLE_ROWS)
        self.table = f"steps {self.start}-{self.last}, rank {self.rank}, ops by {sort_by}\n{table}\n"
        (self.dir / f"rank{self.rank}.txt").write_text(self.table)
