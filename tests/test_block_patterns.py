"""moefx.compile.moe_blocks on hand-written MoE blocks (no transformers models): which routed-experts blocks
become one ``moefx::moe`` call, with which attributes, and which MoE-like blocks are left as ordinary ops.

Blocks are written the way transformers' ``batched_mm`` / ``grouped_mm`` experts implementations compute
(gathered 3-D expert weights, one GEMM each for up and down, gates times outputs, reshape + sum per
token). Graphs come from ``torch._dynamo.export`` (a torch-level Dynamo graph, what the pass receives
inside ``torch.compile``); one test goes through ``torch.compile`` with moefx's pass pipeline.
Every rewritten graph is run against the eager block on fresh inputs with another token count.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

import moefx.op  # noqa: F401  (registers torch.ops.moefx.moe)
from moefx.compile.moe_blocks import rewrite_moe_blocks
from moefx.compile.passes import run_pre_grad_passes
from tests.conftest import relative_error

H, FW, E = 16, 8, 4  # hidden, expert width, experts


def moe_nodes(gm) -> list:
    return [n for n in gm.graph.nodes
            if n.op == "call_function" and n.target in (torch.ops.moefx.moe, torch.ops.moefx.moe.default)]


def op_args(node) -> dict:
    """The moefx::moe call's arguments by schema name."""
    names = [a.name for a in torch.ops.moefx.moe.default._schema.arguments]
    return {**dict(zip(names, node.args)), **node.kwargs}


def op_name(node) -> str:
    if node.op == "call_method":
        return node.target
    return getattr(node.target, "__name__", str(node.target)) if node.op == "call_function" else None


def op_names(gm) -> set:
    return {op_name(n) for n in gm.graph.nodes} - {None}


def export(block: nn.Module, tokens: int = 6, dtype=torch.float32):
    gm, _ = torch._dynamo.export(block)(torch.randn(tokens, H, dtype=dtype))
    return gm


def check_same_outputs(gm, block, tokens: int = 9, dtype=torch.float32, tolerance: float = 1e-5):
    x = torch.randn(tokens, H, dtype=dtype)
    with torch.no_grad():
        got, want = gm(x), block(x)
    got = list(got) if isinstance(got, (tuple, list)) else [got]
    want = list(want) if isinstance(want, tuple) else [want]
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape and relative_error(a, b) <= tolerance


def setup_function(_):
    torch.manual_seed(0)


class Experts(nn.Module):
    """Routed experts in transformers' batched_mm layout: W_up [E, F_in, H] ([gate; up] halves when gated),
    W_down [E, H, F]; ``combine`` weighs each (token, slot) output by its gate and sums the slots."""

    def __init__(self, gated=True, router_bias=False, top_k=2, experts=E):
        super().__init__()
        self.top_k, self.gated = top_k, gated
        self.router = nn.Linear(H, experts, bias=router_bias)
        self.w_up = nn.Parameter(torch.randn(experts, (2 if gated else 1) * FW, H) * 0.3)
        self.w_down = nn.Parameter(torch.randn(experts, H, FW) * 0.3)

    def up(self, x, ids):
        xs = x.repeat_interleave(self.top_k, dim=0)
        return torch.bmm(self.w_up[ids], xs.unsqueeze(-1)).squeeze(-1)

    def down(self, h, ids):
        return torch.bmm(self.w_down[ids], h.unsqueeze(-1)).squeeze(-1)

    def hidden(self, up, act=F.silu):
        if self.gated:
            gate, up = up.chunk(2, dim=-1)
            return act(gate) * up
        return act(up)

    def combine(self, out, gates, tokens):
        return (out * gates.reshape(-1, 1)).view(tokens, self.top_k, -1).sum(dim=1)

    def experts(self, x, gates, ids, act=F.silu):
        ids = ids.reshape(-1)
        return self.combine(self.down(self.hidden(self.up(x, ids), act), ids), gates, x.shape[0])


