"""Per-FFN statistics of the hidden activations on calibration data (CMoE, MoEfication).

Collected by hooks on each FFN's output Linear, whose input is the hidden activation h, so a
calibration forward keeps only running sums and a bounded token sample per FFN, never the
activations of all layers at once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree


@dataclass
class HiddenStats:
    """Running statistics of one FFN's hidden activation h [tokens, F]."""

    width: int
    sample_limit: int
    tokens: int = 0
    active_count: Optional[Tensor] = None     # [F] tokens where |h_j| exceeds the token's mean |h|
    abs_sum: Optional[Tensor] = None          # [F] sum of |h_j|
    sample: list[Tensor] = field(default_factory=list)  # rows of h, at most sample_limit in all

    def add(self, h: Tensor, where: str) -> None:
        h = h.detach().reshape(-1, self.width).float()
        if not torch.isfinite(h).all():
            raise ValueError(f"moefx: the calibration activations of {where} contain NaN or inf; check the batch "
                             "(and the model in fp32) before converting")
        magnitude = h.abs()
        active = (magnitude > magnitude.mean(-1, keepdim=True)).sum(0)
        self.active_count = active if self.active_count is None else self.active_count + active
        total = magnitude.sum(0)
        self.abs_sum = total if self.abs_sum is None else self.abs_sum + total
        room = self.sample_limit - sum(len(s) for s in self.sample)
        if room > 0:
            self.sample.append(h[:room].to(torch.bfloat16))  # for clustering only: half the memory
        self.tokens += h.shape[0]

    @property
    def activation_rate(self) -> Tensor:
        return self.active_count / max(self.tokens, 1)

    @property
    def samples(self) -> Tensor:
        return torch.cat(self.sample).float()


def collect_hidden_stats(targets: dict[str, nn.Module], widths: dict[str, int], batches: Iterable[Any],
                         run: Callable[[Any], Any], sample_limit: int, progress) -> dict[str, HiddenStats]:
    """Run every calibration batch once; ``targets`` maps an FFN's name to its output Linear."""
    stats = {name: HiddenStats(widths[name], sample_limit) for name in targets}
    current = {"batch": -1}
    handles = []
    for name, module in targets.items():
        def hook(mod, args, name=name):
            stats[name].add(args[0], f"{name} (calibration batch {current['batch']})")
        handles.append(module.register_forward_pre_hook(hook))
    try:
        for index, batch in enumerate(batches):
            current["batch"] = index
            run_batch(run, batch, index)
            progress.update(1)
    finally:
        for handle in handles:
            handle.remove()
    return stats


def call_model(model: nn.Module, batch: Any) -> Any:
    """A calibration batch is a dict of keyword arguments, a tuple/list of positional ones, or one input."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def output_tensor(output: Any) -> Tensor:
    """The first floating-point tensor of a model output (transformers/diffusers outputs, tuples)."""
    for leaf in pytree.tree_leaves(output if not hasattr(output, "to_tuple") else output.to_tuple()):
        if isinstance(leaf, Tensor) and leaf.is_floating_point():
            return leaf
    raise ValueError("moefx: the model output holds no floating-point tensor")


def run_batch(run: Callable[[Any], Any], batch: Any, index: int) -> Any:
    """Call the model on one calibration batch, naming the batch if the model rejects it."""
    try:
        with torch.no_grad():
            return run(batch)
    except Exception as error:
        raise ValueError(f"moefx: the model rejected calibration batch {index} ({type(error).__name__}: {error}); "
                         "each batch must be a model input: a tensor, a tuple of positional arguments, or a dict "
                         "of keyword arguments") from error


class _Captured(Exception):
    """Raised by the capture hook to end a forward once the layer's input is recorded."""


def capture_inputs(module: nn.Module, batches: Iterable[Any], run: Callable[[Any], Any], limit: int) -> Tensor:
    """Rows of ``module``'s first input over the calibration batches, at most ``limit`` (fp32).

    Each forward stops at ``module``. Rows that are padding (a dict batch whose ``attention_mask``
    has one entry per row) are left out, so fits see only real tokens."""
    return capture_rows(module, batches, run, limit, arguments=1)[0]


def capture_rows(module: nn.Module, batches: Iterable[Any], run: Callable[[Any], Any], limit: int,
                 arguments: int) -> list[Tensor]:
    """``capture_inputs`` for the first ``arguments`` positional inputs, row t of each the same token
    (a pre-gated MoE layer's FFN input and router input)."""
    rows: list[list[Tensor]] = []
    mask: dict[str, Optional[Tensor]] = {"current": None}

    def hook(mod, args):
        if len(args) < arguments or any(a is None for a in args[:arguments]):
            raise ValueError(f"moefx: {type(mod).__name__} was called with fewer than {arguments} tensor inputs")
        tokens = args[0].reshape(-1, args[0].shape[-1]).shape[0]
        flats = [a.detach().reshape(tokens, -1).float() for a in args[:arguments]]
        keep = mask["current"]
        if keep is not None and keep.numel() == tokens:
            flats = [f[keep.reshape(-1).to(torch.bool)] for f in flats]
        rows.append(flats)
        raise _Captured

    handle = module.register_forward_pre_hook(hook)
    try:
        for index, batch in enumerate(batches):
            if sum(len(r[0]) for r in rows) >= limit:
                break
            mask["current"] = batch.get("attention_mask") if isinstance(batch, dict) else None
            try:
                run_batch(run, batch, index)
            except ValueError as error:
                if not isinstance(error.__cause__, _Captured):
                    raise
    finally:
        handle.remove()
    if not rows:
        raise ValueError("moefx: the calibration batches never reach an MoE layer; check that they are model inputs")
    return [torch.cat(column)[:limit] for column in zip(*rows)]
