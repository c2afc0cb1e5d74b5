"""Trace a model into torch.fx graphs piece by piece, so that real models trace unmodified.

A whole Hugging Face model rarely traces symbolically (``**kwargs`` signatures, tuple outputs
unpacked in Python, device checks). moefx records how each submodule is called on one
calibration batch and traces submodules with a *concrete* tracer: every proxy carries the value
it had on that batch, so Python control flow, iteration and ``len`` resolve as they did in the
real call. Modules without children, and modules that fail to trace, stay opaque leaves. A
traced piece is accepted only if its graph reproduces the recorded output.

What the concrete tracer resolves in Python (``if``, ``len``, iteration over a value computed from
the inputs) holds only for calls like the recorded one: each such decision stays in the graph as a
guard that raises, naming the source line, when a later call decides otherwise; and a call whose
arguments differ in structure or constants from the recorded one is refused naming the argument.
Recorded calls are copies taken before the module runs, so tracing never runs a module on live
state (a KV cache it appends to) and later in-place ops cannot change the record.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import operator
import os
import traceback
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
    """The first call of a module during the recording forward: copies of its inputs as they were before
    the call and of its output. ``fresh()`` gives new copies of the inputs for each run."""

    args: tuple
    kwargs: dict
    output: Any

    def fresh(self) -> tuple[tuple, dict]:
        """A copy of the inputs to run the module on once more (it may update a cache passed to it)."""
        return snapshot((self.args, self.kwargs))


def snapshot(value: Any) -> Any:
    """A deep copy of ``value`` (inputs holding caches), or where something in it does not deep-copy, the
    same structure with its tensors cloned."""
    try:
        return copy.deepcopy(value)
    except Exception:  # objects that refuse deepcopy (generators, locks) are kept by reference
        return pytree.tree_map(lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v, value)


def record_calls(model: nn.Module, modules: dict[str, nn.Module], run: Callable[[], Any]) -> dict[str, RecordedCall]:
    """Run ``run()`` once and keep copies of the first (args, kwargs, output) of each of ``modules``."""
    calls: dict[str, RecordedCall] = {}
    pending: dict[str, tuple] = {}

    def register(name, module):
        def before(mod, args, kwargs):
            if name not in calls and name not in pending:
                pending[name] = snapshot((args, kwargs))

        def after(mod, args, kwargs, output):
            if name in pending:
                inputs = pending.pop(name)
                calls[name] = RecordedCall(*inputs, snapshot(output))
        return (lambda: module.register_forward_pre_hook(before, with_kwargs=True),
                lambda: module.register_forward_hook(after, with_kwargs=True))

    with hooks(*(r for name, module in modules.items() for r in register(name, module))):
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
        return self.tracer.decided(self, "bool", bool(self.value))

    def __len__(self) -> int:
        return self.tracer.decided(self, "len", len(self.value))

    def __iter__(self):
        return (self[i] for i in range(self.tracer.decided(self, "len", len(self.value))))

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


_HERE = (os.path.dirname(fx.__file__), __file__)


def _source_line() -> str:
    """The innermost line of the traced model's code on the stack (what a guard names)."""
    for frame in reversed(traceback.extract_stack()):
        if not frame.filename.startswith(_HERE):
            return f"{os.path.basename(frame.filename)}:{frame.lineno} `{(frame.line or '').strip()}`"
    return "<unknown>"


def check_traced(value: Any, kind: str, expected: Any, piece: str, where: str) -> None:
    """A guard in a traced piece: Python decided ``kind`` (bool/len) of ``value`` as ``expected`` when tracing."""
    got = bool(value) if kind == "bool" else len(value)
    if got != expected:
        raise ValueError(f"moefx: {piece or '<model>'} was converted by tracing a call on which {where} gave "
                         f"{kind}() = {expected!r}; this call gives {got!r}, a branch the converted graph does "
                         "not hold. Call it the way the calibration batch did (same shapes where the model "
                         "branches on them), or convert with a calibration batch shaped like this call")


fx.node._side_effectful_functions.add(check_traced)  # guards have no users: keep them through dead-code removal


def _value(a: Any) -> Any:
    return fx.node.map_aggregate(a, lambda v: v.value if isinstance(v, (ConcreteProxy, _ConcreteAttribute)) else v)


