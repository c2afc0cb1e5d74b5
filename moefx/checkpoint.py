"""Save a converted model and load it back (safetensors).

``save_pretrained(moe, path)`` writes the converted weights (``moefx_model.safetensors``: not
``model.safetensors``, so that transformers refuses to load the directory as the dense
architecture with its FFNs left random), the transformers config when the model has one, and the
conversion recipe with one row of the calibration batch and the weights' dtype (``moefx.json``,
``moefx_example.safetensors``). Every file is written to a temporary directory first and moved in
only once all are written, so a failed save leaves the directory as it was. ``load_pretrained(path)`` builds
the dense model from the config, converts it again with the recipe (tracing on the stored row;
the carving itself is discarded) and loads the saved weights strictly, so routers, refitted
experts and biases come back exactly.

``save_pretrained(moe, path, layout="mixtral" | "qwen2_moe" | "qwen3_moe")`` instead writes a
checkpoint that transformers (and serving engines: vLLM, SGLang, llama.cpp) load with their own MoE
classes, without moefx: Mixtral (Jiang et al. 2024) from Llama/Mistral, Qwen1.5-MoE / Qwen2-MoE from
Llama/Mistral/Qwen2, Qwen3-MoE from Qwen3. They hold upcycled layers and router-weighted carved ones
(``Recipe.gating="softmax"``, ``biases=False``). Only layers every engine computes the same way are
written; anything else (unit gates, biases, dynamic-k, zero-computation experts, a ``norm_topk_prob``
llama.cpp ignores) is refused by layer, with an option or layout that works. The checkpoint is
written to a temporary directory, loaded back with the target class and checked (logits within
1e-5 relative at fp32, the same greedy tokens) before its files replace those in ``path``, so a
failed save leaves an existing checkpoint as it was.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import tempfile
from typing import Any, Optional

import torch
import torch.fx as fx
from torch import nn

from moefx.convert import rebuild
from moefx.convert.rewrite import MoEFFN
from moefx.layer import MoELayer
from moefx.recipe import Recipe
from moefx.runtime import call_model
from moefx.shards import INDEX, MOEFX_INDEX, read_header, read_shard, shard_files

WEIGHTS, RECIPE, EXAMPLE = "moefx_model.safetensors", "moefx.json", "moefx_example.safetensors"
FILES = "moefx_files.json"  # the files moefx wrote into a checkpoint directory
LEGACY_WEIGHTS = "model.safetensors"  # moefx-layout checkpoints written before the weights were renamed
LAYOUTS = ("moefx", "mixtral", "qwen2_moe", "qwen3_moe")


def save_pretrained(moe: nn.Module, path: str, layout: str = "moefx") -> None:
    """Write ``moe`` (returned by ``moefx.convert``) to directory ``path``.

    layout: "moefx" (weights + conversion recipe; load with ``moefx.load_pretrained``), or
    "mixtral" / "qwen2_moe" / "qwen3_moe": a transformers checkpoint that
    ``AutoModelForCausalLM.from_pretrained`` loads as ``MixtralForCausalLM`` (from Llama/Mistral) /
    ``Qwen2MoeForCausalLM`` (Llama/Mistral/Qwen2) / ``Qwen3MoeForCausalLM`` (Qwen3). Such a checkpoint is
    loaded back with that class before the call returns and, for an fp32/fp64 model, must give the
    converted model's logits and greedy tokens. Files go to a temporary directory first and replace
    those in ``path`` only once written (and checked), so a failed save leaves ``path`` as it was.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"moefx.save_pretrained: layout={layout!r} is not one of {LAYOUTS}")
    recipe = getattr(moe, "moefx_recipe", None)
    if not isinstance(recipe, Recipe):
        raise ValueError("moefx.save_pretrained: the model carries no conversion recipe; save the model that "
                         "moefx.convert returned")
    example = moe.moefx_example
    if layout != "moefx":
        _save_transformers_layout(moe, path, layout, example, recipe)
        return
    _write_atomically(path, lambda directory: _write_moefx_layout(moe, directory, recipe, example))


