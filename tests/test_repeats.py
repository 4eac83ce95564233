"""Repeated passages in text rows (pretrain/repeats.py): layout, determinism, resume, config checks."""

from __future__ import annotations

import pytest
import torch

from pretrain.batch import Batch
from pretrain.config import ConfigError, load_config
from pretrain.data import SyntheticMix
from pretrain.repeats import RepeatedPassages, copy_targets, repeat_passage


def test_a_row_reads_its_passage_again_after_the_gap_then_goes_on():
    row = torch.arange(100)
    out = repeat_passage(row, passage=10, min_gap=20, seed=0)
    assert len(out) == 100
    gap = next(g for g in range(20, 81) if torch.equal(out[10 + g : 20 + g], row[:10]))
    assert torch.equal(out[: 10 + gap], row[: 10 + gap])  # the text up to the end of the gap
    assert torch.equal(out[20 + gap :], row[10 + gap : 90])  # then the text goes on where it was
    assert torch.equal(repeat_passage(row, 10, 20, seed=0), out)  # the same row, the same gap


def test_the_gap_is_drawn_across_rows_within_its_bounds():
    gaps = set()
    for i in range(40):
        row = torch.cat([torch.tensor([i]), torch.arange(1000, 1063)])  # 64 tokens, distinct rows
        out = repeat_passage(row, passage=8, min_gap=16, seed=1)
        gaps.add(next(g for g in range(16, 49) if torch.equal(out[8 + g : 16 + g], row[:8])))
    assert min(gaps) >= 16 and max(gaps) <= 48 and len(gaps) > 5


def test_too_long_a_passage_is_a_clear_error():
    with pytest.raises(ValueError, match="does not fit a row of 50 tokens"):
        repeat_passage(torch.arange(50), passage=20, min_gap=20, seed=0)


class FakeText:
    def __init__(self) -> None:
        self.position = 0

    def __iter__(self):
        while True:
            self.position += 1
            yield torch.arange(3 * 65).view(3, 65) + 1000 * self.position

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def test_loader_rewrites_its_first_rows_and_resumes_exactly():
    loader = RepeatedPassages(FakeText(), rows=2, passage=8, min_gap=16, seed=3)
    stream = iter(loader)
    first = next(stream)
    plain = torch.arange(3 * 65).view(3, 65) + 1000
    assert torch.equal(first[2], plain[2]) and not torch.equal(first[0], plain[0])
    assert torch.equal(first[0], repeat_passage(plain[0], 8, 16, 3))
    state = loader.state_dict()
    expected = [next(stream) for _ in range(2)]
    again = RepeatedPassages(FakeText(), 2, 8, 16, seed=3)
    again.load_state_dict(state)
    for want, got in zip(expected, iter(again)):
        assert torch.equal(want, got)


def test_copy_targets_are_the_second_reading_after_its_first_token():
    row = torch.arange(100)
    out = repeat_passage(row, passage=10, min_gap=20, seed=0)
    targets = copy_targets(row, passage=10, min_gap=20, seed=0)
    assert targets.stop - targets.start == 9
    # target p predicts token p + 1: the second reading's tokens 1..9, the passage's own tokens 1..9
    assert torch.equal(out[targets.start + 1 : targets.stop + 1], row[1:10])
    assert out[targets.start] == row[0]  # the target before them predicts the first token: not a copy


def test_weighted_loader_yields_batches_whose_copy_targets_weigh_more():
    plain = torch.arange(3 * 65).view(3, 65) + 1000
    batch = next(iter(RepeatedPassages(FakeText(), rows=2, passage=8, min_gap=16, seed=3, weight=5.0)))
    assert isinstance(batch, Batch) and batch.weights.shape == (3, 64)
    assert torch.equal(batch.tokens, next(iter(RepeatedPassages(FakeText(), 2, 8, 16, seed=3))))
    for i in range(2):
        heavy = torch.zeros(64, dtype=torch.bool)
        heavy[copy_targets(plain[i], 8, 16, 3)] = True
        assert torch.all(batch.weights[i][heavy] == 5.0) and torch.all(batch.weights[i][~heavy] == 1.0)
        assert heavy.sum() == 7
    assert torch.all(batch.weights[2] == 1.0)  # the row left as text


def test_synthetic_rows_keep_the_copy_weights_of_the_text_rows():
    text = RepeatedPassages(FakeText(), rows=1, passage=8, min_gap=16, seed=3, weight=4.0)
    mix = SyntheticMix(text, rows=1, task="mqar", seq_len=64, vocab_size=257, weight=1.0, seed=0, n_pairs=2)
    batch = next(iter(mix))
    assert batch.tokens.shape == (4, 65) and batch.weights.shape == (4, 64)
    assert batch.weights[0].max() == 4.0 and torch.all(batch.weights[1:3] == 1.0)


@pytest.mark.parametrize("overrides, field", [(["data.repeat_rows=9"], "data.repeat_rows"),
                                              (["data.repeat_rows=1", "data.repeat_weight=0"],
                                               "data.repeat_weight"),
                                              (["data.repeat_rows=1", "data.repeat_passage=200"],
                                               "data.repeat_passage=200")])
def test_bad_repeat_settings_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        load_config(None, ["data.seq_len=256", "data.batch_size=8", *overrides])
