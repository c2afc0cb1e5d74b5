"""moefx.Recipe: every convert option in one validated object, the same in both call forms, saved and rebuilt."""
import dataclasses
import json

import pytest
import torch

import moefx
from moefx.convert.stages import STAGES
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
