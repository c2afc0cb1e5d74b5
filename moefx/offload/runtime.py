"""``moefx.offload``: run a converted model with its experts on a slow tier and a byte budget of them close.

``offload(moe, budget="2x")`` moves every ``MoELayer``'s expert weights out of memory (into a safetensors
file, or, for a model from ``load_pretrained(path)``, ``offload(moe, source=path)`` reads them from the
checkpoint itself) and makes each layer fetch the experts its router picks through an ``ExpertCache``.
Routers, shared experts, attention and embeddings stay where they are. What is fetched ahead:

* ``pregate``: a pre-gated model (``pregate="block"``) routes layer l from its block's input, so at block
  entry the layer's experts are known exactly (Read-ME) and load while the attention runs;
* ``layer_ahead``: layer l+1's router on layer l's routing input names l+1's likely experts, loaded while
  layer l computes (``moefx.offload.predict``).

Eviction is Belady's rule over those known accesses, LRU among the rest (``policy="belady"``), or
LRU/LFU. A layer-ahead guess may evict only its own layer's experts, and only while the guesses' measured
recall is at least ``GUESS_RECALL``; below it they only fill free room. The experts of a
layer are computed by the op's CPU implementation (``moefx.cpu.routed_sum``) with the layer's own routing
and the same strategy and order as the all-in-memory layer, so outputs are bitwise equal to the model
before offloading wherever ``MOEFX_KERNELS`` picks the "cpu" implementation (the CPU default; on a GPU,
equal to the in-memory model run with ``MOEFX_KERNELS=cpu``, within the Triton kernels' tolerance otherwise).
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.fx as fx
from torch import Tensor, nn

from moefx.cpu import grouped_mm_fits, routed_sum, strategy_for
from moefx.layer import MoELayer
from moefx.op import MoEInputs, route
from moefx.offload.cache import ExpertCache
from moefx.offload.policy import POLICIES
from moefx.offload.store import EXPERT_TENSORS, SafetensorsFiles, SlowTier

PREFETCH = ("auto", "pregate", "layer_ahead", "both", "none")
GUESS_RECALL = 0.5  # layer-ahead recall from which a guess may evict its layer's experts
OFFLOAD_FILE = "moefx_experts.safetensors"


@dataclass(frozen=True)
class OffloadConfig:
    """How ``offload`` runs a model; validated on construction."""

    budget: Union[int, str] = "2x"
    """fast-tier bytes for experts: an int, or "<n>x", n times the bytes of the experts one token activates
    (top_k per MoE layer, every layer)"""
    policy: str = "belady"
    """eviction: "belady" (farthest known next use; least recently used among experts not known to come),
    "lru", "lfu\""""
    prefetch: str = "auto"
    """"pregate" (a pre-gated model's block-entry routing), "layer_ahead", "both", "none" (on demand only);
    "auto": both where the model is pre-gated, else layer_ahead"""
    bandwidth: Optional[float] = None
    """bytes/s: throttle slow-tier reads to this rate (emulate a link slower than the page cache)"""

    def __post_init__(self):
        def fail(msg):
            raise ValueError(f"moefx.offload: {msg}")

        if isinstance(self.budget, str):
            if not re.fullmatch(r"\d+(\.\d+)?x", self.budget):
                fail(f"budget={self.budget!r}: give bytes (an int) or a multiple of the active experts such as '2x'")
        elif not isinstance(self.budget, int) or isinstance(self.budget, bool) or self.budget <= 0:
            fail(f"budget={self.budget!r} must be a positive number of bytes or a string such as '2x'")
        if self.policy not in POLICIES:
            fail(f"policy={self.policy!r} is not one of {sorted(POLICIES)}")
        if self.prefetch not in PREFETCH:
            fail(f"prefetch={self.prefetch!r} is not one of {PREFETCH}")
        if self.bandwidth is not None and not self.bandwidth > 0:
            fail(f"bandwidth={self.bandwidth!r} must be a positive number of bytes per second")


