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
def number(x):  # a response is nested: [(loglikelihood, is_greedy)] per choice, [loglikelihood] rolling
    while isinstance(x, (list, tuple)):
        x = x[0]
    return float(x)
res = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={spec['model']},trust_remote_code=True",
                              tasks=spec["tasks"], task_manager=TaskManager(include_path=spec["include"]),
                              device="cpu", batch_size=2, log_samples=True)
out = {task: [[number(r) for r in s["resps"]]
              for s in sorted(res["samples"][task], key=lambda s: s["doc_id"])] for task in spec["tasks"]}
print("RESULTS " + json.dumps(out))
"""


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


@pytest.mark.timeout(DEADLINE_S + 60)
def test_the_harness_scores_an_export_as_our_model_does(tmp_path):
    torch.manual_seed(0)
    cfg = TitansConfig(vocab_size=257, dim=32, n_layers=2, n_heads=2, layers="mac,mag", window=8,
                       segment_len=16, memory_chunk=8, n_persistent=2)
    model = TitansLM(cfg).eval()
    export_hf(model.state_dict(), cfg, tmp_path / "hf", None, EOS)
    write_tasks(tmp_path / "tasks")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               OMP_NUM_THREADS="1")
    spec = {"model": str(tmp_path / "hf"), "include": str(tmp_path / "tasks"), "tasks": list(TASKS)}
    done = subprocess.run([sys.executable, "-c", HARNESS, json.dumps(spec)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=DEADLINE_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    theirs = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULTS "))[8:])
    for doc, scores in zip(DOCS, theirs["titans_choice"], strict=True):
        # the harness joins context and choice with " " and scores a context's trailing whitespace as part
        # of the continuation
        context = doc["context"].rstrip()
        ours = [log_likelihood(model, list(context.encode()), list((doc["context"][len(context):] + " " + c)
                                                                    .encode())) for c in doc["choices"]]
        assert scores == pytest.approx(ours, rel=1e-5, abs=1e-4)
    for doc, (score,) in zip(DOCS, theirs["titans_rolling"], strict=True):  # the whole text after EOS
        assert score == pytest.approx(log_likelihood(model, [EOS], list(doc["context"].encode())), rel=1e-5)
