"""moefx.convert on real architectures: FFNs found by pattern, exact at all experts active."""
from __future__ import annotations

import copy
import math

import pytest
import torch

import moefx
from moefx.layer import MoELayer
from tests.conftest import main_output, relative_error

METHODS = [("split", 0), ("coactivation", 1), ("upcycle", 0)]


def _run(model, inputs):
    with torch.no_grad():
        return main_output(model(**inputs))


@pytest.mark.parametrize("method,num_shared", METHODS, ids=[f"{m}-shared{s}" for m, s in METHODS])
def test_exact_with_all_experts_active_on_every_architecture(architecture, method, num_shared):
    name, model, make_inputs, num_ffns, activation = architecture
    g = torch.Generator().manual_seed(1)
    calibration = [make_inputs(g) for _ in range(2)]
    held_out = make_inputs(g)
    reference = _run(model, held_out)
    moe = moefx.convert(model, num_experts=4, top_k=4 - num_shared, calibration=calibration, method=method,
                        num_shared=num_shared, progress=False)
    layers = [m for m in moe.modules() if isinstance(m, MoELayer)]
    assert len(layers) == num_ffns, moefx.summary(moe)
    assert {layer.activation for layer in layers} == {activation}
    assert relative_error(_run(moe, held_out), reference) <= 1e-5


def test_fewer_experts_active_runs_and_summary_counts_them(architecture):
    name, model, make_inputs, num_ffns, _ = architecture
    g = torch.Generator().manual_seed(2)
    moe = moefx.convert(model, num_experts=4, top_k=1, calibration=[make_inputs(g)], num_shared=1,
                        method="coactivation", progress=False)
    out = _run(moe, make_inputs(g))
    assert torch.isfinite(out).all()
    summary = moefx.summary(moe)
    assert len(summary.layers) == num_ffns
    # 1 routed + 1 shared expert of 4 equal experts: half the FFN's neurons
    assert summary.active_fraction == pytest.approx(0.5)
    layer = summary.layers[0]
    assert layer.active_params < layer.total_params


def test_gated_and_plain_ffns_with_and_without_bias_in_plain_modules():
    class GLU(torch.nn.Module):
        def __init__(self, bias):
            super().__init__()
            self.gate, self.up = torch.nn.Linear(16, 32, bias=bias), torch.nn.Linear(16, 32, bias=bias)
            self.down = torch.nn.Linear(32, 16, bias=bias)

        def forward(self, x):
            return x + self.down(torch.nn.functional.gelu(self.gate(x)) * self.up(x))

    for bias in (True, False):
        model = torch.nn.Sequential(torch.nn.Linear(16, 64, bias=bias), torch.nn.ReLU(), torch.nn.Dropout(0.1),
                                    torch.nn.Linear(64, 16, bias=bias), GLU(bias))
        x = torch.randn(5, 16)
        moe = moefx.convert(model, num_experts=8, top_k=8, calibration=[x], progress=False)
        found = [m for m in moe.modules() if isinstance(m, MoELayer)]
        assert sorted((m.activation, m.gated) for m in found) == [("gelu", True), ("relu", False)]
        assert relative_error(moe(x), model.eval()(x)) <= 1e-5


def test_convert_copies_unless_inplace():
    from transformers import LlamaConfig, LlamaForCausalLM
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=50))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = {"input_ids": torch.randint(0, 50, (1, 6))}
    moe = moefx.convert(model, num_experts=4, top_k=2, calibration=[batch], progress=False)
    assert moe is not model
    assert type(model.model.layers[0].mlp).__name__ == "LlamaMLP"
    assert before.keys() == model.state_dict().keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training  # the caller's mode is untouched
    same = moefx.convert(model, num_experts=4, top_k=2, calibration=[batch], inplace=True, progress=False)
    assert same is model and isinstance(model.model.layers[0].mlp.moe, MoELayer)


def test_converted_llm_generates_and_keeps_its_class():
    from transformers import LlamaConfig, LlamaForCausalLM
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=50)).eval()
    batch = {"input_ids": torch.randint(0, 50, (1, 6))}
    moe = moefx.convert(model, num_experts=4, top_k=4, calibration=[batch], progress=False)
    assert isinstance(moe, LlamaForCausalLM)
    want = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert torch.equal(moe.generate(**batch, max_new_tokens=5, do_sample=False), want)
    # traced pieces keep their argument flattening through deepcopy (GraphModule drops forward hooks)
    assert torch.equal(copy.deepcopy(moe).generate(**batch, max_new_tokens=5, do_sample=False), want)


