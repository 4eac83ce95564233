"""DeepSpeed ZeRO (stages 1–3) for the training loop: our model, AdamW and settings → a DeepSpeed engine.

    zero = ZeroEngine(model, optimizer, stage=2, micro_batch=8, grad_accum=4, grad_clip=1.0,
                      precision="fp32", device=torch.device("cpu"))
    for each micro-batch:  loss = zero.engine(inputs, targets=targets)[0];  zero.backward(loss)
    grad_norm = zero.step()          # NaN when the step was skipped (non-finite loss or gradients)
    zero.save(dir) / zero.load(dir)  # every rank, collective: each rank writes / reads its own shard

Stage 1 shards the AdamW states over the data-parallel ranks, stage 2 the gradients too, stage 3 the
parameters too (gathered per module during forward and backward). Stage 0 is not handled here: the
training loop's plain path (DDP) is ZeRO-0. The DeepSpeed config is generated from ours
(`deepspeed_config`), never written by hand, so the YAML stays the one source of truth.

Choices, and why:
- The optimizer is our `torch.optim.AdamW` with our parameter groups (decay / no decay), passed to
  DeepSpeed as the client optimizer: ZeRO keeps its groups and hyper-parameters and replaces each group's
  parameters by this rank's flat fp32 partition. Our `LambdaLR` (warmup + cosine), built on that same
  AdamW, keeps driving the learning rate: it writes `lr` into the groups ZeRO steps with. It is *not*
  handed to DeepSpeed, so that the training loop steps it exactly as in the plain path (also on skipped
  steps) and saves it in its own state, as it does for stage 0.
- Precision. CPU: fp32. bf16 (the GPU default): DeepSpeed's `torch_autocast` mode, i.e. fp32 parameters
  and fp32 master weights with the forward under `torch.autocast(bfloat16)` — the same numerics as the
  plain path's autocast. (DeepSpeed's `bf16` section would instead store the model itself in bf16, the
  neural memory's weights and its inner updates included; that is a different model numerically.)
  `lower_precision_safe_modules` is empty, so gradients are reduced in fp32 as DDP does; listing
  "torch.nn.Linear" there halves the gradient traffic.
- Gradient accumulation, clipping and the gradient norm are DeepSpeed's (`gradient_accumulation_steps`,
  `gradient_clipping`, `get_global_grad_norm`: the norm before clipping, as `clip_grad_norm_` returns).
- Non-finite steps. ZeRO's optimizer already skips a step whose global gradient norm is inf/NaN (on every
  rank alike: the norm is all-reduced). A non-finite loss whose gradients happen to be finite would still
  be applied, so `backward` multiplies the loss by a factor that is exactly 1.0 when the loss is finite
  and NaN otherwise: values and gradients are bit-for-bit unchanged in the normal case, and a bad
  micro-batch on any rank poisons the reduced gradients, so all ranks skip that step together — the
  plain path's rule, with no extra collective.
- Checkpoints. ZeRO's optimizer state exists only as shards, one per rank, and stage 3's parameters too.
  Gathering them into one full state on rank 0 would need the whole model and optimizer in one process's
  memory, which is what ZeRO is there to avoid. So every rank calls DeepSpeed's own
  `save_checkpoint` into a `deepspeed/` folder inside our checkpoint's staging directory (tag "zero",
  no `latest` file of DeepSpeed's), flushes what it wrote, and only then does rank 0 write `state.pt`
  (step, data positions, RNG, scheduler, losses) and rename the directory: our atomic scheme, unchanged
  (pretrain/checkpoint.py: `begin_checkpoint`, `fsync_tree`, `save_checkpoint(staged=True)`). Resume
  loads the same folder with DeepSpeed's `load_checkpoint` — module, fp32 partitions and AdamW state of
  this rank — which is exact (bitwise on CPU); it needs the same number of data-parallel ranks, as the
  data loader's position does. `consolidated_state_dict` rebuilds the full fp32 model from the shards
  offline (DeepSpeed's `zero_to_fp32`), e.g. for export.
- A single process (world size 1) gets a one-rank process group from an in-memory store, so no
  MASTER_ADDR/PORT is needed; launched with torchrun/srun, the process group that
  `parallel.mesh` set up is the one DeepSpeed uses (`deepspeed.init_distributed` adopts it).

DeepSpeed is imported lazily: the plain path never imports it. Its JIT-compiled extensions (not needed
with the client AdamW; the CPU accelerator builds a shared-memory comm op on first use) are cached in
TORCH_EXTENSIONS_DIR, set to the repository's `.cache/torch_extensions` unless already set (or the
repository is not writable).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn

CHECKPOINT_DIR = "deepspeed"  # inside our checkpoint directory
CHECKPOINT_TAG = "zero"
EXTENSIONS_DIR = Path(__file__).resolve().parents[1] / ".cache" / "torch_extensions"


def deepspeed_config(stage: int, micro_batch: int, grad_accum: int, world_size: int, grad_clip: float,
                     precision: str) -> dict[str, Any]:
    """The DeepSpeed config for our run: batch sizes, accumulation, clipping, precision, ZeRO stage."""
    if stage not in (1, 2, 3):
        raise ValueError(f"ZeRO stage must be 1, 2 or 3 here (stage 0 is plain data parallel), got {stage}")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": stage},
        "steps_per_print": 2**31 - 1,  # the training loop logs
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    return config


def _ensure_process_group(device: torch.device) -> None:
    """DeepSpeed needs a process group: adopt the launcher's, or make a one-rank group for one process."""
    if torch_dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch_dist.init_process_group(backend, store=torch_dist.HashStore(), rank=0, world_size=1)


