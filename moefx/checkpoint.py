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

``save_pretrained(moe, path, layout="mixtral" | "qwen2_moe")`` instead writes a checkpoint that
transformers loads with its own MoE classes (Mixtral, Jiang et al. 2024; Qwen1.5-MoE / Qwen2-MoE)
without moefx: an upcycled Llama/Mistral becomes a ``MixtralForCausalLM``, an upcycled Qwen2 a
``Qwen2MoeForCausalLM``. Only layers those classes compute exactly are written; anything else
(carved experts with unit gates, biases, dynamic-k, zero-computation experts) is refused by name.
"""
from __future__ import annotations

import copy
import json
import os
import tempfile
import warnings
from typing import Any, Optional

import torch
from torch import nn

from moefx.convert import rebuild
from moefx.layer import MoELayer
from moefx.recipe import Recipe
from moefx.runtime import call_model

WEIGHTS, RECIPE, EXAMPLE = "moefx_model.safetensors", "moefx.json", "moefx_example.safetensors"
LEGACY_WEIGHTS = "model.safetensors"  # moefx-layout checkpoints written before the weights were renamed
LAYOUTS = ("moefx", "mixtral", "qwen2_moe")


def save_pretrained(moe: nn.Module, path: str, layout: str = "moefx") -> None:
    """Write ``moe`` (returned by ``moefx.convert``) to directory ``path``.

    layout: "moefx" (weights + conversion recipe; load with ``moefx.load_pretrained``), or
    "mixtral" / "qwen2_moe": a transformers checkpoint that ``AutoModelForCausalLM.from_pretrained``
    loads as ``MixtralForCausalLM`` / ``Qwen2MoeForCausalLM`` (from an upcycled Llama/Mistral /
    Qwen2). Before writing it, an fp32/fp64 model is run on the stored calibration row in both forms
    and the logits compared.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"moefx.save_pretrained: layout={layout!r} is not one of {LAYOUTS}")
    recipe = getattr(moe, "moefx_recipe", None)
    if not isinstance(recipe, Recipe):
        raise ValueError("moefx.save_pretrained: the model carries no conversion recipe; save the model that "
                         "moefx.convert returned")
    example = moe.moefx_example
    if layout != "moefx":
        _save_transformers_layout(moe, path, layout, example)
        return
    os.makedirs(path, exist_ok=True)
    legacy = os.path.exists(os.path.join(path, RECIPE)) and os.path.exists(os.path.join(path, LEGACY_WEIGHTS))
    with tempfile.TemporaryDirectory(dir=path, prefix=".moefx-save-") as staging:
        _write_moefx_layout(moe, staging, recipe, example)
        for name in sorted(os.listdir(staging)):
            os.replace(os.path.join(staging, name), os.path.join(path, name))
    if legacy:  # an older moefx save's weights, which transformers would load as the dense model
        os.remove(os.path.join(path, LEGACY_WEIGHTS))


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


def load_pretrained(path: str, model: Optional[nn.Module] = None) -> nn.Module:
    """Load what ``save_pretrained`` wrote. ``model``: the dense model to convert (any weights; they are
    replaced); default: built from the saved transformers config with ``AutoModel``'s class of the
    same name (or ``AutoModel``)."""
    from safetensors.torch import load_file, load_model

    if not os.path.exists(os.path.join(path, RECIPE)):
        raise ValueError(f"moefx.load_pretrained: {path} has no {RECIPE}; a checkpoint saved with layout='mixtral' "
                         "or 'qwen2_moe' loads without moefx: transformers.AutoModelForCausalLM.from_pretrained(path)")
    meta = _read_meta(os.path.join(path, RECIPE))
    built = model is None
    if built:
        model = _dense_from_config(path, meta["model_class"])
    stored = load_file(os.path.join(path, EXAMPLE))
    items = {**stored, **meta["example_constants"]}
    if meta["example_kind"] == "dict":
        example: Any = items
    else:
        ordered = [items[str(i)] for i in range(len(items))]
        example = ordered if meta["example_kind"] == "tuple" else ordered[0]
    if built and meta.get("dtype"):
        model = model.to(getattr(torch, meta["dtype"]))  # the saved dtype, not the config's default
    moe = rebuild(model, example, Recipe.from_dict(meta["recipe"], source=os.path.join(path, RECIPE)), inplace=built)
    weights = os.path.join(path, WEIGHTS)
    load_model(moe, weights if os.path.exists(weights) else os.path.join(path, LEGACY_WEIGHTS), strict=True)
    return moe


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
            "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", ("Qwen2ForCausalLM",))}
