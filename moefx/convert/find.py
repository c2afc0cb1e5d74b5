"""Find dense FFNs in a traced piece by graph pattern (MoEfication's unit of conversion).

Patterns, with any number of identity nodes (dropout in eval mode) between the steps:
  plain:  L_out(act(L_in(x)))
  gated:  L_out(act(L_gate(x)) * L_up(x))            (SwiGLU, GeGLU)
An ``L`` is any childless module that computes an affine map of its input; ``act`` is any
element-wise node (module, function or method) that computes one of the contract's
activations. Both are recognised by what they compute on a probe input, not by names, so
``nn.Linear``, GPT-2's ``Conv1D``, ``nn.GELU``, HF's ``NewGELUActivation`` and ``F.silu`` all match.
"""
from __future__ import annotations

import functools
import operator
from typing import Optional

import torch
import torch.fx as fx
from torch import Tensor, nn

from moefx.ffn import FFN
from moefx.op import ACTIVATIONS

_MUL_TARGETS = (operator.mul, torch.mul, torch.Tensor.mul, "mul")


def affine_map(module: nn.Module) -> Optional[tuple[Tensor, Optional[Tensor]]]:
    """(weight [out, in], bias) if ``module`` computes x @ W.T + b or x @ W + b, else None."""
    if next(module.children(), None) is not None:
        return None
    params = list(module.parameters(recurse=False))
    matrices = [p for p in params if p.dim() == 2]
    vectors = [p for p in params if p.dim() == 1]
    if len(matrices) != 1 or len(vectors) > 1 or len(params) != len(matrices) + len(vectors):
        return None
    weight, bias = matrices[0], (vectors[0] if vectors else None)
    for candidate in (weight, weight.T):
        out_features, in_features = candidate.shape
        if bias is not None and bias.shape[0] != out_features:
            continue
        generator = torch.Generator(weight.device).manual_seed(0)
        probe = torch.randn(3, in_features, generator=generator, device=weight.device).to(weight.dtype)
        try:
            with torch.no_grad():
                got = module(probe)
        except Exception:
            continue
        want = torch.nn.functional.linear(probe, candidate, bias)
        tol = 1e-4 if weight.dtype in (torch.float32, torch.float64) else 3e-2
        if got.shape == want.shape and torch.allclose(got.float(), want.float(), rtol=tol, atol=tol * want.abs().max().item()):
            return candidate.detach(), None if bias is None else bias.detach()
    return None


@functools.cache
def _probe() -> Tensor:
    return torch.linspace(-8, 8, 4001, dtype=torch.float32)


def elementwise_kind(node: fx.Node, gm: fx.GraphModule) -> Optional[str]:
    """'identity' or an activation name if ``node`` maps its first input element-wise like one."""
    if node.op not in ("call_module", "call_function", "call_method") or not node.args:
        return None
    if any(isinstance(a, fx.Node) for a in list(node.args[1:]) + list(node.kwargs.values())):
        return None
    rest, kwargs = node.args[1:], node.kwargs
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if next(module.children(), None) is not None or next(module.parameters(), None) is not None or rest or kwargs:
            return None
        fn = module
    elif node.op == "call_method":
        fn = lambda z: getattr(z, node.target)(*rest, **kwargs)  # noqa: E731
    else:
        fn = lambda z: node.target(z, *rest, **kwargs)  # noqa: E731
    z = _probe()
    try:
        with torch.no_grad():
            y = fn(z.clone())
    except Exception:
        return None
    if not isinstance(y, Tensor) or y.shape != z.shape:
        return None
    if torch.equal(y, z):
        return "identity"
    for name, act in ACTIVATIONS.items():
        if torch.allclose(y, act(z), rtol=0, atol=1e-6):
            return name
    return None


def _skip_identities(node: fx.Node, gm: fx.GraphModule, chain: list[fx.Node]) -> fx.Node:
    """Walk back from ``node`` over single-use identity nodes, collecting them in ``chain``."""
    while isinstance(node, fx.Node) and len(node.users) == 1 and elementwise_kind(node, gm) == "identity":
        chain.append(node)
        node = node.args[0]
    return node


def _single_use(*nodes: fx.Node) -> bool:
    return all(len(n.users) == 1 for n in nodes)


def find_ffns(gm: fx.GraphModule, piece: str, affine: dict[str, tuple]) -> tuple[list[FFN], list[str]]:
    """FFNs in ``gm`` and, for FFN-like shapes that cannot be converted, a reason each.

    ``affine`` maps qualified names (within the model) of affine leaves to their (W, b).
    """
    prefix = f"{piece}." if piece else ""

    def linear(node) -> Optional[tuple]:
        if isinstance(node, fx.Node) and node.op == "call_module" and len(node.args) == 1 and not node.kwargs:
            return affine.get(prefix + node.target)
        return None

    found, rejected = [], []
    for out_node in list(gm.graph.nodes):
        out_map = linear(out_node)
        if out_map is None:
            continue
        chain: list[fx.Node] = [out_node]
        hidden = _skip_identities(out_node.args[0], gm, chain)
        if not isinstance(hidden, fx.Node):
            continue
        kind = elementwise_kind(hidden, gm)
        name = prefix + out_node.target
        if kind not in (None, "identity"):
            in_node = _skip_identities(hidden.args[0], gm, chain)
            in_map = linear(in_node)
            if in_map is None:
                continue
            if not _single_use(hidden, in_node):
                rejected.append(f"{name}: the hidden activation is also used outside the FFN")
                continue
            chain += [hidden, in_node]
            in_maps, x, gated = [in_map], in_node.args[0], False
        elif hidden.op in ("call_function", "call_method") and hidden.target in _MUL_TARGETS and len(hidden.args) == 2:
            match = _gated_branches(hidden, gm, linear)
            if match is None:
                continue
            act_node, gate_node, up_node, kind = match
            if not _single_use(hidden, act_node, gate_node, up_node):
                rejected.append(f"{name}: a gated branch is also used outside the FFN")
                continue
            chain += [hidden, act_node, gate_node, up_node]
            in_maps, x, gated = [linear(gate_node), linear(up_node)], gate_node.args[0], True
        else:
            continue
        w_out, b_out = out_map
        shapes = {tuple(w.shape) for w, _ in in_maps}
        if shapes != {(w_out.shape[1], w_out.shape[0])}:
            rejected.append(f"{name}: widths do not chain ({' and '.join(map(str, shapes))} then {tuple(w_out.shape)}); "
                            "moefx converts FFNs whose output width equals their input width")
            continue
        found.append(FFN(piece, name, x, out_node, chain, gm.get_submodule(out_node.target), in_maps, w_out,
                         b_out, kind, gated))
    return found, rejected


def _gated_branches(mul: fx.Node, gm: fx.GraphModule, linear):
    """(act node, gate Linear node, up Linear node, activation) for act(L_g(x)) * L_u(x)."""
    for act_node, up_node in (mul.args, mul.args[::-1]):
        if not isinstance(act_node, fx.Node) or not isinstance(up_node, fx.Node):
            continue
        kind = elementwise_kind(act_node, gm)
        if kind in (None, "identity"):
            continue
        gate_node = act_node.args[0]
        if linear(gate_node) is None or linear(up_node) is None or gate_node.args[0] is not up_node.args[0]:
            continue
        return act_node, gate_node, up_node, kind
    return None
