"""Downstream evaluation with lm-evaluation-harness (`lm_eval --model hf`) on a Hugging Face export: every
log-likelihood the harness computes, for a multiple-choice task and a rolling (perplexity) task, equals the
one our own model gives for the same tokens. The harness runs in a clean subprocess (no PYTHONPATH, the
hub offline, tasks from local files), as a user would run it on an export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain.hf_export import export_hf
from titans.model import TitansConfig, TitansLM

pytest.importorskip("lm_eval")

DEADLINE_S = 300
EOS = 256
DOCS = [{"context": "def add(a, b):\n    return", "choices": [" a + b", " None", "pass"], "answer": 0},
        {"context": "for i in range(10):\n    ", "choices": ["print(i)", "import os", " x"], "answer": 0},
        {"context": "class Point:\n    def", "choices": [" __init__(self):", " 7", ")"], "answer": 0}]
TASKS = {
    "titans_choice": "output_type: multiple_choice\ndoc_to_text: '{{context}}'\n"
                     "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
                     "metric_list:\n  - metric: acc\n",
    "titans_rolling": "output_type: loglikelihood_rolling\ndoc_to_text: '{{context}}'\n"
                      "doc_to_target: '{{context}}'\nmetric_list:\n  - metric: bits_per_byte\n",
}
HARNESS = """
import json, sys
import lm_eval
from lm_eval.tasks import TaskManager
spec = json.loads(sys.argv[1])
res = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={spec['model']},trust_remote_code=True",
                              tasks=spec["tasks"], task_manager=TaskManager(include_path=spec["include"]),
                              device="cpu", batch_size=2, log_samples=True)