class OffloadedMoELayer(MoELayer):
    """A ``MoELayer`` whose expert tensors are shape-only (meta) and whose experts come from the runtime's
    cache. Inference only."""

    offload_runtime: "Offloaded"
    offload_index: int

    def forward(self, x: Tensor, router_input: Optional[Tensor] = None) -> Tensor:
        if self.training and torch.is_grad_enabled():
            raise RuntimeError("moefx.offload: an offloaded MoE layer runs inference only; call model.eval()")
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        route_from = flat if router_input is None else router_input.reshape(flat.shape[0], -1)
        gates, ids = route(route_from, self.router.weight, self.router.bias, self.attrs)
        y = self.offload_runtime.experts(self, flat, route_from, gates, ids).to(x.dtype)
        if self.shared_in is not None:
            y = y + self.shared_out(self.shared_hidden(flat))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(shape)


class Offloaded:
    """The runtime ``offload`` returns: the model (changed in place), its cache and counters; ``close()``
    ends the prefetcher and releases the slow tier, after which the model's MoE layers no longer run."""

    def __init__(self, model: nn.Module, layers: list[tuple[str, MoELayer]], files: SafetensorsFiles,
                 config: OffloadConfig, owned_directory: Optional[str]):
        self.model, self.config, self.owned_directory = model, config, owned_directory
        self.names = [name for name, _ in layers]
        self.layers = [layer for _, layer in layers]
        # the fast tier is where the model runs: its routers' device
        self.tier = SlowTier(files, self.layers[0].router.weight.device, config.bandwidth)
        self.tier.pin_all({name: layer.num_experts for name, layer in layers})
        self.active_bytes = sum(layer.top_k * self._expert_bytes(name) for name, layer in layers)
        budget = config.budget
        if isinstance(budget, str):
            budget = int(float(budget[:-1]) * self.active_bytes)
        self.budget = budget
        self.policy = policy = POLICIES[config.policy]()
        blocks = _pregated_blocks(model)
        mode = config.prefetch
        if mode == "auto":
            mode = "both" if blocks else "layer_ahead"
        if mode in ("pregate", "both") and not blocks:
            raise ValueError("moefx.offload: prefetch='pregate' needs a pre-gated model: convert with "
                             "moefx.convert(..., router='distilled', pregate='block'), or use prefetch='layer_ahead'")
        self.layer_ahead = mode in ("layer_ahead", "both")
        self.cache = ExpertCache(self.tier, self.names, budget, policy, prefetch_thread=mode != "none")
        self.guesses: dict[int, set] = {}
        self.guess_recall = 0.0  # guesses earn the right to evict
        self.handles = []
        if mode in ("pregate", "both"):
            self._hook_blocks(blocks)

    def _expert_bytes(self, name: str) -> int:
        return sum(t.nbytes for t in self.tier.source(name, 0) if t is not None)

    @property
    def stats(self):
        return self.cache.stats

    def experts(self, layer: OffloadedMoELayer, x: Tensor, route_from: Tensor, gates: Tensor, ids: Tensor
                ) -> Tensor:
        """The routed experts' sum of ``layer`` for routing (gates, ids), in the accumulation dtype."""
        index, num_experts = layer.offload_index, layer.num_experts
        needed = sorted(set(ids[ids < num_experts].tolist()))
        keys = [(index, e) for e in needed]
        self._score_guess(index, needed)
        predicted = self._predict(index, route_from) if self.layer_ahead else []
        self.policy.expect(keys + predicted)
        cache = self.cache
        fits = sum(cache.size(k) for k in keys) <= self.budget
        if fits:
            cache.pin(keys)
        try:
            weights = {e: cache.get(k) for e, k in zip(needed, keys)} if fits else None
            cache.prefetch(predicted, evict="layer" if self.guess_recall >= GUESS_RECALL else "none")
            return self._compute(layer, x, route_from, gates, ids, needed,
                                 weights.__getitem__ if fits else lambda e: cache.get((index, e)))
        finally:
            if fits:
                cache.unpin(keys)

    def _predict(self, index: int, route_from: Tensor) -> list:
        if index + 1 >= len(self.layers):
            return []
        nxt = self.layers[index + 1]
        if nxt.router.in_features != route_from.shape[-1]:
            return []
        ids = nxt.routing(route_from)[1]
        self.guesses[index + 1] = set(ids[ids < nxt.num_experts].tolist())
        return [(index + 1, e) for e in sorted(self.guesses[index + 1])]

    def _score_guess(self, index: int, needed: list) -> None:
        """Update ``guess_recall``, the layer-ahead recall per call averaged over about the last 10 calls (0.0
        before any; a prompt's guesses name many experts, so a running total would hide the decode steps'):
        below ``GUESS_RECALL`` guesses only fill free room, since evicting for them loses more hits than they
        bring."""
        guess = self.guesses.pop(index, None)
        if guess is not None and needed:
            self.guess_recall += 0.1 * (len(guess.intersection(needed)) / len(needed) - self.guess_recall)

    @staticmethod
    def _compute(layer: MoELayer, x: Tensor, route_from: Tensor, gates: Tensor, ids: Tensor, needed: list,
                 expert) -> Tensor:
        inputs = MoEInputs(x, route_from, layer.router.weight, layer.router.bias, layer.w_in, layer.b_in,
                           layer.w_out, layer.b_out, layer.const_experts)
        strategy = strategy_for(ids.numel(), layer.num_experts)
        if strategy == "grouped" and grouped_mm_fits(inputs, gates.dtype):
            # one grouped GEMM over the chosen experts stacked in expert order: ids renumbered monotonically, so
            # the slots sort, and sum, as in the full layer
            compact, ids = _compacted(inputs, layer, ids, needed, expert)
            return routed_sum(compact, layer.attrs, gates, ids, strategy)
        return routed_sum(inputs, layer.attrs, gates, ids, "per_expert" if strategy == "grouped" else strategy,
                          expert)

    def _hook_blocks(self, blocks: dict[str, fx.GraphModule]) -> None:
        from moefx.convert.pregate import BLOCK_INPUT
        from moefx.convert.trace import CALL_SPEC

        index_of = {id(layer): i for i, layer in enumerate(self.layers)}
        for block in blocks.values():
            inside = sorted(index_of[id(m)] for m in block.modules() if id(m) in index_of)

            def entry(module, args, kwargs, inside=inside, position=block.meta[BLOCK_INPUT]):
                routed_from = getattr(module, CALL_SPEC).inputs(args, kwargs)[position]
                keys = []
                for i in inside:
                    layer = self.layers[i]
                    ids = layer.routing(routed_from)[1]
                    keys += [(i, e) for e in sorted(set(ids[ids < layer.num_experts].tolist()))]
                if keys:
                    self.policy.expect(keys)
                    self.cache.prefetch(keys)
            self.handles.append(block.register_forward_pre_hook(entry, with_kwargs=True))

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.cache.close()
        self.cache.resident.clear()
        self.tier.close()
        if self.owned_directory:
            shutil.rmtree(self.owned_directory, ignore_errors=True)

    def __enter__(self) -> "Offloaded":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _compacted(inputs: MoEInputs, layer: MoELayer, ids: Tensor, needed: list, expert) -> tuple[MoEInputs, Tensor]:
    num_experts = layer.num_experts
    zero_computation = layer.router.out_features - num_experts
    renumber = torch.empty(layer.router.out_features, dtype=ids.dtype, device=ids.device)
    renumber[torch.tensor(needed, dtype=torch.long, device=ids.device)] = torch.arange(len(needed), dtype=ids.dtype,
                                                                                       device=ids.device)
    renumber[num_experts:] = torch.arange(zero_computation, dtype=ids.dtype, device=ids.device) + len(needed)
    tensors = [expert(e) for e in needed]
    stacked = [None if tensors[0][i] is None else torch.stack([t[i] for t in tensors]) for i in range(4)]
    router_rows = inputs.w_router.new_empty(len(needed) + zero_computation, 0)  # only its row count is read
    compact = inputs._replace(w_router=router_rows, b_router=None, w_in=stacked[0], b_in=stacked[1],
                              w_out=stacked[2], b_out=stacked[3])
    return compact, renumber[ids]


