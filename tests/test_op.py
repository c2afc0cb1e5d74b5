"""The op contract (moefx/op.py): reference against the formula, autograd, compile, export."""
from __future__ import annotations

import pytest
import torch

from moefx.op import ACTIVATIONS, MoEAttrs, MoEInputs, moe_op
from tests.conftest import relative_error


def formula(x, w_router, b_router, w_in, b_in, w_out, b_out, const, top_k, activation, gated, scoring, renormalize,
            top_p, min_k, gate_scale, num_zero, num_copy):
    """The docstring's formula, token by token, in float64."""
    E = w_in.shape[0]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        logits = w_router @ x[t] + (0 if b_router is None else b_router)
        probs = logits.softmax(-1)
        s = {"softmax": probs, "sigmoid": logits.sigmoid(), "unit": torch.ones_like(logits)}[scoring]
        chosen = (logits if scoring == "unit" else s).topk(top_k).indices.tolist()
        kept = [e for r, e in enumerate(chosen) if r < min_k or probs[chosen[:r]].sum() < top_p]
        total = sum(s[e] for e in kept)
        for e in kept:
            g = (s[e] / total if renormalize else s[e]) * gate_scale
            if e < E:
                a = w_in[e] @ x[t] + (0 if b_in is None else b_in[e])
                h = ACTIVATIONS[activation](a[0::2]) * a[1::2] if gated else ACTIVATIONS[activation](a)
                y = w_out[e] @ h + (0 if b_out is None else b_out[e])
            elif e < E + num_zero:
                y = torch.zeros_like(x[t])
            elif e < E + num_zero + num_copy:
                y = x[t]
            else:
                y = const[e - E - num_zero - num_copy]
            out[t] += g * y
    return out


CASES = [
    dict(scoring="softmax", renormalize=True, gated=True, activation="silu", bias=False),
    dict(scoring="softmax", renormalize=False, gated=False, activation="gelu", bias=True),
    dict(scoring="sigmoid", renormalize=True, gated=False, activation="relu", bias=True, gate_scale=2.5),
    dict(scoring="unit", renormalize=False, gated=True, activation="gelu_tanh", bias=True),
    dict(scoring="softmax", renormalize=True, gated=True, activation="silu", bias=False, top_p=0.5, min_k=1),
    dict(scoring="softmax", renormalize=False, gated=False, activation="relu", bias=False, num_zero=1, num_copy=1,
         num_const=2),
    dict(scoring="sigmoid", renormalize=True, gated=True, activation="quick_gelu", bias=True),
    dict(scoring="softmax", renormalize=True, gated=False, activation="relu2", bias=True),
]


def _inputs(case, T=9, H=10, Fw=6, E=5, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = case.get("num_zero", 0) + case.get("num_copy", 0) + case.get("num_const", 0)
    rows = 2 * Fw if case["gated"] else Fw
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    bias = case["bias"]
    return dict(x=r(T, H), w_router=r(E + z, H), b_router=r(E + z) if bias else None, w_in=r(E, rows, H),
                b_in=r(E, rows) if bias else None, w_out=r(E, H, Fw), b_out=r(E, H) if bias else None,
                const=r(case["num_const"], H) if case.get("num_const") else None)


def _config(case, top_k=3):
    return dict(top_k=top_k, activation=case["activation"], gated=case["gated"], scoring=case["scoring"],
                renormalize=case["renormalize"], top_p=case.get("top_p", 1.0), min_k=case.get("min_k", 1),
                gate_scale=case.get("gate_scale", 1.0), num_zero=case.get("num_zero", 0),
                num_copy=case.get("num_copy", 0))


def _call(t, cfg):
    inputs = MoEInputs(t["x"], t["x"], t["w_router"], t["b_router"], t["w_in"], t["b_in"], t["w_out"], t["b_out"],
                       t["const"])
    return moe_op(inputs, MoEAttrs(**cfg))


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['scoring']}-{c['activation']}-gated{c['gated']}")
def test_reference_equals_the_docstring_formula(case):
    t, cfg = _inputs(case), _config(case)
    want = formula(t["x"], t["w_router"], t["b_router"], t["w_in"], t["b_in"], t["w_out"], t["b_out"], t["const"],
                   **cfg)
    assert relative_error(_call(t, cfg), want) <= 1e-12
    x32 = {k: None if v is None else v.float() for k, v in t.items()}
    assert relative_error(_call(x32, cfg), want) <= 1e-5


@pytest.mark.parametrize("case", CASES[:3] + CASES[4:], ids=lambda c: f"{c['scoring']}-{c['activation']}")
def test_analytic_backward_passes_gradcheck(case):
    t = _inputs(case, T=4, H=5, Fw=3, E=4)
    names = [k for k, v in t.items() if v is not None]
    cfg = _config(case, top_k=2)

    def f(*tensors):
        return _call(dict(t, **dict(zip(names, tensors))), cfg)
    assert torch.autograd.gradcheck(f, [t[k].requires_grad_() for k in names])


