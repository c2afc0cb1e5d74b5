"""Decoding with experts offloaded (``moefx.offload``): tokens/s and hit rate over fast-tier budgets.

Model: a random-weight Llama (H 1024, F 4096 SwiGLU, 4 layers, vocab 1000; random weights: hit rates show
the runtime's mechanics, not a trained model's routing locality), carved into 16 experts top-2 (12.5%
active), once with each layer routed from its FFN input (layer-ahead prefetch) and once pre-gated
(``pregate="block"``, experts known at block entry). Decoding samples 32 tokens after an 8-token prompt
(seeded, so every configuration decodes the same tokens: offloading is exact, and checked).

Budgets are multiples of the active experts' bytes (top_k x layers). Rows:

* in memory: the converted model, all experts resident (the ceiling);
* offload: Belady eviction, prefetch by pre-gating and/or layer-ahead prediction;
* LRU on demand: the same runtime without prefetch, LRU eviction (reference a);
* dense + accelerate: the dense model with accelerate's disk offload of as many MLPs as exceed the same
  budget (reference b): its FFN weights stream from the same kind of memory-mapped safetensors file;
* bandwidth limit: loaded bytes per token / the slow tier's measured bandwidth, as tokens/s (reference c).

The slow tier here is a memory-mapped safetensors file in the page cache (no GPU: this machine's "link"
is memcpy from the page cache, measured below); ``--bandwidth GBPS`` throttles every load to emulate a
slower link (PCIe, NVMe), and adds those rows. Timings are wall time, medians of ``--rounds`` interleaved
rounds (the machine is shared: load average printed).

    PYTHONPATH=. python bench/bench_offload.py [--rounds 3] [--tokens 32] [--bandwidth 2]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from copy import deepcopy

import torch

import moefx
from moefx.offload import layer_ahead_recall, offload, routing_consistency
from moefx.offload.store import SafetensorsFiles, SlowTier

HIDDEN, FFN, LAYERS, VOCAB, EXPERTS, TOP_K, PROMPT = 1024, 4096, 4, 1000, 16, 2, 8


def dense_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=LAYERS, hidden_size=HIDDEN, intermediate_size=FFN, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=VOCAB)
    return LlamaForCausalLM(config).eval()


def calibration():
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, VOCAB, (4, 64), generator=g)} for _ in range(4)]


def decode(model, tokens: int, stats=None) -> tuple[float, torch.Tensor, dict]:
    """(decode tokens/s over the steps after the prompt's, tokens, ``stats()`` once the prompt is done) of a
    seeded sampled generation."""
    stamps, after_prompt = [], {}

    def stamp(input_ids, scores):
        stamps.append(time.perf_counter())
        if stats is not None and len(stamps) == 1:
            after_prompt.update(stats())
        return scores
    prompt = torch.randint(0, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(3)
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=True, top_k=0,
                             logits_processor=[stamp], pad_token_id=0)
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), out, after_prompt


def link_bandwidth(path: str, layers: list[str], repeats: int = 5) -> float:
    """Bytes/s of SlowTier loads of every expert (page cache warm), median of ``repeats`` passes."""
    tier = SlowTier(SafetensorsFiles([path]), torch.device("cpu"))
    rates = []
    for _ in range(repeats):
        start, moved = time.perf_counter(), 0
        for name in layers:
            for e in range(EXPERTS):
                moved += tier.load(name, e).nbytes
        rates.append(moved / (time.perf_counter() - start))
    tier.close()
    return statistics.median(rates)


def accelerate_offloaded(budget: int, directory: str):
    """The dense model with every MLP beyond ``budget`` bytes offloaded to disk by accelerate."""
    from accelerate import dispatch_model

    dense = dense_model()
    mlp_bytes = sum(p.nbytes for p in dense.model.layers[0].mlp.parameters())
    resident = budget // mlp_bytes
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    for i in range(LAYERS):
        for part in ("self_attn", "input_layernorm", "post_attention_layernorm"):
            device_map[f"model.layers.{i}.{part}"] = "cpu"
        device_map[f"model.layers.{i}.mlp"] = "cpu" if i < resident else "disk"
    return dispatch_model(dense, device_map, main_device="cpu", offload_dir=directory), resident


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--bandwidth", type=float, default=None, help="GB/s: also run with loads throttled to this")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())} at start, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, 1 intra-op thread, fp32, wall time, {time.strftime('%H:%M UTC', time.gmtime())}")
    start = time.perf_counter()
    plain = moefx.convert(dense_model(), num_experts=EXPERTS, top_k=TOP_K, calibration=calibration(), progress=False)
    pregated = moefx.convert(dense_model(), num_experts=EXPERTS, top_k=TOP_K, calibration=calibration(),
                             router="distilled", pregate="block", progress=False)
    print(f"converted both models in {time.perf_counter() - start:.0f} s")
    held_out = [{"input_ids": torch.randint(0, VOCAB, (1, 64), generator=torch.Generator().manual_seed(9 + i))}
                for i in range(2)]
    for name, model in (("layer-routed", plain), ("pre-gated", pregated)):
        recall = layer_ahead_recall(model, held_out)["mean"]
        lrc = routing_consistency(model, held_out, segment=16)
        print(f"{name}: layer-ahead recall {recall:.3f}; {lrc}")

    directory = tempfile.mkdtemp(prefix="moefx-bench-offload-")
    rows: dict[str, list[float]] = {}
    info: dict[str, dict] = {}
    reference_tokens = {}
    budgets = (1, 2, 4)
    rates = [None] + ([args.bandwidth * 1e9] if args.bandwidth else [])
    configs = [("in memory", name, model, None) for name, model in (("layer-routed", plain), ("pre-gated", pregated))]
    for rate in rates:
        suffix = "" if rate is None else f" @{args.bandwidth:g} GB/s"
        for b in budgets:
            configs.append((f"offload belady {b}x{suffix}", "layer-routed", plain,
                            dict(budget=f"{b}x", policy="belady", prefetch="layer_ahead", bandwidth=rate)))
            configs.append((f"offload belady {b}x{suffix}", "pre-gated", pregated,
                            dict(budget=f"{b}x", policy="belady", prefetch="both", bandwidth=rate)))
            configs.append((f"LRU on demand {b}x{suffix}", "layer-routed", plain,
                            dict(budget=f"{b}x", policy="lru", prefetch="none", bandwidth=rate)))
    expert_bytes = None
    for round_ in range(args.rounds):
        for label, model_name, model, options in configs:
            key = f"{label} | {model_name}"
            if options is None:
                tps, out, _ = decode(model, args.tokens)
            else:
                copy = deepcopy(model)  # offload changes the model in place
                with offload(copy, directory=os.path.join(directory, "experts"), **options) as runtime:
                    tps, out, before = decode(copy, args.tokens, lambda: runtime.stats.summary())
                    after = runtime.stats.summary()
                    d = {k: after[k] - before[k] for k in ("requests", "hits", "late", "misses", "bytes_loaded")}
                    expert_bytes = runtime.active_bytes / (TOP_K * LAYERS)
                    assert runtime.cache.peak <= runtime.budget
                    # decode steps only (the prompt's loads left out), summed over rounds
                    for k, v in d.items():
                        info.setdefault(key, dict.fromkeys(d, 0))[k] += v
                    info[key]["steps"] = info[key].get("steps", 0) + args.tokens - 1
                del copy
            reference_tokens.setdefault(model_name, out)
            assert torch.equal(out, reference_tokens[model_name]), f"{key}: decoded other tokens than in memory"
            rows.setdefault(key, []).append(tps)
        for b in budgets:
            key = f"dense + accelerate disk offload {b}x"
            dense, resident = accelerate_offloaded(int(b * expert_bytes * TOP_K * LAYERS), os.path.join(directory, "acc"))
            tps, _, _ = decode(dense, args.tokens)
            rows.setdefault(key, []).append(tps)
            info[key] = dict(resident_mlps=resident)
            del dense
        print(f"round {round_ + 1}/{args.rounds} done, load average {os.getloadavg()[0]:.2f}")

    experts_file = os.path.join(directory, "experts", "moefx_experts.safetensors")
    names = [n for n, m in plain.named_modules() if isinstance(m, moefx.layer.MoELayer)]
    with offload(deepcopy(plain), directory=os.path.join(directory, "experts")):
        bandwidth = link_bandwidth(experts_file, names)
    print(f"\nslow tier: memory-mapped safetensors in the page cache, measured {bandwidth / 1e9:.2f} GB/s per load "
          f"(one expert = {expert_bytes / 2**20:.1f} MiB; active experts = {TOP_K * LAYERS} = "
          f"{expert_bytes * TOP_K * LAYERS / 2**20:.0f} MiB)")
    print(f"{'configuration':44s} {'model':13s} {'tok/s':>7s} {'hit':>6s} {'late':>6s} {'miss':>6s} "
          f"{'MiB/tok':>8s} {'limit tok/s':>11s} {'of limit':>8s}")
    for key, samples in rows.items():
        label, _, model_name = key.partition(" | ")
        tps = statistics.median(samples)
        i = info.get(key, {})
        line = f"{label:44s} {model_name or 'dense':13s} {tps:7.1f}"
        if "requests" in i:
            link = args.bandwidth * 1e9 if "GB/s" in label else bandwidth
            per_token = i["bytes_loaded"] / i["steps"]
            limit = link / per_token if per_token else float("inf")
            n = i["requests"]
            line += (f" {i['hits'] / n:6.1%} {i['late'] / n:6.1%} {i['misses'] / n:6.1%} {per_token / 2**20:8.2f} "
                     f"{limit:11.1f} {tps / limit:8.1%}")
        elif "resident_mlps" in i:
            line += f"   ({i['resident_mlps']} of {LAYERS} MLPs resident)"
        print(line)
    print(f"load average at the end {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
