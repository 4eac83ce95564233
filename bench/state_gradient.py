"""How the loss's gradient grows backwards through the memory's chunk updates, with and without the
gradient horizon (docs/DESIGN.md §2.6).

    python bench/state_gradient.py                                  # tiny MAC, 8,192 tokens
    python bench/state_gradient.py --layers mag --length 4096 --horizons none 16 64

One model at initialisation (configs/tiny.yaml's shape, `--layers` block kind), one sequence of real text
(the Python standard library's sources, as bytes), one backward pass per horizon from the same weights.
Prints the mean norm of the gradient at the block input per range of positions, last range first: an
exact gradient (`none`) that grows towards the sequence start is what the horizon cuts.
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from titans.model import TitansConfig, TitansLM  # noqa: E402


def stdlib_bytes(n: int) -> torch.Tensor:
    """The first n bytes of the standard library's sources, files in name order."""
    data = bytearray()
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        data += path.read_bytes()
        if len(data) >= n:
            return torch.tensor(list(data[:n]), dtype=torch.long)
    raise SystemExit(f"the standard library has fewer than {n} bytes of sources")


def gradient_by_position(model: TitansLM, tokens: torch.Tensor, bins: int) -> torch.Tensor:
    """Mean ‖∂loss/∂(block input)‖ in `bins` equal ranges of position."""
    captured = []
    handle = model.embed.register_forward_hook(lambda module, args, out: captured.append(out) or out)
    logits, _ = model(tokens[:, :-1])
    handle.remove()
    (grad,) = torch.autograd.grad(F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()), captured)
    return grad[0].norm(dim=-1).view(bins, -1).mean(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="mac", help="block kind(s), as model.layers")
    parser.add_argument("--length", type=int, default=8192, help="tokens in the sequence")
    parser.add_argument("--bins", type=int, default=8, help="ranges of position to average over")
    parser.add_argument("--horizons", nargs="+", default=["none", "64", "16"],
                        help="memory_grad_horizon values in chunks ('none': the exact gradient)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.length % args.bins:
        parser.error(f"--length {args.length} is not a multiple of --bins {args.bins}")
    tokens = stdlib_bytes(args.length + 1).unsqueeze(0)
    shape = dict(vocab_size=257, dim=128, n_layers=2, n_heads=4, layers=args.layers, window=64,
                 segment_len=64, n_persistent=4, memory_chunk=16)
    torch.manual_seed(args.seed)
    weights = TitansLM(TitansConfig(**shape)).state_dict()
    width = args.length // args.bins
    print(f"{args.layers}, {args.length:,} tokens, chunk 16: mean gradient norm at the block input by "
          f"position (last range first)\n")
    print("| horizon (chunks) | " + " | ".join(f"{i * width:,}–{(i + 1) * width:,}"
                                             for i in reversed(range(args.bins))) + " |")
    print("|---|" + "---:|" * args.bins)
    for horizon in args.horizons:
        cut = None if horizon == "none" else int(horizon)
        model = TitansLM(TitansConfig(**shape, memory_grad_horizon=cut))
        model.load_state_dict(weights)
        norms = gradient_by_position(model, tokens, args.bins)
        print(f"| {horizon} | " + " | ".join(f"{v:.2g}" for v in norms.flip(0).tolist()) + " |", flush=True)


if __name__ == "__main__":
    main()