class Mixtral(Experts):
    """Mixtral: fp32 softmax over a bias-free router, top-2, renormalised, SwiGLU experts."""

    def forward(self, x):
        probs = F.softmax(self.router(x), dim=-1, dtype=torch.float)
        gates, ids = torch.topk(probs, self.top_k, dim=-1)
        gates = gates / gates.sum(dim=-1, keepdim=True)
        return self.experts(x, gates.to(x.dtype), ids)


class SigmoidScaled(Experts):
    """Sigmoid scores of a biased router, top-2 without renormalising, times a constant; tanh-GELU experts."""

    def __init__(self):
        super().__init__(gated=False, router_bias=True)

    def forward(self, x):
        gates, ids = self.router(x).sigmoid().topk(self.top_k, dim=-1)
        return self.experts(x, 2.5 * gates, ids, act=lambda h: F.gelu(h, approximate="tanh"))


class DeepSeekV2(Experts):
    """Softmax top-3 of 6, renormalised with an eps, scaled by a routing factor; scores also returned (aux loss)."""

    def __init__(self):
        super().__init__(top_k=3, experts=6)

    def forward(self, x):
        scores = self.router(x).softmax(dim=-1)
        gates, ids = scores.topk(self.top_k, dim=-1)
        gates = gates / (gates.sum(dim=-1, keepdim=True) + 1e-20) * 1.5
        return x + self.experts(x, gates, ids), scores


class Grouped(Experts):
    """transformers' grouped_mm path: tokens sorted by expert, grouped GEMMs over offsets, scattered back."""

    def forward(self, x):
        gates, ids = torch.topk(self.router(x).softmax(dim=-1), self.top_k, dim=-1)
        gates = gates / gates.sum(dim=-1, keepdim=True)
        ids_sorted, perm = torch.sort(ids.reshape(-1))
        xs, gs = x[perm // self.top_k], gates.reshape(-1)[perm]
        counts = torch.histc(ids_sorted.float(), bins=E, min=0, max=E - 1)
        offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
        up = F.grouped_mm(xs, self.w_up.transpose(-2, -1), offs=offsets)
        out = F.grouped_mm(self.hidden(up), self.w_down.transpose(-2, -1), offs=offsets) * gs.unsqueeze(-1)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.size(0))
        return out[inverse].view(x.shape[0], self.top_k, -1).sum(dim=1)


# ---------------------------------------------------------------- blocks that become one moefx::moe

def test_mixtral_softmax_top2_renormalised_block_becomes_one_op_with_its_routing():
    block = Mixtral().eval()
    gm = export(block)
    assert {"topk", "bmm", "silu", "softmax"} <= op_names(gm)
    assert rewrite_moe_blocks(gm) == 1
    (node,) = moe_nodes(gm)
    args = op_args(node)
    assert (args["top_k"], args["activation"], args["gated"], args["scoring"], args["renormalize"],
            args["gate_scale"]) == (2, "silu", True, "softmax", True, 1.0)
    assert args["x"] is args["router_input"] and args["x"].op == "placeholder"
    assert args["b_router"] is None and args["b_in"] is None and args["b_out"] is None
    left = op_names(gm)
    assert not left & {"topk", "bmm", "silu", "softmax", "chunk", "repeat_interleave"}, left
    check_same_outputs(gm, block)


def test_renormalise_with_eps_then_scale_and_scores_read_by_an_aux_loss_in_float64():
    block = DeepSeekV2().eval().double()  # (Mixtral's softmax is fp32 by construction: not for an fp64 check)
    gm = export(block, dtype=torch.float64)
    assert rewrite_moe_blocks(gm) == 1
    args = op_args(moe_nodes(gm)[0])
    assert (args["top_k"], args["renormalize"], args["gate_scale"]) == (3, True, 1.5)
    assert "softmax" in op_names(gm), "the scores the block returns are still computed"
    assert "topk" not in op_names(gm)
    check_same_outputs(gm, block, dtype=torch.float64, tolerance=1e-12)


