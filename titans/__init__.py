"""Titans: language models with a neural long-term memory trained at test time (arXiv 2501.00663).

Import from the submodules: `titans.memory` (NeuralMemory), `titans.attention`, `titans.blocks`,
`titans.model` (TitansConfig, TitansLM), `titans.flops`.
"""
