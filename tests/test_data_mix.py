"""Training on a mixture of prepared datasets (`data.mix`, `data.mix_weights`): each sample is drawn
from one dataset by weight, the datasets must share a tokenizer, and the config names what is wrong."""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import pytest
import yaml
from test_data_helpers import copy_with_tokenizer

from data_pipeline.loader import DataError
from data_pipeline.prepare import prepare
from pretrain.config import ConfigError, load_config
from pretrain.data import build_loaders


def one_letter_dataset(folder: Path, letter: str) -> Path:
    """A dataset whose every token is `letter`: a row tells which dataset it came from."""
    text = folder / "text"
    text.mkdir(parents=True)
    for i in range(20):
        (text / f"{i}.txt").write_text(letter * 3000)
    prepare([text / f"{i}.txt" for i in range(20)], folder / "data", sample_tokens=33, shard_samples=20,
            val_fraction=0, progress=False)  # every document trains: two datasets of equal size
    return folder / "data"


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("mix")
    return one_letter_dataset(tmp / "a", "a"), one_letter_dataset(tmp / "b", "b")


def config(a: Path, *overrides: str):
    return load_config(None, [f"data.train={a}", "data.default_corpus=false", "data.seq_len=32",
                              "data.batch_size=8", "model.vocab_size=257", "train.eval_every=0", *overrides])


def share_of_a(cfg, batches: int = 60) -> float:
    loader, _ = build_loaders(cfg, 0, 1)
    rows = [row for _, batch in zip(range(batches), loader) for row in batch]
    return sum(int((row == ord("a")).sum() > (row == ord("b")).sum()) for row in rows) / len(rows)


def test_samples_are_drawn_by_weight(datasets, capsys):
    a, b = datasets
    share = share_of_a(config(a, f"data.mix={b}", "data.mix_weights=3,1", "train.steps=400"))
    assert 0.65 < share < 0.85  # 480 rows at 3:1
    out = capsys.readouterr().out
    line = r"(\S+): ([\d,]+) tokens, ([\d.]+)% of the samples, ([\d.]+) epochs in 400 steps"
    counts = {m.group(1): (int(m.group(2).replace(",", "")), float(m.group(3)), float(m.group(4)))
              for m in re.finditer(line, out)}
    read = 400 * 8 * 32  # steps x rows x tokens: more than all of a
    for path, share in ((a, 75.0), (b, 25.0)):
        tokens, percent, epochs = counts[str(path)]
        assert percent == share and epochs == pytest.approx(read * share / 100 / tokens, abs=0.005)
    assert f"warning: this run reads {a} (" in out and f"{b} (" not in out.split("warning")[1]
    assert 0.4 < share_of_a(config(a, f"data.mix={b}")) < 0.6  # by default as their tokens, equal here
    assert share_of_a(config(a)) == 1.0


def test_a_mixture_needs_one_tokenizer_and_a_weight_per_dataset(datasets, tmp_path):
    a, b = datasets
    other = copy_with_tokenizer(b, tmp_path / "other", "huggingface", "t.json")
    with pytest.raises(DataError, match=f"data.mix: {other} was tokenised with huggingface t.json"):
        build_loaders(config(a, f"data.mix={other}"), 0, 1)
    expected = r"data.mix_weights has 1 weight\(s\), for data.train and data.mix's 1 dataset\(s\) it needs 2"
    with pytest.raises(ConfigError, match=expected):
        config(a, f"data.mix={b}", "data.mix_weights=2")
    with pytest.raises(ConfigError, match="data.mix_weights must all be > 0"):
        config(a, f"data.mix={b}", "data.mix_weights=1,0")
    with pytest.raises(DataError, match="data.mix: .*nowhere"):
        build_loaders(config(a, f"data.mix={tmp_path / 'nowhere'}"), 0, 1)


def test_a_mixture_trains_and_resumes_and_another_mixture_is_refused_on_resume(datasets, tmp_path):
    from pretrain.train import train

    a, b = datasets
    small = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.window=8", "model.segment_len=16",
             "model.memory_chunk=8", f"train.out_dir={tmp_path / 'run'}", "train.steps=4",
             "train.warmup_steps=1", "train.checkpoint_every=2"]
    train(config(a, f"data.mix={b}", "data.mix_weights=1,1", *small, "train.stop_after_steps=2"))
    assert train(config(a, f"data.mix={b}", "data.mix_weights=1,1", *small)).last_step == 4
    with pytest.raises(DataError, match="set by the shards of data.train and data.mix, and data.mix_weights"):
        train(config(a, f"data.mix={b}", "data.mix_weights=3,1", *small, "train.steps=6"))
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())  # still the checkpoints' config
    assert saved["data"]["mix_weights"] == [1.0, 1.0] and saved["train"]["steps"] == 4


def test_more_validation_sets_get_a_loss_each(datasets, dataset, tmp_path, capsys):
    """data.val_sets: the same validation split under another folder name gives the main val loss; an
    evaluation-only dataset (no val split, not trained on) is validated whole; each is in TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pretrain.train import train

    same = tmp_path / "same"
    shutil.copytree(dataset, same)
    _, letters = datasets  # only a train split
    small = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.window=8", "model.segment_len=16",
             "model.memory_chunk=8", f"train.out_dir={tmp_path / 'run'}", "train.steps=2",
             "train.warmup_steps=0", "train.eval_every=2", "train.eval_batches=2"]
    result = train(config(dataset, *small, f"data.val_sets={same},{letters}"))
    assert result.val_set_losses[2]["same"] == result.val_losses[2]
    assert math.isfinite(result.val_set_losses[2]["data"])
    out = "".join(capsys.readouterr())
    assert f"note: data.val_sets: {letters} has no validation split and is not trained on" in out
    assert re.search(r"step 2: val loss on same [\d.]+, ppl [\d.]+", out)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert {"val/same/loss", "val/data/perplexity"} <= set(events.Tags()["scalars"])


def test_bad_validation_sets_are_named(datasets, dataset, tmp_path):
    from pretrain.data import dataset_problem, validation_sets

    a, b = datasets
    nowhere = tmp_path / "nowhere"
    assert dataset_problem(config(dataset, f"data.val_sets={nowhere}", "train.eval_every=5")) == (
        f"data.val_sets: {nowhere}: no prepared dataset there (manifest.json is missing)")
    with pytest.raises(ConfigError, match="data.val_sets: two datasets in folders named data"):
        config(dataset, f"data.val_sets={a},{b}", "train.eval_every=5")
    with pytest.raises(ConfigError, match="data.val_sets is validated at every validation, and "
                                          "train.eval_every=0"):
        config(dataset, f"data.val_sets={a}")
    other = copy_with_tokenizer(dataset, tmp_path / "other", "huggingface", "t.json")
    with pytest.raises(DataError, match=f"data.val_sets: {other} was tokenised with huggingface t.json"):
        validation_sets(config(dataset, f"data.val_sets={other}", "train.eval_every=5"), 0, 1, True)
    with pytest.raises(DataError, match="data.val_sets: dataset .* has no validation split, and this run "
                                        "trains on it"):
        validation_sets(config(a, f"data.mix={b}", f"data.val_sets={b}", "train.eval_every=5"), 0, 1, True)
