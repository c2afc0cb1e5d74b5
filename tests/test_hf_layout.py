"""save_pretrained(layout="mixtral" | "qwen2_moe"): transformers loads the checkpoint with its own MoE
classes (no moefx) and computes the converted model's logits; what those classes cannot compute is refused."""
import pytest
import torch

import moefx
from moefx.layer import MoELayer
from moefx.op import MoEAttrs

transformers = pytest.importorskip("transformers")

VOCAB = 128
SIZES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, vocab_size=VOCAB)


def dense_model(kind: str, **overrides):
    config = getattr(transformers, f"{kind}Config")(**{**SIZES, **overrides})
    return getattr(transformers, f"{kind}ForCausalLM")(config).eval()


def upcycled(dense, num_experts=4, top_k=2, **options):
    batch = {"input_ids": torch.randint(0, VOCAB, (2, 10))}
    moe = moefx.convert(dense, num_experts, top_k, [batch], method="upcycle", progress=False, **options)
    with torch.no_grad():  # as after fine-tuning: experts differ, so routing and layout decide the output
        for layer in moe.modules():
            if isinstance(layer, MoELayer):
                layer.w_in.add_(0.05 * torch.randn_like(layer.w_in))
                layer.w_out.add_(0.05 * torch.randn_like(layer.w_out))
    return moe


def moe_layer(moe, i) -> MoELayer:
    return moe.model.layers[i].mlp.moe


def assert_loads_as(moe, path, layout, class_name):
    moefx.save_pretrained(moe, str(path), layout=layout)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    assert type(loaded).__name__ == class_name
    ids = torch.randint(0, VOCAB, (3, 17))
    with torch.no_grad():
        want, got = moe(input_ids=ids).logits, loaded(input_ids=ids).logits
    assert float((got - want).norm() / want.norm()) <= 1e-5
    return loaded


@pytest.mark.parametrize("kind, top_k", [("Llama", 2), ("Llama", 4), ("Mistral", 1)])
def test_upcycled_llama_and_mistral_load_as_mixtral(tmp_path, kind, top_k):
    torch.manual_seed(0)
    moe = upcycled(dense_model(kind), top_k=top_k)
    loaded = assert_loads_as(moe, tmp_path, "mixtral", "MixtralForCausalLM")
    assert loaded.config.num_local_experts == 4 and loaded.config.num_experts_per_tok == top_k
    assert not (tmp_path / "moefx.json").exists()


def test_upcycled_qwen2_loads_as_qwen2_moe_with_tied_embeddings(tmp_path):
    torch.manual_seed(1)
    moe = upcycled(dense_model("Qwen2", tie_word_embeddings=True), top_k=1)
    loaded = assert_loads_as(moe, tmp_path, "qwen2_moe", "Qwen2MoeForCausalLM")
    assert loaded.config.norm_topk_prob and loaded.config.shared_expert_intermediate_size == 0


def test_qwen2_moe_keeps_unnormalised_gates_and_a_shared_expert(tmp_path):
    """A softmax layer without renormalisation maps to norm_topk_prob=False; a shared expert (weight 1)
    to Qwen2-MoE's sigmoid-gated one with a zero gate and a doubled down projection."""
    torch.manual_seed(2)
    dense = dense_model("Qwen2")
    batch = {"input_ids": torch.randint(0, VOCAB, (2, 10))}
    moe = moefx.convert(dense, 4, 2, [batch], method="split", num_shared=1, progress=False)
    for i in range(2):  # re-routed as a softmax router would be after training
        layer = moe_layer(moe, i)
        layer.scoring, layer.renormalize = "softmax", False
        torch.nn.init.normal_(layer.router.weight, std=0.5)
    loaded = assert_loads_as(moe, tmp_path, "qwen2_moe", "Qwen2MoeForCausalLM")
    assert not loaded.config.norm_topk_prob and loaded.config.shared_expert_intermediate_size == 32


def test_greedy_generation_matches(tmp_path):
    torch.manual_seed(3)
    moe = upcycled(dense_model("Llama"))
    moefx.save_pretrained(moe, str(tmp_path), layout="mixtral")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    prompt = torch.randint(0, VOCAB, (1, 6))
    options = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(loaded.generate(prompt, **options), moe.generate(prompt, **options))


