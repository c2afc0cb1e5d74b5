"""``export_onnx``: write a moefx MoE model as ONNX, choosing per layer between onnxruntime's
fused com.microsoft.MoE and standard ONNX ops (see ``translate.py``), then check the file in
onnxruntime against PyTorch."""
from __future__ import annotations

import dataclasses
import inspect
import logging
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch.utils import _pytree as pytree

from moefx.onnx.probe import probe_contrib
from moefx.op import unflatten, with_op_signature
from moefx.onnx.translate import (APPROXIMATIONS, MoEConfig, config_of, contrib_blocker, contrib_moe, dense_moe,
                                  sparse_moe)

log = logging.getLogger(__name__)
TARGETS = ("auto", "onnxruntime", "standard", "standard-dense")
DEFAULT_AXES = ("batch", "sequence")


class UnsupportedLayerError(ValueError):
    """A layer that ``target="onnxruntime"`` cannot emit as com.microsoft.MoE."""


@dataclasses.dataclass
class LayerExport:
    """How one moefx::moe call was lowered, and why."""

    index: int
    config: MoEConfig
    target: str
    reason: str
    approximated: bool = False


@dataclasses.dataclass
class ExportReport:
    path: Path
    layers: list[LayerExport]
    node_counts: Counter
    max_abs_error: Optional[float] = None
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def approximated(self) -> bool:
        return any(layer.approximated for layer in self.layers)

    def __str__(self) -> str:
        lines = [f"{self.path}: {len(self.layers)} MoE layer(s), {sum(self.node_counts.values())} nodes"]
        lines += [f"  layer {layer.index}: {layer.target:<14} {layer.config.describe()} ({layer.reason})"
                  for layer in self.layers]
        lines += [f"  note: {note}" for note in self.notes]
        if self.max_abs_error is not None:
            approx = " (includes the tanh-GELU approximation you asked for)" if self.approximated else ""
            lines.append(f"  onnxruntime CPU vs PyTorch on the example inputs: max abs error "
                         f"{self.max_abs_error:.2e}{approx}")
        return "\n".join(lines)


class MoETranslator:
    """The translation of ``torch.ops.moefx.moe`` for torch.onnx's dynamo exporter; records each layer."""

    def __init__(self, target: str, approximate: bool):
        self.target, self.approximate = target, approximate
        self.layers: list[LayerExport] = []
        self.error: Optional[UnsupportedLayerError] = None

    def translate(self, *op_args):
        inputs, attrs = unflatten(op_args)
        if attrs.halves:
            raise UnsupportedLayerError(
                f"MoE layer {len(self.layers)} ({attrs.describe()}) stores its gate/up rows as halves; the ONNX "
                "translation reads interleaved rows. Build the op with moefx.op.interleaved(inputs, attrs).")
        cfg = config_of(inputs, attrs)
        target, reason = self._choose(cfg)
        approximated = target == "onnxruntime" and self.approximate and cfg.activation in APPROXIMATIONS
        self.layers.append(LayerExport(len(self.layers), cfg, target, reason, approximated))
        if target == "onnxruntime":
            return contrib_moe(inputs, cfg, self.approximate)
        return dense_moe(inputs, attrs) if target == "standard-dense" else sparse_moe(inputs, attrs)

    def _choose(self, cfg: MoEConfig) -> tuple[str, str]:
        if self.target in ("standard", "standard-dense"):
            return self.target, f"target={self.target!r}"
        blocker = contrib_blocker(cfg, self.approximate)
        if blocker is None:
            probe = probe_contrib(cfg, self.approximate)
            if probe.ok:
                return "onnxruntime", probe.detail
            blocker = f"{probe.detail} for {cfg.describe()}"
        if self.target == "onnxruntime":
            self.error = UnsupportedLayerError(
                f"MoE layer {len(self.layers)} ({cfg.describe()}) cannot be exported as com.microsoft.MoE: "
                f"{blocker}. Export it with target='standard' (sparse standard ONNX ops, any runtime) or "
                "target='auto' (com.microsoft.MoE where it fits, standard ops elsewhere).")
            raise self.error
        return "standard", blocker


