"""Trace a model into torch.fx graphs piece by piece, so that real models trace unmodified.

A whole Hugging Face model rarely traces symbolically (``**kwargs`` signatures, tuple outputs
unpacked in Python, device checks). moefx records how each submodule is called on one
calibration batch and traces submodules with a *concrete* tracer: every proxy carries the value
it had on that batch, so Python control flow, iteration and ``len`` resolve as they did in the
real call. Modules without children, and modules that fail to trace, stay opaque leaves. A
traced piece is accepted only if its graph reproduces the recorded output.
"""
from __future__ import annotations

import contextlib
import logging
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from moefx.runtime import hooks

log = logging.getLogger(__name__)

_CONSTANT_TYPES = (type(None), bool, int, float, str, torch.dtype, torch.device)


@dataclass
class RecordedCall:
    """The first call of a module during the recording forward: inputs and output."""

    args: tuple
    kwargs: dict
    output: Any


def record_calls(model: nn.Module, modules: dict[str, nn.Module], run: Callable[[], Any]) -> dict[str, RecordedCall]:
    """Run ``run()`` once and keep the first (args, kwargs, output) of each of ``modules``."""
    calls: dict[str, RecordedCall] = {}

    def register(name, module):
        def hook(mod, args, kwargs, output):
            calls.setdefault(name, RecordedCall(args, kwargs, output))
        return lambda: module.register_forward_hook(hook, with_kwargs=True)

    with hooks(*(register(name, module) for name, module in modules.items())):
        run()
    return calls


class _ConcreteAttribute(fx.proxy.Attribute):
    def __init__(self, root: "ConcreteProxy", attr: str):
        super().__init__(root, attr)
        self.value = getattr(root.value, attr)


class ConcreteProxy(fx.Proxy):
    """An fx proxy that also holds the value it takes on the recorded call."""

    def __init__(self, node: fx.Node, tracer: "ConcreteTracer", value: Any):
        super().__init__(node, tracer)
        self.value = value

    def __getattr__(self, attr: str):
        if attr == "value":
            raise AttributeError(attr)
        return _ConcreteAttribute(self, attr)

    def __bool__(self) -> bool:
        return bool(self.value)

    def __len__(self) -> int:
        return len(self.value)

    def __iter__(self):
        return (self[i] for i in range(len(self.value)))

    def keys(self):
        return self.value.keys()


_ConcreteAttribute.__getattr__ = ConcreteProxy.__getattr__
_ConcreteAttribute.__bool__ = ConcreteProxy.__bool__
_ConcreteAttribute.__len__ = ConcreteProxy.__len__
_ConcreteAttribute.__iter__ = ConcreteProxy.__iter__


@contextlib.contextmanager
def _unpatched_modules():
    """Run a leaf module for real inside a trace: fx patches Module.__call__ and __getattr__."""
    patched = nn.Module.__call__, nn.Module.__getattr__
    nn.Module.__call__, nn.Module.__getattr__ = fx._symbolic_trace._orig_module_call, fx._symbolic_trace._orig_module_getattr
    try:
        yield
    finally:
        nn.Module.__call__, nn.Module.__getattr__ = patched


def _value(a: Any) -> Any:
    return fx.node.map_aggregate(a, lambda v: v.value if isinstance(v, (ConcreteProxy, _ConcreteAttribute)) else v)


class ConcreteTracer(fx.Tracer):
    """fx tracer whose proxies carry concrete values; ``leaves`` stay opaque."""

    def __init__(self, leaves: set[nn.Module], inputs: dict[str, Any]):
        super().__init__(autowrap_modules=(), param_shapes_constant=True)
        self.leaves = leaves
        self.inputs = inputs

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return m in self.leaves or next(m.children(), None) is None

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        if kind == "placeholder":
            value = self.inputs[target]
        elif kind == "get_attr":
            value = operator.attrgetter(target)(self.root)
        elif kind == "call_function":
            value = target(*_value(args), **_value(kwargs))
        elif kind == "call_method":
            self_value, *rest = _value(args)
            value = getattr(self_value, target)(*rest, **_value(kwargs))
        elif kind == "call_module":
            with _unpatched_modules():
                value = self.root.get_submodule(target)(*_value(args), **_value(kwargs))
        else:
            value = None
        node = self.create_node(kind, target, self.create_arg(args), self.create_arg(kwargs), name, type_expr)
        return ConcreteProxy(node, self, value)

    def create_arg(self, a: Any):
        if isinstance(a, _ConcreteAttribute):
            return a.node
        return super().create_arg(a)


