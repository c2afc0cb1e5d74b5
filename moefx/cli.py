"""The ``moefx`` command line."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moefx", description="Run dense PyTorch models as Mixture-of-Experts")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="convert all-MiniLM-L6-v2 with each method and compare embeddings")
    demo.add_argument("--sentences", type=int, default=300, help="held-out sentences to compare on")
    demo.add_argument("--calibration", type=int, default=128, help="calibration sentences")
    demo.add_argument("--onnx", default="minilm_moe.onnx", help="where the demo writes its exported model")
    evaluate = commands.add_parser("eval", help="convert all-MiniLM-L6-v2 with a distilled router and closed-form "
                                   "refit, and report per-layer quality against the dense model")
    evaluate.add_argument("--experts", type=int, default=8)
    evaluate.add_argument("--top-k", type=int, default=2)
    evaluate.add_argument("--calibration", type=int, default=256, help="calibration sentences")
    evaluate.add_argument("--sentences", type=int, default=200, help="held-out sentences to evaluate on")
    evaluate.add_argument("--plot", default=None, help="write a PNG of expert load per layer here")
    from moefx.onnx.cli import add_export_arguments
    add_export_arguments(commands.add_parser("export", help="convert a model and write it as ONNX, checked in "
                                             "onnxruntime"))
    args = parser.parse_args(argv)
    if args.command == "demo":
        from moefx.demo import format_rows, run_demo

        rows, onnx_error = run_demo(num_eval=args.sentences, num_calibration=args.calibration, onnx_path=args.onnx)
        print("all-MiniLM-L6-v2 (real weights), sentence-embedding cosine to the dense model on "
              f"{args.sentences} sentences of Python's documentation:")
        print(format_rows(rows))
        print(f"exported the split 8/top-2 model to {args.onnx}; onnxruntime vs PyTorch max abs error "
              f"{onnx_error:.2e}")
    elif args.command == "eval":
        import moefx
        from moefx.data import python_doc_sentences
        from moefx.demo import load_minilm, tokenize

        model, tokenizer = load_minilm()
        calibration = tokenize(tokenizer, python_doc_sentences(args.calibration), 32)
        held_out = tokenize(tokenizer, python_doc_sentences(args.sentences, offset=args.calibration), 50)
        moe = moefx.convert(model, args.experts, args.top_k, calibration, method="coactivation", router="distilled",
                            refit=True)
        print(moefx.evaluate(model, moe, held_out, plot=args.plot))
    elif args.command == "export":
        from moefx.onnx.cli import export_from_cli
        print(export_from_cli(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
