"""The ``moefx`` command line. Each command imports what it runs only once its arguments parse, so
``--help``, ``--version`` and a mistyped flag answer without loading the conversion stack."""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import sys
import typing


# short forms of recipe options (the issue's and llm-compressor's spelling)
ALIASES = {"num_experts": ["--experts"], "num_shared": ["--shared"]}


def add_convert_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``moefx convert``'s arguments: paths, calibration, output, and one flag per ``moefx.Recipe`` field."""
    from moefx.checkpoint import LAYOUTS
    from moefx.recipe import Recipe
    from moefx.stream import DTYPES

    parser.add_argument("src", metavar="SRC", help="transformers model directory (config.json, *.safetensors, "
                        "tokenizer)")
    parser.add_argument("dst", metavar="DST", help="new directory for the MoE checkpoint (must not exist or be empty)")
    parser.add_argument("--recipe", metavar="FILE", help="recipe options as JSON or YAML ({num_experts: 8, ...}); "
                        "flags override it")
    parser.add_argument("--calibration", metavar="FILE", help="calibration text: a text file (one sample per line) or "
                        "JSONL ('text' or 'input_ids' per record); default: Python's documentation")
    parser.add_argument("--calibration-tokens", type=int, default=8192, help="calibration tokens (default 8192)")
    parser.add_argument("--sequence-length", type=int, default=512, help="tokens per calibration sequence "
                        "(default 512)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="dtype of the written weights (default: SRC's)")
    parser.add_argument("--layout", choices=LAYOUTS, default="moefx", help="'moefx' (moefx.load_pretrained) or a "
                        "transformers MoE layout (AutoModelForCausalLM.from_pretrained) (default: moefx)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    options = parser.add_argument_group("recipe options (moefx.Recipe; a flag overrides the recipe file, which "
                                        "overrides the default shown)")
    hints = typing.get_type_hints(Recipe)
    for f in dataclasses.fields(Recipe):
        flags = ["--" + f.name.replace("_", "-"), *ALIASES.get(f.name, [])]
        text = f.metadata["help"].replace("%", "%%")
        text += "" if "default" in text else f" (default: {'unset' if f.default is None else f.default})"
        kind = next((a for a in typing.get_args(hints[f.name]) if a is not type(None)), hints[f.name])  # Optional[X]
        choices = f.metadata["choices"] and (*f.metadata["choices"], *("none",) * (f.default is None))
        if kind is bool:
            options.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            options.add_argument(*flags, dest=f.name, type=kind if kind in (int, float) else str, default=None,
                                 choices=choices, help=text)
    return parser


def recipe_from_args(args: argparse.Namespace):
    """The recipe file's options overridden by the flags given; ``Recipe.measured`` (at ``--active``, default 0.5)
    when neither chooses the structure or the fitting method."""
    from moefx.recipe import Recipe, resolve

    values = read_recipe_file(args.recipe) if args.recipe else {}
    values.update({name: getattr(args, name) for name in Recipe.help() if getattr(args, name) is not None})
    if values.get("pregate") in ("none", "None"):
        values["pregate"] = None
    return resolve(Recipe.from_dict(values, source=args.recipe or "the flags", only_known=True), args.layout)


def read_recipe_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise ValueError(f"moefx convert: recipe file {path} does not exist")
    with open(path) as f:
        text = f.read()
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except Exception as error:
        raise ValueError(f"moefx convert: {path} is not valid {'YAML' if path.endswith(('.yaml', '.yml')) else 'JSON'} "
                         f"({error}); write the recipe as {{\"num_experts\": 8, \"top_k\": 2, ...}}") from None
    if not isinstance(values, dict):
        raise ValueError(f"moefx convert: {path} holds a {type(values).__name__}; a recipe file is a mapping of "
                         "option names to values")
    return values.get("recipe", values) if isinstance(values.get("recipe"), dict) else values


def run_convert(args: argparse.Namespace) -> int:
    from moefx.stream import convert_pretrained

    try:
        recipe = recipe_from_args(args)
        result = convert_pretrained(args.src, args.dst, recipe, calibration=args.calibration,
                                    calibration_tokens=args.calibration_tokens, sequence_length=args.sequence_length,
                                    dtype=args.dtype, layout=args.layout, progress=not args.quiet)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(result)
    return 0


def parse(parser: argparse.ArgumentParser, commands, argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, an unknown flag answered with the nearest one of its command."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        command = commands.choices.get(getattr(args, "command", None), parser)
        flags = [flag for action in command._actions for flag in action.option_strings]
        near = difflib.get_close_matches(unknown[0].split("=")[0], flags, n=1)
        command.error(f"unrecognized arguments: {' '.join(unknown)}" + (f"; did you mean {near[0]}?" if near else ""))
    return args


def main(argv: list[str] | None = None) -> int:
    from moefx import __version__

    parser = argparse.ArgumentParser(prog="moefx", description="Run dense PyTorch models as Mixture-of-Experts")
    parser.add_argument("--version", action="version", version=f"moefx {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="convert all-MiniLM-L6-v2 with each method and compare embeddings")
    demo.add_argument("--sentences", type=int, default=300, help="held-out sentences to compare on")
    demo.add_argument("--calibration", type=int, default=128, help="calibration sentences")
    demo.add_argument("--onnx", default="minilm_moe.onnx", help="where the demo writes its exported model")
    evaluate = commands.add_parser("eval", help="compare a checkpoint moefx convert wrote with its source "
                                   "(moefx eval SRC DST --data FILE); without SRC DST: convert all-MiniLM-L6-v2 with a "
                                   "distilled router and closed-form "
                                   "refit, and report per-layer quality against the dense model")
    evaluate.add_argument("src", metavar="SRC", nargs="?", help="the dense transformers model directory")
    evaluate.add_argument("dst", metavar="DST", nargs="?", help="the MoE checkpoint moefx convert wrote from it")
    evaluate.add_argument("--data", metavar="FILE", help="held-out text (one sample per line) or JSONL ('text'); "
                          "default: Python-documentation sentences the default calibration does not use")
    evaluate.add_argument("--tokens", type=int, default=8192, help="held-out tokens (default 8192)")
    evaluate.add_argument("--sequence-length", type=int, default=512, help="tokens per sequence (default 512)")
    evaluate.add_argument("--in-memory", action="store_true", help="load both models whole (adds the per-layer "
                          "report of moefx.evaluate); default: block by block")
    evaluate.add_argument("--experts", type=int, default=8)
    evaluate.add_argument("--top-k", type=int, default=2)
    evaluate.add_argument("--calibration", type=int, default=256, help="calibration sentences")
    evaluate.add_argument("--sentences", type=int, default=200, help="held-out sentences to evaluate on")
    evaluate.add_argument("--plot", default=None, help="write a PNG of expert load per layer here")
    from moefx.onnx.cli import add_export_arguments
    add_export_arguments(commands.add_parser("export", help="convert a model and write it as ONNX, checked in "
                                             "onnxruntime"))
    add_convert_arguments(commands.add_parser(
        "convert", help="convert a transformers checkpoint directory layer by layer and write the MoE checkpoint",
        description="Convert the transformers model in SRC into an MoE model written to DST, one block at a time "
                    "(memory: one block plus the calibration activations). Recipe options come from --recipe FILE "
                    "(JSON or YAML), then from the flags."))
    args = parse(parser, commands, argv)
    if args.command == "convert":
        return run_convert(args)
    if args.command == "demo":
        from moefx.demo import format_rows, run_demo

        rows, parity = run_demo(num_eval=args.sentences, num_calibration=args.calibration, onnx_path=args.onnx)
        print("all-MiniLM-L6-v2 (real weights), sentence-embedding cosine to the dense model on "
              f"{args.sentences} sentences of Python's documentation:")
        print(format_rows(rows))
        print(f"exported the split 8/top-2 model to {args.onnx}; {parity}")
    elif args.command == "eval" and args.src:
        if not args.dst:
            parser.error("moefx eval SRC DST: pass both the dense and the converted checkpoint directories")
        from moefx.evaluation.checkpoint import evaluate_pretrained

        try:
            print(evaluate_pretrained(args.src, args.dst, args.data, tokens=args.tokens,
                                      sequence_length=args.sequence_length, in_memory=args.in_memory,
                                      plot=args.plot))
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
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
