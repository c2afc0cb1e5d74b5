"""The moefx op contract: ``torch.ops.moefx.moe``, the routed experts of one MoE layer.

The op takes nine tensors (``MoEInputs``) and ten static attributes (``MoEAttrs``); only the
``torch.library`` registration below spells the flat schema, built from those two types. Every consumer (the reference below, the Triton kernels in ``moefx.codegen``, the compile
passes, the ONNX translation) implements or emits exactly this op; none re-derives it.

Semantics, per token t (row of ``x``), with E routed experts and Z = num_zero + num_copy +
num_const zero-computation experts (MoE++), so the router has E + Z rows::

    l      = router_input[t] @ w_router.T + b_router                      # [E+Z] logits
    s      = softmax(l) | sigmoid(l) | 1          (scoring: "softmax" | "sigmoid" | "unit")
    S      = top_k indices of s (ties broken by torch.topk; for "unit" and "sigmoid", top_k of l: sigmoid
             scores underflow to equal zeros in fp32 where the logits still rank)
    dynamic-k (top_p < 1): with p = softmax(l) sorted as S, keep the r-th choice iff
             r < min_k or p_S[0] + ... + p_S[r-1] < top_p                (Huang et al. 2024)
    g_e    = s_e / sum_{j kept} s_j   if renormalize else s_e,   times gate_scale, for e kept
             (sigmoid scores renormalise as softmax_{j kept}(log sigmoid(l_j)): no 0/0 when they underflow)
    g      = NaN for every choice of a token whose scores hold a NaN (NaN/inf logits give a NaN row)
    y[t]   = sum_{e kept} g_e * f_e(x[t])
    f_e(x) = act(x @ w_in[e].T + b_in[e]) @ w_out[e].T + b_out[e]          (plain FFN expert)
    f_e(x) = (act(a[0::2]) * a[1::2]) @ w_out[e].T + b_out[e],
             a = x @ w_in[e].T + b_in[e]          (gated: gate and up rows interleaved)
    f_e(x) = (act(a[:F]) * a[F:]) @ w_out[e].T + b_out[e]
                                                  (gated, halves: gate rows, then up rows, as transformers'
                                                   fused gate_up_proj stores them)
    f_e(x) = 0                      for e in [E, E + num_zero)            (zero expert)
    f_e(x) = x                      for the next num_copy experts         (copy expert)
    f_e(x) = const_experts[j]       for the j-th of the last num_const     (constant expert)

Shapes: x [T, H]; router_input [T, Hr] (``x`` itself, or another tensor for pre-gating);
w_router [E+Z, Hr]; b_router [E+Z]; w_in [E, F_in, H] with F_in = F, or 2F when gated;
b_in [E, F_in]; w_out [E, H, F]; b_out [E, H]; const_experts [num_const, H]. Routing math
runs in fp32 (fp64 for fp64 inputs); expert GEMMs accumulate likewise; y has x's dtype. With scoring "unit" and
top_k = E (no zero-computation experts), y is the sum of all experts: a dense FFN carved into
experts is reproduced exactly. With renormalized softmax gates and identical experts
(upcycling), y equals one expert at any top_k.

Implementations register into ``IMPLEMENTATIONS`` by name (``register_implementation``); the op
picks one per call with ``kernel_path`` (``MOEFX_KERNELS``). ``moefx.codegen`` registers "triton",
``moefx.cpu`` "cpu"; a provider module is imported by name the first time its path is selected, so
nothing here imports it.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import math
import os
import typing
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
    "silu": F.silu,
    "quick_gelu": lambda a: a * torch.sigmoid(1.702 * a),  # CLIP's default, x sigma(1.702 x)
    "relu2": lambda a: F.relu(a).square(),                 # squared ReLU (Primer; Nemotron)
}
SCORINGS = ("softmax", "sigmoid", "unit")
KERNEL_PATHS = ("auto", "triton", "cpu", "reference")


class MoEInputs(NamedTuple):
    """The op's tensor arguments, in schema order (shapes in the module docstring)."""

    x: Tensor
    router_input: Tensor
    w_router: Tensor
    b_router: Optional[Tensor]
    w_in: Tensor
    b_in: Optional[Tensor]
    w_out: Tensor
    b_out: Optional[Tensor]
    const_experts: Optional[Tensor]


