"""Reading torch-level fx graphs (as Dynamo captures them) the same way whatever the call spelling.

Dynamo records ``x.topk(k)``, ``torch.topk(x, k)`` and ``operator.itruediv`` as different node kinds;
the MoE block recognisers only care which operation a node performs, so they go through
``op_name`` and ``arg`` here.
"""
from __future__ import annotations

import operator
from typing import Any, Optional

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx import Graph, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

# Ops that change dtype, layout or memory format but not values the recognisers care about.
CASTS = frozenset({"to", "float", "type", "contiguous", "_to_copy", "type_as"})


def op_name(node: Any) -> Optional[str]:
    """The operation a call node performs, e.g. "topk" for ``torch.topk``, ``Tensor.topk`` and ``aten.topk``."""
    if not isinstance(node, Node):
        return None
    if node.op == "call_method":
        return node.target
    if node.op != "call_function":
        return None
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.split("::")[-1]
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name.split("::")[-1]
    return getattr(target, "__name__", None)


def arg(node: Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``name`` of a call, given positionally at ``index`` or as a keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def value(node: Any) -> Any:
    """The fake value Dynamo recorded for a node (a FakeTensor, SymInt, tuple...), or None."""
    if not isinstance(node, Node):
        return None
    return node.meta.get("example_value", node.meta.get("val"))


def is_tensor(node: Any) -> bool:
    return isinstance(value(node), torch.Tensor)


def strip_casts(node: Any) -> Any:
    """Follow dtype casts back to the tensor they convert."""
    while op_name(node) in CASTS:
        node = node.args[0]
    return node


def same_size(a: Any, b: Any) -> bool:
    """True when two sizes (ints or SymInts) are provably equal, without adding guards."""
    return bool(statically_known_true(a == b))


def fake_run(target: Any, args: tuple, kwargs: dict) -> Any:
    """Run ``target`` on the fake values of node arguments, for the new node's metadata."""
    def fake(a):
        return value(a) if isinstance(a, Node) else a

    fake_args = torch.fx.node.map_aggregate(args, fake)
    fake_kwargs = torch.fx.node.map_aggregate(kwargs, fake)
    fakes = [a for a in fake_args if isinstance(a, FakeTensor)]
    mode = fakes[0].fake_mode if fakes else None
    if mode is None:
        return target(*fake_args, **fake_kwargs)
    with mode:
        return target(*fake_args, **fake_kwargs)


def call(graph: Graph, target: Any, *args: Any, **kwargs: Any) -> Node:
    """Insert ``target(*args, **kwargs)`` at the graph's insertion point, with its fake value recorded."""
    node = graph.call_function(target, args, kwargs)
    inputs = [a for a in node.all_input_nodes]
    # Dynamo graphs keep fake values under "example_value", export (ATen) graphs under "val".
    key = "val" if inputs and all("example_value" not in a.meta for a in inputs) else "example_value"
    node.meta[key] = fake_run(target, args, kwargs)
    return node


def getitem_of(node: Node, index: int) -> Optional[Node]:
    """The user of a multi-output node that takes output ``index`` (e.g. ``topk(...)[1]``)."""
    for user in node.users:
        if user.op == "call_function" and user.target is operator.getitem and user.args[1] == index:
            return user
    return None
