"""Hugging Face wrapper of a Titans model exported by `python -m pretrain.convert --to hf`.

The model code beside this file (model.py, blocks.py, memory.py, attention.py, streaming.py) is the
training stack's own, copied at export, so the export needs only torch and transformers. `generate()`
carries a `TitansCache`: each layer's memory state, its attention window and the open chunk, so text of
any length is generated with constant memory and equals the model run on the whole text. A padded batch
(an attention mask with zeros, left or right) is run row by row's tokens: padding is never seen, so each
row equals its prompt run alone; rows of one length still run as one batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_titans import TitansHFConfig
from .model import TitansConfig, TitansLM
from .streaming import RowGroups, ragged_step


class TitansCache(Cache):
    """transformers' handle on the streams of a batch's rows (`RowGroups`: it has no per-layer key/value
    tensors to expose)."""

    is_compileable = False
    is_croppable = False

    def __init__(self, rows: RowGroups | None = None) -> None:
        super().__init__(layers=[])
        self.rows = rows

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.rows is None else self.rows.columns  # positions consumed, padding included

    def _select(self, source: list[int]) -> None:
        if self.rows is not None:
            self.rows = self.rows.select(source)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(beam_idx.tolist())

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select([row for row in range(self.rows.batch) for _ in range(repeats)] if self.rows else [])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(torch.arange(self.rows.batch)[indices].tolist() if self.rows else [])


class TitansForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = TitansHFConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    _tied_weights_keys = {"model.head.weight": "model.embed.weight"}

    def __init__(self, config: TitansHFConfig) -> None:
        super().__init__(config)
        self.model = TitansLM(TitansConfig(**config.titans))
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # forward builds its own TitansCache

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Every weight is in the checkpoint; nothing to draw."""

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.head

    def forward(self, input_ids: torch.LongTensor, cache: TitansCache | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, **kwargs: Any) -> CausalLMOutputWithPast:
        """Logits of `input_ids`, the continuation of what `cache` has seen. Where `attention_mask` (its last
        `input_ids.shape[1]` columns) is 0 the token is padding, never seen by the row: without gradients
        only (in training the memory would write the padded positions; batch equal lengths there)."""
        keep = None if attention_mask is None else attention_mask[:, -input_ids.shape[1] :].bool()
        padded = keep is not None and not bool(keep.all())
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if cache is not None or padded or (use_cache and not torch.is_grad_enabled()):
            if padded and torch.is_grad_enabled():
                raise ValueError("TitansForCausalLM runs padding (attention_mask with zeros) without "
                                 "gradients only: the long-term memory would learn the padded positions; "
                                 "train on equal lengths")
            logits, rows = ragged_step(self.model, input_ids, keep if padded else None,
                                       None if cache is None else cache.rows)
            cache = TitansCache(rows)
        else:
            logits, _ = self.model(input_ids)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)
