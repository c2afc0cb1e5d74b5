"""The conversion zoo: tiny random-weight transformers/diffusers models of different FFN forms.

For each: the FFNs found are the true count, the converted model is exact (all experts active)
on a batch of another shape than the calibration batch, with padding where the model takes a
mask, and causal LMs and encoder-decoders generate the same greedy tokens with their KV cache.
Calibration is one unpadded batch, the way a new user calls it. ``bench/zoo.py`` prints the same
checks as a table (bench/RESULTS.md).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import moefx
from moefx.convert.rewrite import MoEFFN
from moefx.layer import MoELayer
from tests.conftest import main_output, relative_error

VOCAB = 64


@dataclass
class Entry:
    build: Callable[[], torch.nn.Module]
    ffns: int                 # how many dense FFNs the model holds
    kind: str = "encoder"     # "causal" | "seq2seq" | "encoder" | "vision" | "audio" | "diffusers"
    inputs: Callable = None   # (generator, batch, length, padded) -> model input; default: token ids


def _tokens(g, batch, length, padded, mask=True, **extra):
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    out = {"input_ids": ids, **extra}
    if mask:
        attention = torch.ones(batch, length, dtype=torch.long)
        if padded:
            attention[0, :length // 3] = 0  # left padding of the first row
        out["attention_mask"] = attention
    return out


def _seq2seq(g, batch, length, padded):
    return {**_tokens(g, batch, length, padded), "decoder_input_ids": torch.randint(3, VOCAB, (batch, 3), generator=g)}


def _pixels(size=32):
    return lambda g, batch, length, padded: {"pixel_values": torch.randn(batch, 3, size, size, generator=g)}


def _hf(config_name, model_name, **config):
    def build():
        import transformers
        return getattr(transformers, model_name)(getattr(transformers, config_name)(**config))
    return build


DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=VOCAB,
               max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
GQA = dict(DECODER, num_key_value_heads=1)
ENCODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=VOCAB,
               max_position_embeddings=64, pad_token_id=0)
SEQ2SEQ = dict(d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_layers=1, decoder_layers=1,
               encoder_attention_heads=2, decoder_attention_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
               pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, forced_eos_token_id=None)


def _dit():
    from diffusers import DiTTransformer2DModel
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, num_layers=2,
                                 sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=1)


def _dit_inputs(g, batch, length, padded):
    return {"hidden_states": torch.randn(batch, 4, 8, 8, generator=g),
            "timestep": torch.randint(0, 1000, (batch,), generator=g),
            "class_labels": torch.randint(0, 10, (batch,), generator=g)}


def _flux():
    from diffusers import FluxTransformer2DModel
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16,
                                  axes_dims_rope=[2, 2, 4])


def _flux_inputs(g, batch, length, padded):
    return {"hidden_states": torch.randn(batch, length, 4, generator=g),
            "encoder_hidden_states": torch.randn(batch, 3, 16, generator=g),
            "pooled_projections": torch.randn(batch, 16, generator=g), "timestep": torch.rand(batch, generator=g),
            "img_ids": torch.zeros(length, 3), "txt_ids": torch.zeros(3, 3)}


def _whisper_inputs(g, batch, length, padded):
    return {"input_features": torch.randn(batch, 16, 32, generator=g),
            "decoder_input_ids": torch.randint(3, VOCAB, (batch, 3), generator=g)}


ZOO = {
    "llama": Entry(_hf("LlamaConfig", "LlamaForCausalLM", **GQA), 2, "causal"),
    "mistral": Entry(_hf("MistralConfig", "MistralForCausalLM", **GQA), 2, "causal"),
    "qwen2": Entry(_hf("Qwen2Config", "Qwen2ForCausalLM", **GQA), 2, "causal"),
    "qwen3": Entry(_hf("Qwen3Config", "Qwen3ForCausalLM", **GQA, head_dim=16), 2, "causal"),
    "gemma": Entry(_hf("GemmaConfig", "GemmaForCausalLM", **GQA, head_dim=16), 2, "causal"),
    "gemma2": Entry(_hf("Gemma2Config", "Gemma2ForCausalLM", **GQA, head_dim=16), 2, "causal"),     # soft-capping
    "gemma3": Entry(_hf("Gemma3TextConfig", "Gemma3ForCausalLM", **GQA, head_dim=16), 2, "causal"),
    "phi3": Entry(_hf("Phi3Config", "Phi3ForCausalLM", **GQA), 2, "causal"),            # fused gate/up + chunk
    "phi": Entry(_hf("PhiConfig", "PhiForCausalLM", **DECODER), 2, "causal"),            # parallel attention/MLP
    "cohere": Entry(_hf("CohereConfig", "CohereForCausalLM", **GQA, logit_scale=0.5), 2, "causal"),  # scaled logits
    "nemotron": Entry(_hf("NemotronConfig", "NemotronForCausalLM", **GQA, head_dim=16), 2, "causal"),  # relu^2
    "stablelm": Entry(_hf("StableLmConfig", "StableLmForCausalLM", **GQA), 2, "causal"),
    "starcoder2": Entry(_hf("Starcoder2Config", "Starcoder2ForCausalLM", **GQA), 2, "causal"),
    "olmo": Entry(_hf("OlmoConfig", "OlmoForCausalLM", **GQA), 2, "causal"),
    "granite": Entry(_hf("GraniteConfig", "GraniteForCausalLM", **GQA), 2, "causal"),
    "gpt2": Entry(_hf("GPT2Config", "GPT2LMHeadModel", n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB,
                      n_positions=64, bos_token_id=1, eos_token_id=2), 2, "causal"),
    "gpt_neox": Entry(_hf("GPTNeoXConfig", "GPTNeoXForCausalLM", **DECODER), 2, "causal"),
    "gptj": Entry(_hf("GPTJConfig", "GPTJForCausalLM", n_layer=2, n_embd=32, n_head=2, n_inner=64, rotary_dim=8,
                      vocab_size=VOCAB, n_positions=64, bos_token_id=1, eos_token_id=2), 2, "causal"),
    "opt": Entry(_hf("OPTConfig", "OPTForCausalLM", hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                     num_attention_heads=2, vocab_size=VOCAB, word_embed_proj_dim=32, max_position_embeddings=64,
                     pad_token_id=0, bos_token_id=1, eos_token_id=2), 2, "causal"),  # fc1/fc2 inline in the layer
    "bloom": Entry(_hf("BloomConfig", "BloomForCausalLM", hidden_size=32, n_layer=2, n_head=2, vocab_size=VOCAB,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2), 2, "causal"),
    "falcon": Entry(_hf("FalconConfig", "FalconForCausalLM", hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2),
                    2, "causal"),                                      # in-place residual after the MLP
    "bert": Entry(_hf("BertConfig", "BertModel", **ENCODER), 2),        # FFN across intermediate/output
    "roberta": Entry(_hf("RobertaConfig", "RobertaModel", **ENCODER), 2),
    "electra": Entry(_hf("ElectraConfig", "ElectraModel", **ENCODER, embedding_size=32), 2),
    "albert": Entry(_hf("AlbertConfig", "AlbertModel", **ENCODER, embedding_size=16), 1),  # one shared layer
    "distilbert": Entry(_hf("DistilBertConfig", "DistilBertModel", dim=32, hidden_dim=64, n_layers=2, n_heads=2,
                            vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0), 2),
    "deberta_v2": Entry(_hf("DebertaV2Config", "DebertaV2Model", **ENCODER), 2),
    "modernbert": Entry(_hf("ModernBertConfig", "ModernBertModel", hidden_size=32, intermediate_size=32,
                            num_hidden_layers=2, num_attention_heads=2, vocab_size=VOCAB, pad_token_id=0,
                            max_position_embeddings=64), 2),       # fused Wi + chunk, gelu gate
    "clip_text": Entry(_hf("CLIPTextConfig", "CLIPTextModel", **ENCODER), 2),          # quick_gelu
    "vit": Entry(_hf("ViTConfig", "ViTModel", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=2, image_size=32, patch_size=8), 2, "vision", _pixels()),
    "convnext": Entry(_hf("ConvNextConfig", "ConvNextModel", hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, layer_scale_init_value=1.0,
                          image_size=32), 2, "vision", _pixels()),  # layer-scale parameter read in forward
    "t5": Entry(_hf("T5Config", "T5ForConditionalGeneration", d_model=32, d_ff=64, num_layers=1, num_heads=2,
                    d_kv=16, vocab_size=VOCAB, pad_token_id=0, eos_token_id=2, decoder_start_token_id=0),
                2, "seq2seq", _seq2seq),                            # reads self.wo.weight.dtype
    "bart": Entry(_hf("BartConfig", "BartForConditionalGeneration", **SEQ2SEQ), 2, "seq2seq", _seq2seq),
    "whisper": Entry(_hf("WhisperConfig", "WhisperForConditionalGeneration", **dict(
        SEQ2SEQ, num_mel_bins=16, max_source_positions=16, max_target_positions=64, decoder_start_token_id=1,
        suppress_tokens=None, begin_suppress_tokens=None)), 2, "audio", _whisper_inputs),
    "dit": Entry(_dit, 2, "diffusers", _dit_inputs),
    # double block FFNs and the text projection MLP; the single block's MLP feeds proj_out concatenated with
    # the attention output, which the report names
    "flux": Entry(_flux, 3, "diffusers", _flux_inputs),
}


def _inputs(name: str, entry: Entry, g, batch: int, length: int, padded: bool):
    if entry.inputs is not None:
        return entry.inputs(g, batch, length, padded)
    return _tokens(g, batch, length, padded)


def _output(model, batch):
    with torch.no_grad():
        return main_output(model(**batch)).float()


def _installed(moe) -> str:
    """How the MoE layers sit in the converted model: module swap, span swap (an FFN over modules), traced."""
    kinds = set()
    for origin in moe.moefx_report.layers:
        parent = moe.get_submodule(origin.moe.rpartition(".")[0]) if "." in origin.moe else moe
        if isinstance(parent, torch.fx.GraphModule):
            kinds.add("traced piece")
        elif isinstance(parent, MoEFFN):
            kinds.add("span swap" if origin.moe.rpartition(".")[0] in origin.dense_inputs else "module swap")
    return ", ".join(sorted(kinds))


def check(name: str) -> dict:
    """Convert zoo model ``name`` and check it; returns the facts (bench/zoo.py tabulates them)."""
    entry = ZOO[name]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = entry.build().eval()
    g = torch.Generator().manual_seed(0)
    calibration = [_inputs(name, entry, g, 2, 6, padded=False)]
    moe = moefx.convert(model, num_experts=4, top_k=4, calibration=calibration, progress=False)
    facts = {"found": sum(isinstance(m, MoELayer) for m in moe.modules()), "true": entry.ffns,
             "skipped": list(moe.moefx_report.skipped), "installed": _installed(moe)}
    held_out = _inputs(name, entry, g, 3, 9, padded=True)
    facts["rel_err"] = relative_error(_output(moe, held_out), _output(model, held_out))
    if entry.kind in ("causal", "seq2seq", "audio"):
        prompt = {k: v[1:2] for k, v in held_out.items() if k != "decoder_input_ids"}
        with torch.no_grad():
            want = model.generate(**prompt, max_new_tokens=4, do_sample=False, use_cache=True)
            got = moe.generate(**prompt, max_new_tokens=4, do_sample=False, use_cache=True)
        facts["generate_equal"] = bool(torch.equal(got, want))
    return facts


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_converts_every_ffn_exactly_and_keeps_the_calling_convention(name):
    facts = check(name)
    assert facts["found"] == facts["true"], facts
    if name == "flux":
        assert any(s.startswith("single_transformer_blocks.0.proj_out: reads an FFN's hidden activation concatenated")
                   for s in facts["skipped"])
    assert facts["rel_err"] <= 1e-5, facts
    if "generate_equal" in facts:
        assert facts["generate_equal"], facts


@pytest.mark.parametrize("name", [n for n, e in ZOO.items() if e.kind == "causal"])
def test_every_causal_lm_checkpoint_is_read_with_its_head(name, tmp_path):
    """``moefx convert`` / ``moefx eval`` build SRC's class from config.architectures (GPT2LMHeadModel keeps its
    LM head although its name does not end in ForCausalLM)."""
    from moefx.stream import Source

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ZOO[name].build().save_pretrained(str(tmp_path))
        source = Source(str(tmp_path))
        assert source.causal_lm and type(source.meta_model()).__name__ == source.architecture


@pytest.mark.parametrize("name", [name for name, entry in ZOO.items() if entry.kind == "causal"])
def test_zoo_causal_lm_converts_through_the_cli_exactly_at_every_expert(name, tmp_path, capsys):
    """``moefx convert`` of the saved checkpoint: Gemma's embedding scale is a buffer outside the checkpoint, the
    pad token is the last id of the vocabulary and the calibration uses a few tokens (the embedding rows read are
    fewer than the padding index), GPT-NeoX stores its head under a name transformers renames on loading."""
    import json

    from moefx.cli import main

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense = ZOO[name].build().eval()
    dense.config.pad_token_id = VOCAB - 1
    dense.save_pretrained(tmp_path / "src")
    g = torch.Generator().manual_seed(0)
    (tmp_path / "ids.jsonl").write_text("".join(json.dumps({"input_ids": torch.randint(3, 12, (40,), generator=g)
                                                            .tolist()}) + "\n" for _ in range(2)))
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "moe"), "--experts", "4", "--top-k", "4",
                 "--calibration", str(tmp_path / "ids.jsonl"), "--calibration-tokens", "64",
                 "--sequence-length", "16", "--quiet"]) == 0, capsys.readouterr().err
    moe = moefx.load_pretrained(str(tmp_path / "moe"))
    ids = torch.randint(3, VOCAB, (2, 9), generator=g)
    with torch.no_grad():
        want = dense.base_model(input_ids=ids).last_hidden_state
        assert relative_error(moe.base_model(input_ids=ids).last_hidden_state, want) <= 1e-5
