"""Benchmark moefx's Triton MoE kernels against the torch._grouped_mm recipe and an eager expert loop.

Shapes (H, F, E, top_k) of issue 4: Mixtral-8x7B, Qwen3-30B-A3B, DeepSeek-V2-Lite, OLMoE,
gpt-oss-20b, all gated SwiGLU experts in bf16, routed by a softmax router, tokens 1 .. 16384,
uniform and skewed (Zipf-biased router) routing. Every row is measured in one run with the
rates it is judged by:

    floor = max(bytes of the distinct experts' weights read (+ x, y, router) / copy bandwidth,
                FLOPs / GEMM rate)

with the copy bandwidth (device-to-device copy, bytes read + written) and the GEMM rate
(8192^3 bf16 matmul) measured at the start of the same run. Rows with at most
--graph-max-tokens tokens are also timed as CUDA-graph replays (moefx and grouped_mm; the eager
loop syncs with the host and cannot be captured); "% floor" and the speedups then use the
best of eager and graph for each contender. Prints a table and writes JSON.

    python bench/bench_moe.py                                  # every shape, token count, routing
    python bench/bench_moe.py --shapes qwen3-30b-a3b --tokens 1,64,16384 --routing uniform
    TRITON_INTERPRET=1 python bench/bench_moe.py --device cpu --dtype float32 --shape 64,48,8,2 --tokens 1,17
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moefx.codegen import moe_triton  # noqa: E402
from moefx.op import MoEAttrs, MoEInputs  # noqa: E402

SHAPES = {  # name: (hidden H, expert width F, experts E, top_k, renormalize)
    "mixtral": (4096, 14336, 8, 2, True),
    "qwen3-30b-a3b": (2048, 768, 128, 8, True),
    "deepseek-v2-lite": (2048, 1408, 64, 6, False),
    "olmoe": (2048, 1024, 64, 8, False),
    "gpt-oss-20b": (2880, 2880, 32, 4, True),
}
TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384)
ROUTINGS = ("uniform", "skewed")


# ---------------------------------------------------------------- timing and measured rates

def timer(device: torch.device):
    """Median milliseconds of fn(): CUDA events through triton's do_bench on GPU, wall clock on CPU."""
    if device.type == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    def wall(fn, reps=3):
        fn()
        samples = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return statistics.median(samples)
    return wall


def graphed(fn, device: torch.device):
    """fn captured in a CUDA graph (returns the replay callable), or None off CUDA."""
    if device.type != "cuda":
        return None
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm-up outside capture: compilation, allocator pools
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def measure_rates(device: torch.device, dtype: torch.dtype, time_ms) -> dict:
    """Copy bandwidth (bytes read + written per second) and GEMM rate (FLOP/s), measured here and now."""
    numel = (1 << 30) // 2 if device.type == "cuda" else 1 << 24
    src = torch.randn(numel, device=device, dtype=dtype)
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src))
    n = 8192 if device.type == "cuda" else 512
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    gemm_ms = time_ms(lambda: a @ b)
    return {"copy_bytes_per_s": 2 * src.numel() * src.element_size() / (copy_ms * 1e-3),
            "gemm_flop_per_s": 2 * n ** 3 / (gemm_ms * 1e-3), "gemm_n": n}


# ---------------------------------------------------------------- the three implementations

def make_layer(shape, routing: str, device, dtype, seed=0):
    hidden, width, experts, top_k, renormalize = shape
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*size, scale):
        return (torch.randn(*size, generator=gen) * scale).to(device=device, dtype=dtype)

    w_router = rand(experts, hidden, scale=1 / math.sqrt(hidden))
    # Skewed: a Zipf-like bias, expert e's logit lowered by log(1 + e).
    b_router = (None if routing == "uniform" else
                (-torch.log1p(torch.arange(experts, dtype=torch.float32))).to(device=device, dtype=dtype))
    w_in = rand(experts, 2 * width, hidden, scale=1 / math.sqrt(hidden))  # gate/up rows interleaved
    w_out = rand(experts, hidden, width, scale=1 / math.sqrt(width))
    return dict(w_router=w_router, b_router=b_router, w_in=w_in, w_out=w_out, top_k=top_k, renormalize=renormalize)


