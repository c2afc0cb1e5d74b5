"""Upcycling options: fine-grained copies (granularity, virtual groups) and Drop-Upcycling."""
import re

import pytest
import torch
from torch import nn

import moefx
from moefx.layer import MoELayer
from moefx.op import route
from tests.conftest import main_output, relative_error


def _llama():
    from transformers import LlamaConfig, LlamaModel
    torch.manual_seed(0)
    model = LlamaModel(LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=96, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100)).eval()
    return model, {"input_ids": torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))}


def _plain_ffn():
    """A biased GELU FFN (BERT, GPT-2 style)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 96), nn.GELU(), nn.Linear(96, 16)).eval()


def _layers(model):
    return [m for m in model.modules() if isinstance(m, MoELayer)]


@pytest.mark.parametrize("granularity", [1, 2, 4])
@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_upcycle_with_granularity_is_exact_at_any_top_k_on_llama(granularity, top_k):
    model, batch = _llama()
    with torch.no_grad():
        reference = main_output(model(**batch))
        moe = moefx.convert(model, num_experts=4, top_k=top_k, calibration=[batch], method="upcycle",
                            granularity=granularity, progress=False)
        assert relative_error(main_output(moe(**batch)), reference) <= 1e-5
    for layer in _layers(moe):
        assert (layer.num_experts, layer.expert_width, layer.top_k) == (4 * granularity, 96 // granularity,
                                                                          top_k * granularity)


def test_upcycle_with_granularity_is_exact_with_biases_in_fp64_and_fp32():
    model = _plain_ffn()
    for dtype in (torch.float64, torch.float32):
        m = model.to(dtype)
        x = torch.randn(64, 16, dtype=dtype)
        with torch.no_grad():
            moe = moefx.convert(m, num_experts=3, top_k=2, calibration=[x], method="upcycle", granularity=3,
                                progress=False)
            assert relative_error(moe(x), m(x)) <= (1e-12 if dtype == torch.float64 else 1e-5)
            layer = _layers(moe)[0]
            assert layer.b_out is not None and layer.gate_scale == 3.0
            # an all-zero input ties every router row: the copies' bias offsets still pick whole copies
            zero = torch.zeros(4, 16, dtype=dtype)
            assert relative_error(moe(zero), m(zero)) <= 1e-5


def test_router_rows_of_a_copy_are_tied_so_whole_copies_are_picked():
    model, batch = _llama()
    moe = moefx.convert(model, num_experts=4, top_k=2, calibration=[batch], method="upcycle", granularity=3,
                        progress=False)
    layer = _layers(moe)[0]
    weight = layer.router.weight.detach().view(4, 3, -1)
    assert torch.equal(weight, weight[:, :1].expand_as(weight))
    assert not torch.equal(weight[0, 0], weight[1, 0])
    x = torch.randn(200, layer.hidden)
    gates, ids = route(x, layer.router.weight, layer.router.bias, layer.attrs)
    copies = ids.div(3, rounding_mode="floor").sort(-1).values
    assert torch.equal(copies.view(200, 2, 3), copies.view(200, 2, 3)[..., :1].expand(200, 2, 3))
    assert torch.allclose(gates.sum(-1), torch.full((200,), 3.0))  # gate_scale G: shards of a copy sum to its share


def _dense_in_out(model):
    mlp = model.layers[0].mlp
    w_in = torch.stack([mlp.gate_proj.weight, mlp.up_proj.weight], 1).flatten(0, 1).detach()  # interleaved rows
    return w_in, mlp.down_proj.weight.detach()


@pytest.mark.parametrize("granularity", [1, 2])
def test_drop_upcycling_redraws_round_r_width_neurons_per_expert_from_the_dense_statistics(granularity):
    model, batch = _llama()
    w_in, w_out = _dense_in_out(model)
    rate, E = 0.3, 4
    moe = moefx.convert(model, num_experts=E, top_k=2, calibration=[batch], method="upcycle",
                        granularity=granularity, drop_rate=rate, seed=5, progress=False)
    layer = _layers(moe)[0]
    width = 96 // granularity
    expected = round(rate * width)
    redrawn, gate_values, down_values = [], [], []
    for e in range(E * granularity):
        shard = torch.arange(width) + (e % granularity) * width
        dense_rows = w_in.view(96, 2, -1)[shard]
        rows = layer.w_in[e].detach().view(width, 2, -1)
        cols = layer.w_out[e].detach()
        changed_in = (rows != dense_rows).any(-1)                   # [width, 2]: gate row, up row
        changed_out = (cols != w_out[:, shard]).any(0)
        assert torch.equal(changed_in[:, 0], changed_out) and torch.equal(changed_in[:, 1], changed_out)
        assert int(changed_out.sum()) == expected
        redrawn.append(frozenset(torch.nonzero(changed_out).flatten().tolist()))
        gate_values.append(rows[changed_out, 0].flatten())
        down_values.append(cols[:, changed_out].flatten())
    assert len(set(redrawn)) == len(redrawn)                            # each expert its own choice
    gate_values, down_values = torch.cat(gate_values), torch.cat(down_values)
    dense_gate = w_in[0::2]
    assert gate_values.std().item() == pytest.approx(dense_gate.std().item(), rel=0.1)
    assert abs(gate_values.mean().item() - dense_gate.mean().item()) < 0.1 * dense_gate.std().item()
    assert down_values.std().item() == pytest.approx(w_out.std().item(), rel=0.1)
    again = moefx.convert(model, num_experts=E, top_k=2, calibration=[batch], method="upcycle",
                          granularity=granularity, drop_rate=rate, seed=5, progress=False)
    other = moefx.convert(model, num_experts=E, top_k=2, calibration=[batch], method="upcycle",
                          granularity=granularity, drop_rate=rate, seed=6, progress=False)
    assert torch.equal(_layers(again)[0].w_in, layer.w_in) and torch.equal(_layers(again)[0].w_out, layer.w_out)
    assert not torch.equal(_layers(other)[0].w_in, layer.w_in)
    assert not torch.equal(_layers(moe)[1].w_in[0], layer.w_in[0])  # layers draw differently too


def test_drop_upcycling_redraws_input_biases_of_dropped_neurons():
    model = _plain_ffn()
    x = torch.randn(8, 16)
    moe = moefx.convert(model, num_experts=2, top_k=1, calibration=[x], method="upcycle", drop_rate=0.5,
                        progress=False)
    layer = _layers(moe)[0]
    for e in range(2):
        changed = (layer.w_in[e] != model[0].weight).any(1)
        assert int(changed.sum()) == 48
        assert torch.equal(layer.b_in[e] != model[0].bias, changed)
        assert torch.equal((layer.w_out[e] != model[2].weight).any(0), changed)
        assert torch.isfinite(layer.b_in[e]).all()


@pytest.mark.parametrize("kwargs,message", [
    (dict(method="split", granularity=2), "granularity and drop_rate shape the copies of method='upcycle'"),
    (dict(method="coactivation", drop_rate=0.5), "granularity and drop_rate shape the copies"),
    (dict(granularity=0), "granularity=0 must be a whole number"),
    (dict(drop_rate=1.5), "drop_rate=1.5 is the share of neurons"),
    (dict(granularity=5), "do not split into granularity=5 equal shards"),
    (dict(granularity=2, top_p=0.5), "dynamic-k (top_p < 1) could keep only some shards"),
])
def test_bad_upcycling_options_name_the_fix(kwargs, message):
    args = dict(num_experts=4, top_k=2, calibration=[torch.randn(2, 16)], method="upcycle", progress=False) | kwargs
    with pytest.raises(ValueError, match=re.escape(message)):
        moefx.convert(_plain_ffn(), **args)
