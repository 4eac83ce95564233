"""Synthetic retrieval rows mixed into training batches: layout, loss weights, exact resume."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pretrain import synthetic
from pretrain.batch import Batch
from pretrain.data import SyntheticMix
from pretrain.loss import causal_lm_loss
from titans.model import TitansConfig, TitansLM

SPACE = synthetic.TokenSpace.for_vocab(257)


@pytest.mark.parametrize("task", synthetic.TRAINING_TASKS)
def test_training_rows_mark_exactly_the_answers(task):
    tokens, answers = synthetic.training_rows(task, 16, 129, SPACE, seed=3)
    assert tokens.shape == (16, 129) and answers.shape == (16, 128)
    per_row = 1 if task == "needle" else synthetic.MQAR_TRAINING_PAIRS
    assert (answers.sum(-1) == per_row).all()
    values = set(SPACE.values)
    for row, mask in zip(tokens, answers):
        for p in mask.nonzero().flatten().tolist():
            assert row[p].item() == SPACE.assign and row[p + 1].item() in values
            key = row[p - synthetic.KEY_LEN : p]
            # the same key earlier in the row, followed by `assign` and the same value
            starts = [i for i in range(p - synthetic.KEY_LEN)
                      if torch.equal(row[i : i + synthetic.KEY_LEN], key)]
            assert starts and row[starts[0] + synthetic.KEY_LEN + 1] == row[p + 1]
    assert torch.equal(tokens, synthetic.training_rows(task, 16, 129, SPACE, seed=3)[0])


def test_training_rows_spread_the_distances():
    tokens, answers = synthetic.training_rows("needle", 64, 257, SPACE, seed=0)
    positions = answers.int().argmax(-1)
    assert positions.min() < 48 and positions.max() > 160  # short (inside a span) and long distances


def test_training_rows_errors():
    with pytest.raises(ValueError, match="unknown synthetic task 'copy'"):
        synthetic.training_rows("copy", 1, 129, SPACE, seed=0)
    with pytest.raises(ValueError, match="a mqar sequence needs at least"):
        synthetic.training_rows("mqar", 1, 40, SPACE, seed=0)


def test_packed_rows_hold_several_instances_each_asking_its_own_values():
    """data.synthetic_pack: instances back to back, `n_pairs` answers each; a key that recurs in a later
    instance is asked for with its latest value."""
    single, _ = synthetic.training_rows("mqar", 8, 513, SPACE, seed=5, n_pairs=2, max_distance=32)
    tokens, answers = synthetic.training_rows("mqar", 8, 513, SPACE, seed=5, n_pairs=2, max_distance=32,
                                              pack=True)
    counts = answers.sum(-1)
    assert (counts % 2 == 0).all() and (counts >= 8).all()  # several 2-pair instances per row
    for row, mask in zip(tokens, answers):
        for p in mask.nonzero().flatten().tolist():
            k = synthetic.KEY_LEN
            starts = [i for i in range(p - k) if torch.equal(row[i : i + k], row[p - k : p])
                      and row[i + k] == SPACE.assign]  # every earlier `key assign value` of this key
            assert starts and row[starts[-1] + k + 1] == row[p + 1]
    assert not torch.equal(tokens, single)


def test_pairs_and_max_distance_are_checked():
    with pytest.raises(ValueError, match="at least 1 key-value pair"):
        synthetic.training_rows("mqar", 1, 129, SPACE, seed=0, n_pairs=0)
    with pytest.raises(ValueError, match="below the min distance"):
        synthetic.training_rows("mqar", 1, 513, SPACE, seed=0, min_distance=64, max_distance=32)


@pytest.mark.parametrize("task", synthetic.TRAINING_TASKS)
def test_instance_batch_starts_every_instance_at_the_first_token(task):
    """data.synthetic_sequences: one instance per sequence from its first token, as the evaluation asks
    (mqar: the pairs first), all at the step's distance, so the sequences are as long as it needs."""
    tokens, answers = synthetic.instance_batch(task, 8, 2049, SPACE, seed=4, n_pairs=2, max_distance=300)
    assert tokens.shape[0] == 8 and answers.shape == (8, tokens.shape[1] - 1) and tokens.shape[1] < 340
    assert (answers.sum(-1) == (1 if task == "needle" else 2)).all()
    if task == "mqar":
        assert (tokens[:, 0] == SPACE.open).all()
        want = synthetic.mqar(8, tokens.shape[1] - 22, SPACE, n_pairs=2, seed=0)  # the same layout
        assert torch.equal(answers.nonzero()[:, 1], want.positions.flatten())
    lengths = {synthetic.instance_batch(task, 2, 2049, SPACE, seed=seed, n_pairs=2)[0].shape[1]
               for seed in range(8)}
    assert len(lengths) > 4  # the distance is drawn per call
    assert torch.equal(tokens, synthetic.instance_batch(task, 8, 2049, SPACE, seed=4, n_pairs=2,
                                                        max_distance=300)[0])


