"""ONNX translations of moefx::moe on one-layer models: every contract feature through both standard
lowerings (sparse and dense), the expressible ones (softmax, unit and sigmoid gates) through
com.microsoft.MoE, run in onnxruntime CPU at shapes other than the example's (dynamic batch and
sequence axes); the sparse lowering also in the ONNX reference evaluator."""
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx.reference import ReferenceEvaluator
from torch import nn

from moefx.op import MoEAttrs, MoEInputs, moe_op
from moefx.onnx import UnsupportedLayerError, export_onnx, run_onnx
from moefx.onnx.probe import probe_contrib
from moefx.onnx.translate import SPARSE_NODES_PER_EXPERT, MoEConfig, contrib_blocker

HIDDEN, WIDTH = 16, 8
EXAMPLE = (2, 3)
CHECK_SHAPES = ((3, 5), (1, 9))
CONTRIB = "com.microsoft::MoE"


class OneLayer(nn.Module):
    """A moefx::moe call on [batch, seq, hidden] inputs, optionally routed from a second input."""

    def __init__(self, num_experts=4, top_k=2, activation="relu", gated=False, scoring="softmax",
                 renormalize=False, top_p=1.0, min_k=1, gate_scale=1.0, num_zero=0, num_copy=0, num_const=0,
                 bias=True, pre_gating=False, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        total = num_experts + num_zero + num_copy + num_const
        rows = 2 * WIDTH if gated else WIDTH

        def param(*shape, scale=1.0):
            return nn.Parameter(torch.randn(*shape, generator=gen) * scale)

        self.w_router, self.b_router = param(total, HIDDEN), param(total) if bias else None
        self.w_in, self.b_in = param(num_experts, rows, HIDDEN, scale=HIDDEN ** -0.5), param(num_experts, rows) if bias else None
        self.w_out, self.b_out = param(num_experts, HIDDEN, WIDTH, scale=WIDTH ** -0.5), param(num_experts, HIDDEN) if bias else None
        self.const_experts = param(num_const, HIDDEN) if num_const else None
        self.pre_gating = pre_gating
        self.attrs = MoEAttrs(top_k=top_k, activation=activation, gated=gated, scoring=scoring,
                              renormalize=renormalize, top_p=top_p, min_k=min_k, gate_scale=gate_scale,
                              num_zero=num_zero, num_copy=num_copy)

    def forward(self, x, route_from):
        flat = x.reshape(-1, HIDDEN)
        router_input = route_from.reshape(-1, HIDDEN) if self.pre_gating else flat
        y = moe_op(MoEInputs(flat, router_input, self.w_router, self.b_router, self.w_in, self.b_in, self.w_out,
                             self.b_out, self.const_experts), self.attrs)
        return torch.tanh(y).reshape(x.shape)  # an op after the MoE, as in a real model


def inputs(batch, seq, dtype=torch.float32):
    return torch.randn(batch, seq, HIDDEN).to(dtype), torch.randn(batch, seq, HIDDEN).to(dtype)


def assert_matches_pytorch(path, model, tol=1e-4, dtype=torch.float32):
    for shape in CHECK_SHAPES:
        args = inputs(*shape, dtype)
        expected = model(*args).detach()
        actual = run_onnx(path, *args)[0]
        assert actual.shape == expected.shape
        err = (actual.float() - expected.float()).abs().max().item()
        assert err <= tol, f"max abs error {err:.2e} at batch, seq = {shape}"


EVERY_FEATURE = {
    "relu": dict(),
    "silu_renormalized": dict(activation="silu", renormalize=True),
    "gelu_tanh": dict(activation="gelu_tanh"),
    "swiglu": dict(activation="silu", gated=True, renormalize=True),
    "gate_scale_no_bias": dict(activation="silu", gated=True, gate_scale=2.5, bias=False),
    "pre_gating": dict(pre_gating=True, renormalize=True),
    "top_1": dict(top_k=1),
    "exact_gelu": dict(activation="gelu"),
    "geglu": dict(activation="gelu_tanh", gated=True),
    "reglu": dict(activation="relu", gated=True),
    "carved_unit": dict(scoring="unit", top_k=3, activation="gelu"),
    "carved_unit_relu": dict(scoring="unit", top_k=2, num_experts=8),
    "carved_unit_swiglu_k3": dict(scoring="unit", top_k=3, activation="silu", gated=True),
    "carved_unit_renormalized": dict(scoring="unit", top_k=2, renormalize=True, gate_scale=1.5),
    "sigmoid": dict(scoring="sigmoid", renormalize=True),
    "sigmoid_unnormalized": dict(scoring="sigmoid", activation="silu", gated=True, gate_scale=2.0),
    "dynamic_k": dict(top_k=3, top_p=0.6, min_k=1),
    "zero_computation": dict(num_zero=1, num_copy=1, num_const=1, top_k=3, renormalize=True),
}
CONTRIB_EXPRESSIBLE = ("relu", "silu_renormalized", "gelu_tanh", "swiglu", "gate_scale_no_bias", "pre_gating",
                       "top_1", "carved_unit_relu", "carved_unit_swiglu_k3", "carved_unit_renormalized", "sigmoid",
                       "sigmoid_unnormalized")


class Stack(nn.Module):
    """One layer per configuration, applied in turn: one export covers them all."""

    def __init__(self, configs):
        super().__init__()
        self.layers = nn.ModuleList(OneLayer(**cfg, seed=i) for i, cfg in enumerate(configs))

    def forward(self, x, route_from):
        for layer in self.layers:
            x = layer(x, route_from)
        return x


@pytest.mark.parametrize("target", ["standard", "standard-dense"])
def test_standard_ops_match_pytorch_for_every_contract_feature(target, tmp_path):
    model = Stack(EVERY_FEATURE.values()).eval()
    report = export_onnx(model, inputs(*EXAMPLE), tmp_path / "m.onnx", target=target)
    assert [layer.target for layer in report.layers] == [target] * len(EVERY_FEATURE)
    assert not any(op.startswith("com.microsoft::") for op in report.node_counts)
    assert report.max_abs_error <= 1e-4
    assert_matches_pytorch(tmp_path / "m.onnx", model)


def test_contrib_op_is_one_node_per_layer_and_matches_pytorch(tmp_path):
    model = Stack(EVERY_FEATURE[name] for name in CONTRIB_EXPRESSIBLE).eval()
    report = export_onnx(model, inputs(*EXAMPLE), tmp_path / "m.onnx", target="onnxruntime")
    assert report.node_counts[CONTRIB] == len(CONTRIB_EXPRESSIBLE)
    assert [layer.target for layer in report.layers] == ["onnxruntime"] * len(CONTRIB_EXPRESSIBLE)
    assert_matches_pytorch(tmp_path / "m.onnx", model)


def config(**overrides) -> MoEConfig:
    attrs = dict(top_k=2, activation="silu", gated=True, scoring="softmax", renormalize=True, top_p=1.0,
                 gate_scale=1.0, num_zero=0, num_copy=0)
    tensors = dict(num_experts=4, num_const=0, dtype="FLOAT", has_b_in=True, has_b_out=True)
    return MoEConfig(MoEAttrs(**{k: overrides.get(k, v) for k, v in attrs.items()}),
                     **{k: overrides.get(k, v) for k, v in tensors.items()})


@pytest.mark.parametrize("overrides, attribute", [
    (dict(top_p=0.6), "top_p=0.6"), (dict(num_zero=1), "num_zero=1"), (dict(num_const=2), "num_const=2"),
    (dict(gated=False, activation="gelu"), "activation='gelu'"), (dict(activation="relu"), "activation='relu'"),
    (dict(dtype="DOUBLE"), "dtype DOUBLE")])
def test_contrib_blocker_names_the_attribute(overrides, attribute):
    assert attribute in contrib_blocker(config(**overrides), approximate=False)


def test_contrib_blocker_accepts_what_the_op_expresses():
    assert contrib_blocker(config(), approximate=False) is None
    assert contrib_blocker(config(gate_scale=2.0, has_b_in=False), approximate=False) is None
    assert contrib_blocker(config(gated=False, activation="gelu"), approximate=True) is None
    assert contrib_blocker(config(scoring="unit", renormalize=False), approximate=False) is None
    assert contrib_blocker(config(scoring="sigmoid"), approximate=False) is None


def test_dynamic_k_layer_with_target_onnxruntime_is_a_clear_error(tmp_path):
    model = Stack([EVERY_FEATURE["swiglu"], EVERY_FEATURE["dynamic_k"]]).eval()
    with pytest.raises(UnsupportedLayerError, match="MoE layer 1 .*top_p=0.6.*target='standard'"):
        export_onnx(model, inputs(*EXAMPLE), tmp_path / "m.onnx", target="onnxruntime")


def test_auto_follows_the_probe_per_layer(tmp_path):
    """auto: contrib where expressible and the installed onnxruntime agrees (GEGLU depends on the build);
    dynamic-k and zero-computation layers fall back to sparse standard ops, with the reason reported."""
    names = ("swiglu", "carved_unit_relu", "dynamic_k", "geglu", "zero_computation")
    model = Stack(EVERY_FEATURE[name] for name in names).eval()
    report = export_onnx(model, inputs(*EXAMPLE), tmp_path / "m.onnx", target="auto")
    geglu_runs = probe_contrib(report.layers[3].config, approximate=False).ok
    expected = ["onnxruntime", "onnxruntime", "standard", "onnxruntime" if geglu_runs else "standard", "standard"]
    assert [layer.target for layer in report.layers] == expected, [layer.reason for layer in report.layers]
    assert "top_p=0.6" in report.layers[2].reason and "zero-computation" in report.layers[4].reason
    assert report.node_counts[CONTRIB] == expected.count("onnxruntime")
    assert_matches_pytorch(tmp_path / "m.onnx", model)


def test_exact_gelu_goes_to_contrib_only_when_asked_and_reports_the_deviation(tmp_path):
    model = OneLayer(activation="gelu").eval()
    exact = export_onnx(model, inputs(*EXAMPLE), tmp_path / "exact.onnx", target="auto")
    assert exact.layers[0].target == "standard" and not exact.approximated
    approx = export_onnx(model, inputs(*EXAMPLE), tmp_path / "approx.onnx", target="auto", approximate=True)
    assert approx.layers[0].target == "onnxruntime" and approx.approximated
    assert 0 < approx.max_abs_error < 1e-2  # tanh-GELU is measurably, but only slightly, off
    assert "approximation" in str(approx)


def test_dense_standard_graph_does_not_grow_with_the_number_of_experts(tmp_path):
    counts = [export_onnx(OneLayer(num_experts=e, activation="silu", gated=True).eval(), inputs(*EXAMPLE),
                          tmp_path / f"{e}.onnx", target="standard-dense", verify=False).node_counts for e in (4, 32)]
    assert counts[0] == counts[1]


def test_sparse_standard_graph_grows_by_a_few_nodes_per_expert(tmp_path):
    counts = [sum(export_onnx(OneLayer(num_experts=e, bias=False).eval(), inputs(*EXAMPLE), tmp_path / f"{e}.onnx",
                              target="standard", verify=False).node_counts.values()) for e in (4, 12)]
    assert counts[1] - counts[0] == 8 * SPARSE_NODES_PER_EXPERT


def test_sparse_standard_computes_only_the_chosen_experts_rows(tmp_path):
    """Each expert's first MatMul sees exactly the tokens routed to it (an intermediate output of the graph)."""
    model = OneLayer(num_experts=6, top_k=2, bias=False).eval()
    path = tmp_path / "m.onnx"
    export_onnx(model, inputs(*EXAMPLE), path, target="standard", verify=False)
    graph = onnx.load(path)
    first_matmuls = [n.output[0] for n in graph.graph.node if n.op_type == "MatMul"][1::2][:6]  # router MatMul first
    graph.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in first_matmuls)
    x, route_from = inputs(3, 5)
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    rows = [out.shape[0] for out in session.run(first_matmuls, {"x": x.numpy(), "route_from": route_from.numpy()})]
    ids = torch.topk(x.reshape(-1, HIDDEN) @ model.w_router.T, 2).indices
    assert rows == torch.bincount(ids.flatten(), minlength=6).tolist()
    assert sum(rows) == 2 * 15


