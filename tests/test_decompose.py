"""moefx.compile.decompose and the gate/up ``halves`` layout: the decomposition equals the reference in both
forms for every attribute combination, Inductor compiles it instead of calling the opaque op, and halves
read transformers' fused gate_up_proj in place everywhere the op runs."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import moefx.compile.backend  # noqa: F401  (registers the decomposition and backend="moefx")
from moefx.compile.decompose import FORMS, form_for, moe_decomposed
from moefx.cpu import STRATEGIES, moe_cpu
from moefx.op import MoEAttrs, MoEInputs, interleaved, moe_backward_reference, moe_reference
from tests.conftest import relative_error
from tests.test_op import CASES, _config, _inputs

CASE_IDS = [f"{c['scoring']}-{c['activation']}-gated{c['gated']}-topp{c.get('top_p', 1.0)}-z{c.get('num_zero', 0)}"
            for c in CASES]


def _op_inputs(t):
    return MoEInputs(t["x"], t["x"], t["w_router"], t["b_router"], t["w_in"], t["b_in"], t["w_out"], t["b_out"],
                     t["const"])


def _as_halves(inputs: MoEInputs, attrs: MoEAttrs) -> tuple[MoEInputs, MoEAttrs]:
    """The same experts with gate/up rows stored as [gate; up] halves."""
    if not attrs.gated:
        return inputs, attrs
    e, f_in, h = inputs.w_in.shape
    w_in = inputs.w_in.reshape(e, f_in // 2, 2, h).transpose(1, 2).reshape(e, f_in, h)
    b_in = None if inputs.b_in is None else inputs.b_in.reshape(e, f_in // 2, 2).transpose(1, 2).reshape(e, f_in)
    return inputs._replace(w_in=w_in, b_in=b_in), dataclasses.replace(attrs, halves=True)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_decomposition_equals_the_reference_in_both_forms(case, form):
    """Fresh random fp32 inputs (H=8, F=4: grouped GEMM strides stay 16-byte multiples), 40 tokens."""
    t = {k: None if v is None else v.float() for k, v in _inputs(case, T=40, H=8, Fw=4, seed=7).items()}
    inputs, attrs = _op_inputs(t), MoEAttrs(**_config(case))
    want = moe_reference(inputs, attrs)
    assert relative_error(moe_decomposed(inputs, attrs, form), want) <= 1e-5
    halves_inputs, halves_attrs = _as_halves(inputs, attrs)
    assert relative_error(moe_decomposed(halves_inputs, halves_attrs, form), want) <= 1e-5


def test_form_follows_the_slot_count_and_what_grouped_gemms_take():
    case = CASES[0]
    t = {k: None if v is None else v.float() for k, v in _inputs(case, T=1, H=8, Fw=4).items()}
    attrs = MoEAttrs(**_config(case))  # 5 experts, top-3
    assert form_for(_op_inputs(t), attrs) == "gathered"
    many = dict(t, x=torch.randn(40, 8))
    assert form_for(_op_inputs(many), attrs) == "grouped"
    assert form_for(_op_inputs({k: None if v is None else v.double() for k, v in many.items()}), attrs) is None


@pytest.mark.parametrize("tokens", [1, 40], ids=["gathered", "grouped"])
def test_inductor_compiles_the_decomposition_not_the_opaque_op(tokens):
    case = CASES[1]  # softmax, GELU, biases
    t = {k: None if v is None else v.float() for k, v in _inputs(case, T=tokens, H=8, Fw=4, seed=tokens).items()}
    inputs, attrs = _op_inputs(t), MoEAttrs(**_config(case))
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: torch.ops.moefx.moe(*a, *attrs.flat()), dynamic=False)
    with torch.no_grad():
        out, code = run_and_get_code(compiled, *inputs)
    assert "torch.ops.moefx.moe.default(" not in "\n".join(code)
    assert relative_error(out, moe_reference(inputs, attrs)) <= 1e-5


@pytest.mark.parametrize("case", [c for c in CASES if c["gated"]], ids=lambda c: f"{c['scoring']}-{c['activation']}")
def test_halves_layout_gives_the_interleaved_result_on_every_cpu_path(case):
    t = _inputs(case, T=12, H=8, Fw=4, seed=3)
    inputs, attrs = _op_inputs(t), MoEAttrs(**_config(case))
    want = moe_reference(inputs, attrs)
    halves_inputs, halves_attrs = _as_halves(inputs, attrs)
    assert relative_error(moe_reference(halves_inputs, halves_attrs), want) <= 1e-12
    back, back_attrs = interleaved(halves_inputs, halves_attrs)
    assert torch.equal(back.w_in, inputs.w_in) and not back_attrs.halves
    for strategy in STRATEGIES:
        assert relative_error(moe_cpu(halves_inputs, halves_attrs, strategy), want) <= 1e-12
    grad_out = torch.randn_like(want)
    grads = moe_backward_reference(grad_out, halves_inputs, halves_attrs)
    want_grads = moe_backward_reference(grad_out, inputs, attrs)
    d_w_in = grads[4].reshape(want_grads[4].shape[0], 2, -1, 8).transpose(1, 2).reshape(want_grads[4].shape)
    assert relative_error(d_w_in, want_grads[4]) <= 1e-12
    assert relative_error(grads[0], want_grads[0]) <= 1e-12


def test_halves_needs_gated_experts():
    with pytest.raises(ValueError, match="halves=True describes the gate/up rows of gated experts"):
        MoEAttrs(2, "relu", False, halves=True)


def test_transformers_gate_up_proj_is_read_in_place_on_cpu():
    """backend="moefx" on Qwen3-MoE: the op reads the fused gate_up_proj parameter itself (no reshape/transpose
    copy of the experts per call) and the compiled model matches eager."""
    from tests.test_moe_blocks import compile_with_passes, moe_calls, token_ids, tiny_moe_model
    from moefx.compile.swap_triton import is_moe_call
    model, layers = tiny_moe_model("qwen3_moe")
    compiled, graphs = compile_with_passes(model)
    ids = token_ids(6)
    with torch.no_grad():
        out = compiled(ids).logits
        ref = model(ids).logits
    assert moe_calls(graphs[0]) == layers
    for call in (n for n in graphs[0].graph.nodes if is_moe_call(n)):
        w_in = call.args[4]
        assert call.args[-1] is True, "gate/up halves"
        assert w_in.op in ("placeholder", "get_attr"), f"w_in comes from {w_in.op} {w_in.target}, not the parameter"
    assert relative_error(out, ref) <= 1e-5
