"""Find dense FFNs in a traced piece by graph pattern (MoEfication's unit of conversion).

Patterns, with any number of identity nodes (dropout in eval mode) between the steps:
  plain:  L_out(act(L_in(x)))
  gated:  L_out(act(L_gate(x)) * L_up(x))            (SwiGLU, GeGLU)
  fused:  L_out(act(a) * b), a, b = L_in(x).chunk(2, -1)  (either half gates: Phi-3, ModernBERT, GEGLU)
An ``L`` is any childless module that computes an affine map of its input; ``act`` is any
element-wise node (module, function or method) that computes one of the contract's
activations. Both are recognised by what they compute on a probe input, not by names, so
``nn.Linear``, GPT-2's ``Conv1D``, ``nn.GELU``, HF's ``NewGELUActivation`` and ``F.silu`` all match.
The activation probe reaches far beyond where activations differ (to +-3e38, fp32's range), so that
a clamp or a saturating function is not taken for ReLU or GELU.
"""
from __future__ import annotations

import functools
import operator
from typing import Optional

import torch
import torch.fx as fx
from torch import Tensor, nn

from moefx.convert.trace import guard_only
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
    """[1, 1, N] values: three axes, so a node that only reshapes (squeeze, view) shows by its shape."""
    far = torch.tensor([12.0, 20.0, 30.0, 50.0, 100.0, 300.0, 1e3, 1e4, 1e6, 1e10, 1e20, 1e30, 3e38])
    return torch.cat([-far.flip(0), torch.linspace(-8, 8, 4001), far]).reshape(1, 1, -1)


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
        if torch.allclose(y, act(z), rtol=1e-6, atol=1e-6):
            return name
    return None


def uses(node: fx.Node) -> list[fx.Node]:
    """The users of ``node`` that compute something (not the tracer's guards on it)."""
    return [u for u in node.users if not guard_only(u)]


def _skip_identities(node: fx.Node, gm: fx.GraphModule, chain: list[fx.Node]) -> fx.Node:
    """Walk back from ``node`` over single-use identity nodes, collecting them in ``chain``."""
    while isinstance(node, fx.Node) and len(uses(node)) == 1 and elementwise_kind(node, gm) == "identity":
        chain.append(node)
        node = node.args[0]
    return node


def _single_use(*nodes: fx.Node) -> bool:
    return all(len(uses(n)) == 1 for n in nodes)


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
            fused = None if match is not None else _fused_branches(hidden, gm, linear)
            if match is not None:
                act_node, gate_node, up_node, kind = match
                if not _single_use(hidden, act_node, gate_node, up_node):
                    rejected.append(f"{name}: a gated branch is also used outside the FFN")
                    continue
                chain += [hidden, act_node, gate_node, up_node]
                in_maps, x, gated = [linear(gate_node), linear(up_node)], gate_node.args[0], True
            elif fused is not None:
                nodes, in_maps, kind = fused
                if not _single_use(hidden, *nodes[:3], nodes[4]):
                    rejected.append(f"{name}: a half of the fused gate/up projection is also used outside the FFN")
                    continue
                chain += [hidden, *nodes]
                x, gated = nodes[-1].args[0], True
            else:
                continue
        else:
            if hidden.target in _CAT_TARGETS and _holds_activation(hidden, gm, linear):
                rejected.append(f"{name}: reads an FFN's hidden activation concatenated with another tensor (as "
                                "Flux's single blocks do with attention); moefx converts FFNs whose output Linear "
                                "reads the hidden activation alone")
            continue
        w_out, b_out = out_map
        shapes = {tuple(w.shape) for w, _ in in_maps}
        if shapes != {(w_out.shape[1], w_out.shape[0])}:
            rejected.append(f"{name}: widths do not chain ({' and '.join(map(str, shapes))} then {tuple(w_out.shape)}); "
                            "moefx converts FFNs whose output width equals their input width")
            continue
        found.append(FFN(piece, name, x, out_node, chain, gm.get_submodule(out_node.target), in_maps, w_out,
                         b_out, kind, gated))
    claimed = {n for ffn in found for n in ffn.nodes}
    for out_node in gm.graph.nodes:
        name = prefix + str(out_node.target)
        if out_node in claimed or any(r.startswith(name + ":") for r in rejected) or linear(out_node) is None:
            continue
        in_node = _unmatched_input(out_node, linear, claimed)
        if in_node is not None:
            rejected.append(f"{name}: {prefix + in_node.target} -> ... -> {out_node.target} has an FFN's shape, but "
                            f"what lies between matches no FFN pattern (an activation other than "
                            f"{', '.join(ACTIVATIONS)}, or other code between the Linears); it was not converted")
    return found, rejected


def _unmatched_input(out_node: fx.Node, linear, claimed: set, depth: int = 6) -> Optional[fx.Node]:
    """The Linear that feeds ``out_node`` within ``depth`` nodes and through no other Linear, widening the FFN's
    input as ``out_node`` narrows it back (W_in [F, H], W_out [H, F], F > H); None when there is none."""
    w_out = linear(out_node)[0]
    if w_out.shape[1] <= w_out.shape[0]:
        return None
    frontier = [a for a in out_node.all_input_nodes]
    for _ in range(depth):
        following = []
        for node in frontier:
            in_map = linear(node)
            if in_map is not None:
                if node not in claimed and tuple(in_map[0].shape) == (w_out.shape[1], w_out.shape[0]):
                    return node
                continue
            following += [a for a in node.all_input_nodes if a.op != "placeholder"]
        frontier = following
    return None


