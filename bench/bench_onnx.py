"""onnxruntime CPU latency of a converted all-MiniLM-L6-v2: com.microsoft.MoE path vs standard-op path
vs PyTorch eager, in one run, at several batch sizes.

The contrib op needs softmax gates, so the contrib column uses the upcycled model (8 copies of each FFN,
renormalised softmax top-k) exported with approximate=True (its CPU GELU is tanh-GELU; the measured
error is printed). The carved model (method="split", unit gates) has no contrib path: standard ops only.

    PYTHONPATH=. python bench/bench_onnx.py [--batches 1 8 32] [--seq 64] [--threads 1]
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch

import moefx
from moefx.data import python_doc_sentences
from moefx.demo import load_minilm, tokenize
from moefx.onnx import export_onnx


def timed(fn, min_seconds: float = 1.0, min_runs: int = 5) -> float:
    """Median seconds per call after one warm-up call."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def ort_runner(path: Path, batch: dict, threads: int):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    feeds = {name: batch[name].numpy() for name in names}
    return lambda: session.run(None, feeds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    dense, tokenizer = load_minilm()
    calibration = tokenize(tokenizer, python_doc_sentences(64), 32)
    models = {
        "dense": dense,
        "carved (split)": moefx.convert(dense, num_experts=args.experts, top_k=args.top_k, method="split",
                                        calibration=calibration, progress=False),
        "upcycled": moefx.convert(dense, num_experts=args.experts, top_k=args.top_k, method="upcycle",
                                  calibration=calibration, progress=False),
    }
    gen = torch.Generator().manual_seed(0)

    def batch(size):
        return {"input_ids": torch.randint(1000, tokenizer.vocab_size, (size, args.seq), generator=gen),
                "attention_mask": torch.ones(size, args.seq, dtype=torch.long),
                "token_type_ids": torch.zeros(size, args.seq, dtype=torch.long)}

    tmp = Path(tempfile.mkdtemp())
    files, notes = {}, []
    for name, model in models.items():
        targets = {"dense": ["standard"], "carved (split)": ["standard"], "upcycled": ["standard", "onnxruntime"]}
        for target in targets[name]:
            path = tmp / f"{name.split()[0]}_{target}.onnx"
            report = export_onnx(model, batch(2), path, target=target, approximate=target == "onnxruntime")
            files[name, target] = path
            notes.append(f"{name:<15} {target:<11} max abs error vs PyTorch {report.max_abs_error:.1e}"
                         + (" (tanh-GELU approximation)" if report.approximated else ""))

    print(f"# bench_onnx  {datetime.date.today()}  {platform.processor() or platform.machine()}, "
          f"{args.threads} threads  torch {torch.__version__}  onnxruntime {ort.__version__}")
    print(f"# all-MiniLM-L6-v2, {args.experts} experts top-{args.top_k}, sequence {args.seq}; ms per batch "
          f"(median), onnxruntime CPUExecutionProvider")
    header = f"{'model':<15} {'batch':>5} {'eager ms':>9} {'ORT standard':>13} {'ORT contrib':>12} {'tokens/s best':>14}"
    print(header + "\n" + "-" * len(header))
    for name, model in models.items():
        for size in args.batches:
            inputs = batch(size)
            with torch.no_grad():
                eager = timed(lambda: model(**inputs))
            std = timed(ort_runner(files[name, "standard"], inputs, args.threads))
            contrib = timed(ort_runner(files[name, "onnxruntime"], inputs, args.threads)) \
                if (name, "onnxruntime") in files else None
            best = min(t for t in (eager, std, contrib) if t is not None)
            contrib_cell = f"{contrib * 1e3:>12.2f}" if contrib is not None else f"{'-':>12}"
            print(f"{name:<15} {size:>5} {eager * 1e3:>9.2f} {std * 1e3:>13.2f} {contrib_cell} "
                  f"{size * args.seq / best:>14.0f}")
    print("\n" + "\n".join(notes))


if __name__ == "__main__":
    main()
