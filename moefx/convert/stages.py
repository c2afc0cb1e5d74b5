"""``moefx.convert`` as an ordered list of stages over one ``Conversion`` state.

Each stage is a small function ``(conversion) -> None`` that reads the recipe, and ``STAGES``
lists them in order with the recipes they apply to. A stage marked ``fits`` only sets values
(statistics, routers, refit, distillation): ``load_pretrained`` skips those stages to rebuild a
saved model's structure, then loads its values. Adding a router or a stage is one file plus one
entry here.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
from torch import Tensor, nn
from tqdm.auto import tqdm

from moefx.convert import pregate
from moefx.convert.find import affine_map, data_flow_ffn, find_ffns
from moefx.convert.rewrite import SpanSwap, apply_span_swap, as_module_swap, replace_ffn, span_swap
from moefx.convert.trace import NotTraced, qualified, record_calls, trace_piece, within
from moefx.ffn import FFN
from moefx.fit.calibrate import HiddenStats, capture_rows, collect_hidden_stats
from moefx.fit.carve import CARVERS, NEEDS_STATISTICS, carved_layer, contiguous_groups, partition, upcycled_layer
from moefx.fit.distill import teacher_outputs, train_moe_layers
from moefx.fit.importance import taylor_importance
from moefx.fit.refit import compensate, dense_output, fit_gates, refit, uniform_gates
from moefx.fit.routers import FITTED_ROUTERS, representative_router
from moefx.fit.validate import Fit, held_out_split
from moefx.layer import MoELayer
from moefx.op import ACTIVATIONS
from moefx.recipe import Recipe
from moefx.runtime import call_model, output_tensor, run_batch

log = logging.getLogger("moefx")


@dataclass
class LayerOrigin:
    """Where an MoE layer sits and which dense modules it replaced (``moefx.evaluate`` compares them)."""

    moe: str                   # qualified name of the MoELayer in the converted model
    dense_inputs: list[str]    # the dense FFN's input Linear(s) (gate and up when gated)
    dense_output: str          # the dense FFN's output Linear


@dataclass
class LayerFits:
    """How one MoE layer was tuned: the router fit and the refit, each with the ridge chosen on the
    calibration sequences held out (``Recipe.holdout``) and its held-out score."""

    ffn: str                   # the dense FFN the layer replaced
    rows: int                  # calibration rows (tokens) fitted
    held_out_sequences: int    # sequences (sentences) held out to choose the ridges; 0: fixed ridges
    router: Optional[Fit] = None
    refit: Optional[Fit] = None

    def __str__(self) -> str:
        held = (f"{self.held_out_sequences} sequences held out" if self.held_out_sequences else "no held-out split")
        return "; ".join([f"{self.ffn} ({self.rows} rows, {held})"]
                         + [str(fit) for fit in (self.router, self.refit) if fit is not None])


@dataclass
class ConversionReport:
    """What ``convert`` did: the FFNs it rewrote, by name what it could not convert and why, and how each
    layer's router and refit were fitted."""

    converted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    layers: list[LayerOrigin] = field(default_factory=list)
    fits: list[LayerFits] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)} FFN(s)"] + [f"  {n}" for n in self.converted]
        if self.skipped:
            lines += [f"not converted ({len(self.skipped)}):"] + [f"  {s}" for s in self.skipped]
        if self.fits:
            lines += ["fits (router and refit of each layer):"] + [f"  {f}" for f in self.fits]
        return "\n".join(lines)


@dataclass
class Conversion:
    """The state the stages pass along."""

    model: nn.Module
    batches: list
    recipe: Recipe
    progress: bool = True
    rebuild: bool = False                 # structure only: stages that fit values are skipped
    report: ConversionReport = field(default_factory=ConversionReport)
    affine: dict[str, Optional[tuple]] = field(default_factory=dict)    # linear leaves -> (W, b)
    calls: dict = field(default_factory=dict)         # module name -> RecordedCall on the first batch
    pieces: dict[str, tuple[fx.GraphModule, list[FFN]]] = field(default_factory=dict)  # traced pieces with FFNs
    leaves: set = field(default_factory=set)          # modules enclosing pieces treat as opaque
    untraced: dict[str, tuple[list[str], str]] = field(default_factory=dict)  # not traced -> (linears inside, why)
    blocks: dict[str, pregate.Block] = field(default_factory=dict)
    stats: dict[str, HiddenStats] = field(default_factory=dict)
    importance: dict[str, Tensor] = field(default_factory=dict)
    layers: list[tuple[FFN, MoELayer]] = field(default_factory=list)
    spans: dict[str, SpanSwap] = field(default_factory=dict)  # FFN name -> its modules' swap, where one exists
    teacher: Optional[list[Tensor]] = None

    @property
    def ffns(self) -> list[FFN]:
        return [ffn for _, found in self.pieces.values() for ffn in found]

    def run(self, batch: Any) -> Any:
        return call_model(self.model, batch)


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Conversion], None]
    applies: Callable[[Recipe], bool] = lambda recipe: True
    fits: bool = False