class ConcreteTracer(fx.Tracer):
    """fx tracer whose proxies carry concrete values; ``leaves`` stay opaque."""

    def __init__(self, leaves: set[nn.Module], inputs: dict[str, Any]):
        super().__init__(autowrap_modules=(), param_shapes_constant=True)
        self.leaves = leaves
        self.inputs = inputs
        self.guards: list[tuple[fx.Node, str, Any, str]] = []

    def decided(self, proxy: "ConcreteProxy", kind: str, value: Any) -> Any:
        """Python decides ``kind`` of ``proxy`` as ``value``: a guard if that depends on the call's inputs."""
        if _reads_inputs(proxy.node):
            self.guards.append((proxy.node, kind, value, _source_line()))
        return value

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return m in self.leaves or next(m.children(), None) is None

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        if kind == "placeholder":
            value = self.inputs[target]
        elif kind == "get_attr":
            with _unpatched_modules():  # fx's patched getattr would create this proxy again, forever
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

    paths: list[str] = field(default_factory=list)  # each leaf's argument, as the caller writes it
    kinds: dict[int, str] = field(default_factory=dict)  # the type of each graph input's leaf
    # why one call was traced, and what to do about a call unlike it
    fix: str = ("moefx converted it by tracing one call (it spans modules, so no module could be swapped): call it "
                "as the calibration batch did, or convert with a calibration batch that calls it this way")

    @classmethod
    def of(cls, args: tuple, kwargs: dict, piece: str) -> "CallSpec":
        leaves, tree = pytree.tree_flatten((args, kwargs))
        spec = cls(tree, piece, paths=_argument_paths(args, kwargs))
        for i, leaf in enumerate(leaves):
            if isinstance(leaf, _CONSTANT_TYPES):
                spec.constants[i] = leaf
            else:
                spec.kinds[i] = "a tensor" if isinstance(leaf, torch.Tensor) else f"a {type(leaf).__name__}"
                spec.num_inputs += 1
        return spec

    def inputs(self, args: tuple, kwargs: dict) -> tuple:
        """The graph inputs of a call with ``args`` and ``kwargs``; a clear error, naming the argument, for a
        call that differs from the traced one in structure or in a constant."""
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
        fix = self.fix
        if tree != self.tree:
            now = _argument_paths(args, kwargs)
            extra_args = [p for p in now if p not in self.paths]
            missing = [p for p in self.paths if p not in now]
            what = (f"with {', '.join(extra_args)}, not passed when it was traced" if extra_args else
                    f"without {', '.join(missing)}, passed when it was traced" if missing else
                    f"with arguments nested otherwise than when traced ({', '.join(now)})")
            raise TypeError(f"moefx: {piece} is called {what}; {fix}")
        inputs = []
        for i, leaf in enumerate(leaves):
            if i in self.constants:
                if not _same_constant(leaf, self.constants[i]):
                    raise ValueError(f"moefx: {piece} was traced with {self.paths[i]}={_describe(self.constants[i])} "
                                     f"and is now called with {self.paths[i]}={_describe(leaf)}; {fix}")
            elif isinstance(leaf, _CONSTANT_TYPES):
                raise ValueError(f"moefx: {piece} was traced with {self.paths[i]} as {self.kinds[i]} input and is "
                                 f"now called with {self.paths[i]}={_describe(leaf)}; {fix}")
            else:
                inputs.append(leaf)
        return (*inputs, *extra)


