"""bench/tf32_memory.py: the TF32 emulation it trains with rounds as a tensor core reads float32, reaches
every matmul of the memory's chunk step, and leaves the step as it was afterwards."""

import torch
from run_helpers import bench_module

import titans.memory as memory_module
from titans.memory import NeuralMemory

tf32 = bench_module("tf32_memory")


def test_rounding_keeps_ten_mantissa_bits_to_nearest_even():
    ulp = 2.0**-10  # TF32's spacing at 1
    x = torch.tensor([1.0, 1 + ulp / 2, 1 + 3 * ulp / 2, 1 + ulp * 0.49, 1 + ulp * 0.51, -3.14159265])
    assert tf32.round_to_tf32(x).tolist() == [1.0, 1.0, 1 + 2 * ulp, 1.0, 1 + ulp, -3.140625]
    x.requires_grad_()
    tf32.round_to_tf32(x).sum().backward()
    assert x.grad.tolist() == [1.0] * 6  # straight through


def test_the_memory_reads_through_rounded_matmuls_and_the_step_is_restored():
    torch.manual_seed(0)
    memory = NeuralMemory(dim=32, heads=2, head_dim=16, depth=2, hidden=32, chunk_size=16)
    x = torch.randn(1, 48, 32)
    exact_step = memory_module.memory_chunk_step
    exact, _ = memory(x)
    with tf32.tf32_chunk_step():
        rounded, _ = memory(x)
    assert memory_module.memory_chunk_step is exact_step
    difference = (rounded - exact).abs().max().item()
    assert 1e-6 < difference < 1e-2  # TF32's rounding, not float32's, and not more
    assert torch.equal(memory(x)[0], exact)
