"""Token embedding and LM head, split over tensor-parallel ranks by vocabulary rows.

Rank r holds vocabulary rows r*V/tp .. (r+1)*V/tp. The embedding looks up the ids it owns, zeroes
the rest and sums across ranks; the head computes its slice of the logits and gathers them. With
tied embeddings the model points the head's weight at the embedding's, so both share one tensor.
Built inside fastgen.quantization.building("gguf"), the table keeps a GGUF file's quantized rows
(the default model's tied Q8_0 table): the lookup dequantizes the rows it needs and the head
runs the quantized matmul.

Shape letters: T tokens, B sequences, H hidden, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastgen import quantization
from fastgen.distributed import SINGLE_RANK, TensorParallelGroup
from fastgen.layers.linear import linear, store_rows, weight_shape
from fastgen.layers.parameter import ShardId, set_weight_attrs
from fastgen.quantization import QuantizedParameter, dequantized_rows, quantized_linear


class VocabParallelEmbedding(nn.Module):
    """ids -> rows of the embedding table.   weight: [V_local, H]"""

    def __init__(self, num_embeddings: int, embedding_dim: int,
                 tp: TensorParallelGroup = SINGLE_RANK):
        super().__init__()
        if num_embeddings % tp.size:
            raise ValueError(f"vocabulary ({num_embeddings}) does not split over tensor-parallel "
                             f"size {tp.size}")
        self.tp = tp
        self.num_embeddings = num_embeddings
        self.rows_per_rank = num_embeddings // tp.size
        self.vocab_start = tp.rank * self.rows_per_rank
        self.params_dtype = torch.get_default_dtype()
        if quantization.current_method() == "gguf":
            self.weight = QuantizedParameter(self.rows_per_rank, embedding_dim, "gguf")
        else:
            self.weight = nn.Parameter(torch.empty(self.rows_per_rank, embedding_dim),
                                       requires_grad=False)
        set_weight_attrs(self.weight, self.weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: ShardId = None, expert_id: int | None = None) -> None:
        """Copies this rank's rows of the full table.
        param: [V_local, H]; loaded_weight: [V, H]"""
        hidden = weight_shape(param)[1]
        if tuple(loaded_weight.shape) != (self.num_embeddings, hidden):
            raise ValueError(f"checkpoint tensor has shape {tuple(loaded_weight.shape)}, the "
                             f"embedding expects ({self.num_embeddings}, {hidden})")
        store_rows(param, loaded_weight.narrow(0, self.vocab_start, self.rows_per_rank))

    def process_weights_after_loading(self) -> None:
        if isinstance(self.weight, QuantizedParameter):
            self.weight.finalize(self.params_dtype)

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        if isinstance(self.weight, QuantizedParameter):
            return dequantized_rows(self.weight.packed, ids, self.params_dtype)
        return F.embedding(ids, self.weight)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: [T] int64 -> [T, H]"""
        if self.tp.size == 1:
            return self._lookup(input_ids)
        owned = (input_ids >= self.vocab_start) & (input_ids < self.vocab_start + self.rows_per_rank)
        local_ids = torch.where(owned, input_ids - self.vocab_start, 0)
        y = self._lookup(local_ids)
        y = y * owned.unsqueeze(-1).to(y.dtype)
        return self.tp.all_reduce(y)


class ParallelLMHead(VocabParallelEmbedding):
    """hidden -> logits over the vocabulary, in float32.   weight: [V_local, H]"""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [B, H] -> [B, V] float32"""
        # float32 straight from the matmul where the CPU kernel runs: no bf16 rounding of logits
        if isinstance(self.weight, QuantizedParameter):
            logits = quantized_linear(hidden, self.weight.packed, out_dtype=torch.float32)
        else:
            logits = linear(hidden, self.weight, out_dtype=torch.float32)  # [B, V_local]
        return self.tp.all_gather(logits, dim=-1).float()
