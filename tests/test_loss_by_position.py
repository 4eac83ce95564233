"""Loss by position inside documents (pretrain/loss_by_position.py), its evaluate CLI wiring, and a smoke
run of the long-context comparison recipe (bench/compare_long.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from run_helpers import bench_module

from data_pipeline.prepare import prepare
from pretrain.checkpoint import save_checkpoint
from pretrain.config import load_config
from pretrain.evaluate import main as evaluate_main
from pretrain.evaluate import val_batches
from pretrain.loss_by_position import (
    REPEAT_CONTEXT,
    bucket_edges,
    far_repeats,
    loss_by_position,
    parse_bucket_edges,
    plot_loss_by_position,
    regions,
    split_documents,
    token_losses,
)
from pretrain.model_io import LoadedModel, load_model
from titans.model import BLOCK_KINDS, TitansConfig, TitansLM

EOS = 256
# name → length in bytes; the names starting with "v" are forced into the validation split
DOCS = {"a.txt": 70, "b.txt": 120, "va.txt": 150, "vb.txt": 20, "vc.txt": 300, "vd.txt": 90, "z.txt": 200}
VAL = ("va.txt", "vb.txt", "vc.txt", "vd.txt")


def text_of(name: str, length: int) -> bytes:
    """Readable, document-specific bytes (no EOS byte can occur: EOS is id 256)."""
    words = f"{name} says hello to position "
    return (words * (length // len(words) + 1)).encode()[:length]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A byte dataset whose validation split holds exactly the `VAL` documents, in that order."""
    base = tmp_path_factory.mktemp("lbp")
    files = []
    for name, length in DOCS.items():
        (base / name).write_bytes(text_of(name, length))
        files.append(base / name)
    out = base / "data"
    prepare(files, out, "bytes", sample_tokens=33, shard_samples=8, val_fraction=0.0, progress=False,
            force_val=frozenset(str(base / n) for n in VAL))
    return out


def tiny_config(layers: str) -> TitansConfig:
    return TitansConfig(vocab_size=257, dim=32, n_layers=2, n_heads=2, layers=layers, window=8,
                        segment_len=16, memory_chunk=8, n_persistent=2)


def tiny_model(layers: str, seed: int = 0) -> TitansLM:
    torch.manual_seed(seed)
    return TitansLM(tiny_config(layers)).eval()


@pytest.fixture(scope="module")
def checkpoint(data, tmp_path_factory) -> Path:
    """A randomly initialised MAG model saved as a training checkpoint of a run on `data` (seq_len 32)."""
    run = tmp_path_factory.mktemp("run")
    cfg = load_config(None, [f"data.train={data}", "data.default_corpus=false", "data.seq_len=32",
                             "data.batch_size=2", "model.vocab_size=257", "model.dim=32", "model.n_layers=2",
                             "model.n_heads=2", "model.layers=mag", "model.window=8", "model.segment_len=16",
                             "model.memory_chunk=8", "model.n_persistent=2", f"train.out_dir={run}"])
    torch.manual_seed(0)
    model = TitansLM(cfg.model)
    save_checkpoint(run, 3, {"config": cfg.to_dict(), "model": model.state_dict(), "step": 3}, keep_last=1)
    return run


# ------------------------------------------------------------------------------------------- buckets


def test_bucket_edges_double_up_to_the_max_position():
    assert bucket_edges(128) == [0, 32, 64, 128]
    assert bucket_edges(100) == [0, 32, 64, 100]
    assert bucket_edges(1024, first=64) == [0, 64, 128, 256, 512, 1024]
    assert bucket_edges(20) == [0, 20]
    assert parse_bucket_edges("0, 8,64,65") == [0, 8, 64, 65]


@pytest.mark.parametrize("spec, message", [("0,64,32", "strictly increasing"),
                                           ("0,8,8", "strictly increasing"), ("8,64", "start at 0"),
                                           ("0", "at least two"), ("0,a,64", "integers")])
def test_bad_bucket_specs_are_clear_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_bucket_edges(spec)
    with pytest.raises(ValueError, match="max_position >= 1"):
        bucket_edges(0)