def _write_moefx_layout(moe: nn.Module, path: str, recipe: Recipe, example: Any) -> None:
    from safetensors.torch import save_file, save_model

    save_model(moe, os.path.join(path, WEIGHTS))
    kind = "dict" if isinstance(example, dict) else "tuple" if isinstance(example, (tuple, list)) else "tensor"
    items = example if isinstance(example, dict) else {str(i): v for i, v in enumerate(
        example if kind == "tuple" else [example])}
    tensors = {k: v.contiguous() for k, v in items.items() if isinstance(v, torch.Tensor)}
    constants = {k: v for k, v in items.items() if not isinstance(v, torch.Tensor)}
    save_file(tensors, os.path.join(path, EXAMPLE))
    config = getattr(moe, "config", None)
    if config is not None and hasattr(config, "save_pretrained"):
        config.save_pretrained(path)
    dtypes = {p.dtype for p in moe.parameters() if p.is_floating_point()}
    meta = dict(recipe=recipe.to_dict(), example_kind=kind, example_constants=constants, model_class=type(moe).__name__,
                dtype=str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else None)
    with open(os.path.join(path, RECIPE), "w") as f:
        json.dump(meta, f, indent=2)


def _write_atomically(path: str, write, check=None) -> None:
    """``write(directory)`` into a temporary directory beside ``path``, ``check(directory)`` it, then move its
    files into ``path`` (each move atomic), removing files of an earlier moefx save that this one did not write.
    Files moefx did not write (the dense model's weights and config, a tokenizer) are never replaced or removed:
    a save that would replace one is refused. Nothing in ``path`` changes if anything raises."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(path))}.moefx-", dir=parent)
    try:
        write(staging)
        if check is not None:
            check(staging)
        written = set(os.listdir(staging))
        ours = written_by_moefx(path)
        foreign = sorted(written & set(os.listdir(path) if os.path.isdir(path) else ()) - ours - {FILES})
        if foreign:
            raise ValueError(f"moefx.save_pretrained: {path} holds {', '.join(foreign[:3])}"
                             f"{', ...' if len(foreign) > 3 else ''}, which moefx did not write (the dense model's "
                             "checkpoint?) and this save would replace; save into another directory")
        record_written(staging, written)
        os.makedirs(path, exist_ok=True)
        for name in ours - written:
            if os.path.exists(os.path.join(path, name)):
                os.remove(os.path.join(path, name))
        for name in written | {FILES}:
            os.replace(os.path.join(staging, name), os.path.join(path, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def written_by_moefx(path: str) -> set[str]:
    """The files moefx wrote into checkpoint directory ``path`` (its ``moefx_files.json``): the only ones a later
    save may replace or remove."""
    file = os.path.join(path, FILES)
    if not os.path.exists(file):
        return set()
    with open(file) as f:
        return set(json.load(f))


def record_written(path: str, names) -> None:
    with open(os.path.join(path, FILES), "w") as f:
        json.dump(sorted(names), f, indent=0)


def load_pretrained(path: str, model: Optional[nn.Module] = None) -> nn.Module:
    """Load what ``save_pretrained`` wrote. ``model``: the dense model to convert (any weights; they are
    replaced); default: built from the saved transformers config with ``AutoModel``'s class of the
    same name (or ``AutoModel``)."""
    from safetensors.torch import load_model

    if not os.path.exists(os.path.join(path, RECIPE)):
        raise ValueError(f"moefx.load_pretrained: {path} has no {RECIPE}; a checkpoint saved with layout='mixtral', "
                         "'qwen2_moe' or 'qwen3_moe' loads without moefx: "
                         "transformers.AutoModelForCausalLM.from_pretrained(path)")
    meta = _read_meta(os.path.join(path, RECIPE))
    built = model is None
    if built:
        model = _dense_from_config(path, meta["model_class"])
    stored = read_shard(os.path.join(path, EXAMPLE))
    items = {**stored, **meta["example_constants"]}
    kind = meta["example_kind"]
    positions = [str(i) for i in range(len(items))]
    if kind not in ("dict", "tuple", "tensor") or (kind != "dict" and sorted(items) != positions) or (
            kind == "tensor" and len(items) != 1):
        raise ValueError(f"moefx.load_pretrained: {os.path.join(path, RECIPE)}: example_kind {kind!r} does not match "
                         f"the stored example ({sorted(items)}) (edited?); save the converted model again")
    if kind == "dict":
        example: Any = items
    else:
        ordered = [items[p] for p in positions]
        example = ordered if kind == "tuple" else ordered[0]
    if built and meta.get("dtype"):
        model = model.to(getattr(torch, meta["dtype"]))  # the saved dtype, not the config's default
    moe = rebuild(model, example, Recipe.from_dict(meta["recipe"], source=os.path.join(path, RECIPE)), inplace=built)
    if any(os.path.exists(os.path.join(path, index)) for index in (MOEFX_INDEX, INDEX)):
        _load_shards(moe, path)
    else:
        weights = next((os.path.join(path, w) for w in (WEIGHTS, LEGACY_WEIGHTS)
                        if os.path.exists(os.path.join(path, w))), None)
        if weights is None:
            raise ValueError(f"moefx.load_pretrained: {path} has no weights: {WEIGHTS} is not there (nor shards "
                             f"with {MOEFX_INDEX}); copy the whole checkpoint directory, or save it again")
        read_header(weights)  # a truncated file is named
        load_model(moe, weights, strict=True)
    return moe


def _load_shards(moe: nn.Module, path: str) -> None:
    """Load a sharded checkpoint (``moefx convert`` writes one shard per block) strictly, one shard at a time;
    a tensor tied to another (a tied LM head) is stored once."""
    expected = moe.state_dict()
    loaded: set[str] = set()
    for file in shard_files(path):
        state = read_shard(file)
        unexpected = moe.load_state_dict(state, strict=False).unexpected_keys
        if unexpected:
            raise ValueError(f"moefx.load_pretrained: {file} holds {unexpected[0]}, which the rebuilt model lacks; "
                             "the checkpoint and its moefx.json disagree: convert again")
        loaded.update(state)
    stored = {expected[k].data_ptr() for k in loaded}
    missing = [k for k in expected if k not in loaded and expected[k].data_ptr() not in stored]
    if missing:
        raise ValueError(f"moefx.load_pretrained: {path} lacks {missing[0]} ({len(missing)} tensor(s) missing); "
                         "the conversion was not finished: convert again")


def _read_meta(file: str) -> dict:
    try:
        with open(file) as f:
            meta = json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(f"moefx.load_pretrained: {file} is not valid JSON ({error}); save the model again") from None
    missing = [k for k in ("recipe", "example_kind", "example_constants", "model_class") if k not in meta]
    if missing:
        raise ValueError(f"moefx.load_pretrained: {file} lacks {missing} (written by another moefx version, or "
                         "edited); save the converted model again with moefx.save_pretrained")
    return meta


def _dense_from_config(path: str, class_name: str) -> nn.Module:
    if not os.path.exists(os.path.join(path, "config.json")):
        raise ValueError(f"moefx.load_pretrained: {path} has no config.json; pass the dense model: "
                         "load_pretrained(path, model=MyModel())")
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    cls = getattr(transformers, class_name, None) or transformers.AutoModel
    build = cls.from_config if cls is transformers.AutoModel else cls._from_config
    return build(config).eval()


# transformers MoE class each layout writes, and the dense causal LMs whose attention it reproduces
_TARGETS = {"mixtral": ("MixtralConfig", "MixtralForCausalLM", ("LlamaForCausalLM", "MistralForCausalLM")),
            "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                          ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")),
            "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", ("Qwen3ForCausalLM",))}
# dense config entries that describe the FFN, the attention's biases and windows (set by _attention_fields) or
# the checkpoint, not what the MoE model keeps as it is
_NOT_CARRIED = {"architectures", "model_type", "transformers_version", "_name_or_path", "intermediate_size", "dtype",
                "torch_dtype", "layer_types", "use_sliding_window", "sliding_window", "max_window_layers",
                "attention_bias", "qkv_bias", "mlp_bias"}
# Qwen2-MoE's shared expert is sigmoid(x . g) * shared(x): g = 1e-20 everywhere gives 1/2 for every x at
# fp32/bf16 in transformers and in llama.cpp (which computes that sigmoid as silu(z) / z: NaN for g = 0)
SHARED_GATE = 1e-20


def _save_transformers_layout(moe: nn.Module, path: str, layout: str, example: Any, recipe: Recipe) -> None:
    """Build the transformers MoE model on the meta device, give it the converted model's tensors (experts
    re-laid out), check its logits, write it with its own ``save_pretrained`` to a temporary directory, load
    that back with the class and check it again before the files move into ``path``."""
    import transformers

    config_name, class_name, sources = _TARGETS[layout]
    if type(moe).__name__ not in sources:
        other = [k for k, (_, _, srcs) in _TARGETS.items() if type(moe).__name__ in srcs]
        raise ValueError(f"moefx.save_pretrained: layout={layout!r} writes a {class_name}, whose attention matches "
                         f"{' / '.join(sources)}; this model is a {type(moe).__name__}: "
                         + (f"use layout={other[0]!r}" if other else "save with the default layout='moefx'"))
    dtype = next(moe.parameters()).dtype
    if layout == "qwen2_moe" and dtype == torch.float16:
        raise ValueError(f"moefx.save_pretrained: {class_name}'s shared expert needs a gate vector of {SHARED_GATE} "
                         "(so that its sigmoid is 1/2 in every engine), which float16 rounds to 0: cast the model to "
                         "bfloat16 or float32 before saving")
    layers = _moe_layers(moe)
    shape = _moe_shape(layers, layout, class_name, type(moe).__name__, recipe)
    config = _target_config(moe.config, getattr(transformers, config_name), layout, shape, class_name,
                            type(moe).__name__)
    with torch.device("meta"):
        target = getattr(transformers, class_name)(config)
    _load_converted(target, moe, layers, layout, class_name)
    target.generation_config = copy.deepcopy(moe.generation_config)
    target.eval()
    _check_logits(moe, target, example, class_name, "built from this model")

    def check(directory: str) -> None:
        loaded = getattr(transformers, class_name).from_pretrained(directory, dtype=dtype).eval()
        _check_logits(moe, loaded, example, class_name, "loaded from the written checkpoint")
        _check_generation(moe, loaded, example, class_name)
        if dtype not in (torch.float32, torch.float64):  # logits are compared at fp32/fp64 only: compare the files
            written = loaded.state_dict()
            for key, tensor in target.state_dict().items():
                if key in written and not torch.equal(written[key].cpu(), tensor.cpu()):
                    raise ValueError(f"moefx.save_pretrained: {key} reads back from the {class_name} checkpoint "
                                     "differently than it was written; nothing was written")

    _write_atomically(path, target.save_pretrained, check)


def _moe_layers(moe: nn.Module) -> list[MoELayer]:
    """The MoELayer of every decoder layer; each ``mlp`` must be the ``MoEFFN`` swapped in for the dense MLP."""
    layers = []
    for i, block in enumerate(moe.model.layers):
        name = f"model.layers.{i}.mlp"
        mlp = block.mlp
        if isinstance(mlp, fx.GraphModule) and any(isinstance(m, MoELayer) for m in mlp.modules()):
            raise ValueError(f"moefx.save_pretrained: {name} is a traced graph around its MoE layer (pregate routes "
                             "it from another tensor than its input); the transformers MoE layouts route every layer "
                             "from its own input: convert without pregate or save with the default layout='moefx'")
        if not isinstance(mlp, MoEFFN):
            raise ValueError(f"moefx.save_pretrained: {name} was not converted (it is still a dense "
                             f"{type(mlp).__name__}); the transformers MoE layouts put experts in every layer: "
                             "save with the default layout='moefx'")
        layers.append(mlp.moe)
    extra = [n for n, m in moe.named_modules() if isinstance(m, fx.GraphModule)
             or (isinstance(m, MoEFFN) and not n.endswith(".mlp"))]
    if extra:
        raise ValueError(f"moefx.save_pretrained: {extra[0]} was rewritten by moefx outside the decoder MLPs; "
                         "save with the default layout='moefx'")
    return layers


def _nonzero(bias: Optional[torch.Tensor]) -> bool:
    return bias is not None and bool(bias.detach().ne(0).any())


def _carve_for(layout: str, recipe: Recipe) -> str:
    """The convert options that give carved layers ``layout`` can hold."""
    renormalize = "renormalize=False" if layout == "qwen2_moe" else "renormalize=True"
    method = "" if not recipe.upcycle else "method='coactivation', "
    return f"convert with {method}gating='softmax', {renormalize}, router='least_squares', refit=True, biases=False"


def layout_refusal(recipe: Recipe, layout: str) -> Optional[str]:
    """Why ``layout`` cannot hold the layers ``recipe`` builds, with the option that fixes it, checked before
    any block is converted (``_problem`` checks each built layer again); None when it can, or for "moefx"."""
    if layout == "moefx":
        return None
    class_name = _TARGETS[layout][1]
    all_active = recipe.top_k >= recipe.num_experts - recipe.num_shared
    if recipe.top_p < 1.0:
        return f"top_p={recipe.top_p} (dynamic-k); {class_name} routes exactly top_k experts: convert with top_p=1.0"
    if recipe.zero_computation:
        return f"zero-computation experts; {class_name} has none: convert with num_zero=0, num_copy=0, num_const=0"
    if recipe.upcycle:
        if recipe.granularity != 1:
            return f"granularity={recipe.granularity}; {class_name} applies no gate scale: convert with granularity=1"
        if layout == "qwen2_moe" and not all_active:
            return ("upcycled experts have renormalised gates, which llama.cpp's qwen2moe never computes: "
                    + _carve_for(layout, recipe))
        return None
    if recipe.gating != "softmax":
        return (f"gating={recipe.gating!r}; {class_name} weights experts by the softmax of the router logits: "
                + _carve_for(layout, recipe))
    if recipe.biases:
        return f"biases=True; {class_name} experts and router have no biases: convert with biases=False"
    if layout in ("mixtral", "qwen3_moe") and recipe.num_shared:
        return f"num_shared={recipe.num_shared}; {class_name} has no shared expert: convert with num_shared=0"
    if layout in ("mixtral", "qwen3_moe") and not recipe.renormalize and not all_active:
        return f"renormalize=False; {class_name} (and llama.cpp) renormalise the top-k gates: convert with renormalize=True"
    if layout == "qwen2_moe" and recipe.renormalize and not all_active:
        return "renormalize=True; llama.cpp's qwen2moe never renormalises the top-k gates: convert with renormalize=False"
    return None


def _problem(layer: MoELayer, layout: str, class_name: str, recipe: Recipe) -> Optional[tuple[str, str]]:
    """(what ``class_name`` cannot compute of ``layer``, the option that fixes it), or None when it computes
    the layer exactly, in every engine that reads ``layout``."""
    keep = "save with the default layout='moefx'"
    all_active = layer.top_k >= layer.num_experts
    if not layer.gated or layer.activation != "silu":
        return (f"computes activation={layer.activation!r}, gated={layer.gated}; {class_name} experts compute "
                "silu(gate) * up", keep)
    if layer.scoring != "softmax":
        unit = " (carved experts enter with weight 1 each)" if layer.scoring == "unit" else ""
        return (f"has scoring={layer.scoring!r}{unit}; {class_name} weights experts by the softmax of the router "
                "logits", _carve_for(layout, recipe))
    if layer.top_p < 1.0:
        return f"has top_p={layer.top_p} (dynamic-k); {class_name} routes exactly top_k experts", "convert with top_p=1.0"
    if layer.num_zero or layer.num_copy or layer.const_experts is not None:
        return (f"has zero-computation experts; {class_name} has none",
                "convert with num_zero=0, num_copy=0, num_const=0")
    if layer.gate_scale != 1.0:
        return f"has gate_scale={layer.gate_scale}; {class_name} applies none", "convert with granularity=1"
    if _nonzero(layer.b_in):
        return (f"has b_in (the dense FFN's biases); {class_name} experts have none", keep)
    fitted = [n for n, b in (("b_out", layer.b_out), ("bias", layer.bias), ("router.bias", layer.router.bias))
              if _nonzero(b)]
    if fitted:
        dense_bias = recipe.upcycle or not recipe.biases
        return (f"has {', '.join(fitted)}; {class_name} experts and router have no biases",
                keep if dense_bias else "convert with biases=False (the router fit and refit then add none)")
    if layout in ("mixtral", "qwen3_moe") and layer.shared_width:
        return (f"has a shared expert (shared_width={layer.shared_width}); {class_name} has none",
                "convert with num_shared=0")
    if layout == "mixtral" and not layer.renormalize and not all_active:
        return f"has renormalize=False; {class_name} renormalises the top-k gates", "convert with renormalize=True"
    if layout == "qwen3_moe" and not layer.renormalize and not all_active:
        return ("has renormalize=False; llama.cpp's qwen3moe renormalises the top-k gates whatever norm_topk_prob "
                "says", "convert with renormalize=True")
    if layout == "qwen2_moe" and layer.renormalize and not all_active:
        fix = _carve_for(layout, recipe) if recipe.upcycle else "convert with renormalize=False"
        return ("has renormalize=True; llama.cpp's qwen2moe never renormalises the top-k gates (it ignores "
                "norm_topk_prob), so the checkpoint would run there as another model", fix)
    return None


def _moe_shape(layers: list[MoELayer], layout: str, class_name: str, model_class: str, recipe: Recipe) -> dict:
    """The MoE config entries, which the target class shares across layers."""
    shapes = []
    for i, layer in enumerate(layers):
        problem = _problem(layer, layout, class_name, recipe)
        if problem:
            works = [other for other, (_, _, sources) in _TARGETS.items() if other != layout and model_class in sources
                     and all(_problem(each, other, _TARGETS[other][1], recipe) is None for each in layers)]
            fix = f"save with layout={works[0]!r}" if works else problem[1]
            raise ValueError(f"moefx.save_pretrained: model.layers.{i}.mlp.moe {problem[0]}: {fix}")
        shapes.append(dict(num_experts=layer.num_experts, top_k=layer.top_k, expert_width=layer.expert_width,
                           shared_width=layer.shared_width))
    for i, shape in enumerate(shapes):
        differ = [k for k in shape if shape[k] != shapes[0][k]]
        if differ:
            raise ValueError(f"moefx.save_pretrained: model.layers.{i}.mlp.moe has {differ[0]}={shape[differ[0]]}, "
                             f"model.layers.0.mlp.moe {differ[0]}={shapes[0][differ[0]]}; {class_name} has one value "
                             "for all layers: convert every layer alike or save with the default layout='moefx'")
    return shapes[0]


def _windows(dense) -> list[Optional[int]]:
    """The sliding window of each dense decoder layer (None: full attention)."""
    window = getattr(dense, "sliding_window", None) or None
    types = getattr(dense, "layer_types", None)
    if types is None:
        return [window] * dense.num_hidden_layers
    return [window if kind == "sliding_attention" else None for kind in types]


def _attention_fields(dense, layout: str, class_name: str, model_class: str) -> dict:
    """The target config entries that make its attention the dense model's: biases and sliding windows."""
    windows = _windows(dense)
    sizes = {w for w in windows if w is not None}
    uniform = len(set(windows)) == 1
    if len(sizes) > 1 or (layout != "qwen2_moe" and not uniform):
        per_layer = len(sizes) == 1 and model_class in _TARGETS["qwen2_moe"][2]
        raise ValueError(f"moefx.save_pretrained: the model's attention uses sliding windows {windows} per layer; "
                         f"{class_name} has one setting for all layers: "
                         + ("save with layout='qwen2_moe'" if per_layer else "save with the default layout='moefx'"))
    window = next(iter(sizes), None)
    if layout == "mixtral":
        return dict(sliding_window=window)
    if layout == "qwen3_moe":
        return dict(use_sliding_window=window is not None, sliding_window=window,
                    attention_bias=bool(getattr(dense, "attention_bias", False)))
    qkv_bias = dense.model_type == "qwen2" or bool(getattr(dense, "attention_bias", False))
    return dict(qkv_bias=qkv_bias, use_sliding_window=window is not None, sliding_window=window,
                layer_types=["sliding_attention" if w else "full_attention" for w in windows])


