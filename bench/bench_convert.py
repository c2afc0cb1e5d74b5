"""Conversion cost: convert a ~1B-parameter Llama-shaped model (random weights, bf16) on the CPU.

Prints wall time per phase and peak RSS against the model's size (targets: <= 2 minutes on a
2-core CPU, peak RSS <= 1.5x the model's bytes).

    python bench/bench_convert.py [--method coactivation] [--layers 16]
"""
from __future__ import annotations

import argparse
import platform
import resource
import time

import torch


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_rss_bytes() -> int:
    """Peak RSS since the last ``reset_peak_rss`` (VmHWM), else since the process started."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> None:
    """Start peak-RSS accounting afresh, so that building the model does not count (Linux)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="coactivation", choices=["split", "coactivation", "upcycle"])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--shared", type=int, default=1)
    parser.add_argument("--batches", type=int, default=4, help="calibration batches of 1 x 128 tokens")
    args = parser.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    import moefx

    config = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=args.layers,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=True)
    start = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)
    model = LlamaForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    build_seconds = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    generator = torch.Generator().manual_seed(0)
    calibration = [{"input_ids": torch.randint(0, config.vocab_size, (1, 128), generator=generator)}
                   for _ in range(args.batches)]
    build_peak = peak_rss_bytes()
    reset_peak_rss()
    before = rss_bytes()
    start = time.perf_counter()
    shared = 0 if args.method == "upcycle" else args.shared
    moe = moefx.convert(model, num_experts=args.experts, top_k=args.top_k, calibration=calibration,
                        method=args.method, num_shared=shared, inplace=True)
    convert_seconds = time.perf_counter() - start
    summary = moefx.summary(moe)
    peak = peak_rss_bytes()
    print(f"model: Llama-shaped, {args.layers} layers, {params / 1e9:.2f}B parameters, bf16, "
          f"{model_bytes / 2**30:.2f} GiB (built in {build_seconds:.1f} s, peak RSS while building "
          f"{build_peak / 2**30:.2f} GiB)")
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print(f"{'method':<14} {'experts':>8} {'top_k':>5} {'shared':>6} {'calib':>9} {'convert s':>9} "
          f"{'RSS before':>10} {'peak RSS':>9} {'peak/model':>10}")
    print(f"{args.method:<14} {args.experts:>8} {args.top_k:>5} {shared:>6} {f'{args.batches}x128':>9} "
          f"{convert_seconds:>9.1f} {before / 2**30:>9.2f}G {peak / 2**30:>8.2f}G {peak / model_bytes:>10.2f}")
    print(f"{len(summary.layers)} MoE layers, {summary.active_fraction:.1%} of FFN neurons active per token")


if __name__ == "__main__":
    main()
