"""End-to-end knowledge distillation of a converted model against the dense one.

The MoE layers' parameters (experts, shared experts, biases and routers) are trained so that the
converted model's output matches the dense model's on the calibration inputs (Hinton et al.
2015, as LLaMA-MoE and Dense2MoE do after building experts); everything else stays frozen. The
gradient reaches the experts through the op's analytic backward. Unit-gated carved layers weight
experts by the constant 1, so ``MoELayer`` passes their router a straight-through sigmoid-gate
gradient while training (router-weighted ones get the gates' own gradient); a Switch-Transformer
load-balancing loss (Fedus et al. 2022) keeps the experts' shares of the tokens even. A few
calibration batches make many epochs, so training is early-stopped on held-out batches and keeps
its best state.

The objective follows the model's output. A causal language model (an output with ``logits``) is
trained on its next-token distribution: KL(dense || MoE) against the dense model's ``TEACHER_TOP``
most likely tokens per position plus one bucket for the rest of the vocabulary (sparse logit
distillation, as in MiniLLM/Minitron recovery runs; the full teacher distribution would not fit in
memory), which is the figure a converted LM is judged by. Other models match the output tensor
(relative squared error).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from moefx.layer import MoELayer
from moefx.runtime import call_model, hooks, logits_of, output_tensor, read_batches, token_mask


@dataclass
class DistillReport:
    """What ``distill`` did: the steps run and why it stopped, and the relative output error on the held-out
    batches (``held_out``, indices into the data) along the way. The model keeps its best state, so
    ``error_after`` (the error at ``best_step``, 0 = untrained) is never above ``error_before``."""

    steps: int
    seconds: float
    error_before: float
    error_after: float
    best_step: int
    stopped: str                                   # "steps", "max_seconds" or "patience"
    held_out: list[int]                            # the batches never trained on (empty: too few batches)
    curve: list[tuple[int, float]] = field(default_factory=list)   # (step, held-out error)
    losses: list[float] = field(default_factory=list)              # training loss per step
    objective: str = "output"

    def __str__(self) -> str:
        on = f"{len(self.held_out)} held-out batches" if self.held_out else "the training batches (too few to hold out)"
        curve = " ".join(f"{step}:{error:.4f}" for step, error in self.curve)
        measure = "next-token KL(dense || MoE)" if self.objective == "kl" else "relative output error"
        return (f"distilled {self.steps} steps in {self.seconds:.0f} s (stopped by {self.stopped}); {measure} "
                f"on {on} {self.error_before:.4f} -> {self.error_after:.4f} (best state, step "
                f"{self.best_step}); curve {curve}")


TEACHER_TOP = 64  # next-token log-probabilities kept per position of a language model's teacher


@dataclass
class TopTokens:
    """A language model's next-token distribution, sparsely: the ``TEACHER_TOP`` largest log-probabilities
    ``logp`` [..., K] and their token ``ids``."""

    logp: Tensor
    ids: Tensor


def teacher_outputs(run: Callable[[Any], Any], batches: list) -> list:
    """The distillation target on every calibration batch: a language model's ``TopTokens``, else the
    dense model's output tensor."""
    targets = []
    with torch.no_grad():
        for batch in batches:
            output = run(batch)
            logits = logits_of(output)
            if logits is None:
                targets.append(output_tensor(output).detach().float())
            else:
                top = torch.log_softmax(logits.float(), -1).topk(min(TEACHER_TOP, logits.shape[-1]), -1)
                targets.append(TopTokens(top.values, top.indices))
    return targets


def next_token_kl(student_logits: Tensor, teacher: TopTokens, mask: Optional[Tensor]) -> Tensor:
    """Mean over real positions of KL(teacher || student) on the teacher's top tokens plus one bucket holding
    the rest of the vocabulary (>= 0; 0 iff the student matches those K + 1 probabilities)."""
    logp = torch.log_softmax(student_logits.float(), -1).gather(-1, teacher.ids)
    p = teacher.logp.exp()
    kl = (p * (teacher.logp - logp)).sum(-1)
    rest_teacher = (1 - p.sum(-1)).clamp(min=1e-12)
    rest_student = (1 - logp.exp().sum(-1)).clamp(min=1e-12)
    kl = kl + rest_teacher * (rest_teacher.log() - rest_student.log())
    if mask is not None:
        kl = kl[mask]
    return kl.mean()