# ----------------------------------------------------------------------------------------- documents


def test_split_documents_counts_from_each_document_start():
    docs = [torch.arange(1, 6), torch.arange(10, 40), torch.tensor([]).long(), torch.arange(50, 53)]
    stream = torch.cat([torch.cat([d, torch.tensor([EOS])]) for d in docs] + [torch.tensor([7, 8])])
    rows = list(stream.split(7))  # rows cut across documents, as packed training sequences are
    found = split_documents(rows, EOS, max_len=100)
    expected = [torch.cat([d, torch.tensor([EOS])]) for d in docs] + [torch.tensor([7, 8])]  # tail kept
    assert [f.tolist() for f in found] == [e.tolist() for e in expected]
    cut = split_documents(rows, EOS, max_len=4, max_documents=2)
    assert [c.tolist() for c in cut] == [[1, 2, 3, 4], [10, 11, 12, 13]]
    long_only = split_documents(rows, EOS, max_len=8, min_len=6)  # 5 tokens + EOS is long enough
    assert [d.tolist() for d in long_only] == [[1, 2, 3, 4, 5, EOS], list(range(10, 18))]


def test_the_prepared_validation_split_is_read_back_as_whole_documents(data):
    run_config = {"data": {"train": str(data), "seq_len": 32, "batch_size": 2}}
    found = split_documents(val_batches(run_config, batch_size=1), EOS, max_len=10_000)
    expected = [list(text_of(n, DOCS[n])) + [EOS] for n in VAL]
    assert [d.tolist() for d in found[:-1]] == expected[:-1]
    last = found[-1].tolist()  # the split's last partial sample is dropped by prepare
    assert last == expected[-1][: len(last)] and len(last) > 0
    assert sum(len(d) for d in found) == sum(len(e) for e in expected) - json.loads(
        (data / "manifest.json").read_text())["dropped_tokens"]["val"]


# ------------------------------------------------------------------------------------------- scoring


@pytest.mark.parametrize("layers", [*BLOCK_KINDS, "mac,swa"])
def test_losses_in_pieces_equal_one_whole_call(layers):
    """The carried streaming state is exact for every block: pieces at arbitrary cuts equal one call."""
    model = tiny_model(layers)
    tokens = torch.randint(0, 257, (2, 81))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    with torch.no_grad():
        logits, _ = model(inputs)
    whole = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    for piece_len in (13, 32, 80):
        torch.testing.assert_close(token_losses(model, inputs, targets, piece_len), whole, rtol=1e-5,
                                   atol=1e-5)


