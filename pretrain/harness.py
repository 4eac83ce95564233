"""lm-evaluation-harness tasks on a run folder, checkpoint or export, without converting it first:

    python -m pretrain.harness --checkpoint runs/tiny --tasks hellaswag,arc_easy
    python -m pretrain.harness --checkpoint runs/tiny --tasks my_task --include-path tasks/ --limit 100

Every request is one sequence fed through the exact streaming cache (titans/streaming.py) in pieces of
`--piece-len` tokens, so a document of any length is scored as one call would score it, with bounded
memory: a rolling perplexity over a long document carries the memory and the attention window across
pieces, where `lm_eval --model hf` restarts both at every `max_length` window. Requests are scored
`--batch-size` at a time, longest first, right-padded to the batch's longest: the model is causal, so
what follows a sequence's end changes none of its scores. Only one piece's logits exist at a time.
Generation requests run `--batch-size` at a time too, left-padded, each row as if alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

try:
    from lm_eval.api.model import TemplateLM
except ImportError as err:  # an optional extra: say how to get it rather than a traceback
    raise SystemExit("pretrain.harness needs lm-evaluation-harness: pip install -e '.[eval]'") from err

from pretrain.checkpoint import run_folder
from pretrain.generate import left_padded
from pretrain.loss_by_position import token_scores
from pretrain.model_io import device_problem, end_of_document_id, load_model, run_tokenizer
from titans.streaming import generate


class TitansHarnessLM(TemplateLM):
    """The harness's model interface over a loaded Titans model and its run's tokenizer."""

    def __init__(self, checkpoint: str, device: str = "cpu", piece_len: int = 4096,
                 tokenizer: str | None = None, batch_size: int = 8) -> None:
        super().__init__()
        self.loaded = load_model(checkpoint, device)
        self.text_tokenizer = run_tokenizer(self.loaded.run_config, self.loaded.vocab_size, tokenizer)
        if self.text_tokenizer is None:  # a byte vocabulary
            from data_pipeline.tokenizer import ByteTokenizer

            self.text_tokenizer = ByteTokenizer()
        eos = end_of_document_id(self.text_tokenizer, self.loaded.vocab_size)
        if eos is None:
            raise ValueError(f"{checkpoint}: the tokenizer has no end-of-document id to condition on")
        self.eos, self.piece_len, self.batch_size = eos, piece_len, batch_size

    @property
    def eot_token_id(self) -> int:
        return self.eos

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.text_tokenizer.encode(string)

    @torch.no_grad()
    def _scored(self, sequences: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """(Σ log p(token), whether every token is the argmax) over tokens[first:] of each (tokens, first),
        each token given all the tokens before it: the sequences as one right-padded batch, streamed."""
        width = max(len(tokens) for tokens, _ in sequences) - 1
        inputs = torch.full((len(sequences), width), self.eos, dtype=torch.long)
        targets = torch.full((len(sequences), width), -100, dtype=torch.long)  # -100: not scored
        for row, (tokens, first) in enumerate(sequences):
            inputs[row, :len(tokens) - 1] = torch.tensor(tokens[:-1])
            targets[row, first - 1:len(tokens) - 1] = torch.tensor(tokens[first:])
        losses, hits = token_scores(self.loaded.model, inputs, targets, self.piece_len, greedy=True)
        log_prob = -losses.double().sum(1)  # (unscored positions: loss 0)
        greedy = (hits | (targets < 0)).all(1)
        return list(zip(log_prob.tolist(), greedy.tolist(), strict=True))

    def _scored_in_batches(self, sequences: list[tuple[list[int], int]], disable_tqdm: bool
                           ) -> list[tuple[float, bool]]:
        """_scored over `batch_size` sequences at a time, longest first (a batch too large for memory fails
        at once); the results in the order given."""
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i][0]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(sequences)
        with tqdm(total=len(sequences), disable=disable_tqdm, desc="scoring") as bar:
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                for index, result in zip(batch, self._scored([sequences[i] for i in batch]), strict=True):
                    results[index] = result
                bar.update(len(batch))
        return results

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        results = self._scored_in_batches([(context + continuation, len(context))
                                           for _, context, continuation in requests], disable_tqdm)
        for (key, _, _), result in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """The whole text after the end-of-document token, as one streamed sequence."""
        texts = [r.args[0] for r in requests]
        sequences = [([self.eos, *self.tok_encode(text)], 1) for text in texts]
        results = [log_prob for log_prob, _ in self._scored_in_batches(sequences, disable_tqdm)]
        for text, result in zip(texts, results, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), result)
        return results

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation (or sampled at the request's temperature), cut at the first `until`.
        Requests with the same settings run `batch_size` at a time, left-padded: each row continues its own
        prompt as if alone (titans.streaming.ragged_step), longest first."""
        outputs: list[str] = [""] * len(requests)
        settings: dict[tuple, list[int]] = {}
        for i, (_, options) in enumerate(r.args for r in requests):
            key = (int(options.get("max_gen_toks", 256)), float(options.get("temperature", 0.0)))
            settings.setdefault(key, []).append(i)
        prompts = [self.tok_encode(r.args[0]) or [self.eos] for r in requests]
        with tqdm(total=len(requests), disable=disable_tqdm, desc="generating") as bar:
            for (max_new, temperature), indices in settings.items():
                indices.sort(key=lambda i: -len(prompts[i]))
                for start in range(0, len(indices), self.batch_size):
                    batch = indices[start : start + self.batch_size]
                    continued = self._continued([prompts[i] for i in batch], max_new, temperature)
                    for i, new in zip(batch, continued, strict=True):
                        outputs[i] = self._cut(new, requests[i].args)
                    bar.update(len(batch))
        return outputs

    def _continued(self, prompts: list[list[int]], max_new: int, temperature: float) -> list[list[int]]:
        """The new tokens after each prompt, generated as one left-padded batch."""
        tokens, keep = left_padded(prompts, self.eos, self.loaded.device)
        out = generate(self.loaded.model, tokens, max_new, temperature, eos_id=self.eos,
                       piece_len=self.piece_len, keep=keep)
        return out[:, tokens.shape[1]:].tolist()

    def _cut(self, new: list[int], args: tuple[str, dict]) -> str:
        """The text of the new tokens up to the end of document and the first of the request's `until`,
        recorded in the harness's cache as the request's answer."""
        context, options = args
        until = options.get("until") or []
        text = self.text_tokenizer.decode(new[: new.index(self.eos)] if self.eos in new else new)
        for stop in [until] if isinstance(until, str) else until:
            text = text.split(stop)[0]
        self.cache_hook.add_partial("generate_until", (context, options), text)
        return text


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pretrain.harness", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True,
                   help="run folder (its newest good checkpoint), checkpoint (…/step_N) or export")
    p.add_argument("--tasks", required=True, help="harness task names, comma-separated")
    p.add_argument("--include-path", help="a folder of more task YAMLs (e.g. local data: dataset_path: json)")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    p.add_argument("--limit", type=float, default=None, help="at most this many documents per task")
    p.add_argument("--piece-len", type=int, default=4096, help="tokens per streamed piece")
    p.add_argument("--batch-size", type=int, default=8,
                   help="requests scored or generated together (memory: batch × piece-len × vocabulary "
                        "logits; generation batches rows of equal prompt length, each row as if alone)")
    p.add_argument("--tokenizer", default=None, help="the tokenizer (default: the run's dataset's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--every-checkpoint", action="store_true",
                   help="--checkpoint is a run folder: each of its checkpoints in step order "
                        "(train.keep_every keeps them), curves in TensorBoard; skips those done before")
    p.add_argument("--tensorboard", default=None,
                   help="TensorBoard log dir for harness/<task>/<metric> at the checkpoint's step (default "
                        "<run>/tensorboard/eval; none for an export); 'none' to skip")
    p.add_argument("--out", default=None,
                   help="results JSON (default <run>/eval/harness_step_N.json; ./harness-<name>.json for an "
                        "export)")
    return p


