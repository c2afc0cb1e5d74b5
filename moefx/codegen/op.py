"""``moefx::moe_triton``: the moefx op as a ``torch.library.triton_op``, so Inductor sees its kernels.

Same schema and autograd as ``moefx::moe``; the compile backend swaps ``moefx::moe`` for this op
on CUDA graphs (``TRITON_OP``), where the opaque custom op would hide the kernels from Inductor.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from moefx.codegen.launch import moe_triton
from moefx.op import _backward, _setup_context

TRITON_OP = "moefx::moe_triton"


@torch.library.triton_op(TRITON_OP, mutates_args=())
def moe_triton_op(
    x: Tensor, router_input: Tensor, w_router: Tensor, b_router: Optional[Tensor],
    w_in: Tensor, b_in: Optional[Tensor], w_out: Tensor, b_out: Optional[Tensor],
    const_experts: Optional[Tensor], top_k: int, activation: str, gated: bool, scoring: str,
    renormalize: bool, top_p: float, min_k: int, gate_scale: float, num_zero: int, num_copy: int,
) -> Tensor:
    return moe_triton(x, router_input, w_router, b_router, w_in, b_in, w_out, b_out, const_experts, top_k,
                      activation, gated, scoring, renormalize, top_p, min_k, gate_scale, num_zero, num_copy)


# The backward is the op contract's analytic one: gradients do not depend on how y was computed.
moe_triton_op.register_autograd(_backward, setup_context=_setup_context)