class ZeroEngine:
    """A DeepSpeed engine around `model` and its client `optimizer`, with what the training loop needs.

    `config_overrides` are merged into the generated config one level deep (e.g. {"zero_optimization":
    {"stage3_param_persistence_threshold": 0}}); `local_rank` is exported as LOCAL_RANK if unset."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, stage: int, micro_batch: int,
                 grad_accum: int, grad_clip: float, precision: str, device: torch.device, local_rank: int = 0,
                 config_overrides: dict[str, Any] | None = None) -> None:
        if os.access(EXTENSIONS_DIR.parents[1], os.W_OK):  # a checkout (not a read-only install)
            os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(EXTENSIONS_DIR))
        os.environ.setdefault("LOCAL_RANK", str(local_rank))  # DeepSpeed asserts it (srun sets SLURM_LOCALID)
        if device.type == "cpu":  # chosen, not a failed detection: DeepSpeed would warn once per rank
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # DeepSpeed's own calls of a torch collective torch has renamed: nothing a user can act on
        warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor` is deprecated",
                                category=FutureWarning)
        import deepspeed  # lazily: slow to import, and stage 0 never needs it

        _ensure_process_group(device)
        said = io.StringIO()
        with contextlib.redirect_stdout(said):  # "... shm_comm_op built successfully", once per rank on CPU
            deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
        print("".join(line for line in said.getvalue().splitlines(keepends=True)
                      if not line.rstrip().endswith("built successfully")), end="", flush=True)
        world_size = torch_dist.get_world_size()
        self.config = deepspeed_config(stage, micro_batch, grad_accum, world_size, grad_clip, precision)
        for key, value in (config_overrides or {}).items():
            if isinstance(value, dict):
                self.config.setdefault(key, {}).update(value)
            else:
                self.config[key] = value
        self.stage, self.grad_accum, self.world_size = stage, grad_accum, world_size
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                 config=self.config)
        self.model = model  # = self.engine.module: its forward gathers stage-3 parameters itself
        self._micro = 0

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's mean loss (DeepSpeed divides by the accumulation steps)."""
        detached = loss.detach()
        factor = torch.where(torch.isfinite(detached), torch.ones_like(detached),
                             torch.full_like(detached, math.nan))
        self.engine.backward(loss * factor)  # exactly loss when finite; poisons the gradients otherwise
        self._micro += 1
        if self._micro < self.grad_accum:
            self.engine.step()  # not a boundary: DeepSpeed only counts the micro-step

    def step(self) -> float:
        """The optimizer step after the last micro-batch; returns the gradient norm before clipping,
        NaN if the step was skipped (non-finite loss or gradients on some rank)."""
        if self._micro != self.grad_accum:
            raise RuntimeError(f"step() after {self._micro} backward calls, expected {self.grad_accum}")
        self.engine.step()
        self._micro = 0
        if not self.engine.was_step_applied():
            return math.nan
        norm = self.engine.get_global_grad_norm()
        return math.nan if norm is None else float(norm)

    def save(self, directory: str | Path) -> None:
        """Collective: every rank writes DeepSpeed's checkpoint (its shard) into `directory`."""
        self.engine.save_checkpoint(str(directory), tag=CHECKPOINT_TAG, client_state={}, save_latest=False)

    def load(self, directory: str | Path) -> None:
        """Collective: every rank restores the module, its fp32 partition and its AdamW state."""
        directory = Path(directory)
        shards = sorted((directory / CHECKPOINT_TAG).glob("*optim_states.pt"))
        if not shards:
            raise FileNotFoundError(f"no DeepSpeed ZeRO checkpoint in {directory / CHECKPOINT_TAG}")
        if len(shards) != self.world_size:
            raise RuntimeError(f"ZeRO checkpoint {directory} has {len(shards)} optimizer shard(s) but this "
                               f"run has {self.world_size} data-parallel rank(s): resume with the same "
                               "number of ranks (or consolidate it: parallel.zero.consolidated_state_dict)")
        path, _ = self.engine.load_checkpoint(str(directory), tag=CHECKPOINT_TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the ZeRO checkpoint in {directory}")


def consolidated_state_dict(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The full fp32 model state dict of a ZeRO checkpoint (our checkpoint directory), from all shards.

    Runs in one process without a process group (DeepSpeed's `zero_to_fp32`)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    folder = str(Path(checkpoint) / CHECKPOINT_DIR)
    state = get_fp32_state_dict_from_zero_checkpoint(folder, tag=CHECKPOINT_TAG)
    # the engine wraps the model with its loss (pretrain.loss.CausalLMLoss): keys as the model has them
    return {key.removeprefix("model."): value for key, value in state.items()}
