"""CPU implementation of ``torch.ops.moefx.moe`` ("cpu" in ``moefx.op.IMPLEMENTATIONS``): the op near its
FLOP ideal (active experts' share of the dense FFN) on one core at every batch size.

Serves carved (MoEfication, Zhang et al. 2022) and upcycled models run on CPUs, where a decode step
routes one token and per-call overhead, not GEMM time, decides the speed. The routed experts' GEMMs
take one of three strategies, picked per call from the (token, choice) slots per expert by
``CROSSOVERS`` (measured with ``bench/bench_cpu.py --strategies``):

* ``pairs`` (a few tokens): routing read on the host once, then one GEMV pair per chosen (token,
  expert) on that expert's weights where they lie: no sort, no gather, no per-expert bookkeeping.
* ``grouped`` (tens to hundreds of slots): slots sorted by expert and ``torch._grouped_mm`` over all
  experts at once, with offsets computed as tensors: no host round trip, no per-expert Python.
* ``per_expert`` (large batches): slots sorted by expert, one BLAS GEMM pair per expert on its rows,
  activation in place, temporaries one expert's size.

Weights are read in the layout the op receives (w_in [E, F_in, H], gate/up rows interleaved or as halves):
GEMMs take ``w.T`` as a view and the gated activation pairs columns of the pre-activation, so no
weight is copied or sliced per call. Zero-computation experts (MoE++) add one dense term
(``_zero_computation_term``) outside the expert GEMMs. ``moe_reference`` stays the oracle
(``MOEFX_KERNELS=reference``).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from moefx import op
from moefx.op import MoEAttrs, MoEInputs, activate, gate_up, register_implementation

# Crossovers between the GEMM strategies, measured on one core with bench/bench_cpu.py --strategies
# (2026-11-30, bench/RESULTS.md): "pairs" up to this many (token, choice) slots, then "grouped" while
# the experts average at most this many rows each, then "per_expert".
CROSSOVERS = {"pairs_max_slots": 4, "grouped_max_rows_per_expert": 128}
STRATEGIES = ("pairs", "grouped", "per_expert")


def strategy_for(slots: int, num_experts: int) -> str:
    """The GEMM strategy ``CROSSOVERS`` picks for ``slots`` (token, choice) pairs over ``num_experts``."""
    if slots <= CROSSOVERS["pairs_max_slots"]:
        return "pairs"
    return "grouped" if slots <= CROSSOVERS["grouped_max_rows_per_expert"] * num_experts else "per_expert"


def moe_cpu(inputs: MoEInputs, attrs: MoEAttrs, strategy: Optional[str] = None) -> Tensor:
    """``torch.ops.moefx.moe`` on CPU tensors (same arguments and result as ``moe_reference``);
    ``strategy`` overrides the table (benchmarks, tests)."""
    x = inputs.x
    # moefx.op.route looked up per call, so a patched route (tests) sees every call
    gates, ids = op.route(inputs.router_input, inputs.w_router, inputs.b_router, attrs)
    strategy = strategy or strategy_for(ids.numel(), inputs.w_in.shape[0])
    if strategy == "grouped" and not grouped_mm_fits(inputs, gates.dtype):
        strategy = "per_expert"
    out = routed_sum(inputs, attrs, gates, ids, strategy)
    return out if out.dtype == x.dtype else out.to(x.dtype)


ExpertWeights = Callable[[int], tuple]  # expert e -> its (w_in, b_in, w_out, b_out)


def routed_sum(inputs: MoEInputs, attrs: MoEAttrs, gates: Tensor, ids: Tensor, strategy: str,
               expert: Optional[ExpertWeights] = None) -> Tensor:
    """y (in the accumulation dtype) for routing already decided (``gates``, ``ids`` from ``op.route``) with
    ``strategy`` ("grouped" only where ``grouped_mm_fits``). ``expert(e)``, when given, supplies expert e's
    weights in place of views of ``inputs`` (whose expert tensors then only give shapes and dtypes): the
    offload runtime's cache ("pairs" and "per_expert" only), computed in the same order, so the same bits."""
    weights = expert or (lambda e: _views(inputs, e))
    if strategy == "pairs":
        return _pairs(inputs, attrs, gates, ids, weights)
    out = _sorted(inputs, attrs, gates, ids, strategy, weights)
    if attrs.num_copy or inputs.const_experts is not None:
        out += _zero_computation_term(inputs, attrs, gates, ids)
    return out


