"""Build an ``MoELayer`` from a dense FFN.

- ``upcycle``: E copies of the FFN and a new router (sparse upcycling, Komatsuzaki et al. 2023);
  renormalised softmax gates make it exact at any top_k. ``granularity`` G cuts every copy into
  G shards of F/G neurons (fine-grained upcycling with virtual groups, He et al. 2024, arXiv
  2410.07524, as in Megatron-core): E*G experts, top_k*G active, the router rows of one copy tied
  so that its G shards are picked together, and gate_scale G in place of Megatron's weight
  scaling (exact for every activation, where scaling weights is exact only for ReLU).
  ``drop_rate`` r: Drop-Upcycling (Nakamura et al. 2025, arXiv 2502.19261), every expert re-draws
  round(r * width) of its neurons, its own random choice, from N(mean, std) of the dense matrix.
- ``split``: neurons partitioned into equal experts by balanced k-means on the normalised rows of
  W_in (MoEfication, Zhang et al. 2022).
- ``coactivation``: balanced clustering of neurons by their activation pattern on calibration
  data, so that neurons that fire together share an expert (MoEfication's co-activation graph).
- ``random``: neurons dealt into experts at random (MoEfication's baseline split).
- ``num_shared``: the neurons with the highest activation rate form always-on shared experts
  (DeepSeekMoE; CMoE).
Carved experts enter with gate 1 ("unit" scoring), so all experts active reproduce the FFN (router-weighted
carving, ``Recipe.gating``, sets softmax or sigmoid scoring and leaves the gates to ``fit.refit``). The
analytic router scores an expert by the mean pre-activation of its neurons: its row is the mean
of their W_in (gate) rows. Zero-computation experts (MoE++) start switched off (``switch_off``);
a fitted router (``routers.router_targets``) teaches a carved layer when to pick them.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from moefx.layer import MoELayer
from moefx.op import MoEAttrs
from moefx.fit.calibrate import HiddenStats
from moefx.ffn import FFN

# router logit of a switched-off expert: below any real logit, so top_k never reaches it
OFF_LOGIT = -1e4


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


def split_groups(ffn: FFN, neurons: Tensor, stats: Optional[HiddenStats], routed: int, seed: int) -> list[Tensor]:
    """MoEfication's split: balanced spherical k-means on the neurons' normalised W_in (gate) rows."""
    labels = balanced_kmeans(gate_rows(ffn)[neurons], routed, seed=seed)
    return [neurons[labels == e] for e in range(routed)]


def coactivation_groups(ffn: FFN, neurons: Tensor, stats: Optional[HiddenStats], routed: int, seed: int
                        ) -> list[Tensor]:
    """MoEfication's co-activation clustering: neurons that fire together on calibration data share an expert."""
    features = stats.samples.T[neurons]
    labels = balanced_kmeans(features - features.mean(1, keepdim=True), routed, seed=seed)
    return [neurons[labels == e] for e in range(routed)]


def random_groups(ffn: FFN, neurons: Tensor, stats: Optional[HiddenStats], routed: int, seed: int) -> list[Tensor]:
    """MoEfication's baseline: neurons dealt into experts at random."""
    order = neurons[torch.randperm(len(neurons), generator=torch.Generator().manual_seed(seed))]
    return [group.sort().values for group in order.chunk(routed)]


def contiguous_groups(ffn: FFN, neurons: Tensor, stats: Optional[HiddenStats], routed: int, seed: int
                      ) -> list[Tensor]:
    """Neurons in order, ``routed`` equal runs: the layer's structure alone (its values come from elsewhere)."""
    return list(neurons.chunk(routed))


# carving method -> how the routed neurons are grouped into experts
CARVERS = {"split": split_groups, "coactivation": coactivation_groups, "random": random_groups}
NEEDS_STATISTICS = ("coactivation",)


