"""Routers for carved MoE layers.

- ``centroid`` (in ``carve``): an expert's score is the mean pre-activation of its neurons.
- ``representative`` (CMoE, Pei et al. 2025): an expert's score is the pre-activation of its
  most representative neuron, the one whose activation pattern is closest to the expert's mean.
- ``least_squares``: the closed-form ridge regression of the distilled router's 0/1 targets
  (below) on the router's input: a linear probe of which experts matter, no gradient steps.
- ``distilled``: a linear router trained on the calibration tokens to pick the experts whose
  contribution ||f_e(x)|| is largest (the oracle MoEfication compares against), by a binary
  cross-entropy on oracle membership plus a ranking margin; a few CPU seconds per layer.
- zero-computation experts (MoE++, Jin et al. 2024; LongCat-Flash): with Z = zero + copy + const
  experts beside E real ones, ``free_slots`` hands the weakest of a token's oracle slots to the
  zero-computation expert whose output (0, x, or a constant vector) is nearest to that slot's
  contribution, relative to the token's output, for the cheapest Z / (E + Z) of all slots (the
  share a balanced router gives the Z experts; fewer where copy/constant experts are all the token
  has and miss by more than zero would). Constant vectors are k-means centroids of the weakest
  slots' contributions.
The router stays one linear map, so every runtime (op, Triton, ONNX) serves it unchanged.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import Tensor

from moefx.layer import MoELayer
from moefx.fit.carve import gate_rows
from moefx.ffn import FFN
from moefx.fit.refit import dense_output, expert_output_norms, expert_outputs
from moefx.fit.validate import Fit, best

log = logging.getLogger("moefx")


@torch.no_grad()
def representative_router(layer: MoELayer, ffn: FFN, groups: list[Tensor], samples: Tensor) -> None:
    """CMoE: route by the pre-activation of each expert's neuron nearest its activation centroid.
    ``samples`` [tokens, F] are hidden activations of the dense FFN on calibration data."""
    rows = gate_rows(ffn)
    bias = ffn.gate_bias
    chosen = []
    for group in groups:
        pattern = samples[:, group].T.float()
        pattern = torch.nn.functional.normalize(pattern - pattern.mean(1, keepdim=True), dim=1)
        centre = torch.nn.functional.normalize(pattern.mean(0), dim=0)
        chosen.append(group[(pattern @ centre).argmax()])
    chosen = torch.stack(chosen)
    layer.router.weight.copy_(rows[chosen])
    if layer.router.bias is not None and bias is not None:
        layer.router.bias.copy_(bias[chosen])


def oracle_scores(layer: MoELayer, x: Tensor, chunk: int = 2048) -> Tensor:
    """[T, E] contribution ||f_e(x)|| of each routed expert (its biases included): the oracle router
    picks the top_k of these."""
    with torch.no_grad():
        return torch.cat([expert_output_norms(layer, x[s:s + chunk].float())
                          for s in range(0, x.shape[0], chunk)])


def distill_router(layer: MoELayer, x: Tensor, epochs: int = 30, batch: int = 512, lr: float = 3e-3,
                   seed: int = 0, min_steps: int = 300, router_input: Optional[Tensor] = None,
                   held_out: Optional[Tensor] = None, bias: bool = True) -> Fit:
    """Train the layer's linear router to select the oracle's top_k experts on rows ``x``.

    With zero-computation experts the targets come from ``free_slots`` (which also sets the constant
    experts' vectors). ``router_input``: rows the router reads instead of ``x``, row t the same token
    (pre-gating, Read-ME: the input of the block holding the layer). ``held_out`` (bool [T]): rows left
    out of training and scored after it (the router has no ridge to choose). ``bias`` False trains no
    router bias. Returns the router's recall of the target choice."""
    target = router_targets(layer, x, seed, router_input)
    inputs = x if router_input is None else router_input
    train = slice(None) if held_out is None else ~held_out
    recall = fit_router(layer, inputs[train], target[train], epochs, batch, lr, seed, min_steps, bias)
    if held_out is None:
        return Fit("router", "recall", recall)
    return Fit("router", "recall", recall, held_out=_recall(layer, inputs[held_out], target[held_out]))


ROUTER_RIDGES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


@torch.no_grad()
def least_squares_router(layer: MoELayer, x: Tensor, seed: int = 0, router_input: Optional[Tensor] = None,
                         held_out: Optional[Tensor] = None, ridge: float = 1e-3, bias: bool = True) -> Fit:
    """Set the router, in closed form, to the ridge least-squares map from the router's input rows to
    ``distill_router``'s 0/1 targets (without an intercept when ``bias`` is False); returns the recall of
    the targets by its top_k.

    ``held_out`` (bool [T], whole sequences, ``validate.held_out_split``): the ridge (relative to the
    Gram diagonal) is the one of ``ROUTER_RIDGES`` whose fit on the other rows recalls the held-out
    rows' targets best, and the router is then solved on all rows; without it, ``ridge``."""
    target = router_targets(layer, x, seed, router_input).double()
    inputs = x if router_input is None else router_input
    features = inputs.double()
    if bias:
        features = torch.cat([features, torch.ones(inputs.shape[0], 1, dtype=torch.float64)], 1)
    fit = Fit("router", "recall", 0.0, ridge)
    if held_out is not None:
        gram, cross = _normal_equations(features[~held_out], target[~held_out])
        for candidate in ROUTER_RIDGES:
            solved = _ridge_solve(gram, cross, candidate)
            fit.grid[candidate] = _top_k_recall(features[held_out] @ solved, target[held_out], layer.top_k)
        fit.ridge = best(fit.grid, higher_is_better=True)
        fit.held_out = fit.grid[fit.ridge]
    solved = _ridge_solve(*_normal_equations(features, target), fit.ridge)
    if bias:
        set_router(layer, solved[:-1].T, solved[-1])
    else:
        set_router(layer, solved.T, None)
    fit.fitted = _top_k_recall(features @ solved, target, layer.top_k)
    return fit


def _normal_equations(features: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    return features.T @ features, features.T @ target


def _ridge_solve(gram: Tensor, cross: Tensor, ridge: float) -> Tensor:
    return torch.linalg.solve(gram + ridge * torch.diag(gram.diagonal().clamp(min=1e-12)), cross)


def _top_k_recall(scores: Tensor, target: Tensor, k: int) -> float:
    """Share of the target's ones among each row's top-k ``scores``."""
    return (target.gather(1, scores.topk(k, -1).indices).sum() / target.sum().clamp(min=1)).item()


def _recall(layer: MoELayer, inputs: Tensor, target: Tensor) -> float:
    """Recall of ``target`` by the layer's router's top_k on ``inputs``."""
    with torch.no_grad():
        return _top_k_recall(layer.router(inputs.to(layer.router.weight.dtype)).float(), target, layer.top_k)


def router_targets(layer: MoELayer, x: Tensor, seed: int, router_input: Optional[Tensor]) -> Tensor:
    """[T, router rows] 0/1: the oracle's top_k experts of each FFN-input row of ``x``, with
    ``free_slots`` handing slots to zero-computation experts when the layer has them."""
    if router_input is not None and router_input.shape[0] != x.shape[0]:
        raise ValueError(f"moefx: {router_input.shape[0]} router-input rows for {x.shape[0]} FFN-input rows; the "
                         "router input must have one row per token the FFN sees")
    scores = oracle_scores(layer, x)
    rows, k = layer.router.out_features, min(layer.top_k, layer.num_experts)
    target = torch.zeros(scores.shape[0], rows).scatter_(1, scores.topk(k, -1).indices, 1.0)
    if rows > layer.num_experts:
        free_slots(layer, x, scores, target, seed)
    return target


@torch.no_grad()
def set_router(layer: MoELayer, weight: Tensor, bias: Optional[Tensor]) -> None:
    """Copy a fitted router's weight [rows, Hr] and bias [rows] in, giving the router a bias if it had none;
    ``bias`` None: no bias (a bias the router has is zeroed)."""
    router = layer.router
    if bias is None:
        router.weight.copy_(weight)
        if router.bias is not None:
            router.bias.zero_()
        return
    if router.bias is None:
        router.bias = torch.nn.Parameter(torch.zeros(router.out_features, dtype=router.weight.dtype,
                                                     device=router.weight.device))
    router.weight.copy_(weight)
    router.bias.copy_(bias)


def fit_router(layer: MoELayer, inputs: Tensor, target: Tensor, epochs: int = 30, batch: int = 512,
               lr: float = 3e-3, seed: int = 0, min_steps: int = 300, bias: bool = True) -> float:
    """Train every row of the layer's linear router on ``inputs`` [T, Hr] towards the multi-hot ``target``
    [T, rows] (binary cross-entropy plus a ranking margin), warm-started from the current router;
    returns the recall of ``target`` by the trained router's top_k. ``bias`` False: no router bias."""
    xf = inputs.float()
    # standardise the input so one learning rate suits every layer; folded back into w, b below (without a
    # bias only the scale is standardised: a centred input would need one)
    mean, std = xf.mean(0) if bias else xf.new_zeros(xf.shape[1]), xf.std(0).clamp(min=1e-6)
    z = (xf - mean) / std
    weight = layer.router.weight.detach().float()
    with torch.no_grad():
        w = (weight * std).clone()
        logits0 = z @ w.T
        w /= logits0.std().clamp(min=1e-6)
        b = torch.zeros(target.shape[1])
    w.requires_grad_(True)
    b.requires_grad_(bias)
    optimiser = torch.optim.Adam([w, b] if bias else [w], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    with torch.enable_grad():  # callers may convert under no_grad
        for _ in range(max(epochs, -(-min_steps * batch // xf.shape[0]))):
            for idx in torch.randperm(xf.shape[0], generator=generator).split(batch):
                _router_step(optimiser, z[idx], target[idx], w, b)
    with torch.no_grad():
        new_weight = w / std
        new_bias = b - new_weight @ mean
        set_router(layer, new_weight, new_bias if bias else None)
        return _top_k_recall(xf @ new_weight.T + new_bias, target, layer.top_k)


@torch.no_grad()
def free_slots(layer: MoELayer, x: Tensor, scores: Tensor, target: Tensor, seed: int = 0, chunk: int = 2048,
               fit_rows: int = 4096) -> float:
    """Move the cheapest Z / (E + Z) of the oracle's routed slots in ``target`` [T, E + Z] (multi-hot,
    top_k ones per row) to zero-computation experts; returns the share of slots moved.

    A token frees its slots weakest first (at most min(top_k, Z) of them, as each zero-computation
    expert is picked at most once per token). A freed slot goes to the unused zero-computation
    expert nearest its contribution f_e(x): zero (0), copy (x) or constant (c_j), a copy or
    constant only where it is nearer than 0 (so without zero experts fewer slots may be freed).
    The cost of freeing is that distance over the norm of the token's dense FFN output (absolute
    distances free the slots of small-output tokens first and lose more model quality), made
    non-decreasing along the token's slots so that the slots freed, the cheapest over all tokens,
    are each token's weakest."""
    E, k = layer.num_experts, layer.top_k
    num_zero, num_copy = layer.num_zero, layer.num_copy
    num_const = 0 if layer.const_experts is None else layer.const_experts.shape[0]
    Z = num_zero + num_copy + num_const
    m = min(k, Z)
    T = x.shape[0]
    weakest = scores.topk(k, -1).indices.flip(-1)[:, :m]
    if num_const:
        sample = torch.linspace(0, T - 1, min(T, fit_rows)).long()
        first = expert_outputs(layer, x[sample].float())[torch.arange(len(sample)), weakest[sample, 0]]
        layer.const_experts.copy_(_kmeans(first, num_const, seed))
    const = torch.zeros(0, layer.hidden) if layer.const_experts is None else layer.const_experts.float()
    cost = torch.empty(T, m)
    row = torch.empty(T, m, dtype=torch.long)
    for s in range(0, T, chunk):
        xs = x[s:s + chunk].float()
        n = xs.shape[0]
        outputs = expert_outputs(layer, xs)
        # relative to the token's FFN output: a miss matters as much as it turns the token's output
        scale = dense_output(layer, xs).norm(dim=-1).clamp(min=1e-12)
        zeros_used = torch.zeros(n, dtype=torch.long)
        copies_used = torch.zeros(n, dtype=torch.long)
        const_used = torch.zeros(n, num_const, dtype=torch.bool)
        for j in range(m):
            f = outputs[torch.arange(n), weakest[s:s + n, j]]
            options = torch.cat([f.norm(dim=-1)[:, None], (f - xs).norm(dim=-1)[:, None],
                                 torch.cdist(f, const)], 1)
            # a copy or constant that misses f_e(x) by more than 0 does is never worth its slot
            options[options > options[:, :1]] = float("inf")
            options[:, 0][zeros_used >= num_zero] = float("inf")
            options[:, 1][copies_used >= num_copy] = float("inf")
            options[:, 2:][const_used] = float("inf")
            cost[s:s + n, j], best = (options / scale[:, None]).min(1)
            const_row = E + num_zero + num_copy + best - 2
            row[s:s + n, j] = torch.where(best == 0, E + zeros_used,
                                          torch.where(best == 1, E + num_zero + copies_used, const_row))
            zeros_used += best == 0
            copies_used += best == 1
            if num_const:
                const_used[torch.arange(n), (best - 2).clamp(min=0)] |= best >= 2
    cost = cost.cummax(1).values
    # the cheapest slots over all tokens; stable over j-major order, so ties free a token's weaker slot first
    count = min(round(Z / (E + Z) * T * k), int(cost.isfinite().sum()))
    freed = torch.zeros(m * T, dtype=torch.bool)
    freed[cost.T.flatten().argsort(stable=True)[:count]] = True
    tokens, slots = freed.view(m, T).T.nonzero(as_tuple=True)
    target[tokens, weakest[tokens, slots]] = 0.0
    target[tokens, row[tokens, slots]] = 1.0
    log.debug("moefx: %d of %d routed slots go to zero-computation experts", count, T * k)
    return count / (T * k)


def _kmeans(points: Tensor, clusters: int, seed: int, iterations: int = 20) -> Tensor:
    """Centroids of ``points`` by Lloyd's k-means (the mean for one cluster)."""
    generator = torch.Generator().manual_seed(seed)
    start = torch.randperm(len(points), generator=generator)[torch.arange(clusters) % len(points)]
    centroids = points[start].clone()
    for _ in range(iterations):
        labels = torch.cdist(points, centroids).argmin(1)
        for c in range(len(centroids)):
            members = points[labels == c]
            if len(members):
                centroids[c] = members.mean(0)
    return centroids


def _router_step(optimiser, z: Tensor, picked: Tensor, w: Tensor, b: Tensor) -> None:
    logits = z @ w.T + b
    # ranking margin: the weakest chosen expert must beat the strongest skipped one
    weakest = (logits + 1e4 * (1 - picked)).min(-1).values
    strongest = (logits - 1e4 * picked).max(-1).values
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, picked) \
        + torch.relu(1 - weakest + strongest).mean()
    optimiser.zero_grad()
    loss.backward()
    optimiser.step()



# routers fitted to the oracle's choice on a layer's calibration rows:
# fit(layer, x, seed=, router_input=, held_out=, bias=) -> Fit (recall on all rows, and on the held-out ones)
FITTED_ROUTERS = {"least_squares": least_squares_router, "distilled": distill_router}
# "centroid" is set when carving (carve.carved_layer), "representative" from calibration statistics
ROUTERS = ("centroid", "representative", *FITTED_ROUTERS)
