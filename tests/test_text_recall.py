"""Text recall (pretrain/text_recall.py): a validation passage read again beyond the window."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pretrain.text_recall import evaluate_rows, passages, text_recall
from titans.model import TitansConfig, TitansLM

EOS = 256
WINDOW = 8
PASSAGE = 8
# two layers of an 8-token window see 2·7 tokens back: a longer distance hides the first copy from SWA
DISTANCE = 16


def tiny_model(layers: str) -> TitansLM:
    torch.manual_seed(0)
    return TitansLM(TitansConfig(vocab_size=257, dim=32, n_layers=2, n_heads=2, layers=layers, window=WINDOW,
                                 segment_len=WINDOW, memory_chunk=4, n_persistent=2)).eval()


def texts(samples: int = 3) -> torch.Tensor:
    return torch.randint(0, 256, (samples, PASSAGE + DISTANCE), generator=torch.Generator().manual_seed(1))


def test_passages_are_consecutive_text_across_rows():
    rows = [torch.arange(10).view(1, 10), torch.arange(10, 25).view(1, 15), torch.arange(25, 99)]
    out = passages(rows, samples=3, passage=3, distance=4)
    assert out.tolist() == [list(range(0, 7)), list(range(7, 14)), list(range(14, 21))]
    assert len(passages(rows, samples=50, passage=3, distance=4)) == 99 // 7  # as many as the text holds


def test_too_little_text_is_a_clear_error():
    with pytest.raises(ValueError, match="at least 2 samples of 107 validation tokens .* gave 1"):
        passages([torch.arange(150)], 5, 7, 100)
    with pytest.raises(ValueError, match="passage of at least 2 tokens"):
        text_recall(tiny_model("swa"), texts(), 1, EOS, 8)


def test_a_window_only_model_gains_exactly_nothing():
    r = text_recall(tiny_model("swa"), texts(), PASSAGE, EOS, piece_len=10)
    assert r["gain"] == pytest.approx(0.0, abs=1e-6) and r["repeat_loss"] > 0
    assert r["gain_stderr"] == pytest.approx(0.0, abs=1e-6)  # zero for every passage, not on average
    assert r["distance"] == DISTANCE and r["passages"] == 3 and r["tokens"] == 3 * (PASSAGE - 1)


@pytest.mark.parametrize("layers", ["mac", "mag", "mal", "lmm", "full"])
def test_what_is_carried_beyond_the_window_changes_the_loss(layers):
    """Even untrained, the memory's state (or full attention's cache) differs with the passage it read."""
    r = text_recall(tiny_model(layers), texts(), PASSAGE, EOS, piece_len=10)
    assert abs(r["gain"]) > 1e-5


@pytest.mark.parametrize("layers", ["mag", "full"])
def test_losses_equal_one_call_over_each_sequence(layers):
    model, t = tiny_model(layers), texts()
    p, rest = t[:, :PASSAGE], t[:, PASSAGE:]
    eos = torch.full((len(t), 1), EOS)
    scored = slice(PASSAGE + DISTANCE + 1, 2 * PASSAGE + DISTANCE)
    expect = {}
    for name, first in (("repeat", p), ("control", p.roll(-1, 0))):
        seq = torch.cat([eos, first, rest, p], 1)
        logits, _ = model(seq[:, :-1])
        expect[name] = F.cross_entropy(logits.transpose(1, 2), seq[:, 1:], reduction="none")[:, scored].mean()
    r = text_recall(model, t, PASSAGE, EOS, piece_len=7, batch_size=2)
    assert r["repeat_loss"] == pytest.approx(expect["repeat"].item(), rel=1e-5)
    assert r["control_loss"] == pytest.approx(expect["control"].item(), rel=1e-5)


def test_every_distance_reads_the_same_passages():
    """evaluate_rows cuts the passages once, at the longest distance: each shorter distance scores the same
    passages before the start of the same following text, so the gains compare pairwise across distances."""
    model = tiny_model("mag")
    model.vocab_size = 257  # as on a loaded model: the byte tokenizer's end of document is 256
    rows = [torch.randint(0, 256, (1, 200), generator=torch.Generator().manual_seed(2))]
    got = evaluate_rows(model, rows, {}, samples=3, passage=PASSAGE, distances=[4, DISTANCE], piece_len=10)
    cut = passages(rows, 3, PASSAGE, DISTANCE)
    for r, distance in zip(got, [4, DISTANCE], strict=True):
        assert r == text_recall(model, cut[:, : PASSAGE + distance], PASSAGE, EOS, piece_len=10)
        assert r["distance"] == distance and r["passages"] == 3
