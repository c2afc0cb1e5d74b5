"""``moefx convert SRC DST`` / ``moefx.convert_pretrained``: a sharded checkpoint directory converted block by
block equals ``moefx.convert`` of the whole model, holds one block of the source at a time, resumes, and refuses
bad input by name."""
from __future__ import annotations

import json
import os
import weakref

import pytest
import torch

import moefx
from moefx.cli import main
from moefx.shards import INDEX, MOEFX_INDEX, SourceShards
from moefx.stream import convert_pretrained
from tests.conftest import relative_error

TOKENS, SEQUENCE = 256, 64


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained on the packaged Python-documentation text (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from moefx.data import python_doc_sentences

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.train_from_iterator(python_doc_sentences(300), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def llama_checkpoint(path, layers=3, tokenizer=True, seed=0):
    """A tiny LlamaForCausalLM saved in several safetensors shards (fp32), with its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path, max_shard_size="100KB")
    if tokenizer:
        tiny_tokenizer().save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama") / "src"
    return str(path), llama_checkpoint(str(path))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def in_memory(dense, src, **options):
    """``moefx.convert`` of the whole model on the calibration convert_pretrained builds from ``src``."""
    from moefx.stream import Source, calibration_ids

    ids = calibration_ids(Source(src), None, TOKENS, SEQUENCE)
    return moefx.convert(dense, calibration=[{"input_ids": b} for b in ids], progress=False, **options)


def test_checkpoint_has_several_shards(llama):
    src, _ = llama
    assert os.path.exists(os.path.join(src, INDEX)) and len(SourceShards(src)._files()) >= 4


def test_cli_at_every_expert_computes_the_dense_model_and_writes_a_sharded_moefx_checkpoint(llama, tmp_path, capsys):
    src, dense = llama
    dst = str(tmp_path / "moe")
    assert main(["convert", src, dst, "--experts", "4", "--top-k", "4", "--calibration-tokens", str(TOKENS),
                 "--sequence-length", str(SEQUENCE), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "layer by layer (3 blocks)" in printed and "model.layers.2.mlp.down_proj -> model.layers.2.mlp.moe" in printed
    assert "3 MoE layers" in printed  # the summary
    assert not os.path.exists(os.path.join(dst, INDEX))  # transformers cannot take it for the dense Llama
    with open(os.path.join(dst, MOEFX_INDEX)) as f:
        assert len(set(json.load(f)["weight_map"].values())) == 4  # one shard per block + the rest
    with open(os.path.join(dst, "moefx.json")) as f:
        assert json.load(f)["recipe"] == moefx.Recipe(num_experts=4, top_k=4).to_dict()
    moe = moefx.load_pretrained(dst)
    ids = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(1))
    assert relative_error(logits(moe, ids), logits(dense, ids)) < 1e-5
    assert not os.path.exists(dst + ".moefx-partial")


def test_streamed_conversion_equals_converting_the_whole_model_in_memory(llama, tmp_path):
    src, dense = llama
    dst = str(tmp_path / "moe")
    result = convert_pretrained(src, dst, num_experts=4, top_k=2, calibration_tokens=TOKENS,
                                sequence_length=SEQUENCE, progress=False)
    assert len(result.report.converted) == 3 and result.streamed
    ids = torch.randint(0, 300, (2, 13), generator=torch.Generator().manual_seed(2))
    want = logits(in_memory(dense, src, num_experts=4, top_k=2), ids)
    assert relative_error(logits(moefx.load_pretrained(dst), ids), want) < 1e-5
    assert relative_error(want, logits(dense, ids)) > 1e-3  # top-2 of 4 is not the dense model


def test_upcycled_checkpoint_in_mixtral_layout_loads_in_transformers_and_equals_in_memory(llama, tmp_path):
    from transformers import AutoModelForCausalLM

    src, dense = llama
    dst = str(tmp_path / "mixtral")
    convert_pretrained(src, dst, num_experts=4, top_k=2, method="upcycle", layout="mixtral",
                       calibration_tokens=TOKENS, sequence_length=SEQUENCE, progress=False)
    loaded = AutoModelForCausalLM.from_pretrained(dst).eval()
    assert type(loaded).__name__ == "MixtralForCausalLM"
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(3))
    want = logits(in_memory(dense, src, num_experts=4, top_k=2, method="upcycle"), ids)
    assert relative_error(logits(loaded, ids), want) < 1e-5


def test_source_blocks_are_materialised_one_at_a_time(tmp_path, monkeypatch):
    """The whole model is never resident: when each block is converted, no other block of the 8 holds real
    weights (the others are on the meta device or freed), and no from_pretrained loads the model."""
    import gc

    import transformers

    import moefx.stream as stream

    src = str(tmp_path / "deep")
    llama_checkpoint(src, layers=8)
    blocks, resident = [], []
    meta_model, convert = stream.Source.meta_model, stream.convert

    def recording_meta_model(self):
        model = meta_model(self)
        blocks.extend(weakref.ref(b) for b in model.model.layers)
        return model

    def counting_convert(*args, **kwargs):
        gc.collect()
        live = [b() for b in blocks]
        resident.append(sum(b is not None and not next(b.parameters()).is_meta for b in live))
        return convert(*args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("the whole model was loaded")

    monkeypatch.setattr(stream.Source, "meta_model", recording_meta_model)
    monkeypatch.setattr(stream, "convert", counting_convert)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", refuse)
    convert_pretrained(src, str(tmp_path / "moe"), num_experts=4, top_k=2, calibration_tokens=TOKENS,
                       sequence_length=SEQUENCE, progress=False)
    assert resident == [1] * 8
    gc.collect()
    assert all(b() is None or next(b().parameters()).is_meta for b in blocks)


def test_an_interrupted_conversion_resumes_from_the_last_written_block(llama, tmp_path, monkeypatch):
    from moefx.stream import Streamer

    src, _ = llama
    options = dict(num_experts=4, top_k=2, method="coactivation", calibration_tokens=TOKENS,
                   sequence_length=SEQUENCE, progress=False)
    whole = str(tmp_path / "whole")
    convert_pretrained(src, whole, **options)
    dst = str(tmp_path / "moe")
    convert_block = Streamer._convert_block

    def interrupted(self, block, batches, i):
        if i == 2:
            raise KeyboardInterrupt
        return convert_block(self, block, batches, i)

    monkeypatch.setattr(Streamer, "_convert_block", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_pretrained(src, dst, **options)
    assert not os.path.exists(dst) and os.path.exists(dst + ".moefx-partial")
    monkeypatch.setattr(Streamer, "_convert_block", convert_block)
    result = convert_pretrained(src, dst, **options)
    assert result.resumed_from == 2 and len(result.report.converted) == 3
    ids = torch.randint(0, 300, (1, 10), generator=torch.Generator().manual_seed(4))
    assert relative_error(logits(moefx.load_pretrained(dst), ids), logits(moefx.load_pretrained(whole), ids)) < 1e-6


def test_resuming_after_the_source_weights_changed_is_refused(tmp_path, monkeypatch):
    """The old run's blocks belong to the old weights: stitching them to the new model's rest is refused."""
    from moefx.stream import Streamer

    src, dst = str(tmp_path / "src"), str(tmp_path / "moe")
    llama_checkpoint(src)
    options = dict(num_experts=4, top_k=2, calibration_tokens=TOKENS, sequence_length=SEQUENCE, progress=False)
    convert_block = Streamer._convert_block

    def interrupted(self, block, batches, i):
        if i == 1:
            raise KeyboardInterrupt
        return convert_block(self, block, batches, i)

    monkeypatch.setattr(Streamer, "_convert_block", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_pretrained(src, dst, **options)
    monkeypatch.setattr(Streamer, "_convert_block", convert_block)
    llama_checkpoint(src, seed=1)
    with pytest.raises(ValueError, match="weights in .* changed since the interrupted conversion"):
        convert_pretrained(src, dst, **options)


def test_encoder_without_tokenizer_streams_on_token_id_jsonl(tmp_path):
    """BertModel (AutoModel, each whole block becomes one traced piece), calibrated on JSONL token ids."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    dense = BertModel(BertConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                 vocab_size=200, max_position_embeddings=64)).eval()
    src = str(tmp_path / "bert")
    dense.save_pretrained(src, max_shard_size="50KB")
    data = tmp_path / "ids.jsonl"
    generator = torch.Generator().manual_seed(0)
    data.write_text("".join(json.dumps({"input_ids": torch.randint(3, 200, (40,), generator=generator).tolist()})
                            + "\n" for _ in range(8)))
    dst = str(tmp_path / "moe")
    result = convert_pretrained(src, dst, num_experts=4, top_k=2, calibration=str(data), calibration_tokens=256,
                                sequence_length=64, progress=False)
    assert result.streamed and len(result.report.converted) == 2
    ids = torch.randint(0, 200, (2, 12), generator=generator)
    from moefx.stream import Source, calibration_ids

    calibration = [{"input_ids": b} for b in calibration_ids(Source(src), str(data), 256, 64)]
    want = moefx.convert(dense, calibration=calibration, num_experts=4, top_k=2, progress=False)
    with torch.no_grad():
        got = moefx.load_pretrained(dst)(input_ids=ids).last_hidden_state
        assert relative_error(got, want(input_ids=ids).last_hidden_state) < 1e-5


def test_a_model_without_a_layer_stack_is_converted_in_memory_and_says_so(tmp_path):
    src = str(tmp_path / "one")
    dense = llama_checkpoint(src, layers=1)
    result = convert_pretrained(src, str(tmp_path / "moe"), num_experts=4, top_k=4, calibration_tokens=TOKENS,
                                sequence_length=SEQUENCE, progress=False)
    assert not result.streamed and "converted in memory" in str(result)
    ids = torch.randint(0, 300, (1, 7), generator=torch.Generator().manual_seed(5))
    assert relative_error(logits(moefx.load_pretrained(str(tmp_path / "moe")), ids), logits(dense, ids)) < 1e-5


def test_eval_block_by_block_equals_eval_in_memory(llama, tmp_path, capsys):
    from moefx.evaluation.checkpoint import evaluate_pretrained

    src, _ = llama
    exact, dst = str(tmp_path / "exact"), str(tmp_path / "moe")
    options = dict(num_experts=4, calibration_tokens=TOKENS, sequence_length=SEQUENCE, progress=False)
    convert_pretrained(src, exact, top_k=4, **options)
    convert_pretrained(src, dst, top_k=2, **options)
    quality = evaluate_pretrained(src, exact, tokens=128, sequence_length=SEQUENCE)
    assert quality.blocks is not None and max(error for _, error, _ in quality.blocks) < 1e-5
    assert quality.top1_agreement == 1.0 and abs(quality.moe_perplexity / quality.dense_perplexity - 1) < 1e-5
    streamed = evaluate_pretrained(src, dst, tokens=128, sequence_length=SEQUENCE)
    whole = evaluate_pretrained(src, dst, tokens=128, sequence_length=SEQUENCE, in_memory=True)
    assert whole.blocks is None and whole.layers is not None
    assert abs(streamed.moe_perplexity / whole.moe_perplexity - 1) < 1e-5 and streamed.top1_agreement < 1.0
    assert abs(streamed.dense_perplexity / whole.dense_perplexity - 1) < 1e-5
    assert streamed.top1_agreement == whole.top1_agreement
    assert whole.kl > 0 and abs(streamed.kl - whole.kl) < 1e-6 + 1e-3 * whole.kl  # fp32 logits
    assert main(["eval", src, exact, "--tokens", "128", "--sequence-length", str(SEQUENCE)]) == 0
    assert "top-1 next-token agreement 100.0%" in capsys.readouterr().out


def test_recipe_file_then_flags(tmp_path):
    import argparse

    from moefx.cli import add_convert_arguments, recipe_from_args

    parser = add_convert_arguments(argparse.ArgumentParser())
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("num_experts: 8\ntop_k: 3\nmethod: coactivation\nrefit: true\n")
    args = parser.parse_args(["a", "b", "--recipe", str(recipe), "--top-k", "2", "--router", "least_squares"])
    assert recipe_from_args(args) == moefx.Recipe(num_experts=8, top_k=2, method="coactivation", refit=True,
                                                  router="least_squares")
    recipe.write_text("num_experts: 8\ntopk: 2\n")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['topk'\]"):
        recipe_from_args(parser.parse_args(["a", "b", "--recipe", str(recipe)]))


def test_bad_input_is_refused_by_name_and_leaves_no_checkpoint(llama, tmp_path, capsys):
    src, _ = llama
    options = dict(num_experts=4, top_k=2, calibration_tokens=TOKENS, sequence_length=SEQUENCE, progress=False)
    with pytest.raises(ValueError, match="has no config.json"):
        convert_pretrained(str(tmp_path), str(tmp_path / "a"), **options)
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("")
    with pytest.raises(ValueError, match="exists and is not empty"):
        convert_pretrained(src, str(full), **options)
    with pytest.raises(ValueError, match="gives .* tokens; 100,000 calibration tokens were asked for"):
        convert_pretrained(src, str(tmp_path / "b"), **{**options, "calibration_tokens": 100_000})
    bare = str(tmp_path / "bare")
    llama_checkpoint(bare, layers=2, tokenizer=False)
    text = tmp_path / "text.txt"
    text.write_text("some calibration text\n")
    with pytest.raises(ValueError, match="has no tokenizer"):
        convert_pretrained(bare, str(tmp_path / "c"), calibration=str(text), **options)
    with open(os.path.join(bare, INDEX)) as f:
        shard = sorted(set(json.load(f)["weight_map"].values()))[1]
    os.remove(os.path.join(bare, shard))
    with pytest.raises(ValueError, match=f"not there \\({shard}\\)"):
        convert_pretrained(bare, str(tmp_path / "d"), **options)
    # a recipe that fails on the first block: nothing at DST
    assert main(["convert", src, str(tmp_path / "e"), "--experts", "5", "--top-k", "2", "--quiet",
                 "--calibration-tokens", str(TOKENS)]) == 2
    assert "pick num_experts from" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "e") and not os.path.exists(tmp_path / "e.moefx-partial")


def zoo_checkpoint(tmp_path, name):
    """Zoo model ``name`` saved as a checkpoint directory, and a JSONL of token-id calibration records."""
    import warnings

    from tests.test_zoo import VOCAB, ZOO

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense = ZOO[name].build().eval()
    src = str(tmp_path / name)
    dense.save_pretrained(src)
    data = tmp_path / "ids.jsonl"
    generator = torch.Generator().manual_seed(0)
    data.write_text("".join(json.dumps({"input_ids": torch.randint(3, VOCAB, (40,), generator=generator).tolist()})
                            + "\n" for _ in range(8)))
    return dense, src, str(data)


def test_gpt2_lm_head_model_is_converted_with_its_head(tmp_path):
    dense, src, data = zoo_checkpoint(tmp_path, "gpt2")
    dst = str(tmp_path / "moe")
    convert_pretrained(src, dst, num_experts=4, top_k=4, calibration=data, calibration_tokens=128,
                       sequence_length=32, progress=False)
    moe = moefx.load_pretrained(dst)
    ids = torch.randint(3, 64, (1, 9), generator=torch.Generator().manual_seed(1))
    assert type(moe).__name__ == "GPT2LMHeadModel" and relative_error(logits(moe, ids), logits(dense, ids)) < 1e-5


@pytest.mark.parametrize("name", ["phi", "cohere", "gpt2"])
def test_streamed_eval_perplexity_applies_the_models_own_head(tmp_path, name):
    """Phi's LM-head bias, Cohere's logit scale: the block-by-block perplexity equals the whole model's."""
    from moefx.evaluation.checkpoint import evaluate_pretrained

    dense, src, data = zoo_checkpoint(tmp_path, name)
    head = dense.get_output_embeddings()
    if head.bias is not None:
        with torch.no_grad():
            head.bias.normal_(0, 2, generator=torch.Generator().manual_seed(0))
        dense.save_pretrained(src)
    dst = str(tmp_path / "moe")
    convert_pretrained(src, dst, num_experts=4, top_k=2, calibration=data, calibration_tokens=128,
                       sequence_length=32, progress=False)
    streamed = evaluate_pretrained(src, dst, data, tokens=128, sequence_length=32)
    whole = evaluate_pretrained(src, dst, data, tokens=128, sequence_length=32, in_memory=True)
    assert streamed.blocks is not None and whole.blocks is None
    assert abs(streamed.dense_perplexity / whole.dense_perplexity - 1) < 1e-5
    assert abs(streamed.moe_perplexity / whole.moe_perplexity - 1) < 1e-5
    assert streamed.top1_agreement == whole.top1_agreement
    assert whole.kl > 0 and abs(streamed.kl - whole.kl) < 1e-6 + 1e-3 * whole.kl  # fp32 logits


def _refused(capsys, argv, *messages):
    """``moefx ...`` exits 2 with one line naming the problem, no traceback."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and all(m in err for m in messages), err


def test_bad_cli_inputs_get_one_line_errors_before_any_work(llama, tmp_path, capsys, monkeypatch):
    src, _ = llama
    quick = ["--experts", "4", "--top-k", "2", "--calibration-tokens", "64", "--sequence-length", "32", "--quiet"]
    latin = tmp_path / "latin.txt"
    latin.write_bytes("good line\ncaf\xe9 au lait\n".encode("latin-1"))
    _refused(capsys, ["convert", src, str(tmp_path / "a"), "--calibration", str(latin), *quick],
             f"{latin} line 2 is not UTF-8 text")
    for record, message in (({"text": 5}, "line 2: 'text' is a int, not a string"),
                            ({"input_ids": [3, "x"]}, "line 2: 'input_ids' is not a non-empty list of token ids"),
                            ({"input_ids": [3, -1]}, "line 2: 'input_ids' is not a non-empty list of token ids")):
        data = tmp_path / "data.jsonl"
        data.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps(record) + "\n")
        _refused(capsys, ["convert", src, str(tmp_path / "a"), "--calibration", str(data), *quick], message)
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: path != str(tmp_path / "ro") and access(path, mode))
    (tmp_path / "ro").mkdir()
    _refused(capsys, ["convert", src, str(tmp_path / "ro" / "moe"), *quick], f"cannot write into {tmp_path / 'ro'}")
    monkeypatch.undo()
    from transformers import BartConfig, BartForConditionalGeneration

    BartForConditionalGeneration(BartConfig(d_model=16, encoder_layers=1, decoder_layers=1, encoder_ffn_dim=32,
                                            decoder_ffn_dim=32, encoder_attention_heads=2, decoder_attention_heads=2,
                                            vocab_size=50)).save_pretrained(tmp_path / "bart")
    _refused(capsys, ["convert", str(tmp_path / "bart"), str(tmp_path / "a"), *quick],
             "holds an encoder-decoder model (bart), which moefx converts only in memory")
    for cut, message in ((lambda b: b[:-100], "lies at bytes"),
                         (lambda b: (10**9).to_bytes(8, "little") + b[8:], "its header is 1,000,000,000 bytes long")):
        broken = tmp_path / "broken"
        if broken.exists():
            import shutil

            shutil.rmtree(broken)
        llama_checkpoint(str(broken), layers=2)
        shard = sorted(broken.glob("model-*.safetensors"))[1]
        shard.write_bytes(cut(shard.read_bytes()))
        _refused(capsys, ["convert", str(broken), str(tmp_path / "a"), *quick],
                 f"moefx: {shard} is truncated or not a safetensors file: ", message)
    assert not any(p.name.startswith("a") for p in tmp_path.iterdir())
    # moefx eval: DST converted from another model; --data with fewer tokens than --tokens
    dst = str(tmp_path / "moe")
    assert main(["convert", src, dst, *quick]) == 0
    _refused(capsys, ["eval", str(broken.parent / "bart"), dst], "holds an encoder-decoder model")
    other = str(tmp_path / "other")
    llama_checkpoint(other, layers=2)
    _refused(capsys, ["eval", other, dst], f"{dst} was not converted from {other} (num_hidden_layers 3 there, 2 in "
                                           "SRC)")
    short = tmp_path / "short.txt"
    short.write_text("A few held-out words.\nAnd a second line of them.\n")
    capsys.readouterr()
    assert main(["eval", src, dst, "--data", str(short), "--sequence-length", "32"]) == 0
    assert "held-out tokens (all the data holds; 8,192 asked for)" in capsys.readouterr().out


def test_cli_habits_version_choices_one_default_typos_and_an_early_width_check(llama, tmp_path, capsys,
                                                                                 monkeypatch):
    import subprocess
    import sys

    import moefx.stream as stream

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"moefx {moefx.__version__}"
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    text = capsys.readouterr().out
    for flag, values in (("--method", "upcycle,split,coactivation,random"), ("--router", "centroid,representative,"),
                         ("--gating", "unit,softmax,sigmoid")):
        assert f"{flag} {{{values}" in text, flag
    options = text.split("\n  -")
    assert all(o.count("default") <= 1 for o in options), [o for o in options if o.count("default") > 1]
    with pytest.raises(SystemExit) as done:
        main(["convert", "a", "b", "--exprts", "4"])
    assert done.value.code == 2 and "did you mean --experts?" in capsys.readouterr().err
    # --help and a typo answer without loading Dynamo (torch.compile finds the backend through its entry point)
    code = "import sys, moefx.cli; print('torch._dynamo' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
    # --experts that the FFN width (128) does not divide: refused before the shell or any block is read
    src, _ = llama

    def refuse(self):
        raise AssertionError("the shell was loaded")

    monkeypatch.setattr(stream.Streamer, "load_shell", refuse)
    assert main(["convert", src, str(tmp_path / "moe"), "--experts", "5", "--quiet"]) == 2
    assert "128 neurons, which do not split into num_experts=5 equal experts; pick num_experts from" in \
        capsys.readouterr().err


def test_layout_sets_the_options_it_holds_and_refuses_the_rest_before_block_0(llama, tmp_path):
    """``--layout`` fills the gating/bias/renormalisation options it needs where the recipe leaves them open (the
    measured default routes every active expert in Mixtral), and refuses a recipe it cannot hold before any block
    is converted (nothing written)."""
    from moefx.recipe import resolve

    src, _ = llama
    mixtral = resolve({}, "mixtral")
    assert (mixtral.gating, mixtral.biases, mixtral.renormalize, mixtral.num_shared) == ("softmax", False, True, 0)
    assert mixtral.top_k == 32 and resolve({}).num_shared == 16  # the same active share, all routed
    qwen2 = resolve({"num_experts": 4, "top_k": 2}, "qwen2_moe")
    assert (qwen2.router, qwen2.refit, qwen2.gating, qwen2.renormalize, qwen2.biases) == (
        "least_squares", True, "softmax", False, False)
    for layout, options, message in (("mixtral", dict(num_shared=1), "num_shared=1; MixtralForCausalLM has no shared"),
                                     ("qwen2_moe", dict(gating="unit"), "gating='unit'"),
                                     ("qwen3_moe", dict(biases=True), "biases=True")):
        dst = str(tmp_path / layout)
        with pytest.raises(ValueError, match=f"layout='{layout}' cannot hold this recipe's layers: {message}"):
            convert_pretrained(src, dst, layout=layout, num_experts=4, top_k=1, calibration_tokens=64,
                               sequence_length=32, progress=False, **options)
        assert not os.path.exists(dst) and not os.path.exists(dst + ".moefx-partial")
