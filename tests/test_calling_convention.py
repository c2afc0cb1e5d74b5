"""A converted model accepts every call the dense model accepts, or refuses one clearly: module swaps keep
the parents' forward; traced pieces guard what tracing specialised; nothing shared is lost."""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import moefx
from moefx.convert.rewrite import MoEFFN, PassThrough
from moefx.layer import MoELayer
from tests.conftest import relative_error


def _bert():
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    return BertModel(BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                vocab_size=60, max_position_embeddings=32)).eval()


def _tokens(batch, length, pad=0):
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, length - pad:] = 0
    return {"input_ids": torch.randint(1, 60, (batch, length)), "attention_mask": mask}


def test_ffn_module_is_swapped_and_the_layer_keeps_its_python_forward():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=60)).eval()
    moe = moefx.convert(model, num_experts=4, top_k=4, calibration=[{"input_ids": torch.randint(0, 60, (1, 5))}],
                        progress=False)
    layer = moe.model.layers[0]
    assert type(layer).__name__ == "LlamaDecoderLayer" and isinstance(layer.mlp, MoEFFN)
    assert [o.moe for o in moe.moefx_report.layers] == ["model.layers.0.mlp.moe", "model.layers.1.mlp.moe"]
    assert not any(isinstance(m, torch.fx.GraphModule) for m in moe.modules())
    batch = _tokens(3, 8, pad=3)  # another shape, padded: the calibration batch had neither
    out = moe(**batch, output_attentions=True, output_hidden_states=True)
    ref = model(**batch, output_attentions=True, output_hidden_states=True)
    assert relative_error(out.logits, ref.logits) <= 1e-5
    assert len(out.hidden_states) == len(ref.hidden_states)


def test_ffn_spread_over_two_modules_is_swapped_module_by_module():
    """BERT's FFN spans BertIntermediate and BertOutput: the input Linear becomes the MoE, the activation and
    the output Linear identities; calibrated unpadded, the model takes padding and output flags."""
    model = _bert()
    moe = moefx.convert(model, num_experts=4, top_k=4, calibration=[_tokens(2, 6)], progress=False)
    layer = moe.encoder.layer[0]
    assert isinstance(layer.intermediate.dense, MoEFFN) and isinstance(layer.output.dense, PassThrough)
    assert moe.moefx_report.layers[0].moe == "encoder.layer.0.intermediate.dense.moe"
    assert isinstance(moe.get_submodule(moe.moefx_report.layers[0].moe), MoELayer)
    batch = _tokens(3, 9, pad=4)
    with torch.no_grad():
        out = moe(**batch, output_attentions=True, output_hidden_states=True)
        ref = model(**batch, output_attentions=True, output_hidden_states=True)
    assert relative_error(out.last_hidden_state, ref.last_hidden_state) <= 1e-5
    assert len(out.hidden_states) == len(ref.hidden_states) == 3


class InlineFFNLayer(nn.Module):
    """An FFN inline in a layer with a functional activation (no module to swap) and shape-dependent Python."""

    def __init__(self):
        super().__init__()
        self.attn, self.up, self.down = nn.Linear(8, 8), nn.Linear(8, 32), nn.Linear(32, 8)

    def forward(self, x, scale=1.0):
        if x.shape[1] > 4:
            x = x * 2
        h = self.attn(x) * scale
        return h + self.down(F.relu(self.up(h)))


class Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = InlineFFNLayer()

    def forward(self, x):
        return self.layer(x, scale=1.0)


def test_traced_piece_refuses_a_call_that_leaves_what_was_traced_naming_it():
    model = Wrapper().eval()
    moe = moefx.convert(model, num_experts=4, top_k=4, calibration=[torch.randn(2, 6, 8)], progress=False)
    assert isinstance(moe.layer, torch.fx.GraphModule)  # the FFN's activation is a function: nothing to swap
    x = torch.randn(3, 7, 8)
    assert relative_error(moe(x), model(x)) <= 1e-5  # another batch size and length, same branch
    with pytest.raises(ValueError, match=r"x.shape\[1\] > 4.*bool\(\) = True; this call gives False"):
        moe(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match=r"traced with scale=1.0 and is now called with scale=0.5"):
        moe.layer(x, scale=0.5)
    with pytest.raises(TypeError, match=r"called without scale, passed when it was traced"):
        moe.layer(x)


