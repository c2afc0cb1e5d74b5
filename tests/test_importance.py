"""Taylor neuron importance (Dense2MoE / LLaMA-MoE) and the shared experts it chooses."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import moefx
from moefx.layer import MoELayer
from moefx.fit.importance import taylor_importance


class Regressor(nn.Module):
    """An FFN whose output carries a loss, as a transformers model given labels does."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 32), nn.Linear(32, 8)

    def forward(self, x, target):
        y = self.down(torch.relu(self.up(x)))
        return SimpleNamespace(loss=(y - target).pow(2).mean(), prediction=y)


def test_taylor_importance_is_the_summed_first_order_loss_change():
    torch.manual_seed(0)
    model = Regressor().double()
    batches = [(torch.randn(16, 8, dtype=torch.float64), torch.randn(16, 8, dtype=torch.float64)) for _ in range(3)]
    got = taylor_importance({"ffn": model.down}, batches, lambda b: model(*b))["ffn"]
    want = torch.zeros(32, dtype=torch.float64)
    for x, target in batches:
        h = torch.relu(model.up(x)).detach().requires_grad_(True)
        loss = (model.down(h) - target).pow(2).mean()
        (grad,) = torch.autograd.grad(loss, h)
        want += (grad * h).abs().sum(0)
    assert torch.allclose(got.double(), want, rtol=1e-5)
    assert all(p.grad is None for p in model.parameters())  # the model's gradients are left alone


def _ffn_with_loud_useless_neurons():
    """Neurons 0..7 fire on every token but their output weights are ~0; the rest do the work."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    with torch.no_grad():
        model[0].bias[:8] = 5.0
        model[2].weight[:, :8] *= 1e-3
    return model, [torch.randn(64, 8) for _ in range(4)]


def test_taylor_shared_experts_skip_neurons_that_fire_but_do_not_matter():
    model, calibration = _ffn_with_loud_useless_neurons()
    options = dict(method="coactivation", num_shared=1, router="least_squares", progress=False)
    by_rate = moefx.convert(model, 4, 1, calibration, **options)
    by_taylor = moefx.convert(model, 4, 1, calibration, importance="taylor", **options)
    shared_rows = lambda moe: next(m for m in moe.modules() if isinstance(m, MoELayer)).shared_in.weight  # noqa: E731
    loud = model[0].weight[:8]
    picks = lambda moe: sum(bool((shared_rows(moe) == row).all(1).any()) for row in loud)  # noqa: E731
    assert picks(by_rate) == 8 and picks(by_taylor) == 0
    fresh = torch.randn(128, 8)
    with torch.no_grad():
        ref = model(fresh)
        error = lambda moe: ((moe(fresh) - ref).norm() / ref.norm()).item()  # noqa: E731
        assert error(by_taylor) < error(by_rate)
        exact = moefx.convert(model, 4, 3, calibration, method="coactivation", num_shared=1, importance="taylor",
                              progress=False)
        assert error(exact) < 1e-6


def test_importance_option_errors_name_the_fix():
    model, calibration = _ffn_with_loud_useless_neurons()
    with pytest.raises(ValueError, match="importance='x' is not one of"):
        moefx.convert(model, 4, 1, calibration, importance="x", progress=False)
    with pytest.raises(ValueError, match="set num_shared >= 1"):
        moefx.convert(model, 4, 1, calibration, importance="taylor", progress=False)
