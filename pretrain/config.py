"""Run configuration: dataclasses loaded from YAML, validated before any work starts, dotted overrides.

    cfg = load_config("configs/tiny.yaml", ["train.steps=100", "model.layers=mag"])

An unknown key is an error that lists the valid ones; a value of the wrong type names its field.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from parallel.sequence import ATTENTION_ONLY, SP_SPLITS, zigzag_split
from pretrain.cpu_allocator import CPU_ALLOCATORS
from pretrain.schedule import DECAY_SHAPES
from titans.model import TitansConfig


@dataclass
class DataConfig:
    """Where the tokens come from. `train`/`val` are prepared dataset folders (with manifest.json)."""

    train: str = "data/stdlib-bytes"
    val: str | None = None  # default: the validation split of `train`
    # more datasets validated at every validation, each its own loss (val/<folder name>/loss): e.g. long
    # documents beside web text. Their validation split; one that has none and is not trained on, whole
    val_sets: tuple[str, ...] = ()
    default_corpus: bool = True  # build the embedded corpus into `train` if it is missing
    # more prepared datasets whose training splits are mixed into `train`'s, each sample drawn from one
    # of them by mix_weights (one tokenizer for all; validation stays `val`, or `train`'s split)
    mix: tuple[str, ...] = ()
    # sampling weights of `train`, then of each of `mix` (default: their training tokens, as if concatenated)
    mix_weights: tuple[float, ...] = ()
    seq_len: int = 256
    batch_size: int = 8  # sequences per optimizer step and data-parallel rank (before accumulation)
    num_workers: int = 0
    shuffle_buffer: int = 1000
    max_corrupt_shards: int = 0  # corrupt shards skipped (logged, counted) before it is an error
    seed: int = 0
    # Synthetic retrieval tasks mixed into training (pretrain/synthetic.py): this many of each batch's
    # batch_size sequences are generated needle / mqar tasks, trained on their answers only; 0: text only.
    synthetic_rows: int = 0
    synthetic_task: str = "needle"
    synthetic_weight: float = 1.0  # a synthetic sequence's answers weigh as much as this many text sequences
    # shortest question–answer distance in tokens (0: the task's minimum); distances are log-uniform up to
    # the longest that fits in seq_len. Set it to the attention span to train the memory path only.
    synthetic_min_distance: int = 0
    synthetic_max_distance: int = 0  # longest question–answer distance (0: the longest that fits)
    synthetic_pairs: int = 4  # key-value pairs per mqar instance (synthetic.MQAR_TRAINING_PAIRS)
    # true: each synthetic row holds instances back to back until the next would not fit (more answers
    # per row when the distances are short); false: one instance per row, filler after it
    synthetic_pack: bool = False
    # N > 0: instead of rows of the batch, each step also trains on N separate synthetic sequences, one
    # instance each from its first token (the memory's initial state, as the evaluation asks), all at one
    # distance per step: as long as that instance needs, not seq_len. synthetic_rows must be 0.
    synthetic_sequences: int = 0
    # a curriculum: the first N steps train on the synthetic sequences alone, the text starting after them
    # (where it left off: no text is skipped). Why: a memory that must learn to bind keys to values beside
    # the text's gradient can settle on recalling the values without their keys; first alone, it binds.
    synthetic_alone_steps: int = 0
    # Repeated passages (pretrain/repeats.py): this many of each batch's text rows repeat their first
    # repeat_passage tokens after a gap of at least repeat_min_gap (e.g. the window: only a memory or full
    # attention can copy them), so that copying real text is rewarded; 0: plain text.
    repeat_rows: int = 0
    repeat_passage: int = 64
    repeat_min_gap: int = 64
    # the loss weight of the targets a copy predicts (the second reading after its first token); other
    # text targets weigh 1. E.g. 16: a 128-token passage's copy weighs about as much as the rest of its row
    repeat_weight: float = 1.0


@dataclass
class TrainConfig:
    """The optimisation and the run's bookkeeping."""

    out_dir: str = "runs/tiny"
    steps: int = 300
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # the decay ends at lr · min_lr_ratio
    warmup_steps: int = 30
    # the decay's shape (pretrain/schedule.py): "cosine", "linear", "sqrt" (1 - sqrt of its progress, the
    # usual cooldown of warmup-stable-decay) or "none" (constant after warmup)
    lr_decay: str = "cosine"
    # the last fraction of train.steps over which the lr decays: 1 from the end of warmup; e.g. 0.2 holds
    # it at its peak until 80 % of the steps (warmup-stable-decay, WSD)
    lr_decay_fraction: float = 1.0
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # the largest global gradient norm (larger ones are scaled down); 0: no clipping
    grad_accum: int = 1
    precision: str = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU; or "fp32", "bf16"
    # float32 matmuls on CUDA (the memory's state and update stay float32 under bf16 autocast): "ieee", or
    # "tf32" (tensor cores, inputs rounded to a 10-bit mantissa; the Triton memory kernel follows it)
    fp32_matmul: str = "ieee"
    activation_checkpointing: bool = False
    # with activation_checkpointing: every N-th block (1: all; 2: half of them, as torchtitan's selective
    # layer option): less recompute, more activation memory
    activation_checkpointing_every: int = 1
    # torch.compile each block (as torchtitan does), the memory's scan an opaque op inside it
    # (titans/scan_op.py): the first step compiles (minutes); then fewer, fused kernels per block
    compile: bool = False
    compile_backend: str = "inductor"  # torch.compile's backend; "aot_eager" traces without generating code
    log_every: int = 10
    eval_every: int = 100  # 0: no validation
    eval_batches: int = 8
    # synthetic recall measured at every validation (pretrain.evaluate's needle / mqar), at these
    # distances in multiples of the attention span: when recall is learnt, and how it spreads past the
    # window, as TensorBoard scalars val/<task>/x<distance>
    eval_tasks: tuple[str, ...] = ()
    eval_task_distances: tuple[float, ...] = (2.0, 8.0)
    eval_task_samples: int = 32  # sequences per task and distance
    # key-value pairs per mqar sequence (0: data.synthetic_pairs). Fixed, it keeps one curve comparable
    # across runs, or across a resume, that change the pairs they train on.
    eval_task_pairs: int = 0
    checkpoint_every: int = 100
    keep_last: int = 3  # the newest checkpoints kept (and those of keep_every and checkpoint_at)
    keep_every: int = 0  # checkpoints at multiples of this step are never pruned (0: none), e.g. for evals
    # write checkpoints in a background thread while training goes on (pretrain/async_checkpoint.py): the
    # step waits only for the gathers and a host copy; not with DeepSpeed ZeRO, which writes its own
    async_checkpoint: bool = False
    # more checkpoints at these steps, never pruned: e.g. the points a WSD run's cooldowns branch from
    checkpoint_at: tuple[int, ...] = ()
    resume: bool = True  # continue from the newest good checkpoint in out_dir
    # continue from this checkpoint (verified, no fallback), or from a run folder's newest good one; once:
    # run again (a requeue), the run goes on from its own newest checkpoint (pretrain/resume.py)
    resume_from: str | None = None
    init_from: str | None = None  # a new run starting from this checkpoint's weights only (any layout)
    stop_after_steps: int = 0  # end this invocation after so many steps (checkpointed); 0: run to `steps`
    max_nonfinite_steps: int = 5  # stop after this many non-finite losses in a row
    seed: int = 0
    threads: int = 0  # CPU threads for torch (0: torch's default)
    # host memory on CPU runs: "reuse" keeps freed blocks in the process for the next step (a GPU's caching
    # allocator does the same), "system" leaves malloc as configured (pretrain/cpu_allocator.py)
    cpu_allocator: str = "reuse"
    allow_oversubscribe: bool = False  # start even when the memory estimate exceeds the device's memory
    # torch.profiler over steps profile_start .. profile_start + profile_steps - 1 (0: off): a Chrome trace
    # and a table of ops per rank under out_dir/profile/ (pretrain/profiling.py)
    profile_start: int = 0
    profile_steps: int = 3
    # Weights & Biases (pip install wandb): the TensorBoard scalars also to this project ("": off), one
    # run per out_dir, continued on resume. WANDB_MODE=offline where nodes have no internet (then wandb sync)
    wandb_project: str = ""
    wandb_entity: str = ""  # team or user (default: the logged-in account's)
    wandb_name: str = ""  # run name (default: the out_dir's folder name)


