"""Pre-gating: route each MoE layer from the input of the transformer block that holds it.

Read-ME (Cai et al. 2024, arXiv 2410.19123) decouples the router from the layer it serves, so
that expert choices are known ahead of time and a runtime can prefetch, cache and batch by
expert. ``moefx.convert(..., router="least_squares", pregate="block")`` does this per transformer
block: the block is the innermost item of an ``nn.ModuleList`` / ``nn.Sequential`` that holds the
FFN and at least one other linear layer (its attention); its first floating-point tensor input
(the residual stream before the attention) feeds the router, fitted (``least_squares_router`` or
``distill_router``) on those rows to pick the oracle's experts of the FFN-input rows. Layer i's experts are
known as soon as block i starts, one attention ahead of the FFN. (Routing from the previous
block's values would need the model's own forward, the loop over blocks, in a traced graph;
that forward rarely traces: LlamaModel's does not.)

Wiring is data flow, not state: the block's traced graph is kept, and its input reaches the
``MoELayer`` call as a real argument. Where the FFN sits in a smaller traced piece (LlamaMLP
inside LlamaDecoderLayer), that piece gets a ``moefx_router_input`` placeholder and the block's
graph passes the value in by that keyword, so eager, ``torch.compile`` and ONNX export see an
ordinary tensor edge. The block is traced with its submodules that hold no FFN (the attention)
opaque, so their Python still runs at every call (decoding with a KV cache). ``lookahead``
reads the decisions at block entry.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from moefx.convert.find import find_ffns
from moefx.convert.trace import (CALL_SPEC, ROUTER_INPUT, CallSpec, RecordedCall, add_graph_input, input_nodes,
                                 NotTraced, qualified, trace_piece, within)
from moefx.layer import MoELayer
from moefx.runtime import call_model, hooks

log = logging.getLogger(__name__)

BLOCK_INPUT = "moefx_pregate_input"  # GraphModule.meta key of a block: which of its inputs routes (survives deepcopy)


@dataclass
class Block:
    """A transformer block whose input routes the FFNs it holds."""

    name: str
    input_index: int                 # position of the routing input among the traced graph's placeholders
    ffns: list[str] = field(default_factory=list)


def is_block_candidate(model: nn.Module, name: str) -> bool:
    """Whether ``name`` is an item of an nn.ModuleList / nn.Sequential (a repeated block)."""
    if not name:
        return False
    return isinstance(model.get_submodule(name.rpartition(".")[0]), (nn.ModuleList, nn.Sequential))


def claim_blocks(model: nn.Module, calls: dict[str, RecordedCall], pieces: dict, affine: dict, leaves: set,
                 untraced: dict) -> dict[str, Block]:
    """Make the block of every FFN in ``pieces`` a traced piece of its own, routed from its input; returns
    the blocks. A block is the innermost repeated item (``is_block_candidate``) that holds the FFN and a
    linear layer besides its FFNs (its attention). Pieces enclosing a new block are traced again with the
    block opaque, so that their graphs call it."""
    blocks: dict[str, Block] = {}
    ffns = [f for _, found in pieces.values() for f in found]
    for name in sorted(calls, key=lambda n: (-n.count("."), n)):
        if not is_block_candidate(model, name) or name in untraced:
            continue
        claimed = _claim(model, name, calls[name], pieces, affine, blocks, leaves)
        if claimed is None:
            continue
        pieces[name] = claimed
        leaves.add(model.get_submodule(name))
        for outer in [p for p in pieces if p != name and within(name, p)]:
            gm, found = pieces[outer]
            if not any(n.op == "call_module" and qualified(outer, n.target) == name for n in gm.graph.nodes):
                pieces[outer] = _retrace(model, outer, calls[outer], leaves, affine, found)
    routed = {f for block in blocks.values() for f in block.ffns}
    for ffn in ffns:
        if ffn.name not in routed:
            raise unrouted_error(model, ffn.name, untraced)
    return blocks


def _claim(model: nn.Module, name: str, call: RecordedCall, pieces: dict, affine: dict, blocks: dict[str, Block],
           leaves: set) -> Optional[tuple[fx.GraphModule, list]]:
    """(graph, its own FFNs) of block ``name`` if it holds FFNs no inner block routes and another linear layer.

    The block is traced with every submodule that holds no FFN (its attention) opaque, so that their
    Python (KV caches, causal-mask choices made from the sequence length) runs at every call instead of
    being fixed to the calibration call's values."""
    inside = [f for p, (_, fs) in pieces.items() if p == name or within(p, name) for f in fs]
    routed = {f for block in blocks.values() for f in block.ffns}
    held = [f for f in inside if f.name not in routed]
    ffn_linears = {qualified(f.piece, n.target) for f in inside for n in f.nodes if n.op == "call_module"}
    if not held or not any(within(a, name) and a not in ffn_linears for a in affine):
        return None
    position = block_input(call)
    module = model.get_submodule(name)
    if position is None:
        raise ValueError(f"moefx.convert(pregate='block'): block {name} ({type(module).__name__}) holds {held[0].name} "
                         "but takes no floating-point tensor input to route from")
    index, width = position
    for ffn in held:
        if ffn.hidden != width:
            raise ValueError(f"moefx.convert(pregate='block'): {ffn.name} has input width {ffn.hidden}, but its block "
                             f"{name} takes a routing input of width {width}; pre-gating needs them equal")
    kept = {p for p in pieces if within(p, name)} | ffn_linears
    opaque = {m for n, m in module.named_modules() if n and next(m.children(), None) is not None
              and not any(k == qualified(name, n) or within(k, qualified(name, n)) for k in kept)}
    own = [f for f in pieces.get(name, (None, []))[1]]
    gm = _traced(module, call, leaves | opaque, name)
    found = None if gm is None else find_ffns(gm, name, affine)[0]
    if gm is None or [f.name for f in found] != [f.name for f in own]:
        log.debug("moefx: pregate traces block %s through its attention (FFNs differ when it is opaque)", name)
        gm = pieces[name][0] if name in pieces else _traced(module, call, leaves, name)
        found = own
    if gm is None:
        raise unrouted_error(model, held[0].name, [name])
    blocks[name] = Block(name, index, [f.name for f in held])
    gm.meta[BLOCK_INPUT] = index
    getattr(gm, CALL_SPEC).fix = ("pregate='block' traces each block on the first calibration batch: call the model "
                                  "as that batch did, or calibrate on batches that all call the block alike (all "
                                  "padded, or none), or convert without pregate")
    return gm, found


