"""moefx's passes over torch-level (Dynamo) graphs, in the order they run, through torch.fx's pass manager.

1. moe_blocks   transformers MoE blocks (Mixtral, Qwen-MoE, OLMoE, DeepSeek-V2) -> one moefx::moe each
2. swap_triton  moefx::moe on CUDA -> the moefx::moe_triton triton_op, so Inductor compiles its kernels
"""
from __future__ import annotations

from torch.fx import GraphModule
from torch.fx.passes.infra.pass_manager import PassManager

from moefx.compile.moe_blocks import moe_blocks_pass
from moefx.compile.swap_triton import swap_triton_pass

PRE_GRAD_PASSES = [moe_blocks_pass, swap_triton_pass]


def run_pre_grad_passes(gm: GraphModule) -> GraphModule:
    """Run ``PRE_GRAD_PASSES`` on ``gm`` in order, linting the graph after each."""
    return PassManager(passes=PRE_GRAD_PASSES, run_checks_after_each_pass=True)(gm).graph_module
