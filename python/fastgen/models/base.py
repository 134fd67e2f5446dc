"""What every model class is given and what it provides: the contract between the engine and a
model family.

A model class is built as `ModelClass(hf_config, context)` under the target dtype and device and
provides:
- `forward(input_ids [T], positions [T], batch: ForwardBatch) -> hidden [T, H]`: one packed
  forward pass; attention layers read their cache views and metadata from `batch`;
- `compute_logits(hidden [B, H]) -> [B, V] float32`;
- `weight_mapping: WeightMapping`: how checkpoint names map onto its parameters
  (fastgen.loader.weights loads every model through it);
- attention layers (fastgen.layers.attention.AttentionLayer) numbered 0..L-1, each declaring its
  KV cache spec; optionally `process_weights_after_loading()` on any module.
The ModelContext carries what the model cannot read from its Hugging Face config: the engine's
context length (which sizes the rotary tables), the tensor-parallel group its layers shard over,
and the model's shared rotary embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fastgen.distributed import SINGLE_RANK, TensorParallelGroup
from fastgen.layers.rotary import RotaryEmbeddings


@dataclass
class ModelContext:
    max_model_len: int                     # the most positions a sequence reaches
    tp: TensorParallelGroup = SINGLE_RANK  # the ranks this model is sharded over
    rotary: RotaryEmbeddings = field(init=False, repr=False)  # one table per parameter set

    def __post_init__(self) -> None:
        if self.max_model_len < 1:
            raise ValueError(f"max_model_len must be at least 1, got {self.max_model_len}")
        self.rotary = RotaryEmbeddings(self.max_model_len)

    @classmethod
    def for_config(cls, hf_config, max_model_len: int | None = None,
                   tp: TensorParallelGroup = SINGLE_RANK) -> ModelContext:
        """A context of max_model_len positions (default the config's max_position_embeddings)."""
        return cls(max_model_len or int(hf_config.max_position_embeddings), tp)
