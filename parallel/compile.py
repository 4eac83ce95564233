"""torch.compile applied to a built TitansLM from outside, block by block (torchtitan's per-block compile).

    compile_blocks(model, backend="inductor")   # in place: parameter names and checkpoints are unchanged

A block is the unit that repeats, so one compilation serves every block of a kind; the embedding and the
head stay eager (the head's loss is already one fused op, `pretrain/linear_cross_entropy.py`). Everything
compiles with `fullgraph=True`: a graph break would quietly fall back to eager for part of the block, so
it fails loudly instead. The memory's scan is an opaque custom op inside the graph (titans/scan_op.py).

MAC is compiled by its segment step (`mac_segment_region`), not whole: a whole MAC block unrolls its
segment loop, so its compile time grows with the segments per sequence (a 2,048-token sequence of 64-token
segments did not compile in 25 minutes on CPU). The step is compiled once per distinct input layout and
gradient-horizon phase (the first segment, segments cut at their start, the rest) and called in the eager
loop; the per-token work before and after the loop stays eager.
"""

from __future__ import annotations

from typing import Any

import torch

from titans.blocks import MACBlock, mac_segment_region
from titans.model import TitansLM

# Every block kind shares one `forward` (titans/blocks.py), and dynamo keeps its compiled graphs per code
# object: kinds × with and without gradients × the few batch shapes of a run pass torch's default of 8
# graphs, after which fullgraph=True fails. The shapes and kinds are finite, so the limit can be generous.
RECOMPILE_LIMIT = 64


def compile_blocks(model: TitansLM, backend: str | Any = "inductor") -> None:
    """Compile each of the model's blocks in place (MAC's by segment step). Shapes are static: a new batch
    or sequence shape (the last, shorter batch; validation without gradients) compiles once more.
    `backend`: a torch.compile backend, by name or as a callable (tests pass a counting one)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    segment_step = torch.compile(mac_segment_region, backend=backend, fullgraph=True, dynamic=False)
    for block in model.blocks.values():
        if isinstance(block, MACBlock):
            block.segment_region = segment_step
        else:
            block.compile(backend=backend, fullgraph=True, dynamic=False)