PP_SCHEDULES = ("1f1b", "interleaved", "gpipe")


@dataclass
class ParallelConfig:
    """The layout: world = tp · pp · sp · dp, with dp what remains (parallel/mesh.py)."""

    tp: int = 1  # tensor parallel: heads, FFN and vocabulary split over tp ranks (parallel/tensor.py)
    pp: int = 1  # pipeline parallel: contiguous groups of blocks per stage (parallel/pipeline.py)
    sp: int = 1  # sequence parallel: sequences split over sp ranks, memory relayed (parallel/sequence.py)
    # with sp: how a sequence is split. "contiguous": a slice per rank, what the memory's relay needs;
    # "zigzag": two of 2·sp pieces per rank, an early and a late one, so that causal full attention costs
    # every rank the same (models of attention layers only); "auto": zigzag where every layer is attention
    # and one is full, else contiguous
    sp_split: str = "auto"
    # 0: plain data parallel (DDP); 1, 2, 3: ZeRO sharding optimizer states (1), + gradients (2),
    # + parameters (3) over the data-parallel ranks (parallel/zero.py); with tp or pp > 1, stage 1 only
    zero_stage: int = 0
    # shard parameters, gradients and AdamW state over the data-parallel ranks with torch's FSDP2 (what
    # ZeRO-3 shards; parallel/fsdp.py): with tp, pp and sp too, and with train.compile
    fsdp: bool = False
    # with fsdp: shard over groups of this many consecutive dp ranks (within a node) and replicate across
    # the groups, HSDP (0: shard over every dp rank); must divide dp
    fsdp_shard: int = 0
    # with fsdp, how checkpoints are written: "gathered" (rank 0 of each tp shard / stage writes the whole
    # state, the files of the same run without FSDP) or "sharded" (every rank writes its own slice, in
    # parallel, none holds more than its slice; tools join the slices when they read them)
    fsdp_checkpoint: str = "gathered"
    # with fsdp: the dtype each block's parameters are gathered in for compute, "float32" or "bfloat16"
    # (half the bytes of every gather; "auto": bfloat16 when train.precision is bf16); the shards, AdamW
    # and the memory's state stay float32
    fsdp_param_dtype: str = "auto"
    # with fsdp: the dtype gradients are reduce-scattered in, "float32" or "bfloat16" (half the bytes)
    fsdp_reduce_dtype: str = "float32"
    # with fsdp: when a block's gathered parameters are freed. "always": after its forward (gathered again
    # for its backward); "never": after its backward (one all-gather a block and step instead of two, for
    # the memory of the whole model gathered at once); "default": always, except the last block (its
    # backward follows at once) and under a pipeline (every micro-batch would gather again), as torchtitan
    fsdp_reshard: str = "default"
    pp_schedule: str = "1f1b"  # 1f1b, interleaved (several stages per rank) or gpipe
    pp_microbatches: int = 0  # micro-batches per step and pipeline (0: 2·pp); must divide data.batch_size
    pp_stages_per_rank: int = 2  # with pp_schedule: interleaved (virtual stages)
    # a collective that waits longer fails the run naming it, instead of hanging until the job's time
    # limit (a rank that stalls rather than dies); long enough for a checkpoint of a large model
    comm_timeout_s: int = 600


