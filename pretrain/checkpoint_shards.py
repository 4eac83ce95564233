"""Checkpoints of a model split over tp and pp ranks: each rank writes its own shard, rank 0 the layout.

Inside a checkpoint directory (pretrain/checkpoint.py makes it atomic and adds manifest.json with the
sha256 of every file):
    shards/model-tp{t}-pp{p}.pt        parameters of tp rank t, pipeline rank p (written by dp and sp rank 0)
    shards/optim-tp{t}-pp{p}.pt        AdamW state for those parameters (dp rank 0), or with ZeRO-1
    shards/optim-tp{t}-pp{p}-dp{d}.pt  each dp rank's partition of it
    shards/fsdp-tp{t}-pp{p}-dp{d}.pt   with parallel.fsdp_checkpoint=sharded instead of both: the model and
                                       AdamW state slices FSDP rank d of its shard group holds (sp rank 0;
                                       HSDP replica d mod replicas); joined along dim 0 in order of d, the
                                       tensors of the two files above

The layout record (in state.pt and manifest.json) says, per parameter, its full shape, the dimension
split over tp (and how many interleaved blocks that dimension holds, e.g. 3 for [θ ‖ η ‖ α]), and the
pipeline stage that holds it: enough to consolidate or reshard from the manifest alone (the conversion
tool). Resume needs the layout the checkpoint was written with.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from parallel.mesh import Layout, Mesh
from parallel.model import n_stages
from pretrain.config import ConfigError

SHARDS_DIR = "shards"


def _is_zero(optimizer: torch.optim.Optimizer) -> bool:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return isinstance(optimizer, ZeroRedundancyOptimizer)


def shard_files(mesh: Mesh, zero: bool) -> tuple[str, str]:
    """This rank's model and optimizer file names."""
    tp, pp = mesh.tp_rank, mesh.pp_rank
    optim = f"optim-tp{tp}-pp{pp}-dp{mesh.dp_rank}.pt" if zero else f"optim-tp{tp}-pp{pp}.pt"
    return f"model-tp{tp}-pp{pp}.pt", optim


def parameter_layout(models: list[nn.Module]) -> dict[str, dict[str, Any]]:
    """Per parameter of this rank: full shape, tp split dim (None: replicated) and parts, pipeline stage."""
    out = {}
    for model in models:
        for name, p in model.named_parameters():
            split = getattr(p, "tensor_model_parallel", False)
            out[name] = {"shape": list(getattr(p, "full_shape", p.shape)),
                         "tp_dim": p.partition_dim if split else None,
                         "tp_parts": getattr(p, "tp_parts", 1) if split else 1,
                         "pp_stage": getattr(model, "pipeline_stage", 0)}
    return out


