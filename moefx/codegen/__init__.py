"""Generated Triton kernels for ``torch.ops.moefx.moe`` (router, permutation, expert GEMMs, combine).

``moe_triton`` takes the op's positional arguments; ``moefx.op`` calls it when
``MOEFX_KERNELS`` selects "triton". ``torch.ops.moefx.moe_triton`` (name in ``TRITON_OP``) is the
same computation as a ``torch.library.triton_op``; ``warmup`` compiles every token bucket.
"""
from moefx.codegen.launch import moe_triton
from moefx.codegen.op import TRITON_OP, moe_triton_op
from moefx.codegen.tuning import TOKEN_BUCKETS, token_bucket
from moefx.codegen.warmup import warmup

__all__ = ["moe_triton", "moe_triton_op", "TRITON_OP", "TOKEN_BUCKETS", "token_bucket", "warmup"]