def _same_constant(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"<a {tuple(value.shape)} tensor>"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _argument_paths(args: tuple, kwargs: dict) -> list[str]:
    """Each pytree leaf of a call's (args, kwargs) named as the caller writes it: ``args[0]``, ``mask``,
    ``past[1]``."""
    paths = []
    for path, _ in pytree.tree_flatten_with_path((args, kwargs))[0]:
        head, *rest = path
        first = (f"args[{rest[0].idx}]" if head.idx == 0 else str(rest[0].key)) if rest else "<call>"
        paths.append(first + "".join(str(k) for k in rest[1:]))
    return paths


def graph_inputs(spec: CallSpec, args: tuple, kwargs: dict) -> tuple:
    """The first node of every traced piece: its call's (args, kwargs) to the graph's inputs."""
    return spec.inputs(args, kwargs)


class PieceTracer(fx.Tracer):
    """The tracer that rebuilds a traced piece's graph from its code when it is unpickled: the call
    unpacking and the guards stay calls (torch.save of a converted model)."""

    def __init__(self):
        super().__init__(autowrap_functions=(graph_inputs, check_traced))


class NotTraced(Exception):
    """A module that the concrete tracer cannot turn into a graph reproducing its call; says why."""


def trace_piece(module: nn.Module, call: RecordedCall, leaves: set[nn.Module], piece: str) -> fx.GraphModule:
    """Trace ``module`` as it was called in ``call``; raises ``NotTraced`` if it does not trace or does not
    reproduce the recorded output.

    The graph takes the module's own ``(*args, **kwargs)``; its first node unpacks them into the traced
    inputs (``graph_inputs`` with the piece's ``CallSpec``, the attribute ``moefx_call``), so the piece is
    a plain GraphModule that deep-copies and pickles with everything it needs. Python decisions on the
    inputs' values stay in it as guards (``check_traced``)."""
    call_args, call_kwargs = call.fresh()
    spec = CallSpec.of(call_args, call_kwargs, piece)
    leaves_values = pytree.tree_leaves((call_args, call_kwargs))
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
        raise NotTraced(f"does not trace ({type(error).__name__}: {_first_line(error)})") from None
    _insert_guards(graph, tracer.guards, piece)
    owners = {}
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr"):
            owners[node.target.removeprefix("piece.")] = operator.attrgetter(node.target)(flat)
            node.target = node.target.removeprefix("piece.")
    owners[CALL_SPEC] = spec
    _take_call_arguments(graph)
    graph._tracer_cls = PieceTracer
    gm = fx.GraphModule(owners, graph, class_name=type(module).__name__)
    gm.graph.eliminate_dead_code()  # values read only to steer Python control flow while tracing
    gm.recompile()
    why = mismatch(gm, call, piece)
    if why:
        raise NotTraced(why)
    return gm


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return (text[0][:150] if text else "")


_METADATA = ("device", "dtype", "is_cuda", "is_meta", "layout")  # an input's device or dtype: no guard on them


def _reads_inputs(node: fx.Node) -> bool:
    """Whether ``node``'s value depends on a placeholder (not only on parameters, constants, or the inputs'
    device and dtype, which a converted model is not expected to change between calls)."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n.op == "placeholder":
            return True
        if n in seen or (n.op == "call_function" and n.target is getattr and n.args[1] in _METADATA):
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return False


def guard_only(node: fx.Node) -> bool:
    """Whether ``node`` is a guard or computes only what guards read."""
    if node.op == "call_function" and node.target is check_traced:
        return True
    return bool(node.users) and node.op in ("call_function", "call_method") and all(map(guard_only, node.users))


def _insert_guards(graph: fx.Graph, guards: list, piece: str) -> None:
    """A ``check_traced`` node after each value whose truth or length Python read while tracing."""
    done = set()
    for node, kind, value, where in guards:
        if (node, kind) in done or node.graph is not graph:
            continue
        done.add((node, kind))
        with graph.inserting_after(node):
            graph.call_function(check_traced, (node, kind, value, piece, where))


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


def mismatch(gm: nn.Module, call: RecordedCall, piece: str) -> Optional[str]:
    """Why ``gm`` does not give the recorded output on (a fresh copy of) the recorded inputs, bitwise up to
    1e-6 relative; None when it does."""
    args, kwargs = call.fresh()
    try:
        with torch.no_grad():
            out = gm(*args, **kwargs)
    except Exception as error:
        log.debug("moefx: traced %s fails on its own inputs (%s)", piece or "<model>", error)
        return f"its traced graph fails on the call it was traced on ({type(error).__name__}: {_first_line(error)})"
    got, want = pytree.tree_leaves(out), pytree.tree_leaves(call.output)
    if len(got) != len(want):
        return "its traced graph returns another structure than the module"
    for a, b in zip(got, want):
        if isinstance(b, torch.Tensor):
            if not isinstance(a, torch.Tensor) or a.shape != b.shape:
                return "its traced graph returns other shapes than the module"
            if not torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6 * max(1.0, b.float().abs().max().item())):
                log.debug("moefx: traced %s differs from the module on its own inputs", piece or "<model>")
                return "its traced graph computes other values than the module (random or stateful Python)"
    return None


def within(name: str, scope: str) -> bool:
    """Whether module path ``name`` lies inside module ``scope`` ("" is the whole model)."""
    return not scope or name.startswith(scope + ".")


def qualified(piece: str, name: str) -> str:
    """The model-level path of module ``name`` of the traced piece at path ``piece``."""
    return f"{piece}.{name}" if piece else name