def test_sparse_standard_runs_in_the_onnx_reference_evaluator(tmp_path):
    names = ("swiglu", "carved_unit_relu", "sigmoid_unnormalized", "dynamic_k", "zero_computation")
    model = Stack(EVERY_FEATURE[name] for name in names).eval()
    export_onnx(model, inputs(*EXAMPLE), tmp_path / "m.onnx", target="standard", verify=False)
    evaluator = ReferenceEvaluator(str(tmp_path / "m.onnx"))
    for shape in CHECK_SHAPES:
        x, route_from = inputs(*shape)
        (actual,) = evaluator.run(None, {"x": x.numpy(), "route_from": route_from.numpy()})
        err = (torch.from_numpy(actual) - model(x, route_from).detach()).abs().max().item()
        assert err <= 1e-4, f"max abs error {err:.2e} at batch, seq = {shape}"


def test_fp16_model_exports_with_fp32_accumulation(tmp_path):
    """fp16 weights and activations; compared with the same weights in fp32."""
    model = Stack([EVERY_FEATURE["swiglu"]] * 2).eval().half()
    reference = Stack([EVERY_FEATURE["swiglu"]] * 2).eval().half().float()
    report = export_onnx(model, inputs(*EXAMPLE, torch.float16), tmp_path / "m.onnx", target="auto", verify=False)
    assert report.node_counts[CONTRIB] == 2
    args = inputs(3, 5, torch.float16)
    err = (run_onnx(tmp_path / "m.onnx", *args)[0].float() - reference(*(a.float() for a in args))).abs().max()
    assert err < 1e-2