def test_backward_reaches_experts_and_matches_dense_gradients():
    model = torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.GELU(), torch.nn.Linear(24, 12)).double()
    x = torch.randn(6, 12, dtype=torch.float64)
    moe = moefx.convert(model, num_experts=4, top_k=4, calibration=[x], progress=False)
    layer = next(m for m in moe.modules() if isinstance(m, MoELayer))
    moe(x).square().sum().backward()
    model(x).square().sum().backward()
    dense_grad = model[0].weight.grad
    assert layer.w_in.grad is not None
    # each expert's w_in rows are a slice of the dense W_in: their gradients are the same slices
    for e in range(4):
        rows = torch.stack([torch.nonzero((model[0].weight == r).all(1)).flatten()[0] for r in layer.w_in[e]])
        assert torch.allclose(layer.w_in.grad[e], dense_grad[rows], atol=1e-10)


def test_training_gives_unit_gated_routers_a_straight_through_gradient():
    model = torch.nn.Sequential(torch.nn.Linear(12, 48), torch.nn.GELU(), torch.nn.Linear(48, 12)).double()
    x = torch.randn(40, 12, dtype=torch.float64)
    moe = moefx.convert(model, num_experts=4, top_k=2, calibration=[x], progress=False)
    layer = next(m for m in moe.modules() if isinstance(m, MoELayer))
    moe.eval()
    with torch.no_grad():
        want = moe(x)
    moe.train()
    out = moe(x)
    assert torch.equal(out, want)  # the value is the unit-gated output
    out.square().sum().backward()
    # what a sigmoid gate (same choice: sigmoid is monotone) would pass each chosen expert's logit
    router = layer.router.weight.grad
    assert router is not None and router.abs().sum() > 0
    y_grad = 2 * out.detach()
    logits = x @ layer.router.weight.detach().T + layer.router.bias.detach()
    chosen = logits.topk(2, -1).indices
    expert_out = torch.stack([torch.nn.functional.gelu(x @ layer.w_in[e].detach().T + layer.b_in[e].detach())
                              @ layer.w_out[e].detach().T for e in range(4)], 1)
    d_logit = torch.zeros_like(logits)
    slope = torch.sigmoid(logits) * (1 - torch.sigmoid(logits))
    for slot in range(2):
        e = chosen[:, slot]
        picked = expert_out[torch.arange(len(x)), e]
        d_logit[torch.arange(len(x)), e] = slope[torch.arange(len(x)), e] * (picked * y_grad).sum(-1)
    assert torch.allclose(router, d_logit.T @ x, atol=1e-8)


@pytest.mark.parametrize("kwargs,message", [
    (dict(top_k=9), "top_k=9 must be between 1"),
    (dict(num_experts=5, top_k=2), "do not split into num_experts=5"),
    (dict(method="kmeans"), "method='kmeans' is not one of"),
    (dict(num_shared=8), "num_shared=8 must be between"),
    (dict(num_shared=1, top_k=8), "top_k=8 must be between 1 and the number of routed experts (7"),
    (dict(method="upcycle", num_shared=1), "num_shared applies to the carving methods"),
])
def test_bad_arguments_name_the_problem(kwargs, message):
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    args = dict(num_experts=8, top_k=2, calibration=[torch.randn(2, 8)], progress=False) | kwargs
    with pytest.raises(ValueError, match=_literal(message)):
        moefx.convert(model, **args)


def _literal(text: str) -> str:
    import re
    return re.escape(text)


def test_model_without_ffn_says_what_it_saw():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 8))
    with pytest.raises(ValueError, match=r"found no dense FFN .* saw 2 linear layer\(s\) \(0, 2\)"):
        moefx.convert(model, calibration=[torch.randn(2, 8)], progress=False)


def test_empty_calibration_and_rejected_batch_and_nan_activations():
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    with pytest.raises(ValueError, match="calibration is empty.*computes neuron statistics"):
        moefx.convert(model, calibration=[], method="coactivation", progress=False)
    with pytest.raises(ValueError, match="calibration is empty"):
        moefx.convert(model, calibration=None, progress=False)
    with pytest.raises(ValueError, match="rejected calibration batch 1"):
        moefx.convert(model, calibration=[torch.randn(2, 8), torch.randn(2, 5)], method="coactivation",
                      progress=False)
    bad = torch.randn(2, 8)
    bad[0, 0] = math.nan
    with pytest.raises(ValueError, match=r"activations of 2 \(calibration batch 1\) contain NaN"):
        moefx.convert(model, calibration=[torch.randn(2, 8), bad], method="coactivation", progress=False)


