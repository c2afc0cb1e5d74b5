"""``moefx eval SRC DST``: the quality of a converted checkpoint against its dense source, on held-out text.

Causal LMs: perplexity of both models on the text, the share of positions where they predict the
same next token (top-1 agreement) and the mean KL(dense || MoE) of their next-token distributions
(``evaluation.language``). Encoders: the mean cosine of their token embeddings.

A moefx-layout checkpoint of a model with a stack of blocks is evaluated the way ``moefx convert``
converts it (``moefx.stream``): block by block, each dense block and its converted twin in memory
at a time, the logits computed by the model's own forward after its last block with the LM head cut to
slices of the vocabulary (so its bias, logit scale and soft-capping apply); per block it reports the relative error of
the block's output (errors of earlier blocks included) and the measured experts per token. Other
checkpoints (transformers MoE layouts, no layer stack) load both models whole and add the per-layer
report of ``moefx.evaluate``.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from moefx.evaluation.language import NextTokenQuality
from moefx.evaluation.layers import QualityReport, evaluate
from moefx.stream import Source, calibration_ids

VOCAB_SLICE = 16384  # LM-head rows read and applied at a time


@dataclass
class CheckpointQuality:
    tokens: int
    causal: bool
    dense_perplexity: Optional[float] = None
    moe_perplexity: Optional[float] = None
    top1_agreement: Optional[float] = None
    kl: Optional[float] = None  # mean KL(dense || MoE) of the next-token distributions, nats per position
    embedding_cosine: Optional[float] = None
    layers: Optional[QualityReport] = None
    blocks: Optional[list[tuple[str, float, float]]] = None  # streamed: (block, output error, experts/token)
    asked: int = 0  # tokens asked for; the data held only ``tokens`` when fewer

    def __str__(self) -> str:
        on = f"on {self.tokens:,} held-out tokens" + (f" (all the data holds; {self.asked:,} asked for)"
                                                      if self.asked > self.tokens else "")
        if self.causal:
            head = [f"{on}: perplexity dense {self.dense_perplexity:.3f}, MoE "
                    f"{self.moe_perplexity:.3f} ({self.moe_perplexity / self.dense_perplexity - 1:+.1%}); top-1 "
                    f"next-token agreement {self.top1_agreement:.1%}; KL(dense || MoE) {self.kl:.4f} nats per position"]
        else:
            head = [f"{on}: token-embedding cosine to the dense model "
                    f"{self.embedding_cosine:.4f}"]
        if self.blocks is not None:
            head += ["evaluated block by block; per block, the relative error of its output (earlier blocks' errors "
                     "included) and the routed experts per token:", f"{'block':<36} {'output err':>10} {'experts/tok':>11}"]
            head += [f"{name:<36} {error:>10.4f} {experts:>11.2f}" for name, error, experts in self.blocks]
        return "\n".join(head + ([str(self.layers)] if self.layers is not None else []))


def evaluate_pretrained(src: str, dst: str, data: Union[str, Sequence[str], None] = None, *, tokens: int = 8192,
                        sequence_length: int = 512, in_memory: bool = False,
                        plot: Optional[str] = None) -> CheckpointQuality:
    """Compare the MoE checkpoint ``dst`` (written by ``moefx convert``) with the dense checkpoint ``src`` on
    ``data`` (a text/JSONL file or strings, as calibration; default: Python-documentation sentences that the
    default calibration does not use). ``in_memory`` (implied by ``plot``, the expert-load PNG) loads both models
    whole and adds ``moefx.evaluate``'s per-layer report; the LM head is read from ``src`` when streaming (the
    conversion leaves it as it is)."""
    import transformers

    from moefx.checkpoint import RECIPE, load_pretrained

    source = Source(src)
    _check_converted_from(source, dst)
    if data is None:
        from moefx.data import python_doc_sentences

        data = python_doc_sentences(250, offset=1500)
    ids = calibration_ids(source, data, tokens, sequence_length, fewer=True)
    if os.path.exists(os.path.join(dst, RECIPE)) and not in_memory and plot is None:
        streamed = _evaluate_streamed(source, dst, ids)
        if streamed is not None:
            streamed.asked = tokens
            return streamed
    batches = [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in ids]
    dense = source.model_class().from_pretrained(src, dtype=torch.float32).eval()
    moefx_layout = os.path.exists(os.path.join(dst, RECIPE))
    moe = (load_pretrained(dst) if moefx_layout else
           transformers.AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32)).float().eval()
    result = CheckpointQuality(tokens=sum(b["input_ids"].numel() for b in batches), causal=source.causal_lm,
                               asked=tokens)
    language, cosine, positions = NextTokenQuality(), 0.0, 0
    with torch.no_grad():
        for batch in batches:
            a, b = dense(**batch), moe(**batch)
            if result.causal:
                language.add(a.logits, b.logits, batch["input_ids"], batch["attention_mask"])
            else:
                x, y = a.last_hidden_state.float(), b.last_hidden_state.float()
                cosine += F.cosine_similarity(x, y, dim=-1).sum().item()
                positions += x.shape[0] * x.shape[1]
    if result.causal:
        result.dense_perplexity, result.moe_perplexity = language.dense_perplexity, language.moe_perplexity
        result.top1_agreement, result.kl = language.top1_agreement, language.kl
    else:
        result.embedding_cosine = cosine / positions
    if moefx_layout:
        result.layers = evaluate(dense, moe, batches, plot=plot)
    return result


def _check_converted_from(source: Source, dst: str) -> None:
    """Refuse a ``dst`` that is no checkpoint, or whose config shows another model than ``source``'s."""
    import transformers

    from moefx.checkpoint import RECIPE

    if not os.path.isfile(os.path.join(dst, "config.json")):
        raise ValueError(f"moefx eval: {dst} is not a checkpoint directory (no config.json); pass the directory "
                         "moefx convert wrote")
    config = transformers.AutoConfig.from_pretrained(dst)
    keys = ("model_type",) * os.path.exists(os.path.join(dst, RECIPE)) + ("vocab_size", "hidden_size",
                                                                          "num_hidden_layers")
    for key in keys:
        theirs, ours = getattr(config, key, None), getattr(source.config, key, None)
        if theirs is not None and ours is not None and theirs != ours:
            raise ValueError(f"moefx eval: {dst} was not converted from {source.path} ({key} {theirs!r} there, "
                             f"{ours!r} in SRC); pass as SRC the dense model that DST was converted from")