@dataclasses.dataclass(frozen=True)
class MoEAttrs:
    """The op's static attributes, in schema order; validated on construction."""

    top_k: int
    activation: str
    gated: bool
    scoring: str = "softmax"
    renormalize: bool = False
    top_p: float = 1.0
    min_k: int = 1
    gate_scale: float = 1.0
    num_zero: int = 0
    num_copy: int = 0
    halves: bool = False  # gated w_in rows as [gate; up] halves instead of interleaved

    def __post_init__(self):
        def fail(msg):
            raise ValueError(f"moefx.moe: {msg}")

        for name in ("top_k", "min_k", "num_zero", "num_copy"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                fail(f"{name}={getattr(self, name)!r} must be an int")
        if self.top_k < 1:
            fail(f"top_k={self.top_k} must be at least 1")
        if not 1 <= self.min_k <= self.top_k:
            fail(f"min_k={self.min_k} must be between 1 and top_k={self.top_k}")
        if not 0.0 < self.top_p <= 1.0:  # also False for NaN
            fail(f"top_p={self.top_p} must be in (0, 1]")
        if self.num_zero < 0 or self.num_copy < 0:
            fail(f"num_zero={self.num_zero} and num_copy={self.num_copy} must be >= 0")
        if self.activation not in ACTIVATIONS:
            fail(f"activation {self.activation!r} is not one of {sorted(ACTIVATIONS)}")
        if self.scoring not in SCORINGS:
            fail(f"scoring {self.scoring!r} is not one of {SCORINGS}")
        if not math.isfinite(self.gate_scale):
            fail(f"gate_scale={self.gate_scale} must be finite")
        if self.halves and not self.gated:
            fail("halves=True describes the gate/up rows of gated experts; set gated=True or halves=False")

    def flat(self) -> tuple:
        """The attribute values in schema order."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    def describe(self) -> str:
        extras = [f"{self.scoring} scoring"] + ["renormalized"] * self.renormalize
        extras += [f"dynamic-k top_p={self.top_p}"] * (self.top_p < 1.0)
        extras += [f"gate_scale={self.gate_scale}"] * (self.gate_scale != 1.0)
        extras += [f"{self.num_zero} zero / {self.num_copy} copy experts"] * bool(self.num_zero or self.num_copy)
        extras += ["gate/up halves"] * self.halves
        return f"top-{self.top_k} {'gated ' * self.gated}{self.activation}, {', '.join(extras)}"


def with_op_signature(*leading: str) -> Callable[[Callable], Callable]:
    """Give ``fn(*args)`` the op's typed signature (tensors named ``leading``, then the ``MoEInputs`` and
    ``MoEAttrs`` fields), from which ``torch.library`` infers the schema: the one place the flat
    argument list is spelled."""
    def decorate(fn: Callable) -> Callable:
        hints = {**{name: Tensor for name in leading}, **typing.get_type_hints(MoEInputs),
                 **typing.get_type_hints(MoEAttrs)}
        # halves came after the first schema: its default keeps callers that pass the older attributes working
        parameters = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=hint,
                                        **({"default": False} if name == "halves" else {}))
                      for name, hint in hints.items()]
        fn.__signature__ = inspect.Signature(parameters, return_annotation=typing.get_type_hints(fn)["return"])
        return fn
    return decorate


NUM_INPUTS = len(MoEInputs._fields)


def unflatten(args: tuple) -> tuple[MoEInputs, MoEAttrs]:
    """(inputs, attrs) from the op's flat arguments."""
    return MoEInputs(*args[:NUM_INPUTS]), _attrs(*args[NUM_INPUTS:])


@functools.lru_cache(maxsize=256)
def _attrs(*flat) -> MoEAttrs:
    """``MoEAttrs(*flat)``, validated once per distinct value (the op body runs this on every call)."""
    return MoEAttrs(*flat)


