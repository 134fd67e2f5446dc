"""The shared weight loader (fastgen.loader.weights) on a small mixture-of-experts block built
here: per-expert checkpoint tensors into fused expert parameters, a fused QKV and a fused gate/up,
a Llama 4 style pre-fused and transposed expert tensor, names ignored, the hook after loading, and
one error that names every unexpected tensor, missing shard, missing expert and wrong shape."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastgen.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from fastgen.layers.parameter import check_shape, weight_parameter
from fastgen.loader.weights import WeightMapping, WeightRule, load_weights

E, H, I = 3, 8, 6  # experts, hidden, expert intermediate
HEADS, KV_HEADS, D = 2, 1, 4


class Experts(nn.Module):
    """Every expert's gate|up and down projections, fused: w13 [E, 2I, H], w2 [E, H, I]."""

    def __init__(self):
        super().__init__()
        self.w13 = weight_parameter((E, 2 * I, H), self.load_w13,
                                    [(shard, e) for e in range(E) for shard in (0, 1)])
        self.w2 = weight_parameter((E, H, I), self.load_w2, [(None, e) for e in range(E)])
        self.processed = 0

    def load_w13(self, param, loaded, shard_id=None, expert_id=None):
        if expert_id is None:  # all experts at once: [E, 2I, H]
            check_shape(param, loaded)
            param.data.copy_(loaded)
            return
        target = param.data[expert_id].narrow(0, shard_id * I, I)  # [I, H]
        check_shape(target, loaded)
        target.copy_(loaded)

    def load_w2(self, param, loaded, shard_id=None, expert_id=None):
        check_shape(param.data[expert_id], loaded)
        param.data[expert_id].copy_(loaded)

    def process_weights_after_loading(self):
        self.processed += 1


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv_proj = QKVParallelLinear(H, D, HEADS, KV_HEADS)
        self.experts = Experts()
        self.shared_expert = nn.Module()
        self.shared_expert.gate_up_proj = MergedColumnParallelLinear(H, [I, I])
        self.shared_expert.down_proj = RowParallelLinear(I, H)


class ToyMoE(nn.Module):
    weight_mapping = WeightMapping(
        rules=(WeightRule("experts.{e}.gate_proj.weight", "experts.w13", shard_id=0),
               WeightRule("experts.{e}.up_proj.weight", "experts.w13", shard_id=1),
               WeightRule("experts.{e}.down_proj.weight", "experts.w2"),
               WeightRule("q_proj", "qkv_proj", shard_id="q"),
               WeightRule("k_proj", "qkv_proj", shard_id="k"),
               WeightRule("v_proj", "qkv_proj", shard_id="v"),
               WeightRule("gate_proj", "gate_up_proj", shard_id=0),
               WeightRule("up_proj", "gate_up_proj", shard_id=1)),
        ignore=("rotary_emb.inv_freq", "vision_tower"))

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])


