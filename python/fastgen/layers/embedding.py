"""Token embedding and LM head, split over tensor-parallel ranks by vocabulary rows.

Rank r holds vocabulary rows r*V/tp .. (r+1)*V/tp. The embedding looks up the ids it owns, zeroes
the rest and sums across ranks; the head computes its slice of the logits and gathers them. With
tied embeddings the model points the head's weight at the embedding's, so both share one tensor.

Shape letters: T tokens, B sequences, H hidden, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastgen.layers.linear import linear


class VocabParallelEmbedding(nn.Module):
    """ids -> rows of the embedding table.   weight: [V_local, H]"""

    def __init__(self, num_embeddings: int, embedding_dim: int, tp_rank: int = 0, tp_size: int = 1):
        super().__init__()
        if num_embeddings % tp_size:
            raise ValueError(f"vocabulary ({num_embeddings}) does not split over tensor-parallel "
                             f"size {tp_size}")
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.num_embeddings = num_embeddings
        self.rows_per_rank = num_embeddings // tp_size
        self.vocab_start = tp_rank * self.rows_per_rank
        self.weight = nn.Parameter(torch.empty(self.rows_per_rank, embedding_dim), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: str | int | None = None) -> None:
        """Copies this rank's rows of the full table.
        param: [V_local, H]; loaded_weight: [V, H]"""
        if loaded_weight.shape != (self.num_embeddings, param.shape[1]):
            raise ValueError(f"checkpoint tensor has shape {tuple(loaded_weight.shape)}, the "
                             f"embedding expects ({self.num_embeddings}, {param.shape[1]})")
        param.data.copy_(loaded_weight.narrow(0, self.vocab_start, self.rows_per_rank))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: [T] int64 -> [T, H]"""
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        owned = (input_ids >= self.vocab_start) & (input_ids < self.vocab_start + self.rows_per_rank)
        local_ids = torch.where(owned, input_ids - self.vocab_start, 0)
        y = F.embedding(local_ids, self.weight) * owned.unsqueeze(-1).to(self.weight.dtype)
        torch.distributed.all_reduce(y)
        return y


class ParallelLMHead(VocabParallelEmbedding):
    """hidden -> logits over the vocabulary, in float32.   weight: [V_local, H]"""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [B, H] -> [B, V] float32"""
        # float32 straight from the matmul where the CPU kernel runs: no bf16 rounding of logits
        logits = linear(hidden, self.weight, out_dtype=torch.float32)  # [B, V_local]
        if self.tp_size > 1:
            parts = [torch.empty_like(logits) for _ in range(self.tp_size)]
            torch.distributed.all_gather(parts, logits)
            logits = torch.cat(parts, dim=-1)
        return logits.float()