def _retrace(model: nn.Module, name: str, call: RecordedCall, leaves: set, affine: dict, found: list):
    gm = _traced(model.get_submodule(name), call, leaves, name)
    refound = None if gm is None else find_ffns(gm, name, affine)[0]
    if gm is None or [f.name for f in refound] != [f.name for f in found]:
        raise ValueError(f"moefx.convert(pregate='block'): {name or '<model>'} holds a block and FFNs of its own, "
                         "and does not trace with the block opaque. Convert without pregate")
    return gm, refound


def _traced(module: nn.Module, call: RecordedCall, leaves: set, name: str) -> Optional[fx.GraphModule]:
    try:
        return trace_piece(module, call, leaves, name)
    except NotTraced:
        return None


def block_input(call: RecordedCall) -> Optional[tuple[int, int]]:
    """(placeholder position, width) of the first floating-point tensor input of a recorded call."""
    spec = CallSpec.of(call.args, call.kwargs, "")
    position = 0
    for i, leaf in enumerate(pytree.tree_leaves((call.args, call.kwargs))):
        if i in spec.constants:
            continue
        if isinstance(leaf, Tensor) and leaf.is_floating_point() and leaf.dim() >= 2:
            return position, leaf.shape[-1]
        position += 1
    return None


def unrouted_error(model: nn.Module, ffn_name: str, untraced: Iterable[str]) -> ValueError:
    """The error for an FFN that no block claimed, naming the block that does not trace if there is one."""
    opaque = [n for n in untraced if is_block_candidate(model, n) and within(ffn_name, n)]
    why = (f"its block {opaque[-1]} ({type(model.get_submodule(opaque[-1])).__name__}) does not trace, so moefx "
           "cannot reach the block's input" if opaque else
           "pre-gating routes an FFN from the input of the innermost nn.ModuleList / nn.Sequential item that holds "
           "it and another linear layer (its attention), and there is none")
    return ValueError(f"moefx.convert(pregate='block'): cannot pre-gate {ffn_name}: {why}. Convert without pregate")


