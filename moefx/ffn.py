"""``FFN``: one dense FFN that ``moefx.convert`` found in a traced graph, with its weights.

The unit of conversion (MoEfication): the graph side (``convert/find.py``) builds it, the
numerical side (``fit/``) carves experts from its weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx
from torch import Tensor, nn


@dataclass
class FFN:
    """One dense FFN found in a piece's graph, with its weights in nn.Linear layout."""

    piece: str                 # qualified name of the traced module that holds it
    name: str                  # qualified name of the output Linear (how the FFN is reported)
    input_node: fx.Node
    output_node: fx.Node
    nodes: list[fx.Node]       # every node the MoE layer replaces
    out_module: nn.Module      # the output Linear: its input is the FFN's hidden activation
    in_maps: list[tuple[Tensor, Optional[Tensor]]]  # (W [F, H], b) of the input Linear, or of gate and up
    w_out: Tensor              # [H, F]
    b_out: Optional[Tensor]
    activation: str
    gated: bool

    @property
    def w_in(self) -> Tensor:
        """[F, H], or gated: [2F, H] with gate/up rows interleaved (a new tensor when gated)."""
        if not self.gated:
            return self.in_maps[0][0]
        (w_gate, _), (w_up, _) = self.in_maps
        return torch.stack([w_gate, w_up], 1).reshape(-1, w_gate.shape[1])

    @property
    def b_in(self) -> Optional[Tensor]:
        if not self.gated:
            return self.in_maps[0][1]
        (w_gate, b_gate), (w_up, b_up) = self.in_maps
        if b_gate is None and b_up is None:
            return None
        return torch.stack([_or_zeros(b_gate, w_gate), _or_zeros(b_up, w_up)], 1).reshape(-1)

    @property
    def gate_bias(self) -> Optional[Tensor]:
        """[F] the input bias of the rows that decide whether a neuron fires (the gate rows when gated)."""
        b_in = self.b_in
        return None if b_in is None else b_in[0::2] if self.gated else b_in

    @property
    def width(self) -> int:
        return self.w_out.shape[1]

    @property
    def hidden(self) -> int:
        return self.w_out.shape[0]


def _or_zeros(bias: Optional[Tensor], weight: Tensor) -> Tensor:
    return bias if bias is not None else weight.new_zeros(weight.shape[0])