def moefx_fn(x, layer):
    inputs = MoEInputs(x, x, layer["w_router"], layer["b_router"], layer["w_in"], None, layer["w_out"], None, None)
    attrs = MoEAttrs(layer["top_k"], "silu", True, "softmax", layer["renormalize"])
    return lambda: moe_triton(inputs, attrs)


def routing(x, layer):
    logits = F.linear(x, layer["w_router"], layer["b_router"]).float()
    gates, ids = logits.softmax(-1).topk(layer["top_k"], dim=-1)
    if layer["renormalize"]:
        gates = gates / gates.sum(-1, keepdim=True)
    return gates, ids


def grouped_mm_fn(x, layer):
    """The torch._grouped_mm recipe: sort slots by expert, gather, two grouped GEMMs, scatter-add.

    Weights are laid out once (outside the timing) the way this recipe wants them: gate rows
    then up rows, so the SwiGLU halves are contiguous. No host sync, so it captures in a graph."""
    experts, top_k = layer["w_in"].shape[0], layer["top_k"]
    w_gate_up = torch.cat([layer["w_in"][:, 0::2], layer["w_in"][:, 1::2]], dim=1).transpose(-2, -1)
    w_down = layer["w_out"].transpose(-2, -1)

    def run():
        gates, ids = routing(x, layer)
        flat = ids.flatten()
        order = flat.argsort(stable=True)
        counts = torch.zeros(experts, dtype=torch.int32, device=x.device).scatter_add_(
            0, flat, torch.ones_like(flat, dtype=torch.int32))
        offs = counts.cumsum(0, dtype=torch.int32)
        tokens = order // top_k
        gate_up = torch._grouped_mm(x[tokens], w_gate_up, offs=offs)
        gate, up = gate_up.chunk(2, dim=-1)
        y = torch._grouped_mm(F.silu(gate) * up, w_down, offs=offs)
        y = y * gates.flatten()[order, None].to(y.dtype)
        return torch.zeros_like(x).index_add_(0, tokens, y)
    return run


def eager_loop_fn(x, layer):
    """The per-expert loop of Hugging Face's Mixtral-style blocks (host sync on the routing)."""
    w_in, w_out = layer["w_in"], layer["w_out"]

    def run():
        gates, ids = routing(x, layer)
        out = torch.zeros_like(x)
        hit = torch.bincount(ids.flatten(), minlength=w_in.shape[0]).nonzero().flatten().tolist()
        for e in hit:
            token, choice = torch.where(ids == e)
            a = F.linear(x[token], w_in[e])
            h = F.silu(a[:, 0::2]) * a[:, 1::2]
            out.index_add_(0, token, F.linear(h, w_out[e]) * gates[token, choice, None].to(x.dtype))
        return out
    return run


# ---------------------------------------------------------------- one row

def floor_seconds(x, layer, rates) -> tuple[float, dict]:
    """Roofline floor of the whole op at this routing, and the counts it rests on."""
    tokens, hidden = x.shape
    experts, f_in, _ = layer["w_in"].shape
    width = layer["w_out"].shape[2]
    _, ids = routing(x, layer)
    distinct = int(ids.unique().numel())
    elem = x.element_size()
    weight_bytes = distinct * (f_in * hidden + hidden * width) * elem
    bytes_moved = weight_bytes + layer["w_router"].numel() * elem + 2 * x.numel() * elem
    flops = 2 * tokens * layer["top_k"] * (f_in * hidden + hidden * width) + 2 * tokens * hidden * experts
    counts = torch.bincount(ids.flatten(), minlength=experts).float()
    floor = max(bytes_moved / rates["copy_bytes_per_s"], flops / rates["gemm_flop_per_s"])
    return floor, {"distinct_experts": distinct, "bytes": bytes_moved, "flops": flops,
                   "load_imbalance": (counts.max() / counts.mean()).item(),
                   "bound": "memory" if bytes_moved / rates["copy_bytes_per_s"] >= flops / rates["gemm_flop_per_s"]
                   else "compute"}