ROUTER_INPUT = "moefx_router_input"  # keyword that hands a pre-gated piece its router input (``convert.pregate``)
CALL_SPEC = "moefx_call"  # attribute of a traced piece holding its CallSpec


@dataclass
class CallSpec:
    """How a traced piece is called: pytree of (args, kwargs) whose non-constant leaves are graph inputs.
    ``router_input``: the piece also takes the ``moefx_router_input`` keyword, as its last graph input."""

    tree: Any
    piece: str = ""
    constants: dict[int, Any] = field(default_factory=dict)
    num_inputs: int = 0
    router_input: bool = False

    @classmethod
    def of(cls, args: tuple, kwargs: dict, piece: str) -> "CallSpec":
        leaves, tree = pytree.tree_flatten((args, kwargs))
        spec = cls(tree, piece)
        for i, leaf in enumerate(leaves):
            if isinstance(leaf, _CONSTANT_TYPES):
                spec.constants[i] = leaf
            else:
                spec.num_inputs += 1
        return spec

    def inputs(self, args: tuple, kwargs: dict) -> tuple:
        """The graph inputs of a call with ``args`` and ``kwargs``."""
        piece = self.piece or "<model>"
        if self.router_input:
            if ROUTER_INPUT not in kwargs:
                raise TypeError(f"moefx: {piece} is pre-gated: its MoE layer routes from the input of the block that "
                                f"holds it; call that block (or pass {ROUTER_INPUT}=<block input>)")
            kwargs = dict(kwargs)
            extra = (kwargs.pop(ROUTER_INPUT),)
        else:
            extra = ()
        leaves, tree = pytree.tree_flatten((args, kwargs))
        if tree != self.tree:
            raise TypeError(f"moefx: {piece} is called with arguments of another structure than on the calibration "
                            f"batch it was traced with ({tree} vs {self.tree}); convert with calibration batches "
                            "shaped like your real inputs")
        inputs = []
        for i, leaf in enumerate(leaves):
            if i in self.constants:
                if leaf != self.constants[i]:
                    raise ValueError(f"moefx: {piece} was traced with argument #{i} = {self.constants[i]!r} and is now "
                                     f"called with {leaf!r}; convert with calibration batches that call the model "
                                     "the way you will")
            else:
                inputs.append(leaf)
        return (*inputs, *extra)


def graph_inputs(spec: CallSpec, args: tuple, kwargs: dict) -> tuple:
    """The first node of every traced piece: its call's (args, kwargs) to the graph's inputs."""
    return spec.inputs(args, kwargs)


