"""``moefx.convert``: trace, find every dense FFN, rewrite each into an ``MoELayer``."""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from moefx.fit.calibrate import call_model, capture_inputs, collect_hidden_stats, run_batch
from moefx.fit.carve import METHODS, carved_layer, partition, upcycled_layer
from moefx.fit.distill import teacher_outputs, train_moe_layers
from moefx.convert.find import affine_map, find_ffns
from moefx.fit.importance import taylor_importance
from moefx.fit.refit import compensate as compensate_layer, dense_output, refit as refit_layer
from moefx.convert.rewrite import replace_ffn
from moefx.convert.pregate import (capture_router_rows, check_options as check_pregate, check_routed, claim_block,
                                  holds_pieces, is_block_candidate, route_from_blocks)
from moefx.fit.routers import (FITTED_ROUTERS, ROUTERS, distill_router, least_squares_router,
                                  representative_router)
from moefx.convert.trace import qualified, record_calls, trace_piece, within

log = logging.getLogger("moefx")


@dataclass
class LayerOrigin:
    """Where an MoE layer sits and which dense modules it replaced (``moefx.evaluate`` compares them)."""

    moe: str                   # qualified name of the MoELayer in the converted model
    dense_inputs: list[str]    # the dense FFN's input Linear(s) (gate and up when gated)
    dense_output: str          # the dense FFN's output Linear


@dataclass
class ConversionReport:
    """What ``convert`` did: the FFNs it rewrote and, by name, what it could not convert and why."""

    converted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    layers: list["LayerOrigin"] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)} FFN(s)"] + [f"  {n}" for n in self.converted]
        if self.skipped:
            lines += [f"not converted ({len(self.skipped)}):"] + [f"  {s}" for s in self.skipped]
        return "\n".join(lines)


