"""``moefx::moe_triton``: the moefx op as a ``torch.library.triton_op``, so Inductor sees its kernels.

Same schema and autograd as ``moefx::moe``; the compile backend swaps ``moefx::moe`` for this op
on CUDA graphs (``TRITON_OP``), where the opaque custom op would hide the kernels from Inductor.
"""
from __future__ import annotations

import torch

from moefx.codegen.launch import moe_triton
from torch import Tensor

from moefx.op import register_autograd, unflatten, with_op_signature

TRITON_OP = "moefx::moe_triton"


@torch.library.triton_op(TRITON_OP, mutates_args=())
@with_op_signature()
def moe_triton_op(*args) -> Tensor:
    return moe_triton(*unflatten(args))

# The backward is the op contract's analytic one: gradients do not depend on how y was computed.
register_autograd(moe_triton_op)
