"""The CPU implementation (moefx/cpu.py): every GEMM strategy equals the reference for every attribute
combination, the table picks it on CPU, and eager inference skips the custom op's dispatch."""
from __future__ import annotations

import pytest
import torch

import moefx.cpu
from moefx.cpu import STRATEGIES, moe_cpu, strategy_for
from moefx.op import IMPLEMENTATIONS, MoEAttrs, MoEInputs, kernel_path, moe_op, moe_reference
from tests.conftest import relative_error
from tests.test_op import CASES, _config, _inputs

CASE_IDS = [f"{c['scoring']}-{c['activation']}-gated{c['gated']}-topp{c.get('top_p', 1.0)}-z{c.get('num_zero', 0)}"
            for c in CASES]


def _op_inputs(t, router_input=None):
    return MoEInputs(t["x"], t["x"] if router_input is None else router_input, t["w_router"], t["b_router"],
                     t["w_in"], t["b_in"], t["w_out"], t["b_out"], t["const"])


def _pregated(t, width=6, seed=1):
    """A router input [T, width] other than x (Read-ME pre-gating), with a router of that width."""
    g = torch.Generator().manual_seed(seed)
    rows = t["w_router"].shape[0]
    return (torch.randn(t["x"].shape[0], width, generator=g, dtype=t["x"].dtype),
            torch.randn(rows, width, generator=g, dtype=t["x"].dtype))


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_every_strategy_equals_the_reference_for_every_attribute_combination(case, strategy, tokens):
    # H=8 and F_in multiples of 4 keep torch._grouped_mm's 16-byte strides, so "grouped" really runs it.
    t, cfg = _inputs(case, T=tokens, H=8, Fw=4, seed=tokens), MoEAttrs(**_config(case))
    want = moe_reference(_op_inputs(t), cfg)
    assert relative_error(moe_cpu(_op_inputs(t), cfg, strategy), want) <= 1e-12
    t32 = {k: None if v is None else v.float() for k, v in t.items()}
    assert relative_error(moe_cpu(_op_inputs(t32), cfg, strategy), want) <= 1e-5


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=["softmax-bias", "unit-gated"])
def test_pregated_router_input_other_than_x_equals_the_reference(case, strategy):
    t = {k: None if v is None else v.float() for k, v in _inputs(case, T=12, H=8, Fw=4).items()}
    router_input, w_router = _pregated(t)
    inputs = _op_inputs(dict(t, w_router=w_router), router_input)
    cfg = MoEAttrs(**_config(case))
    assert relative_error(moe_cpu(inputs, cfg, strategy), moe_reference(inputs, cfg)) <= 1e-6


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_unaligned_shapes_and_half_types_fall_back_and_stay_exact(strategy):
    case = CASES[0]
    t = {k: None if v is None else v.float() for k, v in _inputs(case, T=20, H=10, Fw=3).items()}
    cfg = MoEAttrs(**_config(case))
    assert relative_error(moe_cpu(_op_inputs(t), cfg, strategy), moe_reference(_op_inputs(t), cfg)) <= 1e-6
    tb = {k: None if v is None else v.bfloat16() for k, v in t.items()}
    out = moe_cpu(_op_inputs(tb), cfg, strategy)
    assert out.dtype == torch.bfloat16
    assert relative_error(out, moe_reference(_op_inputs(tb), cfg)) <= 1e-2


def test_grouped_masks_the_rows_grouped_mm_leaves_unwritten(monkeypatch):
    """Slots routed to zero-computation experts sort past the last offset, where torch._grouped_mm writes
    nothing: poison those rows with NaN and the result must not change."""
    grouped_mm = torch._grouped_mm

    def poisoned(a, b, offs):
        out = grouped_mm(a, b, offs=offs)
        out[int(offs[-1]):] = float("nan")
        return out
    monkeypatch.setattr(torch, "_grouped_mm", poisoned)
    case = CASES[5]  # 1 zero, 1 copy, 2 constant experts
    t = {k: None if v is None else v.float() for k, v in _inputs(case, T=30, H=8, Fw=4, seed=3).items()}
    cfg = MoEAttrs(**_config(case))
    out = moe_cpu(_op_inputs(t), cfg, "grouped")
    assert out.isfinite().all()
    assert relative_error(out, moe_reference(_op_inputs(t), cfg)) <= 1e-6


def test_crossover_table_picks_pairs_then_grouped_then_per_expert():
    pairs, rows = moefx.cpu.CROSSOVERS["pairs_max_slots"], moefx.cpu.CROSSOVERS["grouped_max_rows_per_expert"]
    assert [strategy_for(n, 8) for n in (1, pairs, pairs + 1, 8 * rows, 8 * rows + 1)] == [
        "pairs", "pairs", "grouped", "grouped", "per_expert"]
    assert strategy_for(8 * rows + 1, 64) == "grouped"  # more experts: fewer rows each


def test_cpu_tensors_take_the_cpu_implementation_and_reference_stays_selectable(monkeypatch):
    calls = []
    for name in ("cpu", "reference"):
        monkeypatch.setitem(IMPLEMENTATIONS, name, lambda i, a, name=name: calls.append(name) or i.x.clone())
    t, cfg = _inputs(CASES[0], dtype=torch.float32), MoEAttrs(**_config(CASES[0]))
    monkeypatch.delenv("MOEFX_KERNELS", raising=False)
    assert kernel_path(torch.device("cpu")) == "cpu"
    moe_op(_op_inputs(t), cfg)
    monkeypatch.setenv("MOEFX_KERNELS", "reference")
    moe_op(_op_inputs(t), cfg)
    assert calls == ["cpu", "reference"]


def test_eager_inference_skips_the_custom_op_dispatch_but_autograd_uses_it(monkeypatch):
    t, cfg = _inputs(CASES[1], dtype=torch.float32), MoEAttrs(**_config(CASES[1]))
    want = moe_reference(_op_inputs(t), cfg)
    dispatched = []
    real = torch.ops.moefx.moe

    def counting(*args):
        dispatched.append(1)
        return real(*args)
    monkeypatch.setattr(torch.ops.moefx, "moe", counting)
    with torch.no_grad():
        assert relative_error(moe_op(_op_inputs(t), cfg), want) <= 1e-6
    assert not dispatched
    w_in = t["w_in"].clone().requires_grad_()
    out = moe_op(_op_inputs(dict(t, w_in=w_in)), cfg)
    assert dispatched and out.requires_grad
    out.sum().backward()
    assert w_in.grad is not None and w_in.grad.abs().sum() > 0