def convert(
    model: nn.Module,
    num_experts: int = 8,
    top_k: int = 2,
    calibration: Optional[Iterable[Any]] = None,
    *,
    method: str = "split",
    num_shared: int = 0,
    importance: str = "activation",
    inplace: bool = False,
    sample_tokens: int = 2048,
    seed: int = 0,
    progress: bool = True,
    router: str = "centroid",
    compensate: bool = False,
    refit: bool = False,
    fit_tokens: int = 16384,
    top_p: float = 1.0,
    min_k: int = 1,
    granularity: int = 1,
    drop_rate: float = 0.0,
    num_zero: int = 0,
    num_copy: int = 0,
    num_const: int = 0,
    pregate: Optional[str] = None,
    distill_steps: int = 0,
) -> nn.Module:
    """Rewrite every dense FFN of ``model`` into an MoE layer and return the converted model.

    Args:
        num_experts: experts per layer, shared ones included; the FFN width must divide by it.
        top_k: routed experts active per token (besides the ``num_shared`` shared ones).
        calibration: model inputs (dict of kwargs, tuple of args, or a tensor). At least one is
            needed to trace the model; ``coactivation`` and ``num_shared`` use all for statistics.
        method: "split" (MoEfication k-means on W_in), "coactivation" (cluster by activation
            pattern), "random" (MoEfication's random split baseline), or "upcycle" (copies of the
            FFN; sparse upcycling).
        num_shared: always-active experts made of the most important neurons (DeepSeekMoE, CMoE).
        importance: what makes a neuron important for the shared experts: "activation" (how often
            it fires, CMoE) or "taylor" (Dense2MoE / LLaMA-MoE: sum over calibration tokens of
            |dL/dh * h|, the first-order loss change of removing it; L is the model's loss when its
            output has one, else a random projection of its output; one backward per batch).
        inplace: convert ``model`` itself instead of a copy (saves the copy's memory).
        sample_tokens: hidden-activation rows kept per FFN for co-activation clustering.
        router: how carved experts are scored: "centroid" (mean W_in row of the expert's neurons),
            "representative" (CMoE: the W_in row of the neuron nearest the expert's activation
            centroid; needs calibration statistics), "least_squares" (closed-form ridge regression,
            on the calibration tokens, of which experts contribute most, ||f_e(x)||; no gradient
            steps) or "distilled" (a linear router trained with Adam for the same choice).
        compensate: give every expert its mean output over the tokens that skip it as a standing
            bias, so a skipped expert costs its deviation from that mean instead of its output.
        refit: closed-form ridge least-squares fit of the experts' output weights and biases to
            the dense FFN's output under the final routing (no gradient steps).
        fit_tokens: calibration tokens kept per layer for the router, compensation and refit.
            Router, compensation and refit run layer after layer on the inputs each layer gets
            from the already converted layers before it; padding tokens (attention_mask 0) of
            dict batches are left out.
        top_p, min_k: dynamic-k routing (Huang et al. 2024): keep routed experts while the
            softmax of the router logits has not reached ``top_p``, at least ``min_k`` and at
            most ``top_k`` per token.
        granularity: method="upcycle" only: cut every copy into G shards of F/G neurons, so a layer
            has num_experts*G experts with top_k*G active (fine-grained upcycling, arXiv 2410.07524);
            router rows of a copy are tied and gates scaled by G, so it stays exact at any top_k.
        drop_rate: method="upcycle" only: Drop-Upcycling (arXiv 2502.19261): every expert re-draws
            round(drop_rate * expert width) of its neurons, its own random choice, from N(mean, std)
            of the dense matrix (deterministic given ``seed``); 0 keeps exact copies.
        num_zero, num_copy, num_const: zero-computation experts (MoE++) beside the routed ones,
            competing for the top_k slots: output 0, the input x, or a constant vector. Upcycled
            layers get them switched off (zero router rows, logit -1e4: never picked, the layer stays
            the dense FFN; train the router to use them). Carved layers need a fitted router
            (router="least_squares" or "distilled"), whose target frees each token's weakest slots,
            Z/(num_experts - num_shared + Z) of all slots, to the nearest zero-computation expert
            (nearest relative to the token's FFN output); compensate/refit allow num_zero only.
        pregate: "block": pre-gating (Read-ME, arXiv 2410.19123): route each MoE layer from the
            input of the transformer block holding it (the innermost nn.ModuleList/nn.Sequential
            item with a linear layer besides the FFN), so its experts are known before the block's
            attention runs (``moefx.lookahead``). Needs router="least_squares" or "distilled"
            (fitted on block inputs for the oracle experts of the FFN inputs); no compensate or refit.
        distill_steps: after the training-free steps, ``moefx.distill`` the MoE layers (experts,
            routers, biases) for this many Adam steps against the dense model's outputs on the
            calibration batches, cached before converting (so inplace=True works too).

    With ``top_k == num_experts - num_shared`` the converted model computes what ``model`` does
    (zero-computation experts stay switched off there: the router has nothing to choose).
    Use the returned module: when the whole model is one traced piece it is a new GraphModule.
    """
    _check_args(num_experts, top_k, method, num_shared)
    if importance not in ("activation", "taylor"):
        raise ValueError(f"moefx.convert: importance={importance!r} is not one of ('activation', 'taylor')")
    if importance != "activation" and not num_shared:
        raise ValueError("moefx.convert: importance chooses the neurons of the shared experts; set num_shared >= 1 "
                         "or leave importance='activation'")
    if router not in ROUTERS:
        raise ValueError(f"moefx.convert: router={router!r} is not one of {ROUTERS}")
    if method == "upcycle" and (router != "centroid" or compensate or refit):
        raise ValueError("moefx.convert: router, compensate and refit tune carved experts; method='upcycle' keeps "
                         "whole copies of the FFN behind a softmax router: use method='split' or 'coactivation'")
    if compensate and not refit and router not in FITTED_ROUTERS:
        raise ValueError("moefx.convert: compensate needs router='least_squares' or 'distilled' (or refit=True): it "
                         "corrects for the experts a token skips, which helps only when the router skips the experts "
                         "that contribute least (the centroid router often picks the opposite)")
    if not 0.0 < top_p <= 1.0 or not 1 <= min_k <= top_k:
        raise ValueError(f"moefx.convert: dynamic-k needs 0 < top_p <= 1 and 1 <= min_k <= top_k; got top_p={top_p}, "
                         f"min_k={min_k}, top_k={top_k}")
    _check_upcycle_and_zero_computation(method, granularity, drop_rate, top_p, router, compensate, refit,
                                        num_zero, num_copy, num_const)
    check_pregate(pregate, router, compensate, refit)
    batches = [] if calibration is None else list(calibration)
    if not batches:
        raise ValueError("moefx.convert: calibration is empty; pass at least one model input (e.g. "
                         "calibration=[tokenizer(texts, return_tensors='pt')]): moefx traces the model on it"
                         + ("" if method == "split" and not num_shared else
                            f", and method={method!r}" + (f" with num_shared={num_shared}" if num_shared else "")
                            + " computes neuron statistics from it"))
    if not isinstance(distill_steps, int) or distill_steps < 0:
        raise ValueError(f"moefx.convert: distill_steps={distill_steps!r} must be a whole number >= 0")
    target = model if inplace else copy.deepcopy(model)
    was_training = target.training
    target.eval()
    try:
        teacher = teacher_outputs(lambda b: call_model(target, b), batches) if distill_steps else None
        tuning = dict(router=router, compensate=compensate, refit=refit, fit_tokens=fit_tokens, importance=importance,
                      granularity=granularity, drop_rate=drop_rate, pregate=pregate,
                      extra=dict(num_zero=num_zero, num_copy=num_copy, num_const=num_const))
        converted, report = _convert(target, batches, num_experts, top_k, method, num_shared, sample_tokens, seed,
                                     progress, tuning, dict(top_p=top_p, min_k=min_k))
        if distill_steps:
            converted.moefx_distill = train_moe_layers(converted, lambda b: call_model(converted, b), batches, teacher,
                                                       steps=distill_steps, lr=1e-4, balance=1e-2, experts=True,
                                                       seed=seed, progress=progress)
    finally:
        target.train(was_training)
    converted.train(was_training)
    converted.moefx_report = report
    converted.moefx_recipe = dict(num_experts=num_experts, top_k=top_k, num_shared=num_shared, top_p=top_p, min_k=min_k,
                                  example=_first_row(batches[0]), granularity=granularity, num_zero=num_zero,
                                  num_copy=num_copy, num_const=num_const, pregate=pregate,
                                  method="upcycle" if method == "upcycle" else "carved")
    return converted