def record_teacher(c: Conversion) -> None:
    """The dense model's outputs on the calibration batches, before anything changes (distillation targets)."""
    c.teacher = teacher_outputs(c.run, c.batches)


def trace_and_find(c: Conversion) -> None:
    """Trace modules bottom-up (``trace.trace_piece``) and find the FFNs in each graph (``find.find_ffns``);
    a module whose graph holds FFNs becomes a piece, opaque to the modules around it, and so does one that
    traces and holds none (attention), so that its Python (masks, caches) runs at every call."""
    c.affine = {name: w for name, module in c.model.named_modules() if (w := affine_map(module)) is not None}
    candidates = {name: m for name, m in c.model.named_modules()
                  if next(m.children(), None) is not None and type(m).forward is not nn.Module.forward}
    outputs = []
    c.calls = record_calls(c.model, candidates, lambda: outputs.append(run_batch(c.run, c.batches[0], 0)))
    _check_finite(outputs[0])
    seen: set[str] = set()
    for name in sorted(c.calls, key=_innermost_first):
        module = candidates[name]
        inside = [a for a in c.affine if within(a, name)]
        opaque = [n for n, m in candidates.items() if m in c.leaves and within(n, name)]
        if len([a for a in inside if not any(within(a, o) for o in opaque)]) < 2:
            continue  # every linear layer left is inside an FFN piece or an opaque module
        try:
            gm = trace_piece(module, c.calls[name], c.leaves, name)
        except NotTraced as why:
            c.leaves.add(module)
            c.untraced[name] = (inside, str(why))
            continue
        seen.update(qualified(name, n.target) for n in gm.graph.nodes if n.op == "call_module")
        ffns, rejected = find_ffns(gm, name, c.affine)
        c.report.skipped += [r for r in rejected if r not in c.report.skipped]
        c.leaves.add(module)
        if ffns:
            c.pieces[name] = (gm, ffns)
    report_untraced_ffns(c, seen)


def _check_finite(output: Any) -> None:
    try:
        main = output_tensor(output)
    except ValueError:  # no floating-point output: nothing to check
        return
    if not torch.isfinite(main).all():
        raise ValueError("moefx.convert: the model's output on calibration batch 0 holds NaN or inf, so no traced "
                         "module can be checked against it; check the batch (and run the model in fp32) before "
                         "converting")


def report_untraced_ffns(c: Conversion, seen: set[str]) -> None:
    """Name, with the tracer's reason, every FFN inside a module that does not trace: found from data flow
    (a linear layer whose input is an activation of another's output on the calibration batch). Modules
    that do not trace but hold no FFN (attention, the root) are not failures and are not reported."""
    hidden: dict[str, str] = {}  # linear layer -> the innermost module holding it that does not trace
    for name, (inside, _) in c.untraced.items():
        for a in inside:
            if a not in seen:
                hidden.setdefault(a, name)
    if len(hidden) < 2:
        return
    modules = {a: c.model.get_submodule(a) for a in hidden}
    calls = record_calls(c.model, modules, lambda: run_batch(c.run, c.batches[0], 0))
    flows = {a: (call.args[0], call.output) for a, call in calls.items()
             if call.args and isinstance(call.args[0], Tensor) and isinstance(call.output, Tensor)}
    for out_name, (x, out) in flows.items():
        owner = hidden[out_name]
        sources = {a: flow for a, flow in flows.items() if a != out_name and hidden[a] == owner}
        where = (f"inside {owner or '<model>'} ({type(c.model.get_submodule(owner)).__name__}), which "
                 f"{c.untraced[owner][1]}")
        pattern = data_flow_ffn(x, out.shape[-1], sources)
        shaped = [a for a, (i, y) in sources.items() if i.shape[-1] == out.shape[-1] < x.shape[-1] == y.shape[-1]]
        if pattern:
            c.report.skipped.append(f"{out_name}: an FFN ({pattern} -> {out_name.rsplit('.', 1)[-1]}) {where}; it was "
                                    "not converted")
        elif shaped:
            c.report.skipped.append(f"{out_name}: {shaped[0]} -> ... -> {out_name.rsplit('.', 1)[-1]} has an FFN's "
                                    f"shape {where}; no one activation of moefx's ({', '.join(ACTIVATIONS)}) "
                                    "computes its hidden activation on the calibration batch; it was not converted")