print("RESULTS " + json.dumps(res["samples"], default=str))
"""


def responses(samples: dict) -> dict[str, list[list[float]]]:
    """Each task's log-likelihoods by document, one per choice: the number inside the harness's nested
    responses ([(loglikelihood, is_greedy)] per choice; [loglikelihood] for a rolling one)."""
    def number(x):
        while isinstance(x, (list, tuple)):
            x = x[0]
        return float(x)

    return {task: [[number(r) for r in s["resps"]] for s in sorted(samples[task], key=lambda s: s["doc_id"])]
            for task in TASKS}


def write_tasks(folder: Path) -> None:
    folder.mkdir()
    (folder / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    for name, body in TASKS.items():
        (folder / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {folder / 'docs.jsonl'}\ntest_split: test\n{body}")


def log_likelihood(model: TitansLM, context: list[int], continuation: list[int]) -> float:
    """Σ log p(continuation | context), our model, float64 softmax."""
    tokens = context + continuation
    with torch.no_grad():
        logits = model(torch.tensor([tokens[:-1]]))[0][0].double()
    picked = torch.log_softmax(logits, -1)[len(context) - 1:].gather(1, torch.tensor(continuation)[:, None])
    return picked.sum().item()


def check_against_our_model(model: TitansLM, scored: dict[str, list[list[float]]]) -> None:
    for doc, scores in zip(DOCS, scored["titans_choice"], strict=True):
        # the harness joins context and choice with " " and scores a context's trailing whitespace as part
        # of the continuation
        context = doc["context"].rstrip()
        ours = [log_likelihood(model, list(context.encode()), list((doc["context"][len(context):] + " " + c)
                                                                    .encode())) for c in doc["choices"]]
        assert scores == pytest.approx(ours, rel=1e-5, abs=1e-4)
    for doc, (score,) in zip(DOCS, scored["titans_rolling"], strict=True):  # the whole text after EOS
        assert score == pytest.approx(log_likelihood(model, [EOS], list(doc["context"].encode())), rel=1e-5)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[TitansLM, Path]:
    """A MAC + MAG model (random weights: every log-likelihood is checked, not accuracy), its Hugging Face
    export and the two tasks."""
    tmp = tmp_path_factory.mktemp("harness")
    torch.manual_seed(0)
    cfg = TitansConfig(vocab_size=257, dim=32, n_layers=2, n_heads=2, layers="mac,mag", window=8,
                       segment_len=16, memory_chunk=8, n_persistent=2)
    model = TitansLM(cfg).eval()
    export_hf(model.state_dict(), cfg, tmp / "hf", None, EOS)
    write_tasks(tmp / "tasks")
    return model, tmp


@pytest.mark.timeout(DEADLINE_S + 60)
def test_the_harness_scores_an_export_as_our_model_does(exported):
    model, tmp = exported
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp / "hf_home"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    spec = {"model": str(tmp / "hf"), "include": str(tmp / "tasks"), "tasks": list(TASKS)}
    done = subprocess.run([sys.executable, "-c", HARNESS, json.dumps(spec)], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=DEADLINE_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULTS "))
    check_against_our_model(model, responses(json.loads(line[len("RESULTS "):])))


def test_our_harness_model_streams_each_request_as_one_sequence(exported, monkeypatch):
    """pretrain.harness in pieces of 16 tokens (every document spans two or three), one request at a time
    and in batches, gives the same log-likelihoods and, in left-padded batches, our greedy continuations;
    its command line writes the results."""
    import lm_eval
    from lm_eval.api.instance import Instance
    from lm_eval.tasks import TaskManager

    from pretrain.harness import TitansHarnessLM, main
    from titans.streaming import generate

    model, tmp = exported
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    for batch_size in (1, 4):  # one at a time, and right-padded batches of several lengths
        lm = TitansHarnessLM(str(tmp / "hf"), piece_len=16, tokenizer="bytes", batch_size=batch_size)
        results = lm_eval.simple_evaluate(model=lm, tasks=list(TASKS), log_samples=True,
                                          task_manager=TaskManager(include_path=str(tmp / "tasks")))
        check_against_our_model(model, responses(results["samples"]))
    # generation: prompts of different lengths and two settings, left-padded batches of up to 4, each row
    # as its greedy continuation alone
    asked = [("def f(", 12), ("import os\nimport sys\n", 12), ("x = (", 5), ("class A(", 12), ("print(", 12),
             ("return (", 5)]
    requests = [Instance("generate_until", {}, (text, {"until": [")"], "max_gen_toks": n}), i)
                for i, (text, n) in enumerate(asked)]
    want = []
    for text, n in asked:
        prompt = list(text.encode())
        greedy = generate(model, torch.tensor([prompt]), n, eos_id=EOS)[0, len(prompt):].tolist()
        want.append(lm.text_tokenizer.decode(greedy[: greedy.index(EOS)] if EOS in greedy else greedy)
                    .split(")")[0])
    assert lm.generate_until(requests) == want
    out = tmp / "harness.json"
    assert main(["--checkpoint", str(tmp / "hf"), "--tokenizer", "bytes", "--tasks", "titans_choice",
                 "--include-path", str(tmp / "tasks"), "--out", str(out)]) == 0
    assert "acc,none" in json.loads(out.read_text())["results"]["titans_choice"]
    assert main(["--checkpoint", str(tmp / "hf"), "--tokenizer", "bytes", "--tasks", "nonesuch"]) == 2
    with pytest.raises(SystemExit, match="2"):
        main(["--checkpoint", str(tmp / "hf"), "--tasks", "titans_choice", "--batch-size", "0"])


def test_our_harness_over_every_checkpoint_of_a_run_draws_curves(exported, dataset, tmp_path, capsys):
    from run_helpers import small_config
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pretrain.harness import main
    from pretrain.train import train

    _, tmp = exported
    run = tmp_path / "run"
    train(small_config(dataset, run, "train.steps=4", "train.checkpoint_every=2", "train.keep_every=2",
                       "train.eval_every=0"))
    command = ["--checkpoint", str(run), "--every-checkpoint", "--tasks", "titans_choice",
               "--include-path", str(tmp / "tasks")]
    assert main(command) == 0
    assert sorted(p.name for p in (run / "eval").iterdir()) == ["harness_step_00000002.json",
                                                               "harness_step_00000004.json"]
    events = EventAccumulator(str(run / "tensorboard" / "eval"))
    events.Reload()
    assert [e.step for e in events.Scalars("harness/titans_choice/acc")] == [2, 4]
    capsys.readouterr()
    assert main(command) == 0 and capsys.readouterr().err.count("already evaluated") == 2


def test_the_harness_generates_padded_batches_of_an_export_as_one_at_a_time(exported, monkeypatch):
    """lm_eval's `hf` model generates a batch of prompts of different lengths left-padded, with an attention
    mask: the export runs each row as if alone, so batch 4 gives batch 1's texts."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    _, tmp = exported
    monkeypatch.setenv("HF_HOME", str(tmp / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    prompts = [doc["context"] for doc in DOCS] + ["x = (", "import"]
    options = {"until": ["\n\n"], "max_gen_toks": 8, "do_sample": False}
    requests = [Instance("generate_until", {}, (text, options), i) for i, text in enumerate(prompts)]
    texts = {size: HFLM(pretrained=str(tmp / "hf"), trust_remote_code=True, batch_size=size, device="cpu")
             .generate_until(requests, disable_tqdm=True) for size in (1, 4)}
    assert texts[4] == texts[1]
