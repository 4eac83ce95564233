"""Evaluate a trained model: validation perplexity and synthetic long-context retrieval beyond the window.

    python -m pretrain.evaluate --checkpoint runs/tiny                      # ppl, needle, mqar
    python -m pretrain.evaluate --checkpoint runs/tiny/checkpoints/step_00000300 \\
        --tasks needle --distances 2,8,32 --samples 64 --out results.json

- ppl: mean next-token loss and perplexity on the held-out split of the run's data (`data.val`, or the
  `val` split of `data.train`; `--data` points elsewhere), each sequence fed in one call as in training;
  with `--ppl-seq-len` also of longer sequences fed in pieces carrying the memory (`ppl_long`).
- needle: one key–value pair planted early, filler, then the key asked for `distance` tokens after the
  value; accuracy of the argmax next-token prediction of the value (`pretrain.synthetic`).
- mqar: multi-query associative recall: the run's validation pairs (`train.eval_task_pairs`, else
  `data.synthetic_pairs`; 8 for an export without its run config), `distance` tokens of filler, all keys
  asked for.
- loss_by_position (not in the default set): validation loss bucketed by the token's position inside its
  document, to 4× the training length, each document fed in pieces through the exact streaming cache
  (`pretrain/loss_by_position.py`), and over each bucket's far repeats (tokens only the context beyond
  the span predicts); also writes a PNG next to the JSON.
- text_recall (not in the default set): the loss on a validation passage read again `distance` tokens
  later, against the same passage after another one (`pretrain/text_recall.py`): a model that carries
  nothing beyond its window gains exactly nothing.
Distances are multiples of the model's attention span (the window for SWA / MAG / MAL, the segment for
MAC). Long needle / mqar inputs are fed in pieces of the training length that carry the memory state;
attention keeps no KV cache across calls, so beyond its span only the long-term memory can answer.

Writes JSON and a Markdown table (same name, .md) and TensorBoard scalars (`eval/...` at the checkpoint's
step, by default in `<run>/tensorboard/eval`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pretrain import loss_by_position, synthetic, text_recall
from pretrain.checkpoint import list_checkpoints, run_folder
from pretrain.cpu_allocator import CPU_ALLOCATORS, use_cpu_allocator
from pretrain.model_io import LanguageModel, default_piece_len, device_problem, load_model, stream_logits

TASKS = ("ppl", "needle", "mqar", "loss_by_position", "text_recall")
DEFAULT_TASKS = ("ppl", "needle", "mqar")


# ------------------------------------------------------------------------------------- perplexity


def val_batches(run_config: dict[str, Any], data: str | None = None, batch_size: int | None = None,
                max_batches: int | None = None, seq_len: int | None = None) -> Iterator[torch.Tensor]:
    """(B, seq_len + 1) batches of the run's validation split, in order, one pass (seq_len: the run's
    `data.seq_len` unless given)."""
    from data_pipeline.loader import Source, TokenLoader, TokenStream
    from data_pipeline.shards import MANIFEST, Manifest
    from data_pipeline.tokenizer import tokenizer_mismatch

    d = run_config.get("data", {})
    path = data or d.get("val") or d.get("train")
    if not path:
        raise ValueError("the checkpoint's config names no dataset: pass --data")
    if not Path(path).exists() and "://" not in str(path) and not str(path).startswith("pipe:"):
        raise FileNotFoundError(f"dataset {path} (from the run's config) does not exist here: pass --data")
    trained_on = d.get("train")
    if data and (Path(data) / MANIFEST).is_file() and trained_on and (Path(trained_on) / MANIFEST).is_file():
        mismatch = tokenizer_mismatch(Manifest.read(data).tokenizer, Manifest.read(trained_on).tokenizer)
        if mismatch:  # a perplexity over other tokens than the model's would be a number about nothing
            raise ValueError(f"--data {data} was tokenised with {mismatch[0]}, the run's data.train "
                             f"{trained_on} with {mismatch[1]}: prepare it with the run's tokenizer")
    stream = TokenStream([Source(str(path), split="val")], seq_len or d.get("seq_len", 256), batch_size or
                         d.get("batch_size", 8), epochs=1, shuffle=False,
                         max_corrupt_shards=d.get("max_corrupt_shards", 0))
    for i, batch in enumerate(TokenLoader(stream)):
        if max_batches is not None and i == max_batches:
            break
        yield batch


@torch.no_grad()
def perplexity(model: LanguageModel, batches: Iterable[torch.Tensor], piece_len: int | None = None
               ) -> dict[str, float]:
    """Token-weighted mean next-token loss over the batches, and its exponential.

    piece_len None: every sequence in one call (as the training job's validation does); otherwise fed in
    pieces carrying the memory state.
    """
    total, count = 0.0, 0
    for batch in batches:
        inputs, targets = batch[:, :-1], batch[:, 1:]
        if piece_len is None:
            logits, _ = model.logits(inputs)
        else:
            logits, _ = stream_logits(model, inputs, piece_len)
        loss = F.cross_entropy(logits.float().flatten(0, 1).cpu(), targets.flatten(), reduction="sum")
        total += loss.item()
        count += targets.numel()
    if count == 0:
        raise ValueError("no validation tokens: the val split is empty or shorter than one sequence")
    loss = total / count
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": count}


# ---------------------------------------------------------------------------------- synthetic tasks


def make_task(task: str, batch: int, distance: int, space: synthetic.TokenSpace, seed: int,
              n_pairs: int = 8) -> synthetic.TaskBatch:
    if task == "needle":
        return synthetic.needle(batch, distance, space, seed=seed)
    if task == "mqar":
        return synthetic.mqar(batch, distance, space, n_pairs=n_pairs, seed=seed)
    raise ValueError(f"unknown synthetic task {task!r}; expected needle or mqar")


@torch.no_grad()
def task_accuracy(model: LanguageModel, task: str, distance: int, samples: int = 32, batch_size: int = 8,
                  seed: int = 0, piece_len: int | None = None, n_pairs: int = 8,
                  space: synthetic.TokenSpace | None = None) -> dict[str, float]:
    """Accuracy of one synthetic task at one distance (tokens), over `samples` sequences."""
    space = space or synthetic.TokenSpace.for_vocab(model.vocab_size)
    values = torch.tensor(space.values)
    by_question, is_value, other_pair, n = 0, 0, 0, 0
    length = 0
    for i, start in enumerate(range(0, samples, batch_size)):
        size = min(batch_size, samples - start)
        batch = make_task(task, size, distance, space, seed * 100_003 + i, n_pairs)
        logits, _ = stream_logits(model, batch.tokens, piece_len, positions=batch.positions)
        predicted = logits.argmax(-1)
        hit = predicted == batch.answers  # (B, questions in the order asked)
        by_question = by_question + hit.sum(0)
        is_value += int(torch.isin(predicted, values).sum())
        # a wrong answer that is another pair's value of the same sample: the values were recalled, not
        # which key each belongs to (then only the last question, by elimination, comes out right)
        in_sample = (predicted.unsqueeze(-1) == batch.answers.unsqueeze(-2)).any(-1)
        other_pair += int((in_sample & ~hit).sum())
        n += batch.answers.numel()
        length = batch.tokens.shape[1]
    correct = int(by_question.sum())
    return {"accuracy": correct / n, "value_rate": is_value / n, "answers": n, "length": length,
            "chance": synthetic.value_chance(space),
            "by_question": [int(c) * by_question.numel() / n for c in by_question],
            "wrong_other_pair": other_pair / (n - correct) if n > correct else 0.0}


def evaluate(model: LanguageModel, tasks: Iterable[str] = DEFAULT_TASKS,
             distances: Iterable[float] = (2, 8, 32), samples: int = 32, batch_size: int = 8, seed: int = 0,
             piece_len: int | None = None, n_pairs: int = 8, data: str | None = None,
             max_val_batches: int | None = 50, val_batch_size: int | None = None,
             run_config: dict[str, Any] | None = None, log=print, ppl_seq_len: int | None = None,
             max_position: int | None = None, bucket_edges: list[int] | None = None,
             max_documents: int | None = loss_by_position.MAX_DOCUMENTS, min_doc_len: int = 0,
             span: int | None = None, passage: int | None = None) -> dict[str, Any]:
    """Run the asked tasks; returns the results as a JSON-ready dict. Validation batches default to
    the run's `data.batch_size` (then the first batches are those the training job validated on).
    `ppl_seq_len` longer than the training length: perplexity of longer sequences, fed in pieces of
    `piece_len` carrying the memory state (`ppl_long` in the results; `ppl` stays the plain one).
    loss_by_position: positions to `max_position` (or the last of `bucket_edges`) in up to
    `max_documents` validation documents of at least `min_doc_len` tokens. `span`: the unit of the
    needle / mqar distances (default the model's attention span; a comparison passes one shared window,
    since full attention's span is its training length). text_recall: passages of `passage` tokens
    (default the span), the same ones read again at each of the distances."""
    run_config = run_config if run_config is not None else getattr(model, "run_config", {})
    seq_len = run_config.get("data", {}).get("seq_len")
    piece_len = piece_len or default_piece_len(model, seq_len)
    span = span or model.attention_span
    results: dict[str, Any] = {"attention_span": span, "piece_len": piece_len}
    for task in tasks:
        started = time.perf_counter()
        if task == "ppl":
            batches = val_batches(run_config, data, val_batch_size, max_val_batches)
            results["ppl"] = perplexity(model, batches)
            log(f"ppl: loss {results['ppl']['loss']:.4f}, perplexity {results['ppl']['ppl']:.3f} "
                f"({results['ppl']['tokens']:,} tokens, {time.perf_counter() - started:.1f}s)")
            if ppl_seq_len:
                started = time.perf_counter()
                batches = val_batches(run_config, data, val_batch_size, max_val_batches, ppl_seq_len)
                results["ppl_long"] = {**perplexity(model, batches, piece_len), "seq_len": ppl_seq_len}
                log(f"ppl of {ppl_seq_len}-token sequences in pieces of {piece_len}: loss "
                    f"{results['ppl_long']['loss']:.4f}, perplexity {results['ppl_long']['ppl']:.3f} "
                    f"({results['ppl_long']['tokens']:,} tokens, {time.perf_counter() - started:.1f}s)")
            continue
        if task == "loss_by_position":
            rows = val_batches(run_config, data, batch_size=1)
            r = loss_by_position.evaluate_rows(model, rows, run_config, piece_len, max_position, bucket_edges,
                                               max_documents, min_doc_len, batch_size, span)
            results[task] = r
            log(f"loss_by_position: {r['documents']} documents, {r['tokens']:,} tokens to position "
                f"{r['max_position']}, mean loss {r['loss']:.4f} ({time.perf_counter() - started:.1f}s)")
            continue
        if task == "text_recall":
            rows = val_batches(run_config, data, batch_size=1)
            lengths = [int(round(multiple * span)) for multiple in distances]
            recalls = text_recall.evaluate_rows(model, rows, run_config, samples, passage or span, lengths,
                                                piece_len, batch_size)
            per_distance = {}
            for multiple, r in zip(distances, recalls, strict=True):
                per_distance[f"{multiple:g}"] = {**r, "multiple": multiple}
                log(f"text_recall at {multiple:g}× span ({r['distance']} tokens, {r['passages']} passages of "
                    f"{r['passage']}): loss {r['control_loss']:.4f} after another passage, "
                    f"{r['repeat_loss']:.4f} read again, gain {r['gain']:.4f} ± {r['gain_stderr']:.4f}")
            log(f"text_recall: {len(distances)} distances ({time.perf_counter() - started:.1f}s)")
            results[task] = per_distance
            continue
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
        per_distance = {}
        for multiple in distances:
            distance = max(int(round(multiple * span)), synthetic.KEY_LEN + 4)
            started = time.perf_counter()
            r = task_accuracy(model, task, distance, samples, batch_size, seed, piece_len, n_pairs)
            r.update(multiple=multiple, distance=distance)
            per_distance[f"{multiple:g}"] = r
            log(f"{task} at {multiple:g}× span ({distance} tokens, sequences of {r['length']}): accuracy "
                f"{r['accuracy']:.3f} over {r['answers']} answers (chance {r['chance']:.3f}, value tokens "
                f"predicted {r['value_rate']:.2f}{question_detail(r)}; {time.perf_counter() - started:.1f}s)")
        results[task] = per_distance
    return results


# ------------------------------------------------------------------------------------------ reports


def fractions(values: Iterable[float]) -> str:
    """0.48/0.98: accuracies by question asked."""
    return "/".join(f"{a:.2f}" for a in values)


def question_detail(r: dict[str, Any]) -> str:
    """Several questions per sample: accuracy by the order asked, and how many wrong answers were another
    pair's value (the values recalled without their keys)."""
    if len(r.get("by_question", ())) < 2:
        return ""
    return (f"; by question asked {fractions(r['by_question'])}, wrong answers that are "
            f"another pair's value {r['wrong_other_pair']:.2f}")


def to_markdown(results: dict[str, Any]) -> str:
    lines = [f"# Evaluation of `{results.get('checkpoint', '?')}` (step {results.get('step', '?')})", ""]
    if "ppl" in results:
        p = results["ppl"]
        lines += ["| validation loss | perplexity | tokens |", "|---:|---:|---:|",
                  f"| {p['loss']:.4f} | {p['ppl']:.3f} | {p['tokens']:,} |", ""]
    if "ppl_long" in results:
        p = results["ppl_long"]
        lines += [f"Sequences of {p['seq_len']} tokens, fed in pieces of {results['piece_len']} carrying the "
                  f"memory: loss {p['loss']:.4f}, perplexity {p['ppl']:.3f} ({p['tokens']:,} tokens).", ""]
    rows = [(task, r) for task in ("needle", "mqar") for r in results.get(task, {}).values()]
    if rows:
        lines += [f"Distances in multiples of the attention span ({results['attention_span']} tokens); "
                  f"inputs fed in pieces of {results['piece_len']} tokens carrying the memory.", "",
                  "| task | distance (× span) | distance (tokens) | accuracy | by question asked | wrong: "
                  "another pair's value | chance | value tokens predicted | answers |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for task, r in rows:
            by_question = fractions(r.get("by_question", ())) or "-"
            other = f"{r['wrong_other_pair']:.2f}" if "wrong_other_pair" in r else "-"
            cells = [task, f"{r['multiple']:g}", r["distance"], f"{r['accuracy']:.3f}", by_question, other,
                     f"{r['chance']:.3f}", f"{r['value_rate']:.2f}", r["answers"]]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    if "loss_by_position" in results:
        lines += ["", *loss_by_position.markdown(results["loss_by_position"])]
    if "text_recall" in results:
        lines += ["", *text_recall.markdown(results["text_recall"])]
    return "\n".join(lines) + "\n"


def scalars(results: dict[str, Any]) -> dict[str, float]:
    out = {}
    if "ppl" in results:
        out["eval/val_loss"] = results["ppl"]["loss"]
        out["eval/val_perplexity"] = results["ppl"]["ppl"]
    if "ppl_long" in results:
        out["eval/val_loss_long"] = results["ppl_long"]["loss"]
    for task in ("needle", "mqar"):
        for key, r in results.get(task, {}).items():
            out[f"eval/{task}/x{key}"] = r["accuracy"]
            if len(r.get("by_question", ())) > 1:  # the first answer cannot come by elimination
                out[f"eval/{task}/x{key}/first"] = r["by_question"][0]
    if "loss_by_position" in results:
        out.update(loss_by_position.scalars(results["loss_by_position"]))
    for key, r in results.get("text_recall", {}).items():
        out[f"eval/text_recall/x{key}/gain"] = r["gain"]
    return out


def write_tensorboard(results: dict[str, Any], log_dir: str | Path, step: int) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(log_dir))
    for name, value in scalars(results).items():
        writer.add_scalar(name, value, step)
    writer.add_text("eval/table", to_markdown(results))
    writer.close()


def parse_list(text: str, kind=str) -> list:
    return [kind(x) for x in text.replace(" ", "").split(",") if x]


def run_mqar_pairs(run_config: dict[str, Any]) -> int:
    """The pairs of the run's own mqar validation curves, so that evaluating a checkpoint reproduces them;
    8 (Zoology's smallest setting) for a model without its run config."""
    train, data = run_config.get("train", {}), run_config.get("data", {})
    return train.get("eval_task_pairs") or data.get("synthetic_pairs") or 8


def add_task_arguments(parser: argparse.ArgumentParser) -> None:
    """--tasks, --distances, --samples: what to evaluate (shared with bench/compare_variants.py)."""
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                        help="comma-separated subset of " + ",".join(TASKS))
    parser.add_argument("--distances", default="2,8,32",
                        help="needle/mqar/text_recall distances, in multiples of the attention span")
    parser.add_argument("--samples", type=int, default=32, help="sequences per task and distance")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.evaluate",
        description="Evaluate a trained Titans checkpoint: validation perplexity (ppl) on the run's "
                    "held-out split, and synthetic long-context retrieval (needle: one key–value pair; mqar: "
                    "multi-query associative recall) at distances given as multiples of the attention span "
                    "(window; MAC: segment). Long inputs are fed in pieces carrying the memory state, "
                    "with no KV cache across pieces: beyond the span only the long-term memory remembers. "
                    "Writes JSON, a Markdown table next to it and TensorBoard scalars.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True,
                        help="run directory (its newest good checkpoint), checkpoint directory (…/step_N) "
                             "or pretrain.convert export (--to safetensors / hf)")
    add_task_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward call")
    parser.add_argument("--pairs", type=int, default=None,
                        help="key-value pairs per mqar sequence (default: the pairs of the run's validation "
                             "curves, train.eval_task_pairs or data.synthetic_pairs; 8 without a run config)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic tasks")
    parser.add_argument("--piece-len", type=int, default=None,
                        help="tokens per call for long inputs (default: the training length, aligned)")
    parser.add_argument("--data", default=None, help="prepared dataset for ppl (default: the run's data.val "
                        "or data.train, split 'val')")
    parser.add_argument("--val-batches", type=int, default=50,
                        help="most validation batches for ppl (0: all)")
    parser.add_argument("--ppl-seq-len", type=int, default=None,
                        help="also the perplexity of longer validation sequences (e.g. 4× the training "
                        "length), fed in pieces carrying the memory")
    parser.add_argument("--val-batch-size", type=int, default=None,
                        help="sequences per validation batch (default: the run's data.batch_size)")
    parser.add_argument("--max-position", type=int, default=None,
                        help="loss_by_position: score positions up to this (default 4× the training length)")
    parser.add_argument("--buckets", default=None,
                        help="loss_by_position: bucket edges such as 0,64,256,2048 (default: doubling "
                        f"from {loss_by_position.FIRST_BUCKET} to --max-position; the last edge is the "
                        "max position)")
    parser.add_argument("--documents", type=int, default=loss_by_position.MAX_DOCUMENTS,
                        help="loss_by_position: most validation documents (0: all)")
    parser.add_argument("--min-doc-len", type=int, default=0,
                        help="loss_by_position: skip shorter documents (= --max-position: every bucket "
                        "from the same documents)")
    parser.add_argument("--span", type=int, default=None,
                        help="the unit of --distances and the far repeats' span (default: the model's "
                        "attention span; full attention's is its training length: pass the window)")
    parser.add_argument("--passage", type=int, default=None,
                        help="text_recall: passage length in tokens (default: the attention span)")
    parser.add_argument("--every-checkpoint", action="store_true",
                        help="--checkpoint is a run folder: evaluate each of its checkpoints in step order "
                             "(those train.keep_every keeps, say), each to <run>/eval/step_N.json and "
                             "TensorBoard at its step (curves over training); ones evaluated before are "
                             "skipped")
    parser.add_argument("--out", default=None, help="results JSON (default <run>/eval/step_N.json, "
                        "./eval-<name>.json for an export); the "
                        "Markdown table goes next to it with suffix .md")
    parser.add_argument("--tensorboard", default=None,
                        help="TensorBoard log dir (default <run>/tensorboard/eval; none for an export); "
                             "'none' to skip")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: default)")
    parser.add_argument("--cpu-allocator", choices=CPU_ALLOCATORS, default="reuse",
                        help="host memory on CPU, as the training job's train.cpu_allocator: reuse (freed "
                        "memory stays in the process for the next batch) or system (malloc as configured)")
    args = parser.parse_args(argv)
    problem = device_problem(args.device)
    if problem:
        parser.error(problem)
    for name in ("samples", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")

    if args.pairs is not None and args.pairs < 1:
        parser.error(f"--pairs must be >= 1, got {args.pairs}")
    if args.threads:
        torch.set_num_threads(args.threads)
    use_cpu_allocator(args.cpu_allocator, torch.device(args.device).type)
    tasks = parse_list(args.tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        given = ", ".join(unknown) or "(none given)"
        parser.error(f"unknown task(s) {given}; choose from {', '.join(TASKS)}")
    try:
        distances = parse_list(args.distances, float)
    except ValueError:
        parser.error(f"--distances: expected numbers like 2,8,32, got {args.distances!r}")
    if any(d < 0 for d in distances):
        parser.error(f"--distances are multiples of the attention span, >= 0: got {args.distances}")
    if args.buckets and args.max_position is not None:
        parser.error("give --buckets (its last edge is the max position) or --max-position, not both")
    if args.span is not None and args.span < 1:
        parser.error(f"--span must be >= 1, got {args.span}")
    if args.max_position is not None and args.max_position < 1:
        parser.error(f"--max-position must be >= 1, got {args.max_position}")
    try:
        edges = loss_by_position.parse_bucket_edges(args.buckets) if args.buckets else None
    except ValueError as err:
        parser.error(f"--buckets: {err}")
    if not args.every_checkpoint:
        return evaluate_checkpoint(args.checkpoint, args, tasks, distances, edges)
    if args.out:
        parser.error("--every-checkpoint writes a result per checkpoint (<run>/eval/step_N.json): drop --out")
    return every_checkpoint(args.checkpoint, lambda path: path.parent.parent / "eval" / f"{path.name}.json",
                            lambda path: evaluate_checkpoint(str(path), args, tasks, distances, edges))


def every_checkpoint(run: str, result_of: Callable[[Path], Path], evaluate_one: Callable[[Path], int]) -> int:
    """--every-checkpoint: `evaluate_one` on each checkpoint of the run folder in step order, but those
    whose result file (`result_of`) an earlier call wrote: a rerun evaluates only the ones written since.
    Stops at the first that fails, returning its status."""
    checkpoints = list_checkpoints(run)
    if not checkpoints:
        print(f"error: --every-checkpoint: {run} is not a run folder with checkpoints", file=sys.stderr)
        return 2
    for number, path in enumerate(checkpoints, 1):
        if result_of(path).is_file():
            print(f"checkpoint {number}/{len(checkpoints)}: {path.name} already evaluated "
                  f"({result_of(path)})", file=sys.stderr)
            continue
        print(f"checkpoint {number}/{len(checkpoints)}: {path.name}", file=sys.stderr, flush=True)
        status = evaluate_one(path)
        if status:
            return status
    return 0


def evaluate_checkpoint(checkpoint: str, args: argparse.Namespace, tasks: list[str], distances: list[float],
                        edges: list[int] | None) -> int:
    """main() for one checkpoint: evaluate, write the JSON, the table and the TensorBoard scalars."""
    try:
        model = load_model(checkpoint, args.device)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    run_dir = run_folder(model.path)  # None: an export, a folder to share rather than a run's log
    step = model.step or 0
    pairs = args.pairs or run_mqar_pairs(model.run_config)
    print(f"evaluating {model.path} (step {step}): layers {','.join(model.config.layer_kinds)}, "
          f"attention span {model.attention_span}" + (f", mqar {pairs} pairs" if "mqar" in tasks else ""),
          file=sys.stderr)
    try:
        results = evaluate(model, tasks, distances, args.samples, args.batch_size, args.seed, args.piece_len,
                           pairs, args.data, args.val_batches or None, args.val_batch_size,
                           log=lambda m: print(m, file=sys.stderr), ppl_seq_len=args.ppl_seq_len,
                           max_position=args.max_position, bucket_edges=edges,
                           max_documents=args.documents or None, min_doc_len=args.min_doc_len,
                           span=args.span, passage=args.passage)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    results = {"checkpoint": str(model.path), "step": step, "layers": model.config.layers,
               "tasks": tasks, "distances": distances, "samples": args.samples, "seed": args.seed,
               **({"mqar_pairs": pairs} if "mqar" in tasks else {}), **results}
    # an export is a folder to share (or upload), not a run's log: its results go where the command runs
    out = Path(args.out) if args.out else (run_dir / "eval" / f"step_{step:08d}.json" if run_dir
                                           else Path(f"eval-{model.path.name}.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    table = to_markdown(results)
    out.with_suffix(".md").write_text(table)
    if "loss_by_position" in results:
        png = loss_by_position.plot_loss_by_position({model.config.layers: results["loss_by_position"]},
                                                     out.with_suffix(".loss_by_position.png"),
                                                     f"{model.path} (step {step})")
        print(f"loss by position: {png}", file=sys.stderr)
    board = args.tensorboard or (run_dir / "tensorboard" / "eval" if run_dir else "none")  # export: if asked
    if str(board).lower() != "none":
        write_tensorboard(results, board, step)
    print(table)
    print(f"results: {out} and {out.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