# dense config entries that describe the FFN or the checkpoint, not the attention the MoE model keeps
_NOT_CARRIED = {"architectures", "model_type", "transformers_version", "_name_or_path", "intermediate_size", "dtype",
                "torch_dtype"}


def _save_transformers_layout(moe: nn.Module, path: str, layout: str, example: Any) -> None:
    """Build the transformers MoE model on the meta device, give it the converted model's tensors
    (experts re-laid out), check its logits and let its own ``save_pretrained`` write the files."""
    import transformers

    config_name, class_name, sources = _TARGETS[layout]
    if type(moe).__name__ not in sources:
        other = [k for k, (_, _, srcs) in _TARGETS.items() if type(moe).__name__ in srcs]
        raise ValueError(f"moefx.save_pretrained: layout={layout!r} writes a {class_name}, whose attention matches "
                         f"{' / '.join(sources)}; this model is a {type(moe).__name__}: "
                         + (f"use layout={other[0]!r}" if other else "save with the default layout='moefx'"))
    layers = _moe_layers(moe)
    shape = _moe_shape(layers, layout, class_name)
    config = _target_config(moe.config, getattr(transformers, config_name), layout, shape)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Initializing zero-element tensors")  # Qwen2-MoE without shared expert
        target = getattr(transformers, class_name)(config)
    _load_converted(target, moe, layers, layout, class_name)
    target.generation_config = copy.deepcopy(moe.generation_config)
    target.eval()
    _check_logits(moe, target, example, class_name)
    target.save_pretrained(path)
    for stale in (RECIPE, EXAMPLE, WEIGHTS):  # a moefx-layout save left in the same directory would describe other weights
        if os.path.exists(os.path.join(path, stale)):
            os.remove(os.path.join(path, stale))


def _moe_layers(moe: nn.Module) -> list[MoELayer]:
    """The MoELayer of every decoder layer; each ``mlp`` must be the ``MoEFFN`` swapped in for the dense MLP."""
    import torch.fx as fx

    from moefx.convert.rewrite import MoEFFN

    layers = []
    for i, block in enumerate(moe.model.layers):
        name = f"model.layers.{i}.mlp"
        mlp = block.mlp
        if isinstance(mlp, fx.GraphModule) and any(isinstance(m, MoELayer) for m in mlp.modules()):
            raise ValueError(f"moefx.save_pretrained: {name} is a traced graph around its MoE layer (pregate routes "
                             "it from another tensor than its input); Mixtral and Qwen2-MoE route every layer from "
                             "its own input: convert without pregate or save with the default layout='moefx'")
        if not isinstance(mlp, MoEFFN):
            raise ValueError(f"moefx.save_pretrained: {name} was not converted (it is still a dense "
                             f"{type(mlp).__name__}); the Mixtral and Qwen2-MoE layouts put experts in every layer: "
                             "save with the default layout='moefx'")
        layers.append(mlp.moe)
    extra = [n for n, m in moe.named_modules() if isinstance(m, fx.GraphModule)
             or (isinstance(m, MoEFFN) and not n.endswith(".mlp"))]
    if extra:
        raise ValueError(f"moefx.save_pretrained: {extra[0]} was rewritten by moefx outside the decoder MLPs; "
                         "save with the default layout='moefx'")
    return layers


def _refusal(layer: MoELayer, layout: str, class_name: str) -> Optional[str]:
    """Why ``layer`` is not what ``class_name`` computes, with the fix; None when it is."""
    keep = "save with the default layout='moefx'"
    if not layer.gated or layer.activation != "silu":
        return (f"experts compute activation={layer.activation!r}, gated={layer.gated}; {class_name} experts "
                f"compute silu(gate) * up: {keep}")
    if layer.scoring != "softmax":
        return (f"scoring={layer.scoring!r}" + (" (carved experts enter with weight 1 each)" if layer.scoring == "unit"
                                                else "") + f"; {class_name} weights experts by the softmax of the "
                f"router logits: convert with method='upcycle' or {keep}")
    if layer.top_p < 1.0:
        return f"top_p={layer.top_p} (dynamic-k); {class_name} routes exactly top_k experts: convert with top_p=1.0"
    if layer.num_zero or layer.num_copy or layer.const_experts is not None:
        return f"has zero-computation experts; {class_name} has none: {keep}"
    if layer.gate_scale != 1.0:
        return f"gate_scale={layer.gate_scale}; {class_name} applies none: {keep}"
    biases = [n for n, b in (("b_in", layer.b_in), ("b_out", layer.b_out), ("bias", layer.bias),
                             ("router.bias", layer.router.bias)) if b is not None]
    if biases:
        return (f"has {', '.join(biases)}; {class_name} experts and router have no biases (refit, router "
                f"distillation, granularity > 1 and dense FFN biases add them): {keep}")
    if layout == "mixtral" and layer.shared_width:
        return f"has a shared expert (shared_width={layer.shared_width}); {class_name} has none: use layout='qwen2_moe'"
    if layout == "mixtral" and not layer.renormalize and layer.top_k < layer.num_experts:
        return (f"renormalize=False; {class_name} renormalises the top-k gates: use layout='qwen2_moe' "
                "(norm_topk_prob=False)")
    return None


