"""``moefx.summary``: the MoE layers of a model and how much of their FFN is active per token.

Without data a layer runs its static ``top_k`` routed experts per token. With ``data`` (model
inputs, as for calibration) the mean number of *real* routed experts per token is measured the
way ``moefx.evaluate`` counts it (``MoELayer.expert_gates``: experts with a non-zero gate), so dynamic-k
(top_p < 1) and slots taken by zero-computation experts (MoE++) show as compute saved.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
from torch import nn

from moefx.layer import MoELayer
from moefx.runtime import call_model, hooks, read_batches


@dataclass
class LayerSummary:
    name: str
    num_experts: int
    expert_width: int
    shared_width: int
    top_k: int
    activation: str
    gated: bool
    total_params: int      # routed experts + shared experts + router + constant experts
    active_params: int     # per token: routed experts run (measured with data) + shared experts + router
    zero_computation: int = 0               # zero, copy and constant experts (MoE++)
    measured_experts: Optional[float] = None  # mean real routed experts per token on the data, if given
    dense_width: Optional[int] = None       # neurons of the dense FFN it came from (None: the carved total)

    @property
    def experts_per_token(self) -> float:
        """Real routed experts a token runs: measured with data, else the static top_k."""
        return self.top_k if self.measured_experts is None else self.measured_experts

    @property
    def saved_slots(self) -> float:
        """Share of the top_k slots that ran no real expert (dynamic-k, zero-computation experts)."""
        return 1.0 - self.experts_per_token / self.top_k

    @property
    def active_fraction(self) -> float:
        """Share of the FFN's neurons that a token runs through."""
        return (self.experts_per_token * self.expert_width + self.shared_width) / (
            self.num_experts * self.expert_width + self.shared_width)

    @property
    def compute_vs_dense(self) -> float:
        """Expert neurons a token runs over the dense FFN's neurons: the FFN compute relative to dense (an
        upcycled expert is a whole copy of the FFN, so two of them cost twice the dense FFN)."""
        dense = self.dense_width or self.num_experts * self.expert_width + self.shared_width
        return (self.experts_per_token * self.expert_width + self.shared_width) / dense


@dataclass
class Summary:
    layers: list[LayerSummary]
    tokens: int = 0  # tokens measured (0: no data, static top_k)

    @property
    def total_params(self) -> int:
        return sum(layer.total_params for layer in self.layers)

    @property
    def active_params(self) -> int:
        return sum(layer.active_params for layer in self.layers)

    @property
    def experts_per_token(self) -> float:
        """Mean over the MoE layers of the real routed experts a token runs."""
        return sum(l.experts_per_token for l in self.layers) / len(self.layers) if self.layers else 0.0

    @property
    def compute_vs_dense(self) -> float:
        """FFN neurons a token runs over the dense model's FFN neurons, over every MoE layer."""
        active = sum(l.experts_per_token * l.expert_width + l.shared_width for l in self.layers)
        dense = sum(l.dense_width or l.num_experts * l.expert_width + l.shared_width for l in self.layers)
        return active / dense if dense else 0.0

    @property
    def active_fraction(self) -> float:
        """Active FFN neurons per token over all FFN neurons, over every MoE layer."""
        active = sum(l.experts_per_token * l.expert_width + l.shared_width for l in self.layers)
        total = sum(l.num_experts * l.expert_width + l.shared_width for l in self.layers)
        return active / total if total else 0.0

    def __str__(self) -> str:
        header = (f"{'layer':<40} {'experts':>10} {'zero-comp':>9} {'shared':>7} {'top_k':>5} {'experts/tok':>11} "
                  f"{'act':>10} {'active':>7} {'vs dense':>8}")
        rows = [header, "-" * len(header)]
        for l in self.layers:
            act = ("glu-" if l.gated else "") + l.activation
            rows.append(f"{l.name:<40} {f'{l.num_experts}x{l.expert_width}':>10} {l.zero_computation:>9} "
                        f"{l.shared_width:>7} {l.top_k:>5} {l.experts_per_token:>11.2f} {act:>10} "
                        f"{l.active_fraction:>7.1%} {l.compute_vs_dense:>8.1%}")
        rows.append(f"{len(self.layers)} MoE layers; FFN parameters {self.total_params:,} total, "
                    f"{self.active_params:,} active per token ({self.active_fraction:.1%} of FFN neurons); FFN "
                    f"compute per token {self.compute_vs_dense:.1%} of the dense model's")
        if self.tokens:
            saved = sum(l.saved_slots for l in self.layers) / len(self.layers) if self.layers else 0.0
            rows.append(f"measured on {self.tokens:,} tokens: {self.experts_per_token:.2f} routed experts per token "
                        f"per layer; {saved:.1%} of the top_k slots ran no real expert")
        else:
            rows.append("experts/tok is the static top_k; pass data= to measure dynamic-k and zero-computation layers")
        return "\n".join(rows)


def summary(model: nn.Module, data: Optional[Iterable[Any]] = None) -> Summary:
    """Per-layer experts, widths and total vs active FFN parameters of every ``MoELayer``; with ``data``
    (model inputs: dicts of keyword arguments, tuples of arguments, or tensors) the active experts per
    token are measured on it."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, MoELayer)}
    recipe = getattr(model, "moefx_recipe", None)
    counts, tokens = _count_routed_experts(model, layers, data) if data is not None else ({}, 0)
    rows = []
    for name, module in layers.items():
        expert = module.w_in[0].numel() + module.w_out[0].numel()
        expert += (module.b_in[0].numel() if module.b_in is not None else 0)
        expert += (module.b_out[0].numel() if module.b_out is not None else 0)
        shared = sum(p.numel() for m in (module.shared_in, module.shared_out) if m is not None for p in m.parameters())
        shared += 0 if module.bias is None else module.bias.numel()
        router = sum(p.numel() for p in module.router.parameters())
        const = 0 if module.const_experts is None else module.const_experts.numel()
        measured = None
        if name in counts:
            slots, seen = counts[name]
            measured = slots / seen
        per_token = module.top_k if measured is None else measured
        rows.append(LayerSummary(name, module.num_experts, module.expert_width, module.shared_width, module.top_k,
                                 module.activation, module.gated, module.num_experts * expert + shared + router + const,
                                 round(per_token * expert) + shared + router,
                                 module.router.out_features - module.num_experts, measured,
                                 module.expert_width * recipe.granularity if recipe is not None and recipe.upcycle
                                 else None))
    return Summary(rows, tokens)


def _count_routed_experts(model: nn.Module, layers: dict[str, MoELayer], data: Iterable[Any]):
    """{layer name: (routed real-expert slots, tokens)} over ``data``, and the tokens of the first layer."""
    counts = {name: [0, 0] for name in layers}

    def hook(module, args, kwargs, name):
        x = args[0].reshape(-1, module.hidden)
        route_from = args[1] if len(args) > 1 else kwargs.get("router_input")
        route_from = x if route_from is None else route_from.reshape(x.shape[0], -1)
        counts[name][0] += int((module.expert_gates(route_from.float()) != 0).sum())
        counts[name][1] += x.shape[0]

    registrations = [lambda m=m, name=name: m.register_forward_pre_hook(
        lambda mod, a, kw: hook(mod, a, kw, name), with_kwargs=True) for name, m in layers.items()]
    batches = read_batches(data, "moefx.summary", "data", " or leave data out for the static top_k")
    with hooks(*registrations), torch.no_grad():
        for batch in batches:
            call_model(model, batch)
    seen = {name: tuple(c) for name, c in counts.items() if c[1]}
    return seen, next(iter(seen.values()))[1] if seen else 0
