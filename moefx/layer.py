"""``MoELayer``: the module ``moefx.convert`` puts where a dense FFN was."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor, nn

from moefx.op import MoEAttrs, MoEInputs, activate, moe_op, route


class MoELayer(nn.Module):
    """Routed experts (one ``torch.ops.moefx.moe`` call) + optional shared experts + output bias.

    y = moe(x) + shared(x) + bias, where ``shared`` is a dense FFN of the always-on neurons
    (DeepSeekMoE's shared experts) and ``bias`` the dense FFN's output bias, kept outside the
    experts so that it is added once whatever the router picks.
    """

    def __init__(
        self,
        hidden: int,
        expert_width: int,
        num_experts: int,
        attrs: MoEAttrs,
        *,
        expert_in_bias: bool = False,
        expert_out_bias: bool = False,
        shared_width: int = 0,
        shared_in_bias: bool = False,
        out_bias: bool = False,
        router_bias: bool = False,
        num_const: int = 0,
        dtype: Optional[torch.dtype] = None,
        device: Optional[torch.device] = None,
    ):
        super().__init__()
        factory = {"dtype": dtype, "device": device}
        in_rows = 2 * expert_width if attrs.gated else expert_width
        self.hidden, self.expert_width, self.num_experts = hidden, expert_width, num_experts
        self.attrs = attrs
        self.router = nn.Linear(hidden, num_experts + attrs.num_zero + attrs.num_copy + num_const, bias=router_bias,
                                **factory)
        self.w_in = nn.Parameter(torch.empty(num_experts, in_rows, hidden, **factory))
        self.b_in = nn.Parameter(torch.zeros(num_experts, in_rows, **factory)) if expert_in_bias else None
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden, expert_width, **factory))
        self.b_out = nn.Parameter(torch.zeros(num_experts, hidden, **factory)) if expert_out_bias else None
        self.const_experts = nn.Parameter(torch.zeros(num_const, hidden, **factory)) if num_const else None
        shared_rows = 2 * shared_width if attrs.gated else shared_width
        self.shared_in = nn.Linear(hidden, shared_rows, bias=shared_in_bias, **factory) if shared_width else None
        self.shared_out = nn.Linear(shared_width, hidden, bias=False, **factory) if shared_width else None
        self.bias = nn.Parameter(torch.zeros(hidden, **factory)) if out_bias else None
        nn.init.normal_(self.w_in, std=hidden ** -0.5)
        nn.init.normal_(self.w_out, std=expert_width ** -0.5)

    @property
    def shared_width(self) -> int:
        return 0 if self.shared_out is None else self.shared_out.in_features

    def inputs(self, x: Tensor, router_input: Tensor, detach_experts: bool = False) -> MoEInputs:
        """The op's tensors for flattened ``x`` [T, H] routed from ``router_input`` [T, Hr]."""
        experts = (self.w_in, self.b_in, self.w_out, self.b_out, self.const_experts)
        if detach_experts:
            experts = tuple(None if t is None else t.detach() for t in experts)
        w_in, b_in, w_out, b_out, const = experts
        return MoEInputs(x, router_input, self.router.weight, self.router.bias, w_in, b_in, w_out, b_out, const)

    def forward(self, x: Tensor, router_input: Optional[Tensor] = None) -> Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        route_from = flat if router_input is None else router_input.reshape(flat.shape[0], -1)
        y = moe_op(self.inputs(flat, route_from), self.attrs)
        if self.training and self.scoring == "unit" and self.router.weight.requires_grad and torch.is_grad_enabled():
            y = y + self._straight_through_router_grad(flat, route_from)
        if self.shared_in is not None:
            y = y + self.shared_out(self.shared_hidden(flat))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(shape)

    def shared_hidden(self, x: Tensor) -> Tensor:
        """The shared experts' hidden activation h for rows ``x`` (there must be shared experts)."""
        return activate(self.shared_in(x.to(self.shared_in.weight.dtype)), self.activation, self.gated)

    def routing(self, router_input: Tensor) -> tuple[Tensor, Tensor]:
        """(gates, choice ids), each [tokens, top_k], that the op computes from ``router_input`` [..., Hr]
        (``moefx.op.route``); no expert runs."""
        flat = router_input.reshape(-1, router_input.shape[-1])
        return route(flat, self.router.weight, self.router.bias, self.attrs)

    def expert_gates(self, router_input: Tensor) -> Tensor:
        """[T, E] the gate of each routed expert per token as the layer routes ``router_input``, 0 where skipped
        (zero-computation experts left out)."""
        gates, ids = self.routing(router_input)
        full = torch.zeros(gates.shape[0], self.router.out_features, dtype=gates.dtype, device=gates.device)
        full.scatter_add_(1, ids, gates)
        return full[:, :self.num_experts]

    def _straight_through_router_grad(self, x: Tensor, router_input: Tensor) -> Tensor:
        """Zero in value; its gradient gives the router what a sigmoid gate would get. Unit gates are the
        constant 1 (so all experts active stay the dense FFN), which alone leaves a router untrainable."""
        soft = moe_op(self.inputs(x.detach(), router_input, detach_experts=True),
                      dataclasses.replace(self.attrs, scoring="sigmoid", renormalize=False))
        return soft - soft.detach()

    def extra_repr(self) -> str:
        return (f"hidden={self.hidden}, experts={self.num_experts}x{self.expert_width}, top_k={self.top_k}, "
                f"activation={self.activation}, gated={self.gated}, scoring={self.scoring}, "
                f"shared_width={self.shared_width}")


def _attribute(name: str) -> property:
    def get(layer: MoELayer):
        return getattr(layer.attrs, name)

    def set_(layer: MoELayer, value) -> None:
        layer.attrs = dataclasses.replace(layer.attrs, **{name: value})

    return property(get, set_, doc=f"``attrs.{name}`` (setting it validates the new attributes)")


for _field in dataclasses.fields(MoEAttrs):
    setattr(MoELayer, _field.name, _attribute(_field.name))