def _target_config(dense, config_class, layout: str, shape: dict, class_name: str, model_class: str):
    """The dense config's attention, embedding and norm entries plus the MoE entries."""
    known = set(config_class().to_dict()) | {"head_dim"}
    fields = {k: v for k, v in dense.to_dict().items() if k in known and k not in _NOT_CARRIED}
    fields.update(_attention_fields(dense, layout, class_name, model_class))
    fields.update(hidden_act="silu", num_experts_per_tok=shape["top_k"])
    if layout == "mixtral":
        fields.update(num_local_experts=shape["num_experts"], intermediate_size=shape["expert_width"])
        return config_class(**fields)
    fields.update(num_experts=shape["num_experts"], moe_intermediate_size=shape["expert_width"],
                  intermediate_size=dense.intermediate_size, decoder_sparse_step=1, mlp_only_layers=[],
                  # qwen2moe in llama.cpp never renormalises, qwen3moe always does (_problem refuses the others)
                  norm_topk_prob=layout == "qwen3_moe")
    if layout == "qwen2_moe":
        # a layer without shared expert gets an inert one of width 1 (zero weights): engines fail on width 0
        fields.update(shared_expert_intermediate_size=shape["shared_width"] or 1)
    return config_class(**fields)


def _load_converted(target: nn.Module, moe: nn.Module, layers: list[MoELayer], layout: str, class_name: str) -> None:
    """Give ``target`` (on the meta device) the converted model's tensors: same names outside the MoE
    blocks, re-laid-out experts inside. Tensors are shared, not copied, where the layout allows."""
    source = moe.state_dict()
    blocks = [n for n, m in target.named_modules() if type(m).__name__.endswith("SparseMoeBlock")]
    shapes = {k: v.shape for k, v in target.state_dict().items()}
    wanted = set(shapes)
    state = {}
    for block, layer in zip(blocks, layers):
        state.update(_block_tensors(layer, block + ".", {k for k in wanted if k.startswith(block + ".")}, layout))
    unknown = sorted(wanted - set(state) - set(source)) + sorted(set(state) - wanted)
    if unknown:
        raise ValueError(f"moefx.save_pretrained: {unknown[0]} is where moefx and {class_name} of this transformers "
                         "version disagree on the layout; save with the default layout='moefx'")
    state.update({key: source[key] for key in wanted - set(state)})
    moe_params = {f"model.layers.{i}.mlp.moe." + n for i, layer in enumerate(layers) for n in layer.state_dict()}
    left = sorted(set(source) - set(state) - moe_params)
    if left:
        raise ValueError(f"moefx.save_pretrained: {left[0]} has no place in {class_name} (e.g. attention biases): "
                         "save with the default layout='moefx'")
    for key, tensor in state.items():
        if tensor.shape != shapes[key]:
            raise ValueError(f"moefx.save_pretrained: {key} is {tuple(tensor.shape)} in the converted model, "
                             f"{tuple(shapes[key])} in {class_name}; save with the default layout='moefx'")
    target.load_state_dict(state, strict=True, assign=True)
    target.tie_weights()
    _rebuild_meta_buffers(target, moe)


