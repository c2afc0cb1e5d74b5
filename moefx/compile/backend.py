"""``torch.compile(model, backend="moefx")``: moefx's graph passes, then Inductor.

The Dynamo graph goes through ``moefx.compile.passes.PRE_GRAD_PASSES`` (MoE blocks of
transformers models become ``moefx::moe``; on CUDA that op becomes its Triton ``triton_op``), then to
Inductor's ``compile_fx``, which expands the op elsewhere through ``moefx.compile.decompose``. ``mode`` and ``options`` mean what they mean for Inductor, e.g.
``torch.compile(model, backend="moefx", mode="reduce-overhead")`` or ``options={"freezing": True}``
(inference: folds the per-call reordering of expert weights into constants).

Registered as "moefx" through the ``torch_dynamo_backends`` entry point (``import moefx`` does not load
Dynamo), and when this module is imported.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch._dynamo.backends import registry
from torch._dynamo.utils import counters

from moefx.compile import decompose  # noqa: F401  (moefx::moe's decomposition, in Inductor's table)
from moefx.compile.passes import run_pre_grad_passes
from moefx.compile.swap_triton import is_moe_call

log = logging.getLogger(__name__)


def moefx_backend(gm: torch.fx.GraphModule, example_inputs, mode: Optional[str] = None,
                  options: Optional[dict] = None):
    """Dynamo backend: run moefx's passes on ``gm``, then compile it with Inductor."""
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    gm = run_pre_grad_passes(gm)
    moe_calls = sum(1 for n in gm.graph.nodes if is_moe_call(n) or n.target is moe_triton_default())
    # Tests and users read these to see what the passes did to each graph.
    counters["moefx"]["graphs"] += 1
    counters["moefx"]["moe_calls"] += moe_calls
    log.debug("moefx: graph with %d nodes handed to Inductor with %d MoE call(s)", len(gm.graph.nodes), moe_calls)
    config = {**list_mode_options(mode or "default"), **(options or {})}
    return compile_fx(gm, example_inputs, config_patches=config)


def moe_triton_default():
    op = getattr(torch.ops.moefx, "moe_triton", None)
    return None if op is None else op.default


# While the entry point itself is being loaded, torch registers the backend right after; registering
# here too would be a duplicate name, so only register when no entry point has claimed "moefx".
if registry._BACKENDS.get("moefx") is None and "moefx" not in registry._COMPILER_FNS:
    registry.register_backend(moefx_backend, name="moefx")
