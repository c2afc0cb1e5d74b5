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

from moefx.runtime import hooks, run_batch, token_mask


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

    def register(name, module):
        def hook(mod, args):
            stats[name].add(args[0], f"{name} (calibration batch {current['batch']})")
        return lambda: module.register_forward_pre_hook(hook)

    with hooks(*(register(name, module) for name, module in targets.items())):
        for index, batch in enumerate(batches):
            current["batch"] = index
            run_batch(run, batch, index)
            progress.update(1)
    return stats


class _Captured(Exception):
    """Raised by the capture hook to end a forward once the layer's input is recorded."""


def capture_rows(module: nn.Module, batches: Iterable[Any], run: Callable[[Any], Any], limit: int,
                 arguments: int = 1) -> list[Tensor]:
    """Rows of ``module``'s first ``arguments`` positional inputs over the calibration batches, at most
    ``limit`` (fp32), row t of each the same token (a pre-gated MoE layer: its FFN input and router input),
    then one more column: the [T] index of the sequence each row came from (``sequence_ids``).

    Each forward stops at ``module``. Rows that are padding (a dict batch whose ``attention_mask``
    has one entry per row) are left out, so fits see only real tokens."""
    rows: list[list[Tensor]] = []
    current: dict[str, Any] = {"batch": None, "sequences": 0}

    def hook(mod, args):
        if len(args) < arguments or any(a is None for a in args[:arguments]):
            raise ValueError(f"moefx: {type(mod).__name__} was called with fewer than {arguments} tensor inputs")
        tokens = args[0].reshape(-1, args[0].shape[-1]).shape[0]
        flats = [a.detach().reshape(tokens, -1).float() for a in args[:arguments]]
        flats.append(sequence_ids(args[0].shape, current["sequences"]))
        current["sequences"] = int(flats[-1].max()) + 1
        keep = token_mask(current["batch"], flats[0].shape)
        if keep is not None:
            flats = [f[keep] for f in flats]
        rows.append(flats)
        raise _Captured

    with hooks(lambda: module.register_forward_pre_hook(hook)):
        for index, batch in enumerate(batches):
            if sum(len(r[0]) for r in rows) >= limit:
                break
            current["batch"] = batch
            try:
                run_batch(run, batch, index)
            except ValueError as error:
                if not isinstance(error.__cause__, _Captured):
                    raise
    if not rows:
        raise ValueError("moefx: the calibration batches never reach an MoE layer; check that they are model inputs")
    return [torch.cat(column)[:limit] for column in zip(*rows)]


def sequence_ids(shape: torch.Size, first: int) -> Tensor:
    """[tokens] the sequence of each row of an input of ``shape`` [..., H] flattened to rows: the index along
    the leading dimension of a [sequences, length, H] input (a sentence of a batch), counted from ``first``;
    a [tokens, H] input is one sequence."""
    tokens = shape[:-1].numel()
    count = shape[0] if len(shape) >= 3 else 1
    return first + torch.arange(count).repeat_interleave(tokens // count)