def test_unconvertible_shapes_are_reported_by_name():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ffn = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.SiLU(), torch.nn.Linear(32, 8))
            self.up, self.act, self.down = torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8)
            self.a, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.ffn(x) + self.down(self.act(self.up(x))) + self.b(h).sum(-1, keepdim=True)

    moe = moefx.convert(Block(), num_experts=4, top_k=2, calibration=[torch.randn(3, 8)], progress=False)
    report = moe.moefx_report
    assert report.converted == ["ffn.2 -> ffn.moe"]
    assert any(s.startswith("b: widths do not chain") for s in report.skipped)


def test_calibration_passed_as_one_batch_names_the_fix():
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    with pytest.raises(ValueError, match=_literal("calibration is one dict (a single batch)") + ".*calibration=\\[batch\\]"):
        moefx.convert(model, calibration={"input": torch.randn(2, 8)}, progress=False)
    with pytest.raises(ValueError, match=_literal("calibration is one tensor of shape (2, 8)") + ".*calibration=\\[x\\]"):
        moefx.convert(model, calibration=torch.randn(2, 8), progress=False)


def test_calibration_batches_are_not_changed_by_a_model_that_adds_keys():
    class AddsKeys(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ffn = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))

        def forward(self, features: dict):
            features["embedding"] = self.ffn(features["x"])  # SentenceTransformer style
            return features["embedding"]

    batch = ({"x": torch.randn(3, 8)},)
    moefx.convert(AddsKeys(), num_experts=4, top_k=4, calibration=[batch], progress=False)
    assert list(batch[0]) == ["x"]
    moefx.convert(AddsKeys(), num_experts=4, top_k=4, calibration=[batch], progress=False)  # the same batches again


def test_bad_models_and_widths_name_the_problem_and_the_fix():
    meta = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).to("meta")
    with pytest.raises(ValueError, match="0.weight is on the meta device.*load the weights first"):
        moefx.convert(meta, calibration=[torch.randn(2, 8)], progress=False)
    prime = torch.nn.Sequential(torch.nn.Linear(8, 131), torch.nn.ReLU(), torch.nn.Linear(131, 8))
    with pytest.raises(ValueError, match="131 has no divisor from 2 to 128.*method='upcycle'"):
        moefx.convert(prime, num_experts=4, top_k=2, calibration=[torch.randn(2, 8)], progress=False)
    thirteen = torch.nn.Sequential(torch.nn.Linear(8, 13), torch.nn.ReLU(), torch.nn.Linear(13, 8))
    with pytest.raises(ValueError, match=_literal("pick num_experts from [13]")):  # 13 experts of one neuron work
        moefx.convert(thirteen, num_experts=4, top_k=2, calibration=[torch.randn(2, 8)], progress=False)
    broken = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    with torch.no_grad():
        broken[2].weight[3, 5] = math.nan
    with pytest.raises(ValueError, match=r"2.weight holds NaN or inf.*load the weights again"):
        moefx.convert(broken, num_experts=4, top_k=2, calibration=[torch.randn(2, 8)], progress=False)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    with pytest.raises((TypeError, ValueError), match="num_experts"):
        moefx.convert(model, num_experts=4.0, top_k=2, calibration=[torch.randn(2, 8)], progress=False)
    nan = torch.full((2, 8), math.nan)
    with pytest.raises(ValueError, match="output on calibration batch 0 holds NaN or inf"):
        moefx.convert(model, num_experts=4, top_k=2, calibration=[nan], progress=False)


