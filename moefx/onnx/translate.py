"""ONNX translations of ``torch.ops.moefx.moe`` (the contract in ``moefx/op.py``).

Three lowerings of the same formula:

* ``contrib_moe``: one ``com.microsoft.MoE`` node (onnxruntime's fused sparse MoE kernel). It
  softmaxes the router scores it is fed, picks the top k, optionally renormalises, and runs only the
  selected experts. Softmax-scored layers feed it the router logits. Unit-gated (carved) and
  sigmoid-scored layers route in the graph (TopK) and feed it log-gates: log g_e at the chosen
  experts, -inf elsewhere, so its softmax gives g_e / sum(g) and the output is scaled back by sum(g)
  (by k for unit gates: log 1 = 0, softmax 1/k, so exact for power-of-two k). ``contrib_blocker``
  says when a layer does not fit it.
* ``sparse_moe`` (target "standard"): standard ONNX ops only (opset 18); per expert, NonZero on its
  gate column selects its tokens, Gather, two MatMuls, and a ScatterND(add) adds its weighted rows
  back (one per expert, so that no scatter names a token twice: onnxruntime's multi-threaded
  ScatterND loses updates to a repeated index). Only the chosen experts' rows are computed; the
  graph grows linearly in the number of experts (``SPARSE_NODES_PER_EXPERT`` nodes each for a plain
  ReLU expert).
* ``dense_moe`` (target "standard-dense"): every expert of every token as two large GEMMs over the
  stacked weights, weighted by a dense [T, E] combine matrix that is zero off the top-k choices. The
  graph does not grow with the number of experts, but the work is the dense FFN's (E/k times the
  sparse FLOPs); it can win for tiny layers where per-expert op overhead dominates.
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
    # routed in the graph (unit, sigmoid): the op's softmax of log-gates already is g / sum(g)
    renormalize = cfg.renormalize and cfg.scoring == "softmax"
    attributes = {"k": cfg.top_k, "activation_type": activation_type,
                  "normalize_routing_weights": int(renormalize)}
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
    """One com.microsoft.MoE node behind the router. Softmax scoring: fed the logits, gate_scale a Mul on
    its output. Unit and sigmoid scoring: routed here (``routed_log_gates``), the output scaled back."""
    x, router_input, w_router, b_router, w_in, b_in, w_out, b_out, _ = inputs
    if cfg.scoring == "softmax":
        scores, scale = router_logits(router_input, w_router, b_router), cfg.gate_scale
    else:
        scores, scale = routed_log_gates(router_input, w_router, b_router, cfg.attrs)
        scores = op.CastLike(scores, x)
    y = CONTRIB_MOE(x, scores, w_in, b_in, w_out, b_out, **contrib_attributes(cfg, approximate))
    if isinstance(scale, float):
        return y if scale == 1.0 else op.Mul(y, op.CastLike(scale, y))
    return op.Mul(y, op.CastLike(scale, y))


def routed_log_gates(router_input, w_router, b_router, attrs: MoEAttrs):
    """(scores [T, E], scale) with softmax(scores) * scale = the contract's gates on the top-k choices, 0 elsewhere.

    scores are log g_e at the chosen experts and -inf elsewhere (measured: onnxruntime's MoE takes -inf
    and the lowest finite float alike), so the op's softmax gives g_e / sum_j g_j and picks exactly the
    chosen experts. Unit gates: scores 0, softmax 1/k, scale k (a constant; exact for power-of-two k,
    within an ulp of each expert's output otherwise). Sigmoid: scale sum_j g_j per token (1 if
    renormalised). Routing runs in fp32 as in the contract.
    """
    f32 = ir.DataType.FLOAT
    logits = router_logits(op.Cast(router_input, to=f32), op.Cast(w_router, to=f32),
                           None if b_router is None else op.Cast(b_router, to=f32))
    masked = op.Expand(op.Constant(value_float=-math.inf), op.Shape(logits))
    if attrs.scoring == "unit":
        _, ids = op.TopK(logits, [attrs.top_k], axis=-1, largest=1, sorted=1)
        scores = op.ScatterElements(masked, ids, op.Expand(op.Constant(value_float=0.0), op.Shape(ids)), axis=1)
        return scores, attrs.gate_scale * (1 if attrs.renormalize else attrs.top_k)
    gates, ids = op.TopK(op.Sigmoid(logits), [attrs.top_k], axis=-1, largest=1, sorted=1)
    scores = op.ScatterElements(masked, ids, op.Log(gates), axis=1)
    if attrs.renormalize:
        return scores, attrs.gate_scale
    return scores, op.Mul(op.ReduceSum(gates, [1], keepdims=1), attrs.gate_scale)


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
    if name == "gelu":  # in the form onnxruntime's GeluFusion turns into one Gelu node (x / sqrt 2, not x * 1/sqrt 2)
        return op.Mul(op.Mul(a, op.Add(op.Erf(op.Div(a, math.sqrt(2))), 1.0)), 0.5)
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


def _upcast(inputs: MoEInputs) -> tuple[MoEInputs, bool]:
    """The inputs in fp32 when they are narrower (the contract accumulates in fp32), and whether they were."""
    upcast = inputs.x.dtype not in (ir.DataType.FLOAT, ir.DataType.DOUBLE)
    if upcast:
        inputs = MoEInputs(*(None if t is None else op.Cast(t, to=ir.DataType.FLOAT) for t in inputs))
    return inputs, upcast


def _zero_computation(y, x, combine, num_experts: int, attrs: MoEAttrs, const_experts):
    """y plus the copy and constant experts' gated contributions (zero experts add nothing)."""
    if attrs.num_copy:
        start = num_experts + attrs.num_zero
        y = op.Add(y, op.Mul(x, op.ReduceSum(_columns(combine, start, start + attrs.num_copy), [1], keepdims=1)))
    if const_experts is not None:
        start = num_experts + attrs.num_zero + attrs.num_copy
        y = op.Add(y, op.MatMul(_columns(combine, start, start + _static_dim(const_experts, 0)), const_experts))
    return y


