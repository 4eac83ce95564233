"""Loading trained models for evaluation and analysis: one small interface, `load_model(path)`.

    model = load_model("runs/tiny")                       # a run directory: its latest checkpoint
    model = load_model("runs/tiny/checkpoints/step_00000300")
    logits, states = model.logits(tokens)                 # (B, T, vocab), per-layer memory states
    logits, states = model.logits(more_tokens, states)    # the long-term memory continues

Evaluation code is written against the `LanguageModel` protocol, not against `TitansLM`, so other model
formats (a converted Hugging Face export, a sharded checkpoint) can plug in by providing the same few
attributes. `stream_logits` feeds a long input in aligned pieces that carry the memory state: attention
keeps no KV cache across calls, so beyond one piece only the long-term memory remembers.
"""

from __future__ import annotations

import math
import re
import sys
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from pretrain.checkpoint import STATE_FILE, newest_good_checkpoint
from titans.kernels.toolchain import runnable_kernel
from titans.model import TitansConfig, TitansLM


@runtime_checkable
class LanguageModel(Protocol):
    """What evaluation needs from a model.

    config: the model's `TitansConfig` (or an equivalent with the same fields).
    vocab_size: logits width.
    piece_multiple: inputs fed in several calls must be cut at multiples of this many tokens (memory
        chunks, MAC segments) for the carried state to continue the sequence exactly.
    attention_span: how many past tokens attention can see (the window; the segment for MAC): the unit
        of the synthetic tasks' distances.
    logits(tokens, states): (B, T) token ids -> ((B, T, vocab) float logits, new states); no gradients.
    """

    config: Any
    vocab_size: int
    piece_multiple: int
    attention_span: int

    def logits(self, tokens: Tensor, states: Any = None) -> tuple[Tensor, Any]: ...


def piece_multiple(cfg: TitansConfig) -> int:
    """The alignment of calls that carry state: memory chunks, and MAC segments."""
    multiple = cfg.memory_chunk
    if "mac" in cfg.layer_kinds:
        multiple = math.lcm(multiple, cfg.segment_len)
    return multiple


def attention_span(cfg: TitansConfig, full_span: int | None = None) -> int:
    """The longest distance any attention layer sees: `window` for SWA / MAG / MAL, `segment_len` for
    MAC (its attention is causal over the current segment), `full_span` (a piece) for full attention;
    for a memory-only (LMM) model the window is reported as the nominal span."""
    spans = []
    for kind in cfg.layer_kinds:
        if kind in ("swa", "mag", "mal"):
            spans.append(cfg.window)
        elif kind == "mac":
            spans.append(cfg.segment_len)
        elif kind == "full":
            spans.append(full_span or cfg.window)
    return max(spans) if spans else cfg.window


@dataclass
class LoadedModel:
    """A `TitansLM` from a training checkpoint, in eval mode, with the run's configuration."""

    model: TitansLM
    config: TitansConfig
    run_config: dict[str, Any] = field(default_factory=dict)  # the checkpoint's {model, data, train}
    path: Path | None = None  # the checkpoint directory
    step: int | None = None

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def piece_multiple(self) -> int:
        return piece_multiple(self.config)

    @property
    def attention_span(self) -> int:
        seq_len = self.run_config.get("data", {}).get("seq_len")
        return attention_span(self.config, seq_len)

    @property
    def device(self) -> torch.device:
        return self.model.embed.weight.device

    @torch.no_grad()
    def logits(self, tokens: Tensor, states: Any = None) -> tuple[Tensor, Any]:
        return self.model(tokens.to(self.device), states)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a run directory (its latest), a checkpoint directory or a state.pt."""
    path = Path(path)
    if path.is_file():
        return path.parent if path.name == STATE_FILE else path
    if (path / STATE_FILE).is_file():
        return path
    if path.is_dir():
        latest, skipped = newest_good_checkpoint(path)
        for problem in skipped:
            print(f"skipped: {problem}", file=sys.stderr)
        if latest is not None:
            return latest
        raise FileNotFoundError(f"{path}: no checkpoint found (expected {STATE_FILE} or "
                                f"checkpoints/step_*/{STATE_FILE} under it)")
    raise FileNotFoundError(f"checkpoint {path} does not exist")


_WRAPPER_PREFIX = re.compile(r"(^|\.)(module|_orig_mod)\.")  # DDP / torch.compile wrappers
_CHECKPOINTED = re.compile(r"^blocks\.(\d+)\.block\.")  # train.activation_checkpointing wrapper


def clean_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Strip the training wrappers' key prefixes so the state loads into a bare `TitansLM`."""
    cleaned = {}
    for key, value in state.items():
        key = _WRAPPER_PREFIX.sub(r"\1", key)
        cleaned[_CHECKPOINTED.sub(r"blocks.\1.", key)] = value
    return cleaned


def model_config(run_config: dict[str, Any]) -> TitansConfig:
    values = run_config.get("model", run_config)
    known = set(TitansConfig.field_names())
    return TitansConfig(**{k: v for k, v in values.items() if k in known})


