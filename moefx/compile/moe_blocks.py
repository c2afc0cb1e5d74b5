"""Recognise the sparse MoE blocks of transformers models by graph structure; each becomes one ``moefx::moe``.

Serves Mixtral (Jiang et al. 2024), Qwen2-MoE, Qwen3-MoE, OLMoE (Muennighoff et al. 2024) and
DeepSeek-V2 with greedy routing, in transformers' ``grouped_mm`` (its default) and ``batched_mm``
experts implementations. What is matched, whatever the model class is called:

    router   topk(softmax | sigmoid (linear(r, W_r [, b_r])), k)     selection on the scores themselves
    gates    top-k values [/ their sum (+eps)] [* constant]             -> renormalize, gate_scale
    experts  two GEMMs over 3-D weights W_up [E, F_in, H], W_down [E, H, F] (nn.Linear layout) with
             act(up) or act(gate) * up between them ([gate; up] halves: read in place with ``halves=True``,
             or reordered to interleaved rows where the Triton kernels run, which read only those)
    combine  GEMM outputs times the gates, summed back to one row per token: [T, H]

Everything between the router's ``topk`` and the combined [T, H] output must be routing bookkeeping
(sort, histc, gathers, views...); any other op, biased or transposed expert weights, routing the
contract cannot express (DeepSeek-V3's selection bias and group limit) or a graph that ends inside the block
(Dynamo breaks the graph in transformers' eager per-expert loop) leave the block as it is, with the
reason at debug level. Shared experts (Qwen2-MoE, DeepSeek) do not depend on the routing, so they
stay ordinary ops beside the new call. Calls of ``moefx::moe`` (from ``moefx.convert``) are not touched.

Input level: a torch-level fx graph with Dynamo's fake values in ``node.meta["example_value"]`` (or
``"val"``): the graph a Dynamo backend receives, or ``torch._dynamo.export(model)(...)``'s graph module.
Entry point: ``rewrite_moe_blocks(gm, halves=None) -> int`` (blocks rewritten; the graph module is recompiled);
``halves=None`` keeps gate/up halves in place unless the op will run the Triton kernels.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_base import PassResult

from moefx.op import MoEAttrs, MoEInputs, kernel_path
from moefx.compile.torch_graph import (
    CASTS, arg, call, getitem_of, is_tensor, op_name, same_size, strip_casts, value,
)

log = logging.getLogger(__name__)

GEMMS = frozenset({"grouped_mm", "_grouped_mm", "grouped_mm_fallback", "bmm", "matmul", "mm"})
ACTIVATIONS = frozenset({"silu", "gelu", "relu"})
# Ops the experts implementations use to dispatch tokens to experts and gather them back.
BOOKKEEPING = frozenset({
    "getitem", "reshape", "view", "flatten", "unflatten", "unsqueeze", "squeeze", "transpose", "t", "expand",
    "chunk", "split", "sort", "argsort", "floordiv", "histc", "bincount", "cumsum", "arange", "empty_like",
    "setitem", "repeat_interleave", "index_select", "sum", "mul", "size", "sym_size", "dim",
}) | CASTS
# Followed from a GEMM operand back to the tensor it reads (the indexed tensor for a gather).
UNROUTED_VIEWS = frozenset({"transpose", "t", "unsqueeze", "repeat_interleave"}) | CASTS
OPERAND_VIEWS = frozenset({"getitem", "transpose", "t", "unsqueeze", "squeeze", "expand", "repeat_interleave"}) | CASTS
MAX_BLOCK_NODES = 500
SCALARS = (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool)


class NotRewritten(Exception):
    """Why an MoE-like block was left as ordinary ops."""


@dataclass
class Router:
    router_input: Node
    w_router: Node
    b_router: Optional[Node]
    scoring: str
    top_k: int
    nodes: list[Node]  # from the scores topk reads back to the router's linear


@dataclass
class Experts:
    x: Node
    w_up: Node
    w_down: Node
    activation: str
    gated: bool
    weight_views: list[Node]  # transposes/casts of the weights outside the block, dropped once unused


def rewrite_moe_blocks(gm: GraphModule, halves: Optional[bool] = None) -> int:
    """Replace every recognised MoE block in ``gm`` by one ``moefx::moe`` call; return how many. ``halves``:
    whether gated blocks' [gate; up] weights are read in place (True), reordered to interleaved rows (False), or
    in place unless the op runs the Triton kernels (None)."""
    claimed: set[Node] = set()
    rewritten = 0
    for root in [n for n in gm.graph.nodes if op_name(n) == "topk"]:
        if root in claimed:
            continue
        try:
            region, combined = block_region(root)
            claimed.update(region)
            rewrite_block(gm, root, region, combined, halves)
            rewritten += 1
        except NotRewritten as why:
            log.debug("moefx: MoE-like block at %s (%s) not rewritten: %s", root.name, describe(root), why)
    if rewritten:
        gm.graph.lint()
        gm.recompile()
    log.debug("moefx: moe_blocks rewrote %d MoE block(s) into moefx::moe", rewritten)
    return rewritten


def moe_blocks_pass(gm: GraphModule) -> PassResult:
    """Pass-manager form of ``rewrite_moe_blocks``."""
    return PassResult(gm, rewrite_moe_blocks(gm) > 0)


def describe(root: Node) -> str:
    frames = root.meta.get("stack_trace") or ""
    lines = [line.strip() for line in frames.strip().splitlines() if line.strip().startswith("File")]
    return lines[-1] if lines else "no source location"


def block_region(root: Node) -> tuple[list[Node], Node]:
    """Nodes from the router's ``topk`` to the first node where everything derived from it has merged
    into one [T, H] tensor (the block's output), in graph order."""
    tokens = value(root)[0].shape[0]
    order = {n: i for i, n in enumerate(root.graph.nodes)}
    last_use = {}
    in_region, live, region, gemms = {root}, {root}, [root], 0
    node = root.next
    while node.op != "output":
        if any(a in in_region for a in node.all_input_nodes):
            in_region.add(node)
            region.append(node)
            gemms += op_name(node) in GEMMS
            if node.users:
                live.add(node)
        for a in node.all_input_nodes:
            if a in live and last_use.setdefault(a, max(a.users, key=order.get)) is node:
                live.discard(a)
        if gemms >= 2 and live == {node} and is_tensor(node) and value(node).dim() == 2 and \
                same_size(value(node).shape[0], tokens):
            return region, node
        if len(region) > MAX_BLOCK_NODES:
            break
        node = node.next
    raise NotRewritten("what the router selects is not combined back into one [T, H] tensor in this graph "
                       "(a graph break inside the block? transformers' eager per-expert loop has one at "
                       "nonzero(): load the model with experts_implementation='grouped_mm' (the default) or "
                       "'batched_mm')")


def rewrite_block(gm: GraphModule, root: Node, region: list[Node], combined: Node, halves: Optional[bool]) -> None:
    router = parse_router(root)
    gates_end, renormalize, gate_scale, gate_chain = parse_gates(root)
    experts = parse_experts(region, gate_chain | {root, getitem_of(root, 1)}, gates_end, combined)
    num_experts, f_in, hidden = value(experts.w_up).shape
    if value(router.w_router).shape[0] != num_experts:
        raise NotRewritten(f"router has {value(router.w_router).shape[0]} rows but the experts' weights "
                           f"hold {num_experts} experts (zero-computation experts are not recognised)")
    if not same_size(value(router.router_input).shape[0], value(experts.x).shape[0]):
        raise NotRewritten("router input and expert input have different token counts")
    if not all(same_size(a, b) for a, b in zip(value(combined).shape, value(experts.x).shape)):
        raise NotRewritten(f"block output {tuple(value(combined).shape)} is not shaped like its input "
                           f"{tuple(value(experts.x).shape)}")

    graph = gm.graph
    with graph.inserting_before(combined):
        w_in = experts.w_up
        if halves is None:
            halves = kernel_path(value(experts.x).device) != "triton"
        halves = halves and experts.gated
        if experts.gated and not halves:
            # transformers stores [gate; up] halves, the Triton kernels read gate/up rows interleaved.
            width = f_in // 2
            split = call(graph, torch.reshape, w_in, (num_experts, 2, width, hidden))
            w_in = call(graph, torch.reshape, call(graph, torch.transpose, split, 1, 2),
                        (num_experts, f_in, hidden))
        inputs = MoEInputs(experts.x, router.router_input, router.w_router, router.b_router, w_in, None,
                           experts.w_down, None, None)
        attrs = MoEAttrs(router.top_k, experts.activation, experts.gated, router.scoring, renormalize,
                         gate_scale=gate_scale, halves=halves)
        out = call(graph, torch.ops.moefx.moe.default, *inputs, *attrs.flat())
        if value(out).dtype != value(combined).dtype:
            out = call(graph, torch.Tensor.to, out, value(combined).dtype)
    combined.replace_all_uses_with(out)
    for node in reversed(region):
        if not node.users:
            graph.erase_node(node)
    for node in experts.weight_views + router.nodes:  # the router's own scores, unless something else (aux loss) reads them
        if not node.users:
            graph.erase_node(node)


def parse_router(root: Node) -> Router:
    if arg(root, 3, "largest", True) is not True or arg(root, 2, "dim", -1) not in (-1, 1):
        raise NotRewritten("topk does not take the largest scores along the last dimension")
    top_k = arg(root, 1, "k")
    if not isinstance(top_k, int):
        raise NotRewritten("top-k count is not a constant")
    scores = strip_casts(root.args[0])
    scoring = {"softmax": "softmax", "_softmax": "softmax", "sigmoid": "sigmoid"}.get(op_name(scores))
    if scoring is None:
        raise NotRewritten(f"the router's topk selects on `{op_name(scores) or scores.op}`, not directly on "
                           "softmax/sigmoid scores of a linear router (group-limited routing or a selection "
                           "bias, as in DeepSeek-V3, is outside the moefx::moe contract)")
    if scoring == "softmax" and arg(scores, 1, "dim", None) not in (-1, 1):
        raise NotRewritten("router softmax is not over the experts dimension")
    logits = strip_casts(scores.args[0])
    if op_name(logits) != "linear":
        raise NotRewritten(f"router scores come from `{op_name(logits) or logits.op}`, not from a linear layer")
    router_input = strip_casts(logits.args[0])
    w_router = strip_casts(arg(logits, 1, "weight"))
    b_router = arg(logits, 2, "bias")
    if not is_tensor(router_input) or value(router_input).dim() != 2 or value(w_router).dim() != 2:
        raise NotRewritten("router input is not a [tokens, features] matrix")
    nodes, node = [], root.args[0]
    while node is not logits.args[0]:
        nodes.append(node)
        node = node.args[0]
    nodes += [n for n in (logits.args[0], logits.args[1], b_router) if op_name(n) in CASTS]
    return Router(router_input, w_router, None if b_router is None else strip_casts(b_router), scoring, top_k,
                  nodes)


def parse_gates(root: Node) -> tuple[Node, bool, float, set[Node]]:
    """Follow the top-k values through renormalisation and scaling: (last node, renormalize, scale, nodes)."""
    node = getitem_of(root, 0)
    if node is None:
        raise NotRewritten("the gates are not the router's top-k scores")
    chain, renormalize, scale = {node}, False, 1.0
    while True:
        users = list(node.users)
        casts = [u for u in users if op_name(u) in CASTS]
        divs = [u for u in users if op_name(u) in ("truediv", "itruediv", "div", "div_") and u.args[0] is node]
        sums = [u for u in users if op_name(u) == "sum" and arg(u, 1, "dim") in (-1, 1, [-1], (-1,))
                and arg(u, 2, "keepdim", False)]
        muls = [u for u in users if op_name(u) in ("mul", "imul", "mul_")
                and isinstance(u.args[1] if u.args[0] is node else u.args[0], (int, float))]
        if len(users) == 1 and casts:
            node = casts[0]
        elif len(users) == 2 and len(divs) == 1 and len(sums) == 1 and denominator(divs[0].args[1]) is sums[0]:
            chain |= {sums[0], divs[0], divs[0].args[1]}
            node, renormalize, scale = divs[0], True, 1.0  # renormalising cancels any earlier scaling
        elif len(users) == 1 and muls:
            factor = muls[0].args[1] if muls[0].args[0] is node else muls[0].args[0]
            node, scale = muls[0], scale * float(factor)
        else:
            return node, renormalize, scale, chain
        chain.add(node)


def denominator(node: Node) -> Optional[Node]:
    """The sum in ``sum`` or ``sum + eps`` (DeepSeek adds 1e-20 against division by zero)."""
    if op_name(node) in ("add", "iadd") and isinstance(node.args[1], float) and node.args[1] < 1e-6:
        return node.args[0]
    return node


def parse_experts(region: list[Node], routing: set[Node], gates_end: Node, combined: Node) -> Experts:
    members = set(region)
    for node in region:
        name = op_name(node)
        if node in routing or name in GEMMS or name in ACTIVATIONS or isinstance(value(node), SCALARS):
            continue
        if name not in BOOKKEEPING:
            raise NotRewritten(f"`{name or node.op}` ({node.name}) inside the experts is not part of a plain "
                               "routed-experts block")
        mutated = node.args[0] if node.args else None
        if (name == "setitem" or name.endswith("_")) and isinstance(mutated, Node) and mutated not in members:
            raise NotRewritten(f"{node.name} writes into a tensor defined outside the block")
    gemms = [n for n in region if op_name(n) in GEMMS]
    acts = [n for n in region if op_name(n) in ACTIVATIONS]
    if len(gemms) != 2 or len(acts) != 1:
        raise NotRewritten(f"expected two expert GEMMs with one activation between them, found "
                           f"{len(gemms)} GEMMs and {len(acts)} activations")
    act = acts[0]
    up, down = gemms if reaches(gemms[0], act, members) else (None, None)
    if up is None or not reaches(act, down, members):
        raise NotRewritten("the activation does not sit between the up and down expert GEMMs")
    views: list[Node] = []
    w_up, x = gemm_operands(up, members, views)
    w_down, _ = gemm_operands(down, members, views)
    gated = gate_structure(act, up, members)
    activation = op_name(act)
    if activation == "gelu" and arg(act, 1, "approximate", "none") == "tanh":
        activation = "gelu_tanh"
    gate_muls = [m for m in region if m not in routing and _is_float_mul(m) and _multiplies(m, gates_end, down, members)]
    if not gate_muls:
        raise NotRewritten("expert outputs are not multiplied by the router's gates")
    for m in region:  # any other float product on the expert path would change what the op computes
        if m not in routing and _is_float_mul(m) and m not in gate_muls and not (
                gated and _multiplies(m, act, up, members, exclusive=False)):
            raise NotRewritten(f"{m.name} multiplies the expert path by something other than the router's gates "
                               "(a scale or extra factor the op does not express)")
    e, f_in, hidden = value(w_up).shape
    if value(w_down).shape != (e, hidden, f_in // 2 if gated else f_in) or value(x).shape[-1] != hidden:
        raise NotRewritten(f"expert weights {tuple(value(w_up).shape)} and {tuple(value(w_down).shape)} are not "
                           f"[E, F_in, H] and [E, H, F] for {tuple(value(x).shape)} tokens")
    if not all(isinstance(s, int) for s in (*value(w_up).shape, *value(w_down).shape)):
        raise NotRewritten("expert weight shapes are dynamic")
    return Experts(x, w_up, w_down, activation, gated, [v for v in views if v not in members])


def _is_float_mul(node: Node) -> bool:
    result = value(node)
    return op_name(node) == "mul" and isinstance(result, torch.Tensor) and result.is_floating_point()


def _multiplies(node: Node, left: Node, right: Node, members: set[Node], exclusive: bool = True) -> bool:
    """Whether ``node`` is a product of one factor computed from ``left`` and one from ``right`` (with
    ``exclusive``, neither factor computed from both)."""
    factors = [a for a in node.args[:2] if isinstance(a, Node)]
    if len(factors) != 2:
        return False
    for a, b in (factors, factors[::-1]):
        if reaches(left, a, members) and reaches(right, b, members) and (
                not exclusive or not (reaches(right, a, members) or reaches(left, b, members))):
            return True
    return False


def reaches(source: Node, target, members: set[Node]) -> bool:
    """Whether ``target`` depends on ``source`` through nodes of the block."""
    if not isinstance(target, Node):
        return False
    stack, seen = [target], set()
    while stack:
        node = stack.pop()
        if node is source:
            return True
        if node in seen or node not in members:
            continue
        seen.add(node)
        stack.extend(node.all_input_nodes)
    return False


def gemm_operands(gemm: Node, members: set[Node], views: list[Node]) -> tuple[Node, Node]:
    """(expert weight [E, ., .], token operand's source) of an expert GEMM; the weight must be in
    nn.Linear layout [E, out, in]. Appends the view nodes walked through to ``views``."""
    found = []
    for position, operand in enumerate(gemm.args[:2]):
        transposes = 0
        # Inside the block follow gathers too. Before it may sit a weight's transpose or cast, or the
        # copies of each token that batched_mm makes (they do not depend on the routing).
        while op_name(operand) in OPERAND_VIEWS and (operand in members or op_name(operand) in UNROUTED_VIEWS):
            if op_name(operand) == "t" or op_name(operand) == "transpose" and \
                    {d % 3 for d in operand.args[1:3]} == {1, 2}:
                transposes += 1
            views.append(operand)
            operand = operand.args[0]
        found.append((position, transposes, operand))
    weights = [f for f in found if f[2] not in members and is_tensor(f[2]) and value(f[2]).dim() == 3]
    if len(weights) != 1:
        raise NotRewritten(f"{gemm.name} does not multiply by one 3-D expert weight")
    position, transposes, weight = weights[0]
    # grouped_mm / matmul compute tokens @ B (B must be W.T); bmm(W, tokens) takes W as it is.
    if (position == 0) == (transposes % 2 == 1):
        raise NotRewritten(f"expert weight {weight.name} is stored transposed ([E, in, out])")
    tokens = found[1 - position][2]
    return weight, tokens


def gate_structure(act: Node, up: Node, members: set[Node]) -> bool:
    """True for act(gate) * up on the [gate; up] halves of the up GEMM, False for act(up)."""
    source = strip_views(act.args[0])
    if source is strip_views(up):
        return False
    if op_name(source) != "getitem" or source.args[1] != 0 or op_name(source.args[0]) != "chunk":
        raise NotRewritten("activation input is neither the up projection nor the gate half of a chunk")
    chunk = source.args[0]
    if arg(chunk, 1, "chunks") != 2 or arg(chunk, 2, "dim", 0) not in (-1, 1) or \
            strip_views(chunk.args[0]) is not strip_views(up):
        raise NotRewritten("gate/up split is not chunk(2, dim=-1) of the up projection")
    up_half = getitem_of(chunk, 1)
    if up_half is None or not any(op_name(m) == "mul" and any(reaches(act, a, members) for a in m.args[:2])
                                  and any(reaches(up_half, a, members) for a in m.args[:2])
                                  for m in members):
        raise NotRewritten("the activated gate half is not multiplied by the up half")
    return True


def strip_views(node):
    while op_name(node) in CASTS or op_name(node) == "squeeze":
        node = node.args[0]
    return node