def dense_moe(inputs: MoEInputs, attrs: MoEAttrs):
    """All experts as two GEMMs over the stacked weights, combined by the dense gate matrix."""
    out_dtype = inputs.x.dtype
    (x, router_input, w_router, b_router, w_in, b_in, w_out, b_out, const_experts), upcast = _upcast(inputs)
    activation, gated = attrs.activation, attrs.gated
    num_experts, in_rows, hidden = (_static_dim(w_in, axis) for axis in range(3))
    width = in_rows // 2 if gated else in_rows
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
    y = _zero_computation(y, x, combine, num_experts, attrs, const_experts)
    return op.Cast(y, to=out_dtype) if upcast else y


# nodes one more expert adds to a sparse softmax-routed ReLU layer without biases (after torch.onnx's
# constant folding of the per-expert weight slices): Gather (gate column), NonZero, Reshape, Gather
# (rows), Gather (gates), Unsqueeze, MatMul, Relu, Mul, MatMul, Unsqueeze, ScatterND. Unit gates need
# no per-expert gates (10); each bias adds an Add, a gated layer two Slices and a Mul, and the
# activation its own nodes (SiLU 2, GELU 5, which onnxruntime fuses into one Gelu).
SPARSE_NODES_PER_EXPERT = 12


def uniform_gate(attrs: MoEAttrs) -> Optional[float]:
    """The one value every kept gate has (unit gates: gate_scale, over k if renormalised), or None if gates vary."""
    if attrs.scoring != "unit" or (attrs.renormalize and attrs.top_p < 1.0):
        return None
    return attrs.gate_scale / attrs.top_k if attrs.renormalize else attrs.gate_scale


def sparse_moe(inputs: MoEInputs, attrs: MoEAttrs):
    """Only the chosen experts' rows: per expert, its tokens (NonZero of its gate column), gathered through
    its two MatMuls, weighted by its gates and added into place by a ScatterND(add) naming each token once."""
    out_dtype = inputs.x.dtype
    (x, router_input, w_router, b_router, w_in, b_in, w_out, b_out, const_experts), upcast = _upcast(inputs)
    num_experts, in_rows, hidden = (_static_dim(w_in, axis) for axis in range(3))
    width = in_rows // 2 if attrs.gated else in_rows
    combine = combine_matrix(router_input, w_router, b_router, attrs)
    w_in_t = op.Transpose(w_in, perm=[0, 2, 1])  # [E, H, F_in]
    if attrs.gated:  # interleaved gate/up columns -> gate half then up half, so two Slices separate them
        w_in_t = op.Reshape(op.Transpose(op.Reshape(w_in_t, [num_experts, hidden, width, 2]), perm=[0, 1, 3, 2]),
                            [num_experts, hidden, in_rows])
        if b_in is not None:
            b_in = op.Reshape(op.Transpose(op.Reshape(b_in, [num_experts, width, 2]), perm=[0, 2, 1]),
                              [num_experts, in_rows])
    w_out_t = op.Transpose(w_out, perm=[0, 2, 1])  # [E, F, H]
    uniform = uniform_gate(attrs)

    y = op.Expand(op.CastLike(0.0, x), op.Shape(x))
    for e in range(num_experts):
        expert = op.Constant(value_int=e)
        gate_column = op.Gather(combine, expert, axis=1)  # [T]; 0 off the tokens routed here
        rows = op.Reshape(op.NonZero(gate_column), [-1])
        a = op.MatMul(op.Gather(x, rows, axis=0), op.Gather(w_in_t, expert, axis=0))
        if b_in is not None:
            a = op.Add(a, op.Gather(b_in, expert, axis=0))
        if attrs.gated:
            gate, up = op.Slice(a, [0], [width], [1]), op.Slice(a, [width], [in_rows], [1])
            h = op.Mul(_activation(gate, attrs.activation), up)
        else:
            h = _activation(a, attrs.activation)
        gates = None if uniform is not None else op.Unsqueeze(op.Gather(gate_column, rows, axis=0), [1])
        if gates is not None and b_out is None:
            h = op.Mul(h, gates)  # on the narrower side of the second MatMul
        y_e = op.MatMul(h, op.Gather(w_out_t, expert, axis=0))
        if b_out is not None:
            y_e = op.Add(y_e, op.Gather(b_out, expert, axis=0))
            y_e = y_e if gates is None else op.Mul(y_e, gates)
        # one scatter per expert, whose rows are distinct: onnxruntime's threads add updates to a row that one
        # ScatterND names twice without synchronisation, and lose some
        y = op.ScatterND(y, op.Unsqueeze(rows, [1]), y_e, reduction="add")
    if uniform not in (None, 1.0):
        y = op.Mul(y, op.CastLike(uniform, y))
    y = _zero_computation(y, x, combine, num_experts, attrs, const_experts)
    return op.Cast(y, to=out_dtype) if upcast else y
