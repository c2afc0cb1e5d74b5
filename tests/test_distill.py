"""End-to-end knowledge distillation of converted models (moefx.distill, convert(distill_steps=))."""
import copy

import pytest
import torch

import moefx
from moefx.layer import MoELayer


def _tiny_bert():
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    model = BertModel(BertConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=128, num_attention_heads=2,
                                 vocab_size=100, max_position_embeddings=32)).eval()
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 100, (8, 12), generator=g),
                "attention_mask": torch.ones(8, 12, dtype=torch.long)} for _ in range(6)]
    for batch in batches:
        batch["attention_mask"][:4, 9:] = 0  # padded rows: the loss must leave them out
    return model, batches


def test_distill_lowers_the_output_error_and_trains_only_moe_layers():
    dense, batches = _tiny_bert()
    moe = moefx.convert(dense, 8, 2, batches, method="coactivation", router="least_squares", progress=False)
    frozen = {n: p.detach().clone() for n, p in moe.named_parameters() if ".moe." not in f".{n}"}
    router = [m for m in moe.modules() if isinstance(m, MoELayer)][0].router.weight.detach().clone()
    report = moefx.distill(moe, dense, batches, steps=60, lr=1e-3, progress=False)
    assert report.steps == 60 and report.error_after < 0.7 * report.error_before and report.stopped == "steps"
    assert len(report.held_out) == 1 and report.curve[0] == (0, report.error_before)
    assert report.error_after == min(error for _, error in report.curve)
    assert all(torch.equal(p, frozen[n]) for n, p in moe.named_parameters() if n in frozen)
    assert all(p.requires_grad for p in moe.parameters())  # flags restored
    assert not moe.training
    layer = [m for m in moe.modules() if isinstance(m, MoELayer)][0]
    assert not torch.equal(layer.router.weight.detach(), router)  # the straight-through gradient reached it
    # held-out inputs improve too
    fresh = {"input_ids": torch.randint(0, 100, (8, 12)), "attention_mask": torch.ones(8, 12, dtype=torch.long)}
    undistilled = moefx.convert(dense, 8, 2, batches, method="coactivation", router="least_squares", progress=False)
    with torch.no_grad():
        ref = dense(**fresh).last_hidden_state
        error = lambda m: ((m(**fresh).last_hidden_state - ref).norm() / ref.norm()).item()  # noqa: E731
        assert error(moe) < error(undistilled)


def test_convert_distill_steps_works_inplace_and_router_only_mode():
    dense, batches = _tiny_bert()
    reference = copy.deepcopy(dense)
    moe = moefx.convert(dense, 8, 2, batches, method="split", router="least_squares", inplace=True,
                        distill_steps=20, progress=False)
    assert moe is dense and moe.moefx_distill.error_after < moe.moefx_distill.error_before
    routers_only = moefx.convert(reference, 8, 2, batches, method="split", router="least_squares", progress=False)
    experts = {n: p.detach().clone() for n, p in routers_only.named_parameters() if "router" not in n}
    moefx.distill(routers_only, reference, batches, steps=5, experts=False, progress=False)
    assert all(torch.equal(p, experts[n]) for n, p in routers_only.named_parameters() if n in experts)


def test_distill_errors_name_the_fix():
    dense, batches = _tiny_bert()
    with pytest.raises(ValueError, match="convert it first"):
        moefx.distill(copy.deepcopy(dense), dense, batches, progress=False)
    moe = moefx.convert(dense, 8, 2, batches, progress=False)
    with pytest.raises(ValueError, match="steps >= 1"):
        moefx.distill(moe, dense, batches, steps=0, progress=False)
    with pytest.raises(ValueError, match="data is empty"):
        moefx.distill(moe, dense, [], progress=False)
    with pytest.raises(ValueError, match="schedule='step' is not one of"):
        moefx.distill(moe, dense, batches, schedule="step", progress=False)
    with pytest.raises(ValueError, match=r"held_out=1.0 .* pick it in \[0, 1\)"):
        moefx.distill(moe, dense, batches, held_out=1.0, progress=False)
    with pytest.raises(ValueError, match="max_seconds=0 > 0"):
        moefx.distill(moe, dense, batches, max_seconds=0, progress=False)
    with pytest.raises(ValueError, match="distill_seconds=0"):
        moefx.convert(dense, 8, 2, batches, distill_steps=5, distill_seconds=0, progress=False)
    with pytest.raises(ValueError, match="distill_steps=-1"):
        moefx.convert(dense, 8, 2, batches, distill_steps=-1, progress=False)


def _held_out_error(model, dense, batches):
    with torch.no_grad():
        return sum(((model(**b).last_hidden_state - dense(**b).last_hidden_state).norm()
                    / dense(**b).last_hidden_state.norm()).item() for b in batches) / len(batches)


def test_a_diverging_learning_rate_ends_no_worse_than_it_started_on_held_out_batches():
    dense, batches = _tiny_bert()
    moe = moefx.convert(dense, 8, 2, batches, method="coactivation", router="least_squares", progress=False)
    start = copy.deepcopy(moe)
    report = moefx.distill(moe, dense, batches, steps=12, lr=10.0, eval_every=3, progress=False)
    held = [batches[i] for i in report.held_out]
    assert report.held_out and max(error for _, error in report.curve[1:]) > 2 * report.error_before  # it diverged
    assert report.best_step == 0 and report.error_after == report.error_before
    assert _held_out_error(moe, dense, held) <= _held_out_error(start, dense, held) + 1e-6
    assert all(torch.equal(p, q) for p, q in zip(moe.parameters(), start.parameters()))  # the start state is back


def test_distill_keeps_the_best_state_of_its_held_out_curve():
    dense, batches = _tiny_bert()
    moe = moefx.convert(dense, 8, 2, batches, method="coactivation", router="least_squares", progress=False)
    report = moefx.distill(moe, dense, batches, steps=30, lr=3e-3, eval_every=5, schedule="linear", progress=False)
    assert [step for step, _ in report.curve] == [0, 5, 10, 15, 20, 25, 30]
    best_step, best_error = min(report.curve, key=lambda point: point[1])
    assert (report.best_step, report.error_after) == (best_step, best_error) and best_step > 0
    with torch.no_grad():  # the model holds the state measured at best_step
        from moefx.fit.distill import output_error
        measured = [output_error(moe(**batches[i]).last_hidden_state, dense(**batches[i]).last_hidden_state,
                                 batches[i]["attention_mask"].bool()).item() for i in report.held_out]
    assert sum(measured) / len(measured) == pytest.approx(report.error_after, rel=1e-4)


def test_distill_stops_at_its_time_budget_and_on_patience():
    dense, batches = _tiny_bert()
    moe = moefx.convert(dense, 8, 2, batches, method="coactivation", router="least_squares", progress=False)
    timed = moefx.distill(copy.deepcopy(moe), dense, batches, steps=10_000, max_seconds=0.5, progress=False)
    assert timed.stopped == "max_seconds" and timed.steps < 10_000 and timed.curve[-1][0] == timed.steps
    patient = moefx.distill(moe, dense, batches, steps=200, lr=10.0, eval_every=2, patience=2, progress=False)
    assert patient.stopped == "patience" and patient.steps == 4 and patient.best_step == 0