def test_activations_are_told_apart_far_outside_where_they_differ():
    class Act(torch.nn.Module):
        def __init__(self, fn):
            super().__init__()
            self.fn, self.up, self.down = fn, torch.nn.Linear(8, 32), torch.nn.Linear(32, 8)

        def forward(self, x):
            return self.down(self.fn(self.up(x)))

    class QuickGELU(torch.nn.Module):  # CLIP's
        def forward(self, h):
            return h * torch.sigmoid(1.702 * h)

    class ReLUSquared(torch.nn.Module):  # Nemotron's
        def forward(self, h):
            return torch.relu(h) ** 2

    x = torch.randn(4, 8)
    for fn, name in ((QuickGELU(), "quick_gelu"), (ReLUSquared(), "relu2")):
        model = Act(fn).eval()
        moe = moefx.convert(model, num_experts=4, top_k=4, calibration=[x], progress=False)
        assert next(m for m in moe.modules() if isinstance(m, MoELayer)).activation == name
        assert relative_error(moe(x), model(x)) <= 1e-5
    with pytest.raises(ValueError, match="found no dense FFN"):  # a clamp is no ReLU, even if it agrees on [-8, 8]
        moefx.convert(Act(lambda h: torch.clamp(h, 0, 10)), num_experts=4, top_k=4, calibration=[x], progress=False)
    with pytest.raises(ValueError, match="found no dense FFN"):  # nor one that clips far beyond 1e4 (fp16's range)
        moefx.convert(Act(lambda h: torch.clamp(h, 0, 6e4)), num_experts=4, top_k=4, calibration=[x], progress=False)


def test_untraceable_modules_are_reported_only_when_they_hold_an_ffn():
    class Opaque(torch.nn.Module):
        def __init__(self, ffn: bool):
            super().__init__()
            self.ffn = ffn
            self.a, self.b = (torch.nn.Linear(8, 32), torch.nn.Linear(32, 8)) if ffn else (torch.nn.Linear(8, 8),
                                                                                            torch.nn.Linear(8, 8))

        def forward(self, x):
            steps = int(x.abs().sum() > 0) + 1  # Python on a tensor's value: the tracer cannot follow it
            return (self.b(torch.relu(self.a(x))) if self.ffn else self.b(self.a(x))) * steps

    model = torch.nn.Sequential(Opaque(False), Opaque(True),
                                torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)))
    moe = moefx.convert(model, num_experts=4, top_k=4, calibration=[torch.randn(3, 8)], progress=False)
    report = moe.moefx_report
    assert report.converted == ["2.2 -> 2.moe"]
    assert len(report.skipped) == 1 and report.skipped[0].startswith("1.b: an FFN (1.a -> relu -> b) inside 1 (Opaque), "
                                                                      "which does not trace"), report.skipped


def test_every_ffn_left_dense_is_named_with_the_reason_and_a_gate_is_not_taken_for_an_ffn():
    """Traced or inside a module that does not trace: an FFN of an activation moefx does not have (tanh, a sigmoid
    gate) is named in the report; a sigmoid gate whose small values every activation fits is not reported as an
    FFN of one of them."""
    class Block(torch.nn.Module):
        def __init__(self, fn, opaque=False, gated=False, std=None):
            super().__init__()
            self.fn, self.opaque, self.gated = fn, opaque, gated
            self.gate, self.up, self.down = torch.nn.Linear(8, 32), torch.nn.Linear(8, 32), torch.nn.Linear(32, 8)
            if std is not None:
                for linear in (self.gate, self.up):
                    torch.nn.init.normal_(linear.weight, std=std)
                    torch.nn.init.zeros_(linear.bias)

        def forward(self, x):
            steps = int(x.abs().sum() > 0) + 1 if self.opaque else 1  # the tracer cannot follow it
            h = self.fn(self.gate(x)) * self.up(x) if self.gated else self.fn(self.up(x))
            return x + self.down(h) * steps

    torch.manual_seed(0)
    model = torch.nn.Sequential(Block(torch.tanh), Block(torch.tanh, opaque=True), Block(torch.relu),
                                Block(torch.sigmoid, gated=True),
                                Block(lambda g: torch.sigmoid(g) - 0.5, opaque=True, gated=True, std=1e-3)).eval()
    moe = moefx.convert(model, num_experts=4, top_k=4, calibration=[torch.randn(3, 8)], progress=False)
    report = moe.moefx_report
    assert report.converted == ["2.down -> 2.moe"]
    skipped = dict(s.split(": ", 1) for s in report.skipped)
    assert sorted(skipped) == ["0.down", "1.down", "3.down", "4.down"], report.skipped
    assert all("FFN's shape" in skipped[n] and "matches no FFN pattern" in skipped[n] for n in ("0.down", "3.down"))
    assert "inside 1 (Block), which does not trace" in skipped["1.down"]
    assert "inside 4 (Block)" in skipped["4.down"] and "no one activation of moefx's" in skipped["4.down"]
