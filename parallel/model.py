"""This rank's pieces of the model under a layout: build on the meta device, keep the stage's blocks,
materialise and initialise them, split them over tp.

    models, stages = build_local_model(cfg.model, cfg.parallel, pp_rank=1, shard=TensorShard(g, 0, 2),
                                       device=torch.device("cpu"), seed=0)

Each parameter is initialised from its own generator seeded by (seed, its name) (`TitansLM.init_weights`),
so every layout starts from exactly the slices of one dense model: a stage never materialises the other
stages, and the single-process run is the same model. With `device=None` nothing is materialised (the
planner counts the meta shards).
"""

from __future__ import annotations

import torch

from parallel.pipeline import pipeline_stage, stage_ids, stage_layers
from parallel.tensor import TensorShard, parallelize_tensor
from titans.model import TitansConfig, TitansLM


def n_stages(parallel) -> int:
    """Pipeline stages in all: pp, times the stages per rank of an interleaved schedule."""
    per_rank = parallel.pp_stages_per_rank if parallel.pp > 1 and parallel.pp_schedule == "interleaved" else 1
    return parallel.pp * per_rank


def local_stage_ids(parallel, pp_rank: int) -> list[int]:
    return stage_ids(pp_rank, parallel.pp, n_stages(parallel) // parallel.pp)


def build_stage(cfg: TitansConfig, stage: int, stages: int, device: torch.device | None,
                seed: int) -> TitansLM:
    """One pipeline stage of the dense model (the whole model when stages == 1), initialised on `device`."""
    with torch.device("meta"):
        model = TitansLM(cfg)
    keep = {str(i) for i in stage_layers(cfg.n_layers, stages)[stage]}
    for name in [n for n in model.blocks if n not in keep]:
        del model.blocks[name]  # before materialising: a stage never allocates the others
    if device is not None:
        model.to_empty(device=device)
        if cfg.tie_embeddings:  # to_empty gives every module its own tensor
            model.head.weight = model.embed.weight
        model.init_weights(seed)
    return pipeline_stage(model, stage, stages)


def build_local_model(cfg: TitansConfig, parallel, pp_rank: int, shard: TensorShard,
                      device: torch.device | None, seed: int) -> tuple[list[TitansLM], list[int]]:
    """This rank's stage models (one, or several with an interleaved schedule) and their stage indices."""
    ids = local_stage_ids(parallel, pp_rank)
    stages = n_stages(parallel)
    models = [parallelize_tensor(build_stage(cfg, s, stages, device, seed), shard) for s in ids]
    return models, ids