def kernel_path(device: torch.device) -> str:
    """The implementation ``MOEFX_KERNELS`` (auto | triton | cpu | reference) selects for ``device``: "auto" is
    Triton on CUDA (when installed), "cpu" on the CPU, the reference elsewhere."""
    choice = os.environ.get("MOEFX_KERNELS", "auto")
    if choice == "auto" and device.type == "cpu":
        return "cpu"
    if choice not in KERNEL_PATHS:
        raise ValueError(f"MOEFX_KERNELS={choice!r} is not one of {KERNEL_PATHS}; unset it or pick one")
    if choice == "auto":
        return "triton" if device.type == "cuda" and _triton_available() else "reference"
    return choice


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


Implementation = Callable[[MoEInputs, MoEAttrs], Tensor]
IMPLEMENTATIONS: dict[str, Implementation] = {}
# the module that registers each implementation not defined here
PROVIDERS = {"triton": "moefx.codegen", "cpu": "moefx.cpu"}


def register_implementation(name: str, implementation: Implementation) -> None:
    """Make ``implementation(inputs, attrs) -> y`` the op's body where ``kernel_path`` selects ``name``."""
    IMPLEMENTATIONS[name] = implementation


def implementation(name: str) -> Implementation:
    if name not in IMPLEMENTATIONS and name in PROVIDERS:
        importlib.import_module(PROVIDERS[name])
    return IMPLEMENTATIONS[name]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for every input dtype but fp64, which keeps its precision (gradcheck, references)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def route(router_input: Tensor, w_router: Tensor, b_router: Optional[Tensor], attrs: MoEAttrs
          ) -> tuple[Tensor, Tensor]:
    """Gates [T, top_k] (fp32, 0 for choices dropped by dynamic-k) and expert ids [T, top_k]."""
    acc = accumulation_dtype(router_input.dtype)
    if not router_input.dtype == w_router.dtype == acc or (b_router is not None and b_router.dtype != acc):
        router_input, w_router = router_input.to(acc), w_router.to(acc)
        b_router = None if b_router is None else b_router.to(acc)
    logits = F.linear(router_input, w_router, b_router)
    if attrs.scoring == "softmax":
        scores = logits.softmax(-1)
        gates, ids = scores.topk(attrs.top_k, dim=-1)
    else:
        top, ids = logits.topk(attrs.top_k, dim=-1)
        gates = top.sigmoid() if attrs.scoring == "sigmoid" else None
    kept = None
    if attrs.top_p < 1.0:
        probs = (scores if attrs.scoring == "softmax" else logits.softmax(-1)).gather(-1, ids)
        mass_before = probs.cumsum(-1) - probs
        rank = torch.arange(attrs.top_k, device=ids.device)
        kept = (rank < attrs.min_k) | (mass_before < attrs.top_p)
    # NaN rows, found without a pass over all [T, E+Z] scores: a softmax row holding a NaN is all NaN (a NaN or
    # +inf logit), so its gates are already; topk ranks NaN above every number, so a sigmoid or unit row holds
    # a NaN iff its first choice's logit is NaN.
    if attrs.scoring != "softmax":
        first = top[:, :1]
        nan_rows = first.isnan()
    if attrs.scoring == "unit":
        if kept is None:  # every gate of a row is 1, 1 / top_k renormalised, or NaN (the NaN logit itself)
            value = (1.0 / attrs.top_k if attrs.renormalize else 1.0) * attrs.gate_scale
            return torch.where(nan_rows.expand(ids.shape), first, value), ids
        gates = torch.where(nan_rows.expand(ids.shape), first, 1.0)
    if kept is not None:
        gates = gates * kept
    if attrs.renormalize and attrs.scoring == "sigmoid":
        log_gates = F.logsigmoid(top)  # a NaN first choice makes the whole softmax row NaN
        gates = (log_gates if kept is None else log_gates.masked_fill(~kept, -math.inf)).softmax(-1)
    else:
        if attrs.renormalize:
            gates = gates / gates.sum(-1, keepdim=True)
        if attrs.scoring != "softmax":
            gates = gates.masked_fill(nan_rows, math.nan)
    return (gates if attrs.gate_scale == 1.0 else gates * attrs.gate_scale), ids


