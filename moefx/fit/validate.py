"""Regularisation chosen on held-out calibration sequences.

The closed-form fits (``routers.least_squares_router``, ``refit.refit``) fit the calibration
distribution closely; a user calibrates on whatever text they have and deploys on other text.
Each fit therefore holds out whole sequences (sentences: every token of a held-out sentence, so
the held-out rows share no context with the fitted ones), scores a small grid of ridge strengths
by the held-out error of a fit on the rest, and then solves once more on all rows with the
winner (the usual K-fold-free validation split of ridge regression; Hastie et al., ESL 7.10).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor


@dataclass
class Fit:
    """One fit of a layer: its score on all calibration rows and how its ridge strength was chosen."""

    what: str                        # "router" or "refit"
    metric: str                      # what ``fitted`` and ``held_out`` measure
    fitted: float                    # on all calibration rows, after the final fit
    ridge: Optional[float] = None    # the ridge strength used (None: the fit has none)
    held_out: Optional[float] = None  # the metric on the held-out rows of a fit without them, at ``ridge``
    grid: dict[float, float] = field(default_factory=dict)  # every ridge tried -> its held-out metric

    def __str__(self) -> str:
        text = f"{self.what}: {self.metric} {self.fitted:.4f}"
        if self.ridge is not None:
            text += f", ridge {self.ridge:g}"
        if self.grid:
            text += " chosen from " + " ".join(f"{r:g}:{v:.4f}" for r, v in self.grid.items())
        if self.held_out is not None:
            text += f", held-out {self.metric} {self.held_out:.4f}"
        return text


def held_out_split(sequences: Optional[Tensor], share: float, seed: int) -> Optional[Tensor]:
    """Boolean [T] mask of the rows held out: about ``share`` of the distinct ``sequences`` ids, whole,
    drawn with ``seed``; None where there is nothing to hold out (no ids, share 0, fewer than two
    sequences), and the fits then use their fixed ridge."""
    if sequences is None or share <= 0:
        return None
    unique = sequences.unique()
    held = min(round(share * len(unique)), len(unique) - 1)
    if held < 1:
        return None
    order = torch.randperm(len(unique), generator=torch.Generator().manual_seed(seed))
    return torch.isin(sequences, unique[order[:held]])


def best(grid: dict[float, float], higher_is_better: bool) -> float:
    """The ridge of the best held-out score; among equal scores the strongest ridge (the safer one off
    the calibration data)."""
    sign = 1 if higher_is_better else -1
    return max(grid, key=lambda ridge: (sign * grid[ridge], ridge))
