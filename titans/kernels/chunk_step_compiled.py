"""`titans.memory.memory_chunk_step` compiled by `torch.compile` (inductor: C++ loops on CPU, Triton on GPU).

Why: the chunk step is dozens of small ops (the read, the MLP's explicit per-token backward, the
LayerNorm, the clipping, the two weighted sums, the state update) whose elementwise work inductor fuses
into a few loops around the matmuls, and whose backward AOTAutograd derives and fuses ahead of time. The
function is the same one, so the scans, the recomputing backward and the gradient horizon are unchanged.
The recomputing backward calls the explicit backward (`chunk_step_reference.chunk_step_backward`),
compiled as well: one fused call per chunk instead of a compiled forward that rebuilds autograd's graph and
then its compiled backward.

The first call per shape, dtype and pattern of inputs needing gradients compiles (tens of seconds on a
small CPU; a training run pays it once), so this pays on long runs, not in short scripts.
"""

from __future__ import annotations

import torch

from titans.kernels.chunk_step_reference import chunk_step_backward
from titans.memory import memory_chunk_step

# dynamic=False: a model's chunk steps all have one shape (padded chunks), so static shapes compile once
# and let inductor specialise its loops; fullgraph: a graph break would silently fall back to eager ops.
compiled_chunk_step = torch.compile(memory_chunk_step, dynamic=False, fullgraph=True)
compiled_chunk_step_backward = torch.compile(chunk_step_backward, dynamic=False, fullgraph=True)