def _block_tensors(layer: MoELayer, prefix: str, keys: set, layout: str) -> dict:
    """The tensors of one transformers sparse-MoE block from an MoELayer. moefx interleaves gate and up
    rows (2j, 2j+1); transformers 5 fuses them as [gate; up] halves, 4.x keeps one Linear per expert."""
    gate, up, down = layer.w_in.detach()[:, 0::2], layer.w_in.detach()[:, 1::2], layer.w_out.detach()
    tensors = {prefix + "gate.weight": layer.router.weight.detach()}
    if prefix + "experts.gate_up_proj" in keys:
        tensors[prefix + "experts.gate_up_proj"] = torch.cat([gate, up], 1)
        tensors[prefix + "experts.down_proj"] = down
    else:
        names = ("w1", "w3", "w2") if layout == "mixtral" else ("gate_proj", "up_proj", "down_proj")
        for e in range(layer.num_experts):
            for name, weight in zip(names, (gate[e], up[e], down[e])):
                tensors[f"{prefix}experts.{e}.{name}.weight"] = weight.contiguous()
    if layout == "qwen2_moe":
        # y = sigmoid(shared_expert_gate(x)) * shared(x) with the gate at 1/2 (SHARED_GATE): the doubled down
        # projection makes it moefx's always-on shared expert of weight 1 (exact: powers of two)
        hidden, dtype, device = layer.hidden, layer.w_in.dtype, layer.w_in.device
        if layer.shared_width:
            shared_in, shared_out = layer.shared_in.weight.detach(), 2 * layer.shared_out.weight.detach()
        else:  # inert: silu(0) * 0 = 0, times a zero down projection
            shared_in = torch.zeros(2, hidden, dtype=dtype, device=device)
            shared_out = torch.zeros(hidden, 1, dtype=dtype, device=device)
        tensors.update({prefix + "shared_expert.gate_proj.weight": shared_in[0::2].contiguous(),
                        prefix + "shared_expert.up_proj.weight": shared_in[1::2].contiguous(),
                        prefix + "shared_expert.down_proj.weight": shared_out,
                        prefix + "shared_expert_gate.weight": torch.full((1, hidden), SHARED_GATE, dtype=dtype,
                                                                         device=device)})
    return tensors