@pytest.mark.parametrize("layers", ["mac", "mal", "swa"])
def test_buckets_equal_a_direct_computation_per_document(layers):
    model = LoadedModel(tiny_model(layers), tiny_config(layers))
    lengths = [70, 3, 41, 100, 16, 64]
    gen = torch.Generator().manual_seed(1)
    docs = [torch.cat([torch.randint(0, 256, (n - 1,), generator=gen), torch.tensor([EOS])]) for n in lengths]
    docs[3][40:60] = docs[3][0:20]  # repeats 40 back: far beyond the repeat span of 12
    docs[0][30:40] = docs[0][20:30]  # 10 back: inside it
    edges = [0, 8, 16, 32, 64]
    result = loss_by_position(model, docs, edges, EOS, piece_len=24, attention_span=16, train_len=32,
                              batch_size=4, repeat_span=12)
    sums, counts, repeat_sums, repeat_counts = [0.0] * 4, [0] * 4, [0.0] * 4, [0] * 4
    for doc in docs:  # each document alone, in one call, from its start
        doc = doc[:64]
        inputs = torch.cat([torch.tensor([EOS]), doc[:-1]])[None]
        with torch.no_grad():
            losses = F.cross_entropy(model.model(inputs)[0][0], doc, reduction="none")
        repeats = far_repeats_by_search(inputs[0].tolist(), doc.tolist(), 12, REPEAT_CONTEXT)
        for p, loss in enumerate(losses.tolist()):
            b = max(i for i in range(4) if edges[i] <= p)
            sums[b] += loss
            counts[b] += 1
            repeat_sums[b] += loss if repeats[p] else 0.0
            repeat_counts[b] += repeats[p]
    assert [b["tokens"] for b in result["buckets"]] == counts
    assert result["tokens"] == sum(counts) == sum(min(n, 64) for n in lengths)
    for b, s, n in zip(result["buckets"], sums, counts):
        assert b["loss"] == pytest.approx(s / n, rel=1e-5)
    assert [b["repeat_tokens"] for b in result["buckets"]] == repeat_counts == [0, 0, 0, 20 - REPEAT_CONTEXT]
    assert result["buckets"][3]["repeat_loss"] == pytest.approx(repeat_sums[3] / repeat_counts[3], rel=1e-5)
    assert result["buckets"][0]["repeat_loss"] is None
    assert regions(result)["repeats_to_train"] is None  # the repeats lie beyond the training length
    assert regions(result)["repeats_beyond_train"] == pytest.approx(repeat_sums[3] / repeat_counts[3])
    assert result["loss"] == pytest.approx(sum(sums) / sum(counts), rel=1e-5)
    assert [(b["start"], b["end"], b["span"], b["beyond_train"]) for b in result["buckets"]] == [
        (0, 8, "inside", False), (8, 16, "inside", False), (16, 32, "beyond", False),
        (32, 64, "beyond", True)]
    assert result["documents"] == len(lengths)


def far_repeats_by_search(inputs: list[int], targets: list[int], span: int, context: int) -> list[bool]:
    """The far-repeat definition by brute force: the latest earlier end of the same context."""
    out = []
    for t in range(len(targets)):
        ends = [u for u in range(context - 1, t) if t >= context - 1
                and inputs[u - context + 1 : u + 1] == inputs[t - context + 1 : t + 1]]
        out.append(bool(ends) and t - ends[-1] > span and targets[ends[-1]] == targets[t])
    return out


def test_far_repeats_equal_a_search():
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):  # a small alphabet, so that contexts recur near and far
        seq = torch.randint(0, 3, (120,), generator=gen).tolist()
        inputs, targets = seq[:-1], seq[1:]
        for span, context in ((4, 2), (10, 3), (30, 4)):
            assert far_repeats(inputs, targets, span, context) == far_repeats_by_search(inputs, targets, span,
                                                                                        context)
    # a copy 6 back: far for a span of 5, not for 6; a wrong continuation is never a repeat
    inputs, targets = [1, 2, 3, 9, 9, 9, 1, 2, 3], [2, 3, 7, 9, 9, 1, 2, 3, 7]
    assert far_repeats(inputs, targets, 5, 3) == [False] * 8 + [True]
    assert far_repeats(inputs, targets, 6, 3) == [False] * 9
    assert far_repeats(inputs, [*targets[:-1], 8], 5, 3) == [False] * 9


def test_empty_buckets_and_no_documents():
    model = LoadedModel(tiny_model("lmm"), tiny_config("lmm"))
    result = loss_by_position(model, [torch.tensor([1, 2, EOS])], [0, 2, 8], EOS, 8, 8)
    assert [b["tokens"] for b in result["buckets"]] == [2, 1]
    result = loss_by_position(model, [torch.tensor([1, EOS])], [0, 2, 8], EOS, 8, 8)
    assert result["buckets"][1]["loss"] is None and result["buckets"][1]["span"] == "inside"
    with pytest.raises(ValueError, match="no validation documents"):
        loss_by_position(model, [], [0, 2], EOS, 8, 8)


