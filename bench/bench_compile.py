"""Forward latency of a Qwen3-MoE-style model: eager vs torch.compile (default, reduce-overhead) vs backend="moefx".

Model: 3 Qwen3-MoE decoder layers at Qwen3-30B-A3B widths (hidden 2048, 128 experts of width 768, top-8,
32 heads, 4 KV heads, head_dim 128), random weights, transformers' default experts implementation.
Shapes: prefill (1 x 4096 tokens) and decode-shaped steps (batch 1 and 32, one token, no KV cache).
Meaningful on a GPU (bf16); ``--tiny`` runs small sizes in fp32 so the script is testable on a CPU.

    python bench/bench_compile.py                     # GPU, full sizes
    python bench/bench_compile.py --tiny --iters 3    # CPU smoke run
    python bench/bench_compile.py --shapes "decode b=1" --variants eager inductor moefx --json out.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import transformers

import moefx.compile.backend  # noqa: F401  (registers backend="moefx")

FULL = dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
            num_attention_heads=32, num_key_value_heads=4, head_dim=128, intermediate_size=6144)
TINY = dict(hidden_size=64, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128)
FULL_SHAPES = {"prefill 1x4096": (1, 4096), "decode b=1": (1, 1), "decode b=32": (32, 1)}
TINY_SHAPES = {"prefill 1x32": (1, 32), "decode b=1": (1, 1), "decode b=4": (4, 1)}

# name -> torch.compile keyword arguments (None: eager)
VARIANTS = {
    "eager": None,
    "inductor": dict(),
    "inductor reduce-overhead": dict(mode="reduce-overhead"),
    "moefx": dict(backend="moefx"),
    "moefx reduce-overhead+freezing": dict(backend="moefx", options={"triton.cudagraphs": True, "freezing": True}),
}


def build_model(tiny: bool, dtype: torch.dtype, device: str) -> torch.nn.Module:
    config = transformers.Qwen3MoeConfig(num_hidden_layers=3, vocab_size=1024, norm_topk_prob=True,
                                         max_position_embeddings=8192, **(TINY if tiny else FULL))
    torch.manual_seed(0)
    model = transformers.Qwen3MoeModel(config).to(device=device, dtype=dtype).eval()
    with torch.no_grad():
        for p in model.parameters():  # transformers starts routers at zero; spread them so routing varies
            p.normal_(0.0, 0.02)
    return model


def time_forward(fn, ids, iters: int, device: str) -> float:
    """Median milliseconds of ``fn(ids)`` after warm-up (the first calls compile)."""
    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):
        fn(ids)
    sync()
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        fn(ids)
        sync()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="small sizes, fp32 (CPU smoke run)")
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
    model = build_model(args.tiny, dtype, args.device)
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
            for variant in args.variants:
                kwargs = VARIANTS[variant]
                torch._dynamo.reset()
                if kwargs is None:
                    fn = model
                else:
                    fn = torch.compile(model, dynamic=False, **kwargs)

                def run(x, fn=fn):
                    return fn(x, use_cache=False).last_hidden_state

                ms = time_forward(run, ids, args.iters, args.device)
                out = run(ids).float()
                err = ((out - reference.float()).norm() / reference.float().norm()).item()
                results.append(dict(shape=shape_name, variant=variant, ms=ms, rel_err_vs_eager=err))
                print(f"{shape_name:>16}  {variant:<32} {ms:9.3f} ms   rel err vs eager {err:.1e}", flush=True)

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"\n{device_name}, {dtype}, torch {torch.__version__}, transformers {transformers.__version__}")
    header = f"| {'shape':<16} | " + " | ".join(f"{v:>12}" for v in args.variants) + " |"
    print(header)
    print("|" + "|".join("-" * len(cell) for cell in header.split("|")[1:-1]) + "|")
    for shape_name in shapes:
        row = {r["variant"]: r["ms"] for r in results if r["shape"] == shape_name}
        print(f"| {shape_name:<16} | " + " | ".join(f"{row[v]:.3f} ms".rjust(max(12, len(v))) for v in args.variants)
              + " |")
    report = dict(device=device_name, dtype=str(dtype), torch=torch.__version__,
                  transformers=transformers.__version__, results=results)
    print(json.dumps(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