@dataclass
class RunConfig:
    model: TitansConfig = field(default_factory=TitansConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for section in SECTIONS:
            obj = getattr(self, section)
            out[section] = {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
        return out


SECTIONS = ("model", "data", "train", "parallel")
MOVED = {"train.zero_stage": "parallel.zero_stage"}  # keys that moved: an error says where


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


class ConfigError(ValueError):
    """A bad configuration: the message names the field or file."""


def _is_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return False
    try:
        float(value)
    except ValueError:
        return False
    return True


def _type_name(annotation: Any) -> str:
    """`float`, not `<class 'float'>`; generics (tuple[float, float]) print well as they are."""
    return annotation.__name__ if isinstance(annotation, type) else str(annotation)


def _coerce(path: str, value: Any, annotation: Any) -> Any:
    """Check/convert one YAML value against a resolved dataclass field type."""
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    if isinstance(value, str) and value.lower() == "none" and type(None) in options:
        value = None  # a Python user's null on the command line, not a path or name called "none"
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{path}: null is not allowed (expected {_type_name(annotation)})")
    for option in options:
        if option is type(None):
            continue
        origin = typing.get_origin(option)
        if origin is tuple and typing.get_args(option)[-1] is Ellipsis:  # any length; "a,b" too
            items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
            items = items if isinstance(items, (list, tuple)) else [items]  # one item without a list
            return tuple(_coerce(path, v, typing.get_args(option)[0]) for v in items)
        elif origin is tuple:  # fixed length; "a,b" too
            args = typing.get_args(option)
            items = [v.strip() for v in value.split(",")] if isinstance(value, str) else value
            if isinstance(items, (list, tuple)) and len(items) == len(args):
                return tuple(_coerce(path, v, a) for v, a in zip(items, args))
        elif option is float and _is_number(value):  # YAML 1.1 reads 3e-3 as a string
            return float(value)
        elif option is int and isinstance(value, str) and value.strip().lstrip("+-").isdecimal():
            return int(value)  # an item of "a,b" on the command line
        elif (option is int and isinstance(value, int) and not isinstance(value, bool)) or (
            option in (bool, str) and isinstance(value, option)
        ):
            return value
    raise ConfigError(f"{path}: {value!r} is not a valid {_type_name(annotation)}")


def _build(section: str, cls: type, values: dict[str, Any]) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{section}: expected a mapping, got {values!r}")
    valid = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in values:
        if f"{section}.{key}" in MOVED:
            raise ConfigError(f"{section}.{key} has moved: write {MOVED[f'{section}.{key}']} instead")
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ConfigError(f"{section}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(valid)}")
    hints = typing.get_type_hints(cls)
    kwargs = {k: _coerce(f"{section}.{k}", v, hints[k]) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except ValueError as err:  # the model config validates itself and names the field
        raise ConfigError(f"{section}: {err}") from err


def _apply_override(tree: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected section.key=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or parts[0] not in SECTIONS:
        raise ConfigError(f"override {override!r}: key must be section.key with section one of "
                          f"{', '.join(SECTIONS)}")
    tree.setdefault(parts[0], {})[parts[1]] = yaml.safe_load(raw)


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys without a word: `lr` given twice in a file would train
    with whichever came second. This loader refuses them, naming the key and its line."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise ConfigError(f"key {key!r} appears twice (lines {seen[key]} and {line})")
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def read_yaml(path: Path) -> Any:
    """A YAML file; invalid YAML and duplicate keys are ConfigErrors naming the file (and key and lines)."""
    try:
        with open(path) as handle:  # a stream, so that YAML's errors name the file
            return yaml.load(handle, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None


def read_config_tree(path: str | Path, within: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file's sections over those of the file its `base:` names (relative to it; a chain of
    them), key by key: a variant says only what differs from a shared config."""
    path = Path(path)
    where = f" (the base: of {within[-1]})" if within else ""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist{where}")
    if path.resolve() in within:
        raise ConfigError(f"config file {path}: its base: chain comes back to it ("
                          + " → ".join(str(p) for p in (*within, path.resolve())) + ")")
    tree = read_yaml(path) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path}: expected a mapping of {'/'.join(SECTIONS)} sections")
    base = tree.pop("base", None)
    if base is None:
        return tree
    if not isinstance(base, str):
        raise ConfigError(f"config file {path}: base: must name a config file, got {base!r}")
    merged = read_config_tree(path.parent / base, (*within, path.resolve()))
    for section, values in tree.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **values}
        else:
            merged[section] = values
    return merged


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML file (and its base: files; or start from defaults when path is None), apply overrides,
    validate."""
    return build_config(read_config_tree(path) if path is not None else {}, overrides)


def build_config(tree: dict[str, Any], overrides: list[str] = ()) -> RunConfig:
    """A run config from its {model, data, train, parallel} mapping (e.g. a checkpoint's), overrides
    applied, validated."""
    tree = {section: dict(values) if isinstance(values, dict) else values for section, values in tree.items()}
    unknown = sorted(set(tree) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown section(s) {', '.join(unknown)}; valid sections: {', '.join(SECTIONS)}")
    for override in overrides:
        _apply_override(tree, override)
    cfg = RunConfig(
        model=_build("model", TitansConfig, tree.get("model", {})),
        data=_build("data", DataConfig, tree.get("data", {})),
        train=_build("train", TrainConfig, tree.get("train", {})),
        parallel=_build("parallel", ParallelConfig, tree.get("parallel", {})),
    )
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Cross-field checks that no single dataclass can make."""
    t, d = cfg.train, cfg.data
    positive = {"train.steps": t.steps, "train.grad_accum": t.grad_accum, "data.seq_len": d.seq_len,
                "data.batch_size": d.batch_size, "train.log_every": t.log_every,
                "train.checkpoint_every": t.checkpoint_every,
                "train.keep_last": t.keep_last, "train.max_nonfinite_steps": t.max_nonfinite_steps}
    for name, value in positive.items():
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if t.profile_start < 0 or t.profile_steps < 1:
        raise ConfigError(f"train.profile_start must be >= 0 (0: no profile) and train.profile_steps >= 1, "
                          f"got {t.profile_start} and {t.profile_steps}")
    if t.profile_start and t.profile_start + t.profile_steps - 1 > t.steps:
        raise ConfigError(f"train.profile_start={t.profile_start} with train.profile_steps={t.profile_steps} "
                          f"profiles past train.steps={t.steps}")
    if t.eval_every < 0:
        raise ConfigError(f"train.eval_every must be >= 0 (0: no validation), got {t.eval_every}")
    validate_eval_tasks(cfg)
    if t.precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"train.precision must be auto, fp32 or bf16, got {t.precision!r}")
    if t.fp32_matmul not in ("ieee", "tf32"):
        raise ConfigError(f"train.fp32_matmul must be ieee or tf32, got {t.fp32_matmul!r}")
    if t.cpu_allocator not in CPU_ALLOCATORS:
        raise ConfigError(f"train.cpu_allocator must be one of {', '.join(CPU_ALLOCATORS)}, "
                          f"got {t.cpu_allocator!r}")
    if t.compile:
        validate_compile(cfg)
    if t.wandb_project and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"train.wandb_project={t.wandb_project!r} needs Weights & Biases: pip install "
                          "wandb (or pip install -e '.[wandb]')")
    if not 0 <= t.warmup_steps < t.steps:
        raise ConfigError(f"train.warmup_steps={t.warmup_steps} must be in [0, train.steps={t.steps})")
    if not 0 <= t.min_lr_ratio <= 1:
        raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
    if t.lr_decay not in DECAY_SHAPES:
        hint = (" (warmup-stable-decay is a fraction below 1: e.g. train.lr_decay=sqrt "
                "train.lr_decay_fraction=0.2)") if t.lr_decay.lower() == "wsd" else ""
        raise ConfigError(f"train.lr_decay must be one of {', '.join(DECAY_SHAPES)}, "
                          f"got {t.lr_decay!r}{hint}")
    if not 0 < t.lr_decay_fraction <= 1:
        raise ConfigError(f"train.lr_decay_fraction must be in (0, 1] (the last fraction of train.steps over "
                          f"which the lr decays; train.lr_decay=none for none), got {t.lr_decay_fraction}")
    if t.activation_checkpointing_every < 1:
        raise ConfigError(f"train.activation_checkpointing_every must be >= 1 (1: every block), got "
                          f"{t.activation_checkpointing_every}")
    p = cfg.parallel
    if t.async_checkpoint and p.zero_stage and p.tp * p.pp * p.sp == 1:
        raise ConfigError(f"train.async_checkpoint with parallel.zero_stage={p.zero_stage}: DeepSpeed writes "
                          "its own checkpoint, with collectives inside, so it cannot run in the background; "
                          "set train.async_checkpoint=false, or parallel.fsdp=true instead of ZeRO")
    if t.keep_every < 0 or (t.keep_every and t.keep_every % t.checkpoint_every):
        raise ConfigError(f"train.keep_every={t.keep_every} must be 0 (none) or a multiple of "
                          f"train.checkpoint_every={t.checkpoint_every} (it keeps checkpoints written)")
    outside = [s for s in t.checkpoint_at if not 0 < s <= t.steps]
    if outside:
        raise ConfigError(f"train.checkpoint_at: step(s) {outside} outside 1..train.steps={t.steps}")
    if t.lr <= 0:
        raise ConfigError(f"train.lr must be > 0, got {t.lr}")
    nonnegative = {"train.weight_decay": t.weight_decay, "train.grad_clip": t.grad_clip,
                   "train.threads": t.threads, "data.num_workers": d.num_workers,
                   "data.shuffle_buffer": d.shuffle_buffer, "data.max_corrupt_shards": d.max_corrupt_shards,
                   "parallel.pp_microbatches": cfg.parallel.pp_microbatches}
    for name, value in nonnegative.items():
        if value < 0:
            raise ConfigError(f"{name} must be >= 0, got {value}")
    if not all(0 <= beta < 1 for beta in t.betas):
        raise ConfigError(f"train.betas must both be in [0, 1) (AdamW's moment decays), got {t.betas}")
    if t.eval_every and t.eval_batches < 1:
        raise ConfigError(f"train.eval_batches must be >= 1 when train.eval_every={t.eval_every} validates "
                          f"(train.eval_every=0 turns validation off), got {t.eval_batches}")
    if not 0 <= d.synthetic_rows < d.batch_size:
        raise ConfigError(f"data.synthetic_rows must be in [0, data.batch_size={d.batch_size}) (at least one "
                          f"text sequence per batch), got {d.synthetic_rows}")
    if not 0 <= d.repeat_rows <= d.batch_size - d.synthetic_rows:
        raise ConfigError(f"data.repeat_rows must be in [0, {d.batch_size - d.synthetic_rows}] (the text "
                          f"rows of a batch), got {d.repeat_rows}")
    if d.repeat_rows and not (d.repeat_passage >= 1 and d.repeat_min_gap >= 0
                              and 2 * d.repeat_passage + d.repeat_min_gap <= d.seq_len + 1):
        raise ConfigError(f"data.repeat_passage={d.repeat_passage} twice plus data.repeat_min_gap="
                          f"{d.repeat_min_gap} must fit a row of data.seq_len + 1 = {d.seq_len + 1} tokens "
                          "(passage >= 1, gap >= 0)")
    names = [Path(v).name for v in d.val_sets]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"data.val_sets: two datasets in folders named {', '.join(twice)}; each is logged "
                          "under its folder's name (val/<name>/loss), so the names must differ")
    if d.val_sets and not cfg.train.eval_every:
        raise ConfigError("data.val_sets is validated at every validation, and train.eval_every=0 turns "
                          "validation off")
    if d.mix_weights and len(d.mix_weights) != 1 + len(d.mix):
        raise ConfigError(f"data.mix_weights has {len(d.mix_weights)} weight(s), for data.train and "
                          f"data.mix's {len(d.mix)} dataset(s) it needs {1 + len(d.mix)}")
    if not all(w > 0 for w in d.mix_weights):
        raise ConfigError(f"data.mix_weights must all be > 0, got {d.mix_weights}")
    if d.repeat_weight <= 0:
        raise ConfigError(f"data.repeat_weight must be > 0 (the copy targets' loss weight), "
                          f"got {d.repeat_weight}")
    if d.synthetic_sequences < 0:
        raise ConfigError(f"data.synthetic_sequences must be >= 0, got {d.synthetic_sequences}")
    if d.synthetic_sequences:
        validate_synthetic_sequences(cfg)
    if d.synthetic_alone_steps and not d.synthetic_sequences:
        raise ConfigError(f"data.synthetic_alone_steps={d.synthetic_alone_steps} trains separate synthetic "
                          "sequences alone: it needs data.synthetic_sequences > 0")
    if d.synthetic_alone_steps < 0:
        raise ConfigError(f"data.synthetic_alone_steps must be >= 0, got {d.synthetic_alone_steps}")
    if d.synthetic_rows or d.synthetic_sequences:
        from pretrain import synthetic

        try:
            shortest, _ = synthetic.training_distances(d.synthetic_task, d.seq_len + 1,
                                                       d.synthetic_min_distance, d.synthetic_pairs)
            synthetic.TokenSpace.for_vocab(cfg.model.vocab_size)
        except ValueError as err:
            raise ConfigError(f"data.synthetic_task / data.seq_len / model.vocab_size: {err}") from err
        if d.synthetic_weight <= 0:
            raise ConfigError(f"data.synthetic_weight must be > 0, got {d.synthetic_weight}")
        if d.synthetic_max_distance and d.synthetic_max_distance < shortest:
            raise ConfigError(f"data.synthetic_max_distance={d.synthetic_max_distance} is below the shortest "
                              f"distance {shortest} (data.synthetic_min_distance)")
    validate_parallel(cfg)


def validate_compile(cfg: RunConfig) -> None:
    """train.compile with the layouts it is tested under: one process, data parallel, ZeRO-1/2, tp, pp, sp."""
    p = cfg.parallel
    if p.zero_stage == 3:
        raise ConfigError(f"train.compile with parallel.zero_stage={p.zero_stage} is not supported (ZeRO-3's "
                          "parameter hooks are not compiled yet): set train.compile=false or "
                          "parallel.zero_stage to 0, 1 or 2")
    if cfg.train.compile_backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise ConfigError("train.compile_backend must be a torch.compile backend (e.g. inductor, "
                          f"aot_eager), got {cfg.train.compile_backend!r}")


def splitting_fields(p: ParallelConfig, zero_stages: tuple[int, ...]) -> list[str]:
    """The layout fields, as `parallel.tp=2`, under which a rank does not run whole batches through the
    whole model: tp, pp or sp > 1, or a ZeRO stage among `zero_stages`."""
    fields = [f"parallel.{k}={getattr(p, k)}" for k in ("tp", "pp", "sp") if getattr(p, k) > 1]
    return fields + ([f"parallel.zero_stage={p.zero_stage}"] if p.zero_stage in zero_stages else [])


def validate_synthetic_sequences(cfg: RunConfig) -> None:
    """data.synthetic_sequences runs a second, shorter batch through the model in each step: one way to
    mix synthetic tasks in, and a layout where one rank runs a whole batch."""
    d, p = cfg.data, cfg.parallel
    if d.synthetic_rows:
        raise ConfigError(f"data.synthetic_sequences={d.synthetic_sequences} and data.synthetic_rows="
                          f"{d.synthetic_rows}: choose one way to mix synthetic tasks in")
    if d.synthetic_pack:
        raise ConfigError("data.synthetic_pack packs rows of the batch; data.synthetic_sequences holds one "
                          "instance per sequence: unset one of them")
    split = splitting_fields(p, zero_stages=(1, 2, 3))
    if split:
        raise ConfigError(f"data.synthetic_sequences runs a second batch per step, which {', '.join(split)} "
                          "does not schedule: use data.synthetic_rows")


def validate_eval_tasks(cfg: RunConfig) -> None:
    """train.eval_tasks runs the whole model on each rank between steps: known tasks, a validation to run
    them at, and a layout where every rank holds the whole model."""
    t, p = cfg.train, cfg.parallel
    if not t.eval_tasks:
        return
    unknown = sorted(set(t.eval_tasks) - {"needle", "mqar"})
    if unknown:
        raise ConfigError(f"train.eval_tasks: unknown task(s) {', '.join(unknown)}; choose from needle, mqar")
    if t.eval_every == 0:
        raise ConfigError("train.eval_tasks runs at every validation, and train.eval_every=0 turns "
                          "validation off: set train.eval_every")
    if not t.eval_task_distances or min(t.eval_task_distances) <= 0:
        raise ConfigError(f"train.eval_task_distances must be positive multiples of the attention span, got "
                          f"{list(t.eval_task_distances)}")
    if t.eval_task_samples < 1:
        raise ConfigError(f"train.eval_task_samples must be >= 1, got {t.eval_task_samples}")
    if t.eval_task_pairs < 0:
        raise ConfigError(f"train.eval_task_pairs must be >= 1 (or 0: data.synthetic_pairs), got "
                          f"{t.eval_task_pairs}")
    split = splitting_fields(p, zero_stages=(3,))  # (FSDP gathers the model for them)
    if split:
        raise ConfigError(f"train.eval_tasks needs the whole model on every rank, and {', '.join(split)} "
                          "splits it: evaluate the checkpoints instead "
                          "(python -m pretrain.evaluate --tasks mqar)")


def validate_sequence_parallel(cfg: RunConfig) -> None:
    """sp > 1: equal micro-batches under a pipeline, shards aligned to chunks and MAC segments, and
    windows within a shard."""
    p, m = cfg.parallel, cfg.model
    if p.pp > 1:
        microbatches = p.pp_microbatches or 2 * p.pp
        if cfg.data.batch_size % microbatches:
            raise ConfigError(f"data.batch_size={cfg.data.batch_size} does not split into "
                              f"parallel.pp_microbatches={microbatches} equal micro-batches (sequence "
                              "parallelism fixes the stages' shapes up front)")
    if p.sp_split not in SP_SPLITS:
        raise ConfigError(f"parallel.sp_split={p.sp_split!r}: use {', '.join(SP_SPLITS)}")
    if p.sp_split == "zigzag" and not set(m.layer_kinds) <= ATTENTION_ONLY:
        memory = sorted(set(m.layer_kinds) - ATTENTION_ONLY)
        raise ConfigError(f"parallel.sp_split=zigzag needs attention layers only, and model.layers has "
                          f"{', '.join(memory)}: the memory's state is relayed from shard to shard in "
                          "sequence order, which needs contiguous shards (parallel.sp_split=contiguous)")
    if zigzag_split(m.layer_kinds, p.sp_split):
        if cfg.data.seq_len % (2 * p.sp):
            raise ConfigError(f"data.seq_len={cfg.data.seq_len} does not split into 2·parallel.sp = "
                              f"{2 * p.sp} equal zigzag pieces: use a multiple of it (or "
                              "parallel.sp_split=contiguous)")
        return  # every rank gathers the rows its pieces read: no window or chunk constraint
    align = math.lcm(m.memory_chunk, m.segment_len) if "mac" in m.layer_kinds else m.memory_chunk
    unit = align * p.sp
    shard = cfg.data.seq_len // p.sp
    if {"swa", "mag", "mal"} & set(m.layer_kinds) and m.window - 1 > shard:
        raise ConfigError(f"model.window={m.window} reaches past the previous sequence shard "
                          f"(data.seq_len / parallel.sp = {shard} tokens): lower parallel.sp or model.window")
    if cfg.data.seq_len % unit:
        below, above = cfg.data.seq_len // unit * unit, (cfg.data.seq_len // unit + 1) * unit
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} does not split into {p.sp} shards of whole "
                          f"memory chunks ({m.memory_chunk})" + (f" and MAC segments ({m.segment_len})"
                                                                 if "mac" in m.layer_kinds else "")
                          + f": use a multiple of {unit}, e.g. {below or above} or {above}")


def validate_parallel(cfg: RunConfig) -> None:
    """Layout checks that need no process group (the world size is checked by parallel.mesh)."""
    p, m = cfg.parallel, cfg.model
    for name in ("tp", "pp", "sp", "pp_stages_per_rank"):
        if getattr(p, name) < 1:
            raise ConfigError(f"parallel.{name} must be >= 1, got {getattr(p, name)}")
    if p.fsdp and p.zero_stage:
        raise ConfigError(f"parallel.fsdp=true and parallel.zero_stage={p.zero_stage} both shard over the "
                          "data-parallel ranks: choose one (FSDP shards what ZeRO-3 does; set "
                          "parallel.zero_stage=0 with it)")
    if p.fsdp_shard < 0 or (p.fsdp_shard and not p.fsdp):
        raise ConfigError(f"parallel.fsdp_shard={p.fsdp_shard} must be >= 0 and needs parallel.fsdp=true "
                          "(the number of dp ranks each sharded copy spans; 0: all of them)")
    if p.fsdp_checkpoint not in ("gathered", "sharded"):
        raise ConfigError(f"parallel.fsdp_checkpoint={p.fsdp_checkpoint!r}: use gathered or sharded")
    if p.fsdp_reshard not in ("default", "always", "never"):
        raise ConfigError(f"parallel.fsdp_reshard={p.fsdp_reshard!r}: use default, always or never")
    for name, allowed in (("fsdp_param_dtype", ("float32", "bfloat16", "auto")),
                          ("fsdp_reduce_dtype", ("float32", "bfloat16"))):
        value = getattr(p, name)
        if value not in allowed:
            raise ConfigError(f"parallel.{name}={value!r}: use {', '.join(allowed)}")
    if p.fsdp_param_dtype == "bfloat16" and cfg.train.precision == "fp32":
        raise ConfigError("parallel.fsdp_param_dtype=bfloat16 needs train.precision=bf16 (or auto on a GPU): "
                          "float32 compute would mix float32 activations with bfloat16 weights")
    if p.sp > 1:
        validate_sequence_parallel(cfg)
    if p.comm_timeout_s < 1:
        raise ConfigError(f"parallel.comm_timeout_s must be >= 1 second, got {p.comm_timeout_s}")
    if p.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"parallel.zero_stage must be 0 (plain data parallel), 1, 2 or 3 (ZeRO), "
                          f"got {p.zero_stage}")
    if p.zero_stage > 1 and p.tp * p.pp > 1:
        raise ConfigError(f"parallel.zero_stage={p.zero_stage} with tp={p.tp}, pp={p.pp}: ZeRO-2/3 run with "
                          "pure data parallelism only; use parallel.zero_stage=1 (or 0) with tp / pp")
    if p.tp > 1:
        for name in ("n_heads", "memory_heads"):  # the vocabulary is padded to a multiple of tp instead
            if getattr(m, name) % p.tp:
                raise ConfigError(f"model.{name}={getattr(m, name)} is not divisible by parallel.tp={p.tp}: "
                                  f"change model.{name} or parallel.tp")
    if p.pp_schedule not in PP_SCHEDULES:
        raise ConfigError(f"parallel.pp_schedule must be one of {', '.join(PP_SCHEDULES)}, got "
                          f"{p.pp_schedule!r}")
    if p.pp > 1:
        stages = p.pp * (p.pp_stages_per_rank if p.pp_schedule == "interleaved" else 1)
        if m.n_layers % stages:
            raise ConfigError(f"model.n_layers={m.n_layers} does not split into {stages} pipeline stages "
                              f"(parallel.pp={p.pp}" + (f" × pp_stages_per_rank={p.pp_stages_per_rank}"
                                                        if p.pp_schedule == "interleaved" else "")
                              + "): change model.n_layers or parallel.pp")
        micro = p.pp_microbatches or 2 * p.pp
        if cfg.data.batch_size % micro:
            raise ConfigError(f"data.batch_size={cfg.data.batch_size} is not divisible by "
                              f"parallel.pp_microbatches={micro}: change one of them")
        if p.pp_schedule != "gpipe" and micro < p.pp:
            raise ConfigError(f"parallel.pp_microbatches={micro} < parallel.pp={p.pp}: 1F1B schedules need "
                              "at least one micro-batch per stage")
