"""save_pretrained(layout="mixtral" | "qwen2_moe" | "qwen3_moe"): transformers loads the checkpoint with its own
MoE classes (no moefx) and computes the converted model's logits, upcycled and router-weighted carved models
alike; what those classes (or llama.cpp, reading the same files) cannot compute is refused, and a failed save
leaves an existing checkpoint as it was."""
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


def carved(dense, top_k=2, **options):
    """Router-weighted carving as the native layouts need it: softmax gates, fitted router, refit, no biases."""
    batches = [{"input_ids": torch.randint(0, VOCAB, (4, 16))} for _ in range(2)]
    recipe = dict(method="split", gating="softmax", renormalize=True, router="least_squares", refit=True,
                  biases=False)
    return moefx.convert(dense, 4, top_k, batches, progress=False, **{**recipe, **options})


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


def test_carved_router_weighted_llama_loads_as_mixtral_and_generates_alike(tmp_path):
    torch.manual_seed(1)
    moe = carved(dense_model("Llama"))
    layer = moe_layer(moe, 0)
    assert layer.scoring == "softmax" and layer.bias is None and layer.b_out is None and layer.router.bias is None
    loaded = assert_loads_as(moe, tmp_path, "mixtral", "MixtralForCausalLM")
    prompt = torch.randint(0, VOCAB, (1, 5))
    options = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(loaded.generate(prompt, **options), moe.generate(prompt, **options))


def test_carved_llama_with_a_shared_expert_loads_as_qwen2_moe(tmp_path):
    """Unnormalised softmax gates map to norm_topk_prob=False (what llama.cpp's qwen2moe computes); the shared
    expert (weight 1) to Qwen2-MoE's sigmoid-gated one with a 1e-20 gate vector (exactly 1/2, also in llama.cpp,
    where a zero vector gives NaN) and a doubled down projection."""
    torch.manual_seed(2)
    moe = carved(dense_model("Llama"), num_shared=1, renormalize=False)
    loaded = assert_loads_as(moe, tmp_path, "qwen2_moe", "Qwen2MoeForCausalLM")
    assert not loaded.config.norm_topk_prob and loaded.config.shared_expert_intermediate_size == 32
    assert not loaded.config.qkv_bias
    gate = loaded.model.layers[0].mlp.shared_expert_gate.weight
    assert torch.all(gate == 1e-20)
    down = loaded.model.layers[0].mlp.shared_expert.down_proj.weight
    assert torch.equal(down, 2 * moe_layer(moe, 0).shared_out.weight)


def test_qwen2_without_shared_expert_gets_an_inert_one_and_no_zero_width_tensor(tmp_path):
    from safetensors.torch import load_file

    torch.manual_seed(3)
    moe = carved(dense_model("Qwen2", tie_word_embeddings=True), renormalize=False)
    loaded = assert_loads_as(moe, tmp_path, "qwen2_moe", "Qwen2MoeForCausalLM")
    assert loaded.config.shared_expert_intermediate_size == 1 and loaded.config.qkv_bias
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert all(t.numel() > 0 for t in tensors.values())
    assert torch.all(tensors["model.layers.0.mlp.shared_expert.down_proj.weight"] == 0)


def test_mistral_sliding_window_carries_over_to_qwen2_moe(tmp_path):
    torch.manual_seed(4)
    moe = carved(dense_model("Mistral", sliding_window=4), num_shared=1, renormalize=False)
    loaded = assert_loads_as(moe, tmp_path, "qwen2_moe", "Qwen2MoeForCausalLM")  # 17 tokens: past the window
    assert loaded.config.layer_types == ["sliding_attention"] * 2 and loaded.config.sliding_window == 4


def test_carved_qwen3_loads_as_qwen3_moe(tmp_path):
    torch.manual_seed(5)
    moe = carved(dense_model("Qwen3", head_dim=16))
    loaded = assert_loads_as(moe, tmp_path, "qwen3_moe", "Qwen3MoeForCausalLM")
    assert loaded.config.norm_topk_prob and loaded.config.num_experts == 4


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
def test_carved_unit_gates_are_refused_with_the_options_that_work(tmp_path, layout):
    torch.manual_seed(4)
    dense = dense_model("Llama" if layout == "mixtral" else "Qwen2")
    moe = moefx.convert(dense, 4, 2, [{"input_ids": torch.randint(0, VOCAB, (2, 10))}], method="split",
                        progress=False)
    message = refusal(moe, layout, tmp_path)
    assert "model.layers.0.mlp.moe" in message and "scoring='unit'" in message and "gating='softmax'" in message
    assert ("renormalize=True" if layout == "mixtral" else "renormalize=False") in message


def test_llama_cpp_disagreements_are_refused_naming_the_engine(tmp_path):
    """llama.cpp's qwen2moe never renormalises the top-k gates and its qwen3moe always does: a checkpoint whose
    norm_topk_prob says otherwise would run there as another model."""
    torch.manual_seed(9)
    message = refusal(upcycled(dense_model("Qwen2")), "qwen2_moe", tmp_path)
    assert "llama.cpp's qwen2moe" in message and "method='coactivation', gating='softmax', renormalize=False" in message
    message = refusal(carved(dense_model("Qwen3", head_dim=16), renormalize=False), "qwen3_moe", tmp_path)
    assert "llama.cpp's qwen3moe" in message and "convert with renormalize=True" in message


