"""Point ``moefx::moe`` calls at the Triton ``triton_op`` so Inductor compiles the MoE kernels with the graph.

Serves the fused routed-experts kernels (ScatterMoE, Tan et al. 2024; vLLM fused_moe). The swap runs on
the torch-level graph, before AOTAutograd: a ``triton_op`` is traced into its kernels only at that
point (after it, at post-grad level, it would already be an opaque call). It applies where
``moefx.op.kernel_path`` picks Triton (CUDA and Triton present, ``MOEFX_KERNELS`` not "reference")
and the graph is inference-only; training graphs keep ``moefx::moe``, whose analytic backward
(``moefx::moe_backward``) AOTAutograd needs, and whose CUDA implementation calls the same kernels.
"""
from __future__ import annotations

import importlib
import logging

import torch
from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_base import PassResult

from moefx.op import kernel_path
from moefx.passes.torch_graph import value

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
    training = torch.is_grad_enabled() and any(
        isinstance(value(n), torch.Tensor) and value(n).requires_grad for n in gm.graph.nodes if n.op == "placeholder")
    on_triton = [n for n in calls if kernel_path(value(n.args[0]).device) == "triton"]
    swapped = 0
    if on_triton and not training:
        op = triton_moe_op()
        if op is not None:
            for node in on_triton:
                node.target = op.default
                swapped += 1
            gm.recompile()
    log.debug("moefx: swap_triton retargeted %d of %d moefx::moe call(s) to moefx::moe_triton%s", swapped,
              len(calls), " (training graph keeps moefx::moe)" if on_triton and training else "")
    return swapped


def swap_triton_pass(gm: GraphModule) -> PassResult:
    """Pass-manager form of ``swap_triton``."""
    return PassResult(gm, swap_triton(gm) > 0)
