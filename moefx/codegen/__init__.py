"""Generated Triton kernels for ``torch.ops.moefx.moe`` (router, permutation, expert GEMMs, combine).

``moe_triton(inputs, attrs)`` is registered as the op's "triton" implementation (``moefx.op``
calls it where ``kernel_path`` selects "triton"). ``torch.ops.moefx.moe_triton`` (name in ``TRITON_OP``) is the
same computation as a ``torch.library.triton_op``; ``warmup`` compiles every token bucket.
"""
from moefx.codegen.launch import moe_triton
from moefx.codegen.op import TRITON_OP, moe_triton_op
from moefx.codegen.tuning import TOKEN_BUCKETS, token_bucket
from moefx.codegen.warmup import warmup
from moefx.op import register_implementation

register_implementation("triton", moe_triton)

__all__ = ["moe_triton", "moe_triton_op", "TRITON_OP", "TOKEN_BUCKETS", "token_bucket", "warmup"]