def export_onnx(
    model: torch.nn.Module,
    example_inputs: Union[Sequence[Any], Mapping[str, Any], torch.Tensor],
    path: Union[str, Path],
    target: str = "auto",
    *,
    approximate: bool = False,
    dynamic_axes: Optional[Mapping[str, Mapping[int, str]]] = None,
    opset: int = 18,
    verify: bool = True,
) -> ExportReport:
    """Export ``model`` (with moefx MoE layers) to ONNX at ``path``.

    target: "onnxruntime" (each MoE layer one com.microsoft.MoE node, unit-gated and sigmoid layers
    routed in the graph; error for a layer it cannot express: dynamic-k, zero-computation experts),
    "standard" (standard ONNX ops only, any runtime; only the chosen experts' rows are computed),
    "standard-dense" (standard ops, every expert computed densely; graph size independent of the
    number of experts), or "auto" (the contrib op where it is exact and the installed onnxruntime
    runs it correctly, "standard" elsewhere; each fallback's reason is in the report).
    approximate: let com.microsoft.MoE's tanh-GELU stand in for exact GELU; the report then
    carries the error measured in onnxruntime. example_inputs: positional inputs (a tensor or a
    tuple) or keyword inputs (a dict). dynamic_axes: {input name: {axis: dim name}}; by default
    axes 0 and 1 of every input are dynamic ("batch", "sequence"); an example of size 1 along one
    (one sentence) is exported from a copy doubled along it, since torch.export specializes size-1
    axes, and the file is then checked on the example itself. A transformers model whose forward takes
    ``use_cache`` is exported with ``use_cache=False`` unless you pass it: the KV cache is left out of
    the graph (the report notes it). verify: run the file in onnxruntime CPU on the example inputs
    and record the max abs error against PyTorch.
    """
    if target not in TARGETS:
        raise ValueError(f"target={target!r} is not one of {TARGETS}")
    args, kwargs = split_inputs(example_inputs)
    kwargs, notes = without_cache(model, kwargs)
    shapes = dynamic_shapes(model, args, kwargs, dynamic_axes)
    export_args, export_kwargs = widened(model, args, kwargs, shapes)
    exported = with_moe_blocks_rewritten(model, export_args, export_kwargs, shapes)
    translator = MoETranslator(target, approximate)

    @with_op_signature()
    def moefx_moe(*op_args) -> torch.Tensor:  # torch.onnx reads the translation's signature
        return translator.translate(*op_args)

    try:
        with warnings.catch_warnings():
            # torch.onnx notes that inputs sharing a Dim share its name: that is the point of sharing it
            warnings.filterwarnings("ignore", message="# The axis name")
            program = torch.onnx.export(
                exported, export_args, kwargs=export_kwargs, dynamo=True, opset_version=opset, verbose=False,
                custom_translation_table={torch.ops.moefx.moe.default: moefx_moe}, dynamic_shapes=shapes)
    except Exception:
        if translator.error is not None:
            raise translator.error from None
        raise
    path = Path(path)
    program.save(str(path))
    report = ExportReport(path, translator.layers, count_nodes(program.model_proto), notes=notes)
    if verify:
        report.max_abs_error = max_abs_error(path, model, args, kwargs)
    log.info("%s", report)
    return report


def export_and_check(model: torch.nn.Module, example_inputs, path: Union[str, Path],
                     check_inputs: Sequence[Any] = (), target: str = "auto", approximate: bool = False) -> float:
    """Export ``model`` and return the max abs error of onnxruntime CPU against PyTorch over the example
    inputs and every entry of ``check_inputs`` (other batch and sequence sizes exercise the dynamic axes)."""
    report = export_onnx(model, example_inputs, path, target=target, approximate=approximate)
    errors = [report.max_abs_error] + [max_abs_error(path, model, *split_inputs(inputs)) for inputs in check_inputs]
    return max(errors)


def with_moe_blocks_rewritten(model: torch.nn.Module, args: tuple, kwargs: dict, shapes: dict) -> torch.nn.Module:
    """``model`` itself, or, when it holds stacked expert weights outside moefx layers (transformers'
    Mixtral, Qwen2/3-MoE, OLMoE blocks), its Dynamo graph with those blocks rewritten into moefx::moe
    calls by ``moefx.compile.moe_blocks``, the pass the compile backend uses."""
    from moefx.layer import MoELayer
    from moefx.compile.moe_blocks import rewrite_moe_blocks

    not_experts = {id(p) for m in model.modules() if isinstance(m, (MoELayer, torch.nn.modules.conv._ConvNd))
                   for p in m.parameters()}
    if not any(p.dim() == 3 and id(p) not in not_experts for p in model.parameters()):
        return model
    try:
        gm, _ = torch._dynamo.export(model, dynamic_shapes=shapes)(*args, **kwargs)
    except Exception as error:
        raise RuntimeError(
            f"moefx ONNX export: {type(model).__name__} holds stacked expert weights, so moefx captures it with "
            "Dynamo to rewrite its MoE blocks, and the capture failed (a graph break?). For a transformers MoE "
            "model call model.set_experts_implementation('grouped_mm') (the default) or 'batched_mm'; the eager "
            "per-expert loop does not capture.") from error
    rewritten = rewrite_moe_blocks(gm, halves=False)  # the ONNX translation reads interleaved rows
    if not rewritten:
        log.warning("moefx ONNX export: %s holds 3-D (stacked expert?) weights but no MoE block was recognised; "
                    "exporting it as it is (see moefx.compile.moe_blocks debug logs for why)", type(model).__name__)
        return model
    log.info("moefx ONNX export: rewrote %d MoE block(s) of %s into moefx::moe", rewritten, type(model).__name__)
    return gm


