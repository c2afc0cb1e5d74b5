"""moefx.compile.moe_blocks: transformers MoE blocks, recognised by graph structure, become one moefx::moe each.

These tests run the pass pipeline on Dynamo graphs and execute the rewritten graph eagerly (cheap);
tests/test_backend.py runs the same graphs through Inductor.
"""
from __future__ import annotations

import logging

import pytest
import torch
import transformers
from torch._dynamo.utils import counters

from moefx.op import MoEAttrs, MoEInputs, moe_op
from moefx.compile.moe_blocks import rewrite_moe_blocks
from moefx.compile.passes import run_pre_grad_passes
from moefx.compile.swap_triton import is_moe_call, swap_triton
from tests.conftest import relative_error

VOCAB = 64
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64)
MLA = dict(COMMON, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
           v_head_dim=8)

# name -> (config, MoE layers moefx can express as moefx::moe)
CONFIGS = {
    "mixtral": (lambda: transformers.MixtralConfig(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2,
                                                   **COMMON), 2),
    "qwen2_moe": (lambda: transformers.Qwen2MoeConfig(moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                                                      intermediate_size=48, shared_expert_intermediate_size=24,
                                                      **COMMON), 2),
    "qwen3_moe": (lambda: transformers.Qwen3MoeConfig(moe_intermediate_size=16, num_experts=6, num_experts_per_tok=2,
                                                      intermediate_size=48, head_dim=8, norm_topk_prob=True,
                                                      **COMMON), 2),
    "olmoe": (lambda: transformers.OlmoeConfig(intermediate_size=16, num_experts=4, num_experts_per_tok=2, **COMMON), 2),
    "deepseek_v2": (lambda: transformers.DeepseekV2Config(moe_intermediate_size=16, n_routed_experts=8,
                                                          num_experts_per_tok=3, intermediate_size=48,
                                                          first_k_dense_replace=1, n_shared_experts=1,
                                                          routed_scaling_factor=1.5, **MLA), 1),
    # sigmoid scores + selection bias + group-limited top-k: outside the contract, left as ordinary ops
    "deepseek_v3": (lambda: transformers.DeepseekV3Config(moe_intermediate_size=16, n_routed_experts=8,
                                                          num_experts_per_tok=2, intermediate_size=48, n_group=2,
                                                          topk_group=1, first_k_dense_replace=1, n_shared_experts=1,
                                                          **MLA), 0),
}


def tiny_moe_model(name: str, experts_implementation: str = "grouped_mm", seed: int = 0):
    """A randomly initialised two-layer causal LM of family ``name``, in eval mode, and its MoE layer count."""
    make_config, moe_layers = CONFIGS[name]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(make_config(), experts_implementation=experts_implementation)
    with torch.no_grad():
        for p in model.parameters():  # routers start at zero in transformers; spread them so routing is decided
            p.normal_(0.0, 0.2)
    return model.eval(), moe_layers