def test_compiles_without_graph_break_and_exports_as_one_op():
    case = CASES[0]
    t, cfg = _inputs(case, dtype=torch.float32), _config(case)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(lambda x: _call(dict(t, x=x), cfg))(t["x"])
    assert explanation.graph_break_count == 0
    compiled = torch.compile(lambda x: _call(dict(t, x=x), cfg), fullgraph=True)
    assert relative_error(compiled(t["x"]), _call(t, cfg)) <= 1e-6

    class Layer(torch.nn.Module):
        def forward(self, x):
            return _call(dict(t, x=x), cfg)

    program = torch.export.export(Layer(), (t["x"],))
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.moefx.moe.default) == 1


@pytest.mark.parametrize("change,message", [
    (dict(top_k=6), "top_k=6 must be between 1 and the number of experts (5)"),
    (dict(activation="tanh"), "activation 'tanh' is not one of"),
    (dict(scoring="softplus"), "scoring 'softplus' is not one of"),
    (dict(min_k=4), "min_k=4 must be between 1 and top_k=3"),
    (dict(top_p=0.0), "top_p=0.0 must be in (0, 1]"),
])
def test_bad_arguments_are_named(change, message):
    t, cfg = _inputs(CASES[0], dtype=torch.float32), _config(CASES[0])
    with pytest.raises(ValueError, match=__import__("re").escape(message)):
        _call(t, cfg | change)


def test_shape_mismatch_is_named():
    t, cfg = _inputs(CASES[0], dtype=torch.float32), _config(CASES[0])
    with pytest.raises(ValueError, match=r"w_out is \(5, 10, 5\), expected \[5, 10, 6\]"):
        _call(dict(t, w_out=t["w_out"][..., :5]), cfg)


@pytest.mark.parametrize("change,message", [
    (dict(scoring="sofmax"), "scoring 'sofmax' is not one of"),
    (dict(top_k=0), "top_k=0 must be at least 1"),
])
def test_raw_op_validates_its_attributes(change, message):
    """torch.ops.moefx.moe called directly (not through moe_op) refuses what MoEAttrs refuses."""
    t, cfg = _inputs(CASES[0], dtype=torch.float32), _config(CASES[0]) | change
    flat = [t["x"], t["x"], t["w_router"], t["b_router"], t["w_in"], t["b_in"], t["w_out"], t["b_out"], t["const"]]
    with pytest.raises((ValueError, RuntimeError), match=__import__("re").escape(message)):
        torch.ops.moefx.moe(*flat, *cfg.values())


@pytest.mark.parametrize("change,message", [
    (dict(w_router=lambda t: t["w_router"][:4]), "w_router is (4, 10), expected [5, 10]"),
    (dict(x=lambda t: t["x"][:7]), "x (7, 10) and router_input (9, 10) must be"),
    (dict(top_k=6), "top_k=6 must be between 1 and the number of experts (5)"),
])
def test_raw_op_validates_its_tensor_shapes(change, message):
    """torch.ops.moefx.moe called directly checks the tensors against each other as moe_op does: a router with
    the wrong row count does not run, top_k above the expert count is no index error."""
    t, cfg = _inputs(CASES[0], dtype=torch.float32), _config(CASES[0])
    t = t | {k: v(t) for k, v in change.items() if callable(v)}
    cfg = cfg | {k: v for k, v in change.items() if not callable(v)}
    flat = [t["x"], _inputs(CASES[0], dtype=torch.float32)["x"], t["w_router"], t["b_router"], t["w_in"], t["b_in"],
            t["w_out"], t["b_out"], t["const"]]
    with pytest.raises((ValueError, RuntimeError), match=__import__("re").escape(message)):
        torch.ops.moefx.moe(*flat, *cfg.values())


def test_renormalized_sigmoid_gates_of_very_negative_fp32_logits_are_finite():
    """sigmoid(-200) is 0 in fp32: renormalising in log space gives the fp64 gates, not 0/0."""
    from moefx.op import route
    attrs = MoEAttrs(top_k=2, activation="silu", gated=False, scoring="sigmoid", renormalize=True)
    x = torch.randn(5, 6, dtype=torch.float64)
    w = torch.randn(4, 6, dtype=torch.float64)
    b = torch.full((4,), -200.0, dtype=torch.float64)
    want, ids = route(x, w, b, attrs)
    got, got_ids = route(x.float(), w.float(), b.float(), attrs)
    assert torch.isfinite(got).all() and torch.equal(got_ids, ids)
    assert relative_error(got, want) <= 1e-5


def test_nan_router_logits_give_that_token_nan_and_no_other():
    t, cfg = _inputs(CASES[0], dtype=torch.float32), _config(CASES[0])
    router_input = t["x"].clone()
    router_input[1, 0] = float("nan")
    inputs = MoEInputs(t["x"], router_input, t["w_router"], t["b_router"], t["w_in"], t["b_in"], t["w_out"],
                       t["b_out"], t["const"])
    out = moe_op(inputs, MoEAttrs(**cfg))
    assert out[1].isnan().all() and torch.isfinite(out[[0] + list(range(2, len(out)))]).all()