def refusal(moe, layout, tmp_path):
    with pytest.raises(ValueError) as error:
        moefx.save_pretrained(moe, str(tmp_path), layout=layout)
    assert not (tmp_path / "config.json").exists()
    return str(error.value)


@pytest.mark.parametrize("layout", ["mixtral", "qwen2_moe"])
def test_carved_unit_gates_are_refused(tmp_path, layout):
    torch.manual_seed(4)
    dense = dense_model("Llama" if layout == "mixtral" else "Qwen2")
    moe = moefx.convert(dense, 4, 2, [{"input_ids": torch.randint(0, VOCAB, (2, 10))}], method="split",
                        progress=False)
    message = refusal(moe, layout, tmp_path)
    assert "model.layers.0.mlp.moe" in message and "scoring='unit'" in message and "method='upcycle'" in message


def test_biases_dynamic_k_and_activation_are_refused(tmp_path):
    torch.manual_seed(5)
    assert "has b_in, b_out" in refusal(upcycled(dense_model("Llama", mlp_bias=True)), "mixtral", tmp_path)
    message = refusal(upcycled(dense_model("Llama"), top_p=0.5), "mixtral", tmp_path)
    assert "top_p=0.5" in message and "top_p=1.0" in message
    message = refusal(upcycled(dense_model("Llama", hidden_act="gelu")), "mixtral", tmp_path)
    assert "activation='gelu'" in message and "layout='moefx'" in message
    assert "self_attn.k_proj.bias has no place" in refusal(upcycled(dense_model("Llama", attention_bias=True)),
                                                           "mixtral", tmp_path)


def test_layers_the_target_cannot_express_are_refused(tmp_path):
    torch.manual_seed(6)
    dense = dense_model("Llama")
    moe = upcycled(dense)
    layer = moe_layer(moe, 1)
    zero = MoELayer(64, 128, 4, MoEAttrs(2, "silu", True, scoring="softmax", renormalize=True, num_zero=1))
    moe.model.layers[1].mlp.moe = zero
    assert "model.layers.1.mlp.moe has zero-computation experts" in refusal(moe, "mixtral", tmp_path)
    moe.model.layers[1].mlp.moe = upcycled(dense, num_experts=2, top_k=1).model.layers[1].mlp.moe
    message = refusal(moe, "mixtral", tmp_path)
    assert "model.layers.1.mlp.moe has num_experts=2" in message and "num_experts=4" in message
    moe.model.layers[1].mlp.moe = layer
    layer.renormalize = False
    assert "renormalize=False" in refusal(moe, "mixtral", tmp_path) and "layout='qwen2_moe'" in refusal(
        moe, "mixtral", tmp_path)
    moe.model.layers[1].mlp = dense.model.layers[1].mlp
    assert "model.layers.1.mlp was not converted" in refusal(moe, "mixtral", tmp_path)


def test_unsupported_model_classes_are_refused(tmp_path):
    torch.manual_seed(7)
    qwen = upcycled(dense_model("Qwen2"))
    assert "this model is a Qwen2ForCausalLM: use layout='qwen2_moe'" in refusal(qwen, "mixtral", tmp_path)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=VOCAB))
    moe = moefx.convert(gpt2.eval(), 4, 2, [{"input_ids": torch.randint(0, VOCAB, (2, 8))}], method="upcycle",
                        progress=False)
    assert "GPT2LMHeadModel: save with the default layout='moefx'" in refusal(moe, "qwen2_moe", tmp_path)
    with pytest.raises(ValueError, match="layout='llama' is not one of"):
        moefx.save_pretrained(qwen, str(tmp_path), layout="llama")


def test_moefx_loader_points_transformers_checkpoints_to_transformers(tmp_path):
    torch.manual_seed(8)
    moefx.save_pretrained(upcycled(dense_model("Llama")), str(tmp_path), layout="mixtral")
    with pytest.raises(ValueError, match="AutoModelForCausalLM.from_pretrained"):
        moefx.load_pretrained(str(tmp_path))
