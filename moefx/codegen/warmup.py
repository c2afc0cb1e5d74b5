"""Compile every token bucket ahead of serving, so no request pays for a JIT compilation."""
from __future__ import annotations

import torch

from moefx.codegen.launch import moe_triton
from moefx.codegen.tuning import TOKEN_BUCKETS
from moefx.op import MoEAttrs, MoEInputs


def warmup(inputs: MoEInputs, attrs: MoEAttrs, max_tokens: int = TOKEN_BUCKETS[-1]) -> None:
    """Run the kernels once per token bucket up to ``max_tokens`` on random tokens shaped like ``inputs.x``.

    Takes the op's arguments (only the shapes and dtypes of x and router_input matter), so the
    compiled specialisations are exactly those the layer will use.
    """
    x, router_input = inputs.x, inputs.router_input
    for bucket in TOKEN_BUCKETS:
        if bucket > max_tokens:
            break
        tokens = torch.randn(bucket, x.shape[1], dtype=x.dtype, device=x.device)
        routing = tokens if router_input is x else torch.randn(bucket, router_input.shape[1],
                                                                  dtype=router_input.dtype, device=x.device)
        moe_triton(inputs._replace(x=tokens, router_input=routing), attrs)
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
