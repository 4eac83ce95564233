"""Checkpoint conversion (pretrain/convert.py): a tp=2 × pp=2 ZeRO-1 run → Hugging Face, loaded where this
project cannot be imported, equals our model (logits, greedy generation); Hugging Face → training
checkpoints at tp=1 and tp=2 resume with the original run's next loss; bad inputs fail naming the file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain.convert import main as convert
from pretrain.generate import load_for_generation
from pretrain.hf_export import export_hf
from tests.launcher import ROOT, launch
from tests.train_worker import base_overrides
from titans.model import TitansConfig, TitansLM
from titans.streaming import generate

WORKER = ROOT / "tests" / "train_worker.py"
DEADLINE_S = 240
PROMPT = list(b"def main(argv):\n    parser = ")
NEW_TOKENS = 64

# Loads a Hugging Face folder with this project's packages blocked, prints logits and a greedy
# continuation as JSON: proof that the export is self-contained.
HF_SCRIPT = """
import importlib.abc, json, sys
class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("titans", "pretrain", "parallel", "data_pipeline", "tests"):
            raise ImportError(f"{name} is not importable here")
sys.meta_path.insert(0, Blocked())
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
try:
    import titans
    raise SystemExit("titans is importable")
except ImportError:
    pass
spec = json.loads(sys.argv[1])
results = {}
for folder in spec["folders"]:
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    tokens = torch.tensor([spec["tokens"]])
    with torch.no_grad():
        logits = model(tokens, use_cache=False).logits
    entry = {"logits": logits[0].tolist()}
    if spec.get("generate"):
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        prompt = torch.tensor([tok.encode(spec["prompt_text"])])
        out = model.generate(prompt, max_new_tokens=spec["generate"], do_sample=False)
        entry["prompt"] = prompt[0].tolist()
        entry["generated"] = out[0, prompt.shape[1]:].tolist()
    results[folder] = entry
print("RESULTS " + json.dumps(results))
"""


def run_hf(folders: list[Path], tokens: list[int], tmp: Path, generate_tokens: int = 0) -> dict:
    spec = {"folders": [str(f) for f in folders], "tokens": tokens, "generate": generate_tokens,
            "prompt_text": bytes(PROMPT).decode()}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp / "hf_home"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", HF_SCRIPT, json.dumps(spec)], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=DEADLINE_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULTS "))
    return json.loads(line[len("RESULTS "):])


def job(name: str, out: Path, *layout: str) -> dict:
    return {"name": name, "overrides": base_overrides(out, 4, steps=4) + ["train.keep_last=5", *layout]}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The tp2×pp2 ZeRO-1 run (4 steps, a checkpoint at step 3), its Hugging Face export, and resumes
    from the export resharded to tp=1 and tp=2."""
    tmp = tmp_path_factory.mktemp("convert")
    original = launch(WORKER, [job("original", tmp / "run", "parallel.tp=2", "parallel.pp=2",
                                   "parallel.zero_stage=1")], tmp / "w4", world=4, timeout=DEADLINE_S)
    step3 = tmp / "run" / "checkpoints" / "step_00000003"
    assert convert(["--checkpoint", str(step3), "--to", "hf", "--out", str(tmp / "hf")]) == 0
    folders = {}
    for tp in (1, 2):
        folders[tp] = tmp / f"tp{tp}"
        assert convert(["--checkpoint", str(tmp / "hf"), "--to", "checkpoint", "--out", str(folders[tp]),
                        f"parallel.tp={tp}", "parallel.pp=1", "parallel.zero_stage=0"]) == 0
    resumed = {tp: launch(WORKER, [job(f"tp{tp}", folders[tp], f"parallel.tp={tp}")], tmp / f"r{tp}",
                          world=tp, timeout=DEADLINE_S)[f"tp{tp}"] for tp in (1, 2)}
    return {"tmp": tmp, "step3": step3, "hf": tmp / "hf", "original": original["original"],
            "resumed": resumed}


def test_hugging_face_export_equals_our_model_where_titans_is_not_importable(converted) -> None:
    tmp, hf = converted["tmp"], converted["hf"]
    tokens = list(b"import os\nimport sys\n\n\ndef main(argv: list[str]) -> int:\n    return 0\n" * 3)
    theirs = run_hf([hf], tokens, tmp, generate_tokens=NEW_TOKENS)[str(hf)]
    model, _ = load_for_generation(converted["step3"])
    with torch.no_grad():
        ours = model(torch.tensor([tokens]))[0][0]
    torch.testing.assert_close(torch.tensor(theirs["logits"]), ours, rtol=1e-5, atol=1e-5)
    assert theirs["prompt"] == PROMPT  # the exported byte tokenizer encodes as ours does
    card = (hf / "README.md").read_text()
    assert "| trained | 3 steps of " in card and "| last training loss | " in card
    greedy = generate(model, torch.tensor([PROMPT]), NEW_TOKENS)[0, len(PROMPT):].tolist()
    assert theirs["generated"] == greedy
    cli = subprocess.run([sys.executable, "-m", "pretrain.generate", "--checkpoint", str(converted["step3"]),
                          "--prompt", bytes(PROMPT).decode(), "--max-new-tokens", str(NEW_TOKENS), "--ids"],
                         cwd=ROOT, capture_output=True, text=True, timeout=DEADLINE_S)
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["generated"] == greedy


