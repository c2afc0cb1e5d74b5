"""Reference routings that bound what any router could do with a converted model's experts.

- ``oracle_routing``: each MoE layer runs, per token, the ``top_k`` routed experts of largest true
  output norm ||f_e(x)|| (the oracle MoEfication measures its routers against): the best any router
  choosing among these experts can do, so the gap to it is the router's loss and the rest the carving's.
- ``neuron_top_k``: the dense FFN keeps, per token, the ``share`` of its neurons of largest contribution
  |h_j| * ||W_out[:, j]|| (TEAL / CATS-style magnitude selection at the neuron level): what the same
  active share costs with experts of one neuron and a perfect choice.
Both are context managers for evaluation (they compute every expert or neuron: no speed-up).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn

from moefx.fit.refit import expert_outputs
from moefx.layer import MoELayer
from moefx.runtime import hooks


def _oracle_forward(layer: MoELayer, x: Tensor, router_input=None) -> Tensor:
    if layer.scoring != "unit" or layer.router.out_features != layer.num_experts:
        raise ValueError("moefx: oracle routing scores unit-gated layers without zero-computation experts; "
                         f"this layer has scoring={layer.scoring!r} and {layer.router.out_features - layer.num_experts} "
                         "zero-computation experts")
    shape = x.shape
    flat = x.reshape(-1, shape[-1]).float()
    outputs = expert_outputs(layer, flat)                                   # [T, E, H]
    chosen = outputs.norm(dim=-1).topk(min(layer.top_k, layer.num_experts), -1).indices
    y = outputs.gather(1, chosen[..., None].expand(-1, -1, outputs.shape[-1])).sum(1)
    if layer.shared_in is not None:
        y = y + layer.shared_out(layer.shared_hidden(flat)).float()
    if layer.bias is not None:
        y = y + layer.bias.float()
    return y.to(x.dtype).reshape(shape)


@contextlib.contextmanager
def oracle_routing(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every ``MoELayer`` of ``model`` routes each token to its oracle experts."""
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    if not layers:
        raise ValueError("moefx: oracle_routing needs a converted model (it holds no MoELayer)")
    with hooks(*(lambda layer=layer: layer.register_forward_hook(
            lambda mod, args, out: _oracle_forward(mod, *args)) for layer in layers)):
        yield model


@contextlib.contextmanager
def neuron_top_k(dense: nn.Module, output_linears: list[str], share: float) -> Iterator[nn.Module]:
    """Within the block, each dense FFN whose output Linear is named in ``output_linears`` (e.g. the
    ``dense_output`` of a conversion report's layers) keeps per token only the ``share`` of its hidden
    neurons of largest |h_j| * ||W_out[:, j]||."""
    if not 0 < share <= 1:
        raise ValueError(f"moefx: neuron_top_k share={share} must be in (0, 1]")

    def keep_top(module: nn.Linear, args):
        h = args[0]
        k = max(1, round(share * h.shape[-1]))
        score = h.abs() * module.weight.norm(dim=0)
        kept = torch.zeros_like(h).scatter_(-1, score.topk(k, -1).indices, 1.0)
        return (h * kept, *args[1:])

    modules = [dense.get_submodule(name) for name in output_linears]
    with hooks(*(lambda m=m: m.register_forward_pre_hook(keep_top) for m in modules)):
        yield dense
