"""`model:` — which base model the run fine-tunes, evaluates and serves."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from .base import Section


class TinyModelConfig(Section):
    """A Qwen2-architecture model with random weights and a tokenizer trained on the data.

    It stands in for a real base model where no hub can be reached (tests, the CPU demo).
    head_dim must be >= 64: vLLM's CPU attention kernels reject smaller heads.
    """

    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 688
    vocab_size: int = 4000
    max_position_embeddings: int = 1024
    tie_word_embeddings: bool = True
    seed: int = 0

    @field_validator("head_dim")
    @classmethod
    def _head_dim_supported(cls, v: int) -> int:
        if v < 64:
            raise ValueError("must be >= 64 (vLLM's CPU attention kernels reject smaller heads)")
        return v


class PretrainTextConfig(Section):
    """Which ingested text the tiny base is pre-trained on (``stage: pt``).

    Every value of ``fields`` in the rows of ``splits`` becomes its own plain-text document,
    never in the instruction or chat form. ``order: documents`` drops duplicates and shuffles
    the documents one by one (the base learns the vocabulary only); ``order: rows`` keeps each
    row's documents next to each other and shuffles whole rows (the base also sees a sentence
    followed by its meaning representation, as a real base has seen related text, but never
    the prompt format the adapter learns).
    """

    splits: list[str] = ["train"]
    fields: list[str] = ["input", "output"]
    order: Literal["documents", "rows"] = "documents"
    seed: int = 0


class ModelConfig(Section):
    """The base model.

    ``source`` is ``tiny`` (built locally from the ingested data), a Hugging Face id such as
    ``Qwen/Qwen2.5-7B-Instruct``, a local directory, or an ``s3://`` / ``gs://`` mirror.
    """

    source: str
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)
    # LLaMA-Factory keys for a short full-parameter training of a tiny base before the
    # LoRA stage (a random-weight base cannot be LoRA-tuned; real bases are pre-trained).
    pretrain: dict[str, Any] | None = None
    pretrain_text: PretrainTextConfig = Field(default_factory=PretrainTextConfig)
    # Copy the base model into <storage>/<run>/model/ so cluster nodes load it from the bucket.
    mirror: bool = False
    # A Hugging Face id's branch, tag or commit (default: main). The model stage resolves it to
    # the commit hash, records that in its manifest (an upstream change reruns the stage) and every
    # stage loads that commit.
    revision: str | None = None

    @model_validator(mode="after")
    def _revision_of_a_hub_id(self) -> ModelConfig:
        if self.revision is not None and not self.is_hub:
            raise ValueError("revision: only for a Hugging Face id (source is a local folder, a bucket or tiny)")
        return self

    @property
    def is_tiny(self) -> bool:
        return self.source == "tiny"

    @property
    def is_hub(self) -> bool:
        """A Hugging Face id (recipes make local paths absolute)."""
        return not self.is_tiny and "://" not in self.source and not self.source.startswith("/")
