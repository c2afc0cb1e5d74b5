"""Layer-ahead prediction and local routing consistency (SRP, SCH) on moefx-converted and transformers MoE
models: recall counted as defined, metrics equal to hand-worked values on small traces."""
from __future__ import annotations

import pytest
import torch

import moefx
from moefx.offload import (layer_ahead_recall, routing_consistency, segment_cache_best_hit_rate,
                           segment_routing_best_performance)
from moefx.offload.predict import routers
from tests.test_onnx_models import token_batch
from tests.test_pregate import tiny_llama


def hf_moe(kind: str):
    import transformers

    torch.manual_seed(0)
    common = dict(num_hidden_layers=3, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=100, num_experts_per_tok=2)
    config = {
        "mixtral": lambda: transformers.MixtralConfig(num_local_experts=8, **common),
        "qwen2_moe": lambda: transformers.Qwen2MoeConfig(num_experts=8, moe_intermediate_size=16,
                                                         shared_expert_intermediate_size=32, **common),
        "olmoe": lambda: transformers.OlmoeConfig(num_experts=8, **common),
    }[kind]()
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "olmoe"])
def test_layer_ahead_recall_on_transformers_moe(kind):
    model = hf_moe(kind)
    assert len(routers(model)) == 3
    batches = [token_batch(2, 9, seed) for seed in range(2)]
    recall = layer_ahead_recall(model, batches)
    assert set(recall) == {r.name for r in routers(model)[1:]} | {"mean"}
    assert all(0.0 <= v <= 1.0 for v in recall.values())
    # a router blind to its input picks the same experts from any hidden state: recall 1
    for r in routers(model)[1:]:
        r.module.gate.weight.data.zero_()
    assert layer_ahead_recall(model, batches)["mean"] == 1.0


def test_layer_ahead_recall_counts_the_next_layers_choices_that_were_named():
    calibration = [token_batch(8, 16, seed) for seed in range(2)]
    moe = moefx.convert(tiny_llama(), num_experts=8, top_k=2, calibration=calibration, progress=False)
    batch = token_batch(2, 9, seed=5)
    first, second = routers(moe)
    inputs = {}
    handles = [r.module.register_forward_pre_hook(lambda m, a, r=r: inputs.setdefault(r.name, a[0]))
               for r in (first, second)]
    with torch.no_grad():
        moe(**batch)
    for h in handles:
        h.remove()
    keep = batch["attention_mask"].reshape(-1).bool()
    actual = second.choose(inputs[second.name])[keep]
    predicted = second.choose(inputs[first.name])[keep]
    named = sum(len(set(a) & set(p)) for a, p in zip(actual.tolist(), predicted.tolist()))
    assert layer_ahead_recall(moe, [batch])[second.name] == pytest.approx(named / actual.numel())


def test_srp_is_the_share_the_best_fixed_experts_cover():
    ids = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 4]])
    # windows of 2: {0:2,1:1,2:1} -> best two cover 3/4; {0:2,1:1,2:1} -> 3/4; {0:1,1:1,3:1,4:1} -> 2/4
    assert segment_routing_best_performance(ids, 8, segment=2) == pytest.approx((0.75 + 0.75 + 0.5) / 3)
    assert segment_routing_best_performance(ids, 8, segment=1) == 1.0
    assert segment_routing_best_performance(ids[:, :1].repeat(1, 2), 8, segment=4) == 1.0  # zero-computation ids
    assert segment_routing_best_performance(torch.tensor([[0, 8]]), 8, segment=1, size=1) == 1.0


def test_sch_is_the_hit_rate_of_a_cache_that_knows_the_next_segment():
    ids = torch.tensor([[0], [1], [2], [0], [1], [2]])
    # a cache of 2 that sees 2 tokens ahead evicts the expert used least in them, the least recent among ties:
    # misses 0, 1, 2 (0 and 1 each used once ahead: evicts 0), misses 0 (1 and 2 tie: evicts 1), misses 1
    # (0 unused in the one token left: evicts 0), hits 2
    assert segment_cache_best_hit_rate(ids, 3, segment=2, cache_size=2) == pytest.approx(1 / 6)
    assert segment_cache_best_hit_rate(ids, 3, segment=2, cache_size=3) == pytest.approx(3 / 6)


def test_routing_consistency_of_a_model():
    report = routing_consistency(hf_moe("olmoe"), [token_batch(1, 24, seed) for seed in range(2)], segment=8)
    assert set(report.srp) == set(report.sch) == {r.name for r in routers(hf_moe("olmoe"))} | {"mean"}
    assert all(0.0 < v <= 1.0 for v in [*report.srp.values(), *report.sch.values()])
    assert "SRP" in str(report)
