"""``moefx.evaluate``: how close a converted model stays to its dense original, layer by layer.

Per MoE layer, on the evaluation data:
- ``local_error``: ||moe(x) - ffn(x)|| / ||ffn(x)|| with x the dense model's FFN input (the layer alone);
- ``drift_error``: the same with the MoE model's own FFN input and output (errors of earlier layers included);
- ``router_recall``: share of the oracle's top_k experts (largest ||f_e(x)||) that the router picks;
- ``active_experts``: mean routed experts per token (data-dependent under dynamic-k) and the
  resulting ``active_fraction`` of the FFN's neurons; ``load``: share of routed slots per expert.
Model level: ``output_cosine``, the mean cosine of the two models' outputs (last dimension); for causal
language models (outputs with ``logits``, batches with ``input_ids``) also ``language``: perplexity of both,
top-1 next-token agreement and KL(dense || MoE) (``evaluation.language``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
from torch import Tensor, nn

from moefx.evaluation.language import NextTokenQuality, scored_ids
from moefx.layer import MoELayer
from moefx.runtime import call_model, hooks, logits_of, output_tensor, read_batches
from moefx.fit.routers import oracle_scores


@dataclass
class LayerQuality:
    name: str
    local_error: float
    drift_error: float
    router_recall: float
    active_experts: float
    active_fraction: float
    load: list[float]


@dataclass
class QualityReport:
    layers: list[LayerQuality]
    output_cosine: float
    plot: Optional[str] = None
    notes: list[str] = field(default_factory=list)
    language: Optional[NextTokenQuality] = None  # causal LMs: perplexity, top-1 agreement, KL

    def __str__(self) -> str:
        header = (f"{'layer':<36} {'local err':>9} {'drift err':>9} {'recall':>7} {'experts/tok':>11} "
                  f"{'active FFN':>10}")
        rows = [header, "-" * len(header)]
        rows += [f"{l.name:<36} {l.local_error:>9.4f} {l.drift_error:>9.4f} {l.router_recall:>7.3f} "
                 f"{l.active_experts:>11.2f} {l.active_fraction:>10.1%}" for l in self.layers]
        rows.append(f"output cosine to the dense model: {self.output_cosine:.4f}")
        if self.language is not None:
            rows.append(str(self.language))
        if self.plot:
            rows.append(f"expert load plot: {self.plot}")
        return "\n".join(rows + self.notes)


def _record(model: nn.Module, inputs_of: dict[str, str], outputs_of: dict[str, str], batch: Any
            ) -> tuple[dict, dict, Any]:
    """Run ``batch`` once; return {key: first input of module name} for ``inputs_of`` (and, as
    ``key + ":router"``, a second positional input: the router input of a pre-gated MoE layer),
    {key: output of module name} for ``outputs_of``, and the model output."""
    inputs: dict[str, Tensor] = {}
    outputs: dict[str, Tensor] = {}

    def keep_input(module, args, key):
        inputs.setdefault(key, args[0].detach())
        if len(args) > 1 and isinstance(args[1], Tensor):
            inputs.setdefault(key + ":router", args[1].detach())

    registrations = [lambda name=name, key=key: model.get_submodule(name).register_forward_pre_hook(
        lambda m, a: keep_input(m, a, key)) for key, name in inputs_of.items()]
    registrations += [lambda name=name, key=key: model.get_submodule(name).register_forward_hook(
        lambda m, a, out: outputs.setdefault(key, out.detach())) for key, name in outputs_of.items()]
    with hooks(*registrations), torch.no_grad():
        output = call_model(model, batch)
    return inputs, outputs, output


def evaluate(dense: nn.Module, moe: nn.Module, data: Iterable[Any], plot: Optional[str] = None) -> QualityReport:
    """Compare ``moe`` (returned by ``moefx.convert(dense, ...)``) with ``dense`` on model inputs ``data``;
    write a PNG of the expert load per layer to ``plot`` if given (needs matplotlib)."""
    report = getattr(moe, "moefx_report", None)
    if report is None or not report.layers:
        raise ValueError("moefx.evaluate: `moe` carries no conversion record; pass the model moefx.convert returned")
    origins = report.layers
    sums = {o.moe: dict(local=0.0, drift=0.0, ref_local=0.0, ref_drift=0.0, hits=0.0, picks=0.0, slots=0.0,
                        tokens=0, load=None) for o in origins}
    cosines = []
    language = NextTokenQuality()
    for batch in read_batches(data, "moefx.evaluate", "data"):
        dense_in, dense_out, dense_result = _record(dense, {o.moe: o.dense_inputs[0] for o in origins},
                                                    {o.moe: o.dense_output for o in origins}, batch)
        moe_layers = {o.moe: o.moe for o in origins}
        moe_in, moe_out, moe_result = _record(moe, moe_layers, moe_layers, batch)
        ids, mask = scored_ids(batch)
        if ids is not None and logits_of(dense_result) is not None and logits_of(moe_result) is not None:
            language.add(logits_of(dense_result), logits_of(moe_result), ids, mask)
        a, b = output_tensor(dense_result).float(), output_tensor(moe_result).float()
        cosines.append(torch.nn.functional.cosine_similarity(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]),
                                                             dim=-1))
        for o in origins:
            layer: MoELayer = moe.get_submodule(o.moe)
            s = sums[o.moe]
            ref = dense_out[o.moe].float()
            # a pre-gated layer routes from its block's input, recorded in the MoE model's own flow
            router_in = moe_in.get(o.moe + ":router")
            with torch.no_grad():
                local = layer(dense_in[o.moe].to(layer.w_in.dtype), router_in).float()
            s["local"] += (local - ref).pow(2).sum().item()
            s["ref_local"] += ref.pow(2).sum().item()
            s["drift"] += (moe_out[o.moe].float() - ref).pow(2).sum().item()
            s["ref_drift"] += ref.pow(2).sum().item()
            x = moe_in[o.moe].reshape(-1, layer.hidden).float()
            gates = layer.expert_gates(x if router_in is None else router_in.reshape(x.shape[0], -1).float())
            picked = gates != 0
            oracle = oracle_scores(layer, x).topk(min(layer.top_k, layer.num_experts), -1).indices
            s["hits"] += picked.gather(1, oracle).sum().item()
            s["picks"] += oracle.numel()
            s["slots"] += picked.sum().item()
            s["tokens"] += x.shape[0]
            load = picked.sum(0).double()
            s["load"] = load if s["load"] is None else s["load"] + load
    layers = []
    for o in origins:
        s, layer = sums[o.moe], moe.get_submodule(o.moe)
        active = s["slots"] / max(s["tokens"], 1)
        width = layer.num_experts * layer.expert_width + layer.shared_width
        layers.append(LayerQuality(o.moe, (s["local"] / s["ref_local"]) ** 0.5, (s["drift"] / s["ref_drift"]) ** 0.5,
                                   s["hits"] / max(s["picks"], 1), active,
                                   (active * layer.expert_width + layer.shared_width) / width,
                                   (s["load"] / s["load"].sum()).tolist()))
    result = QualityReport(layers, torch.cat(cosines).mean().item(),
                           language=language if language.positions else None)
    if plot:
        result.plot = plot_load(layers, plot)
    return result


def plot_load(layers: list[LayerQuality], path: str) -> str:
    """Heat map of the share of routed slots each expert receives, one row per layer."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("moefx.evaluate(plot=...) needs matplotlib: pip install matplotlib") from error
    width = max(len(l.load) for l in layers)
    grid = torch.full((len(layers), width), float("nan"))
    for i, l in enumerate(layers):
        grid[i, :len(l.load)] = torch.tensor(l.load)
    figure, axes = plt.subplots(figsize=(1 + 0.5 * width, 1 + 0.4 * len(layers)))
    image = axes.imshow(grid.numpy(), aspect="auto", cmap="viridis")
    axes.set_xlabel("expert")
    axes.set_yticks(range(len(layers)), [l.name for l in layers], fontsize=7)
    axes.set_title("share of routed tokens per expert")
    figure.colorbar(image, ax=axes)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
