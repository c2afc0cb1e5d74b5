"""Routers of any MoE model, read in layer order, and layer-ahead prediction from them.

A router is what picks a layer's experts: a moefx ``MoELayer`` (``routing``) or the sparse MoE block of a
transformers model (Mixtral, Qwen2/3-MoE, OLMoE: a module with a ``gate`` router holding a [E, H]
``weight`` and an ``experts`` module; its ``gate(h)`` returns (logits, weights, ids)). Layer-ahead
prediction (as MoE-Infinity, ProMoE and HOBBIT do) applies layer l+1's router to the hidden state layer l
routes from, so l+1's experts can be fetched while layer l computes; ``layer_ahead_recall`` measures how
many of the experts l+1 then picks were predicted.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from moefx.layer import MoELayer
from moefx.runtime import call_model, hooks, token_mask


@dataclass
class Router:
    """One MoE layer's routing: ``choose(h)`` gives expert ids [T, top_k] for hidden rows h [..., H] (ids from
    ``num_experts`` on, MoE++ zero-computation experts, hold no weights); ``routed_from(args)`` is the tensor
    the layer routes from in a forward pre-hook's positional arguments."""

    name: str
    module: nn.Module
    num_experts: int
    choose: Callable[[Tensor], Tensor]
    routed_from: Callable[[tuple], Tensor]


def is_hf_moe_block(module: nn.Module) -> bool:
    gate = getattr(module, "gate", None)
    return (isinstance(getattr(gate, "weight", None), Tensor) and gate.weight.dim() == 2
            and isinstance(getattr(module, "experts", None), nn.Module) and not isinstance(module, MoELayer))


def routers(model: nn.Module) -> list[Router]:
    """The MoE layers of ``model`` in module order (the order transformers models run them)."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, MoELayer):
            found.append(Router(name, module, module.num_experts, lambda h, m=module: m.routing(h)[1],
                                lambda args: args[1] if len(args) > 1 and args[1] is not None else args[0]))
        elif is_hf_moe_block(module):
            gate = module.gate
            found.append(Router(name, module, gate.weight.shape[0],
                                lambda h, g=gate: g(h.reshape(-1, h.shape[-1]))[2], lambda args: args[0]))
    return found


def layer_ahead(routers_: list[Router], layer: int, hidden: Tensor) -> Tensor:
    """Ids [T, top_k] that layer ``layer + 1`` would pick from ``hidden``, the rows layer ``layer`` routes from."""
    return routers_[layer + 1].choose(hidden.reshape(-1, hidden.shape[-1]))


@torch.no_grad()
def routing_trace(model: nn.Module, batches: Iterable[Any]) -> dict[str, Tensor]:
    """Per MoE layer: the expert ids [tokens, top_k] it picks on ``batches`` (real tokens only when a batch has
    an ``attention_mask``), tokens in batch order."""
    found = routers(model)
    picked: dict[str, list[Tensor]] = {r.name: [] for r in found}
    for batch in batches:
        def record(r):
            def hook(module, args):
                h = r.routed_from(args)
                ids = r.choose(h)
                keep = token_mask(batch, h.shape)
                picked[r.name].append(ids if keep is None else ids[keep.reshape(-1)])
            return hook
        with hooks(*[lambda r=r: r.module.register_forward_pre_hook(record(r)) for r in found]):
            call_model(model, batch)
    return {name: torch.cat(ids) for name, ids in picked.items() if ids}


@torch.no_grad()
def layer_ahead_recall(model: nn.Module, batches: Iterable[Any]) -> dict[str, float]:
    """Per MoE layer l+1 (by name): the share of the experts it picks that layer-ahead prediction (its router
    on layer l's routing input) named, over the real tokens of ``batches``; "mean" over the layers."""
    found = routers(model)
    if len(found) < 2:
        raise ValueError(f"moefx.offload.layer_ahead_recall: {type(model).__name__} has {len(found)} MoE layer(s); "
                         "layer-ahead prediction needs two or more")
    hits = {r.name: 0 for r in found[1:]}
    total = {r.name: 0 for r in found[1:]}
    for batch in batches:
        inputs: dict[int, Tensor] = {}

        def record(i):
            def hook(module, args):
                inputs[i] = found[i].routed_from(args)
            return hook
        with hooks(*[lambda i=i, r=r: r.module.register_forward_pre_hook(record(i)) for i, r in enumerate(found)]):
            call_model(model, batch)
        for i in range(len(found) - 1):
            nxt = found[i + 1]
            h, h_next = inputs[i], inputs[i + 1]
            keep = token_mask(batch, h.shape)
            actual, predicted = nxt.choose(h_next), layer_ahead(found, i, h)
            if keep is not None:
                actual, predicted = actual[keep.reshape(-1)], predicted[keep.reshape(-1)]
            hits[nxt.name] += int((chosen(actual, nxt.num_experts) & chosen(predicted, nxt.num_experts)).sum())
            total[nxt.name] += int(chosen(actual, nxt.num_experts).sum())
    recall = {name: hits[name] / total[name] if total[name] else 1.0 for name in hits}
    recall["mean"] = sum(recall.values()) / len(recall)
    return recall


def chosen(ids: Tensor, num_experts: int) -> Tensor:
    """[T, E] bool: which experts with weights ``ids`` [T, k] name (zero-computation ids left out)."""
    out = torch.zeros(ids.shape[0], num_experts + 1, dtype=torch.bool, device=ids.device)
    return out.scatter_(1, ids.clamp(max=num_experts), True)[:, :num_experts]
