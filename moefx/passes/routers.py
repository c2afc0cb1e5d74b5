"""Routers for carved MoE layers.

- ``centroid`` (in ``carve``): an expert's score is the mean pre-activation of its neurons.
- ``representative`` (CMoE, Pei et al. 2025): an expert's score is the pre-activation of its
  most representative neuron, the one whose activation pattern is closest to the expert's mean.
- ``distilled``: a linear router trained on the calibration tokens to pick the experts whose
  contribution ||f_e(x)|| is largest (the oracle MoEfication compares against), by a binary
  cross-entropy on oracle membership plus a ranking margin; a few CPU seconds per layer.
The router stays one linear map, so every runtime (op, Triton, ONNX) serves it unchanged.
"""
from __future__ import annotations

import torch
from torch import Tensor

from moefx.layer import MoELayer
from moefx.passes.carve import gate_rows
from moefx.passes.find_ffn import FFN
from moefx.passes.refit import expert_outputs

ROUTERS = ("centroid", "representative", "distilled")


@torch.no_grad()
def representative_router(layer: MoELayer, ffn: FFN, groups: list[Tensor], samples: Tensor) -> None:
    """CMoE: route by the pre-activation of each expert's neuron nearest its activation centroid.
    ``samples`` [tokens, F] are hidden activations of the dense FFN on calibration data."""
    rows = gate_rows(ffn)
    bias = None if ffn.b_in is None else (ffn.b_in[0::2] if ffn.gated else ffn.b_in)
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
        return torch.cat([expert_outputs(layer, x[s:s + chunk].float()).norm(dim=-1)
                          for s in range(0, x.shape[0], chunk)])


def distill_router(layer: MoELayer, x: Tensor, epochs: int = 30, batch: int = 512, lr: float = 3e-3,
                   seed: int = 0, min_steps: int = 300) -> float:
    """Train the layer's linear router to select the oracle's top_k experts on rows ``x``.

    Returns the router's recall of the oracle choice on ``x`` after training."""
    scores = oracle_scores(layer, x)
    E, k = layer.num_experts, min(layer.top_k, layer.num_experts)
    target = torch.zeros_like(scores).scatter_(1, scores.topk(k, -1).indices, 1.0)
    xf = x.float()
    # standardise the input so one learning rate suits every layer; folded back into w, b below
    mean, std = xf.mean(0), xf.std(0).clamp(min=1e-6)
    z = (xf - mean) / std
    weight = layer.router.weight[:E].detach().float()
    with torch.no_grad():
        w = (weight * std).clone()
        logits0 = z @ w.T
        w /= logits0.std().clamp(min=1e-6)
        b = torch.zeros(E)
    w.requires_grad_(True)
    b.requires_grad_(True)
    optimiser = torch.optim.Adam([w, b], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    with torch.enable_grad():  # callers may convert under no_grad
        for _ in range(max(epochs, -(-min_steps * batch // x.shape[0]))):
            for idx in torch.randperm(x.shape[0], generator=generator).split(batch):
                _router_step(optimiser, z[idx], target[idx], w, b)
    with torch.no_grad():
        new_weight = w / std
        new_bias = b - new_weight @ mean
        layer.router.weight[:E].copy_(new_weight)
        if layer.router.bias is None:
            layer.router.bias = torch.nn.Parameter(torch.zeros(layer.router.out_features, dtype=layer.router.weight.dtype,
                                                               device=layer.router.weight.device))
        layer.router.bias[:E].copy_(new_bias)
        chosen = (xf @ new_weight.T + new_bias).topk(k, -1).indices
        hits = target.gather(1, chosen).sum()
    return (hits / target.sum()).item()


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
