"""Point ``moefx::moe`` calls at the Triton ``triton_op`` so Inductor compiles the MoE kernels with the graph.

Serves the fused routed-experts kernels (ScatterMoE, Tan et al. 2024; vLLM fused_moe). The swap runs on
the torch-level graph, before AOTAutograd: a ``triton_op`` is traced into its kernels only at that
point (after it, at post-grad level, it would already be an opaque call). It applies where
``moefx.op.kernel_path`` picks Triton (CUDA and Triton present, ``MOEFX_KERNELS`` not "reference");
``moefx::moe_triton`` has the same schema and the same analytic backward, so training graphs swap too.
"""
from __future__ import annotations

import importlib
import logging

import torch
from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_base import PassResult

from moefx.op import kernel_path
from moefx.compile.torch_graph import value

log = logging.getLogger(__name__)


def is_moe_call(node: Node) -> bool:
    """A call of ``torch.ops.moefx.moe`` (Dynamo records the packet, hand-built graphs the overload)."""
    return node.op == "call_function" and node.target in (torch.ops.moefx.moe, torch.ops.moefx.moe.default)


def triton_moe_op():
    """``torch.ops.moefx.moe_triton`` if moefx.codegen provides it here, else None."""
    try:
        importlib.import_module("moefx.codegen")
    except ImportError as why:
        log.debug("moefx: Triton MoE kernels unavailable (%s)", why)
        return None
    return getattr(torch.ops.moefx, "moe_triton", None)


def swap_triton(gm: GraphModule) -> int:
    """Retarget ``moefx::moe`` calls on CUDA tensors to ``moefx::moe_triton``; return how many."""
    calls = [n for n in gm.graph.nodes if is_moe_call(n)]
    if not calls:
        return 0
    on_triton = [n for n in calls if kernel_path(value(n.args[0]).device) == "triton"]
    swapped = 0
    if on_triton:
        op = triton_moe_op()
        if op is not None:
            for node in on_triton:
                node.target = op.default
                swapped += 1
            gm.recompile()
    log.debug("moefx: swap_triton retargeted %d of %d moefx::moe call(s) to moefx::moe_triton", swapped, len(calls))
    return swapped


def swap_triton_pass(gm: GraphModule) -> PassResult:
    """Pass-manager form of ``swap_triton``."""
    return PassResult(gm, swap_triton(gm) > 0)
