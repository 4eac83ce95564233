"""Fused forms of the neural memory's chunk step (docs/DESIGN.md §2): an analytic torch backward
(`chunk_step_reference`) and Triton kernels for it (`chunk_step_triton`, needs the optional `triton`)."""