def checkpoint(seed: int = 0) -> dict[str, torch.Tensor]:
    """A complete checkpoint for ToyMoE in Hugging Face's per-expert names."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(2):
        prefix = f"layers.{layer}"
        for proj, rows in (("q_proj", HEADS * D), ("k_proj", KV_HEADS * D), ("v_proj", KV_HEADS * D)):
            tensors[f"{prefix}.{proj}.weight"] = torch.randn(rows, H, generator=g)
        for e in range(E):
            for proj in ("gate_proj", "up_proj"):
                tensors[f"{prefix}.experts.{e}.{proj}.weight"] = torch.randn(I, H, generator=g)
            tensors[f"{prefix}.experts.{e}.down_proj.weight"] = torch.randn(H, I, generator=g)
        for proj in ("gate_proj", "up_proj"):
            tensors[f"{prefix}.shared_expert.{proj}.weight"] = torch.randn(I, H, generator=g)
        tensors[f"{prefix}.shared_expert.down_proj.weight"] = torch.randn(H, I, generator=g)
        tensors[f"{prefix}.rotary_emb.inv_freq"] = torch.randn(2, generator=g)
    tensors["vision_tower.patch_embed.weight"] = torch.randn(4, 4, generator=g)
    return tensors


def test_every_piece_lands_in_its_place():
    model, tensors = ToyMoE(), checkpoint()
    load_weights(model, tensors.items())
    block = model.layers[1]
    for e in range(E):
        gate, up = block.experts.w13[e].split(I)
        assert torch.equal(gate, tensors[f"layers.1.experts.{e}.gate_proj.weight"])
        assert torch.equal(up, tensors[f"layers.1.experts.{e}.up_proj.weight"])
        assert torch.equal(block.experts.w2[e], tensors[f"layers.1.experts.{e}.down_proj.weight"])
    q, k, v = block.qkv_proj.weight.split([HEADS * D, KV_HEADS * D, KV_HEADS * D])
    assert torch.equal(k, tensors["layers.1.k_proj.weight"])
    assert torch.equal(block.shared_expert.gate_up_proj.weight[I:],
                       tensors["layers.1.shared_expert.up_proj.weight"])
    assert [b.experts.processed for b in model.layers] == [1, 1]  # the hook, once each


def test_one_error_names_every_problem():
    tensors = checkpoint()
    del tensors["layers.0.k_proj.weight"]                       # a missing shard
    del tensors["layers.1.experts.2.down_proj.weight"]          # a missing expert
    del tensors["layers.1.experts.0.up_proj.weight"]            # a missing shard of an expert
    tensors["layers.0.experts.3.down_proj.weight"] = torch.zeros(H, I)  # expert 3 of 3
    tensors["layers.0.experts.1.gate_proj_scale"] = torch.zeros(1)  # gate_proj is not gate_proj_scale
    tensors["layers.1.shared_expert.gate_proj.weight"] = torch.zeros(I + 1, H)  # a wrong shape
    tensors["layers.0.experts.0.down_proj.weight"] = torch.zeros(I, H)        # transposed
    model = ToyMoE()
    with pytest.raises(ValueError) as error:
        load_weights(model, tensors.items())
    message = str(error.value)
    assert message.startswith("unexpected weights: layers.0.experts.1.gate_proj_scale, "
                              "layers.0.experts.3.down_proj.weight; missing weights: ")
    assert ("missing weights: layers.0.k_proj.weight, layers.1.experts.0.up_proj.weight, "
            "layers.1.experts.2.down_proj.weight; wrong shapes: ") in message
    assert "weight layers.1.shared_expert.gate_proj.weight: checkpoint tensor has shape" in message
    assert "weight layers.0.experts.0.down_proj.weight: checkpoint tensor has shape (6, 8)" in message
    assert model.layers[0].experts.processed == 0  # nothing is processed after a failed load


def test_rules_match_whole_name_components():
    mapping = ToyMoE.weight_mapping
    target = mapping.to_param("model.layers.4.mlp.experts.7.gate_proj.weight")
    assert (target.param, target.shard_id, target.expert_id) == ("model.layers.4.mlp.experts.w13", 0, 7)
    shared = mapping.to_param("model.layers.4.mlp.shared_expert.gate_proj.weight")
    assert (shared.param, shared.key) == ("model.layers.4.mlp.shared_expert.gate_up_proj.weight", (0, None))
    for name in ("mlp.gate_proj_extra.weight", "mlp.my_up_proj.weight", "experts.up_proj.w"):
        assert mapping.to_param(name).param == name.replace("experts.up_proj", "experts.gate_up_proj")
    assert mapping.to_param("mlp.experts.x.up_proj.weight").expert_id is None  # "x" is no index
    assert mapping.ignores("vision_tower.blocks.0.weight") and not mapping.ignores("my_vision_tower.w")
    # the inverse names the checkpoint tensor a missing piece comes from
    assert mapping.to_checkpoint("layers.0.experts.w13", (1, 2)) == "layers.0.experts.2.up_proj.weight"
    assert mapping.to_checkpoint("layers.0.qkv_proj.bias", ("v", None)) == "layers.0.v_proj.bias"


def test_a_fused_transposed_expert_tensor_fills_every_expert():
    """Llama 4 ships gate|up of every expert in one [E, H, 2I] tensor (x @ W, not W x)."""
    fused = WeightMapping(rules=(WeightRule("experts.gate_up_proj", "experts.w13",
                                            transform=lambda w: w.transpose(1, 2)),
                                 *ToyMoE.weight_mapping.rules),
                          ignore=ToyMoE.weight_mapping.ignore)
    tensors = checkpoint()
    for layer in range(2):
        per_expert = [torch.cat([tensors.pop(f"layers.{layer}.experts.{e}.gate_proj.weight"),
                                 tensors.pop(f"layers.{layer}.experts.{e}.up_proj.weight")])
                      for e in range(E)]  # E x [2I, H]
        tensors[f"layers.{layer}.experts.gate_up_proj"] = torch.stack(per_expert).transpose(1, 2)
    model = ToyMoE()
    load_weights(model, tensors.items(), fused)
    expected = tensors["layers.1.experts.gate_up_proj"].transpose(1, 2)
    assert torch.equal(model.layers[1].experts.w13, expected)


def test_ambiguous_mapping_is_refused():
    mapping = WeightMapping(rules=(WeightRule("q_proj", "qkv_proj", shard_id="q"),
                                   WeightRule("qkv_proj", "qkv", shard_id="k")))
    with pytest.raises(ValueError, match="two weight rules give it a shard"):
        mapping.to_param("layers.0.q_proj.weight")