def partition(ffn: FFN, stats: Optional[HiddenStats], group, num_experts: int, num_shared: int, seed: int,
              importance: Optional[Tensor] = None) -> tuple[Tensor, list[Tensor]]:
    """(shared neuron indices, one index tensor per routed expert) for a carved conversion, the routed ones
    grouped by ``group`` (a ``CARVERS`` entry). The shared experts take the neurons of highest
    ``importance`` [F] (default: activation rate, CMoE); without either, the first neurons."""
    width = ffn.width
    expert_width = width // num_experts
    neurons = torch.arange(width)
    shared = torch.empty(0, dtype=torch.long)
    if num_shared:
        score = importance if importance is not None else stats.activation_rate if stats is not None else -neurons
        shared = score.argsort(descending=True, stable=True)[: num_shared * expert_width].sort().values
        keep = torch.ones(width, dtype=torch.bool)
        keep[shared] = False
        neurons = neurons[keep]
    return shared, group(ffn, neurons, stats, num_experts - num_shared, seed)


def gate_rows(ffn: FFN) -> Tensor:
    """The W_in rows that decide whether a neuron fires: the gate rows of a gated FFN."""
    return ffn.in_maps[0][0]


def _in_rows(ffn: FFN, neurons: Tensor) -> Tensor:
    """Row indices of W_in for ``neurons`` (gate and up rows, interleaved, when gated)."""
    return torch.stack([2 * neurons, 2 * neurons + 1], 1).flatten() if ffn.gated else neurons


def carved_layer(ffn: FFN, shared: Tensor, groups: list[Tensor], top_k: int, extra: Optional[dict] = None,
                 router_bias: bool = False, corrected: bool = False, scoring: str = "unit",
                 renormalize: bool = False) -> MoELayer:
    """An MoELayer whose routed experts hold ``groups`` of neurons and whose shared expert holds ``shared``;
    ``extra``: MoELayer's num_zero, num_copy, num_const (zero-computation experts, switched off). A layer
    whose router will be fitted with a bias gets one, one that will be compensated or refit expert output
    biases and a layer bias (all zero until then). ``scoring`` other than "unit" (router-weighted carving)
    needs a fitted router and a refit (``fit.refit.fit_gates``) to reproduce the FFN."""
    w_in, w_out = ffn.w_in, ffn.w_out
    extra = extra or {}
    attrs = MoEAttrs(top_k, ffn.activation, ffn.gated, scoring=scoring, renormalize=renormalize,
                     num_zero=extra.get("num_zero", 0), num_copy=extra.get("num_copy", 0))
    layer = MoELayer(ffn.hidden, len(groups[0]), len(groups), attrs, expert_in_bias=ffn.b_in is not None,
                     expert_out_bias=corrected, shared_width=len(shared), shared_in_bias=ffn.b_in is not None,
                     out_bias=ffn.b_out is not None or corrected,
                     router_bias=ffn.b_in is not None or any(extra.values()) or router_bias,
                     num_const=extra.get("num_const", 0), dtype=w_in.dtype, device="meta")
    layer = layer.to_empty(device=w_in.device)  # every parameter is copied below: skip the random init
    with torch.no_grad():
        rows = torch.stack([_in_rows(ffn, g) for g in groups])
        layer.w_in.copy_(w_in[rows])
        layer.w_out.copy_(torch.stack([w_out[:, g] for g in groups]))
        routing_rows = gate_rows(ffn)
        E = len(groups)
        layer.router.weight[:E].copy_(torch.stack([routing_rows[g].float().mean(0) for g in groups]))
        if layer.router.bias is not None:
            layer.router.bias.zero_()
        if ffn.b_in is not None:
            layer.b_in.copy_(ffn.b_in[rows])
            layer.router.bias[:E].copy_(torch.stack([ffn.gate_bias[g].float().mean() for g in groups]))
        switch_off(layer)
        if len(shared):
            layer.shared_in.weight.copy_(w_in[_in_rows(ffn, shared)])
            layer.shared_out.weight.copy_(w_out[:, shared])
            if ffn.b_in is not None:
                layer.shared_in.bias.copy_(ffn.b_in[_in_rows(ffn, shared)])
        if layer.b_out is not None:
            layer.b_out.zero_()
        if layer.bias is not None:
            layer.bias.copy_(ffn.b_out if ffn.b_out is not None else torch.zeros_like(layer.bias))
    return layer


