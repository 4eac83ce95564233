"""Fully sharded data parallelism: torch's FSDP2 (`fully_shard`) applied from outside, as torchtitan's
`apply_fsdp` does. Parameters, gradients and AdamW's state are sharded over the data-parallel group (what
ZeRO-3 shards), and each block's parameters are gathered just before the block runs and freed after it.

    loss_module = CausalLMLoss(model)
    apply_fsdp(loss_module, model, mesh)   # in place: each block a unit, the root holds embed, norm, head
    optimizer = AdamW(model.parameters())  # built after, on the sharded parameters
    state = full_model_state(model, keep=mesh.dp_rank == 0)  # collective: the state without FSDP

Why the root is the model *with its loss*: the loss reads the head's weight outside `TitansLM.forward`
(`pretrain/loss.py` fuses the head into the cross-entropy), so the unit whose hooks gather the embedding,
final norm and head must be the module whose forward runs the loss; under a pipeline the root is the
stage and stays gathered until its backward (the last stage's loss reads the head after its forward).
Unlike DeepSpeed's ZeRO-3, FSDP2 composes with tensor and pipeline parallelism (each tp shard or stage is
sharded again over dp: torchtitan's 2D and 3D) and with `torch.compile`d blocks (dynamo leaves its hooks
outside the graph).

Checkpoints are written gathered: the model and AdamW state dicts equal those of the same run without
FSDP (a dense `state.pt`, or the tp shard files), so a run may switch FSDP on or off when it resumes, and
every tool that reads checkpoints (conversion, export, evaluation) reads these. Each tensor is gathered in
turn; rank 0 keeps them on the CPU.

Precision: the shards (the master weights AdamW updates) stay float32. Under bf16 autocast each block is
gathered in bfloat16 by default (`parallel.fsdp_param_dtype`, torchtitan's `mixed_precision_param`): half
the bytes of every gather and of the gathered copies, and the matmuls read them as autocast would have
cast them. What stays as under autocast: block inputs are not cast (the residual stream and a relayed
memory state keep their dtype; `cast_forward_inputs=False`), the embedding's rows are upcast to float32 so
the residual stream stays float32, and the memory's state and update run in float32 from its bfloat16
initial weights (`NeuralMemory.state_dtype`). Gradients are reduce-scattered in float32 by default
(`parallel.fsdp_reduce_dtype`). When a block is freed again, after its forward or after its backward,
follows torchtitan's rule (`parallel.fsdp_reshard`, `reshards_after_forward`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor

from parallel.mesh import LayoutError, Mesh
from titans.blocks import halo_halves

# attributes that tensor parallelism sets on a parameter (megatron-core's, ours): FSDP2 replaces each
# parameter by a sharded one, and gradient clipping and the checkpoint layout still need them
PARAMETER_ATTRIBUTES = ("tensor_model_parallel", "partition_dim", "partition_stride", "full_shape",
                        "tp_parts", "tied_copy", "allreduce", "sequence_parallel")


def precision_policy(param_dtype: str, reduce_dtype: str, precision: str) -> MixedPrecisionPolicy:
    """FSDP's policy for `parallel.fsdp_param_dtype` / `fsdp_reduce_dtype` in a run computing in
    `precision` ("bf16" or "fp32"): "auto" gathers in bfloat16 under bf16 autocast, else in float32."""
    if param_dtype == "auto":
        param_dtype = "bfloat16" if precision == "bf16" else "float32"
    if param_dtype == "bfloat16" and precision != "bf16":
        raise LayoutError(f"parallel.fsdp_param_dtype=bfloat16 needs bf16 compute, this run computes in "
                          f"{precision} (train.precision=auto is fp32 on a CPU): set train.precision=bf16")
    # float32: as the shards hold them (None: no cast, float64 in exactness tests); gradients gathered in
    # bfloat16 are reduced in float32 unless asked (None would reduce them in the gather's dtype)
    gather = torch.bfloat16 if param_dtype == "bfloat16" else None
    reduce = torch.bfloat16 if reduce_dtype == "bfloat16" else (torch.float32 if gather else None)
    return MixedPrecisionPolicy(param_dtype=gather, reduce_dtype=reduce, cast_forward_inputs=False)


def upcast_output(module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
    """A forward hook: the module's output in float32 at least (an embedding gathered in bfloat16 starts
    the residual stream in float32, as autocast's float32 embedding does)."""
    return output.to(torch.promote_types(output.dtype, torch.float32))


