"""First-order Taylor importance of FFN neurons (Dense2MoE; Molchanov et al. 2019; LLaMA-MoE's
gradient-based split): importance_j = sum over calibration tokens of |dL/dh_j * h_j|, the
first-order change of the loss L when neuron j is removed.

L is the model's own loss when its output carries one (a batch with labels). Otherwise it is
the random projection L = sum_t <r_t, y_t> of the model's output y with r_t ~ N(0, I) drawn
afresh per batch: then E|dL/dh_j * h_j| is proportional to ||J_j h_j||, the size of the change of
the whole output when neuron j is zeroed, so no labels are needed.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn
from moefx.runtime import hooks, output_tensor, token_mask


def taylor_importance(targets: dict[str, nn.Module], batches: list, run: Callable[[Any], Any],
                      seed: int = 0) -> dict[str, Tensor]:
    """[F] importance per FFN; ``targets`` maps an FFN's name to its output Linear (input h)."""
    hidden: dict[str, Tensor] = {}
    totals: dict[str, Tensor] = {}

    def capture(name):
        def hook(module, args):
            h = args[0].detach().requires_grad_(True)  # a leaf: dL/dh without gradients upstream of h
            hidden[name] = h
            return (h, *args[1:])
        return hook

    generator = torch.Generator().manual_seed(seed)
    with hooks(*(lambda m=module, n=n: m.register_forward_pre_hook(capture(n)) for n, module in targets.items())):
        with torch.enable_grad():
            for index, batch in enumerate(batches):
                hidden.clear()
                loss = _loss(run(batch), batch, generator)
                names = list(hidden)
                grads = torch.autograd.grad(loss, [hidden[n] for n in names], allow_unused=True)
                for name, grad in zip(names, grads):
                    if grad is None:
                        continue
                    score = (grad * hidden[name]).detach().abs().reshape(-1, grad.shape[-1]).sum(0).double()
                    totals[name] = score if name not in totals else totals[name] + score
    missing = [name for name in targets if name not in totals]
    if missing:
        raise ValueError(f"moefx: importance='taylor' found no gradient path from the model output to {missing[0]}; "
                         "use importance='activation'")
    return {name: total.float() for name, total in totals.items()}


def _loss(output: Any, batch: Any, generator: torch.Generator) -> Tensor:
    loss = getattr(output, "loss", None)
    if isinstance(loss, Tensor) and loss.dim() == 0:
        return loss
    y = output_tensor(output)
    probe = torch.randn(y.shape, generator=generator).to(y)
    mask = token_mask(batch, y.shape)
    if mask is not None:  # padding rows feed no one
        probe = probe * mask.reshape(*mask.shape, *(1,) * (y.dim() - mask.dim())).to(y)
    return (probe * y).sum()
