"""moefx.Recipe: every convert option in one validated object, the same in both call forms, saved and rebuilt;
the active fraction (active=) as the alternative to top_k, and the held-out share (holdout=)."""
import dataclasses
import json

import pytest
import torch

import moefx
from moefx.convert.stages import STAGES
from moefx.layer import MoELayer
from moefx.recipe import Recipe
from tests.conftest import PlainFFN


def test_recipe_form_and_keyword_form_convert_alike():
    torch.manual_seed(0)
    dense = PlainFFN().eval()
    calibration = [torch.randn(64, 16) for _ in range(3)]
    recipe = Recipe(num_experts=8, top_k=2, method="coactivation", num_shared=1, router="least_squares", refit=True)
    by_recipe = moefx.convert(dense, calibration, recipe, progress=False)
    by_keywords = moefx.convert(dense, 8, 2, calibration, method="coactivation", num_shared=1,
                                router="least_squares", refit=True, progress=False)
    x = torch.randn(20, 16)
    with torch.no_grad():
        assert torch.equal(by_recipe(x), by_keywords(x))
    assert by_recipe.moefx_recipe == recipe == by_keywords.moefx_recipe
    assert by_recipe.moefx_recipe.to_dict()["router"] == "least_squares"


def test_to_dict_from_dict_round_trips_through_json():
    recipe = Recipe(num_experts=16, top_k=4, method="split", router="distilled", pregate="block", num_zero=2)
    assert Recipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe


@pytest.mark.parametrize("options,message", [
    (dict(top_k=9), "top_k=9 must be between 1 and the number of routed experts"),
    (dict(num_experts=8.0), "num_experts=8.0 must be a whole number (int(8.0))"),
    (dict(method="kmeans"), "method='kmeans' is not one of"),
    (dict(method="upcycle", refit=True), "method='upcycle' keeps whole copies"),
    (dict(pregate="block"), "pregate='block' routes each MoE layer from the input of its block"),
    (dict(num_zero=1), "zero-computation experts (num_zero, num_copy, num_const) in carved layers need"),
    (dict(granularity=2), "granularity and drop_rate shape the copies of method='upcycle'"),
    (dict(importance="taylor"), "importance chooses the neurons of the shared experts"),
    (dict(refit="yes"), "refit='yes' must be True or False"),
])
def test_conflicting_or_mistyped_options_are_named_with_the_fix(options, message):
    with pytest.raises(ValueError, match=__import__("re").escape(message)):
        Recipe(**options)
    with pytest.raises(ValueError, match=__import__("re").escape(message)):  # the keyword form is the same check
        moefx.convert(PlainFFN(), calibration=[torch.randn(4, 16)], progress=False, **options)


def test_unknown_options_and_mixed_forms_are_refused():
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['topk'\]"):
        moefx.convert(PlainFFN(), 8, calibration=[torch.randn(4, 16)], topk=2)
    with pytest.raises(TypeError, match="pass either recipe= or the options"):
        moefx.convert(PlainFFN(), calibration=[torch.randn(4, 16)], recipe=Recipe(), top_k=2)
    with pytest.raises(ValueError, match=r"moefx.json has unknown option\(s\) \['experts'\]"):
        Recipe.from_dict({"experts": 8}, source="moefx.json")


def test_changing_a_recipe_revalidates_it():
    with pytest.raises(ValueError, match="top_k=8 must be between 1"):
        dataclasses.replace(Recipe(num_shared=1), top_k=8)


def test_the_stage_list_names_every_stage_once_and_fits_are_marked():
    names = [stage.name for stage in STAGES]
    assert len(names) == len(set(names))
    assert names.index("trace and find") < names.index("build layers") < names.index("rewrite") < names.index("tune")
    assert {s.name for s in STAGES if s.fits} == {"teacher", "statistics", "importance", "tune", "distill"}


def test_load_rebuilds_from_the_saved_recipe_without_refitting(tmp_path, monkeypatch):
    """A fitted-router, refit, co-activation conversion comes back exactly; loading runs no fitting stage."""
    torch.manual_seed(0)
    dense = PlainFFN().eval()
    calibration = [torch.randn(64, 16) for _ in range(3)]
    moe = moefx.convert(dense, 8, 2, calibration, method="coactivation", router="least_squares", compensate=True,
                        refit=True, progress=False)
    moefx.save_pretrained(moe, str(tmp_path))
    saved = json.loads((tmp_path / "moefx.json").read_text())["recipe"]
    assert Recipe.from_dict(saved) == moe.moefx_recipe
    import moefx.fit.routers as routers
    monkeypatch.setitem(routers.FITTED_ROUTERS, "least_squares", lambda *a, **k: pytest.fail("refitted on load"))
    original = PlainFFN()
    before = {k: v.clone() for k, v in original.state_dict().items()}
    loaded = moefx.load_pretrained(str(tmp_path), model=original)
    x = torch.randn(32, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), moe(x))
    assert all(torch.equal(before[k], v) for k, v in original.state_dict().items())  # the caller's model is untouched


def test_a_corrupted_recipe_file_names_the_file(tmp_path):
    moe = moefx.convert(PlainFFN(), 4, 2, [torch.randn(8, 16)], progress=False)
    moefx.save_pretrained(moe, str(tmp_path))
    (tmp_path / "moefx.json").write_text("{not json")
    with pytest.raises(ValueError, match="moefx.json is not valid JSON"):
        moefx.load_pretrained(str(tmp_path), model=PlainFFN())
    (tmp_path / "moefx.json").write_text("{}")
    with pytest.raises(ValueError, match=r"moefx.json lacks \['recipe'"):
        moefx.load_pretrained(str(tmp_path), model=PlainFFN())


@pytest.mark.parametrize("experts, shared, active, top_k", [(8, 0, 0.25, 2), (32, 0, 0.25, 8), (64, 0, 0.5, 32),
                                                             (8, 1, 0.5, 3), (4, 0, 1.0, 4)])
def test_active_fraction_sets_top_k_counting_the_shared_experts(experts, shared, active, top_k):
    recipe = Recipe(num_experts=experts, num_shared=shared, active=active)
    assert recipe.top_k == top_k and (recipe.num_shared + recipe.top_k) / recipe.num_experts == active
    assert Recipe.from_dict(recipe.to_dict()) == recipe  # the saved recipe (top_k and active) rebuilds


def test_active_fraction_converts_a_model_like_the_matching_top_k():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16)).eval()
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