def _evaluate_streamed(source: Source, dst: str, ids: list) -> Optional[CheckpointQuality]:
    """Block-by-block evaluation (see the module docstring); None when the model has no layer stack."""
    import copy
    import json

    from moefx.checkpoint import RECIPE
    from moefx.convert import rebuild
    from moefx.recipe import Recipe
    from moefx.runtime import call_model
    from moefx.shards import SourceShards
    from moefx.stream import Streamer, _hidden, _Recorder, layer_stack
    from moefx.summary import summary

    model = source.meta_model()
    stack = layer_stack(model)
    if stack is None:
        return None
    with open(os.path.join(dst, RECIPE)) as f:
        recipe = Recipe.from_dict(json.load(f)["recipe"], source=os.path.join(dst, RECIPE))
    shell = Streamer(source, model, stack, recipe, ids, torch.float32, "moefx", dst, {}, progress=False)
    shell.load_shell()
    key, hidden, calls = shell.record_calls()
    moe_shards = SourceShards(dst)
    dense_h, moe_h, blocks = hidden, hidden, []
    for i, block in enumerate(shell.blocks):
        name = f"{shell.stack_name}.{i}"
        shell._materialise(block, name)
        twin = rebuild(copy.deepcopy(block), {key: moe_h[0], **calls[0][i]}, recipe, inplace=True)
        state = {k[len(name) + 1:]: moe_shards.read(k, torch.float32) for k in moe_shards.tensors
                 if k.startswith(name + ".")}
        twin.load_state_dict(state, strict=True)
        dense_in = [{key: h, **c[i]} for h, c in zip(dense_h, calls)]
        moe_in = [{key: h, **c[i]} for h, c in zip(moe_h, calls)]
        with torch.no_grad():
            dense_h = [_hidden(call_model(block, b)) for b in dense_in]
            moe_h = [_hidden(call_model(twin, b)) for b in moe_in]
        error = (sum((m - d).pow(2).sum() for m, d in zip(moe_h, dense_h)) /
                 sum(d.pow(2).sum() for d in dense_h)).sqrt().item()
        layers = summary(twin, data=moe_in).layers
        blocks.append((name, error, sum(l.experts_per_token for l in layers) / max(len(layers), 1)))
        shell.stack[i] = shell.blocks[i] = None
        del block, twin, state
    result = CheckpointQuality(tokens=sum(b.numel() for b in ids), causal=source.causal_lm, blocks=blocks)
    if not source.causal_lm:
        result.embedding_cosine = (sum(F.cosine_similarity(d.float(), m.float(), dim=-1).sum().item()
                                       for d, m in zip(dense_h, moe_h)) / sum(b.numel() for b in ids))
        return result
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"moefx eval: {type(model).__name__}'s output head is a {type(head).__name__}, not a Linear "
                         "whose vocabulary moefx can read in slices; pass --in-memory")
    names = {m: n for n, m in model.named_modules()}
    weight_key = shell.keys.get(names[head] + ".weight") or shell.keys[
        names[model.get_input_embeddings()] + ".weight"]
    bias_key = shell.keys.get(names[head] + ".bias")
    embeds = [shell.embed(b) for b in ids]
    targets = [b[:, 1:].reshape(-1) for b in ids]
    rows = shell.source.shards.tensors[weight_key].shape[0]
    lse = {k: [torch.full((t.numel(),), -float("inf")) for t in targets] for k in ("dense", "moe")}
    best = {k: [torch.full((t.numel(),), -float("inf")) for t in targets] for k in lse}
    arg = {k: [torch.zeros(t.numel(), dtype=torch.long) for t in targets] for k in lse}
    picked = {k: [torch.zeros(t.numel()) for t in targets] for k in lse}
    # KL(dense || MoE) = sum_v exp(d_v - m) (d_v - q_v) * exp(m - lse_d) - lse_d + lse_q, accumulated per slice
    # with m the running maximum of the dense logits
    kl_sum = [torch.zeros(t.numel()) for t in targets]
    wrap, whole = shell.wrap, (head.weight, head.bias)  # the blocks' output structure; the head's own tensors
    for start in range(0, rows, VOCAB_SLICE):
        # the model's own forward after the last block, with its head cut to these vocabulary rows: the head's
        # bias and whatever the model does to the logits (scale, soft-capping) apply as in the whole model
        stop_row = min(rows, start + VOCAB_SLICE)
        index = torch.arange(start, stop_row)
        head.weight = torch.nn.Parameter(shell.source.shards.rows(weight_key, index, torch.float32), False)
        if bias_key is not None:
            head.bias = torch.nn.Parameter(shell.source.shards.read(bias_key, torch.float32)[start:stop_row], False)
        try:
            for b, (batch, embed, t) in enumerate(zip(ids, embeds, targets)):
                slice_logits = {}
                for label, outputs in (("dense", dense_h), ("moe", moe_h)):
                    last = len(shell.stack) - 1
                    for i in range(len(shell.stack)):
                        shell.stack[i] = _Recorder(i, [], last=False,
                                                   wrap=(lambda h, o=outputs[b]: wrap(o)) if i == last else wrap)
                    with torch.no_grad():
                        logits = shell.model(inputs_embeds=embed, attention_mask=torch.ones_like(batch),
                                             use_cache=False).logits
                    logits = slice_logits[label] = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
                    lse[label][b] = torch.logaddexp(lse[label][b], logits.logsumexp(-1))
                    value, top = logits.max(-1)
                    better = value > best[label][b]
                    if label == "dense":  # rescale the KL sum to the new running maximum of the dense logits
                        kl_sum[b] *= torch.exp(best[label][b] - torch.maximum(value, best[label][b])).nan_to_num(0.0)
                    best[label][b] = torch.where(better, value, best[label][b])
                    arg[label][b] = torch.where(better, top + start, arg[label][b])
                    inside = (t >= start) & (t < stop_row)
                    picked[label][b][inside] = logits[inside, t[inside] - start]
                dense_logits, moe_logits = slice_logits["dense"], slice_logits["moe"]
                kl_sum[b] += (torch.exp(dense_logits - best["dense"][b][:, None]) * (dense_logits - moe_logits)).sum(-1)
        finally:
            head.weight, head.bias = whole
    predicted = sum(t.numel() for t in targets)
    nll = {k: sum((lse[k][b] - picked[k][b]).sum().item() for b in range(len(targets))) / predicted for k in lse}
    result.dense_perplexity, result.moe_perplexity = math.exp(nll["dense"]), math.exp(nll["moe"])
    result.top1_agreement = sum((arg["dense"][b] == arg["moe"][b]).sum().item()
                                for b in range(len(targets))) / predicted
    result.kl = sum((kl_sum[b] * torch.exp(best["dense"][b] - lse["dense"][b]) - lse["dense"][b] + lse["moe"][b])
                    .sum().item() for b in range(len(targets))) / predicted
    return result
