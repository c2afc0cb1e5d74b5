"""Zero-computation experts (MoE++): distillation targets, exactness, and the compute they save."""
import copy
import re

import pytest
import torch
from torch import nn

import moefx
from moefx.layer import MoELayer
from moefx.fit.carve import OFF_LOGIT
from moefx.fit.refit import expert_outputs
from moefx.fit.routers import free_slots, oracle_scores
from tests.conftest import relative_error
from tests.test_routers import _model_and_data


def _layer(model):
    return next(m for m in model.modules() if isinstance(m, MoELayer))


def _carved(model, calibration, **extra):
    """A coactivation-carved layer (8 experts, top-2) with zero-computation rows, before any distillation."""
    layer = _layer(moefx.convert(model, 8, 8, calibration, method="coactivation", router="distilled",
                                 progress=False, **extra))
    layer = copy.deepcopy(layer)
    layer.top_k = 2
    return layer


def _oracle_target(**extra):
    """A carved tiny FFN with ``extra`` zero-computation experts, its calibration rows, the oracle scores and
    the top-2 oracle target over every router output."""
    model, calibration = _model_and_data()
    x = torch.cat(calibration)
    layer = _carved(model, calibration, **extra)
    scores = oracle_scores(layer, x)
    target = torch.zeros(len(x), layer.router.out_features).scatter_(1, scores.topk(2, -1).indices, 1.0)
    return model, x, layer, scores, target


def test_one_zero_expert_takes_the_weakest_slot_where_it_is_smallest_relative_to_the_output():
    model, x, layer, scores, target = _oracle_target(num_zero=1)
    share = free_slots(layer, x, scores, target)
    # independently: the weakest of each token's two oracle experts, for the 1/9 of all slots where it is
    # smallest relative to the token's FFN output (the sum of all carved experts: the dense FFN)
    top2 = scores.topk(2, -1)
    weakest = top2.indices[:, 1]
    with torch.no_grad():
        relative = top2.values[:, 1] / model(x).norm(dim=-1)
    count = round(1 / 9 * len(x) * 2)
    freed = torch.zeros(len(x), dtype=torch.bool)
    freed[relative.argsort()[:count]] = True
    assert share == pytest.approx(count / (2 * len(x)))
    assert torch.equal(target[:, 8].bool(), freed)
    assert torch.equal(target.gather(1, weakest[:, None]).squeeze(1).bool(), ~freed)
    assert torch.equal(target.sum(1), torch.full((len(x),), 2.0))


def test_two_zero_experts_free_a_tokens_slots_weakest_first():
    model, x, layer, scores, target = _oracle_target(num_zero=2)
    share = free_slots(layer, x, scores, target)
    assert share == pytest.approx(round(0.2 * len(x) * 2) / (2 * len(x)))
    both = target[:, 9].bool()
    assert both.any() and not (both & ~target[:, 8].bool()).any()  # the second zero expert only after the first
    assert (target[both, :8].sum(1) == 0).all()                     # a token may free every slot
    assert torch.equal(target.sum(1), torch.full((len(x),), 2.0))


def test_constant_expert_is_the_mean_weakest_contribution_and_copy_is_used_only_where_nearer_than_zero():
    model, x, layer, scores, target = _oracle_target(num_const=1, num_copy=1)
    free_slots(layer, x, scores, target)
    weakest = scores.topk(2, -1).indices[:, 1]
    contribution = expert_outputs(layer, x)[torch.arange(len(x)), weakest]
    assert torch.allclose(layer.const_experts[0], contribution.mean(0), atol=1e-6)
    copied, constant = target[:, 8].bool(), target[:, 9].bool()
    assert constant.any()
    distance_to_x = (contribution - x).norm(dim=-1)
    assert (distance_to_x[copied] <= contribution[copied].norm(dim=-1)).all()


