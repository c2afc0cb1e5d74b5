"""``moefx eval SRC DST``: the quality of a converted checkpoint against its dense source, on held-out text.

Causal LMs: perplexity of both models on the text and the share of positions where they predict the
same next token (top-1 agreement). Encoders: the mean cosine of their token embeddings. Both: the
per-layer report of ``moefx.evaluate`` (local and drift error, router recall, experts per token,
expert load). Both models are loaded whole (the evaluation is not streamed).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from moefx.quality import QualityReport, evaluate
from moefx.stream import Source, calibration_ids


@dataclass
class CheckpointQuality:
    tokens: int
    causal: bool
    dense_perplexity: Optional[float] = None
    moe_perplexity: Optional[float] = None
    top1_agreement: Optional[float] = None
    embedding_cosine: Optional[float] = None
    layers: Optional[QualityReport] = None

    def __str__(self) -> str:
        if self.causal:
            head = [f"on {self.tokens:,} held-out tokens: perplexity dense {self.dense_perplexity:.3f}, MoE "
                    f"{self.moe_perplexity:.3f} ({self.moe_perplexity / self.dense_perplexity - 1:+.1%}); top-1 "
                    f"next-token agreement {self.top1_agreement:.1%}"]
        else:
            head = [f"on {self.tokens:,} held-out tokens: token-embedding cosine to the dense model "
                    f"{self.embedding_cosine:.4f}"]
        return "\n".join(head + ([str(self.layers)] if self.layers is not None else []))


def evaluate_pretrained(src: str, dst: str, data: Union[str, Sequence[str], None] = None, *, tokens: int = 8192,
                        sequence_length: int = 512, plot: Optional[str] = None) -> CheckpointQuality:
    """Compare the MoE checkpoint ``dst`` (written by ``moefx convert``) with the dense checkpoint ``src`` on
    ``data`` (a text/JSONL file or strings, as calibration; default: Python-documentation sentences that the
    default calibration does not use)."""
    import transformers

    from moefx.checkpoint import RECIPE, load_pretrained

    source = Source(src)
    if data is None:
        from moefx.data import python_doc_sentences

        data = python_doc_sentences(250, offset=1500)
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}
               for ids in calibration_ids(source, data, tokens, sequence_length)]
    dense = source.model_class().from_pretrained(src, dtype=torch.float32).eval()
    if not os.path.isdir(dst):
        raise ValueError(f"moefx eval: {dst} is not a directory; pass the directory moefx convert wrote")
    moefx_layout = os.path.exists(os.path.join(dst, RECIPE))
    moe = (load_pretrained(dst) if moefx_layout else
           transformers.AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32)).float().eval()
    result = CheckpointQuality(tokens=sum(b["input_ids"].numel() for b in batches), causal=source.causal_lm)
    nll = {"dense": 0.0, "moe": 0.0}
    agree = cosine = 0.0
    predicted = 0
    with torch.no_grad():
        for batch in batches:
            a, b = dense(**batch), moe(**batch)
            if result.causal:
                target = batch["input_ids"][:, 1:].reshape(-1)
                for name, out in (("dense", a), ("moe", b)):
                    logits = out.logits[:, :-1].reshape(target.numel(), -1).float()
                    nll[name] += F.cross_entropy(logits, target, reduction="sum").item()
                agree += (a.logits[:, :-1].argmax(-1) == b.logits[:, :-1].argmax(-1)).sum().item()
                predicted += target.numel()
            else:
                x, y = a.last_hidden_state.float(), b.last_hidden_state.float()
                cosine += F.cosine_similarity(x, y, dim=-1).sum().item()
                predicted += x.shape[0] * x.shape[1]
    if result.causal:
        result.dense_perplexity = math.exp(nll["dense"] / predicted)
        result.moe_perplexity = math.exp(nll["moe"] / predicted)
        result.top1_agreement = agree / predicted
    else:
        result.embedding_cosine = cosine / predicted
    if moefx_layout:
        result.layers = evaluate(dense, moe, batches, plot=plot)
    return result