def _views(inputs: MoEInputs, e: int) -> tuple:
    b_in, b_out = inputs.b_in, inputs.b_out
    return (inputs.w_in.select(0, e), None if b_in is None else b_in.select(0, e), inputs.w_out.select(0, e),
            None if b_out is None else b_out.select(0, e))


def _weights(weights: ExpertWeights, e: int, acc: torch.dtype) -> tuple:
    """Expert ``e``'s (w_in, b_in, w_out, b_out), cast only for half types."""
    tensors = weights(e)
    if tensors[0].dtype == acc:
        return tensors
    return tuple(None if t is None else t.to(acc) for t in tensors)


def _pairs(inputs: MoEInputs, attrs: MoEAttrs, gates: Tensor, ids: Tensor, weights: ExpertWeights) -> Tensor:
    """One GEMV pair per chosen (token, expert), the gate folded into the second; zero-computation experts
    inline."""
    acc = gates.dtype
    x = inputs.x if inputs.x.dtype == acc else inputs.x.to(acc)
    num_experts = inputs.w_in.shape[0]
    first_const = num_experts + attrs.num_zero + attrs.num_copy
    out = torch.zeros_like(x)
    if x.shape[0] == 1:
        rows = [(x, out)]
    else:
        rows = [(x[t:t + 1], out[t:t + 1]) for t in range(x.shape[0])]
    for (xt, out_t), row_ids, row_gates in zip(rows, ids.tolist(), gates.tolist()):
        for e, g in zip(row_ids, row_gates):
            if e < num_experts:
                w_in, b_in, w_out, b_out = _weights(weights, e, acc)
                h = activate(F.linear(xt, w_in, b_in), attrs.activation, attrs.gated, attrs.halves)
                out_t.addmm_(h, w_out.T, alpha=g)
                if b_out is not None:
                    out_t.add_(b_out, alpha=g)
            elif e >= first_const:
                out_t.add_(inputs.const_experts[e - first_const].to(acc), alpha=g)
            elif e >= num_experts + attrs.num_zero:
                out_t.add_(xt, alpha=g)
    return out


# act(a) in place of a: large batches pay more for fresh pages than for the arithmetic
ACTIVATIONS_IN_PLACE = {
    "relu": lambda a: F.relu(a, inplace=True),
    "gelu": lambda a: torch.ops.aten.gelu_(a),
    "gelu_tanh": lambda a: torch.ops.aten.gelu_(a, approximate="tanh"),
    "silu": lambda a: F.silu(a, inplace=True),
    "relu2": lambda a: F.relu(a, inplace=True).square_(),
    "quick_gelu": lambda a: a.mul_(torch.sigmoid(1.702 * a)),
}


def _activate_in_place(a: Tensor, attrs: MoEAttrs) -> Tensor:
    """``moefx.op.activate`` reusing a's memory (a is a temporary of ours)."""
    act = ACTIVATIONS_IN_PLACE[attrs.activation]
    if attrs.gated:
        gate, up = gate_up(a, attrs.halves)
        return act(gate) * up  # a fresh contiguous h: the GEMMs want unit strides
    return act(a)


