"""Latency of a carved all-MiniLM-L6-v2 against the dense model, per runtime, 1 thread: onnxruntime with
com.microsoft.MoE, onnxruntime with the sparse standard-op lowering, OpenVINO with the sparse standard-op
lowering (when installed), and eager PyTorch (moefx's reference op).

Each runtime's converted model is timed against the same runtime's dense model; calls of one shape
alternate between the runners (A/B interleaved) and medians are taken. "ideal" is the fraction of the
dense FLOPs that the converted model needs: FFN share of the FLOPs x active fraction + the rest.
The contrib column needs approximate=True (com.microsoft.MoE's CPU GELU is tanh-GELU, MiniLM's is
exact); its measured error is printed with the others.

    PYTHONPATH=. python bench/bench_onnx.py [--quick] [--batches 1 8 32] [--seqs 64 128] [--top-ks 2 4]
"""
from __future__ import annotations

import argparse
import datetime
import os
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
from moefx.onnx import export_onnx, max_abs_error

try:
    import openvino
except ImportError:
    openvino = None


def ort_runner(path: Path, threads: int):
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return lambda batch: session.run(None, {name: batch[name].numpy() for name in names})[0]


def openvino_runner(path: Path, threads: int):
    compiled = openvino.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                                 "INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    names = [i.get_any_name() for i in compiled.inputs]
    return lambda batch: request.infer({name: batch[name].numpy() for name in names})[compiled.output(0)]


def eager_runner(model):
    def run(batch):
        with torch.no_grad():
            return model(**batch).last_hidden_state.numpy()
    return run


def interleaved_medians(runners: dict, batch: dict, rounds: int) -> dict:
    """Median seconds per call of each runner, the runners called in turn each round after one warm-up each."""
    for run in runners.values():
        run(batch)
    times = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            start = time.perf_counter()
            run(batch)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def ideal_fraction(config, seq: int, active: float) -> float:
    """FFN share of a BERT layer's multiply-adds per token (QKVO 4H^2, attention 2*S*H, FFN 2*H*F) x active + rest."""
    hidden, ffn = config.hidden_size, config.intermediate_size
    ffn_macs = 2 * hidden * ffn
    share = ffn_macs / (4 * hidden * hidden + 2 * seq * hidden + ffn_macs)
    return share * active + (1 - share)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batches 1 and 8, sequence 64, 5 rounds")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seqs", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--top-ks", type=int, nargs="+", default=[2, 4], help="of --experts: 2 of 8 = 25%% active")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.quick:
        args.batches, args.seqs, args.rounds = [1, 8], [64], 5
    torch.set_num_threads(args.threads)

    dense, tokenizer = load_minilm()
    calibration = tokenize(tokenizer, python_doc_sentences(128), 32)
    gen = torch.Generator().manual_seed(0)

    def batch(size, seq):
        return {"input_ids": torch.randint(1000, tokenizer.vocab_size, (size, seq), generator=gen),
                "attention_mask": torch.ones(size, seq, dtype=torch.long),
                "token_type_ids": torch.zeros(size, seq, dtype=torch.long)}

    tmp = Path(tempfile.mkdtemp())
    check = batch(3, 40)
    notes = []

    def export(model, name, target, approximate=False):
        path = tmp / f"{name}_{target}.onnx"
        export_onnx(model, batch(1, 16), path, target=target, approximate=approximate, verify=False)
        error = max_abs_error(path, model, (), check)
        notes.append(f"{name} {target}: onnxruntime max abs error vs PyTorch {error:.1e}"
                     + (" (tanh-GELU approximation)" if approximate else ""))
        return path

    def openvino_error(run, model, name):
        with torch.no_grad():
            expected = model(**check).last_hidden_state
        notes.append(f"{name} on OpenVINO: max abs error {(torch.from_numpy(run(check)) - expected).abs().max():.1e}")

    dense_file = export(dense, "dense", "standard")
    runners = {("dense", "ORT"): ort_runner(dense_file, args.threads), ("dense", "eager"): eager_runner(dense)}
    if openvino is not None:
        runners["dense", "OpenVINO"] = openvino_runner(dense_file, args.threads)
        openvino_error(runners["dense", "OpenVINO"], dense, "dense")
    for top_k in args.top_ks:
        moe = moefx.convert(dense, num_experts=args.experts, top_k=top_k, method="split", calibration=calibration,
                            progress=False)
        name = f"carved_{top_k}of{args.experts}"
        sparse = export(moe, name, "standard")
        runners[top_k, "ORT contrib"] = ort_runner(export(moe, name, "onnxruntime", approximate=True), args.threads)
        runners[top_k, "ORT sparse"] = ort_runner(sparse, args.threads)
        if openvino is not None:
            runners[top_k, "OpenVINO sparse"] = openvino_runner(sparse, args.threads)
            openvino_error(runners[top_k, "OpenVINO sparse"], moe, f"{name} standard")
        runners[top_k, "eager"] = eager_runner(moe)
    dense_of = {"ORT contrib": "ORT", "ORT sparse": "ORT", "OpenVINO sparse": "OpenVINO", "eager": "eager"}

    load = os.getloadavg()
    print(f"# bench_onnx  {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  "
          f"{platform.machine()} {os.cpu_count()} cores, {args.threads} thread(s)  torch {torch.__version__}  "
          f"onnxruntime {ort.__version__}  openvino {openvino.__version__ if openvino else 'not installed'}")
    print(f"# load average before timing: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {args.rounds} interleaved rounds")
    print("| model | batch x seq | runtime | dense ms | converted ms | x dense | ideal | x ideal |")
    print("|---|---|---|---|---|---|---|---|")
    for seq in args.seqs:
        for size in args.batches:
            timed = interleaved_medians(runners, batch(size, seq), args.rounds)
            for (model, runtime), seconds in timed.items():
                if model == "dense":
                    continue
                d = timed["dense", dense_of[runtime]]
                ideal = ideal_fraction(dense.config, seq, model / args.experts)
                print(f"| carved {model}/{args.experts} ({100 * model // args.experts}% active) | {size} x {seq} "
                      f"| {runtime} | {d * 1e3:.1f} | {seconds * 1e3:.1f} | {seconds / d:.2f} | {ideal:.2f} | "
                      f"{seconds / d / ideal:.2f} |", flush=True)
    load = os.getloadavg()
    print(f"# load average after timing: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print("\n".join(f"# {note}" for note in notes))


if __name__ == "__main__":
    main()
