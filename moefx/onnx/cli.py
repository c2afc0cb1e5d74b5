"""``moefx export``: convert a transformers model into an MoE and write it as ONNX, checked in onnxruntime.

    moefx export --model minilm --experts 8 --top-k 2 --method split --out minilm_moe.onnx
    moefx export --model path/to/mixtral --no-convert --target onnxruntime --out mixtral.onnx
"""
from __future__ import annotations

import argparse

TARGET_CHOICES = ("auto", "onnxruntime", "standard", "standard-dense")
METHOD_CHOICES = ("split", "coactivation", "upcycle")


def add_export_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", default="minilm",
                        help="'minilm' (the bundled all-MiniLM-L6-v2) or a local transformers model directory")
    parser.add_argument("--out", default="model.onnx", help="ONNX file to write")
    parser.add_argument("--target", choices=TARGET_CHOICES, default="auto",
                        help="com.microsoft.MoE (onnxruntime), sparse standard ONNX ops (standard), every expert "
                             "densely in standard ops (standard-dense), or per layer what fits (auto)")
    parser.add_argument("--approximate", action="store_true",
                        help="let com.microsoft.MoE's tanh-GELU stand in for exact GELU (the error is reported)")
    parser.add_argument("--no-convert", action="store_true",
                        help="export the model as it is (already an MoE, e.g. Mixtral or Qwen3-MoE)")
    parser.add_argument("--experts", type=int, default=8, help="experts per converted FFN")
    parser.add_argument("--top-k", type=int, default=2, help="routed experts active per token")
    parser.add_argument("--method", choices=METHOD_CHOICES, default="split", help="how moefx.convert builds experts")
    parser.add_argument("--shared", type=int, default=0, help="shared (always active) experts per layer")
    parser.add_argument("--calibration", type=int, default=64, help="calibration sentences for convert")
    return parser


def export_from_cli(args: argparse.Namespace) -> str:
    """Load, convert (unless --no-convert), export and check; returns the printable report."""
    import moefx
    from moefx.data import python_doc_sentences
    from moefx.onnx.export import export_onnx, max_abs_error

    model, tokenizer = _load(args.model)
    sentences = python_doc_sentences(args.calibration + 5)

    def batch(texts):
        return dict(tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt"))

    if not args.no_convert:
        calibration = [batch(sentences[i:i + 16]) for i in range(0, args.calibration, 16)]
        model = moefx.convert(model, num_experts=args.experts, top_k=args.top_k, method=args.method,
                              num_shared=args.shared, calibration=calibration)
    report = export_onnx(model, batch(sentences[-5:-3]), args.out, target=args.target, approximate=args.approximate)
    other = max_abs_error(args.out, model, (), batch(sentences[-3:]))
    return f"{report}\n  on another batch ({len(sentences[-3:])} sentences): max abs error {other:.2e}"


def _load(name: str):
    if name == "minilm":
        from moefx.demo import load_minilm

        return load_minilm()
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(name)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # a KV cache in the outputs is not an ONNX tensor
    return model.eval(), AutoTokenizer.from_pretrained(name)