def test_resharded_checkpoints_resume_with_the_original_next_loss(converted) -> None:
    original = converted["original"]["losses"]
    for tp, result in converted["resumed"].items():
        assert result["losses"][:3] == original[:3], f"tp={tp}: the carried loss history"
        assert result["losses"][3] == pytest.approx(original[3], rel=1e-5), f"tp={tp}"


@pytest.mark.parametrize("layers", ["mal,lmm", "swa,mac"])
def test_every_block_kind_exports(layers: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = TitansConfig(vocab_size=257, dim=32, n_layers=2, n_heads=2, layers=layers, window=8,
                       segment_len=16, memory_chunk=8, n_persistent=2, mac_memory_tokens=4)
    model = TitansLM(cfg).eval()
    export_hf(model.state_dict(), cfg, tmp_path / "hf", None, 256)
    tokens = list(range(40, 90))
    theirs = run_hf([tmp_path / "hf"], tokens, tmp_path)[str(tmp_path / "hf")]
    with torch.no_grad():
        ours = model(torch.tensor([tokens]))[0][0]
    torch.testing.assert_close(torch.tensor(theirs["logits"]), ours, rtol=1e-5, atol=1e-5)
    card = (tmp_path / "hf" / "README.md").read_text()  # the model card, without a run behind it
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert f"| blocks | {layers} (2 layers) |" in card
    assert f"| parameters | {sum(p.numel() for p in model.parameters()):,} |" in card
    assert "trust_remote_code=True" in card and "| trained |" not in card


def test_safetensors_round_trip(converted, tmp_path: Path) -> None:
    out = tmp_path / "dense"
    assert convert(["--checkpoint", str(converted["step3"]), "--to", "safetensors", "--out", str(out)]) == 0
    back = tmp_path / "back"
    assert convert(["--checkpoint", str(out), "--to", "checkpoint", "--out", str(back)]) == 0
    a, _ = load_for_generation(converted["step3"])
    b, _ = load_for_generation(back)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def error_of(args: list[str], capsys) -> str:
    assert convert(args) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(("to", "extra", "message"), [
    ("hf", ["--dp", "2"], "--dp: only with --to checkpoint, not --to hf"),
    ("safetensors", ["--config", "c.yaml"], "--config: only with --to checkpoint"),
    ("hf", ["parallel.tp=2"], "parallel.tp=2: only with --to checkpoint"),
    ("checkpoint", ["--overwrite"], "--overwrite: only with --to safetensors / hf, not --to checkpoint"),
    ("safetensors", ["--tokenizer", "bytes"], "--tokenizer: only with --to hf, not --to safetensors"),
])
def test_an_option_the_target_does_not_take_is_refused(to, extra, message, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        convert(["--checkpoint", str(tmp_path), "--to", to, "--out", str(tmp_path / "out"), *extra])
    assert message in capsys.readouterr().err


def test_bad_inputs_fail_naming_the_file(converted, tmp_path: Path, capsys) -> None:
    step3, hf = converted["step3"], converted["hf"]
    missing = tmp_path / "missing_shard"
    shutil.copytree(step3, missing)
    (missing / "shards" / "model-tp1-pp0.pt").unlink()
    err = error_of(["--checkpoint", str(missing), "--to", "safetensors", "--out", str(tmp_path / "a")],
                   capsys)
    assert "model-tp1-pp0.pt" in err and "missing" in err

    truncated = tmp_path / "truncated"
    shutil.copytree(step3, truncated)
    shard = truncated / "shards" / "model-tp0-pp1.pt"
    shard.write_bytes(shard.read_bytes()[:100])
    err = error_of(["--checkpoint", str(truncated), "--to", "hf", "--out", str(tmp_path / "b")], capsys)
    assert "model-tp0-pp1.pt" in err

    cut_hf = tmp_path / "cut_hf"
    shutil.copytree(hf, cut_hf)
    weights = cut_hf / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    err = error_of(["--checkpoint", str(cut_hf), "--to", "checkpoint", "--out", str(tmp_path / "c")], capsys)
    assert "model.safetensors" in err

    other_model = tmp_path / "other_model"
    shutil.copytree(hf, other_model)
    config = json.loads((other_model / "config.json").read_text())
    config["titans"]["n_layers"] = 4
    (other_model / "config.json").write_text(json.dumps(config))
    err = error_of(["--checkpoint", str(other_model), "--to", "safetensors", "--out", str(tmp_path / "d")],
                   capsys)
    assert "model.safetensors" in err and "blocks.2" in err

    err = error_of(["--checkpoint", str(hf), "--to", "checkpoint", "--out", str(tmp_path / "e"),
                    "model.dim=64"], capsys)
    assert "model.dim=64" in err

    dense = tmp_path / "dense"
    assert convert(["--checkpoint", str(hf), "--to", "safetensors", "--out", str(dense)]) == 0
    meta = json.loads((dense / "titans_config.json").read_text())
    (dense / "titans_config.json").write_text(json.dumps(meta | {"format_version": 99}))
    err = error_of(["--checkpoint", str(dense), "--to", "hf", "--out", str(tmp_path / "f")], capsys)
    assert "format version 99" in err and "titans_config.json" in err


def test_an_export_replaces_a_folder_only_when_asked_and_only_once_complete(converted, tmp_path: Path, capsys,
                                                                           monkeypatch) -> None:
    import pretrain.hf_export

    out = tmp_path / "hf"
    out.mkdir()
    (out / "stale.txt").write_text("an earlier export's file")
    args = ["--checkpoint", str(converted["hf"]), "--to", "hf", "--out", str(out)]
    assert "already exists and is not empty" in error_of(args, capsys)

    def disk_full(*_: object, **__: object) -> None:
        raise OSError(28, "No space left on device")
    with monkeypatch.context() as patched:
        patched.setattr(pretrain.hf_export, "save_weights", disk_full)
        assert "No space left on device" in error_of([*args, "--overwrite"], capsys)
    assert [p.name for p in tmp_path.iterdir()] == ["hf"] and [p.name for p in out.iterdir()] == ["stale.txt"]

    assert convert([*args, "--overwrite"]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["hf"] and not (out / "stale.txt").exists()
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # not safetensors' 0600
    # an export over its own source would delete what it converts
    own = ["--checkpoint", str(out), "--to", "safetensors", "--overwrite"]
    assert "holds (or is inside) the source" in error_of([*own, "--out", str(out)], capsys)
    assert "holds (or is inside) the source" in error_of([*own, "--out", str(tmp_path)], capsys)
    assert (out / "model.safetensors").is_file()


def test_a_run_folder_is_refused_only_when_it_holds_a_checkpoint(converted, tmp_path: Path, capsys) -> None:
    args = ["--checkpoint", str(converted["hf"]), "--to", "checkpoint", "--out", str(tmp_path / "run")]
    (tmp_path / "run" / "checkpoints" / ".step_00000003.partial").mkdir(parents=True)  # one that died
    assert convert(args) == 0
    assert "already holds checkpoints: choose a new --out" in error_of(args, capsys)


def test_beam_search_reorders_the_streaming_cache(converted, tmp_path: Path, monkeypatch) -> None:
    """transformers' beam search with the TitansCache (reordered per step) equals it without a cache."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    model = AutoModelForCausalLM.from_pretrained(converted["hf"], trust_remote_code=True).eval()
    prompt = torch.tensor([PROMPT])
    cached = model.generate(prompt, max_new_tokens=12, num_beams=3, do_sample=False)
    uncached = model.generate(prompt, max_new_tokens=12, num_beams=3, do_sample=False, use_cache=False)
    assert cached.tolist() == uncached.tolist()


def test_a_padded_batch_generates_each_prompt_as_if_alone(converted, tmp_path: Path, monkeypatch) -> None:
    """Prompts of different lengths padded by the export's tokenizer (left, its default; right too): each
    row generates, greedily and by beam search, what its prompt alone does, and scores as alone. The model
    never sees padding (titans.streaming.ragged_step); training on padding is refused."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    model = AutoModelForCausalLM.from_pretrained(converted["hf"], trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(converted["hf"], trust_remote_code=True)
    prompts = ["def main(argv):\n    parser = ", "import os\n", "class Run:\n    def __init__(self", "x = "]
    for options in ({"do_sample": False}, {"do_sample": False, "num_beams": 2}):
        batch = tok(prompts, return_tensors="pt", padding=True)
        mask = batch["attention_mask"]
        assert mask[:, -1].all() and not mask[:, 0].all()  # padded on the left
        out = model.generate(**batch, max_new_tokens=10, **options)
        for row, prompt in zip(out, prompts, strict=True):
            alone = tok(prompt, return_tensors="pt")
            want = model.generate(**alone, max_new_tokens=10, **options)[0, alone["input_ids"].shape[1] :]
            assert row[batch["input_ids"].shape[1] :].tolist() == want.tolist(), (prompt, options)
    tok.padding_side = "right"
    batch = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
        for row, prompt in enumerate(prompts):
            alone = model(**tok(prompt, return_tensors="pt")).logits[0]
            torch.testing.assert_close(logits[row, : alone.shape[0]], alone, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="without gradients only"):
        model(**batch, labels=batch["input_ids"])
