"""End-to-end knowledge distillation of a converted model against the dense one.

The MoE layers' parameters (experts, shared experts, biases and routers) are trained so that the
converted model's output matches the dense model's on the calibration inputs (Hinton et al.
2015, as LLaMA-MoE and Dense2MoE do after building experts); everything else stays frozen. The
gradient reaches the experts through the op's analytic backward. Unit-gated carved layers weight
experts by the constant 1, so ``MoELayer`` passes their router a straight-through sigmoid-gate
gradient while training (router-weighted ones get the gates' own gradient); a Switch-Transformer load-balancing loss
(Fedus et al. 2022) keeps the experts' shares of the tokens even.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from moefx.layer import MoELayer
from moefx.runtime import call_model, hooks, output_tensor, token_mask


@dataclass
class DistillReport:
    """What ``distill`` did: steps run, seconds, and the relative output error before and after."""

    steps: int
    seconds: float
    error_before: float
    error_after: float
    losses: list[float] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"distilled {self.steps} steps in {self.seconds:.0f} s: relative output error "
                f"{self.error_before:.4f} -> {self.error_after:.4f}")


def teacher_outputs(run: Callable[[Any], Any], batches: list) -> list[Tensor]:
    """The dense model's output tensor on every calibration batch (the distillation targets)."""
    with torch.no_grad():
        return [output_tensor(run(batch)).detach().float() for batch in batches]


def output_error(student: Tensor, teacher: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Squared error of each real token over the teacher's mean squared norm, averaged."""
    diff = (student.float() - teacher).pow(2)
    scale = teacher.pow(2)
    if mask is not None:
        diff, scale = diff[mask], scale[mask]
    return diff.sum() / scale.sum().clamp(min=1e-12)


def balance_loss(layer: MoELayer, x: Tensor) -> Tensor:
    """Switch Transformer's auxiliary loss E * sum_e f_e * P_e over the real experts: f_e the share of
    routing slots expert e gets, P_e its mean softmax router probability; 1 when balanced."""
    E = layer.num_experts
    logits = layer.router(x.reshape(-1, x.shape[-1]).to(layer.router.weight.dtype)).float()[:, :E]
    chosen = logits.topk(min(layer.top_k, E), -1).indices
    share = torch.zeros(E).index_add_(0, chosen.flatten(), torch.ones(chosen.numel())) / chosen.numel()
    return E * (share * logits.softmax(-1).mean(0)).sum()


def distill(moe: nn.Module, dense: nn.Module, data: Iterable[Any], *, steps: int = 200, lr: float = 1e-4,
            balance: float = 1e-2, experts: bool = True, seed: int = 0, progress: bool = True) -> DistillReport:
    """Train the MoE layers of the converted ``moe`` in place so that its output matches ``dense``'s on
    ``data`` (model inputs, as ``convert``'s calibration): ``steps`` Adam steps of one batch each.
    ``experts=False`` trains the routers only. Returns the steps, seconds and output error before/after."""
    batches = list(data)
    if not batches:
        raise ValueError("moefx.distill: data is empty; pass the calibration batches (model inputs)")
    targets = teacher_outputs(lambda b: call_model(dense, b), batches)
    return train_moe_layers(moe, lambda b: call_model(moe, b), batches, targets, steps=steps, lr=lr, balance=balance,
                            experts=experts, seed=seed, progress=progress)


def train_moe_layers(model: nn.Module, run: Callable[[Any], Any], batches: list, targets: list[Tensor], *, steps: int,
                     lr: float, balance: float, experts: bool, seed: int, progress: bool) -> DistillReport:
    """Train the MoE layers of ``model`` for ``steps`` Adam steps (one batch each) so that the output
    tensor of ``run(batch)`` matches ``targets``; with ``experts=False`` only the routers learn."""
    if steps < 1 or lr <= 0 or balance < 0:
        raise ValueError(f"moefx.distill: needs steps >= 1, lr > 0 and balance >= 0; got steps={steps}, lr={lr}, "
                         f"balance={balance}")
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    if not layers:
        raise ValueError("moefx.distill: the model has no MoELayer; convert it first with moefx.convert")
    trained = [p for layer in layers for name, p in layer.named_parameters()
               if experts or name.startswith("router.")]
    frozen = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    inputs: dict[MoELayer, Tensor] = {}
    keep_input = [lambda layer=layer: layer.register_forward_pre_hook(lambda mod, args: inputs.__setitem__(mod, args[0]))
                  for layer in layers]
    start = time.perf_counter()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in trained:
            p.requires_grad_(True)
        model.eval()  # dropout stays off: the targets come from the dense model in eval mode
        for layer in layers:
            layer.train()  # the straight-through router gradient of unit gates
        before = _mean_error(run, batches, targets)
        optimiser = torch.optim.Adam(trained, lr=lr)
        order = torch.Generator().manual_seed(seed)
        losses = []
        bar = tqdm(total=steps, desc="moefx distill", disable=not progress)
        with hooks(*keep_input), torch.enable_grad(), bar:
            for step in range(steps):
                i = int(torch.randint(len(batches), (1,), generator=order))
                out = output_tensor(run(batches[i]))
                loss = output_error(out, targets[i], token_mask(batches[i], out.shape))
                if balance:
                    imbalance = sum(balance_loss(layer, inputs[layer]) - 1 for layer in layers) / len(layers)
                    loss = loss + balance * imbalance
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                losses.append(loss.item())
                bar.update(1)
        for layer in layers:
            layer.eval()
        after = _mean_error(run, batches, targets)
    finally:
        for p, flag in frozen.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return DistillReport(steps, time.perf_counter() - start, before, after, losses)


def _mean_error(run, batches, targets) -> float:
    with torch.no_grad():
        errors = []
        for batch, target in zip(batches, targets):
            out = output_tensor(run(batch))
            errors.append(output_error(out, target, token_mask(batch, out.shape)).item())
    return sum(errors) / len(errors)