class CollectiveBytes:
    """While inside: the size of the whole tensors FSDP2's all-gathers and reduce-scatters on this rank
    assemble and split (the gathered parameters, the gradients before their reduction), in bytes by dtype
    name (`gathered`, `reduced`). A diagnostic for tests and benchmarks: FSDP2 calls torch.distributed's
    `all_gather_single` and `reduce_scatter_single`, which this wraps."""

    def __enter__(self) -> CollectiveBytes:
        self.gathered: dict[str, int] = {}
        self.reduced: dict[str, int] = {}
        self.real = torch_dist.all_gather_single, torch_dist.reduce_scatter_single
        torch_dist.all_gather_single = self._counted(self.real[0], self.gathered)
        torch_dist.reduce_scatter_single = self._counted(self.real[1], self.reduced)
        return self

    def __exit__(self, *exc: Any) -> None:
        torch_dist.all_gather_single, torch_dist.reduce_scatter_single = self.real

    @staticmethod
    def _counted(real: Callable, counts: dict[str, int]) -> Callable:
        def collective(*args: Any, **kwargs: Any) -> Any:
            whole = max((a for a in (*args, *kwargs.values()) if torch.is_tensor(a)), key=Tensor.numel)
            dtype = str(whole.dtype).removeprefix("torch.")
            counts[dtype] = counts.get(dtype, 0) + whole.numel() * whole.element_size()
            return real(*args, **kwargs)
        return collective