@pytest.mark.parametrize("activation", ["quick_gelu", "relu2"])
def test_new_activation_gradients_match_autograd(activation):
    from moefx.op import ACTIVATION_GRADS
    a = torch.linspace(-6, 6, 101, dtype=torch.float64).requires_grad_()
    ACTIVATIONS[activation](a).sum().backward()
    assert torch.allclose(ACTIVATION_GRADS[activation](a.detach()), a.grad, atol=1e-12)


def _route_with_full_nan_scan(router_input, w_router, b_router, attrs):
    """``route`` as the contract words it: a token's gates are NaN iff any of its [E+Z] scores is NaN."""
    import math

    import torch.nn.functional as F
    logits = F.linear(router_input, w_router, b_router)
    scores = {"softmax": logits.softmax(-1), "sigmoid": logits.sigmoid(), "unit": logits}[attrs.scoring]
    ids = (scores if attrs.scoring == "softmax" else logits).topk(attrs.top_k, dim=-1).indices
    gates = torch.ones(ids.shape, dtype=logits.dtype) if attrs.scoring == "unit" else scores.gather(-1, ids)
    kept = torch.ones_like(gates, dtype=torch.bool)
    if attrs.top_p < 1.0:
        probs = logits.softmax(-1).gather(-1, ids)
        kept = (torch.arange(attrs.top_k) < attrs.min_k) | (probs.cumsum(-1) - probs < attrs.top_p)
        gates = gates * kept
    if attrs.renormalize and attrs.scoring == "sigmoid":
        gates = F.logsigmoid(logits.gather(-1, ids)).masked_fill(~kept, -math.inf).softmax(-1)
    elif attrs.renormalize:
        gates = gates / gates.sum(-1, keepdim=True)
    return gates.masked_fill(scores.isnan().any(-1, keepdim=True), math.nan) * attrs.gate_scale, ids


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid", "unit"])
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("top_p", [1.0, 0.6])
def test_route_finds_nan_rows_as_a_full_scan_of_the_scores_does(scoring, renormalize, top_p):
    """route's NaN test reads only each row's first choice (topk ranks NaN first; a softmax row with a NaN or
    +inf logit is all NaN): same gates as scanning every score, with NaN and +-inf logits anywhere in a row."""
    from moefx.op import route
    g = torch.Generator().manual_seed(hash((scoring, renormalize, top_p)) % 2**31)
    attrs = MoEAttrs(top_k=3, activation="relu", gated=False, scoring=scoring, renormalize=renormalize, top_p=top_p,
                     gate_scale=1.5)
    x, w, b = torch.randn(40, 6, generator=g), torch.randn(9, 6, generator=g), torch.randn(9, generator=g)
    poisoned = {3: float("nan"), 7: float("inf"), 11: -float("inf"), 19: float("nan"), 23: float("inf")}
    nan_tokens = 0
    for t in range(x.shape[0]):  # token by token, each with its own router bias carrying the poison
        bias = b.clone()
        if t in poisoned:
            bias[(t * 5) % 9] = poisoned[t]
        want, want_ids = _route_with_full_nan_scan(x[t:t + 1], w, bias, attrs)
        got, got_ids = route(x[t:t + 1], w, bias, attrs)
        assert torch.equal(got_ids, want_ids)
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.allclose(got.nan_to_num(), want.nan_to_num(), rtol=1e-6, atol=0)
        nan_tokens += bool(want.isnan().all())
    assert nan_tokens >= 2
    assert torch.allclose(route(x, w, b, attrs)[0], _route_with_full_nan_scan(x, w, b, attrs)[0], rtol=1e-6, atol=0)


def test_shape_check_is_cached_per_shape_and_a_new_shape_is_checked_again(monkeypatch):
    import moefx.op
    checked = []
    real = moefx.op._check_shapes
    monkeypatch.setattr(moefx.op, "_check_shapes", lambda i, a: checked.append(i.x.shape) or real(i, a))
    monkeypatch.setattr(moefx.op, "_CHECKED", {})
    t, cfg = _inputs(CASES[1], dtype=torch.float32), _config(CASES[1])
    with torch.no_grad():
        _call(t, cfg)
        _call(t, cfg)
        assert len(checked) == 1
        _call(dict(t, x=t["x"][:4]), cfg)  # another token count: checked once more
        assert len(checked) == 2
        with pytest.raises(ValueError, match=r"w_out is \(5, 10, 5\), expected \[5, 10, 6\]"):
            _call(dict(t, w_out=t["w_out"][..., :5]), cfg)
        with pytest.raises(ValueError, match=r"w_in is \[E, F_in, 10\] but x has 9 features"):
            _call(dict(t, x=t["x"][:, :9]), cfg)
