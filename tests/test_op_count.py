"""bench/op_count.py: the ops of a training step counted by where they run, exactly and repeatably."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import op_count  # noqa: E402


@pytest.fixture
def micro(monkeypatch):
    monkeypatch.setitem(op_count.PRESETS, "micro", (dict(vocab_size=64, dim=16, n_layers=1, n_heads=2,
                                                         segment_len=16, window=16, n_persistent=2,
                                                         memory_chunk=8, memory_depth=2), 1))
    monkeypatch.setitem(op_count.SEQ_LEN, "micro", 32)
    return "micro"


def test_attention_runs_no_chunk_step_and_the_analytic_kernel_splits_its_ops(micro):
    swa = op_count.count_step(micro, "swa", "torch")
    assert swa.ops["chunk step"] == swa.ops["explicit backward"] == 0 and swa.ops["elsewhere"] > 0
    mac = op_count.count_step(micro, "mac", "analytic")
    assert mac.ops["chunk step"] > 0 and mac.ops["explicit backward"] > 0
    assert all(mac.launching[p] <= mac.ops[p] for p in op_count.PLACES)
    again = op_count.count_step(micro, "mac", "analytic")
    assert again.ops == mac.ops  # a count, not a timing: the same every time


def test_table_has_a_row_per_variant_and_kernel(micro):
    lines = op_count.table(micro, ["swa", "lmm"], ["torch", "analytic"])
    assert [line.split(" | ")[:2] for line in lines[3:]] == [["| swa", "torch"], ["| lmm", "torch"],
                                                             ["| lmm", "analytic"]]


def test_timed_table_adds_the_step_time_and_its_ratio_to_swa(micro):
    lines = op_count.table(micro, ["swa", "lmm"], ["torch"], repeats=1)
    assert lines[1].endswith("step s | × SWA step |")
    swa, lmm = (line.strip(" |").split(" | ") for line in lines[3:])
    assert swa[-1] == "1.00" and float(lmm[-2]) > 0 and len(lmm) == 11
