"""Write a Hugging Face model directory that loads where this project is not installed.

    dir/config.json               TitansHFConfig, with `auto_map` to the two files below
    dir/configuration_titans.py   (from pretrain/hf_template/)
    dir/modeling_titans.py        TitansForCausalLM, TitansCache (from pretrain/hf_template/)
    dir/{model,blocks,memory,attention,streaming}.py   titans/ itself, imports made relative
    dir/model.safetensors         the weights, keys prefixed `model.` (a tied head stored once)
    dir/generation_config.json    greedy by default, the end-of-document id
    dir/tokenizer.json, tokenizer_config.json, ...   the run's tokenizer (byte-level: built here)
    dir/README.md                 the model card: what the model is, its training, how to load it

Copying `titans/` rather than maintaining a second model file keeps one source of truth: the export
runs the very code that was trained.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import titans
from titans.model import TitansConfig

TEMPLATE = Path(__file__).with_name("hf_template")
TITANS = Path(titans.__file__).parent
MODEL_SOURCES = ("attention", "memory", "blocks", "model", "streaming")
WEIGHTS_FILE = "model.safetensors"
TRAINING_STATE = "training_state.pt"  # step, scheduler, data position of the source run (for resuming)


def relative_imports(source: str) -> str:
    """`from titans.x import y` → `from .x import y`: the export is a flat package of its own."""
    source = re.sub(r"^(\s*)from titans\.(\w+) import", r"\1from .\2 import", source, flags=re.M)
    if re.search(r"^\s*(import titans|from titans\b)", source, flags=re.M):
        raise RuntimeError("titans/ has an import the export cannot make relative")
    return source


def model_fields(cfg: TitansConfig) -> dict[str, Any]:
    return {name: getattr(cfg, name) for name in TitansConfig.field_names()}


def save_weights(weights: dict[str, Tensor], path: Path, tied: bool, prefix: str = "") -> None:
    """safetensors refuses tensors that share memory: a tied head is stored once, under the embedding."""
    from safetensors.torch import save_file

    tensors = {prefix + k: v.detach().to("cpu").contiguous() for k, v in weights.items()
               if not (tied and k == "head.weight")}
    save_file(tensors, str(path), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)  # safetensors creates its file 0600: readable by others as the rest are


def load_weights(path: Path, cfg: TitansConfig, prefix: str = "") -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises its own SafetensorError on a truncated or bad header
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from err
    weights = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if cfg.tie_embeddings and "embed.weight" in weights:
        weights["head.weight"] = weights["embed.weight"]
    return weights


def special_tokens(eos: str) -> dict[str, str]:
    """The end-of-document token, which also pads: the model never sees padding (each row of a padded batch
    is its own stream), and prompts are padded on the left, where generation wants them."""
    return {"eos_token": eos, "pad_token": eos, "padding_side": "left"}


def byte_tokenizer(eos_id: int):
    """The byte vocabulary (id = byte, `eos_id` = end of document) as a transformers fast tokenizer:
    a byte-level BPE without merges, so every byte is one token and decoding is lossless."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    by_byte = bytes_to_unicode()  # the printable stand-in the ByteLevel pre-tokenizer emits per byte
    vocab = {by_byte[b]: b for b in range(256)}
    vocab["<|endoftext|>"] = eos_id
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special_tokens("<|endoftext|>"))


def save_tokenizer(tokenizer: Any | None, eos_id: int | None, out: Path) -> str:
    """The run's tokenizer into `out` in transformers' format; returns what was written, in words."""
    if tokenizer is None:
        byte_tokenizer(256 if eos_id is None else eos_id).save_pretrained(str(out))
        return "byte-level tokenizer"
    path = getattr(tokenizer, "path", None)
    if path is not None and str(path).endswith(".json"):
        from transformers import PreTrainedTokenizerFast

        eos = tokenizer._tok.id_to_token(tokenizer.eos_id)
        PreTrainedTokenizerFast(tokenizer_file=str(path), **special_tokens(eos)).save_pretrained(str(out))
        return f"tokenizer {path}"
    return f"no tokenizer files (convert {path} to a tokenizer.json to include it)"