def claim_blocks(c: Conversion) -> None:
    """Read-ME pre-gating: the transformer block of every FFN becomes a piece whose input routes it."""
    c.blocks = pregate.claim_blocks(c.model, c.calls, c.pieces, c.affine, c.leaves, c.untraced)


def check_found(c: Conversion) -> None:
    """At least one FFN, and every FFN's width splits as the recipe asks."""
    c.calls = {}  # the recorded activations of every module: no stage after this one reads them
    ffns = c.ffns
    if not ffns:
        affine = list(c.affine)
        raise ValueError(f"moefx.convert: found no dense FFN (Linear -> activation -> Linear, or a gated form) in "
                         f"{type(c.model).__name__}; saw {len(affine)} linear layer(s)"
                         + (f" ({', '.join(affine[:6])}{', ...' if len(affine) > 6 else ''})" if affine else "")
                         + ". " + ("; ".join(c.report.skipped) + ". " if c.report.skipped else "")
                         + f"moefx converts FFNs whose activation is one of {', '.join(ACTIVATIONS)}")
    for ffn in ffns:
        c.recipe.check_width(ffn.name, ffn.width)


def collect_statistics(c: Conversion) -> None:
    """Activation rates and a token sample of every FFN's hidden activation (CMoE, MoEfication)."""
    ffns = c.ffns
    with tqdm(total=len(c.batches), desc="moefx calibration", disable=not c.progress) as bar:
        c.stats = collect_hidden_stats({f.name: f.out_module for f in ffns}, {f.name: f.width for f in ffns},
                                       c.batches, c.run, c.recipe.sample_tokens, bar)


def taylor(c: Conversion) -> None:
    """First-order Taylor importance of every FFN neuron (Dense2MoE, LLaMA-MoE)."""
    c.importance = taylor_importance({f.name: f.out_module for f in c.ffns}, c.batches, c.run, c.recipe.seed)


def build_layers(c: Conversion) -> None:
    """An MoELayer per FFN: carved from its neurons (``fit.carve.CARVERS``) or upcycled from copies."""
    r = c.recipe
    extra = dict(num_zero=r.num_zero, num_copy=r.num_copy, num_const=r.num_const)
    for index, ffn in enumerate(c.ffns):
        if r.upcycle:
            layer = upcycled_layer(ffn, r.num_experts, r.top_k, r.seed + index, r.granularity,
                                   0.0 if c.rebuild else r.drop_rate, extra)
        else:
            group = contiguous_groups if c.rebuild else CARVERS[r.method]
            shared, groups = partition(ffn, c.stats.get(ffn.name), group, r.num_experts, r.num_shared, r.seed,
                                       c.importance.get(ffn.name))
            layer = carved_layer(ffn, shared, groups, r.top_k, extra, router_bias=r.fitted_router and r.biases,
                                 corrected=(r.compensate or r.refit) and r.biases, scoring=r.gating,
                                 renormalize=r.renormalize)
            if r.router == "representative" and not c.rebuild:
                representative_router(layer, ffn, groups, c.stats[ffn.name].samples)
        layer.top_p, layer.min_k = r.top_p, r.min_k
        c.layers.append((ffn, layer))


