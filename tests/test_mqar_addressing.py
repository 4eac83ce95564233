"""bench/mqar_addressing.py: the asked pair is found, and the report runs on MAC and LMM checkpoints."""

from pathlib import Path

import pytest
import torch
from run_helpers import bench_module

from pretrain import synthetic
from pretrain.checkpoint import save_checkpoint
from pretrain.config import load_config
from titans.model import TitansLM

addressing = bench_module("mqar_addressing")


def test_asked_pair_is_the_pair_whose_value_answers_the_first_question():
    space = synthetic.TokenSpace.for_vocab(257)
    batch = synthetic.mqar(64, 20, space, n_pairs=2, seed=3)
    asked = addressing.asked_pair(batch)
    assert 0 < int(asked.sum()) < 64  # both orders occur
    value_at = asked * addressing.PAIR_LEN + addressing.VALUE_OFFSET
    assert torch.equal(batch.tokens[torch.arange(64), value_at], batch.answers[:, 0])


def checkpoint(tmp_path: Path, layers: str) -> Path:
    run = tmp_path / layers
    cfg = load_config(None, ["data.default_corpus=false", "data.seq_len=64", "model.vocab_size=257",
                             "model.dim=32", "model.n_layers=2", "model.n_heads=2", f"model.layers={layers}",
                             "model.window=16", "model.segment_len=16", "model.memory_chunk=8",
                             "model.n_persistent=2", f"train.out_dir={run}"])
    torch.manual_seed(0)
    save_checkpoint(run, 5, {"config": cfg.to_dict(), "model": TitansLM(cfg.model).state_dict(), "step": 5},
                    keep_last=1)
    return run


@pytest.mark.parametrize("layers", ["mac", "lmm"])
def test_report_has_a_row_per_memory_and_query(tmp_path, capsys, layers):
    run = checkpoint(tmp_path, layers)
    assert addressing.main([str(run), "--samples", "8", "--batch-size", "4", "--distance", "2"]) == 0
    out = capsys.readouterr().out
    table = out.split("\n\n")[0]  # the addressing table; MAC's ablation table follows
    rows = [line for line in table.splitlines() if line.startswith(f"| {run} |")]
    queries = ["q", "h q at -2", "h q at -1", "h q"] if layers == "mac" else ["q"]
    assert [row.split(" | ")[2:4] for row in rows] == [[str(m), q] for m in (0, 1) for q in queries]
    for row in rows:
        assert 0 <= float(row.split(" | ")[4]) <= 1
    assert ("with the segment read h zeroed" in out) == (layers == "mac")