def model_card(cfg: TitansConfig, n_params: int, tokenizer_note: str,
               training_state: dict[str, Any] | None) -> str:
    """README.md of the export: the Hugging Face Hub shows it as the model card. What the model is, how
    it was trained (when the export carries the run's state) and how to load it."""
    memory = (f"an MLP of depth {cfg.memory_depth} per head ({cfg.memory_heads} heads of "
              f"{cfg.memory_head_dim}, hidden {cfg.memory_hidden}), updated every {cfg.memory_chunk} tokens")
    rows = [("blocks", cfg.layers + f" ({cfg.n_layers} layers)"), ("parameters", f"{n_params:,}"),
            ("width, heads", f"{cfg.dim}, {cfg.n_heads}"),
            ("attention window, MAC segment", f"{cfg.window}, {cfg.segment_len} tokens"),
            ("persistent memory tokens", str(cfg.n_persistent)), ("long-term memory", memory),
            ("vocabulary", f"{cfg.vocab_size:,}; {tokenizer_note}")]
    if training_state is not None and training_state.get("config"):
        run, layout = training_state["config"], training_state.get("layout") or {}
        data, train = run.get("data", {}), run.get("train", {})
        per_step = (data.get("batch_size", 0) * data.get("seq_len", 0) * train.get("grad_accum", 1)
                    * layout.get("dp", 1))
        step = training_state.get("step") or 0
        losses = training_state.get("losses") or []
        datasets = ", ".join([data.get("train", "?"), *data.get("mix", ())])  # a mixture names them all
        rows += [("trained", f"{step:,} steps of {per_step:,} tokens ({step * per_step:,} tokens) on "
                             f"{datasets}, sequences of {data.get('seq_len', '?')}"),
                 ("last training loss", f"{losses[-1]:.4f}" if losses else "-")]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [titans, neural-memory, long-context]
---

# Titans ({cfg.layers}, {n_params:,} parameters)

A Titans language model (Behrouz, Zhong, Mirrokni, *Titans: Learning to Memorize at Test Time*, arXiv
2501.00663): a long-term memory that is a small network trained at test time, by gradient descent with
momentum and weight decay, beside sliding-window attention and persistent memory tokens.

| | |
|---|---|
{table}

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

path = "."  # this folder, or its id on the Hub
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
ids = tokenizer("def main(", return_tensors="pt").input_ids
print(tokenizer.decode(model.generate(ids, max_new_tokens=64)[0]))
```

The model code is in this folder (`model.py`, `memory.py`, ...), so only torch and transformers are
needed. Generation carries each layer's memory state (`TitansCache`): memory use is constant in the
length of the text. Prompts of different lengths batch with padding (`tokenizer(prompts, padding=True,
return_tensors="pt")`, then `model.generate(**batch, ...)`): padded positions are never seen, so each row
generates what its prompt alone would. `training_state.pt`, when present, lets the training stack resume
the run from here.
"""


def export_hf(weights: dict[str, Tensor], cfg: TitansConfig, out: Path, tokenizer: Any | None,
              eos_id: int | None, training_state: dict[str, Any] | None = None) -> list[str]:
    """Write the directory (see the module docstring); returns notes for the user."""
    out.mkdir(parents=True, exist_ok=True)
    for name in MODEL_SOURCES:
        (out / f"{name}.py").write_text(relative_imports((TITANS / f"{name}.py").read_text()))
    for name in ("configuration_titans.py", "modeling_titans.py"):
        shutil.copyfile(TEMPLATE / name, out / name)
    config = {
        "architectures": ["TitansForCausalLM"],
        "model_type": "titans",
        "auto_map": {"AutoConfig": "configuration_titans.TitansHFConfig",
                     "AutoModelForCausalLM": "modeling_titans.TitansForCausalLM"},
        # the chunk step as "torch": the same function, and the export carries no kernels (titans/kernels)
        "titans": {**model_fields(cfg), "memory_kernel": "torch"},
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_embeddings,
        "eos_token_id": eos_id,
        "use_cache": True,
        "dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"do_sample": False, "eos_token_id": eos_id, "pad_token_id": eos_id}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    save_weights({k: v.float() for k, v in weights.items()}, out / WEIGHTS_FILE, cfg.tie_embeddings,
                 prefix="model.")
    notes = [save_tokenizer(tokenizer, eos_id, out)]
    n_params = sum(v.numel() for k, v in weights.items() if not (cfg.tie_embeddings and k == "head.weight"))
    (out / "README.md").write_text(model_card(cfg, n_params, notes[0], training_state))
    notes.append("README.md (model card)")
    if training_state is not None:
        torch.save(training_state, out / TRAINING_STATE)
        notes.append(f"training state at step {training_state['step']} ({TRAINING_STATE}, for resuming)")
    return notes