def main(argv: list[str] | None = None) -> int:
    from lm_eval.tasks import TaskManager

    from pretrain.evaluate import every_checkpoint

    args = parser().parse_args(argv)
    problem = device_problem(args.device)
    if problem:
        parser().error(problem)
    for name in ("batch_size", "piece_len"):
        if getattr(args, name) < 1:
            parser().error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.every_checkpoint and args.out:
        parser().error("--every-checkpoint writes a result per checkpoint (<run>/eval/harness_step_N.json): "
                       "drop --out")
    tasks = [t for t in args.tasks.split(",") if t]
    manager = TaskManager(include_path=args.include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        print(f"error: unknown task(s) {', '.join(unknown)} (lm_eval --tasks list names them; local ones "
              "need --include-path)", file=sys.stderr)
        return 2
    if not args.every_checkpoint:
        return run_tasks(args.checkpoint, args, tasks, manager)
    return every_checkpoint(args.checkpoint, lambda path: result_file(path, args),
                            lambda path: run_tasks(str(path), args, tasks, manager))


def result_file(checkpoint: Path, args: argparse.Namespace) -> Path:
    """--out, or <run>/eval/harness_step_N.json for a checkpoint of a run, ./harness-<name>.json for an
    export (a folder to share, not a run's log)."""
    if args.out:
        return Path(args.out)
    run = run_folder(checkpoint)
    if run is None:
        return Path(f"harness-{checkpoint.name}.json")
    return run / "eval" / f"harness_{checkpoint.name}.json"


def run_tasks(checkpoint: str, args: argparse.Namespace, tasks: list[str], manager: Any) -> int:
    """main() for one checkpoint: the tasks, their table, the JSON, and TensorBoard at the step (a run's)."""
    from lm_eval import simple_evaluate
    from lm_eval.utils import make_table

    try:
        lm = TitansHarnessLM(checkpoint, args.device, args.piece_len, args.tokenizer, args.batch_size)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    results = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, num_fewshot=args.num_fewshot,
                              limit=args.limit)
    path, step = lm.loaded.path, lm.loaded.step or 0
    out = result_file(path, args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"checkpoint": str(path), "step": step, "tasks": tasks,
                               "results": results["results"]}, indent=2, default=str) + "\n")
    run = run_folder(path)
    board = args.tensorboard or (str(run / "tensorboard" / "eval") if run else "none")
    if board.lower() != "none":
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(board)
        for task, metrics in results["results"].items():
            for key, value in metrics.items():  # "acc,none": the metric under the task's default filter
                if isinstance(value, (int, float)) and "stderr" not in key:
                    writer.add_scalar(f"harness/{task}/{key.split(',')[0]}", value, step)
        writer.close()
    print(make_table(results))
    print(f"results: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
