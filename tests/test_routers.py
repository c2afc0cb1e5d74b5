"""Routers, skipped-expert compensation and the closed-form refit of carved MoE layers."""
import copy

import pytest
import torch
from torch import nn

import moefx
from moefx.layer import MoELayer
from moefx.fit.refit import REFIT_RIDGES, compensate, dense_output, expert_hidden, refit
from moefx.fit.routers import ROUTER_RIDGES, distill_router, least_squares_router, oracle_scores
from moefx.fit.validate import held_out_split


class FFN(nn.Module):
    def __init__(self, hidden=16, width=64):
        super().__init__()
        self.up, self.down = nn.Linear(hidden, width), nn.Linear(width, hidden)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


def _model_and_data(seed=0):
    torch.manual_seed(seed)
    model = FFN().eval()
    with torch.no_grad():  # neurons of unequal weight, as in trained FFNs: pre-activation alone misleads
        model.down.weight.mul_(torch.randn(64).mul(1.5).exp())
    calibration = [torch.randn(128, 16) for _ in range(4)]
    return model, calibration


def _layer(model):
    return next(m for m in model.modules() if isinstance(m, MoELayer))


def _recall(layer, x):
    oracle = oracle_scores(layer, x).topk(layer.top_k, -1).indices
    return (layer.expert_gates(x) != 0).gather(1, oracle).float().mean().item()


def test_distilled_router_recalls_the_oracle_better_than_the_centroid_router():
    model, calibration = _model_and_data()
    carved = moefx.convert(model, 8, 2, calibration, method="coactivation", progress=False)
    layer = copy.deepcopy(_layer(carved))
    x = torch.cat(calibration)
    before = _recall(layer, x)
    after = distill_router(layer, x).fitted
    assert after == pytest.approx(_recall(layer, x), abs=1e-6)
    assert after > before + 0.2 and after > 0.75


def test_least_squares_router_is_the_ridge_regression_of_the_oracle_choice():
    model, calibration = _model_and_data()
    layer = copy.deepcopy(_layer(moefx.convert(model, 8, 2, calibration, method="coactivation", progress=False)))
    x = torch.cat(calibration)
    before = _recall(layer, x)
    recall = least_squares_router(layer, x, ridge=1e-9).fitted
    # independent solve: 0/1 oracle membership regressed on [x, 1]
    target = torch.zeros(len(x), 8).scatter_(1, oracle_scores(layer, x).topk(2, -1).indices, 1.0).double()
    features = torch.cat([x, torch.ones(len(x), 1)], 1).double()
    solution = torch.linalg.lstsq(features, target, driver="gelsd").solution
    assert torch.allclose(layer.router.weight.detach().double(), solution[:-1].T, atol=1e-5)
    assert torch.allclose(layer.router.bias.detach().double(), solution[-1], atol=1e-5)
    assert recall == pytest.approx(_recall(layer, x), abs=1e-6)
    assert recall > before + 0.2


def test_compensation_subtracts_the_mean_output_of_skipping_tokens_and_stays_exact_with_all_experts():
    model, calibration = _model_and_data()
    layer = copy.deepcopy(_layer(moefx.convert(model, 8, 2, calibration, method="split", progress=False)))
    x = torch.cat(calibration)
    skipped = layer.expert_gates(x) == 0
    outputs = torch.einsum("tef,ehf->teh", expert_hidden(layer, x), layer.w_out.detach())
    want = torch.stack([outputs[skipped[:, e], e].mean(0) for e in range(8)])
    compensate(layer, x)
    assert torch.allclose(-layer.b_out.detach(), want, atol=1e-5)
    layer.top_k = 8
    fresh = torch.randn(64, 16)
    with torch.no_grad():
        assert torch.allclose(layer(fresh), model(fresh), atol=1e-5)


