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
- ``fit_gates``: router-weighted carving (Mixtral / Qwen-MoE gates, ``Recipe.gating``). The choice
  is the top_k of the logits whatever their scale; the scale (a temperature) sets how unequal the
  softmax / sigmoid gates are. ``fit_gates`` picks the temperature whose refit reproduces the dense
  FFN best on held-out calibration rows; near 0 the gates are uniform and the refit gives back the
  unit-gated layer, so the search includes (nearly) the unit-gated solution.
- ``uniform_gates``: with every routed expert active a zero router gives each expert the same gate
  (1/E for softmax or renormalised gates, 1/2 for sigmoid), and output weights divided by it give
  back the dense FFN exactly (E a power of two; within an ulp otherwise).
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import Tensor

from moefx.fit.validate import Fit, best
from moefx.layer import MoELayer
from moefx.op import activate

log = logging.getLogger("moefx")


@torch.no_grad()
def dense_output(layer: MoELayer, x: Tensor, chunk: int = 4096) -> Tensor:
    """The layer's output on rows ``x`` with every routed expert at gate 1 (fp32): for a carved layer
    before any correction, exactly the dense FFN it was carved from."""
    outs = []
    for start in range(0, x.shape[0], chunk):
        rows = x[start:start + chunk].float()
        h = expert_hidden(layer, rows)
        y = torch.einsum("tef,ehf->th", h, layer.w_out.float())  # the sum over experts, never [T, E, H]
        if layer.b_out is not None:
            y = y + layer.b_out.float().sum(0)
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


def expert_output_norms(layer: MoELayer, x: Tensor) -> Tensor:
    """[T, E] ||f_e(x)|| of every routed expert without forming the outputs: ||h W^T + b||^2 =
    h (W^T W) h^T + 2 h . (W^T b) + ||b||^2, an expert_width-square Gram per expert (a fraction of
    the output GEMM when experts are narrower than the model)."""
    h = expert_hidden(layer, x)                                         # [T, E, F]
    w = layer.w_out.float()                                             # [E, H, F]
    gram = torch.einsum("ehf,ehg->efg", w, w)
    squares = torch.einsum("tef,efg,teg->te", h, gram, h)
    if layer.b_out is not None:
        b = layer.b_out.float()
        squares = squares + 2 * torch.einsum("tef,ef->te", h, torch.einsum("ehf,eh->ef", w, b)) + b.pow(2).sum(-1)
    return squares.clamp(min=0).sqrt()


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
    # f_e is linear in h_e: the mean output over the skipping tokens is the output of their mean h_e
    hidden = torch.einsum("te,tef->ef", skipped, expert_hidden(layer, x))
    count = skipped.sum(0).clamp(min=1)
    mean = torch.einsum("ef,ehf->eh", hidden, layer.w_out.float()) / count[:, None]
    if layer.b_out is not None:
        mean = mean + layer.b_out.float() * (skipped.sum(0) / count)[:, None]
    layer.b_out -= mean.to(layer.b_out.dtype)
    layer.bias += mean.sum(0).to(layer.bias.dtype)


REFIT_RIDGES = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)


@torch.no_grad()
def refit(layer: MoELayer, x: Tensor, target: Tensor, held_out: Optional[Tensor] = None, ridge: float = 1e-2,
          chunk: int = 4096, biases: bool = True) -> Fit:
    """Least-squares fit of the output weights (shared and routed), the expert output biases and the
    layer bias so that the layer reproduces ``target`` (the dense FFN's output, ``dense_output``)
    on rows ``x`` under the layer's own routing and gate values, each row's error relative to its
    target's norm. ``biases`` False adds no bias the layer lacks (and fits only those it has).

    ``held_out`` (bool [T], whole sequences, ``validate.held_out_split``): the ridge (relative to the
    Gram diagonal, towards the carved weights) is the one of ``REFIT_RIDGES`` whose fit on the other
    rows has the least error on the held-out rows, and the layer is then solved on all rows; without
    it, ``ridge``. Returns the fit, scored by the per-token relative error sqrt(mean_t ||out_t -
    target_t||^2 / ||target_t||^2)."""
    if biases:
        _ensure_expert_bias(layer)
    E, Fe, H = layer.num_experts, layer.expert_width, layer.hidden
    current = [layer.w_out.float().permute(0, 2, 1).reshape(E * Fe, H)]
    current += [layer.b_out.float()] if layer.b_out is not None else []
    current += [layer.bias.float()[None]] if layer.bias is not None else []
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
    offset += E * Fe
    if layer.b_out is not None:
        layer.b_out.copy_(solved[offset:offset + E])
    if layer.bias is not None:
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
    """[T, Fs + E*Fe (+ E) (+ 1)]: shared h, routed h times the gate, the gate per expert (with expert output
    biases), constant 1 (with a layer bias)."""
    gates = layer.expert_gates(x)
    parts = [(expert_hidden(layer, x) * gates[..., None]).reshape(x.shape[0], -1)]
    parts += [gates] if layer.b_out is not None else []
    parts += [torch.ones(x.shape[0], 1)] if layer.bias is not None else []
    if layer.shared_in is not None:
        parts.insert(0, layer.shared_hidden(x).float())
    return torch.cat(parts, 1)


