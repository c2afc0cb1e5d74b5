"""``torch.ops.moefx.moe`` as aten ops that Inductor fuses, registered in Inductor's decomposition table.

Serves ``torch.compile`` on CPUs, default backend and ``backend="moefx"`` alike: the opaque op hides its
GEMMs, routing and combine from Inductor, which then cannot fuse them with the ops around them, and its
CPU implementation pays a host round trip per call. The decomposition implements the contract of
``moefx.op`` (routing through ``moefx.op.route`` itself, which is aten ops) in one of two forms, chosen
from the static shapes:

* ``gathered`` (a few (token, choice) slots, at most one per expert: decode): each slot's expert weights
  indexed by its expert id inside the reductions ``sum_h w_in[id, f, h] * x[t, h]``; Inductor turns the
  index into indirect loads of a fused GEMV loop, so no weight is copied and nothing leaves the graph.
* ``grouped`` (more slots: prefill): slots sorted by expert, offsets from ``searchsorted`` (static shapes,
  no host sync), two grouped GEMMs over the weights where they lie (``moefx::grouped_mm``: CPU
  ``torch._grouped_mm``, whose fake kernel takes bf16 only, behind an op that takes fp32 too, as
  transformers does for its CPU experts); activation, bias, gates and combine fuse around them.

Gate/up rows are read in the layout the op names (interleaved, or ``halves`` as transformers stores
them). The decomposition declines (returns ``NotImplemented``, the op stays one opaque call) where the
Triton kernels run (CUDA), and for grouped shapes ``torch._grouped_mm`` does not take (types other than
fp32, strides not multiples of 16 bytes). Registered on import of ``moefx.compile``.
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor
from torch._inductor.decomposition import register_decomposition

from moefx.op import MoEAttrs, MoEInputs, activate, kernel_path, route, unflatten

log = logging.getLogger(__name__)

FORMS = ("gathered", "grouped")


def form_for(inputs: MoEInputs, attrs: MoEAttrs):
    """"gathered", "grouped" or None (keep the opaque op) for these (fake) inputs."""
    x, w_in, w_out = inputs.x, inputs.w_in, inputs.w_out
    if kernel_path(x.device) == "triton":
        return None
    slots = x.shape[0] * attrs.top_k
    if isinstance(slots, int) and slots <= w_in.shape[0]:
        return "gathered"
    if not x.dtype == w_in.dtype == w_out.dtype == inputs.router_input.dtype == torch.float32:
        return None
    aligned = all(w.stride(-1) == 1 and all(s % 4 == 0 for s in w.stride()[:-1]) for w in (w_in, w_out))
    return "grouped" if aligned and all(n % 4 == 0 for n in (x.shape[1], w_in.shape[1], w_out.shape[2])) else None


def moe_decomposed(inputs: MoEInputs, attrs: MoEAttrs, form: str) -> Tensor:
    """The op's result in aten ops, in ``form`` (one of ``FORMS``)."""
    gates, ids = route(inputs.router_input, inputs.w_router, inputs.b_router, attrs)
    acc = gates.dtype
    x = inputs.x.to(acc)
    num_experts = inputs.w_in.shape[0]
    zero_computation = inputs.w_router.shape[0] > num_experts
    routed = ids < num_experts
    expert = ids.clamp(max=num_experts - 1) if zero_computation else ids
    out = (_gathered if form == "gathered" else _grouped)(inputs, attrs, x, gates, ids, expert, routed, zero_computation)
    if zero_computation:
        out = out + _zero_computation(inputs, attrs, x, gates, ids)
    return out.to(inputs.x.dtype)


def _gathered(inputs: MoEInputs, attrs: MoEAttrs, x: Tensor, gates: Tensor, ids: Tensor, expert: Tensor,
              routed: Tensor, zero_computation: bool) -> Tensor:
    acc = x.dtype
    a = (inputs.w_in[expert].to(acc) * x[:, None, None, :]).sum(-1)  # [T, k, F_in]
    if inputs.b_in is not None:
        a = a + inputs.b_in[expert].to(acc)
    h = activate(a, attrs.activation, attrs.gated, attrs.halves)  # [T, k, F]
    y = (inputs.w_out[expert].to(acc) * h[:, :, None, :]).sum(-1)  # [T, k, H]
    if inputs.b_out is not None:
        y = y + inputs.b_out[expert].to(acc)
    y = y * gates[..., None]
    if zero_computation:
        y = torch.where(routed[..., None], y, 0.0)
    return y.sum(1)


def _grouped(inputs: MoEInputs, attrs: MoEAttrs, x: Tensor, gates: Tensor, ids: Tensor, expert: Tensor,
             routed: Tensor, zero_computation: bool) -> Tensor:
    num_experts, top_k = inputs.w_in.shape[0], ids.shape[1]
    sorted_ids, order = ids.flatten().sort(stable=True)
    tokens = order // top_k
    sorted_expert = expert.flatten().index_select(0, order)
    # slots of expert e end where the first id above e starts; zero-computation slots sort past the last offset
    offsets = torch.searchsorted(sorted_ids, torch.arange(1, num_experts + 1, device=ids.device)).to(torch.int32)
    a = grouped_mm(x.index_select(0, tokens), inputs.w_in.transpose(1, 2), offsets)
    if inputs.b_in is not None:
        a = a + inputs.b_in.index_select(0, sorted_expert)
    h = activate(a, attrs.activation, attrs.gated, attrs.halves)
    y = grouped_mm(h, inputs.w_out.transpose(1, 2), offsets)
    if inputs.b_out is not None:
        y = y + inputs.b_out.index_select(0, sorted_expert)
    # back to (token, choice) order by gathering, not index_add: Inductor fuses a gather into the weighted sum, a
    # scatter-add it would run with atomics
    y = y.index_select(0, order.argsort()).view(*ids.shape, -1) * gates[..., None]
    if zero_computation:  # rows past the last offset hold no result
        y = torch.where(routed[..., None], y, 0.0)
    return y.sum(1)


def _zero_computation(inputs: MoEInputs, attrs: MoEAttrs, x: Tensor, gates: Tensor, ids: Tensor) -> Tensor:
    """sum over chosen copy experts of g * x + sum over chosen constant experts of g * const."""
    num_experts = inputs.w_in.shape[0]
    first_copy = num_experts + attrs.num_zero
    first_const = first_copy + attrs.num_copy
    gate_of = torch.zeros(ids.shape[0], inputs.w_router.shape[0], dtype=gates.dtype, device=gates.device)
    gate_of = gate_of.scatter(1, ids, gates)
    term = gate_of[:, first_copy:first_const].sum(1, keepdim=True) * x
    if inputs.const_experts is not None:
        term = term + gate_of[:, first_const:] @ inputs.const_experts.to(gates.dtype)
    return term


@torch.library.custom_op("moefx::grouped_mm", mutates_args=())
def grouped_mm(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    """``torch._grouped_mm(a, b, offs=offs)`` for a [S, K], b [E, K, N]; rows past ``offs[-1]`` are undefined."""
    return torch._grouped_mm(a, b, offs=offs)


grouped_mm.register_fake(lambda a, b, offs: a.new_empty(a.shape[0], b.shape[-1]))


@register_decomposition(torch.ops.moefx.moe.default)
def moe_decomposition(*args, **kwargs):
    inputs, attrs = unflatten(args + tuple(kwargs.values()))
    form = form_for(inputs, attrs)
    log.debug("moefx: moefx::moe on %s tokens %s", inputs.x.shape[0],
              f"decomposed ({form})" if form else "kept opaque")
    if form is None:
        return NotImplemented
    return moe_decomposed(inputs, attrs, form)
