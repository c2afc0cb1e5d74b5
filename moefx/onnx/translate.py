"""ONNX translations of ``torch.ops.moefx.moe`` (the contract in ``moefx/op.py``).

Two lowerings of the same formula:

* ``contrib_moe``: one ``com.microsoft.MoE`` node (onnxruntime's fused sparse MoE kernel) behind
  the router MatMul. It softmaxes the logits itself, picks the top k, optionally renormalises,
  and runs only the selected experts. ``contrib_blocker`` says when a layer does not fit it.
* ``standard_moe``: standard ONNX ops only (opset 18), every expert of every token as two
  large GEMMs, weighted by a dense [T, E] combine matrix that is zero off the top-k choices.

Why dense for the standard path: the alternative without per-expert unrolling gathers each
token's k expert matrices (Gather on the stacked weights + batched MatMul). That copies
T·k·F·H weights per call (1024 tokens of a carved MiniLM with k=2: 600 MB of traffic against
2.4 MB of weights) and turns GEMMs into memory-bound GEMVs, so it only pays off when T·k < E.
The dense form costs E/k times the sparse FLOPs, but as two GEMMs with static inner shapes;
for a carved MoE (E experts of width F/E) it is exactly the dense FFN's cost. Sparse execution
is what the contrib op is for.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

from onnx.defs import OpSchema
from onnxscript import ir
from onnxscript import opset18 as op
from onnxscript.values import Op, Opset

from moefx.op import MoEAttrs, MoEInputs


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """One moefx::moe call as the translation sees it: the op's attributes plus what its tensors fix."""

    attrs: MoEAttrs
    num_experts: int
    num_const: int
    dtype: str
    has_b_in: bool
    has_b_out: bool

    def __getattr__(self, name: str):
        if name == "attrs":  # not set yet (copy, unpickling): no attribute to delegate to
            raise AttributeError(name)
        return getattr(self.attrs, name)

    def describe(self) -> str:
        const = f", {self.num_const} constant experts" if self.num_const else ""
        return f"{self.num_experts} experts {self.attrs.describe()}{const}"


# activation -> com.microsoft.MoE activation_type, by gated; tanh-GELU because that is what
# its CPU kernel computes for "gelu" (2e-4 away from erf-GELU on a small layer).
CONTRIB_ACTIVATIONS = {
    (False, "relu"): "relu",
    (False, "silu"): "silu",
    (False, "gelu_tanh"): "gelu",
    (True, "silu"): "swiglu",
    (True, "gelu_tanh"): "geglu",
}
APPROXIMATIONS = {"gelu": "gelu_tanh"}
CONTRIB_DTYPES = ("FLOAT", "FLOAT16")


def contrib_activation(cfg: MoEConfig, approximate: bool) -> Optional[str]:
    """The contrib activation_type for the layer (tanh-GELU standing in for GELU only if approximate)."""
    activation = APPROXIMATIONS.get(cfg.activation, cfg.activation) if approximate else cfg.activation
    return CONTRIB_ACTIVATIONS.get((cfg.gated, activation))


def contrib_blocker(cfg: MoEConfig, approximate: bool) -> Optional[str]:
    """Why com.microsoft.MoE cannot compute this layer exactly, naming the attribute; None if it can."""
    if cfg.scoring != "softmax":
        return (f"scoring={cfg.scoring!r}: com.microsoft.MoE weights experts by softmax probabilities only "
                "(a carved MoE's unit gates or sigmoid scores are not expressible)")
    if cfg.top_p < 1.0:
        return f"top_p={cfg.top_p} (dynamic-k routing): com.microsoft.MoE always runs exactly k experts"
    if cfg.num_zero or cfg.num_copy or cfg.num_const:
        return (f"zero-computation experts (num_zero={cfg.num_zero}, num_copy={cfg.num_copy}, "
                f"num_const={cfg.num_const}): com.microsoft.MoE has FFN experts only")
    if cfg.dtype not in CONTRIB_DTYPES:
        return f"dtype {cfg.dtype}: com.microsoft.MoE takes float or float16"
    if contrib_activation(cfg, approximate) is None:
        gated = "gated=True, " if cfg.gated else ""
        hint = " (pass approximate=True to accept tanh-GELU)" if cfg.activation in APPROXIMATIONS else ""
        return f"{gated}activation={cfg.activation!r}: com.microsoft.MoE has no such activation{hint}"
    return None