def upcycled_layer(ffn: FFN, num_experts: int, top_k: int, seed: int, granularity: int = 1,
                   drop_rate: float = 0.0, extra: Optional[dict] = None) -> MoELayer:
    """``num_experts`` copies of the FFN, each cut into ``granularity`` G shards of F/G neurons (expert
    c*G + g is shard g of copy c), behind a new router with renormalised softmax gates.

    The G router rows of a copy are equal, so the top_k*G choices are whole copies, and each shard of
    copy c gets gate s_c / (G * sum of the chosen s); gate_scale G restores s_c / sum s, so the layer
    is a convex mix of identical FFNs: the dense FFN. The output bias is split as b / G per shard."""
    G, extra = granularity, extra or {}
    width = ffn.width // G
    attrs = MoEAttrs(top_k * G, ffn.activation, ffn.gated, scoring="softmax", renormalize=True,
                     gate_scale=float(G), num_zero=extra.get("num_zero", 0), num_copy=extra.get("num_copy", 0))
    layer = MoELayer(ffn.hidden, width, num_experts * G, attrs, expert_in_bias=ffn.b_in is not None,
                     expert_out_bias=ffn.b_out is not None, router_bias=G > 1 or any(extra.values()),
                     num_const=extra.get("num_const", 0), dtype=ffn.w_in.dtype, device="meta")
    layer = layer.to_empty(device=ffn.w_in.device)
    generator = torch.Generator().manual_seed(seed)
    shards = torch.arange(ffn.width).view(G, width)
    rows = torch.stack([_in_rows(ffn, shard) for shard in shards])
    E = num_experts * G
    with torch.no_grad():
        layer.w_in.copy_(ffn.w_in[rows].repeat(num_experts, 1, 1))
        layer.w_out.copy_(torch.stack([ffn.w_out[:, shard] for shard in shards]).repeat(num_experts, 1, 1))
        if ffn.b_in is not None:
            layer.b_in.copy_(ffn.b_in[rows].repeat(num_experts, 1))
        if ffn.b_out is not None:
            layer.b_out.copy_((ffn.b_out / G).expand(E, -1))
        router = torch.randn(num_experts, ffn.hidden, generator=generator) * ffn.hidden ** -0.5
        layer.router.weight[:E].copy_(router.repeat_interleave(G, 0))
        if layer.router.bias is not None:
            layer.router.bias.zero_()
            # distinct per copy: an input with all logits tied (x = 0) still picks whole copies
            layer.router.bias[:E].copy_(-1e-6 * torch.arange(num_experts).repeat_interleave(G))
        switch_off(layer)
        if drop_rate:
            drop_neurons(layer, ffn, drop_rate, generator)
    return layer


@torch.no_grad()
def switch_off(layer: MoELayer) -> None:
    """Zero-computation experts start unpicked: zero router rows and logit OFF_LOGIT, below every real
    expert's, so while top_k does not exceed the real experts the layer is what it was without them."""
    E = layer.num_experts
    if layer.router.out_features > E:
        layer.router.weight[E:] = 0
        layer.router.bias[E:] = OFF_LOGIT


@torch.no_grad()
def drop_neurons(layer: MoELayer, ffn: FFN, rate: float, generator: torch.Generator) -> None:
    """Drop-Upcycling's diversity re-initialisation: each expert re-draws round(rate * width) of its
    neurons, a random choice per expert: their W_in rows (gate and up), b_in entries and W_out
    columns, each matrix from a normal with that dense matrix's mean and std."""
    count = round(rate * layer.expert_width)
    if not count:
        return
    w_in = ffn.w_in.float()
    parts = [(w_in[0::2], 0), (w_in[1::2], 1)] if ffn.gated else [(w_in, 0)]
    stride = len(parts)
    for e in range(layer.num_experts):
        neurons = torch.randperm(layer.expert_width, generator=generator)[:count]
        for matrix, offset in parts:
            rows = stride * neurons + offset
            layer.w_in[e, rows] = _redraw(matrix, (count, ffn.hidden), generator).to(layer.w_in)
            if ffn.b_in is not None:
                bias = ffn.b_in.float()[offset::stride]
                layer.b_in[e, rows] = _redraw(bias, (count,), generator).to(layer.b_in)
        layer.w_out[e][:, neurons] = _redraw(ffn.w_out.float(), (ffn.hidden, count), generator).to(layer.w_out)


def _redraw(like: Tensor, shape: tuple, generator: torch.Generator) -> Tensor:
    std, mean = torch.std_mean(like, correction=0)
    return torch.randn(shape, generator=generator) * std + mean