def _rebuild_meta_buffers(target: nn.Module, moe: nn.Module) -> None:
    """Non-persistent buffers (rotary frequencies) are not in any state dict: build their modules again
    from the target config, so they hold what ``from_pretrained`` will compute."""
    device = next(moe.parameters()).device
    for name, module in list(target.named_modules()):
        if not any(b.is_meta for b in module.buffers(recurse=False)):
            continue
        if not name.endswith("rotary_emb"):
            raise ValueError(f"moefx.save_pretrained: {name} of {type(target).__name__} keeps a buffer moefx cannot "
                             "fill; save with the default layout='moefx'")
        parent, _, child = name.rpartition(".")
        setattr(target.get_submodule(parent), child, type(module)(target.config).to(device))


@contextlib.contextmanager
def _evaluating(moe: nn.Module):
    """``moe`` in eval mode with gradients off inside; its mode restored after."""
    was_training = moe.training
    moe.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        moe.train(was_training)


def _check_logits(moe: nn.Module, target: nn.Module, example: Any, class_name: str, which: str) -> None:
    """The written model must compute the converted one (checked at fp32/fp64, where routing agrees)."""
    if next(moe.parameters()).dtype not in (torch.float32, torch.float64):
        return
    with _evaluating(moe):
        want = call_model(moe, example).logits
        got = call_model(target, example).logits
    error = float((got - want).norm() / want.norm())
    if not error <= 1e-5:
        raise ValueError(f"moefx.save_pretrained: the {class_name} {which} computes logits with relative error "
                         f"{error:.2e} on the calibration row; nothing was written: save with the default "
                         "layout='moefx'")


def _check_generation(moe: nn.Module, loaded: nn.Module, example: Any, class_name: str) -> None:
    """Greedy decoding from the start of the calibration row gives the same tokens in both models (fp32/fp64)."""
    ids = example.get("input_ids") if isinstance(example, dict) else example
    if next(moe.parameters()).dtype not in (torch.float32, torch.float64) or not isinstance(ids, torch.Tensor):
        return
    prompt = ids[:1, :8]
    options = dict(max_new_tokens=4, do_sample=False, attention_mask=torch.ones_like(prompt),
                   pad_token_id=moe.generation_config.pad_token_id or moe.generation_config.eos_token_id or 0)
    with _evaluating(moe):
        want, got = moe.generate(prompt, **options), loaded.generate(prompt, **options)
    if not torch.equal(want, got):
        raise ValueError(f"moefx.save_pretrained: greedy decoding of the {class_name} loaded from the written "
                         f"checkpoint gives {got[0, prompt.shape[1]:].tolist()}, the converted model "
                         f"{want[0, prompt.shape[1]:].tolist()}; nothing was written: save with the default "
                         "layout='moefx'")