def test_shape_loop_in_a_piece_is_guarded():
    class Rows(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(8, 32), nn.Linear(32, 8)

        def forward(self, x):
            return torch.stack([self.down(F.relu(self.up(x[i]))) + x[i] for i in range(len(x))])

    model = Rows().eval()
    moe = moefx.convert(model, num_experts=4, top_k=4, calibration=[torch.randn(2, 8)], progress=False)
    with pytest.raises(ValueError, match=r"len\(\) = 2; this call gives 3"):
        moe(torch.randn(3, 8))


def test_tied_and_shared_weights_survive_conversion():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(32, 8)
            self.ffn = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))
            self.ffn[0].weight = self.embed.weight  # an FFN weight tied to an embedding
            self.shared = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
            self.a, self.b = nn.ModuleDict({"mlp": self.shared}), nn.ModuleDict({"mlp": self.shared})

        def forward(self, ids):
            x = self.embed(ids)
            return self.b["mlp"](self.a["mlp"](self.ffn(x)))

    model = Tied().eval()
    ids = torch.randint(0, 32, (2, 5))
    moe = moefx.convert(model, num_experts=4, top_k=4, calibration=[ids], progress=False)
    assert moe.embed.weight.shape == (32, 8)  # the embedding keeps the weight tied to the converted FFN
    assert moe.a["mlp"] is moe.b["mlp"] and isinstance(moe.a["mlp"], MoEFFN)  # converted once, still shared
    assert relative_error(moe(ids), model(ids)) <= 1e-5


def test_converted_models_pickle():
    model = _bert()
    batch = _tokens(2, 6)
    for moe in (moefx.convert(model, num_experts=4, top_k=4, calibration=[batch], progress=False),
                moefx.convert(Wrapper().eval(), num_experts=4, top_k=4,
                              calibration=[torch.randn(2, 6, 8)], progress=False)):
        buffer = io.BytesIO()
        torch.save(moe, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        inputs = batch if isinstance(moe, type(model)) else {"input": torch.randn(2, 6, 8)}
        with torch.no_grad():
            want = moe(**inputs) if "input_ids" in inputs else moe(inputs["input"])
            got = loaded(**inputs) if "input_ids" in inputs else loaded(inputs["input"])
        want, got = (getattr(t, "last_hidden_state", t) for t in (want, got))
        assert torch.equal(got, want)


def test_recorded_calls_are_copies_so_an_in_place_residual_does_not_break_the_check():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))
            self.attn = nn.Linear(8, 8)

        def forward(self, x):
            y = self.mlp(x)
            y += self.attn(x)  # changes the MLP's output tensor after its call (Falcon)
            return y

    model = InPlace().eval()
    x = torch.randn(3, 8)
    moe = moefx.convert(model, num_experts=4, top_k=4, calibration=[x], progress=False)
    assert relative_error(moe(x), model(x)) <= 1e-5 and isinstance(moe.mlp, MoEFFN)


def test_code_between_a_span_swapped_ffns_activation_and_output_that_calibration_skipped_is_refused():
    """The span swap makes the input Linear compute the whole FFN: code the parent runs between the activation
    and the output Linear (here on a branch the calibration did not take) would act on the FFN's output."""
    class Between(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8)

        def forward(self, x, mask=None):
            h = self.act(self.fc1(x))
            if mask is not None:
                h = h * mask
            return x + self.fc2(h)

    torch.manual_seed(0)
    model = Between().eval()
    moe = moefx.convert(model, num_experts=4, top_k=4, calibration=[torch.randn(2, 6, 8)], progress=False)
    assert isinstance(moe.fc1, MoEFFN) and isinstance(moe.fc2, PassThrough)
    x, mask = torch.randn(2, 5, 8), torch.rand(2, 5, 1)
    assert relative_error(moe(x), model(x)) <= 1e-5
    with pytest.raises(ValueError, match=r"ran code between fc1.s activation and fc2 that did not run on the"):
        moe(x, mask)


def test_raw_tokenizer_outputs_are_batches_for_convert_distill_evaluate_and_summary():
    """A tokenizer returns a BatchEncoding (a Mapping, not a dict): every API that runs the model on data reads
    it through the same reader as convert's calibration, and one batch passed bare is refused by name."""
    from transformers import BatchEncoding

    model = _bert()
    data = [BatchEncoding(_tokens(2, 6)), BatchEncoding(_tokens(3, 7, pad=2))]
    moe = moefx.convert(model, num_experts=4, top_k=2, calibration=data, progress=False)
    assert moefx.summary(moe, data=data).tokens > 0
    assert moefx.evaluate(model, moe, data).layers
    moefx.distill(moe, model, data, steps=2)
    for call in (lambda: moefx.summary(moe, data=data[0]), lambda: moefx.evaluate(model, moe, data[0]),
                 lambda: moefx.distill(moe, model, data[0], steps=1)):
        with pytest.raises(ValueError, match="one BatchEncoding \\(a single batch\\)"):
            call()
