"""Replace a found FFN's nodes in a traced piece with one call of its ``MoELayer``."""
from __future__ import annotations

import logging
import os

import torch.fx as fx

from moefx.layer import MoELayer
from moefx.ffn import FFN

log = logging.getLogger(__name__)


def replace_ffn(gm: fx.GraphModule, ffn: FFN, layer: MoELayer) -> str:
    """Swap ``ffn`` for a call_module of ``layer``; returns the layer's name inside ``gm``."""
    targets = [n.target for n in ffn.nodes if n.op == "call_module" and "." in n.target]
    prefix = os.path.commonprefix([t.rsplit(".", 1)[0] + "." for t in targets]) if len(targets) > 1 else ""
    prefix = prefix[: prefix.rfind(".") + 1]
    name, suffix = f"{prefix}moe", 1
    while _has_attr(gm, name):
        suffix += 1
        name = f"{prefix}moe{suffix}"
    gm.add_submodule(name, layer)
    with gm.graph.inserting_before(ffn.output_node):
        call = gm.graph.call_module(name, (ffn.input_node,))
    ffn.output_node.replace_all_uses_with(call)
    position = {node: i for i, node in enumerate(gm.graph.nodes)}
    for node in sorted(ffn.nodes, key=position.__getitem__, reverse=True):
        gm.graph.erase_node(node)
    gm.delete_all_unused_submodules()
    gm.recompile()
    log.debug("moefx: %s -> %s.%s (%d nodes replaced)", ffn.name, ffn.piece or "<model>", name, len(ffn.nodes))
    return name


def _has_attr(gm: fx.GraphModule, name: str) -> bool:
    try:
        gm.get_submodule(name)
    except AttributeError:
        return False
    return True
