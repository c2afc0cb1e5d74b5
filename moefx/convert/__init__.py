"""``moefx.convert``: trace, find every dense FFN, rewrite each into an ``MoELayer``.

The conversion is the ordered stage list in ``convert/stages.py`` run over one ``Conversion``
state; its options are one ``moefx.Recipe`` (``moefx/recipe.py``).
"""
from __future__ import annotations

import copy
import os
from typing import Any, Iterable, Optional, Union

import torch
from torch import nn

from moefx.convert.stages import Conversion, ConversionReport, LayerOrigin, run_stages
from moefx.recipe import Recipe, resolve
from moefx.runtime import read_batches

__all__ = ["ConversionReport", "LayerOrigin", "Recipe", "convert"]


def convert(
    model: nn.Module,
    num_experts: Union[int, Iterable[Any], None] = None,
    top_k: Union[int, Recipe, None] = None,
    calibration: Optional[Iterable[Any]] = None,
    *,
    recipe: Optional[Recipe] = None,
    inplace: bool = False,
    progress: bool = True,
    **options: Any,
) -> nn.Module:
    """Rewrite every dense FFN of ``model`` into an MoE layer and return the converted model.

    Call it as ``convert(model, calibration, recipe)`` with a ``moefx.Recipe``, or as
    ``convert(model, num_experts, top_k, calibration, **options)`` with the recipe's fields as
    keywords (``help(moefx.Recipe)`` documents every one; ``Recipe.help()`` lists them).

    Args:
        calibration: a list of model inputs (dict of kwargs, tuple of args, or a tensor); one batch
            alone is ``[batch]``. They are copied (a model may add keys to its input dict). At least one is
            needed to trace the model; statistics, fitted routers, refit and distillation use all.
            Router, compensation and refit run layer after layer on the inputs each layer gets
            from the already converted layers before it; padding tokens (attention_mask 0) of
            dict batches are left out.
        inplace: convert ``model`` itself instead of a copy (saves the copy's memory).
        progress: progress bars.

    With ``top_k == num_experts - num_shared`` the converted model computes what ``model`` does
    (zero-computation experts stay switched off there: the router has nothing to choose).
    FFN modules are swapped for MoE layers, so the model's own forward (masks, caches, ``generate``)
    runs as before; an FFN no swap can reach stays in a traced graph of its parent that refuses, by
    name, calls unlike the calibration call. Use the returned module: when the whole model is one
    FFN or one traced piece, it is a new module.
    It carries ``moefx_report`` (what was converted, and by name what was not and why) and
    ``moefx_recipe``.
    """
    if isinstance(model, (str, os.PathLike)):
        raise TypeError(f"moefx.convert: {model!r} is a path; convert a checkpoint directory with "
                        "moefx.convert_pretrained(src, dst, num_experts=..., top_k=...) (layer by layer, writes dst) "
                        "and load the result with moefx.load_pretrained(dst)")
    if isinstance(top_k, Recipe):  # convert(model, calibration, recipe)
        calibration, recipe, num_experts, top_k = num_experts, top_k, None, None
    recipe = _recipe(recipe, num_experts, top_k, options)
    _check_model(model)
    batches = _batches(calibration, recipe)
    return _run(model, batches, recipe, inplace=inplace, progress=progress)


def rebuild(model: nn.Module, example: Any, recipe: Recipe, inplace: bool = False) -> nn.Module:
    """The structure ``convert`` gives ``model`` under ``recipe``, traced on ``example``, without fitting
    anything (``load_pretrained`` then loads the values)."""
    return _run(model, [example], recipe, inplace=inplace, progress=False, rebuild=True)


def _run(model: nn.Module, batches: list, recipe: Recipe, *, inplace: bool, progress: bool,
         rebuild: bool = False) -> nn.Module:
    target = model if inplace else copy.deepcopy(model)
    was_training = target.training
    target.eval()
    conversion = Conversion(target, batches, recipe, progress, rebuild)
    try:
        run_stages(conversion)
    finally:
        target.train(was_training)
    converted = conversion.model
    converted.train(was_training)
    converted.moefx_report = conversion.report
    converted.moefx_recipe = recipe
    converted.moefx_example = _first_row(batches[0])
    return converted


def _recipe(recipe: Optional[Recipe], num_experts, top_k, options: dict) -> Recipe:
    if recipe is not None:
        if num_experts is not None or top_k is not None or options:
            raise TypeError("moefx.convert: pass either recipe= or the options (num_experts, top_k, ...), not both; "
                            "change a recipe with dataclasses.replace(recipe, top_k=...)")
        if not isinstance(recipe, Recipe):
            raise TypeError(f"moefx.convert: recipe is a {type(recipe).__name__}; pass a moefx.Recipe "
                            "(Recipe.from_dict(d) reads a dict)")
        return recipe
    given = {k: v for k, v in (("num_experts", num_experts), ("top_k", top_k)) if v is not None}
    unknown = sorted(set(options) - set(Recipe.help()))
    if unknown:
        raise TypeError(f"moefx.convert: unknown option(s) {unknown}; the options are the fields of moefx.Recipe: "
                        f"{sorted(Recipe.help())}")
    return resolve({**given, **options})


def _batches(calibration: Optional[Iterable[Any]], recipe: Recipe) -> list:
    needs = ("" if recipe.method == "split" and not recipe.num_shared else
             f", and method={recipe.method!r}" + (f" with num_shared={recipe.num_shared}" if recipe.num_shared
                                                  else "") + " computes neuron statistics from it")
    return read_batches([] if calibration is None else calibration, "moefx.convert", "calibration",
                        ": moefx traces the model on it" + needs)


def _check_model(model: nn.Module) -> None:
    meta = next((n for n, p in model.named_parameters() if p.is_meta), None)
    if meta is not None:
        raise ValueError(f"moefx.convert: {meta} is on the meta device (a model built without weights); load the "
                         "weights first (from_pretrained, or model.to_empty(device='cpu') then load_state_dict)")
    broken = next((n for n, p in model.named_parameters() if not torch.isfinite(p).all()), None)
    if broken is not None:
        raise ValueError(f"moefx.convert: {broken} holds NaN or inf values; load the weights again (a corrupt "
                         "or half-written checkpoint)")


def _first_row(batch: Any) -> Any:
    """One row of a calibration batch: enough for ``moefx.load_pretrained`` to trace the model again."""
    if isinstance(batch, dict):
        return {k: v[:1].clone() if isinstance(v, torch.Tensor) and v.dim() else v for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(v[:1].clone() if isinstance(v, torch.Tensor) and v.dim() else v for v in batch)
    return batch[:1].clone() if isinstance(batch, torch.Tensor) and batch.dim() else batch