def distillation_loss(output: Any, target, batch: Any) -> Tensor:
    """The objective for one batch: ``next_token_kl`` for a language model's ``TopTokens``, else
    ``output_error``."""
    if isinstance(target, TopTokens):
        logits = logits_of(output)
        return next_token_kl(logits, target, token_mask(batch, logits.shape))
    out = output_tensor(output)
    return output_error(out, target, token_mask(batch, out.shape))


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


SCHEDULES = ("cosine", "linear", "constant")


def distill(moe: nn.Module, dense: nn.Module, data: Iterable[Any], *, steps: int = 200, lr: float = 1e-4,
            balance: float = 1e-2, experts: bool = True, seed: int = 0, progress: bool = True,
            schedule: str = "cosine", held_out: float = 0.2, eval_every: Optional[int] = None,
            patience: Optional[int] = None, max_seconds: Optional[float] = None) -> DistillReport:
    """Train the MoE layers of the converted ``moe`` in place so that its output matches ``dense``'s on
    ``data`` (model inputs, as ``convert``'s calibration), one batch per step, and keep the best state.

    One Adam optimiser runs all ``steps``, its learning rate warmed up over the first 5% of them and
    then decayed to 0 by ``schedule`` ('cosine', 'linear' or 'constant'). A share ``held_out`` of the
    batches (at least one when there are two) is never trained on: the output error on them is
    measured before training and every ``eval_every`` steps (default: once per pass over the training
    batches), and the model ends in the state of the lowest such error, the start included, so it
    never ends worse on them than it started. Training stops after ``steps``, after ``max_seconds``,
    or after ``patience`` measurements without improvement. ``experts=False`` trains the routers only.
    Returns a ``DistillReport`` with the held-out curve."""
    batches = read_batches(data, "moefx.distill", "data")
    targets = teacher_outputs(lambda b: call_model(dense, b), batches)
    return train_moe_layers(moe, lambda b: call_model(moe, b), batches, targets, steps=steps, lr=lr, balance=balance,
                            experts=experts, seed=seed, progress=progress, schedule=schedule, held_out=held_out,
                            eval_every=eval_every, patience=patience, max_seconds=max_seconds)


