"""Convert checkpoints: consolidate any training checkpoint, export to Hugging Face, reshard for training.

    python -m pretrain.convert --checkpoint runs/tiny --to safetensors --out exports/tiny
    python -m pretrain.convert --checkpoint runs/tiny --to hf --out exports/tiny-hf
    python -m pretrain.convert --checkpoint exports/tiny-hf --to checkpoint --out runs/tiny-tp2 parallel.tp=2

Sources: a run folder (its newest good checkpoint) or checkpoint directory of any layout (tp / pp / sp /
dp, any ZeRO stage), a `--to safetensors` folder, or a `--to hf` folder. Every export carries the source
run's training state (step, schedule, data position) beside the weights, so `--to checkpoint` continues
the run where it stopped, on another cluster shape: the weights are resharded for the new layout; AdamW's
moments start at zero (they are not part of an export).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from parallel.mesh import Layout, LayoutError
from pretrain.checkpoint import (
    STATE_FILE,
    CorruptCheckpointError,
    NewerFormatError,
    begin_checkpoint,
    fsync_tree,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    staging_dir,
    verify_checkpoint,
)
from pretrain.checkpoint_shards import SHARDS_DIR, split_dense
from pretrain.config import ConfigError, build_config, read_config_tree
from pretrain.hf_export import (
    TRAINING_STATE,
    WEIGHTS_FILE,
    export_hf,
    load_weights,
    model_fields,
    save_weights,
)
from pretrain.model_io import end_of_document_id, model_config, model_state, resolve_checkpoint, run_tokenizer
from titans.model import TitansConfig, TitansLM

FORMAT_VERSION = 1  # of the --to safetensors folder
TITANS_CONFIG = "titans_config.json"
HF_CONFIG = "config.json"


@dataclass
class Source:
    """Dense weights and what is known about the run that made them."""

    path: Path
    model: TitansConfig
    weights: dict[str, Tensor]
    training: dict[str, Any] | None  # step, scheduler, data, rng, losses, config, layout

    @property
    def run_config(self) -> dict[str, Any] | None:
        return None if self.training is None else self.training["config"]


def written_layout(state: dict[str, Any]) -> Layout:
    """The layout a training checkpoint was written with (its per-rank data / RNG lists follow it)."""
    if "shards" in state:
        return Layout(**state["shards"]["layout"])
    return Layout(dp=len(state.get("data") or [None]))


def read_training_checkpoint(path: Path) -> Source:
    ckpt = resolve_checkpoint(path)
    verify_checkpoint(ckpt)
    state = load_checkpoint(ckpt)
    if "config" not in state:
        raise ValueError(f"checkpoint {ckpt} has no 'config' entry: it was not written by pretrain.train")
    cfg = model_config(state["config"])
    training = {key: state.get(key) for key in ("step", "scheduler", "data", "rng", "losses", "config")}
    training["layout"] = asdict(written_layout(state))
    return Source(ckpt, cfg, model_state(ckpt, state, cfg), training)


def read_export(path: Path) -> Source:
    """A `--to safetensors` or `--to hf` folder."""
    hf = (path / HF_CONFIG).is_file() and not (path / TITANS_CONFIG).is_file()
    meta_file = path / (HF_CONFIG if hf else TITANS_CONFIG)
    try:
        meta = json.loads(meta_file.read_text())
    except ValueError as err:
        raise ValueError(f"{meta_file}: not valid JSON ({err})") from err
    if not hf and meta.get("format_version", 1) > FORMAT_VERSION:
        raise NewerFormatError(f"{meta_file} has format version {meta['format_version']}, this version of "
                               f"the stack reads up to {FORMAT_VERSION}: update it")
    fields = meta.get("titans") if hf else meta.get("model")
    if not isinstance(fields, dict):
        raise ValueError(f"{meta_file} has no '{'titans' if hf else 'model'}' entry: not a Titans export")
    cfg = model_config(fields)
    weights_file = path / WEIGHTS_FILE
    if not weights_file.is_file():
        raise FileNotFoundError(f"{weights_file} is missing")
    weights = load_weights(weights_file, cfg, prefix="model." if hf else "")
    expected = _parameter_names(cfg)
    missing = sorted(expected - set(weights))
    if missing:
        raise ValueError(f"{weights_file} lacks {len(missing)} parameter(s) of the model in {meta_file}, "
                         f"e.g. {missing[0]}: the file and the config do not belong together")
    state_file = path / TRAINING_STATE
    training = None
    if state_file.is_file():
        training = torch.load(state_file, map_location="cpu", weights_only=False)
    return Source(path, cfg, weights, training)


def _parameter_names(cfg: TitansConfig) -> set[str]:
    with torch.device("meta"):
        return set(TitansLM(cfg).state_dict())


def read_source(path: str | Path) -> Source:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--checkpoint {path} does not exist")
    if path.is_dir() and ((path / TITANS_CONFIG).is_file() or (path / HF_CONFIG).is_file()):
        return read_export(path)
    return read_training_checkpoint(path)


@contextlib.contextmanager
def staged_folder(out: Path, overwrite: bool, source: Path) -> Iterator[Path]:
    """A folder beside `out` to write an export of `source` into, which becomes `out` only once complete:
    an error or a crash while writing leaves `out` as it was, and no file of an earlier export stays beside
    the new one (a stale training state or tokenizer would describe another run). An `out` that holds or
    sits inside `source` is refused: replacing it would delete what is being converted."""
    target, source = out.resolve(), source.resolve()
    if target.is_relative_to(source) or source.is_relative_to(target):
        raise FileExistsError(f"--out {out} holds (or is inside) the source {source}: replacing it would "
                              "delete what is being converted; choose another folder")
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out} already exists and is not empty: choose a new folder, or pass "
                              "--overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.writing-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        fsync_tree(staging)
        if out.exists():  # two renames: a crash between them leaves the old export under .<name>.replaced-*
            replaced = out.with_name(f".{out.name}.replaced-{os.getpid()}")
            os.replace(out, replaced)
            os.replace(staging, out)
            if replaced.is_dir():
                shutil.rmtree(replaced)
            else:
                replaced.unlink()
        else:
            os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def to_safetensors(src: Source, out: Path) -> list[str]:
    save_weights(src.weights, out / WEIGHTS_FILE, src.model.tie_embeddings)
    meta = {"format_version": FORMAT_VERSION, "model": model_fields(src.model)}
    (out / TITANS_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    notes = [f"{WEIGHTS_FILE}: {len(src.weights)} tensors"]
    if src.training is not None:
        torch.save(src.training, out / TRAINING_STATE)
        notes.append(f"training state at step {src.training['step']}")
    return notes


def to_hf(src: Source, out: Path, tokenizer_spec: str | None) -> list[str]:
    run_config = src.run_config or {}
    tokenizer = run_tokenizer(run_config, src.model.vocab_size, tokenizer_spec)
    eos_id = end_of_document_id(tokenizer, src.model.vocab_size)
    return export_hf(src.weights, src.model, out, tokenizer, eos_id, src.training)


def per_rank(values: list[Any] | None, old: Layout, new: Layout) -> list[Any] | None:
    """Per-rank data-loader / RNG states for the new layout: data is split by dp rank only, so rank r of
    the new layout takes the state of an old rank with its dp coordinate. None when dp changed (the data
    order of another dp size is another order)."""
    if values is None or old.dp != new.dp:
        return None
    by_dp = {old.coordinates(rank)["dp"]: v for rank, v in enumerate(values)}
    return [by_dp[new.coordinates(rank)["dp"]] for rank in range(new.world)]


def to_checkpoint(src: Source, out: Path, overrides: list[str], config: str | None, dp: int | None
                  ) -> list[str]:
    """A training run folder at the layout the overrides give, holding one checkpoint to resume from."""
    if src.run_config is None and config is None:
        raise ConfigError(f"{src.path} carries no run config: pass --config with the run's data and train "
                          "settings")
    tree = read_config_tree(config) if config else dict(src.run_config)
    tree["model"] = model_fields(src.model)
    model_overrides = [o for o in overrides if o.split("=", 1)[0].startswith("model.")]
    if model_overrides:
        raise ConfigError(f"{', '.join(model_overrides)}: the model is fixed by the weights; only "
                          "parallel.*, data.* and train.* can change")
    cfg = build_config(tree, [*overrides, f"train.out_dir={out}"])
    old = Layout(**src.training["layout"]) if src.training else Layout()
    p = cfg.parallel
    new = Layout(p.tp, p.pp, p.sp, dp or old.dp)
    if p.zero_stage > 0 and not new.model_parallel:
        raise ConfigError(f"parallel.zero_stage={p.zero_stage} without tp / pp / sp is DeepSpeed's format, "
                          "which this tool does not write: convert with parallel.zero_stage=0, or start the "
                          "run with train.init_from pointing at this export")
    if list_checkpoints(out):  # a conversion that died while writing left only a .partial: not a checkpoint
        raise FileExistsError(f"{out} already holds checkpoints: choose a new --out")
    training = src.training or {}
    step = training.get("step") or 0
    state = {"step": step, "scheduler": training.get("scheduler"), "losses": training.get("losses") or [],
             "data": per_rank(training.get("data"), old, new), "rng": per_rank(training.get("rng"), old, new),
             "config": cfg.to_dict()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    begin_checkpoint(out, step)
    staging = staging_dir(out, step)
    manifest = None
    if new.model_parallel:
        files, record = split_dense(src.weights, cfg, new)
        (staging / SHARDS_DIR).mkdir()
        for name, shard in files.items():
            torch.save(shard, staging / SHARDS_DIR / name)
        state["shards"] = record
        manifest = {"layout": record}
    else:
        state["model"], state["optimizer"] = src.weights, None
    fsync_tree(staging)
    final = save_checkpoint(out, step, state, keep_last=1, staged=True, manifest=manifest)
    notes = [f"{final / STATE_FILE}: step {step}, layout {new}; AdamW moments start at zero"]
    if src.training is None:
        notes.append("no training state in the source: the run starts at step 0 from these weights")
    elif state["data"] is None:
        notes.append(f"dp changed ({old.dp} → {new.dp}): the data loader starts from the beginning")
    notes.append(f"resume with: python -m pretrain.train --config {out / 'config.yaml'} (or your config "
                 f"with train.out_dir={out} and the same parallel.*) on {new.world} process(es)")
    return notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.convert",
        description="Convert a Titans checkpoint: consolidate (any tp/pp/sp/dp layout, any ZeRO stage) into "
                    "one safetensors file, export a Hugging Face model folder (loads with "
                    "AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True), no install of this "
                    "project needed), or write a training checkpoint at another layout.")
    parser.add_argument("--checkpoint", required=True,
                        help="a run folder (its newest good checkpoint), a checkpoint directory, or a folder "
                             "written by --to safetensors / --to hf")
    parser.add_argument("--to", required=True, choices=("safetensors", "hf", "checkpoint"))
    parser.add_argument("--out", required=True, help="output folder (for --to checkpoint: a new run folder)")
    parser.add_argument("--overwrite", action="store_true",
                        help="--to safetensors / hf: replace a non-empty --out (written aside, swapped in)")
    parser.add_argument("--tokenizer", default=None,
                        help="--to hf: 'bytes' or a tokenizer file (default: the run's, from its dataset)")
    parser.add_argument("--config", default=None,
                        help="--to checkpoint: a run config for data and train settings when the source "
                             "carries none (the model section always comes from the weights)")
    parser.add_argument("--dp", type=int, default=None,
                        help="--to checkpoint: data-parallel size of the new layout (default: the source's; "
                             "another size restarts the data order)")
    parser.add_argument("overrides", nargs="*",
                        help="--to checkpoint: section.key=value, e.g. parallel.tp=2 parallel.pp=2")
    args = parser.parse_args(argv)
    for flag, given, targets in (("--config", args.config is not None, ("checkpoint",)),
                                 ("--dp", args.dp is not None, ("checkpoint",)),
                                 (" ".join(args.overrides), bool(args.overrides), ("checkpoint",)),
                                 ("--overwrite", args.overwrite, ("safetensors", "hf")),
                                 ("--tokenizer", args.tokenizer is not None, ("hf",))):
        if given and args.to not in targets:  # said, not silently ignored
            parser.error(f"{flag}: only with --to {' / '.join(targets)}, not --to {args.to}")
    out = Path(args.out)
    try:
        src = read_source(args.checkpoint)
        print(f"read {src.path}: {len(src.weights)} tensors"
              + (f", step {src.training['step']}" if src.training else ""))
        if args.to in ("safetensors", "hf"):
            with staged_folder(out, args.overwrite, src.path) as staging:
                notes = to_safetensors(src, staging) if args.to == "safetensors" else \
                    to_hf(src, staging, args.tokenizer)
        else:
            notes = to_checkpoint(src, out, args.overrides, args.config, args.dp)
    except (ConfigError, LayoutError, CorruptCheckpointError, NewerFormatError, OSError, KeyError,
            ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"  {note}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