def without_cache(model: torch.nn.Module, kwargs: dict) -> tuple[dict, list[str]]:
    """``kwargs`` with ``use_cache=False`` added where ``model.forward`` takes ``use_cache`` and the caller did
    not pass it (transformers decoders return a DynamicCache by default, which is no ONNX tensor), and the
    report's note saying so when the model's config would have returned a cache."""
    if "use_cache" in kwargs or "use_cache" not in inspect.signature(model.forward).parameters:
        return kwargs, []
    notes = []
    if getattr(getattr(model, "config", None), "use_cache", False):
        notes.append("exported with use_cache=False: the KV cache (past_key_values) is neither an input nor an "
                     "output of the graph")
    return {**kwargs, "use_cache": False}, notes


def widened(model: torch.nn.Module, args: tuple, kwargs: dict, shapes: dict) -> tuple[tuple, dict]:
    """The inputs with every size-1 dynamic axis doubled (the example repeated along it): torch.export
    specializes sizes 0 and 1, so a one-sentence example would fix the batch size at 1. Positional inputs
    stay positional and keyword inputs keyword, in the caller's order (the ONNX inputs follow it)."""
    signature = inspect.signature(model.forward)
    values = signature.bind(*args, **kwargs).arguments
    for name, value in values.items():
        for axis in (shapes.get(name) or {}):
            if isinstance(value, torch.Tensor) and value.shape[axis] == 1:
                value = torch.cat([value, value], dim=axis)
        values[name] = value
    positional = [p.name for p in signature.parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    new_args = tuple(values[positional[i]] if i < len(positional) else arg for i, arg in enumerate(args))
    return new_args, {name: values.get(name, value) for name, value in kwargs.items()}


def split_inputs(example_inputs) -> tuple[tuple, dict]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    return tuple(example_inputs), {}


def dynamic_shapes(model: torch.nn.Module, args: tuple, kwargs: dict,
                   dynamic_axes: Optional[Mapping[str, Mapping[int, str]]]) -> dict:
    """torch.export dynamic shapes, by forward() parameter name, with one Dim per axis name."""
    bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
    dims: dict[str, torch.export.Dim] = {}
    unknown = set(dynamic_axes or {}) - set(bound)
    if unknown:
        raise ValueError(f"dynamic_axes names {sorted(unknown)}, but the inputs are {sorted(bound)}")
    shapes = {}
    for name, value in bound.items():
        if not isinstance(value, torch.Tensor):
            shapes[name] = None
            continue
        axes = dict(enumerate(DEFAULT_AXES[:value.dim()])) if dynamic_axes is None else dynamic_axes.get(name, {})
        for axis in axes:
            if value.shape[axis] == 0:
                raise ValueError(f"input {name!r} is empty along dynamic axis {axis} ({axes[axis]!r}); give an "
                                 "example with at least one entry there (one sentence is enough)")
        shapes[name] = {axis: dims.setdefault(dim, torch.export.Dim(dim)) for axis, dim in axes.items()} or None
    return shapes


def count_nodes(model_proto) -> Counter:
    """Node counts by "domain::op_type" ("::op_type" for the standard domain), subgraphs included."""
    counts: Counter = Counter()

    def visit(graph):
        for node in graph.node:
            counts[f"{node.domain}::{node.op_type}"] += 1
            for attr in node.attribute:
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    visit(sub)
    visit(model_proto.graph)
    for function in model_proto.functions:
        for node in function.node:
            counts[f"{node.domain}::{node.op_type}"] += 1
    return counts


def run_onnx(path: Union[str, Path], *args, **kwargs) -> list[torch.Tensor]:
    """Run the ONNX file in onnxruntime CPU with inputs given as the PyTorch model takes them."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    positional = [t for t in pytree.tree_leaves(args) if isinstance(t, torch.Tensor)]
    named = {k: t for k, t in kwargs.items() if isinstance(t, torch.Tensor)}
    feeds = {}
    for graph_input in session.get_inputs():  # keyword inputs by name, the rest in order
        if graph_input.name in named:
            value = named.pop(graph_input.name)
        elif positional:
            value = positional.pop(0)
        elif named:
            value = named.pop(next(iter(named)))
        else:
            raise ValueError(f"{path} takes an input {graph_input.name!r} that the given inputs do not provide")
        feeds[graph_input.name] = value.detach().cpu().numpy()
    return [torch.from_numpy(out) for out in session.run(None, feeds)]


def max_abs_error(path: Union[str, Path], model: torch.nn.Module, args: tuple = (), kwargs: Optional[dict] = None
                  ) -> float:
    """Max abs difference between onnxruntime CPU running ``path`` and PyTorch running ``model``."""
    kwargs, _ = without_cache(model, kwargs or {})
    with torch.no_grad():
        expected = [t for t in pytree.tree_leaves(model(*args, **kwargs)) if isinstance(t, torch.Tensor)]
    actual = run_onnx(path, *args, **kwargs)
    if len(actual) != len(expected):
        raise RuntimeError(f"{path} has {len(actual)} outputs but the model returns {len(expected)} tensors")
    return max(float((a.float() - e.detach().float()).abs().max()) if e.numel() else 0.0
               for a, e in zip(actual, expected))