def trace_piece(module: nn.Module, call: RecordedCall, leaves: set[nn.Module], piece: str) -> Optional[fx.GraphModule]:
    """Trace ``module`` as it was called in ``call``; None if it does not trace or does not reproduce the output.

    The graph takes the module's own ``(*args, **kwargs)``; its first node unpacks them into the traced
    inputs (``graph_inputs`` with the piece's ``CallSpec``, the attribute ``moefx_call``), so the piece is
    a plain GraphModule that deep-copies and pickles with everything it needs."""
    spec = CallSpec.of(call.args, call.kwargs, piece)
    leaves_values = pytree.tree_leaves((call.args, call.kwargs))
    names = [f"input_{i}" for i in range(spec.num_inputs)]
    values = [v for i, v in enumerate(leaves_values) if i not in spec.constants]
    tracer = ConcreteTracer(leaves, dict(zip(names, values)))

    class _Flat(nn.Module):
        pass

    flat = _Flat()
    flat.piece = module
    source = (f"def forward(self, {', '.join(names)}):\n"
              f"    leaves = [{', '.join(_leaf_expr(i, spec, names) for i in range(len(leaves_values)))}]\n"
              f"    args, kwargs = tree_unflatten(leaves, tree)\n"
              f"    return self.piece(*args, **kwargs)\n")
    scope = {"tree_unflatten": pytree.tree_unflatten, "tree": spec.tree, "constants": spec.constants}
    exec(source, scope)
    _Flat.forward = scope["forward"]
    try:
        with torch.no_grad():
            graph = tracer.trace(flat)
    except Exception as error:  # any Python the tracer cannot follow makes the module a leaf
        log.debug("moefx: %s does not trace (%s: %s)", piece or "<model>", type(error).__name__, error)
        return None
    owners = {}
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr"):
            owners[node.target.removeprefix("piece.")] = operator.attrgetter(node.target)(flat)
            node.target = node.target.removeprefix("piece.")
    owners[CALL_SPEC] = spec
    _take_call_arguments(graph)
    gm = fx.GraphModule(owners, graph, class_name=type(module).__name__)
    gm.graph.eliminate_dead_code()  # values read only to steer Python control flow while tracing
    gm.recompile()
    if not reproduces(gm, call, piece):
        return None
    return gm


def _take_call_arguments(graph: fx.Graph) -> None:
    """Replace the flat input placeholders with ``*args, **kwargs`` and the ``graph_inputs`` node."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    with graph.inserting_before(next(iter(graph.nodes))):
        args, kwargs = graph.placeholder("*args"), graph.placeholder("**kwargs")
        inputs = graph.call_function(graph_inputs, (graph.get_attr(CALL_SPEC), args, kwargs))
    for index, node in enumerate(placeholders):
        with graph.inserting_before(node):
            node.replace_all_uses_with(graph.call_function(operator.getitem, (inputs, index)))
        graph.erase_node(node)


def input_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The nodes of a traced piece that carry its graph inputs, in order."""
    unpack = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is graph_inputs)
    return sorted((u for u in unpack.users), key=lambda n: n.args[1])


def add_graph_input(gm: fx.GraphModule) -> fx.Node:
    """Make a traced piece take the ``moefx_router_input`` keyword as its last graph input; returns its node."""
    spec: CallSpec = getattr(gm, CALL_SPEC)
    spec.router_input = True
    unpack = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is graph_inputs)
    with gm.graph.inserting_after(unpack):
        node = gm.graph.call_function(operator.getitem, (unpack, spec.num_inputs))
    gm.recompile()
    return node


def _leaf_expr(i: int, spec: CallSpec, names: list[str]) -> str:
    if i in spec.constants:
        return f"constants[{i}]"
    position = sum(1 for j in range(i) if j not in spec.constants)
    return names[position]


def reproduces(gm: nn.Module, call: RecordedCall, piece: str) -> bool:
    """Whether ``gm`` gives the recorded output on the recorded inputs (bitwise up to 1e-6 relative)."""
    try:
        with torch.no_grad():
            out = gm(*call.args, **call.kwargs)
    except Exception as error:
        log.debug("moefx: traced %s fails on its own inputs (%s)", piece or "<model>", error)
        return False
    got, want = pytree.tree_leaves(out), pytree.tree_leaves(call.output)
    if len(got) != len(want):
        return False
    for a, b in zip(got, want):
        if isinstance(b, torch.Tensor):
            if not isinstance(a, torch.Tensor) or a.shape != b.shape:
                return False
            if not torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6 * max(1.0, b.float().abs().max().item())):
                log.debug("moefx: traced %s differs from the module on its own inputs", piece or "<model>")
                return False
    return True


def within(name: str, scope: str) -> bool:
    """Whether module path ``name`` lies inside module ``scope`` ("" is the whole model)."""
    return not scope or name.startswith(scope + ".")


def qualified(piece: str, name: str) -> str:
    """The model-level path of module ``name`` of the traced piece at path ``piece``."""
    return f"{piece}.{name}" if piece else name
