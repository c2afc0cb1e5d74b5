"""``MoELayer``: the module ``moefx.convert`` puts where a dense FFN was."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from moefx.op import ACTIVATIONS, moe_op, route


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
        top_k: int,
        activation: str,
        gated: bool,
        *,
        expert_in_bias: bool = False,
        expert_out_bias: bool = False,
        shared_width: int = 0,
        shared_in_bias: bool = False,
        out_bias: bool = False,
        router_bias: bool = False,
        scoring: str = "softmax",
        renormalize: bool = False,
        top_p: float = 1.0,
        min_k: int = 1,
        gate_scale: float = 1.0,
        num_zero: int = 0,
        num_copy: int = 0,
        num_const: int = 0,
        dtype: Optional[torch.dtype] = None,
        device: Optional[torch.device] = None,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r} is not one of {sorted(ACTIVATIONS)}")
        factory = {"dtype": dtype, "device": device}
        in_rows = 2 * expert_width if gated else expert_width
        self.hidden, self.expert_width, self.num_experts = hidden, expert_width, num_experts
        self.top_k, self.activation, self.gated = top_k, activation, gated
        self.scoring, self.renormalize = scoring, renormalize
        self.top_p, self.min_k, self.gate_scale = top_p, min_k, gate_scale
        self.num_zero, self.num_copy = num_zero, num_copy
        self.router = nn.Linear(hidden, num_experts + num_zero + num_copy + num_const, bias=router_bias, **factory)
        self.w_in = nn.Parameter(torch.empty(num_experts, in_rows, hidden, **factory))
        self.b_in = nn.Parameter(torch.zeros(num_experts, in_rows, **factory)) if expert_in_bias else None
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden, expert_width, **factory))
        self.b_out = nn.Parameter(torch.zeros(num_experts, hidden, **factory)) if expert_out_bias else None
        self.const_experts = nn.Parameter(torch.zeros(num_const, hidden, **factory)) if num_const else None
        shared_rows = 2 * shared_width if gated else shared_width
        self.shared_in = nn.Linear(hidden, shared_rows, bias=shared_in_bias, **factory) if shared_width else None
        self.shared_out = nn.Linear(shared_width, hidden, bias=False, **factory) if shared_width else None
        self.bias = nn.Parameter(torch.zeros(hidden, **factory)) if out_bias else None
        nn.init.normal_(self.w_in, std=hidden ** -0.5)
        nn.init.normal_(self.w_out, std=expert_width ** -0.5)

    @property
    def shared_width(self) -> int:
        return 0 if self.shared_out is None else self.shared_out.in_features

    def forward(self, x: Tensor, router_input: Optional[Tensor] = None) -> Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        route_from = flat if router_input is None else router_input.reshape(flat.shape[0], -1)
        y = moe_op(flat, route_from, self.router.weight, self.router.bias, self.w_in, self.b_in, self.w_out,
                   self.b_out, top_k=self.top_k, activation=self.activation, gated=self.gated, scoring=self.scoring,
                   renormalize=self.renormalize, top_p=self.top_p, min_k=self.min_k, gate_scale=self.gate_scale,
                   num_zero=self.num_zero, num_copy=self.num_copy, const_experts=self.const_experts)
        if self.training and self.scoring == "unit" and self.router.weight.requires_grad and torch.is_grad_enabled():
            y = y + self._straight_through_router_grad(flat, route_from)
        if self.shared_in is not None:
            y = y + self.shared_out(self._act(self.shared_in(flat)))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(shape)

    def routing(self, router_input: Tensor) -> tuple[Tensor, Tensor]:
        """(gates, choice ids), each [tokens, top_k], that the op computes from ``router_input`` [..., Hr]
        (``moefx.op.route``); no expert runs."""
        flat = router_input.reshape(-1, router_input.shape[-1])
        return route(flat, self.router.weight, self.router.bias, self.top_k, self.scoring, self.renormalize,
                     self.top_p, self.min_k, self.gate_scale)

    def _straight_through_router_grad(self, x: Tensor, router_input: Tensor) -> Tensor:
        """Zero in value; its gradient gives the router what a sigmoid gate would get. Unit gates are the
        constant 1 (so all experts active stay the dense FFN), which alone leaves a router untrainable."""
        detached = [None if t is None else t.detach() for t in (self.w_in, self.b_in, self.w_out, self.b_out,
                                                                  self.const_experts)]
        w_in, b_in, w_out, b_out, const = detached
        soft = moe_op(x.detach(), router_input, self.router.weight, self.router.bias, w_in, b_in, w_out, b_out,
                      top_k=self.top_k, activation=self.activation, gated=self.gated, scoring="sigmoid",
                      renormalize=False, top_p=self.top_p, min_k=self.min_k, gate_scale=self.gate_scale,
                      num_zero=self.num_zero, num_copy=self.num_copy, const_experts=const)
        return soft - soft.detach()

    def _act(self, a: Tensor) -> Tensor:
        act = ACTIVATIONS[self.activation]
        return act(a[..., 0::2]) * a[..., 1::2] if self.gated else act(a)

    def extra_repr(self) -> str:
        return (f"hidden={self.hidden}, experts={self.num_experts}x{self.expert_width}, top_k={self.top_k}, "
                f"activation={self.activation}, gated={self.gated}, scoring={self.scoring}, "
                f"shared_width={self.shared_width}")