def train_moe_layers(model: nn.Module, run: Callable[[Any], Any], batches: list, targets: list, *, steps: int,
                     lr: float, balance: float, experts: bool, seed: int, progress: bool, schedule: str = "cosine",
                     held_out: float = 0.2, eval_every: Optional[int] = None, patience: Optional[int] = None,
                     max_seconds: Optional[float] = None) -> DistillReport:
    """``distill`` on ``targets``, the output tensors ``run(batch)`` should give (see ``distill``)."""
    _check(steps, lr, balance, schedule, held_out, eval_every, patience, max_seconds)
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    if not layers:
        raise ValueError("moefx.distill: the model has no MoELayer; convert it first with moefx.convert")
    held = _held_out_batches(len(batches), held_out, seed)
    train = [i for i in range(len(batches)) if i not in held]
    check = held or train
    every = eval_every or len(train)
    trained = [p for layer in layers for name, p in layer.named_parameters()
               if experts or name.startswith("router.")]
    frozen = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    inputs: dict[MoELayer, Tensor] = {}
    keep_input = [lambda layer=layer: layer.register_forward_pre_hook(lambda mod, args: inputs.__setitem__(mod, args[0]))
                  for layer in layers]
    start = time.perf_counter()

    def held_out_error() -> float:
        for layer in layers:
            layer.eval()
        error = _mean_error(run, [batches[i] for i in check], [targets[i] for i in check])
        for layer in layers:
            layer.train()  # the straight-through router gradient of unit gates
        return error

    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in trained:
            p.requires_grad_(True)
        model.eval()  # dropout stays off: the targets come from the dense model in eval mode
        before = held_out_error()
        curve, best = [(0, before)], (before, 0, [p.detach().clone() for p in trained])
        optimiser = torch.optim.Adam(trained, lr=lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, _schedule(schedule, steps))
        order = torch.Generator().manual_seed(seed)
        losses, stopped, step = [], "steps", 0
        bar = tqdm(total=steps, desc="moefx distill", disable=not progress)
        with hooks(*keep_input), torch.enable_grad(), bar:
            for step in range(1, steps + 1):
                i = train[int(torch.randint(len(train), (1,), generator=order))]
                loss = distillation_loss(run(batches[i]), targets[i], batches[i])
                if balance:
                    imbalance = sum(balance_loss(layer, inputs[layer]) - 1 for layer in layers) / len(layers)
                    loss = loss + balance * imbalance
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                scheduler.step()
                losses.append(loss.item())
                bar.update(1)
                out_of_time = max_seconds is not None and time.perf_counter() - start >= max_seconds
                if step % every == 0 or step == steps or out_of_time:
                    with torch.no_grad():
                        curve.append((step, held_out_error()))
                    if curve[-1][1] < best[0]:
                        best = (curve[-1][1], step, [p.detach().clone() for p in trained])
                    elif patience is not None and step - best[1] >= patience * every:
                        stopped = "patience"
                        break
                if out_of_time:
                    stopped = "max_seconds"
                    break
        with torch.no_grad():
            for p, value in zip(trained, best[2]):
                p.copy_(value)
        for layer in layers:
            layer.eval()
    finally:
        for p, flag in frozen.items():
            p.requires_grad_(flag)
        model.train(was_training)
    objective = "kl" if isinstance(targets[0], TopTokens) else "output"
    return DistillReport(step, time.perf_counter() - start, before, best[0], best[1], stopped, held, curve, losses,
                         objective)


def _check(steps, lr, balance, schedule, held_out, eval_every, patience, max_seconds) -> None:
    if steps < 1 or lr <= 0 or balance < 0:
        raise ValueError(f"moefx.distill: needs steps >= 1, lr > 0 and balance >= 0; got steps={steps}, lr={lr}, "
                         f"balance={balance}")
    if schedule not in SCHEDULES:
        raise ValueError(f"moefx.distill: schedule={schedule!r} is not one of {SCHEDULES}")
    if not 0 <= held_out < 1:
        raise ValueError(f"moefx.distill: held_out={held_out} is the share of batches kept out of training to pick "
                         "the best state; pick it in [0, 1) (0.2 by default)")
    if (eval_every is not None and eval_every < 1) or (patience is not None and patience < 1) \
            or (max_seconds is not None and max_seconds <= 0):
        raise ValueError(f"moefx.distill: eval_every={eval_every} and patience={patience} must be whole numbers >= 1 "
                         f"and max_seconds={max_seconds} > 0 (or None for no limit)")


def _held_out_batches(count: int, share: float, seed: int) -> list[int]:
    """Indices of about ``share`` of ``count`` batches (at least one when share > 0 and count >= 2, and
    at least one batch left to train on), drawn with ``seed``."""
    held = min(max(round(share * count), 1 if share > 0 else 0), count - 1)
    return sorted(torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:held].tolist())


def _schedule(kind: str, steps: int) -> Callable[[int], float]:
    """The learning-rate factor after each step: linear warm-up over 5% of the steps, then ``kind`` to 0."""
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1 - progress if kind == "linear" else 1.0
    return factor


def _mean_error(run, batches, targets) -> float:
    with torch.no_grad():
        errors = [distillation_loss(run(batch), target, batch).item() for batch, target in zip(batches, targets)]
    return sum(errors) / len(errors)