def _pregated_blocks(model: nn.Module) -> dict[str, fx.GraphModule]:
    from moefx.convert.pregate import BLOCK_INPUT

    return {name: m for name, m in model.named_modules() if isinstance(m, fx.GraphModule) and BLOCK_INPUT in m.meta}


def offload(model: nn.Module, source: Optional[str] = None, config: Optional[OffloadConfig] = None,
            directory: Optional[str] = None, **options) -> Offloaded:
    """Offload the experts of every ``MoELayer`` of ``model`` (from ``moefx.convert`` or ``load_pretrained``)
    and return the runtime; the model is changed in place and keeps every call it accepted.

    source: a ``save_pretrained`` directory whose safetensors files hold these experts (the slow tier is the
    checkpoint itself); default: the experts are written to ``directory`` (default: a temporary directory,
    removed by ``close()``). options: ``OffloadConfig`` fields, or pass ``config``."""
    from safetensors.torch import save_file

    if config is None:
        config = OffloadConfig(**options)
    elif options:
        config = dataclasses.replace(config, **options)
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MoELayer)]
    if not layers:
        raise ValueError(f"moefx.offload: {type(model).__name__} has no MoE layer; convert it with moefx.convert")
    if any(isinstance(m, OffloadedMoELayer) for _, m in layers):
        raise ValueError("moefx.offload: the model is already offloaded")
    owned = None
    if source is not None:
        files = _checkpoint_files(source)
    else:
        if directory is None:
            directory = owned = tempfile.mkdtemp(prefix="moefx-offload-")
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, OFFLOAD_FILE)
        save_file({f"{name}.{t}": getattr(m, t).detach().cpu().contiguous() for name, m in layers
                   for t in EXPERT_TENSORS if getattr(m, t) is not None}, path)
        files = [path]
    store = SafetensorsFiles(files)
    for name, m in layers:
        for t in EXPERT_TENSORS:
            tensor = getattr(m, t)
            key = f"{name}.{t}"
            if tensor is not None and (key not in store or store.entries[key][2] != tuple(tensor.shape)):
                raise ValueError(f"moefx.offload: {source or directory} lacks {key} {tuple(tensor.shape)}; pass the "
                                 "directory the model was saved to (moefx.save_pretrained) or no source")
    runtime = Offloaded(model, layers, store, config, owned)
    for index, (name, m) in enumerate(layers):
        for t in EXPERT_TENSORS:
            tensor = getattr(m, t)
            if tensor is not None:
                setattr(m, t, nn.Parameter(torch.empty(tensor.shape, dtype=tensor.dtype, device="meta"),
                                           requires_grad=False))
        m.__class__ = OffloadedMoELayer
        m.offload_runtime, m.offload_index = runtime, index
    return runtime


def _checkpoint_files(path: str) -> list[str]:
    from moefx.checkpoint import LEGACY_WEIGHTS, WEIGHTS
    from moefx.shards import INDEX, MOEFX_INDEX, shard_files

    if any(os.path.exists(os.path.join(path, index)) for index in (MOEFX_INDEX, INDEX)):
        return list(shard_files(path))
    for name in (WEIGHTS, LEGACY_WEIGHTS):
        if os.path.exists(os.path.join(path, name)):
            return [os.path.join(path, name)]
    raise ValueError(f"moefx.offload: {path} holds no moefx checkpoint ({WEIGHTS} or a shard index); "
                     "save the model with moefx.save_pretrained first")
