"""Router-weighted carving (Recipe.gating="softmax" | "sigmoid", renormalize, biases=False): exact with every routed
expert active, refit under the real gate values, no bias terms when asked, and a recipe that round-trips."""
import pytest
import torch
from torch import nn

import moefx
from moefx.checkpoint import load_pretrained, save_pretrained
from moefx.fit.refit import refit
from moefx.layer import MoELayer
from moefx.recipe import Recipe

FITTED = dict(router="least_squares", refit=True)
GATINGS = [("softmax", False), ("softmax", True), ("sigmoid", False), ("sigmoid", True)]


class SwiGLU(nn.Module):
    """Two bias-free gated FFNs with a norm between them (Llama's MLP, twice)."""

    def __init__(self, hidden=16, width=64):
        super().__init__()
        self.gate1, self.up1, self.down1 = (nn.Linear(hidden, width, bias=False), nn.Linear(hidden, width, bias=False),
                                            nn.Linear(width, hidden, bias=False))
        self.norm = nn.LayerNorm(hidden)
        self.gate2, self.up2, self.down2 = (nn.Linear(hidden, width, bias=False), nn.Linear(hidden, width, bias=False),
                                            nn.Linear(width, hidden, bias=False))

    def forward(self, x):
        x = self.norm(x + self.down1(nn.functional.silu(self.gate1(x)) * self.up1(x)))
        return x + self.down2(nn.functional.silu(self.gate2(x)) * self.up2(x))


@pytest.fixture
def model_and_data():
    torch.manual_seed(0)
    return SwiGLU().eval(), [torch.randn(128, 16) for _ in range(3)]


def layers(moe) -> list[MoELayer]:
    return [m for m in moe.modules() if isinstance(m, MoELayer)]


@pytest.mark.parametrize("gating, renormalize", GATINGS)
@pytest.mark.parametrize("num_shared", [0, 1])
def test_exact_with_every_routed_expert_active(model_and_data, gating, renormalize, num_shared):
    """A zero router gives every routed expert the same gate (1/E for softmax or renormalised gates, 1/2 for
    sigmoid) and the output weights are divided by it: the dense FFN (E = 4, a power of two: exact)."""
    model, data = model_and_data
    moe = moefx.convert(model, 4, 4 - num_shared, data, method="split", num_shared=num_shared, gating=gating,
                        renormalize=renormalize, progress=False, **FITTED)
    x = torch.randn(64, 16)
    with torch.no_grad():
        want, got = model(x), moe(x)
    assert float((got - want).norm() / want.norm()) <= 1e-6
    assert all(layer.scoring == gating and layer.renormalize == renormalize for layer in layers(moe))


@pytest.mark.parametrize("gating, renormalize", GATINGS)
def test_refit_models_the_layer_with_its_real_gate_values(model_and_data, gating, renormalize):
    """The refit's closed form is linear in W_out whatever the gates: the error it reports for its own solution
    is the error of the layer as the op runs it, with gates strictly between 0 and 1."""
    model, data = model_and_data
    moe = moefx.convert(model, 4, 2, data, method="split", gating=gating, renormalize=renormalize, biases=False,
                        progress=False, **FITTED)
    layer = layers(moe)[0]
    x = torch.randn(256, 16)
    with torch.no_grad():
        target = model.down1(nn.functional.silu(model.gate1(x)) * model.up1(x))
        gates = layer.expert_gates(x)
        chosen = gates[gates > 0]
        assert 0 < chosen.min() and chosen.max() < 1 and chosen.std() > 1e-4
        if renormalize:
            assert torch.allclose(gates.sum(1), torch.ones(len(x)))
        reported = refit(layer, x, target, biases=False).fitted  # per-token relative error
        actual = float(((layer(x) - target).norm(dim=1) / target.norm(dim=1)).pow(2).mean().sqrt())
    assert reported == pytest.approx(actual, rel=1e-4)


def test_without_biases_the_layers_have_none_and_still_fit(model_and_data):
    model, data = model_and_data
    options = dict(method="split", gating="softmax", renormalize=True, refit=True, progress=False)
    for router in ("least_squares", "distilled"):
        moe = moefx.convert(model, 4, 2, data, router=router, biases=False, **options)
        for layer in layers(moe):
            assert layer.router.bias is None and layer.b_out is None and layer.bias is None and layer.b_in is None
    with_biases = moefx.convert(model, 4, 2, data, router="least_squares", **options)
    assert layers(with_biases)[0].b_out is not None and layers(with_biases)[0].router.bias is not None
    x = torch.cat(data)
    centroid = moefx.convert(model, 4, 2, data, method="split", progress=False)
    with torch.no_grad():
        want = model(x)
        assert float((moe(x) - want).norm()) < float((centroid(x) - want).norm())


def test_router_weighted_recipe_round_trips(tmp_path, model_and_data):
    model, data = model_and_data
    moe = moefx.convert(model, 4, 2, data, method="split", gating="sigmoid", renormalize=True, biases=False,
                        progress=False, **FITTED)
    save_pretrained(moe, str(tmp_path))
    loaded = load_pretrained(str(tmp_path), model=SwiGLU())
    x = torch.randn(32, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), moe(x))


@pytest.mark.parametrize("options, message", [
    (dict(gating="tanh"), "gating='tanh' is not one of"),
    (dict(renormalize=True), "unit gates are 1 each: set gating='softmax' or 'sigmoid'"),
    (dict(gating="softmax"), "pass both, or gating='unit'"),
    (dict(gating="softmax", router="least_squares"), "pass both, or gating='unit'"),
    (dict(gating="softmax", method="upcycle"), "always weights its copies by renormalised softmax"),
    (dict(biases=False, compensate=True, router="least_squares"), "compensate is an expert-output bias"),
])
def test_bad_gating_options_name_the_fix(options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Recipe(**options)