def _moe_shape(layers: list[MoELayer], layout: str, class_name: str) -> dict:
    """The MoE config entries, which the target class shares across layers."""
    shapes = []
    for i, layer in enumerate(layers):
        why = _refusal(layer, layout, class_name)
        if why:
            raise ValueError(f"moefx.save_pretrained: model.layers.{i}.mlp.moe {why}")
        shapes.append(dict(num_experts=layer.num_experts, top_k=layer.top_k, expert_width=layer.expert_width,
                           shared_width=layer.shared_width,
                           renormalize=layer.renormalize or layer.top_k == layer.num_experts))
    for i, shape in enumerate(shapes):
        differ = [k for k in shape if shape[k] != shapes[0][k]]
        if differ:
            raise ValueError(f"moefx.save_pretrained: model.layers.{i}.mlp.moe has {differ[0]}={shape[differ[0]]}, "
                             f"model.layers.0.mlp.moe {differ[0]}={shapes[0][differ[0]]}; {class_name} has one value "
                             "for all layers: convert every layer alike or save with the default layout='moefx'")
    return shapes[0]


def _target_config(dense, config_class, layout: str, shape: dict):
    """The dense config's attention, embedding and norm entries plus the MoE entries."""
    known = set(config_class().to_dict()) | {"head_dim"}
    fields = {k: v for k, v in dense.to_dict().items() if k in known and k not in _NOT_CARRIED}
    fields.update(hidden_act="silu", num_experts_per_tok=shape["top_k"])
    if layout == "mixtral":
        fields.update(num_local_experts=shape["num_experts"], intermediate_size=shape["expert_width"])
    else:
        fields.update(num_experts=shape["num_experts"], moe_intermediate_size=shape["expert_width"],
                      intermediate_size=dense.intermediate_size, norm_topk_prob=shape["renormalize"],
                      shared_expert_intermediate_size=shape["shared_width"], decoder_sparse_step=1,
                      mlp_only_layers=[])
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
        # y = sigmoid(shared_expert_gate(x)) * shared(x): a zero gate gives 1/2, the doubled down projection
        # makes it moefx's always-on shared expert with weight 1 (exact: both factors are powers of two)
        hidden, dtype, device = layer.hidden, layer.w_in.dtype, layer.w_in.device
        width = layer.shared_width
        shared_in = layer.shared_in.weight.detach() if width else torch.empty(0, hidden, dtype=dtype, device=device)
        shared_out = layer.shared_out.weight.detach() if width else torch.empty(hidden, 0, dtype=dtype, device=device)
        tensors.update({prefix + "shared_expert.gate_proj.weight": shared_in[0::2].contiguous(),
                        prefix + "shared_expert.up_proj.weight": shared_in[1::2].contiguous(),
                        prefix + "shared_expert.down_proj.weight": 2 * shared_out,
                        prefix + "shared_expert_gate.weight": torch.zeros(1, hidden, dtype=dtype, device=device)})
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


def _check_logits(moe: nn.Module, target: nn.Module, example: Any, class_name: str) -> None:
    """The written model must compute the converted one (checked at fp32/fp64, where routing agrees)."""
    if next(moe.parameters()).dtype not in (torch.float32, torch.float64):
        return
    was_training = moe.training
    moe.eval()
    try:
        with torch.no_grad():
            want = call_model(moe, example).logits
            got = call_model(target, example).logits
    finally:
        moe.train(was_training)
    error = float((got - want).norm() / want.norm())
    if not error <= 1e-4:
        raise ValueError(f"moefx.save_pretrained: the {class_name} built from this model computes logits with "
                         f"relative error {error:.2e} on the calibration row; nothing was written: save with the "
                         "default layout='moefx'")