def activate(a: Tensor, activation: str, gated: bool, halves: bool = False) -> Tensor:
    """The expert's hidden activation h from its pre-activation a: act(a), or act(gate) * up when gated (gate and
    up columns interleaved, or the two halves of a)."""
    act = ACTIVATIONS[activation]
    if not gated:
        return act(a)
    gate, up = gate_up(a, halves)
    return act(gate) * up


def gate_up(a: Tensor, halves: bool) -> tuple[Tensor, Tensor]:
    """The gate and up columns of a gated pre-activation a [..., 2F] (views)."""
    if halves:
        return a.split(a.shape[-1] // 2, dim=-1)
    return a[..., 0::2], a[..., 1::2]


def interleaved(inputs: MoEInputs, attrs: MoEAttrs) -> tuple[MoEInputs, MoEAttrs]:
    """The same op with gate/up rows interleaved (copies of w_in and b_in when ``attrs.halves``): for
    implementations that read the interleaved layout only."""
    if not attrs.halves:
        return inputs, attrs
    num_experts, f_in, hidden = inputs.w_in.shape
    w_in = inputs.w_in.reshape(num_experts, 2, f_in // 2, hidden).transpose(1, 2).reshape(num_experts, f_in, hidden)
    b_in = inputs.b_in
    if b_in is not None:
        b_in = b_in.reshape(num_experts, 2, f_in // 2).transpose(1, 2).reshape(num_experts, f_in)
    return inputs._replace(w_in=w_in, b_in=b_in), dataclasses.replace(attrs, halves=False)


def expert_ffn(x: Tensor, w_in: Tensor, b_in: Optional[Tensor], w_out: Tensor, b_out: Optional[Tensor],
               activation: str, gated: bool, halves: bool = False) -> Tensor:
    """One expert f_e applied to rows x."""
    return F.linear(activate(F.linear(x, w_in, b_in), activation, gated, halves), w_out, b_out)


def _computing_experts(ids: Tensor, num_choices: int, num_experts: int, num_zero: int):
    """(expert, its slots in the flattened [T * top_k] choices, their tokens) for every chosen expert
    that computes something: zero experts and unchosen ones are skipped."""
    flat_ids = ids.flatten()
    token_of_slot = torch.arange(ids.shape[0], device=ids.device).repeat_interleave(ids.shape[1])
    order = flat_ids.argsort(stable=True)
    start = 0
    for e, count in enumerate(torch.bincount(flat_ids, minlength=num_choices).tolist()):
        slots = order[start:start + count]
        start += count
        if count and not num_experts <= e < num_experts + num_zero:
            yield e, slots, token_of_slot[slots]


def moe_reference(inputs: MoEInputs, attrs: MoEAttrs) -> Tensor:
    """Pure-PyTorch implementation of the contract: tokens grouped per expert, one GEMM pair each."""
    x, router_input, w_router, b_router, w_in, b_in, w_out, b_out, const_experts = inputs
    gates, ids = route(router_input, w_router, b_router, attrs)
    num_experts = w_in.shape[0]
    acc = gates.dtype
    xf = x.to(acc)
    out = torch.zeros_like(xf)
    flat_gates = gates.flatten()
    for e, slots, tokens in _computing_experts(ids, w_router.shape[0], num_experts, attrs.num_zero):
        if e < num_experts:
            y = expert_ffn(xf[tokens], w_in[e].to(acc), None if b_in is None else b_in[e].to(acc),
                           w_out[e].to(acc), None if b_out is None else b_out[e].to(acc), attrs.activation,
                           attrs.gated, attrs.halves)
        elif e < num_experts + attrs.num_zero + attrs.num_copy:
            y = xf[tokens]
        else:
            y = const_experts[e - num_experts - attrs.num_zero - attrs.num_copy].to(acc).expand(len(slots), -1)
        out.index_add_(0, tokens, y * flat_gates[slots, None])
    return out.to(x.dtype)


register_implementation("reference", moe_reference)


@torch.library.custom_op("moefx::moe", mutates_args=())
@with_op_signature()
def moe(*args) -> Tensor:
    inputs, attrs = unflatten(args)
    check_inputs(inputs, attrs)
    return implementation(kernel_path(inputs.x.device))(inputs, attrs)


@moe.register_fake
def _(*args) -> Tensor:
    check_inputs(*unflatten(args))  # refused when traced (torch.compile, export), not when first run
    return torch.empty_like(args[0])


ACTIVATION_GRADS = {
    "relu": lambda a: (a > 0).to(a.dtype),
    "gelu": lambda a: 0.5 * (1 + torch.erf(a / math.sqrt(2))) + a * torch.exp(-0.5 * a * a) / math.sqrt(2 * math.pi),
    "gelu_tanh": lambda a: _gelu_tanh_grad(a),
    "silu": lambda a: torch.sigmoid(a) * (1 + a * (1 - torch.sigmoid(a))),
    "quick_gelu": lambda a: torch.sigmoid(1.702 * a) * (1 + 1.702 * a * (1 - torch.sigmoid(1.702 * a))),
    "relu2": lambda a: 2 * F.relu(a),
}


def _gelu_tanh_grad(a: Tensor) -> Tensor:
    c = math.sqrt(2 / math.pi)
    t = torch.tanh(c * (a + 0.044715 * a ** 3))
    return 0.5 * (1 + t) + 0.5 * a * (1 - t * t) * c * (1 + 3 * 0.044715 * a * a)


def moe_backward_reference(grad_out: Tensor, inputs: MoEInputs, attrs: MoEAttrs) -> list[Tensor]:
    """Gradients of ``moe`` for its tensor inputs (``MoEInputs`` order; empty tensors for absent
    optional ones). The routing choice is piecewise constant, so gradients reach the router only
    through the gate values."""
    x, router_input, w_router, b_router, w_in, b_in, w_out, b_out, const_experts = inputs
    activation, gated = attrs.activation, attrs.gated
    num_zero, num_copy = attrs.num_zero, attrs.num_copy
    gates, ids = route(router_input, w_router, b_router, attrs)
    num_experts = w_in.shape[0]
    acc = gates.dtype
    xf, dout = x.to(acc), grad_out.to(acc)
    dx = torch.zeros_like(xf)
    d_gates = torch.zeros_like(gates)
    dw_in, dw_out = torch.zeros_like(w_in, dtype=acc), torch.zeros_like(w_out, dtype=acc)
    db_in = None if b_in is None else torch.zeros_like(b_in, dtype=acc)
    db_out = None if b_out is None else torch.zeros_like(b_out, dtype=acc)
    d_const = None if const_experts is None else torch.zeros_like(const_experts, dtype=acc)
    flat_gates, flat_dgates = gates.flatten(), d_gates.view(-1)
    for e, slots, tokens in _computing_experts(ids, w_router.shape[0], num_experts, num_zero):
        g_out = dout[tokens]
        if e < num_experts:
            xe = xf[tokens]
            a = F.linear(xe, w_in[e].to(acc), None if b_in is None else b_in[e].to(acc))
            h = activate(a, activation, gated, attrs.halves)
            y = F.linear(h, w_out[e].to(acc), None if b_out is None else b_out[e].to(acc))
            dy = g_out * flat_gates[slots, None]
            dw_out[e] = dy.T @ h
            if db_out is not None:
                db_out[e] = dy.sum(0)
            dh = dy @ w_out[e].to(acc)
            if gated:
                gate, up = gate_up(a, attrs.halves)
                da = torch.empty_like(a)
                d_gate, d_up = gate_up(da, attrs.halves)
                d_gate.copy_(dh * up * ACTIVATION_GRADS[activation](gate))
                d_up.copy_(dh * ACTIVATIONS[activation](gate))
            else:
                da = dh * ACTIVATION_GRADS[activation](a)
            dw_in[e] = da.T @ xe
            if db_in is not None:
                db_in[e] = da.sum(0)
            dx.index_add_(0, tokens, da @ w_in[e].to(acc))
        elif e < num_experts + num_zero + num_copy:
            y = xf[tokens]
            dx.index_add_(0, tokens, g_out * flat_gates[slots, None])
        else:
            j = e - num_experts - num_zero - num_copy
            y = const_experts[j].to(acc).expand(len(slots), -1)
            d_const[j] = (g_out * flat_gates[slots, None]).sum(0)
        flat_dgates[slots] = (g_out * y).sum(-1)

    d_logits = _route_backward(router_input, w_router, b_router, gates, ids, d_gates, attrs)
    d_router_input = d_logits @ w_router.to(acc)
    if router_input is x:
        dx += d_router_input
        d_router_input = torch.zeros_like(d_router_input)
    grads = [dx, d_router_input, d_logits.T @ router_input.to(acc),
             None if b_router is None else d_logits.sum(0), dw_in, db_in, dw_out, db_out, d_const]
    return [x.new_empty(0) if g is None else g.to(t.dtype) for g, t in zip(grads, inputs)]


def _route_backward(router_input, w_router, b_router, gates, ids, d_gates, attrs: MoEAttrs) -> Tensor:
    """Gradient of the router logits given the gradient of the gates ``route`` returned."""
    acc = gates.dtype
    logits = F.linear(router_input.to(acc), w_router.to(acc), None if b_router is None else b_router.to(acc))
    if attrs.scoring == "unit":
        return torch.zeros_like(logits)
    scores = logits.softmax(-1) if attrs.scoring == "softmax" else logits.sigmoid()
    d_raw = d_gates * attrs.gate_scale
    if attrs.renormalize:
        raw = scores.gather(-1, ids) * (gates != 0)
        total = raw.sum(-1, keepdim=True)
        d_raw = (d_raw - (d_raw * raw).sum(-1, keepdim=True) / total) / total
    d_raw = d_raw * (gates != 0) if attrs.top_p < 1.0 else d_raw
    d_scores = torch.zeros_like(scores).scatter_add_(-1, ids, d_raw)
    if attrs.scoring == "softmax":
        return scores * (d_scores - (d_scores * scores).sum(-1, keepdim=True))
    return d_scores * scores * (1 - scores)


@torch.library.custom_op("moefx::moe_backward", mutates_args=())
@with_op_signature("grad_out")
def moe_backward(*args) -> list[Tensor]:
    """(grad_out first, then the op's arguments) -> ``moe_backward_reference``."""
    grad_out, (inputs, attrs) = args[0], unflatten(args[1:])
    return moe_backward_reference(grad_out, inputs, attrs)

moe_backward.register_fake(lambda grad_out, *args: [args[0].new_empty(0) if t is None else torch.empty_like(t)
                                                    for t in args[:NUM_INPUTS]])


def setup_context(ctx, inputs, output):
    """Autograd context of any op with the moefx schema: saves the tensors, keeps the attributes."""
    ctx.save_for_backward(*[t if isinstance(t, Tensor) else None for t in inputs[:NUM_INPUTS]])
    ctx.attrs = inputs[NUM_INPUTS:]


def backward(ctx, grad_out):
    """The contract's analytic backward (``moe_backward``), whatever implementation computed y."""
    saved = ctx.saved_tensors
    grads = torch.ops.moefx.moe_backward(grad_out.contiguous(), *saved, *ctx.attrs)
    tensor_grads = [None if t is None else g for t, g in zip(saved, grads)]
    return (*tensor_grads, *([None] * len(ctx.attrs)))


def register_autograd(op) -> None:
    """Give ``op`` (``moefx::moe`` or an op with the same schema) the contract's analytic backward."""
    torch.library.register_autograd(op, backward, setup_context=setup_context)


register_autograd(moe)


def moe_op(inputs: MoEInputs, attrs: MoEAttrs) -> Tensor:
    """Call ``torch.ops.moefx.moe``, which validates the tensors against the contract.

    Eager inference on plain CPU tensors calls the selected implementation directly: the custom op's
    Python dispatch (autograd wrapper, redispatch, alias checks) costs as much as a one-token MoE
    layer. Whenever the call could be recorded or differentiated (torch.compile, export, any dispatch
    or function mode, functorch transforms, jit tracing, a tensor needing grad), the op itself runs."""
    if _eager_cpu_inference(inputs):
        check_inputs(inputs, attrs)
        return implementation(kernel_path(inputs.x.device))(inputs, attrs)
    return torch.ops.moefx.moe(*inputs, *attrs.flat())  # checks the inputs itself


def _eager_cpu_inference(inputs: MoEInputs) -> bool:
    x = inputs.x
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        return False
    return (x.is_cpu and x.__class__ in (Tensor, torch.nn.Parameter) and not is_in_torch_dispatch_mode()
            and not torch._C._is_torch_function_mode_enabled() and not torch.compiler.is_compiling()
            and not torch._C._are_functorch_transforms_active() and torch._C._get_tracing_state() is None)


# (attrs, every input's shape) that passed ``check_inputs``: the check reads nothing else, so each layer pays
# for it once per token count; bounded so that shapes a long-lived process has seen do not pile up
_CHECKED: dict = {}
_CHECKED_MAX = 4096


def check_inputs(inputs: MoEInputs, attrs: MoEAttrs) -> None:
    """Raise a ValueError naming the first tensor that breaks the contract (``MoEAttrs`` checks itself);
    shapes that passed before pass again without the checks."""
    if torch.compiler.is_compiling():  # traced once per graph, and symbolic sizes do not hash
        _check_shapes(inputs, attrs)
        return
    key = (attrs, *[None if t is None else t.shape for t in inputs])
    try:
        if key in _CHECKED:
            return
    except TypeError:  # symbolic sizes (fake-tensor tracing outside torch.compile)
        _check_shapes(inputs, attrs)
        return
    _check_shapes(inputs, attrs)
    if len(_CHECKED) >= _CHECKED_MAX:
        _CHECKED.clear()
    _CHECKED[key] = None


def _check_shapes(inputs: MoEInputs, attrs: MoEAttrs) -> None:
    def fail(msg):
        raise ValueError(f"moefx.moe: {msg}")

    x, router_input, w_router, b_router, w_in, b_in, w_out, b_out, const_experts = inputs
    if x.dim() != 2 or router_input.dim() != 2 or router_input.shape[0] != x.shape[0]:
        fail(f"x {tuple(x.shape)} and router_input {tuple(router_input.shape)} must be [T, H] and [T, Hr]; "
             "flatten leading dimensions first")
    num_experts, f_in, hidden = w_in.shape
    num_const = 0 if const_experts is None else const_experts.shape[0]
    total = num_experts + attrs.num_zero + attrs.num_copy + num_const
    if hidden != x.shape[1]:
        fail(f"w_in is [E, F_in, {hidden}] but x has {x.shape[1]} features")
    if w_router.shape != (total, router_input.shape[1]):
        fail(f"w_router is {tuple(w_router.shape)}, expected [{total}, {router_input.shape[1]}] "
             f"({num_experts} experts + {total - num_experts} zero-computation experts)")
    width = f_in // 2 if attrs.gated else f_in
    if attrs.gated and f_in % 2:
        fail(f"gated experts need gate/up row pairs, but w_in has an odd row count {f_in}")
    if w_out.shape != (num_experts, hidden, width):
        fail(f"w_out is {tuple(w_out.shape)}, expected [{num_experts}, {hidden}, {width}]")
    for name, bias, shape in (("b_router", b_router, (total,)), ("b_in", b_in, (num_experts, f_in)),
                              ("b_out", b_out, (num_experts, hidden)),
                              ("const_experts", const_experts, (num_const, hidden))):
        if bias is not None and tuple(bias.shape) != shape:
            fail(f"{name} is {tuple(bias.shape)}, expected {list(shape)}")
    if attrs.top_k > total:
        fail(f"top_k={attrs.top_k} must be between 1 and the number of experts ({total})")