def token_ids(seed: int, batch: int = 2, length: int = 5) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def compile_with_passes(model):
    """torch.compile that runs moefx's passes, then the rewritten graph as it is; returns (compiled, graphs)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(run_pre_grad_passes(gm))
        return gm.forward

    torch._dynamo.reset()
    counters.clear()
    return torch.compile(model, backend=backend), graphs


def moe_calls(gm) -> int:
    return sum(1 for n in gm.graph.nodes if is_moe_call(n))


@pytest.mark.parametrize("name,implementation", [
    ("mixtral", "grouped_mm"), ("qwen2_moe", "grouped_mm"), ("qwen3_moe", "grouped_mm"), ("olmoe", "grouped_mm"),
    ("deepseek_v2", "grouped_mm"), ("mixtral", "batched_mm"), ("qwen2_moe", "batched_mm"),
])
def test_each_moe_layer_becomes_one_op_and_matches_eager(name, implementation):
    model, moe_layers = tiny_moe_model(name, implementation)
    compiled, graphs = compile_with_passes(model)
    ids = token_ids(1)
    with torch.no_grad():
        out = compiled(ids).logits
        ref = model(ids).logits
    assert len(graphs) == 1 and not counters["graph_break"], "no graph break inside the model"
    assert moe_calls(graphs[0]) == moe_layers
    assert not any(n.target is torch.ops.transformers.grouped_mm_fallback or n.target is torch.bmm
                   for n in graphs[0].graph.nodes), "no per-expert GEMMs left beside the op"
    assert relative_error(out, ref) <= 1e-5


def test_qwen2_shared_expert_stays_dense_beside_the_op():
    model, _ = tiny_moe_model("qwen2_moe")
    compiled, graphs = compile_with_passes(model)
    with torch.no_grad():
        compiled(token_ids(2))
    sigmoids = [n for n in graphs[0].graph.nodes if "sigmoid" in str(n.target)]
    assert len(sigmoids) == 2, "the shared-expert gate (sigmoid) of each layer is kept as an ordinary op"


def test_deepseek_v3_routing_is_left_as_ordinary_ops_and_logged(caplog):
    model, _ = tiny_moe_model("deepseek_v3")
    compiled, graphs = compile_with_passes(model)
    ids = token_ids(3)
    with caplog.at_level(logging.DEBUG, logger="moefx"), torch.no_grad():
        out = compiled(ids).logits
    assert moe_calls(graphs[0]) == 0
    assert "not rewritten" in caplog.text and "DeepSeek-V3" in caplog.text
    with torch.no_grad():
        assert relative_error(out, model(ids).logits) <= 1e-5


def test_eager_expert_loop_graph_break_is_logged_with_the_fix(caplog):
    model, _ = tiny_moe_model("olmoe", "eager")
    compiled, graphs = compile_with_passes(model)
    ids = token_ids(4)
    with caplog.at_level(logging.DEBUG, logger="moefx"), torch.no_grad():
        out = compiled(ids).logits
    assert sum(moe_calls(g) for g in graphs) == 0
    assert "experts_implementation='grouped_mm'" in caplog.text
    with torch.no_grad():
        assert relative_error(out, model(ids).logits) <= 1e-5


class BiasedExperts(torch.nn.Module):
    """A batched_mm-style MoE block whose experts add a bias: MoE-like, but not the recognised structure."""

    def __init__(self, hidden=16, width=8, experts=4, top_k=2):
        super().__init__()
        self.top_k = top_k
        self.router = torch.nn.Parameter(torch.randn(experts, hidden))
        self.w_up = torch.nn.Parameter(torch.randn(experts, width, hidden) * 0.3)
        self.w_down = torch.nn.Parameter(torch.randn(experts, hidden, width) * 0.3)
        self.bias = torch.nn.Parameter(torch.randn(experts, width))

    def forward(self, x):
        weights, ids = torch.nn.functional.linear(x, self.router).softmax(-1).topk(self.top_k, dim=-1)
        ids = ids.reshape(-1)
        up = torch.bmm(self.w_up[ids], x.repeat_interleave(self.top_k, dim=0).unsqueeze(-1)).squeeze(-1)
        h = torch.relu(up + self.bias[ids])
        down = torch.bmm(self.w_down[ids], h.unsqueeze(-1)).squeeze(-1)
        return (down * weights.reshape(-1, 1)).view(x.shape[0], self.top_k, -1).sum(1)


def test_block_outside_the_structure_is_left_and_the_reason_logged(caplog):
    torch.manual_seed(0)
    block = BiasedExperts()
    compiled, graphs = compile_with_passes(block)
    x = torch.randn(6, 16)
    with caplog.at_level(logging.DEBUG, logger="moefx"), torch.no_grad():
        out = compiled(x)
    assert moe_calls(graphs[0]) == 0
    assert "not rewritten" in caplog.text and "`add`" in caplog.text
    with torch.no_grad():
        assert relative_error(out, block(x)) <= 1e-6


def test_unbiased_version_of_the_same_block_is_rewritten():
    torch.manual_seed(0)
    block = NoBias(BiasedExperts())
    gm, _ = torch._dynamo.export(block)(torch.randn(6, 16))
    assert rewrite_moe_blocks(gm) == 1 and moe_calls(gm) == 1
    x = torch.randn(6, 16)
    with torch.no_grad():
        assert relative_error(gm(x), block(x)) <= 1e-5


class NoBias(torch.nn.Module):
    """BiasedExperts without the bias: relu experts, plain top-k softmax gates (no renormalisation)."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        b = self.block
        weights, ids = torch.nn.functional.linear(x, b.router).softmax(-1).topk(b.top_k, dim=-1)
        ids = ids.reshape(-1)
        up = torch.bmm(b.w_up[ids], x.repeat_interleave(b.top_k, dim=0).unsqueeze(-1)).squeeze(-1)
        down = torch.bmm(b.w_down[ids], torch.relu(up).unsqueeze(-1)).squeeze(-1)
        return (down * weights.reshape(-1, 1)).view(x.shape[0], b.top_k, -1).sum(1)