def _first_row(batch: Any) -> Any:
    """One row of a calibration batch: enough for ``moefx.load_pretrained`` to trace the model again."""
    if isinstance(batch, dict):
        return {k: v[:1].clone() if isinstance(v, torch.Tensor) and v.dim() else v for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(v[:1].clone() if isinstance(v, torch.Tensor) and v.dim() else v for v in batch)
    return batch[:1].clone() if isinstance(batch, torch.Tensor) and batch.dim() else batch


def _check_args(num_experts: int, top_k: int, method: str, num_shared: int) -> None:
    if method not in METHODS:
        raise ValueError(f"moefx.convert: method={method!r} is not one of {METHODS}")
    if num_experts < 1:
        raise ValueError(f"moefx.convert: num_experts={num_experts} must be at least 1")
    if not 0 <= num_shared < num_experts:
        raise ValueError(f"moefx.convert: num_shared={num_shared} must be between 0 and num_experts - 1 "
                         f"({num_experts - 1}): at least one expert must be routed")
    if method == "upcycle" and num_shared:
        raise ValueError("moefx.convert: method='upcycle' copies the whole FFN into each expert; num_shared applies "
                         "to the carving methods 'split' and 'coactivation'")
    routed = num_experts - num_shared
    if not 1 <= top_k <= routed:
        raise ValueError(f"moefx.convert: top_k={top_k} must be between 1 and the number of routed experts "
                         f"({routed} = num_experts {num_experts} - num_shared {num_shared}); "
                         f"use top_k={routed} to activate all of them")


def _check_upcycle_and_zero_computation(method, granularity, drop_rate, top_p, router, compensate, refit,
                                        num_zero, num_copy, num_const) -> None:
    if method != "upcycle" and (granularity != 1 or drop_rate):
        raise ValueError(f"moefx.convert: granularity and drop_rate shape the copies of method='upcycle'; method="
                         f"{method!r} already cuts the FFN into num_experts parts")
    if not isinstance(granularity, int) or granularity < 1:
        raise ValueError(f"moefx.convert: granularity={granularity!r} must be a whole number of shards per copy, >= 1")
    if not 0.0 <= drop_rate <= 1.0:
        raise ValueError(f"moefx.convert: drop_rate={drop_rate} is the share of neurons each expert re-draws; "
                         "pick it in [0, 1] (Drop-Upcycling uses 0.5)")
    if granularity > 1 and top_p < 1.0:
        raise ValueError("moefx.convert: dynamic-k (top_p < 1) could keep only some shards of a copy when "
                         "granularity > 1; use top_p=1 or granularity=1")
    counts = dict(num_zero=num_zero, num_copy=num_copy, num_const=num_const)
    for name, count in counts.items():
        if not isinstance(count, int) or count < 0:
            raise ValueError(f"moefx.convert: {name}={count!r} must be a whole number >= 0")
    if any(counts.values()) and method != "upcycle" and router not in FITTED_ROUTERS:
        raise ValueError("moefx.convert: zero-computation experts (num_zero, num_copy, num_const) in carved layers "
                         "need router='least_squares' or 'distilled', which learns which slots they can take over; "
                         f"the analytic router={router!r} has no score for them")
    if (num_copy or num_const) and (compensate or refit):
        raise ValueError("moefx.convert: compensate and refit model a layer as its real experts only; with copy or "
                         "constant experts use num_zero alone, or drop compensate/refit")


def _convert(model, batches, num_experts, top_k, method, num_shared, sample_tokens, seed, progress, tuning, routing):
    affine = _affine_leaves(model)
    candidates = {name: m for name, m in model.named_modules()
                  if next(m.children(), None) is not None and type(m).forward is not nn.Module.forward}
    calls = record_calls(model, candidates, lambda: run_batch(lambda b: call_model(model, b), batches[0], 0))

    leaves: set[nn.Module] = set()
    pieces: dict[str, tuple] = {}
    seen: set[str] = set()
    report = ConversionReport()
    untraced: dict[str, list[str]] = {}
    blocks: dict = {}  # pregate: block name -> pregate.Block
    for name in sorted(calls, key=lambda n: (-n.count(".") - bool(n), n)):
        module = candidates[name]
        inside = [a for a in affine if within(a, name)]
        opaque = [n for n, m in candidates.items() if m in leaves and within(n, name)]
        wanted_block = tuning["pregate"] and is_block_candidate(model, name) and holds_pieces(name, pieces)
        if len([a for a in inside if not any(within(a, o) for o in opaque)]) < 2 and not wanted_block:
            continue  # every linear layer left is inside an FFN piece or an opaque module
        gm = trace_piece(module, calls[name], leaves, name)
        if gm is None:
            leaves.add(module)
            untraced[name] = inside
            continue
        prefix = f"{name}." if name else ""
        seen.update(prefix + n.target for n in gm.graph.nodes if n.op == "call_module")
        ffns, rejected = find_ffns(gm, name, affine)
        report.skipped += [r for r in rejected if r not in report.skipped]
        claimed = tuning["pregate"] and claim_block(model, name, gm, calls[name], ffns, pieces, affine, blocks,
                                                      leaves)
        if claimed:
            gm, ffns = claimed
        if ffns or claimed:
            pieces[name] = (gm, ffns)
            leaves.add(module)
    del calls  # the recorded activations of every module
    for name, inside in untraced.items():
        hidden = [a for a in inside if a not in seen]
        if len(hidden) >= 2:
            report.skipped.append(f"{name or '<model>'} ({type(model.get_submodule(name)).__name__}): does not trace, "
                                  f"so its {len(hidden)} linear layers were not inspected")
    ffns = [ffn for _, found in pieces.values() for ffn in found]
    if not ffns:
        raise ValueError(f"moefx.convert: found no dense FFN (Linear -> activation -> Linear, or a gated form) in "
                         f"{type(model).__name__}; saw {len(affine)} linear layer(s)"
                         + (f" ({', '.join(list(affine)[:6])}{', ...' if len(affine) > 6 else ''})" if affine else "")
                         + ". " + ("; ".join(report.skipped) + ". " if report.skipped else "")
                         + "moefx converts FFNs whose activation is one of relu, gelu, gelu_tanh, silu")
    for ffn in ffns:
        if method == "upcycle" and ffn.width % tuning["granularity"]:
            raise ValueError(f"moefx.convert: {ffn.name} has {ffn.width} neurons, which do not split into "
                             f"granularity={tuning['granularity']} equal shards")
        if method != "upcycle" and ffn.width % num_experts:
            divisors = [d for d in range(2, min(ffn.width, 129)) if ffn.width % d == 0]
            raise ValueError(f"moefx.convert: {ffn.name} has {ffn.width} neurons, which do not split into "
                             f"num_experts={num_experts} equal experts; pick num_experts from {divisors}")

    if tuning["pregate"]:
        check_routed(model, ffns, blocks, untraced)
    stats = {}
    if method == "coactivation" or num_shared or tuning["router"] == "representative":
        with tqdm(total=len(batches), desc="moefx calibration", disable=not progress) as bar:
            stats = collect_hidden_stats({f.name: f.out_module for f in ffns}, {f.name: f.width for f in ffns},
                                         batches, lambda b: call_model(model, b), sample_tokens, bar)
    importance = {}
    if num_shared and tuning["importance"] == "taylor":
        importance = taylor_importance({f.name: f.out_module for f in ffns}, batches, lambda b: call_model(model, b),
                                       seed)
    carved = []
    with tqdm(total=len(ffns), desc=f"moefx {method}", disable=not progress) as bar:
        for ffn in ffns:
            if method == "upcycle":
                layer = upcycled_layer(ffn, num_experts, top_k, seed + len(report.converted), tuning["granularity"],
                                       tuning["drop_rate"], tuning["extra"])
            else:
                shared, groups = partition(ffn, stats.get(ffn.name), method, num_experts, num_shared, seed,
                                           importance.get(ffn.name))
                layer = carved_layer(ffn, shared, groups, top_k, tuning["extra"])
                if tuning["router"] == "representative":
                    representative_router(layer, ffn, groups, stats[ffn.name].samples)
                carved.append((ffn, layer))
            for key, value in routing.items():
                setattr(layer, key, value)
            gm = pieces[ffn.piece][0]
            inputs = [qualified(ffn.piece, n.target) for n in ffn.nodes
                      if n.op == "call_module" and n is not ffn.output_node and qualified(ffn.piece, n.target) in affine]
            _release_dense_weights(ffn, gm, affine)
            moe_name = replace_ffn(gm, ffn, layer)
            report.converted.append(f"{ffn.name} -> {qualified(ffn.piece, moe_name)}")
            report.layers.append(LayerOrigin(qualified(ffn.piece, moe_name), inputs, ffn.name))
            bar.update(1)
    for skipped in report.skipped:
        log.warning("moefx.convert: not converted: %s", skipped)

    if tuning["pregate"]:
        route_from_blocks(model, {name: gm for name, (gm, _) in pieces.items()}, blocks)
    model = _install(model, {name: gm for name, (gm, _) in pieces.items()})
    if carved and (tuning["router"] in FITTED_ROUTERS or tuning["compensate"] or tuning["refit"]):
        _tune_sequentially(model, [layer for _, layer in carved], [ffn.name for ffn, _ in carved], batches, tuning,
                           seed, progress)
    return model, report


def _tune_sequentially(model, layers, names, batches, tuning, seed, progress):
    """Router distillation, compensation and refit, layer by layer in execution order, each on the
    inputs the layer receives from the already tuned layers before it. The carved layer with every
    expert active is the dense FFN, so it gives the refit's target before it is changed."""
    order = list(record_calls(model, {str(i): layer for i, layer in enumerate(layers)},
                              lambda: run_batch(lambda b: call_model(model, b), batches[0], 0)))
    run = lambda b: call_model(model, b)  # noqa: E731
    with tqdm(total=len(order), desc="moefx tune", disable=not progress) as bar:
        for index in order:
            layer, name = layers[int(index)], names[int(index)]
            x, routed_from = (capture_router_rows(layer, batches, run, tuning["fit_tokens"]) if tuning["pregate"]
                              else (capture_inputs(layer, batches, run, tuning["fit_tokens"]), None))
            if layer.top_k >= layer.num_experts:  # every expert runs: the layer is exact as it is
                bar.update(1)
                continue
            dense = dense_output(layer, x)
            if tuning["compensate"] or tuning["refit"]:
                compensate_layer(layer, x)
            if tuning["router"] in FITTED_ROUTERS:
                fit = least_squares_router if tuning["router"] == "least_squares" else distill_router
                recall = fit(layer, x, seed=seed, router_input=routed_from)
                log.debug("moefx: %s %s router recall %.3f", name, tuning["router"], recall)
                if tuning["compensate"] or tuning["refit"]:
                    compensate_layer(layer, x)
            if tuning["refit"]:
                error = refit_layer(layer, x, dense)
                log.debug("moefx: %s refit relative error %.4f", name, error)
            bar.update(1)


def _install(model: nn.Module, pieces: dict[str, nn.Module]) -> nn.Module:
    """Put each rewritten piece where its module was: inside the nearest enclosing piece (whose
    graph calls the original module as a leaf), or in the model."""
    for name in sorted(pieces, key=lambda n: (-n.count(".") - bool(n), n)):
        if not name:
            return pieces[name]
        enclosing = [a for a in pieces if a != name and within(name, a)]
        owner_name = max(enclosing, key=len) if enclosing else None
        owner = model if owner_name is None else pieces[owner_name]
        relative = name if not owner_name else name[len(owner_name) + 1:]
        parent, _, child = relative.rpartition(".")
        setattr(owner.get_submodule(parent), child, pieces[name])
    return model


def _release_dense_weights(ffn, gm, affine: dict) -> None:
    """Free a dense FFN's weights once its experts hold copies, so that converting needs about one
    FFN of memory beyond the model (the dense Linears leave the model in the rewrite)."""
    for node in ffn.nodes:
        name = qualified(ffn.piece, node.target) if node.op == "call_module" else None
        if name in affine:
            affine[name] = None
            for param in gm.get_submodule(node.target).parameters(recurse=False):
                param.data = param.data.new_empty(0)
    ffn.in_maps.clear()
    ffn.w_out = ffn.b_out = None


def _affine_leaves(model: nn.Module) -> dict[str, tuple]:
    found = {}
    for name, module in model.named_modules():
        weights = affine_map(module)
        if weights is not None:
            found[name] = weights
    return found
