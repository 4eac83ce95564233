"""Hugging Face configuration of a Titans model exported by `python -m pretrain.convert --to hf`.

The model's own fields live under `titans` exactly as `TitansConfig` takes them, so this file never
has to follow the model's changes.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig


class TitansHFConfig(PretrainedConfig):
    model_type = "titans"

    def __init__(self, titans: dict[str, Any] | None = None, use_cache: bool = True, **kwargs: Any) -> None:
        self.titans = dict(titans or {})
        self.use_cache = use_cache  # generate() carries a TitansCache
        kwargs.setdefault("tie_word_embeddings", self.titans.get("tie_embeddings", True))
        kwargs.setdefault("vocab_size", self.titans.get("vocab_size"))
        super().__init__(**kwargs)