def rewrite(c: Conversion) -> None:
    """Each FFN's nodes become one call of its MoELayer; the dense weights nothing else holds are released."""
    keep = _held_outside_ffns(c)
    with tqdm(total=len(c.layers), desc=f"moefx {c.recipe.method}", disable=not c.progress) as bar:
        for ffn, layer in c.layers:
            gm = c.pieces[ffn.piece][0]
            inputs = [qualified(ffn.piece, n.target) for n in ffn.nodes if n.op == "call_module"
                      and n is not ffn.output_node and qualified(ffn.piece, n.target) in c.affine]
            span = None if c.recipe.pregate else span_swap(ffn, gm, c.model)
            if span is not None:
                c.spans[ffn.name] = span
            _release_dense_weights(ffn, gm, c.affine, keep)
            moe_name = replace_ffn(gm, ffn, layer)
            c.report.converted.append(f"{ffn.name} -> {qualified(ffn.piece, moe_name)}")
            c.report.layers.append(LayerOrigin(qualified(ffn.piece, moe_name), inputs, ffn.name))
            bar.update(1)
    for skipped in c.report.skipped:
        log.warning("moefx.convert: not converted: %s", skipped)


def wire_blocks(c: Conversion) -> None:
    """Read-ME pre-gating: every MoE call inside a block takes the block's input as its router input."""
    pregate.route_from_blocks(c.model, {name: gm for name, (gm, _) in c.pieces.items()}, c.blocks)


def install(c: Conversion) -> None:
    """Swap modules where a piece allows it, so that no traced Python stays in the model: a piece that is
    the FFN alone becomes an ``MoEFFN`` (``rewrite.as_module_swap``), an FFN spread over modules has them
    swapped (``rewrite.SpanSwap``). Other pieces are installed as traced, guarded graphs where their module
    was (inside the nearest enclosing piece, or the model). Either goes to every path the module had (a
    module shared by two parents stays shared)."""
    layer_of = {ffn.name: layer for ffn, layer in c.layers}
    pieces = {}
    for name, (gm, ffns) in c.pieces.items():
        swap = as_module_swap(gm)
        if swap is not None:
            _rename_layer(c.report, gm, swap.moe, name, "moe")
            pieces[name] = swap
        elif ffns and all(f.name in c.spans for f in ffns):
            for ffn in ffns:
                span = c.spans[ffn.name]
                apply_span_swap(c.model, span, layer_of[ffn.name])
                _rename_layer(c.report, gm, layer_of[ffn.name], name, f"{span.entry}.moe")
        else:
            pieces[name] = gm
    for name in sorted(pieces, key=_innermost_first):
        if not name:
            c.model = pieces[name]
            return
        enclosing = [a for a in pieces if a != name and within(name, a)]
        owner_name = max(enclosing, key=len) if enclosing else None
        owner = c.model if owner_name is None else pieces[owner_name]
        original = c.model.get_submodule(name) if owner_name is None else None
        paths = ([n for n, m in c.model.named_modules(remove_duplicate=False) if m is original]
                 if original is not None else [name[len(owner_name) + 1:]])
        for relative in paths:
            parent, _, child = relative.rpartition(".")
            setattr(owner.get_submodule(parent), child, pieces[name])


def _rename_layer(report: ConversionReport, gm: fx.GraphModule, layer: MoELayer, piece: str, path: str) -> None:
    """A swapped MoE layer sits at ``path`` (model-level for a span swap, else within the piece)."""
    old = qualified(piece, next(n for n, m in gm.named_modules() if m is layer))
    new = path if path != "moe" else qualified(piece, "moe")
    for origin in report.layers:
        if origin.moe == old:
            origin.moe = new
    report.converted = [line[: -len(old)] + new if line.endswith(f"-> {old}") else line
                        for line in report.converted]


def tune_layers(c: Conversion) -> None:
    """Router fit, compensation and refit of the carved layers, layer by layer in execution order, each on the
    inputs it receives from the already tuned layers before it. A carved layer with every expert active is the
    dense FFN, so it gives the refit's target before it is changed."""
    r = c.recipe
    layers = [layer for _, layer in c.layers]
    names = [ffn.name for ffn, _ in c.layers]
    order = list(record_calls(c.model, {str(i): layer for i, layer in enumerate(layers)},
                              lambda: run_batch(c.run, c.batches[0], 0)))
    with tqdm(total=len(order), desc="moefx tune", disable=not c.progress) as bar:
        for index in order:
            layer, name = layers[int(index)], names[int(index)]
            *rows, sequences = capture_rows(layer, c.batches, c.run, r.fit_tokens, arguments=2 if r.pregate else 1)
            x, routed_from = rows[0], (rows[1] if r.pregate else None)
            bar.update(1)
            if layer.top_k >= layer.num_experts:  # every expert runs: the layer is exact as it is (equal gates)
                if r.gating != "unit":
                    uniform_gates(layer)
                continue
            held_out = held_out_split(sequences, r.holdout, r.seed + int(index))
            fits = LayerFits(name, x.shape[0], 0 if held_out is None else len(sequences[held_out].unique()))
            dense = dense_output(layer, x)
            if r.compensate or (r.refit and r.biases):
                compensate(layer, x)
            if r.fitted_router:
                fits.router = FITTED_ROUTERS[r.router](layer, x, seed=r.seed, router_input=routed_from,
                                                       held_out=held_out, bias=r.biases)
                if r.compensate or (r.refit and r.biases):
                    compensate(layer, x)
            if r.refit and r.gating != "unit":
                fits.refit = fit_gates(layer, x, dense, r.biases, held_out=held_out)
            elif r.refit:
                fits.refit = refit(layer, x, dense, held_out=held_out, biases=r.biases)
            if fits.router or fits.refit:
                log.debug("moefx: %s", fits)
                c.report.fits.append(fits)


