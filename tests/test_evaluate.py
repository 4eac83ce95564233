"""Evaluation: loading checkpoints, perplexity, synthetic long-context tasks, the evaluate CLI."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from data_pipeline.corpus import expand_inputs
from data_pipeline.prepare import prepare
from pretrain import synthetic
from pretrain.checkpoint import list_checkpoints
from pretrain.config import build_config, load_config
from pretrain.evaluate import main as evaluate_main
from pretrain.evaluate import perplexity, task_accuracy, val_batches
from pretrain.loss import causal_lm_loss
from pretrain.model_io import (
    LanguageModel,
    LoadedModel,
    attention_span,
    clean_state_dict,
    load_model,
    piece_multiple,
    stream_logits,
)
from pretrain.train import train
from titans.model import TitansConfig, TitansLM

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny MAC+MAG model trained for a few steps on this repository's sources (bytes)."""
    base = tmp_path_factory.mktemp("eval")
    files = expand_inputs([str(ROOT / "titans")], ("*.py",))  # ids relative: a stable split
    prepare(files, base / "data", "bytes", sample_tokens=33, shard_samples=64, val_fraction=0.2,
            progress=False)
    cfg = load_config(None, [
        f"data.train={base / 'data'}", "data.default_corpus=false", "data.seq_len=32", "data.batch_size=2",
        "model.vocab_size=257", "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.layers=mac,mag",
        "model.window=8", "model.segment_len=16", "model.memory_chunk=8", "model.n_persistent=2",
        f"train.out_dir={base / 'run'}", "train.steps=6", "train.warmup_steps=1", "train.eval_every=6",
        "train.eval_batches=2", "train.checkpoint_every=6", "train.log_every=3", "train.lr=3e-3",
    ])
    result = train(cfg)
    return {"dir": base / "run", "data": base / "data", "result": result, "cfg": cfg}


def tiny_model(layers: str, seed: int = 0) -> LoadedModel:
    torch.manual_seed(seed)
    cfg = TitansConfig(vocab_size=257, dim=32, n_layers=2, n_heads=2, layers=layers, window=8,
                       segment_len=16, memory_chunk=8, n_persistent=2)
    return LoadedModel(TitansLM(cfg).eval(), cfg)


# ------------------------------------------------------------------------------------------ model_io


def test_load_model_from_run_or_checkpoint_dir(run):
    from_run = load_model(run["dir"])
    from_ckpt = load_model(run["result"].checkpoint)
    assert isinstance(from_run, LanguageModel)
    assert from_run.path == from_ckpt.path == run["result"].checkpoint and from_run.step == 6
    assert not from_run.model.training
    assert from_run.config.layer_kinds == ["mac", "mag"] and from_run.vocab_size == 257
    assert from_run.piece_multiple == 16 and from_run.attention_span == 16  # MAC segment > MAG window
    tokens = torch.randint(0, 257, (2, 40))
    logits, states = from_run.logits(tokens)
    assert logits.shape == (2, 40, 257) and len(states) == 2
    assert torch.equal(logits, from_ckpt.logits(tokens)[0])


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no checkpoint found"):
        load_model(tmp_path)


def test_load_model_from_zero_shards(run, tmp_path, monkeypatch):
    """A ZeRO checkpoint keeps the model in DeepSpeed shards: load_model consolidates them."""
    import parallel.zero
    from pretrain.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(run["result"].checkpoint)
    weights = {f"module.{k}": v for k, v in state.pop("model").items() if k != "head.weight"}
    state["zero"] = {"stage": 1, "dir": "deepspeed", "world_size": 1}
    ckpt = save_checkpoint(tmp_path, 6, state, keep_last=1)
    seen = []
    monkeypatch.setattr(parallel.zero, "consolidated_state_dict", lambda path: seen.append(path) or weights)
    loaded = load_model(tmp_path)
    assert seen == [ckpt]
    tokens = torch.randint(0, 257, (1, 20))
    assert torch.equal(loaded.logits(tokens)[0], load_model(run["dir"]).logits(tokens)[0])


