"""torch.compile applied to a built TitansLM from outside, block by block (torchtitan's per-block compile).

    compile_blocks(model, backend="inductor")   # in place: parameter names and checkpoints are unchanged

A block is the unit that repeats, so one compilation serves every block of a kind; the embedding and the
head stay eager (the head's loss is already one fused op, `pretrain/linear_cross_entropy.py`). Each block
compiles with `fullgraph=True`: a graph break would quietly fall back to eager for part of the block, so
it fails loudly instead. The memory's scan is an opaque custom op inside the graph (titans/scan_op.py).
"""

from __future__ import annotations

import torch

from titans.model import TitansLM

# Every block kind shares one `forward` (titans/blocks.py), and dynamo keeps its compiled graphs per code
# object: kinds × with and without gradients × the few batch shapes of a run pass torch's default of 8
# graphs, after which fullgraph=True fails. The shapes and kinds are finite, so the limit can be generous.
RECOMPILE_LIMIT = 64


def compile_blocks(model: TitansLM, backend: str = "inductor") -> None:
    """Compile each of the model's blocks in place. Shapes are static: a new batch or sequence shape (the
    last, shorter batch; validation without gradients) compiles once more."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    for block in model.blocks.values():
        block.compile(backend=backend, fullgraph=True, dynamic=False)