def dp_device_mesh(mesh: Mesh, shard: int) -> DeviceMesh:
    """This rank's dp group as a device mesh: 1-D (shard over every dp rank) when `shard` is 0 or dp, else
    2-D (replicate, shard): groups of `shard` consecutive dp ranks each hold one sharded copy, replicated
    across the groups (HSDP). Collective (every rank makes the new groups)."""
    layout = mesh.layout
    if shard in (0, layout.dp):
        return DeviceMesh.from_group(mesh.dp_group, mesh.device.type)
    if layout.dp % shard:
        raise LayoutError(f"parallel.fsdp_shard={shard} does not divide the {layout.dp} data-parallel ranks: "
                          f"use a divisor of {layout.dp} (0: all of them)")
    # global ranks in megatron-core's order (parallel/mesh.py), the dp dimension split into (replicate, shard)
    ranks = torch.arange(layout.world).reshape(layout.pp, layout.dp // shard, shard, layout.sp, layout.tp)
    by_dp = ranks.permute(0, 3, 4, 1, 2).reshape(-1, layout.dp // shard, shard)  # one (rep, shard) grid each
    shard_group, _ = torch_dist.new_subgroups_by_enumeration(by_dp.reshape(-1, shard).tolist())
    replicate_group, _ = torch_dist.new_subgroups_by_enumeration(by_dp.transpose(1, 2).reshape(
        -1, layout.dp // shard).tolist())
    grid = next(g for g in by_dp if mesh.rank in g)
    return DeviceMesh.from_group([replicate_group, shard_group], mesh.device.type, mesh=grid,
                                 mesh_dim_names=("replicate", "shard"))


def reshards_after_forward(mode: str, pipeline: bool, last: bool) -> bool:
    """Whether a block's parameters are freed after its forward (`parallel.fsdp_reshard`), torchtitan's
    rule: "always"; "never" (gathered from forward to backward: one all-gather a block and step, not two,
    for the memory of the whole model gathered); "default": always, except the last block (its backward
    comes next and would gather it at once) and under a pipeline (each micro-batch would gather again)."""
    if mode == "default":
        return not (pipeline or last)
    return mode == "always"


def apply_fsdp(root: nn.Module, model: nn.Module, mesh: Mesh, pipeline: bool = False, shard: int = 0,
               relay: bool = False, zigzag: bool = False, policy: MixedPrecisionPolicy | None = None,
               reshard: str = "default") -> FSDPModule:
    """Shard `model`'s parameters over the dp group (or over groups of `shard` dp ranks, replicated across
    them: `dp_device_mesh`): one FSDP unit per block, `root` (the module whose forward runs `model`, and
    the loss) the unit of everything else. `pipeline`: `root` is a pipeline stage, whose parameters stay
    gathered from its forward to its backward (the last stage computes its loss with the head after the
    stage's forward). `relay`: the blocks run under sequence parallelism, whose relay calls each block's
    halves around the attention halo instead of its forward: FSDP's gather before and its gradient
    reduce-scatter after are hooked on those (`zigzag`: on the one method that runs its pieces).
    `policy`: the dtypes parameters are gathered and gradients reduced in (`precision_policy`; default: as
    the shards hold them). `reshard`: when blocks are freed (`reshards_after_forward`). Returns the root."""
    policy = policy or precision_policy("float32", "float32", "fp32")
    dp_mesh = dp_device_mesh(mesh, shard)
    before = dict(model.named_parameters())
    for i, block in enumerate(model.blocks.values(), start=1):
        last = i == len(model.blocks)
        fully_shard(block, mesh=dp_mesh, mp_policy=policy,
                    reshard_after_forward=reshards_after_forward(reshard, pipeline, last))
        for method in halo_halves(block, zigzag) if relay else []:
            register_fsdp_forward_method(block, method)
    fully_shard(root, mesh=dp_mesh, reshard_after_forward=not pipeline, mp_policy=policy)
    # FSDP2 warns that a unit returned a view: a block returns its memory state, views of the scan's
    # outputs, which nothing modifies in place (the relay sends them, training drops them)
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDP\w*Block\) returned a view tensor")
    if model.embed is not None and policy.param_dtype is not None:
        model.embed.register_forward_hook(upcast_output)
    for name, param in model.named_parameters():
        for attribute in PARAMETER_ATTRIBUTES:
            if hasattr(before[name], attribute):
                setattr(param, attribute, getattr(before[name], attribute))
    return root


def is_sharded(tensor: Any) -> bool:
    return isinstance(tensor, DTensor)


def shard_group(tensor: DTensor) -> Any:
    """The process group over which an FSDP tensor's slices differ (its mesh's shard dimension): summing
    per-slice quantities over it counts each element once (HSDP replicates over the other)."""
    dims = [i for i, placement in enumerate(tensor.placements) if placement.is_shard()]
    return tensor.device_mesh.get_group(dims[0])


def local(tensor: Any) -> Any:
    """This rank's slice of an FSDP-sharded tensor; anything else as it is."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def local_numel(tensor: Tensor) -> int:
    """Elements this rank holds of a (possibly sharded) tensor: an FSDP shard, or a DeepSpeed ZeRO-3
    parameter's partition (its own tensor is empty)."""
    return tensor.ds_tensor.numel() if hasattr(tensor, "ds_tensor") else local(tensor).numel()


def gathered(value: Any, keep: bool) -> Any:
    """A DTensor gathered whole (a collective: every rank calls it), on the CPU where `keep`, else None
    (ranks that only take part in the gather); anything else as it is."""
    if not is_sharded(value):
        return value
    full = value.full_tensor()
    return full.cpu() if keep else None


def full_model_state(model: nn.Module, keep: bool) -> dict[str, Tensor]:
    """Collective: the model's state dict with every sharded tensor gathered (kept where `keep`)."""
    return {name: gathered(value, keep) for name, value in model.state_dict().items()}


def full_optimizer_state(optimizer: torch.optim.Optimizer, keep: bool) -> dict[str, Any]:
    """Collective: the optimizer's state dict with every sharded tensor gathered: what the same
    optimizer over unsharded parameters would return."""
    state = optimizer.state_dict()
    return {"param_groups": state["param_groups"],
            "state": {index: {key: gathered(value, keep) for key, value in entry.items()}
                      for index, entry in state["state"].items()}}


def local_model_state(model: nn.Module) -> dict[str, Any]:
    """This rank's slices of the model's state dict (no communication)."""
    return {name: local(value) for name, value in model.state_dict().items()}


def local_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """This rank's slices of the optimizer's state dict (no communication)."""
    state = optimizer.state_dict()
    return {"param_groups": state["param_groups"],
            "state": {index: {key: local(value) for key, value in entry.items()}
                      for index, entry in state["state"].items()}}


def placed_like(part: Tensor, like: Tensor) -> Tensor:
    """This rank's slice (saved by `local_model_state` / `local_optimizer_state`) placed as `like` is."""
    if not torch.is_tensor(part):
        return part
    part = part.to(like.device, like.dtype)
    if not is_sharded(like):
        return part
    return DTensor.from_local(part, like.device_mesh, like.placements, shape=like.shape, stride=like.stride())


def shard_like(full: Tensor, like: Tensor) -> Tensor:
    """This rank's shard of a whole tensor, placed as `like` is (no communication: every rank holds it);
    anything else (megatron-core layers' `_extra_state`) as it is."""
    if not torch.is_tensor(full):
        return full
    full = full.to(like.device, like.dtype)
    if not is_sharded(like):
        return full
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)


@torch.no_grad()
def load_full_model_state(model: nn.Module, state: dict[str, Tensor], place: Callable = shard_like) -> None:
    """Set a sharded model from a whole state dict (every rank holds it); `place=placed_like`: from this
    rank's slices instead."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise KeyError(f"the checkpoint has no {', '.join(missing[:3])}: the model configs differ")
    model.load_state_dict({name: place(state[name], value) for name, value in own.items()})


def load_full_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any],
                              place: Callable = shard_like) -> None:
    """Set a sharded model's optimizer from the state dict of the same optimizer over whole parameters;
    `place=placed_like`: from this rank's slices of it instead."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sharded = {index: {key: place(value, params[index]) if torch.is_tensor(value) and value.dim()
                       else value for key, value in entry.items()}  # (AdamW's step count stays whole)
               for index, entry in state["state"].items()}
    optimizer.load_state_dict({"param_groups": state["param_groups"], "state": sharded})