def distill(c: Conversion) -> None:
    """End-to-end distillation of the MoE layers against the dense outputs recorded first (``fit.distill``)."""
    r = c.recipe
    c.model.moefx_distill = train_moe_layers(c.model, c.run, c.batches, c.teacher, steps=r.distill_steps, lr=1e-4,
                                             balance=1e-2, experts=True, seed=r.seed, progress=c.progress,
                                             held_out=r.holdout, max_seconds=r.distill_seconds)


def _carved_and_tuned(r: Recipe) -> bool:
    return not r.upcycle and (r.fitted_router or r.compensate or r.refit)


STAGES = [
    Stage("teacher", record_teacher, lambda r: r.distill_steps > 0, fits=True),
    Stage("trace and find", trace_and_find),
    Stage("claim blocks", claim_blocks, lambda r: r.pregate == "block"),
    Stage("check", check_found),
    Stage("statistics", collect_statistics, lambda r: not r.upcycle and (
        r.method in NEEDS_STATISTICS or (r.num_shared and r.importance == "activation")
        or r.router == "representative"), fits=True),
    Stage("importance", taylor, lambda r: r.num_shared > 0 and r.importance == "taylor", fits=True),
    Stage("build layers", build_layers),
    Stage("rewrite", rewrite),
    Stage("wire blocks", wire_blocks, lambda r: r.pregate == "block"),
    Stage("install", install),
    Stage("tune", tune_layers, _carved_and_tuned, fits=True),
    Stage("distill", distill, lambda r: r.distill_steps > 0, fits=True),
]


def run_stages(c: Conversion) -> None:
    for stage in STAGES:
        if stage.applies(c.recipe) and not (c.rebuild and stage.fits):
            log.debug("moefx.convert: stage %s", stage.name)
            stage.run(c)


def _innermost_first(name: str) -> tuple:
    return -name.count(".") - bool(name), name


def _held_outside_ffns(c: Conversion) -> set[int]:
    """ids of the parameters that a module outside every found FFN holds (an embedding tied to a Linear, an
    FFN module that a second parent also calls): converting must not release them."""
    ffn_modules = {id(c.pieces[f.piece][0].get_submodule(n.target)) for f, _ in c.layers for n in f.nodes
                   if n.op == "call_module"}
    ffn_paths = {qualified(f.piece, n.target) for f, _ in c.layers for n in f.nodes if n.op == "call_module"}
    held = set()
    for name, module in c.model.named_modules(remove_duplicate=False):
        if id(module) in ffn_modules and name in ffn_paths:
            continue
        held.update(id(p) for p in module.parameters(recurse=False))
    return held


def _release_dense_weights(ffn: FFN, gm: fx.GraphModule, affine: dict, keep: set[int]) -> None:
    """Free a dense FFN's weights once its experts hold copies, so that converting needs about one
    FFN of memory beyond the model (the dense Linears leave the model in the rewrite); weights that
    another module still holds (``keep``) stay."""
    for node in ffn.nodes:
        name = qualified(ffn.piece, node.target) if node.op == "call_module" else None
        if name in affine:
            affine[name] = None
            for param in gm.get_submodule(node.target).parameters(recurse=False):
                if id(param) not in keep:
                    param.data = param.data.new_empty(0)
    ffn.in_maps.clear()
    ffn.w_out = ffn.b_out = None
