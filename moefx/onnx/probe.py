"""Does the installed onnxruntime run com.microsoft.MoE correctly for a given attribute set?

Checked once per attribute set and process on a one-layer model against ``moefx.op.moe_reference``:
the contrib op's support differs across onnxruntime versions and execution providers (fused
SwiGLU layouts, GEGLU, fp16), so ``target="auto"`` trusts a measurement, not a version table.
Unit-gated and sigmoid-scored layers are probed with the inputs ``translate.routed_log_gates`` feeds
the op (log-gates, -inf off the chosen experts) and its output scaled back as the translation does.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import onnx
import torch
from onnx import helper

from moefx.op import MoEAttrs, MoEInputs, moe_reference, route
from moefx.onnx.translate import APPROXIMATIONS, MoEConfig, contrib_attributes

# relative error ||out - ref|| / ||ref|| the contrib op must reach to be used
TOLERANCE = {"FLOAT": 1e-5, "FLOAT16": 3e-3}
TORCH_DTYPES = {"FLOAT": torch.float32, "FLOAT16": torch.float16}


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    ok: bool
    rel_error: float
    detail: str


def probe_contrib(cfg: MoEConfig, approximate: bool) -> ProbeResult:
    """Run the layer's contrib attributes on a small random layer in onnxruntime CPU and compare."""
    attributes = contrib_attributes(cfg, approximate)
    return _probe(tuple(sorted(attributes.items())), cfg.gated, cfg.has_b_in, cfg.has_b_out, cfg.dtype,
                  APPROXIMATIONS.get(cfg.activation, cfg.activation) if approximate else cfg.activation,
                  cfg.scoring, cfg.renormalize)


@functools.cache
def _probe(attributes: tuple, gated: bool, has_b_in: bool, has_b_out: bool, dtype: str,
           activation: str, scoring: str, renormalize: bool) -> ProbeResult:
    import onnxruntime as ort

    attrs = dict(attributes)
    top_k, tokens, hidden, width = attrs["k"], 24, 16, 8
    num_experts = top_k + 2
    gen = torch.Generator().manual_seed(0)
    rand = functools.partial(torch.randn, generator=gen)
    tensors = {"x": rand(tokens, hidden), "w_router": rand(num_experts, hidden),
               "w_in": rand(num_experts, 2 * width if gated else width, hidden) / hidden ** 0.5,
               "b_in": rand(num_experts, 2 * width if gated else width) if has_b_in else None,
               "w_out": rand(num_experts, hidden, width) / width ** 0.5,
               "b_out": rand(num_experts, hidden) if has_b_out else None}
    tensors = {k: None if v is None else v.to(TORCH_DTYPES[dtype]) for k, v in tensors.items()}
    t = tensors
    inputs = MoEInputs(t["x"], t["x"], t["w_router"], None, t["w_in"], t["b_in"], t["w_out"], t["b_out"], None)
    moe_attrs = MoEAttrs(top_k, activation, gated, scoring, renormalize)
    reference = moe_reference(inputs, moe_attrs).float()
    model = _one_layer_model(t, attrs, dtype, routed=scoring != "softmax")
    feeds, scale = {"x": t["x"].numpy()}, 1.0
    if scoring != "softmax":  # routed outside the op: what routed_log_gates computes
        gates, ids = route(t["x"], t["w_router"], None, moe_attrs)
        scores = torch.full((tokens, num_experts), -math.inf).scatter(1, ids, gates.log())
        feeds["logits"], scale = scores.to(TORCH_DTYPES[dtype]).numpy(), gates.sum(-1, keepdim=True).numpy()
    options = ort.SessionOptions()
    options.log_severity_level = 4  # a failing probe is an answer, not an error to print
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        (out,) = session.run(None, feeds)
    except Exception as exc:  # onnxruntime raises plain RuntimeErrors (NOT_IMPLEMENTED, Fail)
        return ProbeResult(False, float("nan"), f"onnxruntime {ort.__version__} failed: {exc}".splitlines()[0])
    out = out.astype(np.float32) * scale
    rel = float(np.linalg.norm(out - reference.numpy()) / np.linalg.norm(reference.numpy()))
    ok = rel <= TOLERANCE[dtype]
    verdict = "matches" if ok else "does not match"
    return ProbeResult(ok, rel, f"onnxruntime {ort.__version__} CPU {verdict} the reference "
                                f"(relative error {rel:.1e}, tolerance {TOLERANCE[dtype]:.0e})")


def _one_layer_model(tensors: dict, attributes: dict, dtype: str, routed: bool) -> onnx.ModelProto:
    """x -> router MatMul -> MoE, or, ``routed``, the MoE fed its router scores as a second input."""
    elem = getattr(onnx.TensorProto, dtype)
    inits = [helper.make_tensor(name, elem, t.shape, t.contiguous().view(torch.uint8).numpy().tobytes(), raw=True)
             for name, t in tensors.items() if t is not None and name not in ("x", "w_router")]
    inits.append(helper.make_tensor("w_router_t", elem, tensors["w_router"].T.shape,
                                    tensors["w_router"].T.contiguous().view(torch.uint8).numpy().tobytes(),
                                    raw=True))
    moe_inputs = ["x", "logits", "w_in", "b_in" if tensors["b_in"] is not None else "", "w_out",
                  "b_out" if tensors["b_out"] is not None else ""]
    nodes = [helper.make_node("MoE", moe_inputs, ["y"], domain="com.microsoft", **attributes)]
    (tokens, hidden), num_experts = tensors["x"].shape, tensors["w_router"].shape[0]
    graph_inputs = [helper.make_tensor_value_info("x", elem, [tokens, hidden])]
    if routed:
        graph_inputs.append(helper.make_tensor_value_info("logits", elem, [tokens, num_experts]))
    else:
        nodes.insert(0, helper.make_node("MatMul", ["x", "w_router_t"], ["logits"]))
    graph = helper.make_graph(nodes, "moe_probe", graph_inputs,
                              [helper.make_tensor_value_info("y", elem, [tokens, hidden])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                   helper.make_opsetid("com.microsoft", 1)])
