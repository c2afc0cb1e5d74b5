"""moefx.convert.find on hand-built graphs: which modules count as affine maps, which nodes as
activations or identities, and which Linear -> act -> Linear shapes ``find_ffns`` reports as FFNs,
rejects with a reason, or leaves alone. Each found FFN's weights are checked numerically: the FFN
rebuilt from ``FFN.w_in / b_in / w_out / b_out`` must compute what the module computes.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from moefx.convert.find import affine_map, elementwise_kind, find_ffns
from moefx.op import ACTIVATIONS
from tests.conftest import relative_error

H, W = 8, 16  # hidden and FFN width of the hand-built modules


class LeafTracer(fx.Tracer):
    """Every childless module is a call_module (what moefx's concrete tracer does), custom ones too."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return next(m.children(), None) is None


def trace(module: nn.Module) -> fx.GraphModule:
    return fx.GraphModule(module, LeafTracer().trace(module))


def affine_leaves(model: nn.Module) -> dict:
    """{qualified name: (W, b)} over the model's affine leaves, as moefx.convert builds it."""
    return {name: weights for name, m in model.named_modules() if (weights := affine_map(m)) is not None}


def find(module: nn.Module):
    gm = trace(module)
    ffns, rejected = find_ffns(gm, "", affine_leaves(module))
    return gm, ffns, rejected


def dense(ffn, x: torch.Tensor) -> torch.Tensor:
    """The FFN computed from the weights find_ffns extracted (the op's expert formula, one expert)."""
    a = F.linear(x, ffn.w_in, ffn.b_in)
    act = ACTIVATIONS[ffn.activation]
    h = act(a[..., 0::2]) * a[..., 1::2] if ffn.gated else act(a)
    return F.linear(h, ffn.w_out, ffn.b_out)


def node_by_target(gm: fx.GraphModule, target) -> fx.Node:
    nodes = [n for n in gm.graph.nodes if n.target == target]
    assert len(nodes) == 1, [n.format_node() for n in gm.graph.nodes]
    return nodes[0]


class Conv1D(nn.Module):
    """GPT-2's Conv1D: weight stored [in, out], y = x @ W + b."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * nx ** -0.5)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


class NewGELU(nn.Module):
    """HF's NewGELUActivation, written out: the tanh approximation, without calling F.gelu."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class Plain(nn.Module):
    def __init__(self, act: nn.Module = None, bias: bool = True, width: int = W, out: int = H):
        super().__init__()
        self.fc1, self.act, self.drop = nn.Linear(H, width, bias=bias), act or nn.ReLU(), nn.Dropout(0.1)
        self.fc2 = nn.Linear(width, out, bias=bias)

    def forward(self, x):
        return x + self.drop(self.fc2(self.drop(self.act(self.drop(self.fc1(x))))))


class Gated(nn.Module):
    def __init__(self, gate_bias: bool = False, swap: bool = False):
        super().__init__()
        self.gate, self.up = nn.Linear(H, W, bias=gate_bias), nn.Linear(H, W, bias=False)
        self.down, self.drop, self.swap = nn.Linear(W, H, bias=False), nn.Dropout(0.1), swap

    def forward(self, x):
        gate, up = F.silu(self.gate(x)), self.up(x)
        return self.down(self.drop(up * gate if self.swap else gate * up))


def setup_function(_):
    torch.manual_seed(0)


# ---------------------------------------------------------------- affine_map

def test_affine_map_of_linear_is_its_weight_and_bias_even_when_square():
    for out_features in (W, H):  # H x H is square: W.T has the right shape too and must not be picked
        linear = nn.Linear(H, out_features)
        weight, bias = affine_map(linear)
        assert torch.equal(weight, linear.weight) and torch.equal(bias, linear.bias)
    weight, bias = affine_map(nn.Linear(H, W, bias=False))
    assert weight.shape == (W, H) and bias is None


def test_affine_map_of_transposed_conv1d_is_recognised_by_what_it_computes():
    for nf in (W, H):  # square Conv1D: the stored weight has the right shape but is the transpose
        conv = Conv1D(nf, H)
        weight, bias = affine_map(conv)
        assert torch.equal(weight, conv.weight.T) and torch.equal(bias, conv.bias)
        x = torch.randn(5, H)
        assert relative_error(F.linear(x, weight, bias), conv(x)) <= 1e-6


def test_affine_map_is_none_for_modules_that_are_not_one_affine_map():
    class ScaledLinear(nn.Linear):  # one weight and bias, but computes 2 * (x W^T + b)
        def forward(self, x):
            return 2 * super().forward(x)

    class Bilinear(nn.Module):  # two weight matrices
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Parameter(torch.randn(W, H)), nn.Parameter(torch.randn(W, H))

        def forward(self, x):
            return F.linear(x, self.a) * F.linear(x, self.b)

    not_affine = [ScaledLinear(H, W), Bilinear(), nn.LayerNorm(H), nn.Embedding(10, H),
                  nn.Sequential(nn.Linear(H, W)),  # has children: not a leaf
                  nn.ReLU()]
    for module in not_affine:
        assert affine_map(module) is None, module


# ---------------------------------------------------------------- elementwise_kind

class Steps(nn.Module):
    """One node of each kind elementwise_kind has to tell apart."""

    def __init__(self):
        super().__init__()
        self.relu, self.gelu, self.gelu_tanh, self.silu = nn.ReLU(), nn.GELU(), nn.GELU("tanh"), nn.SiLU()
        self.new_gelu, self.drop, self.identity = NewGELU(), nn.Dropout(0.5), nn.Identity()
        self.train_drop, self.norm, self.sigmoid = nn.Dropout(0.5).train(), nn.LayerNorm(H), nn.Sigmoid()
        self.softmax, self.relu6 = nn.Softmax(-1), nn.ReLU6()

    def forward(self, x):
        return (self.relu(x), self.gelu(x), self.gelu_tanh(x), self.silu(x), self.new_gelu(x), self.drop(x),
                self.identity(x), self.train_drop(x), self.norm(x), self.sigmoid(x), self.softmax(x),
                self.relu6(x),
                F.gelu(x, approximate="tanh"), F.silu(x), torch.relu(x), x.relu(), F.dropout(x, 0.3, False),
                torch.tanh(x), x * 2.0, x * x, F.leaky_relu(x, 0.01))


def test_elementwise_kind_names_contract_activations_and_identities_and_nothing_else():
    steps = Steps().eval()
    steps.train_drop.train()  # a training-mode dropout changes its input: not an identity step
    gm = trace(steps)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    kinds = [elementwise_kind(n, gm) for n in output.args[0]]
    expected = {"nn.ReLU": "relu", "nn.GELU": "gelu", "nn.GELU(tanh)": "gelu_tanh", "nn.SiLU": "silu",
                "NewGELU": "gelu_tanh", "nn.Dropout(eval)": "identity", "nn.Identity": "identity",
                "nn.Dropout(train)": None, "nn.LayerNorm": None, "nn.Sigmoid": None, "nn.Softmax": None,
                "nn.ReLU6": None, "F.gelu(tanh)": "gelu_tanh", "F.silu": "silu", "torch.relu": "relu",
                "Tensor.relu": "relu", "F.dropout(training=False)": "identity", "torch.tanh": None, "x * 2": None,
                "x * x": None, "F.leaky_relu": None}
    assert dict(zip(expected, kinds)) == expected and len(kinds) == len(expected)


def test_elementwise_kind_is_none_for_placeholders_and_attributes():
    gm = trace(Plain())
    assert elementwise_kind(node_by_target(gm, "x"), gm) is None
    assert elementwise_kind(node_by_target(gm, "fc1"), gm) is None  # a Linear has parameters


# ---------------------------------------------------------------- find_ffns: patterns found

@pytest.mark.parametrize("act,kind", [(nn.ReLU(), "relu"), (nn.GELU(), "gelu"), (NewGELU(), "gelu_tanh"),
                                      (nn.SiLU(), "silu")], ids=["relu", "gelu", "new_gelu", "silu"])
def test_plain_ffn_with_dropouts_between_steps_is_found_with_its_nodes_and_weights(act, kind):
    module = Plain(act).eval().double()
    gm, ffns, rejected = find(module)
    assert rejected == [] and len(ffns) == 1
    ffn = ffns[0]
    assert (ffn.name, ffn.piece, ffn.activation, ffn.gated, ffn.width, ffn.hidden) == ("fc2", "", kind, False, W, H)
    assert ffn.input_node is node_by_target(gm, "x")
    assert ffn.output_node is node_by_target(gm, "fc2") and ffn.out_module is module.fc2
    # fc2, fc1, act and the two dropouts inside the FFN; the dropout after fc2 stays outside it
    assert sorted(str(n.target) for n in ffn.nodes) == ["act", "drop", "drop", "fc1", "fc2"]
    outside = [n for n in gm.graph.nodes if n.target == "drop" and n not in ffn.nodes]
    assert [n.args[0] for n in outside] == [ffn.output_node]
    assert torch.equal(ffn.w_in, module.fc1.weight) and torch.equal(ffn.b_in, module.fc1.bias)
    assert torch.equal(ffn.w_out, module.fc2.weight) and torch.equal(ffn.b_out, module.fc2.bias)
    x = torch.randn(3, 5, H, dtype=torch.float64)
    assert relative_error(x + dense(ffn, x), module(x)) <= 1e-12


def test_gated_ffn_interleaves_gate_and_up_rows_and_zero_fills_a_missing_bias():
    module = Gated(gate_bias=True).eval().double()
    gm, ffns, rejected = find(module)
    assert rejected == [] and len(ffns) == 1
    ffn = ffns[0]
    assert (ffn.name, ffn.activation, ffn.gated, ffn.width, ffn.hidden) == ("down", "silu", True, W, H)
    assert ffn.w_in.shape == (2 * W, H)
    assert torch.equal(ffn.w_in[0::2], module.gate.weight) and torch.equal(ffn.w_in[1::2], module.up.weight)
    assert torch.equal(ffn.b_in[0::2], module.gate.bias) and torch.equal(ffn.b_in[1::2], torch.zeros(W).double())
    assert ffn.b_out is None
    kinds = sorted(str(n.target) for n in ffn.nodes if n.op == "call_module")
    assert kinds == ["down", "drop", "gate", "up"]
    assert sum(n.target is F.silu for n in ffn.nodes) == 1 and len(ffn.nodes) == 6  # + silu and mul
    x = torch.randn(7, H, dtype=torch.float64)
    assert relative_error(dense(ffn, x), module(x)) <= 1e-12


def test_gated_ffn_is_found_whichever_side_of_the_product_the_activation_is_on():
    for swap in (False, True):
        module = Gated(swap=swap).eval().double()
        _, ffns, _ = find(module)
        assert len(ffns) == 1 and ffns[0].gated
        assert torch.equal(ffns[0].w_in[0::2], module.gate.weight), "the activated branch is the gate"
        assert ffns[0].b_in is None
        x = torch.randn(7, H, dtype=torch.float64)
        assert relative_error(dense(ffns[0], x), module(x)) <= 1e-12


def test_gpt2_style_conv1d_ffn_is_found_with_weights_in_linear_layout():
    class GPT2MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc, self.c_proj, self.act = Conv1D(W, H), Conv1D(H, W), NewGELU()

        def forward(self, x):
            return self.c_proj(self.act(self.c_fc(x)))

    module = GPT2MLP().double()
    _, ffns, rejected = find(module)
    assert rejected == [] and len(ffns) == 1
    ffn = ffns[0]
    assert (ffn.activation, ffn.w_in.shape, ffn.w_out.shape) == ("gelu_tanh", (W, H), (H, W))
    assert torch.equal(ffn.w_in, module.c_fc.weight.T) and torch.equal(ffn.w_out, module.c_proj.weight.T)
    x = torch.randn(2, 3, H, dtype=torch.float64)
    assert relative_error(dense(ffn, x), module(x)) <= 1e-12


def test_functional_activation_and_two_ffns_in_one_graph_are_both_found_in_order():
    class TwoFFNs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a1, self.a2 = nn.Linear(H, W), nn.Linear(W, H)
            self.b1, self.b2 = nn.Linear(H, 2 * W), nn.Linear(2 * W, H)

        def forward(self, x):
            x = x + self.a2(F.gelu(self.a1(x), approximate="tanh"))
            return x + self.b2(self.b1(x).relu())

    module = TwoFFNs().double()
    _, ffns, _ = find(module)
    assert [(f.name, f.activation, f.width) for f in ffns] == [("a2", "gelu_tanh", W), ("b2", "relu", 2 * W)]


def test_ffn_inside_a_piece_is_named_and_looked_up_by_its_model_level_path():
    model = nn.Sequential(nn.Linear(H, H), nn.Sequential(Plain())).eval()
    piece = model[1]
    gm = trace(piece)
    affine = affine_leaves(model)  # keys "0", "1.0.fc1", "1.0.fc2"
    ffns, _ = find_ffns(gm, "1", affine)
    assert [(f.piece, f.name) for f in ffns] == [("1", "1.0.fc2")]
    assert find_ffns(gm, "", affine) == ([], []), "piece-relative names are not the model's: nothing matches"


# ---------------------------------------------------------------- find_ffns: rejected with a reason

def test_hidden_activation_read_outside_the_ffn_is_rejected_not_converted():
    class Leaky(Plain):
        def forward(self, x):
            h = self.act(self.fc1(x))
            return self.fc2(h), h.mean()

    _, ffns, rejected = find(Leaky())
    assert ffns == []
    assert len(rejected) == 1 and rejected[0].startswith("fc2: the hidden activation is also used outside")


def test_pre_activation_read_outside_the_ffn_is_rejected():
    class Leaky(Plain):
        def forward(self, x):
            a = self.fc1(x)
            return self.fc2(self.act(a)), a

    _, ffns, rejected = find(Leaky())
    assert ffns == [] and len(rejected) == 1 and "also used outside" in rejected[0]


def test_gated_branch_read_outside_the_ffn_is_rejected():
    class Leaky(Gated):
        def forward(self, x):
            up = self.up(x)
            return self.down(F.silu(self.gate(x)) * up), up

    _, ffns, rejected = find(Leaky())
    assert ffns == []
    assert len(rejected) == 1 and rejected[0].startswith("down: a gated branch is also used outside")


def test_ffn_whose_output_width_differs_from_its_input_width_is_rejected():
    _, ffns, rejected = find(nn.Sequential(nn.Linear(H, W), nn.ReLU(), nn.Linear(W, 2 * H)))
    assert ffns == []
    assert len(rejected) == 1 and rejected[0].startswith("2: widths do not chain")


# ---------------------------------------------------------------- find_ffns: an FFN's shape, but no pattern: named

def assert_named_unmatched(module: nn.Module, out: str, *args) -> None:
    _, ffns, rejected = find(module)
    assert ffns == [] and len(rejected) == 1 and rejected[0].startswith(f"{out}: ") and (
        "has an FFN's shape, but what lies between matches no FFN pattern" in rejected[0]), rejected


@pytest.mark.parametrize("between", [
    nn.Identity(),                      # two stacked Linears: no activation
    nn.Sigmoid(),                       # not one of the contract's activations
    nn.Dropout(0.5).train(),            # training dropout: neither identity nor activation
    nn.LayerNorm(W),                    # parameters: not element-wise
], ids=["identity", "sigmoid", "train_dropout", "layernorm"])
def test_linear_pairs_without_a_contract_activation_between_them_are_not_ffns_and_are_named(between):
    model = nn.Sequential(nn.Linear(H, W), between, nn.Linear(W, H)).eval()
    model[1].train(between.training)
    assert_named_unmatched(model, "2")


def test_gate_and_up_reading_different_inputs_is_not_a_gated_ffn():
    class TwoInputs(Gated):
        def forward(self, x, y):
            return self.down(F.silu(self.gate(x)) * self.up(y))

    assert_named_unmatched(TwoInputs(), "down")


def test_product_with_an_unprojected_tensor_is_not_a_gated_ffn():
    class NoUp(Gated):
        def forward(self, x):
            return self.down(F.silu(self.gate(x)) * self.up(x).sigmoid())

    assert_named_unmatched(NoUp(), "down")


# ---------------------------------------------------------------- known wrong answers (library bugs)

def test_relu_capped_above_the_probe_range_is_not_taken_for_relu():
    class Capped(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(H, W), nn.Linear(W, H)

        def forward(self, x):
            return self.fc2(torch.clamp(self.fc1(x), min=0.0, max=10.0))

    assert find(Capped())[1] == []
