"""moefx.Recipe: the active fraction (active=) as the alternative to top_k, and the held-out share (holdout=)."""
import pytest
import torch
from torch import nn

import moefx
from moefx.layer import MoELayer
from moefx.recipe import Recipe


@pytest.mark.parametrize("experts, shared, active, top_k", [(8, 0, 0.25, 2), (32, 0, 0.25, 8), (64, 0, 0.5, 32),
                                                             (8, 1, 0.5, 3), (4, 0, 1.0, 4)])
def test_active_fraction_sets_top_k_counting_the_shared_experts(experts, shared, active, top_k):
    recipe = Recipe(num_experts=experts, num_shared=shared, active=active)
    assert recipe.top_k == top_k and (recipe.num_shared + recipe.top_k) / recipe.num_experts == active
    assert Recipe.from_dict(recipe.to_dict()) == recipe  # the saved recipe (top_k and active) rebuilds


def test_active_fraction_converts_a_model_like_the_matching_top_k():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16)).eval()
    data = [torch.randn(32, 16)]
    moe = moefx.convert(model, 16, None, data, active=0.25, method="split", progress=False)
    layer = next(m for m in moe.modules() if isinstance(m, MoELayer))
    assert layer.top_k == 4 and layer.num_experts == 16
    x = torch.randn(8, 16)
    with torch.no_grad():
        assert torch.equal(moe(x), moefx.convert(model, 16, 4, data, method="split", progress=False)(x))


def test_an_active_fraction_that_is_no_whole_number_of_experts_lists_the_nearest_choices():
    with pytest.raises(ValueError, match=r"active=0.3 is not a whole number of experts out of num_experts=8.*"
                                         r"active=0.25 \(top_k=2\), active=0.375 \(top_k=3\)"):
        Recipe(num_experts=8, active=0.3)
    with pytest.raises(ValueError, match=r"num_shared=2 always active.*active=0.375 \(top_k=1\)"):
        Recipe(num_experts=8, num_shared=2, active=0.25)
    with pytest.raises(ValueError, match="means top_k=2 .* but top_k=3 was given; pass only one"):
        Recipe(num_experts=8, top_k=3, active=0.25)
    with pytest.raises(ValueError, match=r"pick it in \(0, 1\]"):
        Recipe(active=0.0)


def test_top_k_defaults_to_two_and_holdout_is_checked():
    assert Recipe().top_k == 2 and Recipe(num_experts=4).top_k == 2
    with pytest.raises(ValueError, match=r"holdout=1.0 .* pick it in \[0, 1\)"):
        Recipe(holdout=1.0)
    with pytest.raises(ValueError, match=r"top_k=2.0 must be a whole number"):
        Recipe(top_k=2.0)
