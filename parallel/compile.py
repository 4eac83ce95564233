"""torch.compile applied to a built TitansLM from outside, block by block (torchtitan's per-block compile).

    compile_blocks(model, backend="inductor", seq_len=4096)   # in place: names and checkpoints unchanged

A block is the unit that repeats, so one compilation serves every block of a kind; the embedding and the
head stay eager (the head's loss is already one fused op, `pretrain/linear_cross_entropy.py`). Everything
compiles with `fullgraph=True`: a graph break would quietly fall back to eager for part of the block, so
it fails loudly instead. The memory's scan is an opaque custom op inside the graph (titans/scan_op.py).

A MAC block compiled whole unrolls its segment loop, so its compile time grows with the segments per
sequence, faster than linearly (a 2,048-token sequence of 64-token segments did not compile in 25 minutes
on CPU). Past `MAX_WHOLE_MAC_SEGMENTS` a MAC block is compiled by its segment step instead
(`mac_segment_region`): the step compiles once per gradient-horizon phase (three times for any length)
and runs in the eager loop, with the per-token work before and after the loop eager. Where the whole
block compiles in reasonable time its steady step is shorter (bench/RESULTS.md, session 22).
"""

from __future__ import annotations

from typing import Any

import torch

from titans.blocks import MACBlock, halo_halves, mac_segment_region
from titans.model import TitansConfig, TitansLM

# Every block kind shares one `forward` (titans/blocks.py), and dynamo keeps its compiled graphs per code
# object: kinds × with and without gradients × the few batch shapes of a run pass torch's default of 8
# graphs, after which fullgraph=True fails. The shapes and kinds are finite, so the limit can be generous.
RECOMPILE_LIMIT = 64
MAX_WHOLE_MAC_SEGMENTS = 8  # the 760M/1.3B recipes' 4,096 tokens in segments of 512 compile whole


def compiles_mac_whole(cfg: TitansConfig, seq_len: int) -> bool:
    """Whether MAC blocks compile whole (not by segment step) for sequences of `seq_len` tokens."""
    return -(-seq_len // cfg.segment_len) <= MAX_WHOLE_MAC_SEGMENTS


def compile_blocks(model: TitansLM, backend: str | Any = "inductor", seq_len: int | None = None,
                   relay: bool = False) -> None:
    """Compile each of the model's blocks in place. MAC blocks compile whole when sequences of `seq_len`
    tokens have at most MAX_WHOLE_MAC_SEGMENTS segments, else (or without `seq_len`) by segment step.
    Shapes are static: a new batch or sequence shape (the last, shorter batch; validation without
    gradients) compiles once more. `backend`: a torch.compile backend, by name or as a callable (tests
    pass a counting one). `relay`: the blocks run under sequence parallelism, whose relay calls each
    block's two halves around the attention halo (`before_halo`, `after_halo`) instead of its forward, so
    the halves are compiled (`seq_len` is then a shard's length)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    whole_mac = seq_len is not None and compiles_mac_whole(model.cfg, seq_len)
    options = {"backend": backend, "fullgraph": True, "dynamic": False}
    segment_step = torch.compile(mac_segment_region, **options)
    for block in model.blocks.values():
        if isinstance(block, MACBlock) and not whole_mac:
            block.segment_region = segment_step
        elif relay:
            for method in halo_halves(block):
                setattr(block, method, torch.compile(getattr(block, method), **options))
        else:
            block.compile(**options)
