"""The LLM quality bench's whole path (convert from disk, load, next-token metrics, oracle and neuron-level
bounds) on a small random Llama checkpoint: exact where all experts are active, and the metrics themselves
checked against a direct computation."""
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
from bench_llm import recipe_row  # noqa: E402

from moefx.evaluation.language import NextTokenQuality  # noqa: E402


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval()
    path = str(tmp_path_factory.mktemp("llama"))
    model.save_pretrained(path)
    generator = torch.Generator().manual_seed(1)
    calibration = [torch.randint(0, 96, (40,), generator=generator).tolist() for _ in range(16)]
    held_out = [{"input_ids": ids[None], "attention_mask": torch.ones(1, 32, dtype=torch.long)}
                for ids in torch.randint(0, 96, (3, 32), generator=generator)]
    return path, model, calibration, held_out


def test_next_token_metrics_match_a_direct_computation():
    torch.manual_seed(0)
    ids = torch.randint(0, 11, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0  # padding is scored nowhere
    dense, moe = torch.randn(2, 7, 11), torch.randn(2, 7, 11)
    quality = NextTokenQuality()
    quality.add(dense, moe, ids, mask)
    rows = [(b, t) for b in range(2) for t in range(6) if mask[b, t] and mask[b, t + 1]]
    p, q = (torch.stack([x[b, t] for b, t in rows]).double().log_softmax(-1) for x in (dense, moe))
    target = torch.tensor([ids[b, t + 1] for b, t in rows])
    assert quality.positions == len(rows) == 10
    assert math.isclose(quality.moe_perplexity, q.gather(1, target[:, None]).mean().neg().exp().item(), rel_tol=1e-5)
    assert math.isclose(quality.dense_perplexity, p.gather(1, target[:, None]).mean().neg().exp().item(), rel_tol=1e-5)
    assert math.isclose(quality.kl, (p.exp() * (p - q)).sum(-1).mean().item(), rel_tol=1e-5)
    assert quality.top1_agreement == (p.argmax(-1) == q.argmax(-1)).double().mean().item()


def test_all_experts_active_rows_equal_the_dense_model(llama, tmp_path):
    src, dense, calibration, held_out = llama
    rows = recipe_row("exact", src, dense, calibration, held_out, 256, dict(num_experts=4, top_k=4), str(tmp_path),
                      bounds=True)
    assert [r.name for r in rows] == ["exact", "exact, oracle routing", "neuron top-k"]
    for row in rows:
        assert row.active == 1.0
        assert abs(row.perplexity / row.dense_perplexity - 1) < 1e-5 and row.kl < 1e-8 and row.top1 == 1.0
    assert rows[0].layer_error < 1e-5 and rows[0].seconds > 0 and rows[0].peak_rss_gb > 0


def test_sparse_rows_lose_quality_and_the_oracle_bounds_the_router(llama, tmp_path):
    src, dense, calibration, held_out = llama
    row, oracle, neuron = recipe_row("sparse", src, dense, calibration, held_out, 256,
                                     dict(num_experts=4, top_k=1), str(tmp_path), bounds=True)
    assert row.active == oracle.active == neuron.active == 0.25
    assert row.kl > 0 and row.layer_error > 0.05
    assert oracle.layer_error <= row.layer_error  # the oracle picks the largest expert outputs