def test_bad_target_and_empty_dynamic_axis_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="target='tensorrt'"):
        export_onnx(OneLayer().eval(), inputs(*EXAMPLE), tmp_path / "m.onnx", target="tensorrt")
    with pytest.raises(ValueError, match="at least one entry"):
        export_onnx(OneLayer().eval(), inputs(0, 4), tmp_path / "m.onnx")


@pytest.mark.parametrize("example", [(1, 4), (1, 1)])
def test_batch_one_example_exports_with_dynamic_axes(example, tmp_path):
    model = OneLayer(scoring="unit").eval()
    report = export_onnx(model, inputs(*example), tmp_path / "m.onnx")
    assert report.max_abs_error <= 1e-4  # on the batch-1 example itself
    assert_matches_pytorch(tmp_path / "m.onnx", model)


def test_sparse_standard_runs_in_openvino(tmp_path):
    openvino = pytest.importorskip("openvino")
    names = ("swiglu", "carved_unit_relu", "sigmoid_unnormalized", "dynamic_k", "zero_computation")
    model = Stack(EVERY_FEATURE[name] for name in names).eval()
    export_onnx(model, inputs(1, 4), tmp_path / "m.onnx", target="standard", verify=False)
    compiled = openvino.Core().compile_model(str(tmp_path / "m.onnx"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    for shape in CHECK_SHAPES:
        x, route_from = inputs(*shape)
        actual = compiled({"x": x.numpy(), "route_from": route_from.numpy()})[compiled.output(0)]
        err = (torch.from_numpy(actual) - model(x, route_from).detach()).abs().max().item()
        assert err <= 1e-4, f"max abs error {err:.2e} at batch, seq = {shape}"


def test_sparse_standard_combine_adds_no_row_twice_in_one_scatter_so_threads_do_not_race(tmp_path):
    """onnxruntime's multi-threaded ScatterND(add) loses updates to a row that its indices name twice: each
    scatter of the combine names a token at most once, and 8 threads give the same output run after run."""
    model = OneLayer(num_experts=8, top_k=4, bias=False).eval()
    path = tmp_path / "m.onnx"
    export_onnx(model, inputs(*EXAMPLE), path, target="standard", verify=False)
    graph = onnx.load(path)
    indices = [n.input[1] for n in graph.graph.node if n.op_type == "ScatterND"]
    graph.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in indices)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 8
    session = ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
    x, route_from = inputs(64, 64)
    expected = model(x, route_from).detach().numpy()
    for _ in range(20):
        y, *scattered = session.run(None, {"x": x.numpy(), "route_from": route_from.numpy()})
        assert all(len(set(i.reshape(-1).tolist())) == i.size for i in scattered)
        assert abs(y - expected).max() <= 1e-4
