"""Local routing consistency: how well a model suits expert offloading.

The two metrics of Liang et al. 2025, "Not All Models Suit Expert Offloading: On Local Routing Consistency
of Mixture-of-Expert Models" (arXiv 2505.16056), over each MoE layer's expert choices on a token stream:

* SRP, segment routing best performance: over every window of ``segment`` consecutive tokens, the share of
  the window's expert activations that the best fixed set of ``size`` experts (the most used in the window;
  default top_k) covers. 1.0: a fixed group serves the whole window.
* SCH, segment cache best hit rate: the hit rate of a cache of ``cache_size`` experts per layer (default
  2 x top_k, the size the paper finds balanced) that knows the next ``segment`` tokens' routing and evicts
  the expert used least in them (least recently used among ties), as the paper's reference code does.

Both take ids [T, top_k] of one sequence; ``routing_consistency`` runs a model (moefx-converted or a
recognised transformers MoE) and averages over its layers, treating each batch as one sequence.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
from torch import Tensor, nn

from moefx.offload.predict import chosen, routers, routing_trace


def segment_routing_best_performance(ids: Tensor, num_experts: int, segment: int, size: Optional[int] = None) -> float:
    """SRP of one layer's choices ``ids`` [T, top_k] (ids >= ``num_experts`` hold no weights, left out)."""
    used = chosen(ids, num_experts).float()  # [T, E]
    size = ids.shape[1] if size is None else size
    if used.shape[0] < segment:
        segment = used.shape[0]
    windows = used.unfold(0, segment, 1).sum(-1)  # [T - segment + 1, E]: uses of each expert per window
    covered = windows.topk(min(size, num_experts), dim=-1).values.sum(-1)
    total = windows.sum(-1)
    return float((covered / total.clamp(min=1)).mean())


def segment_cache_best_hit_rate(ids: Tensor, num_experts: int, segment: int, cache_size: Optional[int] = None
                                ) -> float:
    """SCH of one layer's choices ``ids`` [T, top_k]."""
    used = chosen(ids, num_experts)
    cache_size = 2 * ids.shape[1] if cache_size is None else cache_size
    steps = used.shape[0]
    cumulative = torch.cat([torch.zeros(1, num_experts, dtype=torch.long), used.long().cumsum(0)])
    cache: set[int] = set()
    last: dict[int, int] = {}
    hits = total = 0
    for t in range(steps):
        wanted = used[t].nonzero().flatten().tolist()
        hits += sum(e in cache for e in wanted)
        total += len(wanted)
        for e in wanted:
            cache.add(e)
            last[e] = t
        if len(cache) > cache_size:
            ahead = (cumulative[min(t + 1 + segment, steps)] - cumulative[t + 1]).tolist()
            evictable = sorted(cache - set(wanted), key=lambda e: (ahead[e], last[e]))
            for e in evictable[:len(cache) - cache_size]:
                cache.discard(e)
    return hits / total if total else 1.0


@dataclass
class RoutingConsistency:
    """Per MoE layer (by name) and averaged ("mean"): SRP and SCH at one segment length."""

    segment: int
    srp: dict[str, float]
    sch: dict[str, float]

    def __str__(self) -> str:
        return (f"segment {self.segment}: SRP {self.srp['mean']:.3f}, SCH {self.sch['mean']:.3f} "
                f"(mean of {len(self.srp) - 1} MoE layers)")


@torch.no_grad()
def routing_consistency(model: nn.Module, batches: Iterable[Any], segment: int = 16, size: Optional[int] = None,
                        cache_size: Optional[int] = None) -> RoutingConsistency:
    """SRP and SCH of every MoE layer of ``model`` on ``batches`` (each one sequence, batch size 1; real tokens
    only where a batch has an ``attention_mask``), averaged over the batches."""
    experts = {r.name: r.num_experts for r in routers(model)}
    if not experts:
        raise ValueError(f"moefx.routing_consistency: {type(model).__name__} has no MoE layer moefx recognises")
    srp: dict[str, list[float]] = {name: [] for name in experts}
    sch: dict[str, list[float]] = {name: [] for name in experts}
    for batch in batches:
        for name, ids in routing_trace(model, [batch]).items():
            srp[name].append(segment_routing_best_performance(ids, experts[name], segment, size))
            sch[name].append(segment_cache_best_hit_rate(ids, experts[name], segment, cache_size))

    def averaged(values: dict[str, list[float]]) -> dict[str, float]:
        out = {name: sum(v) / len(v) for name, v in values.items() if v}
        out["mean"] = sum(out.values()) / len(out)
        return out
    return RoutingConsistency(segment, averaged(srp), averaged(sch))