def test_fitted_biases_and_shared_experts_are_refused_with_a_working_alternative(tmp_path):
    torch.manual_seed(10)
    message = refusal(carved(dense_model("Llama"), biases=True), "mixtral", tmp_path)
    assert "has b_out, bias, router.bias" in message and "convert with biases=False" in message
    shared = carved(dense_model("Llama"), num_shared=1, renormalize=False)
    assert "has a shared expert" in refusal(shared, "mixtral", tmp_path) and "save with layout='qwen2_moe'" in \
        refusal(shared, "mixtral", tmp_path)
    shared = carved(dense_model("Llama"), num_shared=1)  # renormalised: qwen2_moe refuses it too, so no layout
    message = refusal(shared, "mixtral", tmp_path)
    assert "convert with num_shared=0" in message and "layout='qwen2_moe'" not in message


def test_biases_dynamic_k_and_activation_are_refused(tmp_path):
    torch.manual_seed(5)
    with_biases = dense_model("Llama", mlp_bias=True)
    with torch.no_grad():  # zero biases are no biases: the layouts write those layers
        for name, bias in with_biases.named_parameters():
            if name.endswith("mlp.up_proj.bias"):
                bias.normal_()
    message = refusal(upcycled(with_biases), "mixtral", tmp_path)
    assert "has b_in (the dense FFN's biases)" in message and "layout='moefx'" in message
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
    message = refusal(moe, "mixtral", tmp_path)  # qwen2_moe refuses the other, renormalised layer: no layout
    assert "renormalize=False" in message and "convert with renormalize=True" in message
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


def test_a_failed_save_leaves_the_existing_checkpoint_and_other_files_alone(tmp_path, monkeypatch):
    import moefx.checkpoint as checkpoint

    torch.manual_seed(11)
    path = tmp_path / "ckpt"
    moefx.save_pretrained(upcycled(dense_model("Llama")), str(path), layout="mixtral")
    (path / "tokenizer.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    other = upcycled(dense_model("Llama"))

    def broken(*args):
        raise ValueError("greedy decoding differs")

    monkeypatch.setattr(checkpoint, "_check_generation", broken)  # fails after the files are written and reloaded
    with pytest.raises(ValueError, match="greedy decoding differs"):
        moefx.save_pretrained(other, str(path), layout="mixtral")
    unit = moefx.convert(dense_model("Llama"), 4, 2, [{"input_ids": torch.randint(0, VOCAB, (2, 8))}],
                         method="split", progress=False)
    with pytest.raises(ValueError, match="scoring='unit'"):  # fails before writing
        moefx.save_pretrained(unit, str(path), layout="mixtral")
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging directory left behind
    monkeypatch.undo()
    moefx.save_pretrained(other, str(path), layout="moefx")  # a moefx save replaces the transformers one
    assert (path / "moefx.json").exists() and (path / "tokenizer.json").exists()
    assert not (path / "generation_config.json").exists()
    assert moefx.load_pretrained(str(path)) is not None


def test_saved_carved_checkpoint_gets_moefx_kernels_back_under_torch_compile(tmp_path):
    """The checkpoint loaded in transformers is what the moefx compile backend recognises: one moefx::moe per
    layer, the shared expert beside it, the same logits."""
    from tests.test_moe_blocks import compile_with_passes, moe_calls

    torch.manual_seed(12)
    moe = carved(dense_model("Llama"), num_shared=1, renormalize=False)
    loaded = assert_loads_as(moe, tmp_path, "qwen2_moe", "Qwen2MoeForCausalLM")
    compiled, graphs = compile_with_passes(loaded)
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        got, want = compiled(input_ids=ids).logits, moe(input_ids=ids).logits
    assert len(graphs) == 1 and moe_calls(graphs[0]) == 2
    assert float((got - want).norm() / want.norm()) <= 1e-5


def test_bfloat16_checkpoints_read_back_bit_exact_and_float16_qwen2_moe_is_refused(tmp_path):
    """Below fp32 routing may legitimately differ between engines, so the save compares the files it wrote with
    what the target class reads back; Qwen2-MoE's 1e-20 shared gate does not exist in float16."""
    from safetensors.torch import load_file

    torch.manual_seed(13)
    moe = carved(dense_model("Llama"), num_shared=1, renormalize=False).to(torch.bfloat16)
    moefx.save_pretrained(moe, str(tmp_path / "bf16"), layout="qwen2_moe")
    gate = load_file(str(tmp_path / "bf16" / "model.safetensors"))["model.layers.1.mlp.shared_expert_gate.weight"]
    assert gate.dtype == torch.bfloat16 and torch.all(gate > 0)
    message = refusal(moe.to(torch.float16), "qwen2_moe", tmp_path / "fp16")
    assert "float16 rounds to 0" in message and "bfloat16 or float32" in message


def test_sliding_windows_on_some_layers_only_go_to_the_layout_that_has_them(tmp_path):
    torch.manual_seed(14)
    dense = dense_model("Qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1)  # layer 1 slides
    moe = carved(dense)
    message = refusal(moe, "mixtral", tmp_path)
    assert "this model is a Qwen2ForCausalLM: use layout='qwen2_moe'" in message
    qwen3 = dense_model("Qwen3", head_dim=16, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    message = refusal(carved(qwen3), "qwen3_moe", tmp_path)
    assert "sliding windows [None, 4] per layer" in message and "layout='moefx'" in message
    moe = carved(dense, renormalize=False)
    loaded = assert_loads_as(moe, tmp_path, "qwen2_moe", "Qwen2MoeForCausalLM")
    assert loaded.config.layer_types == ["full_attention", "sliding_attention"]