def test_dynamo_export_graph_of_a_block_is_rewritten():
    model, _ = tiny_moe_model("qwen3_moe")
    block = model.model.layers[1].mlp
    x = torch.randn(2, 5, 32)
    gm, _ = torch._dynamo.export(block)(x)
    assert rewrite_moe_blocks(gm) == 1 and moe_calls(gm) == 1
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        assert relative_error(gm(x), block(x)) <= 1e-5


class ConvertedMoE(torch.nn.Module):
    """What moefx.convert produces: the op already in the model."""

    def __init__(self):
        super().__init__()
        self.w_router = torch.nn.Parameter(torch.randn(4, 8))
        self.w_in = torch.nn.Parameter(torch.randn(4, 12, 8))
        self.w_out = torch.nn.Parameter(torch.randn(4, 8, 6))

    def forward(self, x):
        return moe_op(MoEInputs(x, x, self.w_router, None, self.w_in, None, self.w_out, None, None),
                      MoEAttrs(top_k=2, activation="silu", gated=True, renormalize=True))


def test_graphs_that_already_hold_the_op_pass_through():
    module = ConvertedMoE()
    compiled, graphs = compile_with_passes(module)
    x = torch.randn(5, 8)
    with torch.no_grad():
        out = compiled(x)
        assert relative_error(out, module(x)) <= 1e-6
    assert moe_calls(graphs[0]) == 1


def test_triton_swap_leaves_cpu_graphs_alone():
    gm, _ = torch._dynamo.export(ConvertedMoE())(torch.randn(5, 8))
    assert swap_triton(gm) == 0
    assert moe_calls(gm) == 1


def test_bf16_blocks_on_torch_grouped_mm_are_rewritten():
    """In bf16 transformers calls torch's grouped_mm (the path GPUs take) instead of its fp32 fallback op."""
    model, moe_layers = tiny_moe_model("qwen3_moe")
    model = model.to(torch.bfloat16)
    targets_before, rewritten = [], []

    def backend(gm, example_inputs):
        targets_before.extend(str(n.target) for n in gm.graph.nodes)
        rewritten.append(run_pre_grad_passes(gm))
        return gm.forward

    torch._dynamo.reset()
    ids = token_ids(6)
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(ids).logits
        ref = model(ids).logits
    assert any("grouped_mm" in t and "fallback" not in t for t in targets_before)
    assert len(rewritten) == 1 and moe_calls(rewritten[0]) == moe_layers
    assert relative_error(out, ref) <= 2e-2  # bf16 rounding; the op keeps the gates in fp32


def test_triton_swap_retargets_the_op_where_the_kernel_path_is_triton(monkeypatch):
    gm, _ = torch._dynamo.export(ConvertedMoE())(torch.randn(5, 8))
    monkeypatch.setenv("MOEFX_KERNELS", "triton")  # what CUDA with Triton selects; here only the graph is checked
    assert swap_triton(gm) == 1
    assert [n.target for n in gm.graph.nodes if n.op == "call_function" and "moefx" in str(n.target)] == \
        [torch.ops.moefx.moe_triton.default]


def test_interleaved_rewrite_reorders_transformers_halves_and_matches_eager():
    """halves=False (the ONNX export's choice, and CUDA's): gate/up halves reordered to interleaved rows."""
    model, layers = tiny_moe_model("qwen3_moe")
    graphs = []

    def backend(gm, example_inputs):
        rewrite_moe_blocks(gm, halves=False)
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    ids = token_ids(7)
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(ids).logits
        ref = model(ids).logits
    calls = [n for n in graphs[0].graph.nodes if is_moe_call(n)]
    assert len(calls) == layers and all(n.args[-1] is False for n in calls)
    assert relative_error(out, ref) <= 1e-5