_CAT_TARGETS = (torch.cat, torch.concat, torch.concatenate)


def _holds_activation(cat: fx.Node, gm: fx.GraphModule, linear) -> bool:
    """Whether one of the tensors ``cat`` joins is act(L(x))."""
    parts = cat.args[0] if cat.args and isinstance(cat.args[0], (list, tuple)) else []
    for part in parts:
        if isinstance(part, fx.Node) and elementwise_kind(part, gm) not in (None, "identity"):
            if linear(_skip_identities(part.args[0], gm, [])) is not None:
                return True
    return False


_CHUNK_TARGETS = ("chunk", torch.chunk, torch.Tensor.chunk)
_SPLIT_TARGETS = ("split", torch.split, torch.Tensor.split)


def _halves(node: fx.Node) -> Optional[int]:
    """Which half (0 or 1) of a last-axis split in two ``node`` takes: getitem(chunk(t, 2, -1), i)."""
    if not (node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node)
            and node.args[1] in (0, 1)):
        return None
    split = node.args[0]
    if split.op not in ("call_function", "call_method") or len(split.args) < 2:
        return None
    dim = split.kwargs.get("dim", split.args[2] if len(split.args) > 2 else 0)
    if dim != -1:
        return None
    if split.target in _CHUNK_TARGETS and split.args[1] == 2:
        return node.args[1]
    if split.target in _SPLIT_TARGETS and isinstance(split.args[1], int):
        return node.args[1]
    return None


def _fused_branches(mul: fx.Node, gm: fx.GraphModule, linear):
    """For act(a) * b with a, b the two halves of one Linear's output (fused gate/up): (nodes from the
    activation to the Linear, [(W_gate, b_gate), (W_up, b_up)], activation)."""
    for act_node, up_node in (mul.args, mul.args[::-1]):
        if not isinstance(act_node, fx.Node) or not isinstance(up_node, fx.Node):
            continue
        kind = elementwise_kind(act_node, gm)
        if kind in (None, "identity") or not isinstance(act_node.args[0], fx.Node):
            continue
        gate_half, up_half = _halves(act_node.args[0]), _halves(up_node)
        split = act_node.args[0].args[0]
        if gate_half is None or up_half is None or gate_half == up_half or up_node.args[0] is not split:
            continue
        in_node = split.args[0]
        in_map = linear(in_node) if isinstance(in_node, fx.Node) else None
        if in_map is None or in_map[0].shape[0] % 2:
            continue
        w, b = in_map
        width = w.shape[0] // 2
        if split.target in _SPLIT_TARGETS and split.args[1] != width:
            continue
        rows = [slice(0, width), slice(width, 2 * width)]
        maps = [(w[rows[h]], None if b is None else b[rows[h]]) for h in (gate_half, up_half)]
        if not all(len(uses(n)) == 1 for n in (act_node.args[0], up_node)) or len(uses(split)) != 2:
            return None
        return [act_node, act_node.args[0], up_node, split, in_node], maps, kind
    return None


DATA_FLOW_ROWS = 256


def data_flow_ffn(x: Tensor, width: int, sources: dict[str, tuple[Tensor, Tensor]]) -> Optional[str]:
    """How ``x`` (the input of a linear layer whose output is ``width`` wide) is an FFN's hidden activation of
    ``sources`` ({name: (input, output)} of other linear layers on the same call) that read inputs ``width``
    wide: "a -> act" or "act(a) * b" or "fused a"; None when it is none of them, or when more than one
    activation fits (small values, where they agree: a gate or a scaled branch is no FFN of a known activation).
    Compared on the first ``DATA_FLOW_ROWS`` rows: every pair is tried with every activation."""
    def close(h: Tensor) -> bool:
        return h.shape == x.shape and torch.allclose(h.float(), x.float(), rtol=1e-4, atol=1e-5)

    sources = {n: y.reshape(-1, y.shape[-1])[:DATA_FLOW_ROWS] for n, (i, y) in sources.items()
               if i.shape[-1] == width and y.shape[:-1] == x.shape[:-1]}
    x = x.reshape(-1, x.shape[-1])[:DATA_FLOW_ROWS]
    fits = set()
    for name, y in sources.items():
        for act_name, act in ACTIVATIONS.items():
            if y.shape[-1] == x.shape[-1] and close(act(y)):
                fits.add(f"{name} -> {act_name}")
            if y.shape[-1] == 2 * x.shape[-1]:
                a, b = y.chunk(2, -1)
                if close(act(a) * b) or close(act(b) * a):
                    fits.add(f"{name} (fused gate/up) -> {act_name}")
            for other, u in sources.items():
                if other != name and u.shape == y.shape == x.shape and close(act(y) * u):
                    fits.add(f"{act_name}({name}) * {other}")
    return fits.pop() if len(fits) == 1 else None


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
