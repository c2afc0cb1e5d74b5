"""Replace a found FFN's nodes in a traced piece with one call of its ``MoELayer``; where the piece is
the FFN alone, swap its module for an ``MoEFFN`` instead (the way peft swaps layers)."""
from __future__ import annotations

import logging
import os
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx
from torch import Tensor, nn

from moefx.convert.find import elementwise_kind
from moefx.convert.trace import CALL_SPEC, CallSpec, graph_inputs, guard_only, qualified
from moefx.layer import MoELayer
from moefx.ffn import FFN

log = logging.getLogger(__name__)


def replace_ffn(gm: fx.GraphModule, ffn: FFN, layer: MoELayer) -> str:
    """Swap ``ffn`` for a call_module of ``layer``; returns the layer's name inside ``gm``."""
    targets = [n.target for n in ffn.nodes if n.op == "call_module" and "." in n.target]
    prefix = os.path.commonprefix([t.rsplit(".", 1)[0] + "." for t in targets]) if len(targets) > 1 else ""
    prefix = prefix[: prefix.rfind(".") + 1]
    name, suffix = f"{prefix}moe", 1
    while _has_attr(gm, name):
        suffix += 1
        name = f"{prefix}moe{suffix}"
    gm.add_submodule(name, layer)
    with gm.graph.inserting_before(ffn.output_node):
        call = gm.graph.call_module(name, (ffn.input_node,))
    ffn.output_node.replace_all_uses_with(call)
    position = {node: i for i, node in enumerate(gm.graph.nodes)}
    for node in sorted(ffn.nodes, key=position.__getitem__, reverse=True):
        for guard in [u for u in node.users if guard_only(u)]:
            _erase_with_users(gm.graph, guard)  # guards on the FFN's own values (a chunk's length): the MoE replaces them
        gm.graph.erase_node(node)
    gm.delete_all_unused_submodules()
    gm.recompile()
    log.debug("moefx: %s -> %s.%s (%d nodes replaced)", ffn.name, ffn.piece or "<model>", name, len(ffn.nodes))
    return name


def _erase_with_users(graph: fx.Graph, node: fx.Node) -> None:
    for user in list(node.users):
        _erase_with_users(graph, user)
    graph.erase_node(node)


class MoEFFN(nn.Module):
    """What a module that held nothing but a dense FFN becomes: its MoE layer ``moe``, then the
    element-wise modules the FFN applied to its output (dropout), in ``after``. The parent's forward
    runs unchanged around it, with every argument, mask and cache it takes."""

    def __init__(self, moe: MoELayer, after: list[nn.Module], replaces: str, span: Optional[SpanGuard] = None):
        super().__init__()
        self.moe = moe
        self.after = nn.ModuleList(after)
        self.replaces = replaces
        self.span = span

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        given = [*args, *kwargs.values()]
        if len(given) != 1 or not isinstance(given[0], Tensor):
            raise TypeError(f"moefx: the MoE layer that replaced a {self.replaces} takes the FFN input alone, as the "
                            f"{self.replaces} was called on the calibration batch; got {len(given)} argument(s)")
        y = self.moe(given[0])
        for module in self.after:
            y = module(y)
        if self.span is not None:
            self.span.entered(y)
        return y

    def extra_repr(self) -> str:
        return f"replaces={self.replaces}"


def as_module_swap(gm: fx.GraphModule) -> Optional[MoEFFN]:
    """An ``MoEFFN`` computing ``gm`` if its graph is input -> MoE layer -> element-wise modules -> output on
    a call with one tensor argument; else None (the traced piece stays)."""
    spec: CallSpec = getattr(gm, CALL_SPEC)
    if spec.num_inputs != 1 or spec.constants or spec.router_input:
        return None
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "get_attr")]
    if len(nodes) < 4 or nodes[0].target is not graph_inputs or nodes[-1].op != "output":
        return None
    unpack, (moe_call, *after), output = nodes[1], nodes[2:-1], nodes[-1]
    if not (unpack.args == (nodes[0], 0) and moe_call.op == "call_module"
            and isinstance(gm.get_submodule(moe_call.target), MoELayer) and moe_call.args == (unpack,)
            and not moe_call.kwargs):
        return None
    previous = moe_call
    for node in after:
        if node.op != "call_module" or node.args != (previous,) or elementwise_kind(node, gm) != "identity":
            return None
        previous = node
    if output.args != (previous,):
        return None
    return MoEFFN(gm.get_submodule(moe_call.target), [gm.get_submodule(n.target) for n in after], gm.__class__.__name__)