class FakeText:
    """A text loader stand-in with a resumable position."""

    def __init__(self, rows: int, length: int) -> None:
        self.rows, self.length, self.position = rows, length, 0

    def __iter__(self):
        while True:
            self.position += 1
            yield torch.full((self.rows, self.length), self.position % 200, dtype=torch.long)

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def test_mix_appends_weighted_rows_and_resumes_exactly():
    mix = SyntheticMix(FakeText(3, 65), rows=2, task="needle", seq_len=64, vocab_size=257, weight=1.0, seed=5)
    stream = iter(mix)
    first = next(stream)
    assert isinstance(first, Batch) and first.tokens.shape == (5, 65) and first.weights.shape == (5, 64)
    assert (first.weights[:3] == 1).all()
    assert first.weights[3:].sum(-1).tolist() == [64.0, 64.0]  # a synthetic row weighs as one text row
    assert (first.weights[3:] > 0).sum() == 2
    next(stream)
    state = mix.state_dict()
    expected = [next(stream) for _ in range(2)]
    again = SyntheticMix(FakeText(3, 65), 2, "needle", 64, 257, 1.0, seed=5)
    again.load_state_dict(state)
    for want, got in zip(expected, iter(again)):
        assert torch.equal(want.tokens, got.tokens) and torch.equal(want.weights, got.weights)
    other_rank = SyntheticMix(FakeText(3, 65), 2, "needle", 64, 257, 1.0, seed=6)
    assert not torch.equal(next(iter(other_rank)).tokens[3:], first.tokens[3:])


def test_mix_yields_separate_sequences_before_the_text():
    mix = SyntheticMix(FakeText(2, 65), rows=4, task="mqar", seq_len=64, vocab_size=257, weight=0.5, seed=5,
                       separate=True, n_pairs=2)
    synthetic_part, text = next(iter(mix))
    assert text.weights is None and text.tokens.shape == (2, 65)
    assert synthetic_part.tokens.shape[0] == 4 and synthetic_part.weights.shape[0] == 4
    assert synthetic_part.weights.sum(-1).tolist() == [32.0] * 4  # each weighs half a text sequence
    assert ((synthetic_part.weights > 0).sum(-1) == 2).all()


def test_mix_trains_the_synthetic_sequences_alone_first_then_the_text_from_its_start():
    """data.synthetic_alone_steps: a curriculum whose text starts where it would have, none skipped, and
    which resumes inside the alone steps exactly."""
    def mix():
        return SyntheticMix(FakeText(2, 65), rows=4, task="mqar", seq_len=64, vocab_size=257, weight=0.5,
                            seed=5, separate=True, alone=3, n_pairs=2)
    plain = SyntheticMix(FakeText(2, 65), 4, "mqar", 64, 257, 0.5, seed=5, separate=True, n_pairs=2)
    first = mix()
    items = [item for _, item in zip(range(5), first)]
    assert [len(item) for item in items] == [1, 1, 1, 2, 2]
    assert items[3][1].tokens[0, 0].item() == 1  # the text's first batch
    # the synthetic sequences are those of the run without the curriculum, in the same order
    for item, want in zip(items, (item[0] for _, item in zip(range(5), plain))):
        assert torch.equal(item[0].tokens, want.tokens) and torch.equal(item[0].weights, want.weights)
    resumed = mix()
    resumed.load_state_dict({"text": {"position": 0}, "generated": 1})
    for want, got in zip(items[1:], iter(resumed)):
        assert len(want) == len(got) and all(torch.equal(w.tokens, g.tokens) for w, g in zip(want, got))


def test_weighted_loss_is_the_weighted_mean_of_token_losses():
    torch.manual_seed(0)
    model = TitansLM(TitansConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, layers="mac", window=8,
                                  segment_len=8, memory_chunk=4)).double()
    tokens = torch.randint(64, (3, 17))
    weights = torch.rand(3, 16, dtype=torch.float64) * (torch.rand(3, 16) > 0.5)
    logits, _ = model(tokens[:, :-1])
    per_token = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
    expected = (per_token * weights.flatten()).sum() / weights.sum()
    loss = causal_lm_loss(model, tokens[:, :-1], tokens[:, 1:], weights)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=0)
    plain = causal_lm_loss(model, tokens[:, :-1], tokens[:, 1:])
    torch.testing.assert_close(plain.double(), per_token.mean(), rtol=1e-6, atol=0)