def test_plot_of_several_models(tmp_path):
    def result(shift: float, span: int) -> dict:
        buckets = [{"start": s, "end": e, "loss": 3 - shift - 0.1 * i, "tokens": 10, "loss_min": 2.9 - shift,
                    "loss_max": 3.1 - shift} for i, (s, e) in enumerate([(0, 32), (32, 64), (64, 128)])]
        return {"buckets": buckets, "attention_span": span, "train_len": 64}

    png = plot_loss_by_position({"mac": result(0, 16), "swa": result(0.2, 8)}, tmp_path / "sub" / "lbp.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


# --------------------------------------------------------------------------------------------- CLI


def test_evaluate_cli_writes_table_json_png_and_tensorboard(checkpoint, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "eval.json"
    code = evaluate_main(["--checkpoint", str(checkpoint), "--tasks", "loss_by_position", "--out", str(out),
                          "--tensorboard", str(tmp_path / "tb"), "--batch-size", "3"])
    assert code == 0
    r = json.loads(out.read_text())["loss_by_position"]
    assert r["edges"] == [0, 32, 64, 128] and r["max_position"] == 128  # 4× the training length
    assert r["train_len"] == 32 and r["attention_span"] == 8 and r["documents"] == len(VAL)
    assert sum(b["tokens"] for b in r["buckets"]) == r["tokens"] > 0
    assert all(math.isfinite(b["loss"]) for b in r["buckets"])
    assert [b["span"] for b in r["buckets"]] == ["crosses", "beyond", "beyond"]
    table = out.with_suffix(".md").read_text()
    assert "| positions | × span | tokens | loss |" in table and "| [64, 128) | 8–16 |" in table
    assert out.with_suffix(".loss_by_position.png").read_bytes()[:4] == b"\x89PNG"
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert {"eval/loss_by_position/0", "eval/loss_by_position/64"} <= set(events.Tags()["scalars"])
    assert events.Scalars("eval/loss_by_position/64")[0].step == 3
    assert "| [0, 32) |" in capsys.readouterr().out
    # explicit edges and only documents reaching the last edge: every bucket counts the same documents
    code = evaluate_main(["--checkpoint", str(checkpoint), "--tasks", "loss_by_position", "--out", str(out),
                          "--tensorboard", "none", "--buckets", "0,16,100", "--min-doc-len", "100"])
    r = json.loads(out.read_text())["loss_by_position"]
    assert code == 0 and r["documents"] == 2 and [b["tokens"] for b in r["buckets"]] == [32, 168]


def test_evaluate_cli_text_recall(checkpoint, tmp_path, capsys):
    """text_recall cuts its passages from the same validation split (pretrain/text_recall.py)."""
    out = tmp_path / "recall.json"
    code = evaluate_main(["--checkpoint", str(checkpoint), "--tasks", "text_recall", "--distances", "2,4",
                          "--samples", "4", "--passage", "6", "--out", str(out), "--tensorboard", "none"])
    assert code == 0
    r = json.loads(out.read_text())["text_recall"]
    assert [(x["multiple"], x["distance"], x["passage"], x["passages"]) for x in r.values()] == [
        (2, 16, 6, 4), (4, 32, 6, 4)]
    assert all(math.isfinite(x["gain"]) for x in r.values())
    assert "| 4 | 32 | 6 | 4 |" in out.with_suffix(".md").read_text()
    assert "text_recall at 2× span (16 tokens, 4 passages of 6)" in capsys.readouterr().err
    code = evaluate_main(["--checkpoint", str(checkpoint), "--tasks", "text_recall", "--distances", "2",
                          "--samples", "4", "--span", "5", "--out", str(out), "--tensorboard", "none"])
    r = json.loads(out.read_text())["text_recall"]["2"]
    assert code == 0 and (r["distance"], r["passage"]) == (10, 5)  # --span: the unit and default passage


def test_evaluate_cli_bad_bucket_spec(checkpoint, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main(["--checkpoint", str(checkpoint), "--tasks", "loss_by_position",
                       "--buckets", "0,64,32"])
    assert exit_info.value.code == 2
    assert "--buckets: bucket edges must be strictly increasing" in capsys.readouterr().err


def test_loaded_checkpoint_streams_exactly(checkpoint):
    """A model from load_model streams like the bare model it wraps."""
    model = load_model(checkpoint)
    tokens = torch.randint(0, 257, (1, 50))
    whole = F.cross_entropy(model.logits(tokens[:, :-1])[0].transpose(1, 2), tokens[:, 1:], reduction="none")
    torch.testing.assert_close(token_losses(model.model, tokens[:, :-1], tokens[:, 1:], 7), whole)


# ------------------------------------------------------------------------------------------- recipe


def test_compare_long_smoke(data, tmp_path, capsys):
    compare = bench_module("compare_long")
    tiny = [f"data.train={data}", "data.default_corpus=false", "data.seq_len=64", "data.batch_size=2",
            "data.synthetic_rows=1", "data.synthetic_min_distance=8", "model.dim=32", "model.n_heads=2",
            "model.window=8", "model.segment_len=16", "model.memory_chunk=8", "train.eval_batches=1",
            "train.log_every=1"]
    out = tmp_path / "results.md"
    code = compare.main(["--variants", "mac,swa", "--seeds", "0", "--steps", "2", "--samples", "2",
                         "--distances", "2", "--documents", "4", "--runs", str(tmp_path / "runs"),
                         "--out", str(out), *tiny])
    assert code == 0
    assert (tmp_path / "runs" / "mac-s0").is_dir() and (tmp_path / "runs" / "swa-s0").is_dir()
    table = out.read_text()
    assert "| mac |" in table and "| swa |" in table and "mqar 2×" in table
    assert "far repeats < train len" in table and "on the far repeats only" in table
    rows = json.loads(out.with_suffix(".json").read_text())
    assert {(r["variant"], r["seed"]) for r in rows["runs"]} == {("mac", 0), ("swa", 0)}
    assert all(r["step"] == 2 for r in rows["runs"])
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert "| swa |" in capsys.readouterr().out
    # evaluating a task later adds it to each run's earlier results; SWA carries nothing beyond its window
    code = compare.main(["--eval-only", "--tasks", "text_recall", "--variants", "mac,swa", "--samples", "2",
                         "--distances", "2", "--runs", str(tmp_path / "runs"), "--out", str(out), *tiny])
    assert code == 0
    swa = json.loads((tmp_path / "runs" / "swa-s0" / "eval" / "compare_long.json").read_text())
    assert {"loss_by_position", "mqar", "text_recall"} <= set(swa) and swa["step"] == 2
    assert swa["text_recall"]["2"]["gain"] == pytest.approx(0.0, abs=1e-6)
    assert "recall gain 2×" in out.read_text() and "far repeats < train len" in out.read_text()


def test_compare_long_counts_only_the_text_tokens_fed():
    compare = bench_module("compare_long")
    cfg = load_config(None, ["data.seq_len=64", "data.batch_size=2", "train.grad_accum=3",
                             "data.synthetic_sequences=4", "data.synthetic_alone_steps=10"])
    assert compare.text_tokens(cfg, 5) == 0  # still in the synthetic-alone steps
    assert compare.text_tokens(cfg, 12) == 2 * 64 * 3 * 2


def test_compare_long_regions_use_the_shared_window_even_for_full_attention_alone():
    """Full attention's own span is its training length; its regions still start at the configs' window."""
    compare = bench_module("compare_long")
    buckets = [{"start": a, "end": b, "tokens": 10, "loss": loss, "repeat_tokens": 0, "repeat_loss": None}
               for a, b, loss in ((0, 8, 3.0), (8, 32, 2.0), (32, 128, 1.0))]
    lbp = {"attention_span": 32, "train_len": 32, "max_position": 128, "documents": 1, "buckets": buckets}
    row = {"variant": "full", "seed": 0, "params": 1, "tokens": 1, "train_loss": None, "train_seconds": 0,
           "step_seconds": None, "eval": {"attention_span": 8, "loss_by_position": lbp}}
    summary = compare.summarise([row], [2])
    assert summary["full"]["regions"]["inside_span"]["mean"] == 3.0  # [0, 8): inside the window of 8
    assert summary["full"]["regions"]["span_to_train"]["mean"] == 2.0
    assert "(window 8, training length 32" in compare.markdown(summary, [2])
