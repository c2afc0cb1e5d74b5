"""Save a converted model and load it back (safetensors).

``save_pretrained(moe, path)`` writes the converted weights (``model.safetensors``), the
transformers config when the model has one, and the conversion recipe with one row of the
calibration batch (``moefx.json``, ``moefx_example.safetensors``). ``load_pretrained(path)`` builds
the dense model from the config, converts it again with the recipe (tracing on the stored row;
the carving itself is discarded) and loads the saved weights strictly, so routers, refitted
experts and biases come back exactly.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch
from torch import nn

from moefx.layer import MoELayer

WEIGHTS, RECIPE, EXAMPLE = "model.safetensors", "moefx.json", "moefx_example.safetensors"


def save_pretrained(moe: nn.Module, path: str) -> None:
    """Write ``moe`` (returned by ``moefx.convert``) to directory ``path``."""
    from safetensors.torch import save_file, save_model

    recipe = getattr(moe, "moefx_recipe", None)
    if recipe is None:
        raise ValueError("moefx.save_pretrained: the model carries no conversion recipe; save the model that "
                         "moefx.convert returned")
    os.makedirs(path, exist_ok=True)
    save_model(moe, os.path.join(path, WEIGHTS))
    example = recipe["example"]
    kind = "dict" if isinstance(example, dict) else "tuple" if isinstance(example, (tuple, list)) else "tensor"
    items = example if isinstance(example, dict) else {str(i): v for i, v in enumerate(
        example if kind == "tuple" else [example])}
    tensors = {k: v.contiguous() for k, v in items.items() if isinstance(v, torch.Tensor)}
    constants = {k: v for k, v in items.items() if not isinstance(v, torch.Tensor)}
    save_file(tensors, os.path.join(path, EXAMPLE))
    config = getattr(moe, "config", None)
    if config is not None and hasattr(config, "save_pretrained"):
        config.save_pretrained(path)
    meta = {k: v for k, v in recipe.items() if k != "example"}
    meta.update(example_kind=kind, example_constants=constants, model_class=type(moe).__name__)
    with open(os.path.join(path, RECIPE), "w") as f:
        json.dump(meta, f, indent=2)


def load_pretrained(path: str, model: Optional[nn.Module] = None) -> nn.Module:
    """Load what ``save_pretrained`` wrote. ``model``: the dense model to convert (any weights; they are
    replaced); default: built from the saved transformers config with ``AutoModel``'s class of the
    same name (or ``AutoModel``)."""
    from safetensors.torch import load_file, load_model

    import moefx

    with open(os.path.join(path, RECIPE)) as f:
        meta = json.load(f)
    if model is None:
        model = _dense_from_config(path, meta["model_class"])
    stored = load_file(os.path.join(path, EXAMPLE))
    items = {**stored, **meta["example_constants"]}
    if meta["example_kind"] == "dict":
        example: Any = items
    else:
        ordered = [items[str(i)] for i in range(len(items))]
        example = ordered if meta["example_kind"] == "tuple" else ordered[0]
    moe = moefx.convert(model, meta["num_experts"], meta["top_k"], [example], method="random",
                        num_shared=meta["num_shared"], top_p=meta["top_p"], min_k=meta["min_k"], progress=False)
    weights = load_file(os.path.join(path, WEIGHTS))
    _add_missing_biases(moe, weights)
    load_model(moe, os.path.join(path, WEIGHTS), strict=True)
    return moe


def _dense_from_config(path: str, class_name: str) -> nn.Module:
    if not os.path.exists(os.path.join(path, "config.json")):
        raise ValueError(f"moefx.load_pretrained: {path} has no config.json; pass the dense model: "
                         "load_pretrained(path, model=MyModel())")
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    cls = getattr(transformers, class_name, None) or transformers.AutoModel
    build = cls.from_config if cls is transformers.AutoModel else cls._from_config
    return build(config).eval()


def _add_missing_biases(moe: nn.Module, weights: dict) -> None:
    """Refit and router distillation add biases a fresh conversion lacks: create them to load into."""
    for name, layer in moe.named_modules():
        if not isinstance(layer, MoELayer):
            continue
        for attr, owner, key in (("b_out", layer, "b_out"), ("bias", layer, "bias"), ("bias", layer.router, "router.bias")):
            full = f"{name}.{key}"
            if full in weights and getattr(owner, attr) is None:
                setattr(owner, attr, nn.Parameter(torch.zeros_like(weights[full], dtype=layer.w_in.dtype)))
