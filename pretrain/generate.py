"""Generate text from a checkpoint: the quick check of a training run.

    python -m pretrain.generate --checkpoint runs/tiny --prompt "def main(" --max-new-tokens 200
    python -m pretrain.generate --checkpoint runs/tiny --prompt "import " --temperature 0.8 --top-p 0.95
    python -m pretrain.generate --checkpoint runs/tiny --prompt "def " --prompt "class " --num-samples 4 \
        --temperature 0.8

Greedy by default. The prompt and the continuation run through the streaming cache (titans/streaming.py),
so memory stays flat however long the prompt or the continuation. Several prompts and samples run as one
batch, padded: each row continues its prompt as if alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from data_pipeline.tokenizer import ByteTokenizer
from pretrain.model_io import device_problem, end_of_document_id, load_model, run_tokenizer
from titans.model import TitansLM
from titans.streaming import generate, sampling_problem


def load_for_generation(path: str | Path, device: str = "cpu") -> tuple[TitansLM, dict]:
    """A model in eval mode from any checkpoint or export `pretrain.convert` reads, and its run config."""
    loaded = load_model(path, device)
    return loaded.model, loaded.run_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.generate", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="a run folder, a checkpoint directory, or a pretrain.convert export")
    given = parser.add_mutually_exclusive_group()
    given.add_argument("--prompt", action="append", default=None,
                       help="the text to continue (default: start from nothing); give it several times for "
                            "several prompts, generated as one batch")
    given.add_argument("--prompt-file", default=None,
                       help="a text file to continue, of any length (the memory carries it past the window); "
                            "only the continuation is printed")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    parser.add_argument("--num-samples", type=int, default=1,
                        help="continuations of each prompt (default 1; with --temperature > 0 they differ)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens")
    parser.add_argument("--top-p", type=float, default=None, help="sample from the smallest set of mass p")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--tokenizer", default=None,
                        help="'bytes' or a tokenizer file (default: the run's, from its dataset)")
    parser.add_argument("--stop-at-eos", action="store_true", help="stop at the end-of-document token")
    parser.add_argument("--ids", action="store_true", help="print the token ids as JSON, not the text")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda:0 (default cpu)")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for torch (0: torch's default, one per core; fewer when the cores "
                             "are shared)")
    args = parser.parse_args(argv)
    for name in ("max_new_tokens", "num_samples"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    problem = sampling_problem(args.temperature, args.top_k, args.top_p) or device_problem(args.device)
    if problem:
        parser.error(problem)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.prompt_file:
            try:
                args.prompt = [Path(args.prompt_file).read_text(encoding="utf-8", errors="replace")]
            except OSError as err:
                raise FileNotFoundError(f"--prompt-file {args.prompt_file}: {err.strerror}") from None
        model, run_config = load_for_generation(args.checkpoint, args.device)
        tokenizer = run_tokenizer(run_config, model.cfg.vocab_size, args.tokenizer)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    eos_id = end_of_document_id(tokenizer, model.cfg.vocab_size)
    tokenizer = tokenizer or ByteTokenizer()
    texts = [text for text in args.prompt or [""] for _ in range(args.num_samples)]
    rows = [tokenizer.encode(text) for text in texts]
    if not all(rows):
        if eos_id is None:
            parser.error("an empty prompt needs an end-of-document token to start from: pass --prompt")
        rows = [ids or [eos_id] for ids in rows]  # a document start
    prompt, keep = left_padded(rows, eos_id or 0, args.device)
    generator = torch.Generator(args.device).manual_seed(args.seed)
    started = time.perf_counter()
    out = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                   eos_id if args.stop_at_eos else None, generator, keep=keep)
    seconds = time.perf_counter() - started
    new = [row[prompt.shape[1]:] for row in out.tolist()]
    if args.stop_at_eos:  # a row that stopped early is filled with the end-of-document token after it
        new = [row[: row.index(eos_id) + 1] if eos_id in row else row for row in new]
    for i, (text, ids, continued) in enumerate(zip(texts, rows, new, strict=True)):
        if args.ids:
            print(json.dumps({"prompt": ids, "generated": continued}))
            continue
        if len(texts) > 1:
            print(f"=== sample {i % args.num_samples + 1} of prompt {i // args.num_samples + 1} ===")
        print(("" if args.prompt_file else text) + tokenizer.decode(continued))
    count = sum(map(len, new))
    print(f"[{count} tokens in {seconds:.2f} s, {count / seconds:.1f} tokens/s]", file=sys.stderr)
    return 0


def left_padded(rows: list[list[int]], pad: int, device: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompts as one batch, padded on the left, and which positions are real (None: all are)."""
    width = max(map(len, rows))
    tokens = torch.full((len(rows), width), pad, dtype=torch.long)
    keep = torch.zeros(len(rows), width, dtype=torch.bool)
    for row, ids in enumerate(rows):
        tokens[row, width - len(ids) :], keep[row, width - len(ids) :] = torch.tensor(ids), True
    return tokens.to(device), None if bool(keep.all()) else keep.to(device)


if __name__ == "__main__":
    sys.exit(main())
