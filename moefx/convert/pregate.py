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
from typing import Any, Callable, Iterable, Optional

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from moefx.layer import MoELayer
from moefx.fit.calibrate import call_model, capture_rows
from moefx.convert.find import find_ffns
from moefx.fit.routers import FITTED_ROUTERS
from moefx.convert.trace import CallSpec, RecordedCall, qualified, trace_piece, within

log = logging.getLogger(__name__)

PREGATES = ("block",)
ROUTER_INPUT = "moefx_router_input"  # keyword and placeholder that carry the block input into nested pieces
BLOCK_INPUT = "moefx_pregate_input"  # GraphModule.meta key of a block: which of its inputs routes (survives deepcopy)


@dataclass
class Block:
    """A transformer block whose input routes the FFNs it holds."""

    name: str
    input_index: int                 # position of the routing input among the traced graph's placeholders
    ffns: list[str] = field(default_factory=list)


def check_options(pregate: Optional[str], router: str, compensate: bool, refit: bool) -> None:
    """Validate ``moefx.convert``'s pregate option against the others."""
    if pregate is None:
        return
    if pregate not in PREGATES:
        raise ValueError(f"moefx.convert: pregate={pregate!r} is not one of {PREGATES} (or None)")
    if router not in FITTED_ROUTERS:
        raise ValueError("moefx.convert: pregate='block' routes each MoE layer from the input of its block, so the "
                         f"router must be fitted to that input: pass router='least_squares' or 'distilled' (not "
                         f"{router!r})")
    if compensate or refit:
        raise ValueError("moefx.convert: compensate and refit fit the experts under the routing of the FFN's own "
                         "input; with pregate use neither")


def check_routed(model: nn.Module, ffns: list, blocks: dict[str, Block], untraced: Iterable[str]) -> None:
    """Raise for the first FFN that no block routes."""
    routed = {f for block in blocks.values() for f in block.ffns}
    for ffn in ffns:
        if ffn.name not in routed:
            raise unrouted_error(model, ffn.name, untraced)


def is_block_candidate(model: nn.Module, name: str) -> bool:
    """Whether ``name`` is an item of an nn.ModuleList / nn.Sequential (a repeated block)."""
    if not name:
        return False
    return isinstance(model.get_submodule(name.rpartition(".")[0]), (nn.ModuleList, nn.Sequential))


def holds_pieces(name: str, pieces: dict) -> bool:
    return any(within(p, name) for p in pieces)


def claim_block(model: nn.Module, name: str, gm: fx.GraphModule, call: RecordedCall, found: list, pieces: dict,
                affine: dict, blocks: dict[str, Block], leaves: set[nn.Module]
                ) -> Optional[tuple[fx.GraphModule, list]]:
    """Make traced module ``name`` the block of the FFNs it holds (``found`` in its own graph ``gm`` and
    those of ``pieces`` inside it) that no inner block routes yet, if it is a block candidate holding a
    linear layer besides its FFNs: returns the block's graph and its own FFNs, else None.

    The block is traced again with every submodule that holds no FFN (its attention) opaque, so that
    their Python (KV caches, causal-mask choices made from the sequence length) runs at every call
    instead of being fixed to the calibration call's values."""
    if not is_block_candidate(model, name):
        return None
    inside = list(found) + [f for p, (_, fs) in pieces.items() if within(p, name) for f in fs]
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
    retraced = trace_piece(module, call, leaves | opaque, name)
    if retraced is not None:
        refound, _ = find_ffns(retraced, name, affine)
        if [f.name for f in refound] == [f.name for f in found]:
            gm, found = retraced, refound
        else:
            log.debug("moefx: pregate keeps block %s traced through its attention (FFNs differ when opaque)", name)
    blocks[name] = Block(name, index, [f.name for f in held])
    gm.meta[BLOCK_INPUT] = index
    return gm, found


def block_input(call: RecordedCall) -> Optional[tuple[int, int]]:
    """(placeholder position, width) of the first floating-point tensor input of a recorded call."""
    spec = CallSpec.of(call.args, call.kwargs)
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
        source = _placeholders(pieces[block.name])[block.input_index]
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
        entries[child] = _add_router_input(pieces[child], child)
    for node in calls:
        node.kwargs = {**node.kwargs, ROUTER_INPUT: value}
    gm.recompile()
    return _thread(model, pieces, child, entries[child], target, entries)


def _add_router_input(gm: fx.GraphModule, piece: str) -> fx.Node:
    """A last placeholder for the router input, taken from the ``moefx_router_input`` keyword: the
    piece's argument-flattening pre-hook (``trace.trace_piece``) is wrapped to pass it through."""
    with gm.graph.inserting_after(_placeholders(gm)[-1]):
        node = gm.graph.placeholder(ROUTER_INPUT)
    gm.recompile()
    hooks = list(gm._forward_pre_hooks.items())
    if len(hooks) != 1 or hooks[0][0] not in gm._forward_pre_hooks_with_kwargs:
        raise RuntimeError(f"moefx pregate: expected {piece} to carry exactly one argument-flattening pre-hook, "
                           f"found {len(hooks)}")
    handle_id, flatten = hooks[0]
    del gm._forward_pre_hooks[handle_id]
    gm._forward_pre_hooks_with_kwargs.pop(handle_id, None)

    def pre_hook(module, args, kwargs):
        if ROUTER_INPUT not in kwargs:
            raise TypeError(f"moefx: {piece} is pre-gated: its MoE layer routes from the input of the block that "
                            f"holds it; call that block (or pass {ROUTER_INPUT}=<block input>)")
        kwargs = dict(kwargs)
        router_input = kwargs.pop(ROUTER_INPUT)
        flat, _ = flatten(module, args, kwargs)
        return (*flat, router_input), {}

    def restore(clone: fx.GraphModule) -> None:
        # GraphModule.__deepcopy__ drops forward hooks: the copy gets this one alone
        clone._forward_pre_hooks.clear()
        clone._forward_pre_hooks_with_kwargs.clear()
        clone.register_forward_pre_hook(pre_hook, with_kwargs=True)

    gm.register_forward_pre_hook(pre_hook, with_kwargs=True)
    gm._register_deepcopy_hook(restore)
    return node


def _placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def capture_router_rows(layer: MoELayer, batches: Iterable[Any], run: Callable[[Any], Any], limit: int
                        ) -> tuple[Tensor, Tensor]:
    """(FFN-input rows, router-input rows) of a pre-gated ``layer`` over the calibration batches, at most
    ``limit`` of each (fp32, row t of both the same token); padding rows of dict batches left out."""
    x, router_input = capture_rows(layer, batches, run, limit, arguments=2)
    return x, router_input


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
    handles = []
    for name, block in blocks.items():
        inner = [b for b in blocks if b != name and within(b, name)]
        layers = {qualified(name, n): m for n, m in block.named_modules() if isinstance(m, MoELayer)
                  and not any(within(qualified(name, n), b) for b in inner)}

        def decide(module, args, layers=layers, index=block.meta[BLOCK_INPUT]):
            for layer_name, layer in layers.items():
                gates, ids = layer.routing(args[index])
                decisions.setdefault(layer_name, ids.masked_fill(gates == 0, -1) if layer.top_p < 1 else ids)

        # registered after the block's argument-flattening hook, so ``args`` are its graph inputs
        handles.append(block.register_forward_pre_hook(decide))
    try:
        call_model(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return decisions
