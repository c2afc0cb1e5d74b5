"""The demo's ONNX parity report counts tokens, not a bare maximum: every real token either matches PyTorch or
sits on a near-tie routing choice; the demo's rows state compute relative to the dense FFN."""
import torch

import moefx
from moefx.demo import onnx_parity
from moefx.onnx import export_onnx


def _bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64)).eval()


def _batch(rows, length, pad=0):
    ids = torch.randint(1, 64, (rows, length))
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[0, length - pad:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_onnx_parity_counts_real_tokens_and_every_mismatch_is_a_near_tie(tmp_path):
    model = _bert()
    data = [_batch(2, 8), _batch(3, 6, pad=2)]
    moe = moefx.convert(model, 4, 2, data, progress=False)
    path = str(tmp_path / "moe.onnx")
    export_onnx(moe, data[0], path)
    parity = onnx_parity(path, moe, data)
    assert parity.tokens == 2 * 8 + 3 * 6 - 2
    assert parity.matched + parity.near_ties == parity.tokens, str(parity)
    assert str(parity).startswith(f"onnxruntime matches PyTorch on {parity.matched} of {parity.tokens} tokens")


def test_upcycled_experts_cost_whole_ffns_relative_to_dense():
    model = _bert()
    data = [_batch(2, 8)]
    upcycled = moefx.summary(moefx.convert(model, 8, 2, data, method="upcycle", progress=False))
    carved = moefx.summary(moefx.convert(model, 8, 2, data, progress=False))
    assert upcycled.compute_vs_dense == 2.0 and upcycled.active_fraction == 0.25
    assert carved.compute_vs_dense == carved.active_fraction == 0.25
