"""Forward latency of a Qwen3-MoE or OLMoE model: eager vs torch.compile (default, reduce-overhead) vs backend="moefx".

Model (``--model``): 3 decoder layers of transformers' Qwen3-MoE at Qwen3-30B-A3B widths (hidden 2048, 128
experts of width 768, top-8, 32 heads, 4 KV heads, head_dim 128) or OLMoE-1B-7B widths (hidden 2048, 64
experts of width 1024, top-8, 16 heads), random weights, transformers' default experts implementation.
Shapes: prefill (1 x 4096 tokens) and decode-shaped steps (batch 1 and 32, one token, no KV cache).
Meaningful on a GPU (bf16); ``--tiny`` runs small sizes in fp32 on a CPU (hidden 64, 8 experts of width 32,
top-2; shapes 1 x 32, one token at batch 1 and 4, and 4 x 128). Variants are compiled first, then timed in
turns (A, B, A, B, ...), medians (on a CPU of this thread's CPU time: run with OMP_NUM_THREADS=1); the load
average is printed because the machine may be shared.

    python bench/bench_compile.py                     # GPU, full sizes
    python bench/bench_compile.py --tiny --iters 3    # CPU smoke run
    python bench/bench_compile.py --tiny --model olmoe --shapes "decode b=1" "prefill 4x128" --variants inductor moefx
    python bench/bench_compile.py --shapes "decode b=1" --variants eager inductor moefx --json out.json
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import torch
import transformers

import moefx.compile.backend  # noqa: F401  (registers backend="moefx")

# model -> (config class, full sizes, tiny sizes)
MODELS = {
    "qwen3_moe": (transformers.Qwen3MoeConfig,
                  dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                       num_attention_heads=32, num_key_value_heads=4, head_dim=128, intermediate_size=6144,
                       norm_topk_prob=True),
                  dict(hidden_size=64, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
                       norm_topk_prob=True)),
    "olmoe": (transformers.OlmoeConfig,
              dict(hidden_size=2048, intermediate_size=1024, num_experts=64, num_experts_per_tok=8,
                   num_attention_heads=16, num_key_value_heads=16),
              dict(hidden_size=64, intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                   num_attention_heads=4, num_key_value_heads=2)),
}
FULL_SHAPES = {"prefill 1x4096": (1, 4096), "decode b=1": (1, 1), "decode b=32": (32, 1)}
TINY_SHAPES = {"prefill 1x32": (1, 32), "decode b=1": (1, 1), "decode b=4": (4, 1), "prefill 4x128": (4, 128)}

# name -> torch.compile keyword arguments (None: eager)
VARIANTS = {
    "eager": None,
    "inductor": dict(),
    "inductor reduce-overhead": dict(mode="reduce-overhead"),
    "moefx": dict(backend="moefx"),
    "moefx reduce-overhead+freezing": dict(backend="moefx", options={"triton.cudagraphs": True, "freezing": True}),
}


def build_model(name: str, tiny: bool, dtype: torch.dtype, device: str) -> torch.nn.Module:
    config_class, full, small = MODELS[name]
    config = config_class(num_hidden_layers=3, vocab_size=1024, max_position_embeddings=8192, **(small if tiny else full))
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(config).to(device=device, dtype=dtype).eval()
    with torch.no_grad():
        for p in model.parameters():  # transformers starts routers at zero; spread them so routing varies
            p.normal_(0.0, 0.02)
    return model


def forward(model):
    return lambda ids: model(ids, use_cache=False).last_hidden_state


def compiled_forward(model, kwargs: dict):
    """``torch.compile`` of a forward function with a code object of its own: Dynamo keeps compiled code per code
    object, so variants compiled from one shared ``forward`` would each evaluate the others' guards first on
    every call, and the variant compiled first would pay for the rest."""
    namespace = {}
    exec("def run(model, ids):\n    return model(ids, use_cache=False).last_hidden_state\n", namespace)
    run = torch.compile(namespace["run"], dynamic=False, **kwargs)
    return lambda ids: run(model, ids)


def time_forwards(fns: dict, ids, iters: int, device: str) -> dict:
    """Median milliseconds of each ``fn(ids)`` after warm-up (the first calls compile), timed in turns."""
    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    for fn in fns.values():
        for _ in range(3):
            fn(ids)
    sync()
    # on a CPU with one intra-op thread every kernel runs on this thread: its CPU time leaves out the time other
    # processes of a shared machine hold the core
    clock = time.perf_counter if device == "cuda" else time.thread_time
    samples = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            start = clock()
            fn(ids)
            sync()
            samples[name].append((clock() - start) * 1e3)
    return {name: statistics.median(s) for name, s in samples.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="small sizes, fp32 (CPU smoke run)")
    parser.add_argument("--model", default="qwen3_moe", choices=list(MODELS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--shapes", nargs="+", help=f"a subset of the shapes (full: {list(FULL_SHAPES)}, "
                                                    f"--tiny: {list(TINY_SHAPES)})")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    if not args.tiny and args.device != "cuda":
        parser.error("full sizes need a CUDA device; pass --tiny to run small sizes on the CPU")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    if args.device == "cpu":
        torch.set_num_threads(1)
    model = build_model(args.model, args.tiny, dtype, args.device)
    print(f"{args.model}, load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    shapes = TINY_SHAPES if args.tiny else FULL_SHAPES
    if args.shapes:
        unknown = set(args.shapes) - set(shapes)
        if unknown:
            parser.error(f"unknown shapes {sorted(unknown)}; pick from {list(shapes)}")
        shapes = {name: shapes[name] for name in args.shapes}
    vocab = model.config.vocab_size

    results = []
    with torch.no_grad():
        for shape_name, (batch, length) in shapes.items():
            ids = torch.randint(0, vocab, (batch, length), device=args.device)
            reference = model(ids, use_cache=False).last_hidden_state
            torch._dynamo.reset()
            runs = {}
            for variant in args.variants:
                kwargs = VARIANTS[variant]
                runs[variant] = forward(model) if kwargs is None else compiled_forward(copy.deepcopy(model), kwargs)
            times = time_forwards(runs, ids, args.iters, args.device)
            for variant, run in runs.items():
                out = run(ids).float()
                err = ((out - reference.float()).norm() / reference.float().norm()).item()
                results.append(dict(shape=shape_name, variant=variant, ms=times[variant], rel_err_vs_eager=err))
                print(f"{shape_name:>16}  {variant:<32} {times[variant]:9.3f} ms   rel err vs eager {err:.1e}",
                      flush=True)

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"\n{args.model}, {device_name}, {dtype}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    header = f"| {'shape':<16} | " + " | ".join(f"{v:>12}" for v in args.variants) + " |"
    print(header)
    print("|" + "|".join("-" * len(cell) for cell in header.split("|")[1:-1]) + "|")
    for shape_name in shapes:
        row = {r["variant"]: r["ms"] for r in results if r["shape"] == shape_name}
        print(f"| {shape_name:<16} | " + " | ".join(f"{row[v]:.3f} ms".rjust(max(12, len(v))) for v in args.variants)
              + " |")
    report = dict(model=args.model, device=device_name, dtype=str(dtype), torch=torch.__version__,
                  transformers=transformers.__version__, results=results)
    print(json.dumps(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
