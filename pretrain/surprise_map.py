"""Per-token surprise and memory gates of a trained model on one text, as a PNG heatmap plus JSON.

    python -m pretrain.surprise_map --checkpoint runs/tiny --string "def f(x):\\n    return x" --out map.png
    python -m pretrain.surprise_map --checkpoint runs/tiny --text some_file.py --out map.png

For every memory layer and token t:
- surprise: the norm of the memory's gradient `‖∇ℓ_t‖ = ‖∇_W ‖M(k_t) − v_t‖²‖` (over all heads' memory
  weights) at the chunk-start weights the update actually uses, before surprise clipping. The training
  path never materialises per-token gradients; here they are computed per token (one weighting per
  token through the same explicit backward), which is cheap for one text.
- θ (inner learning rate), η (momentum decay), α (forgetting), averaged over the memory heads.
- the model's next-token loss at t (how surprising the text is to the model as a whole).
The text is fed in pieces of the training length carrying the memory state, as `pretrain.evaluate` does.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from pretrain.model_io import LoadedModel, default_piece_len, load_model, run_tokenizer, stream_logits
from titans.memory import (
    MemoryState,
    NeuralMemory,
    memory_chunk_step,
    token_backward,
    token_grad_norms,
)


def memory_layers(model: LoadedModel) -> list[tuple[int, str, NeuralMemory]]:
    """(block index, block kind, memory module) for every block with a long-term memory."""
    found = []
    blocks = model.model.blocks.values()
    for i, (kind, block) in enumerate(zip(model.config.layer_kinds, blocks, strict=True)):
        found += [(i, kind, m) for m in block.modules() if isinstance(m, NeuralMemory)]
    return found


@torch.no_grad()
def call_diagnostics(memory: NeuralMemory, x: Tensor, state: MemoryState | None) -> dict[str, Tensor]:
    """Per-token surprise ‖∇ℓ_t‖ and gates θ, η, α (each (B, T, H)) of one `memory(x, state)` call.

    Replays the chunk scan of `NeuralMemory.scan`: inside each chunk the per-token gradients are taken at
    the chunk-start weights, then the chunk's collapsed update moves the state on. Also returns the end
    weights (`weights`), which equal those of the real call.
    """
    B, T, _ = x.shape
    state = state or memory.initial_state(B)
    q, k, v, _ = memory.project(x, state.conv)
    theta, log_eta, log_keep = memory.gates(x)
    H = memory.heads
    inputs = memory.chunk_inputs(q, k, v, theta, log_eta, log_keep, state.weights[0].dtype)
    flat = [t.reshape(B * H, *t.shape[2:]) for t in (*state.weights, *state.momentum)]
    norms = []
    for chunk in zip(*(t.unbind(0) for t in inputs), strict=True):
        _, k_chunk, v_chunk = chunk[:3]
        backward = token_backward(flat[: memory.depth], k_chunk, v_chunk, memory.residual_norm)
        norms.append(token_grad_norms(*backward))  # (B·H, b), before clipping
        _, *flat = memory_chunk_step(memory.scan_options, *chunk, *flat)
    surprise = torch.cat(norms, dim=1)[:, :T].reshape(B, H, T).transpose(1, 2)
    return {"surprise": surprise, "theta": theta, "eta": log_eta.exp(), "alpha": -torch.expm1(log_keep),
            "weights": [w.reshape(B, H, *w.shape[1:]) for w in flat[: memory.depth]]}


@torch.no_grad()
def surprise_map(model: LoadedModel, tokens: Tensor, piece_len: int | None = None) -> dict[str, Any]:
    """Run one text (T,) through the model and collect, per memory layer and token, surprise and gates.

    Returns {"loss": (T,) next-token loss (NaN at the last token), "layers": [{"block", "kind", "heads",
    "max_grad_norm" (the clip the update applies; surprise is before it), "theta_max", "surprise",
    "theta", "eta", "alpha"}, ...] with (T,) tensors (surprise: norm over heads; gates: mean over heads)}.
    """
    calls: dict[int, list[dict[str, Tensor]]] = {}
    hooks = []
    layers = memory_layers(model)
    for index, (_, _, memory) in enumerate(layers):
        def record(module, args, kwargs, index=index):
            x = args[0] if args else kwargs["x"]
            state = args[1] if len(args) > 1 else kwargs.get("state")
            calls.setdefault(index, []).append(call_diagnostics(module, x, state))

        hooks.append(memory.register_forward_pre_hook(record, with_kwargs=True))
    try:
        piece_len = piece_len or default_piece_len(model, model.run_config.get("data", {}).get("seq_len"))
        logits, _ = stream_logits(model, tokens.view(1, -1), piece_len)
    finally:
        for hook in hooks:
            hook.remove()
    loss = torch.full((tokens.numel(),), float("nan"))
    loss[:-1] = F.cross_entropy(logits[0, :-1].float(), tokens.view(-1)[1:], reduction="none")
    out = {"loss": loss, "layers": []}
    for index, (block, kind, memory) in enumerate(layers):
        recorded = calls.get(index, [])
        joined = {key: torch.cat([c[key][0] for c in recorded], dim=0) for key in
                  ("surprise", "theta", "eta", "alpha")}  # (T, H)
        if joined["surprise"].shape[0] != tokens.numel():
            raise RuntimeError(f"block {block}: the memory saw {joined['surprise'].shape[0]} tokens, the "
                               f"text has {tokens.numel()}")
        out["layers"].append({"block": block, "kind": kind, "heads": memory.heads,
                              "max_grad_norm": memory.scan_options.max_grad_norm,
                              "theta_max": memory.theta_max,
                              "surprise": joined["surprise"].square().sum(-1).sqrt(),
                              **{g: joined[g].mean(-1) for g in ("theta", "eta", "alpha")}})
    return out


# ---------------------------------------------------------------------------------------- output


def token_labels(tokens: list[int], tokenizer: Any | None) -> list[str]:
    """A short printable label per token (bytes shown as characters, escapes for control bytes)."""
    labels = []
    for t in tokens:
        if tokenizer is None:
            text = chr(t) if t < 256 else f"<{t}>"
        else:
            try:
                text = tokenizer.decode([t])
            except Exception:  # an id the tokenizer cannot decode alone (e.g. end of document)
                text = f"<{t}>"
        labels.append(text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text)
    return labels


def to_json(result: dict[str, Any], tokens: list[int], labels: list[str]) -> dict[str, Any]:
    def numbers(t: Tensor) -> list[float | None]:
        return [None if math.isnan(x) else round(x, 6) for x in t.tolist()]

    return {"tokens": tokens, "labels": labels, "loss": numbers(result["loss"]),
            "layers": [{**{k: layer[k] for k in ("block", "kind", "heads", "max_grad_norm", "theta_max")},
                        **{k: numbers(layer[k]) for k in ("surprise", "theta", "eta", "alpha")}}
                       for layer in result["layers"]]}


def plot(result: dict[str, Any], labels: list[str], path: str | Path, title: str = "") -> None:
    """One heatmap per quantity (rows: memory layers; columns: tokens), and the loss, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = result["layers"]
    quantities = [("surprise", "surprise ‖∇ℓ_t‖"), ("theta", "θ (inner lr)"), ("eta", "η (momentum)"),
                  ("alpha", "α (forgetting)")]
    T = len(labels)
    width = min(max(8.0, 0.14 * T + 2), 60.0)
    rows = len(quantities) + 1
    fig, axes = plt.subplots(rows, 1, figsize=(width, 1.2 + rows * (0.5 + 0.35 * max(1, len(layers)))),
                             squeeze=False)
    names = [f"L{layer['block']} {layer['kind']}" for layer in layers]
    for ax, (key, name) in zip(axes[:-1, 0], quantities, strict=True):
        data = torch.stack([layer[key] for layer in layers]).numpy() if layers else [[0.0] * T]
        image = ax.imshow(data, aspect="auto", interpolation="nearest", cmap="viridis")
        fig.colorbar(image, ax=ax, pad=0.01)
        ax.set_yticks(range(len(names)), names)
        ax.set_title(name, fontsize=9, loc="left")
    loss_ax = axes[-1, 0]
    image = loss_ax.imshow(result["loss"].view(1, -1).numpy(), aspect="auto", interpolation="nearest",
                           cmap="magma")
    fig.colorbar(image, ax=loss_ax, pad=0.01)
    loss_ax.set_yticks([0], ["model"])
    loss_ax.set_title("next-token loss", fontsize=9, loc="left")
    for ax in axes[:, 0]:
        if T <= 200:
            ax.set_xticks(range(T), labels, fontsize=6, rotation=90 if T > 40 else 0, fontfamily="monospace")
        else:
            ax.set_xlabel("token", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def encode(text: str, tokenizer: Any | None) -> list[int]:
    return list(text.encode("utf-8")) if tokenizer is None else tokenizer.encode(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.surprise_map",
        description="Per-token surprise of the long-term memory (‖∇ℓ_t‖ at the chunk-start weights, per "
                    "memory layer) and its gates θ (inner lr), η (momentum), α (forgetting), plus the "
                    "model's next-token loss, on one text: a PNG heatmap and the numbers as JSON.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True,
                        help="run directory, checkpoint directory or pretrain.convert export")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="a text file to read")
    source.add_argument("--string", help="the text itself")
    parser.add_argument("--out", default="surprise_map.png", help="PNG to write")
    parser.add_argument("--json", default=None, help="numbers as JSON (default: the PNG's name, .json)")
    parser.add_argument("--max-tokens", type=int, default=1024, help="keep the first N tokens of the text")
    parser.add_argument("--piece-len", type=int, default=None,
                        help="tokens per call (default: the training length, aligned)")
    parser.add_argument("--tokenizer", default=None,
                        help="'bytes' or a tokenizer file (default: the run's, from its dataset manifest)")
    args = parser.parse_args(argv)
    try:
        model = load_model(args.checkpoint)
        tokenizer = run_tokenizer(model.run_config, model.vocab_size, args.tokenizer)
        text = Path(args.text).read_text(encoding="utf-8", errors="replace") if args.text else args.string
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    tokens = encode(text, tokenizer)[: args.max_tokens]
    if len(tokens) < 2:
        print("error: the text has fewer than 2 tokens", file=sys.stderr)
        return 2
    if not memory_layers(model):
        print("error: the model has no memory layers (layers: "
              f"{','.join(model.config.layer_kinds)})", file=sys.stderr)
        return 2
    result = surprise_map(model, torch.tensor(tokens), args.piece_len)
    labels = token_labels(tokens, tokenizer)
    out = Path(args.out)
    out = out if out.suffix else out.with_suffix(".png")  # what matplotlib would write, named as written
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(result, labels, out, f"{model.path} (step {model.step}): {len(tokens)} tokens")
    json_path = Path(args.json) if args.json else out.with_suffix(".json")
    json_path.write_text(json.dumps(to_json(result, tokens, labels)) + "\n")
    for layer in result["layers"]:
        s = layer["surprise"]
        print(f"block {layer['block']} ({layer['kind']}): surprise mean {s.mean():.4f}, max {s.max():.4f} at "
              f"token {int(s.argmax())}; mean θ {layer['theta'].mean():.2e}, η {layer['eta'].mean():.3f}, "
              f"α {layer['alpha'].mean():.2e}")
    print(f"wrote {out} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
