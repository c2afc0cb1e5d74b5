"""Next-token quality of a converted causal language model against its dense original.

A converted LM is worth deploying only while it is still a language model, so it is judged on the
next-token distribution, the standard held-out metrics of LM compression (GPTQ, SparseGPT, CMoE):
perplexity of each model on the held-out tokens, the share of positions where both predict the same
next token (top-1 agreement), and the mean KL(dense || MoE) of the two next-token distributions.
Position t of a sequence predicts token t + 1; padding (``attention_mask`` 0) is scored nowhere.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor



@dataclass
class NextTokenQuality:
    """Running sums over scored positions; ``dense_perplexity`` etc. read them."""

    positions: int = 0
    dense_nll: float = 0.0
    moe_nll: float = 0.0
    agreements: int = 0
    kl_sum: float = 0.0

    def add(self, dense_logits: Tensor, moe_logits: Tensor, input_ids: Tensor, mask: Optional[Tensor] = None) -> None:
        """Score one batch: logits [B, S, V] of both models on ``input_ids`` [B, S] (``mask`` [B, S]: 1 = real)."""
        if dense_logits.shape != moe_logits.shape or dense_logits.shape[:2] != input_ids.shape:
            raise ValueError(f"moefx: logits {tuple(dense_logits.shape)} / {tuple(moe_logits.shape)} do not match the "
                             f"input ids {tuple(input_ids.shape)}; both models must score the same batch")
        keep = torch.ones_like(input_ids[:, 1:], dtype=torch.bool)
        if mask is not None:
            keep = mask[:, 1:].bool() & mask[:, :-1].bool()
        target = input_ids[:, 1:][keep]
        dense = F.log_softmax(dense_logits[:, :-1][keep].float(), -1)
        moe = F.log_softmax(moe_logits[:, :-1][keep].float(), -1)
        self.positions += target.numel()
        self.dense_nll -= dense.gather(1, target[:, None]).sum().item()
        self.moe_nll -= moe.gather(1, target[:, None]).sum().item()
        self.agreements += (dense.argmax(-1) == moe.argmax(-1)).sum().item()
        self.kl_sum += F.kl_div(moe, dense, log_target=True, reduction="sum").item()

    @property
    def dense_perplexity(self) -> float:
        return math.exp(self.dense_nll / max(self.positions, 1))

    @property
    def moe_perplexity(self) -> float:
        return math.exp(self.moe_nll / max(self.positions, 1))

    @property
    def top1_agreement(self) -> float:
        return self.agreements / max(self.positions, 1)

    @property
    def kl(self) -> float:
        """Mean KL(dense || MoE) per scored position, in nats."""
        return self.kl_sum / max(self.positions, 1)

    def __str__(self) -> str:
        return (f"on {self.positions:,} next-token positions: perplexity dense {self.dense_perplexity:.3f}, MoE "
                f"{self.moe_perplexity:.3f} (x{self.moe_perplexity / self.dense_perplexity:.3f}); top-1 agreement "
                f"{self.top1_agreement:.1%}; KL(dense || MoE) {self.kl:.4f} nats")


def scored_ids(batch: Any) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """(input_ids [B, S], attention_mask or None) of a dict batch; (None, None) when it has no token ids."""
    if not isinstance(batch, dict) or not isinstance(batch.get("input_ids"), Tensor):
        return None, None
    mask = batch.get("attention_mask")
    return batch["input_ids"], mask if isinstance(mask, Tensor) else None