def test_distilled_zero_experts_save_the_share_they_claim_without_a_cliff_in_quality():
    model, calibration = _model_and_data()
    held_out = [torch.randn(512, 16, generator=torch.Generator().manual_seed(9))]
    with torch.no_grad():
        reference = model(held_out[0])
    base = moefx.convert(model, 8, 2, calibration, method="coactivation", router="distilled", progress=False)
    halved = moefx.convert(model, 8, 1, calibration, method="coactivation", router="distilled", progress=False)
    zero = moefx.convert(model, 8, 2, calibration, method="coactivation", router="distilled", num_zero=2,
                         progress=False)
    error = {name: relative_error(m(held_out[0]).detach(), reference)
             for name, m in (("base", base), ("halved", halved), ("zero", zero))}
    summary = moefx.summary(zero, held_out)
    layer = summary.layers[0]
    assert layer.zero_computation == 2 and summary.tokens == 512
    # 2 of 10 experts are zero experts: a balanced share frees 20% of the slots
    assert 0.1 <= layer.saved_slots <= 0.3
    assert layer.experts_per_token == pytest.approx(moefx.evaluate(model, zero, held_out).layers[0].active_experts)
    # freeing a fifth of the slots costs a fraction of what freeing half does
    assert error["zero"] - error["base"] < 0.3 * (error["halved"] - error["base"])
    assert "ran no real expert" in str(summary)


def test_all_real_experts_active_stays_exact_with_every_kind_of_zero_computation_expert():
    model, calibration = _model_and_data()
    fresh = torch.randn(64, 16)
    moe = moefx.convert(model, 8, 8, calibration, method="split", router="distilled", num_zero=2, num_copy=1,
                        num_const=1, progress=False)
    layer = _layer(moe)
    assert layer.router.out_features == 12
    assert (layer.router.bias[8:] == OFF_LOGIT).all() and (layer.router.weight[8:] == 0).all()
    with torch.no_grad():
        assert relative_error(moe(fresh), model(fresh)) <= 1e-5


@pytest.mark.parametrize("top_k", [1, 3])
def test_upcycled_layers_keep_zero_computation_experts_switched_off_and_exact(top_k):
    model, calibration = _model_and_data()
    fresh = torch.randn(64, 16)
    moe = moefx.convert(model, 3, top_k, calibration, method="upcycle", granularity=2, num_zero=1, num_copy=1,
                        num_const=2, progress=False)
    layer = _layer(moe)
    assert layer.router.out_features == 3 * 2 + 4 and layer.const_experts.shape == (2, 16)
    with torch.no_grad():
        assert relative_error(moe(fresh), model(fresh)) <= 1e-5
    assert moefx.summary(moe, [fresh]).layers[0].saved_slots == 0.0


def test_summary_measures_dynamic_k_and_reports_the_static_top_k_without_data():
    model, calibration = _model_and_data()
    moe = moefx.convert(model, 8, 4, calibration, method="split", top_p=0.5, progress=False)
    static = moefx.summary(moe)
    assert static.tokens == 0 and static.layers[0].experts_per_token == 4
    assert "pass data=" in str(static)
    measured = moefx.summary(moe, calibration)
    assert measured.tokens == 512
    assert 1 <= measured.experts_per_token < 4
    assert measured.active_params < static.active_params
    with pytest.raises(ValueError, match="data is empty"):
        moefx.summary(moe, [])


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_zero=1), "need router='least_squares' or 'distilled'"),
    (dict(num_const=1, router="distilled", refit=True), "with copy or constant experts use num_zero alone"),
    (dict(num_copy=-1, router="distilled"), "num_copy=-1 must be a whole number"),
])
def test_bad_zero_computation_options_name_the_fix(kwargs, message):
    model, calibration = _model_and_data()
    with pytest.raises(ValueError, match=re.escape(message)):
        moefx.convert(model, 8, 2, calibration, method="split", progress=False, **kwargs)


def test_zero_experts_in_a_plain_module_keep_the_op_contract():
    """The converted layer runs through the op's argument checks and its zero-computation branch."""
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 16)).eval()
    calibration = [torch.randn(256, 16)]
    moe = moefx.convert(model, 4, 2, calibration, router="distilled", num_zero=1, num_const=1, progress=False)
    out = moe(torch.randn(32, 16))
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    assert _layer(moe).const_experts.grad is not None
