"""The conversion zoo as a table: every tiny architecture of ``tests/test_zoo.py`` converted with all
experts active (num_experts=4, top_k=4) on one unpadded calibration batch, then checked on a padded
batch of another shape and, for causal LMs and encoder-decoders, with greedy ``generate`` (KV cache).

    python bench/bench_zoo.py [name ...]

Prints one markdown row per model: FFNs found / true count, how the FFNs were installed (module
swap, span swap, traced piece), relative error against the dense model, generate equality, what
the report lists as not converted, and seconds.
"""
from __future__ import annotations

import logging
import os
import platform
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tests.test_zoo import ZOO, check  # noqa: E402


FORMS = {  # the FFN form each zoo model exercises
    "llama": "SwiGLU module", "mistral": "SwiGLU module", "qwen2": "SwiGLU module", "qwen3": "SwiGLU module",
    "gemma": "GeGLU (tanh) module", "phi3": "fused gate/up + chunk", "phi": "GELU module, parallel block",
    "nemotron": "relu² module", "stablelm": "SwiGLU module", "starcoder2": "GELU-tanh module, biases",
    "olmo": "SwiGLU module", "granite": "SwiGLU module", "gpt2": "Conv1D + GELU-tanh module",
    "gpt_neox": "GELU module", "gptj": "GELU-tanh module, parallel block", "opt": "fc1/fc2 inline in the layer",
    "bloom": "GELU module (bloom_gelu)", "falcon": "GELU module, in-place residual",
    "bert": "intermediate/output modules", "roberta": "intermediate/output modules",
    "electra": "intermediate/output modules", "albert": "ffn/ffn_output inline, shared layer",
    "distilbert": "lin1/lin2 module", "deberta_v2": "intermediate/output modules",
    "modernbert": "fused Wi + chunk (GeGLU)", "clip_text": "quick_gelu module", "vit": "intermediate/output modules",
    "convnext": "pointwise Linears + layer-scale parameter", "t5": "DenseReluDense (reads wo.weight.dtype)",
    "bart": "fc1/fc2 inline (encoder and decoder)", "whisper": "fc1/fc2 inline (encoder and decoder)",
    "dit": "diffusers FeedForward (GELU-tanh)",
    "flux": "FeedForward; single-block MLP into proj_out with attention (reported)",
}


def main(names: list[str]) -> None:
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    import transformers
    import diffusers
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, diffusers {diffusers.__version__}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| model | FFN form | found / true | installed as | rel. error (padded, other shape) | generate | "
          "not converted | s |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        start = time.perf_counter()
        try:
            facts = check(name)
        except Exception as error:  # a row per model, whatever happens
            print(f"| {name} | {FORMS.get(name, '')} | error | | {type(error).__name__}: {str(error)[:120]} | | | "
                  f"{time.perf_counter() - start:.1f} |")
            continue
        generate = {True: "equal", False: "DIFFERS"}.get(facts.get("generate_equal"), "–")
        print(f"| {name} | {FORMS.get(name, '')} | {facts['found']} / {facts['true']} | {facts['installed']} | "
              f"{facts['rel_err']:.1e} | {generate} | {len(facts['skipped']) or '–'} | "
              f"{time.perf_counter() - start:.1f} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or list(ZOO))