def model_state(ckpt: Path, state: dict[str, Any], cfg: TitansConfig) -> dict[str, Tensor]:
    """The full model state dict of a checkpoint: saved whole, or rebuilt from ZeRO shards."""
    if "model" in state:
        weights = state["model"]
    elif "zero" in state:  # DeepSpeed ZeRO: the model lives in the ranks' DeepSpeed shards
        from parallel.zero import consolidated_state_dict

        weights = consolidated_state_dict(ckpt if ckpt.is_dir() else ckpt.parent)
    elif "shards" in state:  # tensor / pipeline parallel: every (tp, pp) rank's shard
        from pretrain.checkpoint_shards import consolidate

        weights = consolidate(ckpt if ckpt.is_dir() else ckpt.parent)
    else:
        raise ValueError(f"checkpoint {ckpt} has neither a 'model' state nor model shards")
    weights = clean_state_dict(weights)
    if cfg.tie_embeddings and "head.weight" not in weights and "embed.weight" in weights:
        weights["head.weight"] = weights["embed.weight"]  # a shared parameter is stored once
    return weights


def device_problem(device: str) -> str | None:
    """What is wrong with a --device, or None: an unknown name, or a CUDA device this torch cannot use."""
    try:
        kind = torch.device(device).type
    except RuntimeError as err:
        return f"--device {device}: {err}"
    if kind == "cuda" and not torch.cuda.is_available():
        return f"--device {device}: no CUDA device is available to this torch ({torch.__version__})"
    return None


def runnable_config(cfg: TitansConfig, device: str | torch.device, source: str | Path) -> TitansConfig:
    """`cfg` with a memory kernel that runs on `device`: the run's where it can, else the eager one (the
    same function), with a warning naming `source`."""
    kernel = runnable_kernel(cfg.memory_kernel, torch.device(device).type)
    if kernel == cfg.memory_kernel:
        return cfg
    warnings.warn(f"{source}: model.memory_kernel={cfg.memory_kernel} cannot run on {device} here; loaded "
                  f"with memory_kernel={kernel} (the same function)", stacklevel=3)
    return replace(cfg, memory_kernel=kernel)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a trained model from a run directory (its newest good checkpoint), a checkpoint directory or a
    `pretrain.convert` export (--to safetensors / hf). Its memory kernel is the run's where it can run on
    `device`, else the eager one (the same function, with a warning): a run trained with the Triton kernel
    on GPUs is evaluated on a CPU as it is."""
    from pretrain.convert import read_source  # convert builds on this module
    from pretrain.hf_export import model_fields

    src = read_source(path)  # a training checkpoint is verified against its manifest first
    cfg = runnable_config(src.model, device, src.path)
    model = TitansLM(cfg)
    model.load_state_dict(src.weights)
    model.to(device).eval()
    run_config = src.run_config or {"model": model_fields(src.model)}  # an export without training state
    return LoadedModel(model, cfg, run_config, src.path, (src.training or {}).get("step"))


def default_piece_len(model: LanguageModel, seq_len: int | None = None) -> int:
    """The training length (or 4 spans) rounded down to the alignment: the length each call sees."""
    multiple = model.piece_multiple
    want = seq_len or 4 * model.attention_span
    return max(multiple, want // multiple * multiple)


@torch.no_grad()
def stream_logits(model: LanguageModel, tokens: Tensor, piece_len: int | None = None,
                  positions: Tensor | None = None, states: Any = None) -> tuple[Tensor, Any]:
    """Logits for a long (B, T) input fed in pieces of `piece_len` tokens that carry the memory state.

    With `positions` (B, Q) only the logits at those positions are returned, (B, Q, vocab), so a long
    input never holds (T, vocab) logits at once. Returns (logits, end states).
    """
    piece_len = piece_len or default_piece_len(model)
    if piece_len % model.piece_multiple:
        raise ValueError(f"piece_len={piece_len} must be a multiple of {model.piece_multiple} (memory chunks "
                         "and MAC segments) for the carried memory to continue the sequence exactly")
    outputs = []
    for start in range(0, tokens.shape[1], piece_len):
        logits, states = model.logits(tokens[:, start : start + piece_len], states)
        logits = logits.float().cpu()
        if positions is not None:
            local = positions - start
            inside = (local >= 0) & (local < logits.shape[1])
            picked = logits.gather(1, local.clamp(0, logits.shape[1] - 1).unsqueeze(-1)
                                   .expand(-1, -1, logits.shape[-1]))
            outputs.append(torch.where(inside.unsqueeze(-1), picked, 0.0))
        else:
            outputs.append(logits)
    if positions is not None:
        return torch.stack(outputs).sum(0), states
    return torch.cat(outputs, dim=1), states


def run_tokenizer(run_config: dict[str, Any], vocab_size: int, spec: str | None = None) -> Any | None:
    """The run's tokenizer (from its dataset's manifest), `spec` if given; None for a byte vocabulary."""
    from data_pipeline.shards import MANIFEST, Manifest
    from data_pipeline.tokenizer import load_tokenizer

    if spec:
        return None if spec == "bytes" else load_tokenizer(spec)
    data = run_config.get("data", {}).get("train")
    if data and (Path(data) / MANIFEST).is_file():
        info = Manifest.read(data).tokenizer
        if info.get("type") != "bytes" and info.get("path") and Path(info["path"]).is_file():
            return load_tokenizer(info["path"])
    if vocab_size in (256, 257):
        return None
    raise ValueError("cannot find the run's tokenizer (its dataset is not here): pass --tokenizer")


def end_of_document_id(tokenizer: Any | None, vocab_size: int) -> int | None:
    """The end-of-document id of `run_tokenizer`'s result: the tokenizer's, or for a byte vocabulary
    (None) the byte tokenizer's when the vocabulary holds it."""
    from data_pipeline.tokenizer import ByteTokenizer

    eos = (tokenizer or ByteTokenizer()).eos_id
    return eos if eos < vocab_size else None
