"""Training-free corrections of a carved MoE layer on calibration data.

- ``compensate``: the experts a token skips still contribute their *mean* output on the tokens
  that skip them. Each expert gets output bias -c_e and the layer bias +sum_e c_e, so
  y = sum_e c_e + sum_{e kept} (f_e(x) - c_e): all experts kept still gives the dense FFN, and
  a skipped expert now costs its deviation from c_e instead of its whole output.
- ``refit``: with the routing fixed, the layer output is linear in the experts' output weights
  and biases, so a ridge least-squares fit to the dense FFN output on the calibration tokens
  solves for them in closed form (no gradient steps; the OBS / SparseGPT style of
  reconstruction, applied to MoEfication's experts). The ridge pulls towards the carved weights.
  Each token's error counts relative to its dense output's norm: the few tokens with massive
  FFN outputs (BERT's [SEP] and punctuation; Sun et al. 2024) would otherwise decide the fit,
  which in all-MiniLM-L6-v2's first layer costs more downstream than it gains. Its ridge strength
  can be chosen on held-out calibration sequences (``fit.validate``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from moefx.fit.validate import Fit, best
from moefx.layer import MoELayer
from moefx.op import activate


@torch.no_grad()
def dense_output(layer: MoELayer, x: Tensor, chunk: int = 4096) -> Tensor:
    """The layer's output on rows ``x`` with every routed expert at gate 1 (fp32): for a carved layer
    before any correction, exactly the dense FFN it was carved from."""
    outs = []
    for start in range(0, x.shape[0], chunk):
        rows = x[start:start + chunk].float()
        y = expert_outputs(layer, rows).sum(1)
        if layer.shared_in is not None:
            y = y + layer.shared_out(layer.shared_hidden(rows)).float()
        outs.append(y if layer.bias is None else y + layer.bias.float())
    return torch.cat(outs)


def expert_hidden(layer: MoELayer, x: Tensor) -> Tensor:
    """h of every routed expert: [T, E, expert_width]."""
    a = torch.einsum("th,efh->tef", x, layer.w_in.float())
    if layer.b_in is not None:
        a = a + layer.b_in.float()
    return activate(a, layer.activation, layer.gated)


def expert_outputs(layer: MoELayer, x: Tensor) -> Tensor:
    """f_e(x) of every routed expert, biases included: [T, E, H]."""
    out = torch.einsum("tef,ehf->teh", expert_hidden(layer, x), layer.w_out.float())
    return out if layer.b_out is None else out + layer.b_out.float()


def _ensure_expert_bias(layer: MoELayer) -> None:
    if layer.b_out is None:
        layer.b_out = torch.nn.Parameter(torch.zeros(layer.num_experts, layer.hidden, dtype=layer.w_out.dtype,
                                                     device=layer.w_out.device))
    if layer.bias is None:
        layer.bias = torch.nn.Parameter(torch.zeros(layer.hidden, dtype=layer.w_out.dtype, device=layer.w_out.device))


@torch.no_grad()
def compensate(layer: MoELayer, x: Tensor) -> None:
    """Give each expert its mean output over the calibration tokens that skip it as a standing bias."""
    _ensure_expert_bias(layer)
    skipped = (layer.expert_gates(x) == 0).float()                        # [T, E]
    outputs = expert_outputs(layer, x)                                  # [T, E, H]
    mean = torch.einsum("te,teh->eh", skipped, outputs) / skipped.sum(0).clamp(min=1)[:, None]
    layer.b_out -= mean.to(layer.b_out.dtype)
    layer.bias += mean.sum(0).to(layer.bias.dtype)


REFIT_RIDGES = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)


@torch.no_grad()
def refit(layer: MoELayer, x: Tensor, target: Tensor, held_out: Optional[Tensor] = None, ridge: float = 1e-2,
          chunk: int = 4096) -> Fit:
    """Least-squares fit of the output weights (shared and routed), the expert output biases and the
    layer bias so that the layer reproduces ``target`` (the dense FFN's output, ``dense_output``)
    on rows ``x`` under the layer's own routing, each row's error relative to its target's norm.

    ``held_out`` (bool [T], whole sequences, ``validate.held_out_split``): the ridge (relative to the
    Gram diagonal, towards the carved weights) is the one of ``REFIT_RIDGES`` whose fit on the other
    rows has the least error on the held-out rows, and the layer is then solved on all rows; without
    it, ``ridge``. Returns the fit, scored by the per-token relative error sqrt(mean_t ||out_t -
    target_t||^2 / ||target_t||^2)."""
    _ensure_expert_bias(layer)
    E, Fe, H = layer.num_experts, layer.expert_width, layer.hidden
    current = [layer.w_out.float().permute(0, 2, 1).reshape(E * Fe, H), layer.b_out.float(),
               layer.bias.float()[None]]
    if layer.shared_out is not None:
        current.insert(0, layer.shared_out.weight.float().T)
    w0 = torch.cat(current).double()
    held = torch.zeros(x.shape[0], dtype=torch.bool) if held_out is None else held_out
    fitted, validation = _Normal(w0.shape[0], H), _Normal(w0.shape[0], H)
    for start in range(0, x.shape[0], chunk):
        rows = target[start:start + chunk].float()
        weight = 1 / rows.norm(dim=1, keepdim=True).clamp(min=1e-6)
        features = _features(layer, x[start:start + chunk].float()) * weight
        side = held[start:start + chunk]
        fitted.add(features[~side], rows[~side] * weight[~side])
        validation.add(features[side], rows[side] * weight[side])
    fit = Fit("refit", "per-token relative error", 0.0, ridge)
    if held_out is not None:
        fit.grid = {r: validation.error(fitted.solve(r, w0)) for r in REFIT_RIDGES}
        fit.ridge = best(fit.grid, higher_is_better=False)
        fit.held_out = fit.grid[fit.ridge]
    fitted.merge(validation)
    solved = fitted.solve(fit.ridge, w0)
    offset = 0
    if layer.shared_out is not None:
        width = layer.shared_width
        layer.shared_out.weight.copy_(solved[:width].T)
        offset = width
    layer.w_out.copy_(solved[offset:offset + E * Fe].reshape(E, Fe, H).permute(0, 2, 1))
    layer.b_out.copy_(solved[offset + E * Fe:offset + E * Fe + E])
    layer.bias.copy_(solved[-1])
    fit.fitted = fitted.error(solved)
    return fit


class _Normal:
    """The normal equations of a weighted least-squares fit, accumulated over chunks of rows."""

    def __init__(self, unknowns: int, outputs: int):
        self.gram = torch.zeros(unknowns, unknowns, dtype=torch.float64)
        self.cross = torch.zeros(unknowns, outputs, dtype=torch.float64)
        self.squares = torch.zeros((), dtype=torch.float64)
        self.rows = 0

    def add(self, features: Tensor, target: Tensor) -> None:
        self.gram += (features.T @ features).double()
        self.cross += (features.T @ target).double()
        self.squares += target.double().pow(2).sum()
        self.rows += features.shape[0]

    def merge(self, other: "_Normal") -> None:
        self.gram += other.gram
        self.cross += other.cross
        self.squares += other.squares
        self.rows += other.rows

    def solve(self, ridge: float, prior: Tensor) -> Tensor:
        """The ridge solution pulled towards ``prior``, the ridge relative to the Gram diagonal."""
        scale = self.gram.diagonal().clamp(min=1e-12) * ridge
        return torch.linalg.solve(self.gram + torch.diag(scale), self.cross + scale[:, None] * prior)

    def error(self, solved: Tensor) -> float:
        """sqrt(sum of squared weighted residuals / rows): each row's target has norm 1 after weighting."""
        residual = (solved * (self.gram @ solved)).sum() - 2 * (solved * self.cross).sum() + self.squares
        return (residual.clamp(min=0) / max(self.rows, 1)).sqrt().item()


def _features(layer: MoELayer, x: Tensor) -> Tensor:
    """[T, Fs + E*Fe + E + 1]: shared h, routed h times the gate, gate per expert, constant 1."""
    gates = layer.expert_gates(x)
    routed = (expert_hidden(layer, x) * gates[..., None]).reshape(x.shape[0], -1)
    parts = [routed, gates, torch.ones(x.shape[0], 1)]
    if layer.shared_in is not None:
        parts.insert(0, layer.shared_hidden(x).float())
    return torch.cat(parts, 1)
