"""`prepare`: round trip, split by document, manifest checksums, dtype, and errors naming the bad input."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from test_data_helpers import write_docs

from data_pipeline.corpus import default_corpus_files, expand_inputs, iter_documents
from data_pipeline.prepare import main, prepare, split_of
from data_pipeline.shards import Manifest, ShardWriter, sha256_of
from data_pipeline.tokenizer import ByteTokenizer, token_dtype


def read_split(folder: Path, manifest: Manifest, split: str) -> np.ndarray:
    arrays = []
    for shard in manifest.splits[split]:
        with tarfile.open(folder / shard.name) as tar:
            for member in tar.getmembers():
                data = tar.extractfile(member).read()
                arrays.append(np.frombuffer(data, dtype=np.dtype(manifest.dtype).newbyteorder("<")))
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)


def test_round_trip_split_and_checksums(tmp_path: Path) -> None:
    docs = write_docs(tmp_path / "text", 60)
    manifest = prepare(docs, tmp_path / "out", sample_tokens=50, shard_samples=7, val_fraction=0.25,
                       progress=False)
    tok = ByteTokenizer()
    texts = {p.as_posix(): p.read_text(encoding="utf-8") for p in docs}
    for split in ("train", "val"):
        names = [n for n in texts if split_of(n, 0.25) == split]
        assert manifest.documents[split] == len(names) > 0
        stream = np.concatenate([tok.encode(texts[n]) + [tok.eos_id] for n in names])
        got = read_split(tmp_path / "out", manifest, split)
        total = sum(s.tokens for s in manifest.splits[split])
        assert len(got) == total == len(stream) - manifest.dropped_tokens[split]
        assert total % 50 == 0 and manifest.dropped_tokens[split] < 50
        np.testing.assert_array_equal(got, stream[:total])
        # decode(samples) reproduces the documents (EOS separates them)
        decoded = [tok.decode(list(part)) for part in np.split(got, np.flatnonzero(got == tok.eos_id))]
        assert decoded[0] == texts[names[0]]
        assert all(d == texts[n] for d, n in zip(decoded[1:-1], names[1:]))
        for shard in manifest.splits[split]:
            assert sha256_of(tmp_path / "out" / shard.name) == shard.sha256
            assert shard.tokens == shard.samples * 50 and shard.samples <= 7
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk["dtype"] == "uint16" and on_disk["tokenizer"]["type"] == "bytes"
    assert on_disk["vocab_size"] == 257 and on_disk["eos_id"] == 256


def test_split_is_by_document_and_independent_of_workers(tmp_path: Path) -> None:
    docs = write_docs(tmp_path / "text", 30)
    one = prepare(expand_inputs([str(tmp_path / "text")]), tmp_path / "a", sample_tokens=40,
                  shard_samples=5, val_fraction=0.3, workers=1, progress=False)
    two = prepare(expand_inputs([str(tmp_path / "text")]), tmp_path / "b", sample_tokens=40,
                  shard_samples=5, val_fraction=0.3, workers=2, progress=False)
    assert one.splits == two.splits  # same shards, same checksums
    # ids are relative to the input folder: the split does not depend on where the corpus lives
    assert [split_of(p.name, 0.3) for p in docs].count("val") == one.documents["val"]


def test_progress_in_a_log_is_a_line_per_tenth_without_carriage_returns(tmp_path: Path, capsys) -> None:
    docs = write_docs(tmp_path / "text", 40)
    prepare(docs, tmp_path / "out", sample_tokens=40, shard_samples=5, val_fraction=0.3)
    err = capsys.readouterr().err  # captured: not a terminal, as a batch job's log
    lines = [line for line in err.splitlines() if line.startswith("tokenising: ")]
    assert "\r" not in err and 5 <= len(lines) <= 10 and lines[-1].startswith("tokenising: 100%, ")


def test_jsonl_inputs_and_uint32(tmp_path: Path) -> None:
    records = [{"text": f"record {i} " * 5, "id": i} for i in range(20)]
    path = tmp_path / "corpus.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r) for r in records) + "\n\n")
    manifest = prepare([path], tmp_path / "out", sample_tokens=16, shard_samples=100, val_fraction=0.0,
                       progress=False)
    assert manifest.documents["train"] == 20
    stream = b"".join(r["text"].encode() + b"\x00" for r in records)  # EOS stands in as a marker
    got = read_split(tmp_path / "out", manifest, "train")
    assert bytes(np.where(got == 256, 0, got).astype(np.uint8)) == stream[: len(got)]
    assert token_dtype(65536) == np.dtype("<u2") and token_dtype(65537) == np.dtype("<u4")
    writer = ShardWriter(tmp_path, "big", 4, 10, token_dtype(100_000))
    writer.add(np.array([1, 70_000, 99_999, 5, 6], dtype=np.int64))
    assert writer.close() == 1
    with tarfile.open(tmp_path / writer.shards[0].name) as tar:
        data = tar.extractfile(tar.getmembers()[0]).read()
    assert np.frombuffer(data, "<u4").tolist() == [1, 70_000, 99_999, 5]


@pytest.mark.parametrize("workers", [1, 2])
def test_parquet_inputs_give_the_jsonl_documents(tmp_path: Path, workers: int) -> None:
    """A .parquet file's text column (the Hugging Face hub's format, read a record batch at a time) makes
    the documents its rows would make as jsonl records; a missing column or a null names file and row."""
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    texts = [f"document {i}: " + "words " * (i % 7) for i in range(50)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    pq.write_table(pa.table({"id": list(range(50)), "text": texts}), tmp_path / "docs.parquet",
                   row_group_size=16)
    options = {"sample_tokens": 16, "shard_samples": 100, "val_fraction": 0.0, "workers": workers,
               "progress": False}
    from_jsonl = prepare([tmp_path / "docs.jsonl"], tmp_path / "a", **options)
    from_parquet = prepare([tmp_path / "docs.parquet"], tmp_path / "b", **options)
    assert from_parquet.documents == from_jsonl.documents == {"train": 50, "val": 0}
    assert np.array_equal(read_split(tmp_path / "b", from_parquet, "train"),
                          read_split(tmp_path / "a", from_jsonl, "train"))
    documents = list(iter_documents(tmp_path / "docs.parquet"))  # what train_tokenizer reads
    assert documents[:2] == [(f"{tmp_path / 'docs.parquet'}:1", texts[0]), (f"{tmp_path / 'docs.parquet'}:2",
                                                                            texts[1])]
    assert len(documents) == 50
    with pytest.raises(ValueError, match=r"docs\.parquet: no column 'body' \(it has id, text; choose one"):
        prepare([tmp_path / "docs.parquet"], tmp_path / "c", text_field="body", progress=False)
    pq.write_table(pa.table({"text": ["fine", None]}), tmp_path / "nulls.parquet")
    with pytest.raises(ValueError, match=r"nulls\.parquet: row 2: column 'text' is NoneType, not a string"):
        prepare([tmp_path / "nulls.parquet"], tmp_path / "d", progress=False)


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_json_line_names_file_and_line(tmp_path: Path, workers: int) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: not valid JSON"):
        prepare([path], tmp_path / "out", workers=workers, progress=False)


def test_missing_text_field_and_unreadable_inputs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "nofield.jsonl"
    path.write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(ValueError, match=r"nofield\.jsonl:2: missing text field 'text'"):
        prepare([path], tmp_path / "out", progress=False)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"ok \xff\xfe bad")
    with pytest.raises(ValueError, match=r"binary\.txt: not UTF-8"):
        prepare([binary], tmp_path / "out", progress=False)
    broken_gz = tmp_path / "broken.jsonl.gz"
    broken_gz.write_bytes(gzip.compress(b'{"text": "x"}\n' * 100)[:40])
    with pytest.raises(ValueError, match=r"broken\.jsonl\.gz: cannot be read"):
        prepare([broken_gz], tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError, match="nothere"):
        expand_inputs([str(tmp_path / "nothere")])
    assert main([str(tmp_path / "nothere"), "--out", str(tmp_path / "o")]) == 2
    assert "nothere" in capsys.readouterr().err


def test_cli_help_and_default_corpus(tmp_path: Path) -> None:
    help_text = subprocess.run([sys.executable, "-m", "data_pipeline.prepare", "--help"], check=True,
                               capture_output=True, text=True, timeout=60).stdout
    for option in ("--default-corpus", "--sample-tokens", "--shard-samples", "--val-fraction", "--workers",
                   "--text-field", "--glob", "--tokenizer", "--max-bytes"):
        assert option in help_text
    files = default_corpus_files(200_000)
    assert files == sorted(files, key=lambda f: f.path) and all(f.path.suffix == ".py" for f in files)
    assert sum(f.path.stat().st_size for f in files) <= 200_000 and not any("test" in f.name for f in files)
    assert main(["--default-corpus", "--max-bytes", "200000", "--out", str(tmp_path / "std"),
                 "--sample-tokens", "129", "--shard-samples", "100", "--quiet", "--workers", "1"]) == 0
    manifest = Manifest.read(tmp_path / "std")
    assert manifest.sample_tokens == 129 and manifest.tokens("train") > 50_000