def contrib_attributes(cfg: MoEConfig, approximate: bool) -> dict:
    """The com.microsoft.MoE attributes for an expressible layer."""
    activation_type = contrib_activation(cfg, approximate)
    attributes = {"k": cfg.top_k, "activation_type": activation_type,
                  "normalize_routing_weights": int(cfg.renormalize)}
    if cfg.gated:
        # interleaved gate/up rows, as in the contract; alpha=1, beta=0 make its SwiGLU silu(g)·u
        attributes.update(swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0)
    return attributes


def _contrib_schema() -> OpSchema:
    """The part of com.microsoft.MoE's schema we emit (onnx ships no schema for contrib ops)."""
    param, optional = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    inputs = [param("input", "T"), param("router_probs", "T"), param("fc1_experts_weights", "T"),
              param("fc1_experts_bias", "T", param_option=optional), param("fc2_experts_weights", "T"),
              param("fc2_experts_bias", "T", param_option=optional)]
    attr = OpSchema.Attribute
    attributes = [attr("k", OpSchema.AttrType.INT, ""), attr("activation_type", OpSchema.AttrType.STRING, ""),
                  attr("normalize_routing_weights", OpSchema.AttrType.INT, ""),
                  attr("swiglu_fusion", OpSchema.AttrType.INT, ""),
                  attr("activation_alpha", OpSchema.AttrType.FLOAT, ""),
                  attr("activation_beta", OpSchema.AttrType.FLOAT, "")]
    return OpSchema("MoE", "com.microsoft", 1, inputs=inputs, outputs=[param("output", "T")],
                    type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "")], attributes=attributes)


CONTRIB_MOE = Op(Opset("com.microsoft", 1), "MoE", _contrib_schema())


def config_of(inputs: MoEInputs, attrs: MoEAttrs) -> MoEConfig:
    """Read the static configuration from the traced op's arguments."""
    return MoEConfig(attrs, num_experts=_static_dim(inputs.w_in, 0),
                     num_const=0 if inputs.const_experts is None else _static_dim(inputs.const_experts, 0),
                     dtype=inputs.x.dtype.name, has_b_in=inputs.b_in is not None, has_b_out=inputs.b_out is not None)


def _static_dim(value, axis: int) -> int:
    dim = value.shape[axis]
    if not isinstance(dim, int):
        raise ValueError(f"moefx ONNX export: {value.name} has a symbolic dimension {axis}; "
                         "expert weights must be parameters with static shapes")
    return dim


def router_logits(router_input, w_router, b_router):
    logits = op.MatMul(router_input, op.Transpose(w_router, perm=[1, 0]))
    return logits if b_router is None else op.Add(logits, b_router)


def contrib_moe(inputs: MoEInputs, cfg: MoEConfig, approximate: bool):
    """One com.microsoft.MoE node; gate_scale (a scalar on every gate) becomes a Mul on its output."""
    x, router_input, w_router, b_router, w_in, b_in, w_out, b_out, _ = inputs
    logits = router_logits(router_input, w_router, b_router)
    y = CONTRIB_MOE(x, logits, w_in, b_in, w_out, b_out, **contrib_attributes(cfg, approximate))
    return y if cfg.gate_scale == 1.0 else op.Mul(y, cfg.gate_scale)


def _activation(a, name: str):
    if name == "relu":
        return op.Relu(a)
    if name == "silu":
        return op.Mul(a, op.Sigmoid(a))
    if name == "quick_gelu":
        return op.Mul(a, op.Sigmoid(op.Mul(a, 1.702)))
    if name == "relu2":
        relu = op.Relu(a)
        return op.Mul(relu, relu)
    if name == "gelu":
        return op.Mul(op.Mul(a, 0.5), op.Add(op.Erf(op.Mul(a, 1 / math.sqrt(2))), 1.0))
    inner = op.Mul(op.Add(a, op.Mul(op.Mul(op.Mul(a, a), a), 0.044715)), math.sqrt(2 / math.pi))
    return op.Mul(op.Mul(a, 0.5), op.Add(op.Tanh(inner), 1.0))


def _columns(t, start: int, stop: int):
    return op.Slice(t, [start], [stop], [1])


