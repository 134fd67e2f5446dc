"""Mixture-of-experts as a layer: E SwiGLU experts held in one fused layout for every family, the
router's choice of k experts per token, and the weighted sum of their outputs, through the moe op
family (fastgen.ops.moe_route, fastgen.ops.fused_moe).

Weights live as w13 [E, 2I, H] (each expert's gate rows, then its up rows, nn.Linear's layout)
and w2 [E, H, I], whatever the checkpoint stores: Mixtral's experts.{e}.w1 / w3 / w2, Qwen's and
DeepSeek's experts.{e}.gate_proj / up_proj / down_proj, Llama 4's fused and transposed
experts.gate_up_proj [E, H, 2I] / experts.down_proj [E, I, H] (the model's weight mapping
transposes those on the way in). Under tensor parallelism each rank keeps its slice of every
expert's intermediate dimension (I / tp rows of gate and up, columns of down), so one all-reduce
of the layer's output sums the partial products, as a row-parallel linear does. With expert
parallelism (tp.expert_parallel) each rank keeps E / tp whole experts instead and computes only
the (token, expert) pairs routed to them; the same one all-reduce sums the ranks' parts. The
router runs on every rank (it is replicated), so every rank sees every token's choice. A shared
expert is split by its intermediate dimension either way, and its partial sum joins the routed
experts' before that single all-reduce.

Quantized experts (a GGUF file's, or --quantization int8's): w13 and w2 are QuantizedExperts,
each expert's rows kept as the file stores them and packed, then stacked into one tensor of
every expert's tiles; on the CPU one op (ops.quant_fused_moe) routes the tokens and multiplies
each active expert's rows through fastgen's streaming kernel (few tokens) or dequantize + oneDNN
(many), so a decode step is captured as a step graph like a dense model's. Experts whose rows
mix types (none of the GGUF files seen) take the same sum expert by expert in Python, eagerly.
On CUDA they are dequantized to the model's dtype at load for the fused_moe kernel (whose
grouped GEMM has no quantized path) and CUDA graphs.

Routing variants are a MoERouting value (the families differ only there): softmax or sigmoid
scores, renormalised or not, group-limited selection, a scale, and whether the router weight
multiplies the expert's output (Mixtral, Qwen, DeepSeek) or its input (Llama 4).

Shape letters: T tokens, H hidden, I expert intermediate (per rank), E experts, k experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fastgen import ops, quantization
from fastgen.distributed import SINGLE_RANK, TensorParallelGroup
from fastgen.layers.linear import ReplicatedLinear, store_rows
from fastgen.layers.mlp import GatedMLP
from fastgen.layers.parameter import ShardId, set_weight_attrs, weight_parameter
from fastgen.quantization import QuantizedExperts, quantized_linear


@dataclass(frozen=True)
class MoERouting:
    """How router logits [T, E] become k (weight, expert) pairs per token (see ops.moe_route)."""

    top_k: int
    scoring: str = "softmax"          # softmax | sigmoid
    renormalize: bool = False         # the k weights rescaled to sum to 1
    num_groups: int | None = None     # group-limited selection: E experts in num_groups groups,
    topk_groups: int | None = None    # the best topk_groups of them kept,
    group_scoring: str = "max"        # ranked by their best score (max) or best two (sum_top2)
    scale: float = 1.0                # routed_scaling_factor
    weight_on_input: bool = False     # expert(w * x) (Llama 4) instead of w * expert(x)


class FusedMoE(nn.Module):
    """out[t] = sum over the k experts e the router picks for t of w * expert_e(x[t]) (or
    expert_e(w * x[t])), expert_e(x) = down_e(silu(gate_e(x)) * up_e(x)).
    w13: [E, 2I, H]; w2: [E, H, I]"""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 routing: MoERouting, tp: TensorParallelGroup = SINGLE_RANK,
                 correction_bias: bool = False):
        """correction_bias: a loaded per-expert bias e_score_correction_bias [E] (float32,
        whatever the model's dtype) added to the scores for selection only (DeepSeek-V3)."""
        super().__init__()
        if not 1 <= routing.top_k <= num_experts:
            raise ValueError(f"top_k {routing.top_k} must be in 1..{num_experts} (the experts)")
        self.num_experts, self.routing, self.tp = num_experts, routing, tp
        self.expert_parallel = tp.expert_parallel and tp.size > 1
        if self.expert_parallel:
            if num_experts % tp.size:
                raise ValueError(f"experts ({num_experts}) do not split over tensor-parallel "
                                 f"size {tp.size} (expert parallelism)")
            self.local_experts = num_experts // tp.size
            self.intermediate_size = intermediate_size
            self.split = 1  # ranks sharing one expert's intermediate dimension
        else:
            if intermediate_size % tp.size:
                raise ValueError(f"expert intermediate size ({intermediate_size}) does not split "
                                 f"over tensor-parallel size {tp.size}")
            self.local_experts = num_experts
            self.intermediate_size = intermediate_size // tp.size  # per rank
            self.split = tp.size
        self.first_expert = tp.rank * self.local_experts if self.expert_parallel else 0
        inter, local = self.intermediate_size, self.local_experts
        w13_shards = [(shard, e) for e in range(num_experts) for shard in (0, 1)]
        w2_shards = [(None, e) for e in range(num_experts)]
        method = quantization.current_method()
        self.params_dtype = torch.get_default_dtype()
        if method is None:
            self.w13 = weight_parameter((local, 2 * inter, hidden_size), self._load_w13,
                                        w13_shards)
            self.w2 = weight_parameter((local, hidden_size, inter), self._load_w2, w2_shards)
        else:
            self.w13 = QuantizedExperts(local, 2 * inter, hidden_size, method)
            self.w2 = QuantizedExperts(local, hidden_size, inter, method)
            set_weight_attrs(self.w13, self._load_w13, w13_shards)
            set_weight_attrs(self.w2, self._load_w2, w2_shards)
        if correction_bias:
            self.e_score_correction_bias = nn.Parameter(
                torch.zeros(num_experts, dtype=torch.float32), requires_grad=False)  # [E]
        else:
            self.register_parameter("e_score_correction_bias", None)

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor,
                reduce_results: bool = True) -> torch.Tensor:
        """x: [T, H]; router_logits: [T, E] -> [T, H], summed over the tensor-parallel group (or
        this rank's part of that sum, with reduce_results False)"""
        r = self.routing
        weights, ids = ops.moe_route(router_logits.float(), r.top_k, r.scoring, r.renormalize,
                                     r.num_groups, r.topk_groups, r.group_scoring,
                                     self.correction_bias(), r.scale)  # [T, k] each
        if self.expert_parallel:
            # The pairs routed to other ranks' experts are skipped here (id -1): their expert's
            # rank computes and adds them.
            local = ids - self.first_expert
            mine = (local >= 0) & (local < self.local_experts)
            ids = torch.where(mine, local, -1).to(torch.int32)
        if isinstance(self.w13, QuantizedExperts):
            out = self._quantized_experts(x, weights, ids)
        else:
            out = ops.fused_moe(x, self.w13, self.w2, weights, ids, r.weight_on_input)
        return self.tp.all_reduce(out) if reduce_results else out

    def _quantized_experts(self, x: torch.Tensor, weights: torch.Tensor,
                           ids: torch.Tensor) -> torch.Tensor:
        """fused_moe's sum over packed experts: one op when every expert is stacked
        (ops.quant_fused_moe), else one expert at a time here (the pairs sorted by expert with
        moe_align), accumulated in float32.   x: [T, H]; weights, ids: [T, k] -> [T, H]"""
        w13, w2 = self.w13, self.w2
        if w13.stacked is not None and w2.stacked is not None:
            return ops.quant_fused_moe(x, w13.stacked, w13.stacked_qtype, w2.stacked,
                                       w2.stacked_qtype, w2.in_features, weights, ids,
                                       self.routing.weight_on_input,
                                       max_stream_tokens=quantization.QUANT_MAX_TOKENS)
        k = ids.shape[1]
        pairs_by_expert, offsets, _ = ops.moe_align(ids, self.local_experts)
        bounds = offsets.tolist()
        flat_weights = weights.reshape(-1)
        out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
        for e in range(self.local_experts):
            if bounds[e] == bounds[e + 1]:
                continue
            pairs = pairs_by_expert[bounds[e]:bounds[e + 1]].long()
            tokens = pairs // k
            w = flat_weights[pairs].unsqueeze(1)  # [n, 1]
            xe = x[tokens]
            if self.routing.weight_on_input:
                xe = (xe.float() * w).to(x.dtype)
            h = ops.silu_and_mul(quantized_linear(xe, self.w13.experts[e].packed))
            y = quantized_linear(h, self.w2.experts[e].packed, out_dtype=torch.float32)
            out.index_add_(0, tokens, y if self.routing.weight_on_input else y * w)
        return out.to(x.dtype)

    def process_weights_after_loading(self) -> None:
        if not isinstance(self.w13, QuantizedExperts):
            return
        if self.w13.device.type == "cpu":
            self.w13.finalize(self.params_dtype)
            self.w2.finalize(self.params_dtype)
        else:  # for fused_moe and CUDA graphs (see the module docstring)
            self.w13 = nn.Parameter(self.w13.dense(self.params_dtype), requires_grad=False)
            self.w2 = nn.Parameter(self.w2.dense(self.params_dtype), requires_grad=False)

    def correction_bias(self) -> torch.Tensor | None:
        """The per-expert selection bias [E] float32 (DeepSeek-V3), or None."""
        return self.e_score_correction_bias

    # Loading: per expert (shard 0 gate / 1 up of w13, w2 whole), or every expert at once.

    def _rank_rows(self, loaded: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's slice of an expert's intermediate dimension (all of it under expert
        parallelism)."""
        inter = self.intermediate_size
        if loaded.shape[dim] != inter * self.split:
            raise ValueError(f"checkpoint tensor has shape {tuple(loaded.shape)}, expected "
                             f"{inter * self.split} along dim {dim}")
        rank = 0 if self.expert_parallel else self.tp.rank
        return loaded.narrow(dim, rank * inter, inter)

    def _local_expert(self, expert_id: int) -> int | None:
        """Where a checkpoint expert sits in this rank's weights; None when another rank has it."""
        local = expert_id - self.first_expert
        return local if 0 <= local < self.local_experts else None

    def _local_experts(self, loaded: torch.Tensor) -> torch.Tensor:
        """This rank's experts of a tensor holding all of them along dim 0."""
        return loaded.narrow(0, self.first_expert, self.local_experts)

    def _load_w13(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None,
                  expert_id: int | None = None) -> None:
        inter = self.intermediate_size
        if expert_id is None:  # every expert's [gate | up] at once: [E, 2I_full, H]
            if shard_id is not None or loaded.dim() != 3 or loaded.shape[0] != self.num_experts:
                raise ValueError(f"fused expert tensor has shape {tuple(loaded.shape)}, expected "
                                 f"({self.num_experts}, {2 * inter * self.split}, "
                                 f"{param.shape[2] if param.dim() == 3 else param.in_features})")
            gate, up = self._local_experts(loaded).chunk(2, dim=1)
            for index, part in enumerate((gate, up)):
                part = self._rank_rows(part, 1)
                for expert in range(self.local_experts):
                    _store(param, expert, part[expert], index * inter)
            return
        if shard_id not in (0, 1):
            raise ValueError(f"expert gate/up shard must be 0 (gate) or 1 (up), got {shard_id!r}")
        expert = self._local_expert(expert_id)
        if expert is not None:
            _store(param, expert, self._rank_rows(loaded, 0), shard_id * inter)  # [I, H]

    def _load_w2(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None,
                 expert_id: int | None = None) -> None:
        if expert_id is None:  # every expert's down projection at once: [E, H, I_full]
            if loaded.dim() != 3 or loaded.shape[0] != self.num_experts:
                raise ValueError(f"fused expert tensor has shape {tuple(loaded.shape)}, expected "
                                 f"{self.num_experts} experts along dim 0")
            part = self._rank_rows(self._local_experts(loaded), 2)
            for expert in range(self.local_experts):
                _store(param, expert, part[expert], 0)
            return
        expert = self._local_expert(expert_id)
        if expert is not None:
            _store(param, expert, self._rank_rows(loaded, 1), 0)  # [H, I]


def _store(param: nn.Parameter, expert: int, rows, offset: int) -> None:
    """Rows [offset, offset + n) of one expert's weight, through the linear layers' store_rows
    (copied and checked, or kept for packing by quantized experts)."""
    store_rows(param.experts[expert] if isinstance(param, QuantizedExperts) else param.data[expert],
               rows, offset)


class SparseMoEBlock(nn.Module):
    """A decoder layer's feed-forward when it is a mixture of experts: the router (`gate`,
    [E, H], replicated), the routed experts, and optionally a shared expert every token passes
    through, itself optionally scaled by sigmoid(shared_expert_gate(x)) (Qwen2-MoE). The names
    are the Qwen / Mixtral checkpoint's (mlp.gate, mlp.experts, mlp.shared_expert,
    mlp.shared_expert_gate); other families rename onto them in their weight mapping."""

    def __init__(self, hidden_size: int, num_experts: int, intermediate_size: int,
                 routing: MoERouting, shared_intermediate_size: int | None = None,
                 shared_expert_gate: bool = False, tp: TensorParallelGroup = SINGLE_RANK,
                 correction_bias: bool = False, router_fp32: bool = False):
        """router_fp32: the router's weight kept, and its logits computed, in float32 whatever
        the model's dtype (DeepSeek's, as transformers keeps it)."""
        super().__init__()
        with quantization.building(None):  # the router stays float (a file's quantized one is
            # dequantized at load): near-ties between experts' scores decide the routing
            self.gate = ReplicatedLinear(hidden_size, num_experts, bias=False, tp=tp)
        self.router_fp32 = router_fp32
        if router_fp32:
            self.gate.float()
        self.experts = FusedMoE(num_experts, hidden_size, intermediate_size, routing, tp,
                                correction_bias)
        self.shared_expert = (GatedMLP(hidden_size, shared_intermediate_size, tp=tp,
                                       reduce_results=False)
                              if shared_intermediate_size else None)
        self.tp = tp
        self.shared_expert_gate = (ReplicatedLinear(hidden_size, 1, bias=False, tp=tp)
                                   if shared_expert_gate else None)
        if self.shared_expert_gate is not None and self.shared_expert is None:
            raise ValueError("a shared expert gate needs a shared expert")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, H] -> [T, H]"""
        logits = self.gate(x.float() if self.router_fp32 else x)  # router logits [T, E]
        out = self.experts(x, logits, reduce_results=False)  # this rank's part
        if self.shared_expert is not None:
            shared = self.shared_expert(x)  # this rank's part too
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared  # [T, 1] * [T, H]
            out = out + shared
        return self.tp.all_reduce(out)  # one all-reduce for the layer
