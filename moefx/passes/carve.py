"""Build an ``MoELayer`` from a dense FFN.

- ``upcycle``: E copies of the FFN and a new router (sparse upcycling, Komatsuzaki et al. 2023);
  renormalised softmax gates make it exact at any top_k.
- ``split``: neurons partitioned into equal experts by balanced k-means on the normalised rows of
  W_in (MoEfication, Zhang et al. 2022).
- ``coactivation``: balanced clustering of neurons by their activation pattern on calibration
  data, so that neurons that fire together share an expert (MoEfication's co-activation graph).
- ``random``: neurons dealt into experts at random (MoEfication's baseline split).
- ``num_shared``: the neurons with the highest activation rate form always-on shared experts
  (DeepSeekMoE; CMoE).
Carved experts enter with gate 1 ("unit" scoring), so all experts active reproduce the FFN. The
analytic router scores an expert by the mean pre-activation of its neurons: its row is the mean
of their W_in (gate) rows.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from moefx.layer import MoELayer
from moefx.passes.calibrate import HiddenStats
from moefx.passes.find_ffn import FFN

METHODS = ("upcycle", "split", "coactivation", "random")


def balanced_kmeans(features: Tensor, clusters: int, iterations: int = 25, seed: int = 0) -> Tensor:
    """Labels [n] putting n/clusters rows in each cluster, by spherical k-means with capacity limits."""
    n = features.shape[0]
    capacity = n // clusters
    points = torch.nn.functional.normalize(features.double(), dim=1)
    generator = torch.Generator().manual_seed(seed)
    centroids = points[torch.randperm(n, generator=generator)[:clusters]]
    labels = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iterations):
        new_labels = _assign_with_capacity(points @ centroids.T, capacity)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
        sums = torch.zeros_like(centroids).index_add_(0, labels, points)
        centroids = torch.nn.functional.normalize(sums, dim=1)
    return labels


def _assign_with_capacity(scores: Tensor, capacity: int) -> Tensor:
    """Each row to its best cluster that has room; a full cluster keeps its highest-scoring rows."""
    n, clusters = scores.shape
    labels = torch.full((n,), -1, dtype=torch.long)
    room = torch.full((clusters,), capacity, dtype=torch.long)
    scores = scores.clone()
    while (free := labels < 0).any():
        scores[:, room == 0] = float("-inf")
        choice = scores.argmax(1)
        for cluster in range(clusters):
            rows = torch.nonzero(free & (choice == cluster)).flatten()
            if len(rows) == 0:
                continue
            taken = rows[scores[rows, cluster].argsort(descending=True)[: int(room[cluster])]]
            labels[taken] = cluster
            room[cluster] -= len(taken)
    return labels


def partition(ffn: FFN, stats: Optional[HiddenStats], method: str, num_experts: int, num_shared: int,
              seed: int) -> tuple[Tensor, list[Tensor]]:
    """(shared neuron indices, one index tensor per routed expert) for a carved conversion."""
    width = ffn.width
    expert_width = width // num_experts
    neurons = torch.arange(width)
    shared = torch.empty(0, dtype=torch.long)
    if num_shared:
        shared = stats.activation_rate.argsort(descending=True, stable=True)[: num_shared * expert_width].sort().values
        keep = torch.ones(width, dtype=torch.bool)
        keep[shared] = False
        neurons = neurons[keep]
    routed = num_experts - num_shared
    if method == "random":
        order = neurons[torch.randperm(len(neurons), generator=torch.Generator().manual_seed(seed))]
        return shared, [group.sort().values for group in order.chunk(routed)]
    if method == "split":
        features = gate_rows(ffn)[neurons]
    else:
        features = stats.samples.T[neurons]
        features = features - features.mean(1, keepdim=True)
    labels = balanced_kmeans(features, routed, seed=seed)
    return shared, [neurons[labels == e] for e in range(routed)]


def gate_rows(ffn: FFN) -> Tensor:
    """The W_in rows that decide whether a neuron fires: the gate rows of a gated FFN."""
    return ffn.in_maps[0][0]


def _in_rows(ffn: FFN, neurons: Tensor) -> Tensor:
    """Row indices of W_in for ``neurons`` (gate and up rows, interleaved, when gated)."""
    return torch.stack([2 * neurons, 2 * neurons + 1], 1).flatten() if ffn.gated else neurons


def carved_layer(ffn: FFN, shared: Tensor, groups: list[Tensor], top_k: int) -> MoELayer:
    """An MoELayer whose routed experts hold ``groups`` of neurons and whose shared expert holds ``shared``."""
    w_in, w_out = ffn.w_in, ffn.w_out
    layer = MoELayer(ffn.hidden, len(groups[0]), len(groups), top_k, ffn.activation, ffn.gated,
                     expert_in_bias=ffn.b_in is not None, shared_width=len(shared),
                     shared_in_bias=ffn.b_in is not None, out_bias=ffn.b_out is not None,
                     router_bias=ffn.b_in is not None, scoring="unit", dtype=w_in.dtype, device="meta")
    layer = layer.to_empty(device=w_in.device)  # every parameter is copied below: skip the random init
    with torch.no_grad():
        rows = torch.stack([_in_rows(ffn, g) for g in groups])
        layer.w_in.copy_(w_in[rows])
        layer.w_out.copy_(torch.stack([w_out[:, g] for g in groups]))
        routing_rows = gate_rows(ffn)
        layer.router.weight.copy_(torch.stack([routing_rows[g].float().mean(0) for g in groups]))
        if ffn.b_in is not None:
            layer.b_in.copy_(ffn.b_in[rows])
            gate_bias = ffn.b_in[0::2] if ffn.gated else ffn.b_in
            layer.router.bias.copy_(torch.stack([gate_bias[g].float().mean() for g in groups]))
        if len(shared):
            layer.shared_in.weight.copy_(w_in[_in_rows(ffn, shared)])
            layer.shared_out.weight.copy_(w_out[:, shared])
            if ffn.b_in is not None:
                layer.shared_in.bias.copy_(ffn.b_in[_in_rows(ffn, shared)])
        if ffn.b_out is not None:
            layer.bias.copy_(ffn.b_out)
    return layer


def upcycled_layer(ffn: FFN, num_experts: int, top_k: int, seed: int) -> MoELayer:
    """E copies of the FFN behind a new router with renormalised softmax gates."""
    w_in = ffn.w_in
    layer = MoELayer(ffn.hidden, ffn.width, num_experts, top_k, ffn.activation, ffn.gated,
                     expert_in_bias=ffn.b_in is not None, expert_out_bias=ffn.b_out is not None,
                     scoring="softmax", renormalize=True, dtype=w_in.dtype, device="meta")
    layer = layer.to_empty(device=w_in.device)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.w_in.copy_(w_in.expand(num_experts, -1, -1))
        layer.w_out.copy_(ffn.w_out.expand(num_experts, -1, -1))
        if ffn.b_in is not None:
            layer.b_in.copy_(ffn.b_in.expand(num_experts, -1))
        if ffn.b_out is not None:
            layer.b_out.copy_(ffn.b_out.expand(num_experts, -1))
        router = torch.randn(layer.router.weight.shape, generator=generator) * ffn.hidden ** -0.5
        layer.router.weight.copy_(router)
    return layer