def route_from_blocks(model: nn.Module, pieces: dict[str, fx.GraphModule], blocks: dict[str, Block]) -> int:
    """Feed every MoE call inside each block's pieces with the block's input; returns the calls wired."""
    entries: dict[str, fx.Node] = {}
    wired = 0
    for block in blocks.values():
        source = input_nodes(pieces[block.name])[block.input_index]
        inner = [b for b in blocks if b != block.name and within(b, block.name)]
        for piece in sorted(p for p in pieces if p == block.name or within(p, block.name)):
            if any(piece == b or within(piece, b) for b in inner):
                continue
            gm = pieces[piece]
            calls = [n for n in gm.graph.nodes
                     if n.op == "call_module" and isinstance(gm.get_submodule(n.target), MoELayer)]
            if not calls:
                continue
            value = _thread(model, pieces, block.name, source, piece, entries)
            for node in calls:
                node.args = (node.args[0], value)
            gm.recompile()
            wired += len(calls)
    log.debug("moefx: pregate wired %d MoE call(s) to the inputs of %d block(s)", wired, len(blocks))
    return wired


def _thread(model, pieces, owner: str, value: fx.Node, target: str, entries: dict[str, fx.Node]) -> fx.Node:
    """The node carrying ``value`` in ``target``'s graph: passed down through every piece between."""
    if owner == target:
        return value
    gm = pieces[owner]
    calls = [n for n in gm.graph.nodes if n.op == "call_module"
             and (qualified(owner, n.target) == target or within(target, qualified(owner, n.target)))]
    if not calls:
        raise ValueError(f"moefx.convert(pregate='block'): the graph of block {owner} never calls {target}")
    child = qualified(owner, calls[0].target)
    if child not in pieces:
        raise ValueError(f"moefx.convert(pregate='block'): cannot pass the input of {owner} to the FFN in {target}: "
                         f"{child} ({type(model.get_submodule(child)).__name__}) between them does not trace. "
                         "Convert without pregate")
    if child not in entries:
        entries[child] = add_graph_input(pieces[child])
    for node in calls:
        node.kwargs = {**node.kwargs, ROUTER_INPUT: value}
    gm.recompile()
    return _thread(model, pieces, child, entries[child], target, entries)


@torch.no_grad()
def lookahead(model: nn.Module, batch: Any) -> dict[str, Tensor]:
    """Expert ids [tokens, top_k] of every pre-gated MoE layer of ``model`` on ``batch``, by qualified
    layer name, each computed from its block's input when the block starts (before its attention).

    Tokens are the layer's rows in order (batch x sequence, padding included); ids from num_experts
    on are zero-computation experts (nothing to fetch); with dynamic-k (top_p < 1) a choice the layer
    drops is -1. ``batch`` is a model input as for ``moefx.convert``."""
    blocks = {name: m for name, m in model.named_modules() if isinstance(m, fx.GraphModule) and BLOCK_INPUT in m.meta}
    if not blocks:
        raise ValueError(f"moefx.lookahead: {type(model).__name__} has no pre-gated MoE layer; convert it with "
                         "moefx.convert(..., router='distilled', pregate='block')")
    decisions: dict[str, Tensor] = {}
    registrations = []
    for name, block in blocks.items():
        inner = [b for b in blocks if b != name and within(b, name)]
        layers = {qualified(name, n): m for n, m in block.named_modules() if isinstance(m, MoELayer)
                  and not any(within(qualified(name, n), b) for b in inner)}

        def decide(module, args, kwargs, layers=layers, index=block.meta[BLOCK_INPUT]):
            routed_from = getattr(module, CALL_SPEC).inputs(args, kwargs)[index]
            for layer_name, layer in layers.items():
                gates, ids = layer.routing(routed_from)
                decisions.setdefault(layer_name, ids.masked_fill(gates == 0, -1) if layer.top_p < 1 else ids)

        registrations.append(lambda block=block, decide=decide: block.register_forward_pre_hook(decide,
                                                                                                  with_kwargs=True))
    with hooks(*registrations):
        call_model(model, batch)
    return decisions