def test_router_reading_another_tensor_than_the_experts_is_routed_from_it():
    class PreRouted(Mixtral):
        def __init__(self):
            super().__init__()
            self.pre = nn.Linear(H, H)

        def forward(self, x):
            gates, ids = F.softmax(self.router(torch.tanh(self.pre(x))), dim=-1).topk(self.top_k, dim=-1)
            return self.experts(x, gates, ids)

    block = PreRouted().eval()
    gm = export(block)
    assert rewrite_moe_blocks(gm) == 1
    args = op_args(moe_nodes(gm)[0])
    assert args["x"].op == "placeholder" and args["router_input"] is not args["x"]
    assert "tanh" in str(args["router_input"].target)
    assert args["renormalize"] is False
    check_same_outputs(gm, block)


def test_two_blocks_in_one_graph_become_two_ops_and_the_sigmoid_one_keeps_scale_bias_and_plain_experts():
    class TwoLayers(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.a, self.b = nn.LayerNorm(H), Mixtral(), SigmoidScaled()

        def forward(self, x):
            x = x + self.a(self.norm(x))
            return x + self.b(x)

    block = TwoLayers().eval()
    gm = export(block)
    assert rewrite_moe_blocks(gm) == 2
    mixtral, sigmoid = (op_args(n) for n in moe_nodes(gm))
    assert (mixtral["scoring"], mixtral["renormalize"], mixtral["gated"]) == ("softmax", True, True)
    assert (sigmoid["scoring"], sigmoid["renormalize"], sigmoid["gate_scale"], sigmoid["activation"],
            sigmoid["gated"]) == ("sigmoid", False, 2.5, "gelu_tanh", False)
    assert mixtral["b_router"] is None and sigmoid["b_router"] is not None
    assert op_name(mixtral["x"]) == "layer_norm" and mixtral["router_input"] is mixtral["x"]
    assert "layer_norm" in op_names(gm) and "sigmoid" not in op_names(gm)
    check_same_outputs(gm, block)


def test_grouped_mm_block_in_bfloat16_becomes_one_op():
    block = Grouped().eval().to(torch.bfloat16)
    gm = export(block, dtype=torch.bfloat16)
    assert "grouped_mm" in op_names(gm) or "_grouped_mm" in op_names(gm)
    assert rewrite_moe_blocks(gm) == 1
    left = op_names(gm)
    assert not left & {"grouped_mm", "_grouped_mm", "histc", "sort", "topk"}, left
    check_same_outputs(gm, block, dtype=torch.bfloat16, tolerance=2e-2)  # bf16 rounding in both


def test_torch_compile_with_moefx_passes_runs_the_rewritten_block():
    block = Mixtral().eval()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(run_pre_grad_passes(gm))
        return graphs[-1].forward

    torch._dynamo.reset()
    compiled = torch.compile(block, backend=backend, dynamic=True)
    x = torch.randn(7, H)
    with torch.no_grad():
        out = compiled(x)
        assert relative_error(out, block(x)) <= 1e-5
    assert len(graphs) == 1 and len(moe_nodes(graphs[0])) == 1


# ---------------------------------------------------------------- MoE-like blocks left as they are

class GateOnUpHalf(Experts):
    def forward(self, x):  # act(up) * gate: the halves swapped
        gates, ids = F.softmax(self.router(x), dim=-1).topk(self.top_k, dim=-1)
        return self.experts(x, gates, ids, act=None)

    def hidden(self, up, act=None):
        gate, up = up.chunk(2, dim=-1)
        return gate * F.silu(up)


class MaxCombine(Experts):
    def combine(self, out, gates, tokens):
        return (out * gates.reshape(-1, 1)).view(tokens, self.top_k, -1).amax(dim=1)

    def forward(self, x):
        gates, ids = F.softmax(self.router(x), dim=-1).topk(self.top_k, dim=-1)
        return self.experts(x, gates, ids)


class TopkOnLogits(Experts):
    def forward(self, x):  # selection on raw logits, softmax over the chosen ones only
        logits, ids = self.router(x).topk(self.top_k, dim=-1)
        return self.experts(x, logits.softmax(dim=-1), ids)


class Unweighted(Experts):
    def combine(self, out, gates, tokens):
        return out.view(tokens, self.top_k, -1).sum(dim=1)

    def forward(self, x):
        _, ids = F.softmax(self.router(x), dim=-1).topk(self.top_k, dim=-1)
        return self.experts(x, None, ids)


class TransposedWeights(Experts):
    def __init__(self):
        super().__init__(gated=False)
        self.w_up = nn.Parameter(torch.randn(E, H, FW) * 0.3)    # [E, in, out]
        self.w_down = nn.Parameter(torch.randn(E, FW, H) * 0.3)

    def up(self, x, ids):
        return torch.bmm(x.repeat_interleave(self.top_k, dim=0).unsqueeze(1), self.w_up[ids]).squeeze(1)

    def down(self, h, ids):
        return torch.bmm(h.unsqueeze(1), self.w_down[ids]).squeeze(1)

    def forward(self, x):
        gates, ids = F.softmax(self.router(x), dim=-1).topk(self.top_k, dim=-1)
        return self.experts(x, gates, ids, act=F.relu)


class SmallestScores(Experts):
    def forward(self, x):
        gates, ids = F.softmax(self.router(x), dim=-1).topk(self.top_k, dim=-1, largest=False)
        return self.experts(x, gates, ids)


LEFT_ALONE = {  # block -> the reason the pass logs for it
    GateOnUpHalf: "activation input is neither the up projection nor the gate half",
    MaxCombine: "`amax`",
    TopkOnLogits: "the router's topk selects on `linear`",
    Unweighted: "the gates are not the router's top-k scores",
    TransposedWeights: "is stored transposed",
    SmallestScores: "topk does not take the largest scores",
}


class Chain(nn.Module):
    """All the blocks above, one after the other with residuals: one export for all of them."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([block_class() for block_class in LEFT_ALONE])

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x


def test_moe_like_blocks_outside_the_contract_are_left_as_ordinary_ops_each_with_its_reason(caplog):
    chain = Chain().eval()
    gm = export(chain)
    before = [n.format_node() for n in gm.graph.nodes]
    assert sum(op_name(n) == "topk" for n in gm.graph.nodes) == len(LEFT_ALONE)
    with caplog.at_level(logging.DEBUG, logger="moefx"):
        assert rewrite_moe_blocks(gm) == 0
    assert caplog.text.count("not rewritten") == len(LEFT_ALONE)
    for block_class, reason in LEFT_ALONE.items():
        assert reason in caplog.text, block_class.__name__
    assert [n.format_node() for n in gm.graph.nodes] == before, "the graph is untouched"
    assert moe_nodes(gm) == []
    check_same_outputs(gm, chain)


# ---------------------------------------------------------------- extra factors on the expert path

class HalfCombine(Mixtral):
    def combine(self, out, gates, tokens):
        return (out * gates.reshape(-1, 1) * 0.5).view(tokens, self.top_k, -1).sum(dim=1)


class PerExpertScale(Mixtral):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.rand(E) + 0.5)

    def forward(self, x):
        gates, ids = F.softmax(self.router(x), dim=-1).topk(self.top_k, dim=-1)
        return self.experts(x, gates * self.scale[ids], ids)


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.halved, self.per_expert = HalfCombine(), PerExpertScale()

    def forward(self, x):
        return self.halved(x), self.per_expert(x)


def test_extra_factor_on_the_expert_path_is_kept_or_the_block_left_alone():
    block = Scaled().eval()
    gm = export(block)
    rewrite_moe_blocks(gm)
    check_same_outputs(gm, block)