def combine_matrix(router_input, w_router, b_router, attrs: MoEAttrs):
    """The dense [T, E+Z] gate matrix: g_e on each token's kept choices, 0 elsewhere (``moefx.op.route``)."""
    top_k, scoring, renormalize, top_p, min_k, gate_scale = (attrs.top_k, attrs.scoring, attrs.renormalize,
                                                             attrs.top_p, attrs.min_k, attrs.gate_scale)
    logits = router_logits(router_input, w_router, b_router)
    if scoring == "softmax":
        scores = op.Softmax(logits, axis=-1)
    elif scoring == "sigmoid":
        scores = op.Sigmoid(logits)
    else:
        scores = logits
    top_scores, ids = op.TopK(scores, [top_k], axis=-1, largest=1, sorted=1)
    gates = op.Expand(op.CastLike(1.0, top_scores), op.Shape(top_scores)) if scoring == "unit" else top_scores
    if top_p < 1.0:
        probs = scores if scoring == "softmax" else op.Softmax(logits, axis=-1)
        chosen = op.GatherElements(probs, ids, axis=1)
        mass_before = op.CumSum(chosen, op.Constant(value_int=1), exclusive=1)
        rank = op.Constant(value_ints=list(range(top_k)))
        keep = op.Or(op.Less(rank, min_k), op.Less(mass_before, op.CastLike(top_p, mass_before)))
        gates = op.Mul(gates, op.CastLike(keep, gates))
    if renormalize:
        gates = op.Div(gates, op.ReduceSum(gates, [1], keepdims=1))
    if gate_scale != 1.0:
        gates = op.Mul(gates, gate_scale)
    zeros = op.Expand(op.CastLike(0.0, gates), op.Shape(logits))
    return op.ScatterElements(zeros, ids, gates, axis=1)


def standard_moe(inputs: MoEInputs, attrs: MoEAttrs):
    """All experts as two GEMMs over the stacked weights, combined by the dense gate matrix."""
    x, router_input, w_router, b_router, w_in, b_in, w_out, b_out, const_experts = inputs
    activation, gated, num_zero, num_copy = attrs.activation, attrs.gated, attrs.num_zero, attrs.num_copy
    num_experts, in_rows, hidden = (_static_dim(w_in, axis) for axis in range(3))
    width = in_rows // 2 if gated else in_rows
    out_dtype = x.dtype
    upcast = out_dtype not in (ir.DataType.FLOAT, ir.DataType.DOUBLE)  # the contract accumulates in fp32
    if upcast:
        x, router_input, w_router, b_router, w_in, b_in, w_out, b_out, const_experts = (
            None if t is None else op.Cast(t, to=ir.DataType.FLOAT)
            for t in (x, router_input, w_router, b_router, w_in, b_in, w_out, b_out, const_experts))
    combine = combine_matrix(router_input, w_router, b_router, attrs)
    routed = _columns(combine, 0, num_experts)

    w_in_stacked = op.Reshape(op.Transpose(w_in, perm=[2, 0, 1]), [hidden, num_experts * in_rows])
    a = op.MatMul(x, w_in_stacked)
    if b_in is not None:
        a = op.Add(a, op.Reshape(b_in, [num_experts * in_rows]))
    if gated:
        pairs = op.Reshape(a, [-1, num_experts * width, 2])  # row 2j is gate j, row 2j+1 is up j
        h = op.Mul(_activation(op.Gather(pairs, op.Constant(value_int=0), axis=2), activation),
                   op.Gather(pairs, op.Constant(value_int=1), axis=2))
    else:
        h = _activation(a, activation)
    weighted = op.Mul(op.Reshape(h, [-1, num_experts, width]), op.Unsqueeze(routed, [2]))
    w_out_stacked = op.Reshape(op.Transpose(w_out, perm=[0, 2, 1]), [num_experts * width, hidden])
    y = op.MatMul(op.Reshape(weighted, [-1, num_experts * width]), w_out_stacked)
    if b_out is not None:
        y = op.Add(y, op.MatMul(routed, b_out))
    if num_copy:
        start = num_experts + num_zero
        y = op.Add(y, op.Mul(x, op.ReduceSum(_columns(combine, start, start + num_copy), [1], keepdims=1)))
    if const_experts is not None:
        start = num_experts + num_zero + num_copy
        y = op.Add(y, op.MatMul(_columns(combine, start, start + _static_dim(const_experts, 0)), const_experts))
    return op.Cast(y, to=out_dtype) if upcast else y