def test_exports_load_as_their_checkpoint_and_evaluate_with_the_runs_mqar_pairs(run, tmp_path, capsys,
                                                                                 monkeypatch):
    from pretrain.convert import TRAINING_STATE
    from pretrain.convert import main as convert

    tokens = torch.randint(0, 257, (1, 40))
    expected = load_model(run["dir"]).logits(tokens)[0]
    for kind in ("safetensors", "hf"):
        out = tmp_path / kind
        assert convert(["--checkpoint", str(run["dir"]), "--to", kind, "--out", str(out)]) == 0
        loaded = load_model(out)
        assert loaded.path == out and loaded.step == 6 and loaded.run_config == run["cfg"].to_dict()
        assert torch.equal(loaded.logits(tokens)[0], expected)
    common = ["--tasks", "mqar", "--distances", "1", "--samples", "2"]
    assert evaluate_main(["--checkpoint", str(tmp_path / "hf"), *common, "--out",
                          str(tmp_path / "a.json")]) == 0
    assert json.loads((tmp_path / "a.json").read_text())["mqar_pairs"] == 4  # the run's data.synthetic_pairs
    assert not (tmp_path / "hf" / "tensorboard").exists()  # an export gets no events unless asked
    monkeypatch.chdir(tmp_path)  # by default where the command runs, not inside the export
    assert evaluate_main(["--checkpoint", str(tmp_path / "hf"), *common]) == 0
    assert (tmp_path / "eval-hf.json").is_file() and not (tmp_path / "hf" / "eval").exists()
    (tmp_path / "safetensors" / TRAINING_STATE).unlink()  # weights and model config only
    bare = load_model(tmp_path / "safetensors")
    assert bare.step is None and set(bare.run_config) == {"model"}
    assert evaluate_main(["--checkpoint", str(tmp_path / "safetensors"), *common, "--out",
                          str(tmp_path / "b.json")]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["mqar_pairs"] == 8
    assert "mqar 8 pairs" in capsys.readouterr().err


@pytest.mark.parametrize("kernel", ["triton", "compiled"])
def test_load_model_falls_back_to_the_eager_kernel_where_the_runs_cannot_run(run, tmp_path, monkeypatch,
                                                                             kernel):
    """A run trained with the Triton kernel (GPU) or the compiled one (a C++ compiler) loads on a CPU
    without them, for evaluation and generation, with the eager kernel and a warning: the same function,
    so the same logits."""
    import titans.kernels.chunk_step_triton as triton_kernels
    import titans.kernels.toolchain as toolchain
    from pretrain.checkpoint import load_checkpoint, save_checkpoint
    from pretrain.generate import load_for_generation

    monkeypatch.setattr(triton_kernels, "interpreted", lambda: False)  # the tests run Triton's interpreter
    monkeypatch.setattr(toolchain, "inductor_cpu_problem", lambda: "InvalidCxxCompiler: none here")
    state = load_checkpoint(run["result"].checkpoint)
    state["config"]["model"]["memory_kernel"] = kernel
    ckpt = save_checkpoint(tmp_path, 6, state, keep_last=1)
    warned = f"memory_kernel={kernel} cannot run on cpu here; loaded with memory_kernel=torch"
    with pytest.warns(UserWarning, match=warned):
        loaded = load_model(tmp_path)
    with pytest.warns(UserWarning, match=warned):
        generating, _ = load_for_generation(ckpt)
    assert loaded.config.memory_kernel == generating.cfg.memory_kernel == "torch"
    tokens = torch.randint(0, 257, (1, 20))
    assert torch.equal(loaded.logits(tokens)[0], load_model(run["dir"]).logits(tokens)[0])


def test_clean_state_dict_strips_training_wrappers():
    t = torch.zeros(1)
    cleaned = clean_state_dict({"module.blocks.3.block.attn.w": t, "_orig_mod.embed.weight": t, "norm.w": t})
    assert set(cleaned) == {"blocks.3.attn.w", "embed.weight", "norm.w"}


def test_spans_and_alignment():
    cfg = TitansConfig(vocab_size=64, dim=32, n_heads=2, n_layers=2, layers="mag,swa", window=24,
                       memory_chunk=8)
    assert attention_span(cfg) == 24 and piece_multiple(cfg) == 8
    cfg = TitansConfig(vocab_size=64, dim=32, n_heads=2, n_layers=1, layers="mac", segment_len=48,
                       memory_chunk=16)
    assert attention_span(cfg) == 48 and piece_multiple(cfg) == 48


@pytest.mark.parametrize("layers", ["mac,lmm", "lmm"])
def test_stream_logits_carries_the_memory_exactly(layers):
    """MAC attends within its segment and LMM has no attention: pieces equal one call exactly."""
    model = tiny_model(layers)
    tokens = torch.randint(0, 257, (2, 70))
    whole, _ = model.logits(tokens)
    pieces, _ = stream_logits(model, tokens, piece_len=32)
    torch.testing.assert_close(pieces, whole, atol=1e-5, rtol=1e-5)
    positions = torch.tensor([[0, 31, 32, 69], [5, 6, 40, 64]])
    picked, _ = stream_logits(model, tokens, piece_len=32, positions=positions)
    torch.testing.assert_close(picked, whole.gather(1, positions.unsqueeze(-1).expand(-1, -1, 257)),
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="multiple of"):
        stream_logits(model, tokens, piece_len=12)


# ---------------------------------------------------------------------------------------- perplexity


def test_perplexity_is_finite_and_matches_a_direct_computation(run):
    model = load_model(run["dir"])
    result = perplexity(model, val_batches(model.run_config, str(run["data"]), max_batches=2))
    assert math.isfinite(result["loss"]) and result["ppl"] == pytest.approx(math.exp(result["loss"]))
    assert result["tokens"] == 2 * 2 * 32
    losses = []
    with torch.no_grad():
        for batch in val_batches(model.run_config, str(run["data"]), max_batches=2):
            losses.append(causal_lm_loss(model.model, batch[:, :-1], batch[:, 1:]).item())
    assert result["loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    # the same batches the training job validated on, in the same order
    assert result["loss"] == pytest.approx(run["result"].val_losses[6], rel=1e-5)


# ----------------------------------------------------------------------------------- synthetic tasks


@pytest.mark.parametrize("vocab", [257, 64, 32000])
def test_synthetic_answers_are_correct_by_construction(vocab):
    space = synthetic.TokenSpace.for_vocab(vocab)
    for distance in (6, 20, 100):
        tokens, positions, answers = synthetic.needle(5, distance, space, seed=distance)
        assert tokens.shape == (5, 16 + synthetic.KEY_LEN + 3 + distance) and tokens.max() < vocab
        assert torch.equal(tokens.gather(1, positions + 1), answers)
        for b in range(5):
            p = int(positions[b, 0])
            question = tokens[b, p - synthetic.KEY_LEN - 1 : p + 2].tolist()
            needle_at = next(i for i in range(p) if tokens[b, i] == space.open)
            assert tokens[b, needle_at : needle_at + synthetic.KEY_LEN + 3].tolist() == question
            assert p + 1 - (needle_at + synthetic.KEY_LEN + 2) == distance  # value to answer
            assert int(answers[b, 0]) in space.values
        for questions in (None, 2):  # every key asked, or 2 of the 6 (the same pairs: one random stream)
            tokens, positions, answers = synthetic.mqar(5, distance, space, n_pairs=6, seed=distance,
                                                        questions=questions)
            assert positions.shape == (5, questions or 6) and tokens.shape[1] == positions[0, -1] + 2
            assert torch.equal(tokens.gather(1, positions + 1), answers) and tokens.max() < vocab
            for b in range(5):
                pairs = tokens[b, : 6 * (synthetic.KEY_LEN + 4)].view(6, -1)
                table = {tuple(row[1:3].tolist()): int(row[4]) for row in pairs}
                assert len(table) == 6  # distinct keys
                asked = [tuple(tokens[b, p - 2 : p].tolist()) for p in positions[b].tolist()]
                assert len(set(asked)) == len(asked)
                assert [table[key] for key in asked] == answers[b].tolist()
    for questions in (0, 7):
        with pytest.raises(ValueError, match=f"asks 1 to n_pairs=6 of its keys, got questions={questions}"):
            synthetic.mqar(1, 10, space, n_pairs=6, questions=questions)
    assert torch.equal(synthetic.needle(3, 30, space, seed=1).tokens,
                       synthetic.needle(3, 30, space, seed=1).tokens)
    assert not torch.equal(synthetic.mqar(3, 30, space, seed=1).tokens,
                           synthetic.mqar(3, 30, space, seed=2).tokens)


def test_synthetic_bytes_are_readable():
    space = synthetic.TokenSpace.for_vocab(257)
    tokens, positions, answers = synthetic.needle(1, 40, space, seed=3)
    text = bytes(tokens[0].tolist()).decode()
    key = text[text.index("\n") + 1 : text.index("=")]
    assert len(key) == 2 and key.isupper() and text.count(f"\n{key}={chr(int(answers[0, 0]))}") == 2
    with pytest.raises(ValueError, match="at least 64"):
        synthetic.TokenSpace.for_vocab(32)
    with pytest.raises(ValueError, match="distance must be"):
        synthetic.needle(1, 3, space)


class Oracle:
    """A model that reads the answer off its (teacher-forced) input: accuracy must be exactly 1."""

    config, vocab_size, piece_multiple, attention_span = None, 257, 1, 8

    def logits(self, tokens, states=None):
        out = torch.zeros(*tokens.shape, 257)
        out[:, :-1].scatter_(-1, tokens[:, 1:].unsqueeze(-1), 1.0)
        return out, states


def test_task_accuracy_oracle_and_random_model():
    for task in ("needle", "mqar"):
        result = task_accuracy(Oracle(), task, 40, samples=6, batch_size=4, piece_len=4096)
        assert result["accuracy"] == 1.0 and result["value_rate"] == 1.0
        assert result["answers"] == (6 if task == "needle" else 48)
    model = tiny_model("mac,mag", seed=1)  # untrained: chance level among 257 tokens
    for task in ("needle", "mqar"):
        result = task_accuracy(model, task, 64, samples=16, batch_size=8)
        assert result["accuracy"] <= 0.25 and result["chance"] == pytest.approx(0.1)


class FirstValue(Oracle):
    """Answers every question with the first pair's value: values recalled, not bound to their keys."""

    def logits(self, tokens, states=None):
        out = torch.zeros(*tokens.shape, 257)
        out[..., :] = F.one_hot(tokens[:, synthetic.KEY_LEN + 2], 257).float().unsqueeze(1)
        return out, states


def test_mqar_accuracy_by_question_and_confusions():
    """A model that recalls a sample's values but not which key each belongs to: its wrong answers are all
    another pair's value, and every question order is right about half the time."""
    result = task_accuracy(FirstValue(), "mqar", 40, samples=64, batch_size=16, piece_len=4096, n_pairs=2)
    assert len(result["by_question"]) == 2 and result["wrong_other_pair"] == 1.0
    assert all(0.3 < a < 0.7 for a in result["by_question"])
    assert sum(result["by_question"]) / 2 == pytest.approx(result["accuracy"])
    oracle = task_accuracy(Oracle(), "mqar", 40, samples=6, batch_size=4, piece_len=4096)
    assert oracle["by_question"] == [1.0] * 8 and oracle["wrong_other_pair"] == 0.0


# --------------------------------------------------------------------------------------------- CLI


def test_evaluate_cli_writes_json_markdown_and_tensorboard(run, tmp_path, capsys):
    out = tmp_path / "results.json"
    code = evaluate_main(["--checkpoint", str(run["dir"]), "--tasks", "ppl,needle,mqar", "--distances", "2,4",
                          "--samples", "4", "--pairs", "3", "--val-batches", "2", "--data", str(run["data"]),
                          "--out", str(out), "--tensorboard", str(tmp_path / "tb"), "--ppl-seq-len", "64"])
    assert code == 0
    results = json.loads(out.read_text())
    assert results["step"] == 6 and results["attention_span"] == 16
    assert results["ppl"]["loss"] == pytest.approx(run["result"].val_losses[6], rel=1e-5)
    assert results["ppl_long"]["seq_len"] == 64 and math.isfinite(results["ppl_long"]["loss"])
    assert results["ppl_long"]["tokens"] == 2 * 2 * 64  # 2 batches of the run's batch size
    assert set(results["needle"]) == set(results["mqar"]) == {"2", "4"}
    assert results["needle"]["4"]["distance"] == 64 and results["mqar"]["2"]["answers"] == 12
    assert all(0 <= r["accuracy"] <= 1 for t in ("needle", "mqar") for r in results[t].values())
    table = out.with_suffix(".md").read_text()
    assert "| needle | 4 | 64 |" in table and "perplexity" in table
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())
    assert "| mqar | 2 | 32 |" in capsys.readouterr().out


def test_every_checkpoint_of_a_run_is_evaluated_once_as_curves(run, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train(build_config(run["cfg"].to_dict(), [f"train.out_dir={out}", "train.steps=4", "train.keep_every=2",
                                              "train.checkpoint_every=2", "train.eval_every=0"]))
    command = ["--checkpoint", str(out), "--every-checkpoint", "--tasks", "ppl", "--val-batches", "2"]
    assert evaluate_main(command) == 0
    assert sorted(p.name for p in (out / "eval").glob("*.json")) == ["step_00000002.json",
                                                                     "step_00000004.json"]
    events = EventAccumulator(str(out / "tensorboard" / "eval"))
    events.Reload()
    assert [e.step for e in events.Scalars("eval/val_loss")] == [2, 4]
    capsys.readouterr()
    assert evaluate_main(command) == 0  # again: nothing new to evaluate
    assert capsys.readouterr().err.count("already evaluated") == 2
    with pytest.raises(SystemExit):
        evaluate_main([*command, "--out", str(tmp_path / "one.json")])


def test_perplexity_on_data_of_another_tokenizer_is_refused(run, tmp_path, capsys):
    from test_data_helpers import copy_with_tokenizer

    other = copy_with_tokenizer(run["data"], tmp_path / "other", "sentencepiece", "sp.model")
    assert evaluate_main(["--checkpoint", str(run["dir"]), "--tasks", "ppl", "--data", str(other),
                          "--tensorboard", "none", "--out", str(tmp_path / "r.json")]) == 2
    assert "was tokenised with sentencepiece sp.model (vocabulary 257), the run's data.train" in \
        capsys.readouterr().err


def test_evaluate_cli_errors(tmp_path, capsys):
    assert evaluate_main(["--checkpoint", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate_main(["--checkpoint", str(tmp_path), "--tasks", "ppl,bleu"])
    assert "unknown task(s) bleu" in capsys.readouterr().err
    cases = [(["--tasks", ""], "unknown task(s) (none given)"),
             (["--samples", "0"], "--samples must be >= 1, got 0"),
             (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
             (["--distances", "2,-1"], "--distances are multiples of the attention span, >= 0"),
             (["--device", "nonsense"], "--device nonsense: ")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "--device cuda: no CUDA device is available to this torch"))
    for args, message in cases:
        with pytest.raises(SystemExit):
            evaluate_main(["--checkpoint", str(tmp_path), *args])
        assert message in capsys.readouterr().err, args


# ------------------------------------------------------------------------------------------ surprise map


def test_per_token_surprise_matches_autograd_and_the_scan():
    from pretrain.surprise_map import call_diagnostics
    from titans.memory import NeuralMemory, memory_mlp

    torch.manual_seed(0)
    memory = NeuralMemory(dim=16, heads=2, head_dim=8, depth=2, chunk_size=4, max_grad_norm=1.0).double()
    x = torch.randn(1, 10, 16, dtype=torch.float64)
    diag = call_diagnostics(memory, x, None)
    _, state = memory(x)
    for mine, real in zip(diag["weights"], state.weights, strict=True):
        torch.testing.assert_close(mine, real)  # the replayed scan ends where the real call does
    _, k, v, _ = memory.project(x, None)
    for t in range(4):  # chunk 0: gradients at the initial weights, before clipping
        for h in range(2):
            weights = [w[h].detach().clone().requires_grad_() for w in memory.init_weights]
            loss = (memory_mlp(weights, k[0, t, h].view(1, 1, -1)) - v[0, t, h]).square().sum()
            grads = torch.autograd.grad(loss, weights)
            expected = torch.sqrt(sum(g.square().sum() for g in grads))
            torch.testing.assert_close(diag["surprise"][0, t, h], expected)
    assert diag["surprise"].shape == diag["theta"].shape == (1, 10, 2)


def test_surprise_map_cli_writes_png_and_json(run, tmp_path, capsys):
    from pretrain.surprise_map import main as surprise_main

    text = "def f(x):\n    return x + 1  # a needle KQ=7\n" * 3
    out = tmp_path / "map.png"
    assert surprise_main(["--checkpoint", str(run["dir"]), "--string", text, "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    numbers = json.loads(out.with_suffix(".json").read_text())
    T = len(text.encode())
    assert numbers["tokens"] == list(text.encode()) and len(numbers["labels"]) == T
    assert len(numbers["loss"]) == T and numbers["loss"][-1] is None
    assert [layer["kind"] for layer in numbers["layers"]] == ["mac", "mag"]
    for layer in numbers["layers"]:
        assert all(len(layer[k]) == T for k in ("surprise", "theta", "eta", "alpha"))
        assert all(0 < g < 1 for k in ("theta", "eta", "alpha") for g in layer[k])
        assert all(math.isfinite(s) and s >= 0 for s in layer["surprise"])
    assert "block 0 (mac): surprise mean" in capsys.readouterr().out
    from pretrain.convert import main as convert

    assert convert(["--checkpoint", str(run["dir"]), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert surprise_main(["--checkpoint", str(tmp_path / "hf"), "--string", text, "--out",
                          str(tmp_path / "m7")]) == 0
    assert (tmp_path / "m7.png").is_file() and f"wrote {tmp_path / 'm7.png'}" in capsys.readouterr().out
    source = tmp_path / "text.txt"
    source.write_text("x")
    assert surprise_main(["--checkpoint", str(run["dir"]), "--text", str(source)]) == 2


# ------------------------------------------------------------------------------------ variant comparison


def test_compare_variants_matches_parameters_and_prints_a_table(run, tmp_path, capsys):
    from run_helpers import bench_module

    from titans.model import num_parameters

    compare = bench_module("compare_variants")
    tiny = [f"data.train={run['data']}", "data.default_corpus=false", "data.seq_len=32", "data.batch_size=2",
            "model.dim=32", "model.n_heads=2", "model.window=8", "model.segment_len=16",
            "model.memory_chunk=8", "train.eval_batches=1", "train.log_every=1", "data.synthetic_rows=1",
            "data.synthetic_min_distance=0"]
    configs = compare.load_variants(list(compare.VARIANTS), ROOT / "configs" / "compare", tiny, True, None)
    counts = {name: num_parameters(cfg.model) for name, cfg in configs.items()}
    assert max(counts.values()) - min(counts.values()) <= 0.05 * max(counts.values())
    assert len({cfg.model.ffn_hidden for cfg in configs.values()}) > 1  # SWA got a wider FFN than MAC
    out = tmp_path / "results.md"
    code = compare.main(["--variants", "mac,swa", "--steps", "2", "--samples", "2", "--distances", "2",
                         "--tasks", "ppl,needle", "--runs", str(tmp_path / "runs"), "--out", str(out), *tiny])
    assert code == 0
    table = out.read_text()
    assert table.startswith("| variant | params |") and "| mac |" in table and "| swa |" in table
    rows = json.loads(out.with_suffix(".json").read_text())
    assert [r["variant"] for r in rows] == ["mac", "swa"] and all(r["step"] == 2 for r in rows)
    assert "| swa |" in capsys.readouterr().out
    # --fresh starts the runs over where they stand (a new run may not start beside old checkpoints)
    assert compare.main(["--variants", "swa", "--steps", "3", "--samples", "2", "--distances", "2", "--tasks",
                         "ppl", "--runs", str(tmp_path / "runs"), "--out", str(out), "--fresh", *tiny]) == 0
    assert [p.name for p in list_checkpoints(tmp_path / "runs" / "swa")] == ["step_00000003"]


def test_generate_continues_a_prompt_file_as_the_same_prompt(run, tmp_path, capsys):
    from pretrain.generate import main as generate_main

    text = "def f(x):\n    return x + 1\n" * 40  # longer than the window: the memory carries it
    (tmp_path / "prompt.txt").write_text(text)
    common = ["--checkpoint", str(run["dir"]), "--max-new-tokens", "8", "--ids"]
    assert generate_main([*common, "--prompt", text]) == 0
    inline = json.loads(capsys.readouterr().out)
    assert generate_main([*common, "--prompt-file", str(tmp_path / "prompt.txt")]) == 0
    assert json.loads(capsys.readouterr().out) == inline and len(inline["prompt"]) == len(text)
    assert generate_main(["--checkpoint", str(run["dir"]), "--prompt-file", str(tmp_path / "none")]) == 2
    assert "--prompt-file " in capsys.readouterr().err


def test_generate_runs_several_prompts_and_samples_as_one_batch(run, capsys):
    """--prompt given twice, --num-samples 2: four rows of one padded batch; greedy, each sample of a prompt
    is what the prompt alone generates."""
    from pretrain.generate import main as generate_main

    common = ["--checkpoint", str(run["dir"]), "--max-new-tokens", "6", "--ids"]
    alone = []
    for prompt in ("def f(x):", "import"):
        assert generate_main([*common, "--prompt", prompt]) == 0
        alone.append(json.loads(capsys.readouterr().out)["generated"])
    assert generate_main([*common, "--prompt", "def f(x):", "--prompt", "import", "--num-samples", "2"]) == 0
    rows = [json.loads(line)["generated"] for line in capsys.readouterr().out.splitlines()]
    assert rows == [alone[0], alone[0], alone[1], alone[1]]
    assert generate_main(["--checkpoint", str(run["dir"]), "--prompt", "a", "--prompt", "bc",
                          "--max-new-tokens", "3"]) == 0
    assert "=== sample 1 of prompt 2 ===" in capsys.readouterr().out