def grouped_mm_fits(inputs: MoEInputs, acc: torch.dtype) -> bool:
    """``torch._grouped_mm`` on CPU takes fp32/half matrices whose strides are multiples of 16 bytes."""
    x, w_in, w_out = inputs.x, inputs.w_in, inputs.w_out
    if not x.dtype == w_in.dtype == w_out.dtype == acc == torch.float32:
        return False
    return all(w.stride(-1) == 1 and all(s % 4 == 0 for s in w.stride()[:-1]) for w in (w_in, w_out)) and all(
        n % 4 == 0 for n in (x.shape[1], w_in.shape[1], w_out.shape[2]))


def _sorted(inputs: MoEInputs, attrs: MoEAttrs, gates: Tensor, ids: Tensor, strategy: str,
            weights: ExpertWeights) -> Tensor:
    """The routed experts' sum with slots sorted by expert ("grouped" or "per_expert")."""
    acc = gates.dtype
    x, w_in, b_in, w_out, b_out = inputs.x, inputs.w_in, inputs.b_in, inputs.w_out, inputs.b_out
    x = x if x.dtype == acc else x.to(acc)
    num_experts, top_k = w_in.shape[0], ids.shape[1]
    flat_ids = ids.flatten()
    sorted_ids, order = flat_ids.sort(stable=True)
    tokens = order // top_k
    counts = torch.bincount(flat_ids, minlength=inputs.w_router.shape[0])[:num_experts]
    zero_computation = num_experts < inputs.w_router.shape[0]
    if strategy == "grouped":
        rows = x.index_select(0, tokens)
        offsets = counts.cumsum(0, dtype=torch.int32)
        # zero-computation slots are masked below
        expert_of_row = sorted_ids.clamp(max=num_experts - 1) if zero_computation else sorted_ids
        a = torch._grouped_mm(rows, w_in.transpose(1, 2), offs=offsets)
        if b_in is not None:
            a += b_in.index_select(0, expert_of_row)
        y = torch._grouped_mm(_activate_in_place(a, attrs), w_out.transpose(1, 2), offs=offsets)
        if b_out is not None:
            y += b_out.index_select(0, expert_of_row)
        y.mul_(gates.flatten().index_select(0, order)[:, None])
        if zero_computation:  # rows past the last offset hold no result
            y.masked_fill_((sorted_ids >= num_experts)[:, None], 0)
        return torch.zeros_like(x).index_add_(0, tokens, y)
    # per_expert: each expert's rows gathered, computed and added back on their own, so temporaries stay
    # one expert's size (fresh pages for batch-sized buffers cost more than the GEMMs save)
    flat_gates, out = gates.flatten(), torch.zeros_like(x)
    start = 0
    for e, count in enumerate(counts.tolist()):
        if count:
            slots, tokens_e = order[start:start + count], tokens[start:start + count]
            w_in_e, b_in_e, w_out_e, b_out_e = _weights(weights, e, acc)
            h = _activate_in_place(F.linear(x.index_select(0, tokens_e), w_in_e, b_in_e), attrs)
            y = F.linear(h, w_out_e, b_out_e).mul_(flat_gates.index_select(0, slots)[:, None])
            out.index_add_(0, tokens_e, y)
        start += count
    return out


def _zero_computation_term(inputs: MoEInputs, attrs: MoEAttrs, gates: Tensor, ids: Tensor) -> Tensor:
    """sum over chosen copy experts of g * x + sum over chosen constant experts of g * const, as dense ops."""
    num_experts = inputs.w_in.shape[0]
    first_copy = num_experts + attrs.num_zero
    first_const = first_copy + attrs.num_copy
    gate_of = torch.zeros(ids.shape[0], inputs.w_router.shape[0], dtype=gates.dtype).scatter_(1, ids, gates)
    term = gate_of[:, first_copy:first_const].sum(1, keepdim=True) * inputs.x.to(gates.dtype)
    if inputs.const_experts is not None:
        term += gate_of[:, first_const:] @ inputs.const_experts.to(gates.dtype)
    return term


register_implementation("cpu", moe_cpu)