# logit spreads (std over calibration tokens and experts) ``fit_gates`` tries: 1e-3 is all but uniform gates
GATE_SPREADS = (1e-3, 0.25, 0.5, 1.0, 2.0)


@torch.no_grad()
def fit_gates(layer: MoELayer, x: Tensor, target: Tensor, biases: bool = True, held_out: Optional[Tensor] = None,
              search_rows: int = 8192) -> Fit:
    """Router-weighted carving: scale the fitted router's logits to each spread of ``GATE_SPREADS``, refit the
    output weights under the gates that gives, and keep the scale whose layer is closest to ``target`` on
    held-out rows (a sharper gate adds features the refit can overfit): the ``held_out`` sequences when
    given, else the second half of the first ``search_rows`` rows. Then refit under it on all rows
    (its ridge chosen on ``held_out``). Returns that refit."""
    router = layer.router
    if held_out is not None:
        fit_x, fit_t, val_x, val_t = x[~held_out], target[~held_out], x[held_out], target[held_out]
    else:
        rows = min(search_rows, x.shape[0])
        fit_x, fit_t, val_x, val_t = x[:rows // 2], target[:rows // 2], x[rows // 2:rows], target[rows // 2:rows]
    logits = router(x[:search_rows].to(router.weight.dtype)).float()[:, :layer.num_experts]
    spread = logits.std().clamp(min=1e-12).item()
    start = {name: p.detach().clone() for name, p in layer.named_parameters()}

    def refit_at(scale: float, rows: Tensor, goal: Tensor, held: Optional[Tensor] = None) -> Fit:
        for name, p in layer.named_parameters():
            if name in start:
                p.copy_(start[name])
        router.weight.mul_(scale)
        if router.bias is not None:
            router.bias[:layer.num_experts].mul_(scale)
        # the ridge pulls towards the carved weights at the mean gate's scale: the unit-gated starting point
        gates = layer.expert_gates(rows)
        mean_gate = gates.sum() / (gates != 0).sum().clamp(min=1)
        layer.w_out.div_(mean_gate)
        if layer.b_out is not None:
            layer.b_out.div_(mean_gate)
        return refit(layer, rows, goal, held_out=held, biases=biases)

    def held_out_error(spread_wanted: float) -> float:
        refit_at(spread_wanted / spread, fit_x, fit_t)
        want = val_t.float()
        return ((layer(val_x).float() - want).norm() / want.norm()).item()

    errors = {s: held_out_error(s) for s in GATE_SPREADS}
    chosen_spread = min(errors, key=errors.get)
    log.debug("moefx: gate logit spreads %s -> held-out errors %s", GATE_SPREADS,
              [round(e, 4) for e in errors.values()])
    return refit_at(chosen_spread / spread, x, target, held_out)


@torch.no_grad()
def uniform_gates(layer: MoELayer) -> None:
    """Every routed expert active with router-weighted gates: a zero router gives each the same gate g, and
    output weights divided by g make the layer the dense FFN again."""
    E = layer.num_experts
    layer.router.weight[:E] = 0
    if layer.router.bias is not None:
        layer.router.bias[:E] = 0
    gates, _ = layer.routing(torch.zeros(1, layer.router.in_features, dtype=layer.router.weight.dtype))
    inverse = 1 / gates[0, 0].item()
    layer.w_out.mul_(inverse)
    if layer.b_out is not None:
        layer.b_out.mul_(inverse)