@dataclass
class SpanSwap:
    """A plain FFN whose modules sit in different parents (BERT's intermediate/output, OPT's fc1/fc2 inline
    in the decoder layer): its input Linear becomes an ``MoEFFN`` computing the whole FFN, and the
    activation module and output Linear become ``PassThrough``s, so every parent keeps its own forward."""

    entry: str            # model path of the input Linear
    bypassed: list[str]   # model paths of the activation module, dropout modules between, the output Linear


def span_swap(ffn: FFN, gm: fx.GraphModule, model: nn.Module) -> Optional[SpanSwap]:
    """The ``SpanSwap`` of ``ffn`` (found in piece ``gm`` of ``model``), or None when its graph does not allow
    one: gated, an activation that is a function rather than a module, or a module of the FFN that the
    model calls or holds anywhere else. Dropout modules inside the FFN become pass-throughs (the MoE layer
    has no hidden activation to drop out, as in a traced piece); code between the activation and the output
    Linear that calibration did not run (OPT's activation_dropout when training) is refused by ``SpanGuard``."""
    if ffn.gated:
        return None
    in_node = next((n for n in ffn.nodes if n.op == "call_module" and n is not ffn.output_node and n.args
                    and n.args[0] is ffn.input_node), None)
    act = [n for n in ffn.nodes if n is not in_node and n is not ffn.output_node
           and elementwise_kind(n, gm) not in (None, "identity")]
    if not in_node or len(act) != 1 or act[0].op != "call_module":
        return None
    identities = [n for n in ffn.nodes if n.op == "call_module" and n not in (in_node, act[0], ffn.output_node)]
    modules = [in_node, act[0], *identities, ffn.output_node]
    held = {}
    for _, module in model.named_modules(remove_duplicate=False):
        held[id(module)] = held.get(id(module), 0) + 1
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    for node in modules:
        if calls.count(node.target) != 1 or held.get(id(gm.get_submodule(node.target)), 0) != 1:
            return None
    return SpanSwap(qualified(ffn.piece, in_node.target), [qualified(ffn.piece, n.target) for n in modules[1:]])


class SpanGuard:
    """The span swap's guard: the output Linear's ``PassThrough`` must receive the very tensor the entry
    ``MoEFFN`` returned, unchanged. Code the parent runs between the activation and the output Linear on a
    path the calibration did not take (a mask, a scale) would otherwise act on the FFN's output. The tensor
    is held per thread (weakly), so that threads calling one model do not see each other's."""

    def __init__(self, entry: str, exit: str):
        self.entry, self.exit = entry, exit
        self.state = threading.local()

    def entered(self, y: Tensor) -> None:
        if not torch.compiler.is_compiling():
            self.state.output = weakref.ref(y), None if y.is_inference() else y._version

    def check(self, x: Tensor) -> None:
        if torch.compiler.is_compiling():
            return
        output, version = getattr(self.state, "output", (None, None))
        self.state.output = None, None
        if output is None or output() is not x or (version is not None and x._version != version):
            raise ValueError(f"moefx: {self.exit} replaces the output Linear of the FFN that {self.entry} now "
                             f"computes whole, and this call ran code between {self.entry}'s activation and "
                             f"{self.exit} that did not run on the calibration batch; call the model the way the "
                             "calibration batch did, or convert with a calibration batch that takes this path")

    def __getstate__(self) -> dict:
        return {"entry": self.entry, "exit": self.exit}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["entry"], state["exit"])


class PassThrough(nn.Module):
    """Returns its input: what the activation, dropout and output Linear of a span-swapped FFN become. It keeps
    their tensors' names as empty tensors of their dtype and device, so that Python reading them (T5's
    ``self.wo.weight.dtype``) still runs. The output Linear's checks its ``SpanGuard``."""

    def __init__(self, dense: nn.Module, span: Optional[SpanGuard] = None):
        super().__init__()
        for name, tensor in [*dense.named_parameters(recurse=False), *dense.named_buffers(recurse=False)]:
            self.register_buffer(name, tensor.new_empty(0), persistent=False)
        self.span = span

    def forward(self, x: Tensor) -> Tensor:
        if self.span is not None:
            self.span.check(x)
        return x


def apply_span_swap(model: nn.Module, swap: SpanSwap, layer: MoELayer) -> None:
    dense = model.get_submodule(swap.entry)
    span = SpanGuard(swap.entry, swap.bypassed[-1])
    _set(model, swap.entry, MoEFFN(layer, [], type(dense).__name__, span))
    for path in swap.bypassed:
        _set(model, path, PassThrough(model.get_submodule(path), span if path == swap.bypassed[-1] else None))


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def _has_attr(gm: fx.GraphModule, name: str) -> bool:
    try:
        gm.get_submodule(name)
    except AttributeError:
        return False
    return True