def bench_row(name, shape, tokens, routing_kind, rates, device, dtype, time_ms, graph_max_tokens) -> dict:
    layer = make_layer(shape, routing_kind, device, dtype)
    x = torch.randn(tokens, shape[0], device=device, dtype=dtype)
    contenders = {"moefx": moefx_fn(x, layer), "grouped_mm": grouped_mm_fn(x, layer),
                  "eager_loop": eager_loop_fn(x, layer)}
    ref = contenders["grouped_mm"]().float()
    err = ((contenders["moefx"]().float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    row = {"shape": name, "H_F_E_k": list(shape[:4]), "tokens": tokens, "routing": routing_kind,
           "rel_err_vs_grouped_mm": err}
    floor, facts = floor_seconds(x, layer, rates)
    row.update(facts, floor_ms=floor * 1e3)
    for label, fn in contenders.items():
        row[f"{label}_ms"] = time_ms(fn)
        replay = graphed(fn, device) if tokens <= graph_max_tokens and label != "eager_loop" else None
        row[f"{label}_graph_ms"] = time_ms(replay) if replay else None
        row[f"{label}_best_ms"] = min(t for t in (row[f"{label}_ms"], row[f"{label}_graph_ms"]) if t is not None)
    best = row["moefx_best_ms"]
    row["moefx_pct_floor"] = 100 * row["floor_ms"] / best
    row["speedup_vs_grouped_mm"] = row["grouped_mm_best_ms"] / best
    row["speedup_vs_eager_loop"] = row["eager_loop_best_ms"] / best
    return row


def print_table(rows, rates):
    print(f"copy {rates['copy_bytes_per_s'] / 1e12:.2f} TB/s, GEMM {rates['gemm_flop_per_s'] / 1e12:.0f} TFLOP/s "
          f"({rates['gemm_n']}^3)")
    head = (f"{'shape':17} {'routing':8} {'tokens':>6} {'floor ms':>9} {'moefx ms':>9} {'graph ms':>9} "
            f"{'% floor':>7} {'x grouped_mm':>12} {'x eager':>8} {'experts':>7} {'err':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        graph = "-" if r["moefx_graph_ms"] is None else f"{r['moefx_graph_ms']:.4f}"
        print(f"{r['shape']:17} {r['routing']:8} {r['tokens']:6d} {r['floor_ms']:9.4f} {r['moefx_ms']:9.4f} "
              f"{graph:>9} {r['moefx_pct_floor']:6.1f}% {r['speedup_vs_grouped_mm']:11.2f}x "
              f"{r['speedup_vs_eager_loop']:7.2f}x {r['distinct_experts']:7d} {r['rel_err_vs_grouped_mm']:8.1e}")


def chosen_shapes(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """{name: (H, F, E, top_k, gated)} from ``--shape H,F,E,top_k`` or the names in ``--shapes``."""
    if args.shape:
        hidden, width, experts, top_k = map(int, args.shape.split(","))
        return {f"custom-{args.shape}": (hidden, width, experts, top_k, True)}
    unknown = set(args.shapes.split(",")) - set(SHAPES)
    if unknown:
        parser.error(f"unknown shapes {sorted(unknown)}; pick from {list(SHAPES)} or pass --shape H,F,E,top_k")
    return {name: SHAPES[name] for name in args.shapes.split(",")}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {list(SHAPES)}")
    parser.add_argument("--shape", help="a custom H,F,E,top_k instead of --shapes")
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    parser.add_argument("--routing", default=",".join(ROUTINGS))
    parser.add_argument("--graph-max-tokens", type=int, default=64)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--json", default="bench/results_moe.json")
    args = parser.parse_args(argv)

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    shapes = chosen_shapes(parser, args)
    time_ms = timer(device)
    rates = measure_rates(device, dtype, time_ms)
    rows = []
    for name, shape in shapes.items():
        for routing_kind in args.routing.split(","):
            for tokens in map(int, args.tokens.split(",")):
                rows.append(bench_row(name, shape, tokens, routing_kind, rates, device, dtype, time_ms,
                                      args.graph_max_tokens))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print_table(rows, rates)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "triton": __import__("triton").__version__, "dtype": args.dtype,
            "command": " ".join(sys.argv), "rates": rates}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