def test_refit_solves_the_least_squares_problem_of_the_output_weights():
    model, calibration = _model_and_data()
    layer = _layer(moefx.convert(model, 8, 2, calibration, method="split", progress=False))
    x = torch.cat(calibration)
    target = dense_output(layer, x)
    with torch.no_grad():
        assert torch.allclose(target, model(x), atol=1e-5)
    error = refit(layer, x, target, ridge=1e-9).fitted
    # independent solution: y = sum_e g_e (h_e W_e^T + b_e) + b, linear in (W_e, b_e, b)
    gates = layer.expert_gates(x)
    # (the constant column is the sum of the gates over top_k, so it adds nothing to their span)
    features = torch.cat([(expert_hidden(layer, x) * gates[..., None]).reshape(len(x), -1), gates], 1).double()
    weight = 1 / target.double().norm(dim=1, keepdim=True)  # each token's error relative to its target
    solution = torch.linalg.lstsq(features * weight, target.double() * weight, driver="gelsd").solution
    per_token = lambda y: ((y - target).norm(dim=1) / target.norm(dim=1)).pow(2).mean().sqrt().item()  # noqa: E731
    best = per_token(features @ solution)
    with torch.no_grad():
        got = layer(x)
    assert error == pytest.approx(best, rel=1e-3)
    assert per_token(got) == pytest.approx(best, rel=1e-3)
    unweighted = torch.linalg.lstsq(features, target.double(), driver="gelsd").solution
    assert per_token(features @ solution) < per_token(features @ unweighted)


def test_tuned_conversion_beats_the_plain_one_and_is_exact_with_all_experts():
    model, calibration = _model_and_data()
    fresh = torch.randn(256, 16)
    with torch.no_grad():
        ref = model(fresh)
        plain = moefx.convert(model, 8, 2, calibration, method="coactivation", progress=False)(fresh)
        tuned = moefx.convert(model, 8, 2, calibration, method="coactivation", router="distilled", refit=True,
                              progress=False)(fresh)
        exact = moefx.convert(model, 8, 8, calibration, method="coactivation", router="distilled", refit=True,
                              progress=False)(fresh)
    error = lambda y: ((y - ref).norm() / ref.norm()).item()  # noqa: E731
    assert error(tuned) < 0.8 * error(plain)
    assert error(exact) < 1e-5


def test_representative_router_scores_each_expert_by_one_of_its_neurons():
    model, calibration = _model_and_data()
    layer = _layer(moefx.convert(model, 8, 2, calibration, method="coactivation", router="representative",
                                 progress=False))
    rows = model.up.weight.detach()
    for e in range(8):
        expert_rows = layer.w_in[e].detach()
        match = (expert_rows - layer.router.weight[e].detach()).abs().amax(1).min()
        assert match == 0
        assert (rows - layer.router.weight[e].detach()).abs().amax(1).min() == 0


def test_bad_router_options_name_the_fix():
    model, calibration = _model_and_data()
    with pytest.raises(ValueError, match="router='x' is not one of"):
        moefx.convert(model, 8, 2, calibration, router="x", progress=False)
    with pytest.raises(ValueError, match="compensate needs router='least_squares' or 'distilled'"):
        moefx.convert(model, 8, 2, calibration, compensate=True, progress=False)
    with pytest.raises(ValueError, match="method='upcycle'"):
        moefx.convert(model, 8, 2, calibration, method="upcycle", router="distilled", progress=False)