def _save(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def shard_parts(directory: Path, models: list[nn.Module], optimizer: torch.optim.Optimizer, mesh: Mesh,
                cfg, model_state: dict[str, Any] | None = None,
                optimizer_state: dict[str, Any] | None = None) -> tuple[dict[Path, Any], dict[str, Any]]:
    """Collective: this rank's shard files under directory/shards (path → object, for `write_files`; none
    on ranks whose dp or sp peer writes the same) and the layout record. `model_state` /
    `optimizer_state`: what to write instead of the modules' state dicts (FSDP's, gathered over dp)."""
    zero = _is_zero(optimizer)
    model_file, optim_file = shard_files(mesh, zero)
    folder = directory / SHARDS_DIR
    writes = mesh.sp_rank == 0  # sequence shards hold the same parameters and optimizer state
    files: dict[Path, Any] = {}
    if writes and mesh.dp_rank == 0:
        files[folder / model_file] = (model_state if model_state is not None else
                                      {k: v for model in models for k, v in model.state_dict().items()})
    if writes and (zero or mesh.dp_rank == 0):
        files[folder / optim_file] = optimizer_state or (optimizer.optim.state_dict() if zero
                                                         else optimizer.state_dict())
    return files, layout_record(models, mesh, cfg, writes and mesh.dp_rank == 0)


def layout_record(models: list[nn.Module], mesh: Mesh, cfg, describes: bool) -> dict[str, Any]:
    """Collective: the layout record, with the parameters of the ranks that `describes` (one per tp shard
    and stage)."""
    parameters: dict[str, Any] = {}
    for part in mesh.gather_objects(parameter_layout(models) if describes else {}):
        parameters.update(part)
    return {"layout": asdict(mesh.layout), "zero_stage": cfg.parallel.zero_stage,
            "pp_stages": n_stages(cfg.parallel),
            "vocab_size": cfg.model.vocab_size, "tie_embeddings": cfg.model.tie_embeddings,
            "parameters": parameters}


def slice_file(tp: int, pp: int, index: int) -> str:
    return f"fsdp-tp{tp}-pp{pp}-dp{index}.pt"


def slice_written_by(dp_rank: int, count: int, dp: int) -> int | None:
    """The slice dp rank `dp_rank` writes when each tensor is in `count` slices over `dp` ranks (HSDP:
    dp / count replicas hold each), or None: slice d by replica d mod replicas, so that every replica
    (a node, typically) writes its share."""
    replica, index = divmod(dp_rank, count)
    return index if replica == index % (dp // count) else None


def sliced_parts(directory: Path, models: list[nn.Module], mesh: Mesh, cfg, slices: int, index: int | None,
                 model_state: dict[str, Any], optimizer_state: dict[str, Any]
                 ) -> tuple[dict[Path, Any], dict[str, Any]]:
    """Collective: parallel.fsdp_checkpoint=sharded. This rank's slice file (`model_state` /
    `optimizer_state`: its FSDP slices; `index`: its place among the `slices` ranks that hold different
    slices, None where another rank writes the same) and the layout record, which names the count."""
    writes = mesh.sp_rank == 0 and index is not None
    files = {directory / SHARDS_DIR / slice_file(mesh.tp_rank, mesh.pp_rank, index): {
        "model": model_state, "optimizer": optimizer_state}} if writes else {}
    record = layout_record(models, mesh, cfg, writes and index == 0)
    return files, record | {"fsdp_slices": slices}


def write_files(files: dict[Path, Any]) -> None:
    """torch.save each object to its path (folders made as needed), each file flushed to disk."""
    for path, obj in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        _save(obj, path)


def load_shards(directory: Path, record: dict[str, Any], models: list[nn.Module],
                optimizer: torch.optim.Optimizer, mesh: Mesh,
                set_model: Callable[[nn.Module, dict[str, Any]], None] = nn.Module.load_state_dict,
                set_optimizer: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Every rank reads its own shard files; the layout must be the one the checkpoint was written with.
    `set_model(model, state)` / `set_optimizer(state)` load them (FSDP's take this rank's dp shard)."""
    saved = record["layout"]
    if saved != asdict(mesh.layout):
        written = " ".join(f"{k}={v}" for k, v in saved.items())
        raise ConfigError(f"checkpoint {directory} was written with the layout {written}, this run has "
                          f"{mesh.layout}: resume with the same parallel.* and number of processes, or "
                          "reshard it with python -m pretrain.convert --to checkpoint")
    zero = _is_zero(optimizer)
    if "fsdp_slices" in record:
        state, optim_state = read_slices(directory / SHARDS_DIR, record, mesh.tp_rank, mesh.pp_rank)
    else:
        state, optim_state = read_shard_files(directory, record, mesh, zero)
    for model in models:
        set_model(model, {k: state[k] for k in model.state_dict()})
    if optim_state is None:
        mesh.print(f"{directory}: converted weights without optimizer state: AdamW moments start at zero")
        return
    (set_optimizer or (optimizer.optim if zero else optimizer).load_state_dict)(optim_state)


def read_shard_files(directory: Path, record: dict[str, Any], mesh: Mesh, zero: bool
                     ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """This rank's model shard and optimizer state (None: converted weights, without one). Memory-mapped,
    as state.pt (pretrain/checkpoint.load_checkpoint): each tensor is read as it is copied into the model
    or sliced for FSDP, never the whole shard onto the device at once."""
    model_file, optim_file = shard_files(mesh, zero)
    folder = directory / SHARDS_DIR
    fresh = record.get("optimizer") == "fresh"  # converted from dense weights: no optimizer state
    for path in (folder / model_file, *(() if fresh else (folder / optim_file,))):
        if not path.is_file():
            raise FileNotFoundError(f"rank {mesh.rank}: checkpoint shard {path} is missing (the checkpoint "
                                    f"was written with parallel.zero_stage={record['zero_stage']})")
    state = torch.load(folder / model_file, map_location="cpu", weights_only=True, mmap=True)
    if fresh:
        return state, None
    return state, torch.load(folder / optim_file, map_location="cpu", weights_only=False, mmap=True)


def load_slice(folder: Path, record: dict[str, Any], tp: int, pp: int, index: int) -> dict[str, Any]:
    """One FSDP slice file (memory-mapped): {"model": slices, "optimizer": slices of its state dict}."""
    path = folder / slice_file(tp, pp, index)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint slice {path} is missing (written by FSDP over "
                                f"{record['fsdp_slices']} ranks)")
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


def read_slices(folder: Path, record: dict[str, Any], tp: int, pp: int, optimizer: bool = True
                ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The model and (unless `optimizer` is false: None) optimizer state of tp shard `tp`, stage `pp` from
    its FSDP slice files, joined: what a gathered checkpoint holds in model-tp{tp}-pp{pp}.pt and
    optim-tp{tp}-pp{pp}.pt (a whole copy, for a reader that needs the whole state)."""
    parts = [load_slice(folder, record, tp, pp, index) for index in range(record["fsdp_slices"])]
    model = {name: join_slices([part["model"][name] for part in parts]) for name in parts[0]["model"]}
    if not optimizer:
        return model, None
    optimizer = parts[0]["optimizer"]
    state = {index: {key: join_slices([part["optimizer"]["state"][index][key] for part in parts])
                     for key in entry} for index, entry in optimizer["state"].items()}
    return model, {"param_groups": optimizer["param_groups"], "state": state}


def join_slices(values: list[Any]) -> Any:
    """FSDP's dim-0 slices of one tensor, in rank order → the tensor; a value every rank holds whole (AdamW's
    step count, megatron-core's extra state) → that value."""
    first = values[0]
    if not torch.is_tensor(first) or first.dim() == 0:
        return first
    return torch.cat(values, 0)


def merge_tp(pieces: list[torch.Tensor], dim: int, parts: int) -> torch.Tensor:
    """Undo `parallel.tensor.shard_tensor`: the tp ranks' slices → the full tensor."""
    blocks = [torch.cat([p.chunk(parts, dim)[i] for p in pieces], dim) for i in range(parts)]
    return torch.cat(blocks, dim)


def consolidate(directory: str | Path) -> dict[str, torch.Tensor]:
    """The dense model's state dict from a sharded checkpoint, read through its layout record alone
    (the vocabulary padding removed). Runs in one process."""
    from pretrain.checkpoint import load_checkpoint

    directory = Path(directory)
    record = load_checkpoint(directory)["shards"]
    tp, pp = record["layout"]["tp"], record["layout"]["pp"]
    folder = directory / SHARDS_DIR
    shards = {(t, p): read_slices(folder, record, t, p, optimizer=False)[0] if "fsdp_slices" in record else
              torch.load(folder / f"model-tp{t}-pp{p}.pt", map_location="cpu", weights_only=True, mmap=True)
              for t in range(tp) for p in range(pp)}
    out = {}
    for name, info in record["parameters"].items():
        rank_pp = info["pp_stage"] % pp
        if info["tp_dim"] is None:
            full = shards[(0, rank_pp)][name]
        else:
            full = merge_tp([shards[(t, rank_pp)][name] for t in range(tp)], info["tp_dim"], info["tp_parts"])
        if name in ("embed.weight", "head.weight"):
            full = full[: record["vocab_size"]]
        out[name] = full
    if record["tie_embeddings"]:  # one matrix, under both names, as the dense model's state dict has it
        out["head.weight"] = out["embed.weight"]
    return out


def split_dense(weights: dict[str, torch.Tensor], cfg, layout: Layout
                ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Reshard: a dense state dict → every (tp, pp) rank's model shard file under `layout`, and the
    layout record, as the ranks of a run with that layout would have saved them (optimizer: "fresh").
    Shards are built on the meta device; only the slices are materialised."""
    from parallel.plan import meta_shards
    from parallel.tensor import local_slice

    files, parameters = {}, {}
    for tp, pp, shard, models, _ in meta_shards(cfg):
        state = {}
        for model in models:
            for name, param in model.state_dict(keep_vars=True).items():
                if name.endswith("_extra_state"):  # megatron-core layers' (empty) extra state
                    state[name] = param
                    continue
                if name not in weights:
                    raise KeyError(f"the weights have no parameter {name}: the model configs differ")
                full = local_slice(weights[name].detach().to("cpu", param.dtype), param, shard)
                if full.shape != param.shape:
                    raise ValueError(f"{name} is {tuple(full.shape)} in the weights and {tuple(param.shape)} "
                                     "in the model: the model configs differ")
                state[name] = full.clone()
            parameters.update(parameter_layout([model]))
        files[f"model-tp{tp}-pp{pp}.pt"] = state
    p = cfg.parallel
    record = {"layout": asdict(layout), "zero_stage": p.zero_stage, "pp_stages": n_stages(p),
              "vocab_size": cfg.model.vocab_size, "tie_embeddings": cfg.model.tie_embeddings,
              "parameters": parameters, "optimizer": "fresh"}
    return files, record
