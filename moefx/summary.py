"""``moefx.summary``: the MoE layers of a model and how much of their FFN is active per token."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from moefx.layer import MoELayer


@dataclass
class LayerSummary:
    name: str
    num_experts: int
    expert_width: int
    shared_width: int
    top_k: int
    activation: str
    gated: bool
    total_params: int      # routed experts + shared experts + router
    active_params: int     # per token: top_k routed experts + shared experts + router

    @property
    def active_fraction(self) -> float:
        """Share of the FFN's neurons that a token runs through."""
        return (self.top_k * self.expert_width + self.shared_width) / (
            self.num_experts * self.expert_width + self.shared_width)


@dataclass
class Summary:
    layers: list[LayerSummary]

    @property
    def total_params(self) -> int:
        return sum(layer.total_params for layer in self.layers)

    @property
    def active_params(self) -> int:
        return sum(layer.active_params for layer in self.layers)

    @property
    def active_fraction(self) -> float:
        """Active FFN neurons per token over all FFN neurons, over every MoE layer."""
        active = sum(l.top_k * l.expert_width + l.shared_width for l in self.layers)
        total = sum(l.num_experts * l.expert_width + l.shared_width for l in self.layers)
        return active / total if total else 0.0

    def __str__(self) -> str:
        header = f"{'layer':<40} {'experts':>10} {'shared':>7} {'top_k':>5} {'act':>10} {'active':>7}"
        rows = [header, "-" * len(header)]
        for l in self.layers:
            act = ("glu-" if l.gated else "") + l.activation
            rows.append(f"{l.name:<40} {f'{l.num_experts}x{l.expert_width}':>10} {l.shared_width:>7} {l.top_k:>5} "
                        f"{act:>10} {l.active_fraction:>7.1%}")
        rows.append(f"{len(self.layers)} MoE layers; FFN parameters {self.total_params:,} total, "
                    f"{self.active_params:,} active per token ({self.active_fraction:.1%} of FFN neurons)")
        return "\n".join(rows)


def summary(model: nn.Module) -> Summary:
    """Per-layer experts, widths and total vs active FFN parameters of every ``MoELayer``."""
    layers = []
    for name, module in model.named_modules():
        if not isinstance(module, MoELayer):
            continue
        expert = module.w_in[0].numel() + module.w_out[0].numel()
        expert += (module.b_in[0].numel() if module.b_in is not None else 0)
        expert += (module.b_out[0].numel() if module.b_out is not None else 0)
        shared = sum(p.numel() for m in (module.shared_in, module.shared_out) if m is not None for p in m.parameters())
        shared += 0 if module.bias is None else module.bias.numel()
        router = sum(p.numel() for p in module.router.parameters())
        layers.append(LayerSummary(name, module.num_experts, module.expert_width, module.shared_width, module.top_k,
                                   module.activation, module.gated, module.num_experts * expert + shared + router,
                                   module.top_k * expert + shared + router))
    return Summary(layers)