def _sentences(count=24, length=16, seed=0):
    """[count * length, 16] rows of ``count`` sequences whose tokens share a per-sequence offset (the way a
    sentence's tokens share its context), and their sequence ids."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(count, 1, 16, generator=g) + 0.5 * torch.randn(count, length, 16, generator=g)).reshape(-1, 16)
    return x, torch.arange(count).repeat_interleave(length)


def test_held_out_split_takes_whole_sequences():
    _, ids = _sentences()
    held = held_out_split(ids, 0.25, seed=3)
    assert held.sum() == 6 * 16
    for sequence in ids.unique():
        assert held[ids == sequence].all() or not held[ids == sequence].any()
    assert held_out_split(ids, 0.0, 0) is None and held_out_split(torch.zeros(5, dtype=torch.long), 0.5, 0) is None
    assert not torch.equal(held, held_out_split(ids, 0.25, seed=4))


def test_least_squares_router_picks_the_ridge_of_best_held_out_recall_then_solves_on_all_rows():
    model, _ = _model_and_data()
    x, ids = _sentences()
    carved = copy.deepcopy(_layer(moefx.convert(model, 8, 2, [x], method="coactivation", progress=False)))
    held = held_out_split(ids, 0.25, seed=0)
    fit = least_squares_router(copy.deepcopy(carved), x, held_out=held)
    # each grid entry is the held-out recall of an independent fit on the other rows
    for ridge in ROUTER_RIDGES:
        alone = copy.deepcopy(carved)
        least_squares_router(alone, x[~held], ridge=ridge)
        assert fit.grid[ridge] == pytest.approx(_recall(alone, x[held]), abs=1e-6)
    assert fit.held_out == max(fit.grid.values()) == fit.grid[fit.ridge]
    # and the layer keeps the fit on all rows at that ridge
    chosen, on_all = copy.deepcopy(carved), copy.deepcopy(carved)
    fit = least_squares_router(chosen, x, held_out=held)
    assert fit.fitted == least_squares_router(on_all, x, ridge=fit.ridge).fitted
    assert torch.equal(chosen.router.weight, on_all.router.weight)


def test_refit_picks_the_ridge_of_least_held_out_error_then_solves_on_all_rows():
    model, _ = _model_and_data()
    x, ids = _sentences()
    carved = _layer(moefx.convert(model, 8, 2, [x], method="split", progress=False))
    target = dense_output(carved, x)
    held = held_out_split(ids, 0.25, seed=0)
    chosen = copy.deepcopy(carved)
    fit = refit(chosen, x, target, held_out=held)
    per_token = lambda y, t: ((y - t).norm(dim=1) / t.norm(dim=1)).pow(2).mean().sqrt().item()  # noqa: E731
    for ridge in REFIT_RIDGES:
        alone = copy.deepcopy(carved)
        refit(alone, x[~held], target[~held], ridge=ridge)
        with torch.no_grad():
            assert fit.grid[ridge] == pytest.approx(per_token(alone(x[held]), target[held]), rel=1e-3)
    assert fit.held_out == min(fit.grid.values()) == fit.grid[fit.ridge]
    on_all = copy.deepcopy(carved)
    assert fit.fitted == pytest.approx(refit(on_all, x, target, ridge=fit.ridge).fitted, rel=1e-6)
    assert torch.allclose(chosen.w_out, on_all.w_out, atol=1e-6)


def test_conversion_report_shows_each_layers_chosen_ridges_and_held_out_scores():
    model, _ = _model_and_data()
    x, _ = _sentences()
    sentences = [x.reshape(24, 16, 16)[i:i + 8] for i in range(0, 24, 8)]  # 3 batches of 8 sentences
    moe = moefx.convert(model, 8, 2, sentences, method="coactivation", router="least_squares", refit=True,
                        progress=False)
    fits = moe.moefx_report.fits
    assert len(fits) == 1 and fits[0].rows == 24 * 16 and fits[0].held_out_sequences == round(0.2 * 24)
    assert fits[0].router.ridge in ROUTER_RIDGES and fits[0].refit.ridge in REFIT_RIDGES
    assert 0 < fits[0].router.held_out <= 1 and fits[0].refit.held_out > 0
    text = str(moe.moefx_report)
    assert f"ridge {fits[0].router.ridge:g}" in text and f"held-out recall {fits[0].router.held_out:.4f}" in text
    fixed = moefx.convert(model, 8, 2, sentences, method="coactivation", router="least_squares", refit=True,
                          holdout=0.0, progress=False).moefx_report.fits[0]
    assert fixed.held_out_sequences == 0 and fixed.router.ridge == 1e-3 and fixed.refit.ridge == 1e-2
    assert fixed.router.held_out is None and "no held-out split" in str(fixed)
