"""moefx.convert.trace on hand-built modules: recording calls, tracing a piece concretely (Python control
flow resolved on the recorded values, tuple outputs, kwargs and constants in the call), refusing
pieces whose graph does not reproduce the recorded output, and the module-path helpers.
"""
from __future__ import annotations

import copy
import logging
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moefx.convert.trace import (CallSpec, NotTraced, RecordedCall, check_traced, mismatch, qualified, record_calls, trace_piece,
                                 within)
from tests.conftest import relative_error

H = 8


def setup_function(_):
    torch.manual_seed(0)


def record(module: nn.Module, *args, **kwargs) -> RecordedCall:
    return record_calls(module, {"": module}, lambda: module(*args, **kwargs))[""]


def call_targets(gm) -> list:
    return [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")]


# ---------------------------------------------------------------- record_calls

class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.block = nn.Linear(H, H), nn.Sequential(nn.Linear(H, H), nn.ReLU())

    def forward(self, x, scale=1.0):
        return self.block(self.fc(self.fc(x) * scale))


def test_record_calls_keeps_the_first_call_of_each_module_with_kwargs_and_output():
    model = Twice()
    x = torch.randn(2, H)
    calls = record_calls(model, {"fc": model.fc, "block": model.block, "": model}, lambda: model(x, scale=3.0))
    assert set(calls) == {"fc", "block", ""}
    assert torch.equal(calls["fc"].args[0], x), "the first of fc's two calls"
    assert calls["fc"].args[0] is not x, "a copy: later in-place changes cannot alter the record"
    assert torch.equal(calls["fc"].output, model.fc(x))
    assert calls[""].kwargs == {"scale": 3.0}
    assert torch.equal(calls["block"].output, calls[""].output)


def test_record_calls_removes_its_hooks_even_when_the_run_fails():
    model = Twice()

    def failing_run():
        model(torch.randn(2, H))
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        record_calls(model, {"fc": model.fc, "": model}, failing_run)
    assert not model.fc._forward_hooks and not model._forward_hooks


# ---------------------------------------------------------------- trace_piece

class Branchy(nn.Module):
    """Data-dependent Python control flow, len/iteration/shape reads, tensor and constant kwargs, tuple output."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(H, H)
        self.inner = nn.Sequential(nn.Linear(H, H), nn.ReLU())

    def forward(self, x, mask=None, scale=1.0, mode="rows"):
        h = self.fc(x)
        if h.sum() > 0:           # resolved on the recorded value: only one branch is in the graph
            h = torch.relu(h)
        else:
            h = torch.tanh(h)
        if mask is not None:
            h = h * mask
        if mode == "rows":
            h = torch.stack([row * scale for row in h]) + len(x)
        return h.view(x.shape[0], -1), self.inner(h)


def branchy_call(sign: float):
    module = Branchy().eval()
    with torch.no_grad():
        module.fc.bias.fill_(sign * 10.0)  # decides the branch: h.sum() has the sign of the bias
    x, mask = torch.randn(3, H), (torch.rand(3, H) > 0.3).float()
    return module, x, mask, record(module, x, mask=mask, scale=2.0)


@pytest.mark.parametrize("sign,taken,skipped", [(1.0, torch.relu, torch.tanh), (-1.0, torch.tanh, torch.relu)])
def test_trace_keeps_only_the_branch_the_recorded_call_took_guarded(sign, taken, skipped):
    module, x, mask, call = branchy_call(sign)
    gm = trace_piece(module, call, set(), "block")
    targets = call_targets(gm)
    assert taken in targets and skipped not in targets
    assert check_traced in targets, "the value the `if` read stays, as a guard"
    assert targets.count(operator.mul) == 1 + 3, "mask, then one scale per row of the 3 iterated rows"
    # the graph is specialised to the recorded branch: inputs that would take the other one are refused by name
    with torch.no_grad():
        module.fc.bias.neg_()
        with pytest.raises(ValueError, match="block"):
            gm(x, mask=mask, scale=2.0)
        module.fc.bias.neg_()


def test_traced_piece_returns_the_tuple_output_and_matches_the_module_on_fresh_inputs():
    module, x, mask, call = branchy_call(1.0)
    gm = trace_piece(module, call, set(), "block")
    fresh_x, fresh_mask = torch.randn(3, H), (torch.rand(3, H) > 0.5).float()
    with torch.no_grad():
        got, want = gm(fresh_x, mask=fresh_mask, scale=2.0), module(fresh_x, mask=fresh_mask, scale=2.0)
    assert isinstance(got, tuple) and len(got) == 2
    for a, b in zip(got, want):
        assert a.shape == b.shape and relative_error(a, b) <= 1e-6


def test_tensor_kwargs_stay_inputs_and_constant_kwargs_are_baked_in():
    module, x, mask, call = branchy_call(1.0)
    gm = trace_piece(module, call, set(), "block")
    scales = [n.args[1] for n in gm.graph.nodes
              if n.target is operator.mul and not isinstance(n.args[1], torch.fx.Node)]
    assert scales == [2.0] * 3, "scale=2.0 is a literal of the graph"
    with torch.no_grad():
        rows = gm(x, mask=torch.zeros(3, H), scale=2.0)[0]
    assert torch.equal(rows, torch.full((3, H), 3.0)), "the mask passed now is used: h * 0 * 2 + len(x)"


def test_a_call_with_another_constant_or_another_argument_structure_is_refused():
    module, x, mask, call = branchy_call(1.0)
    gm = trace_piece(module, call, set(), "block")
    with pytest.raises(ValueError, match="block was traced with scale=2.0 and is now called with scale=3.0"):
        gm(x, mask=mask, scale=3.0)
    with pytest.raises(TypeError, match="block is called without mask, passed when it was traced"):
        gm(x, scale=2.0)  # no mask


def test_deepcopy_of_a_traced_piece_keeps_its_argument_flattening():
    module, x, mask, call = branchy_call(1.0)
    clone = copy.deepcopy(trace_piece(module, call, set(), "block"))
    with torch.no_grad():
        assert relative_error(clone(x, mask=mask, scale=2.0)[0], module(x, mask=mask, scale=2.0)[0]) <= 1e-6
    with pytest.raises(ValueError):
        clone(x, mask=mask, scale=5.0)


def test_childless_modules_and_given_leaves_stay_opaque_calls_with_their_owners_kept():
    module, x, mask, call = branchy_call(1.0)
    traced_through = trace_piece(module, call, set(), "block")
    assert [n.target for n in traced_through.graph.nodes if n.op == "call_module"] == ["fc", "inner.0", "inner.1"]
    opaque = trace_piece(module, call, {module.inner}, "block")
    assert [n.target for n in opaque.graph.nodes if n.op == "call_module"] == ["fc", "inner"]
    assert opaque.get_submodule("inner") is module.inner and opaque.get_submodule("fc") is module.fc, \
        "the graph calls the model's own modules (their later rewrite is the model's)"


def test_piece_that_does_not_trace_is_none(caplog):
    class Checks(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(H, H)

        def forward(self, x):
            if not isinstance(x, torch.Tensor):  # a proxy is not a Tensor
                raise TypeError("x must be a tensor")
            return self.fc(x)

    module = Checks()
    with caplog.at_level(logging.DEBUG, logger="moefx"), pytest.raises(NotTraced, match="x must be a tensor"):
        trace_piece(module, record(module, torch.randn(2, H)), set(), "checks")
    assert "checks does not trace (TypeError: x must be a tensor)" in caplog.text


def test_piece_whose_graph_does_not_reproduce_the_recorded_output_is_refused(caplog):
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(H, H)

        def forward(self, x):
            return self.fc(x) + torch.rand_like(x)  # a fresh draw each run

    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.calls = nn.Linear(H, H), 0

        def forward(self, x):
            self.calls += 1  # Python state: the trace bakes in the count it saw
            return self.fc(x) * self.calls

    for module in (Noisy(), Counting()):
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="moefx"), pytest.raises(NotTraced, match="other values"):
            trace_piece(module, record(module, torch.randn(2, H)), set(), "p")
        assert "traced p differs from the module on its own inputs" in caplog.text

    deterministic = Twice()
    assert trace_piece(deterministic, record(deterministic, torch.randn(2, H)), set(), "p") is not None


# ---------------------------------------------------------------- CallSpec, mismatch

def test_callspec_counts_tensors_as_inputs_and_everything_else_as_constants():
    x = torch.randn(2, H)
    spec = CallSpec.of((x, None, 3), {"flag": True, "ids": torch.tensor([1, 2]), "dtype": torch.float16, "s": "a"},
                       "p")
    assert spec.num_inputs == 2
    assert sorted(spec.constants.values(), key=repr) == sorted([None, 3, True, torch.float16, "a"], key=repr)
    ids = torch.tensor([3, 4])
    inputs = spec.inputs((x, None, 3), {"flag": True, "ids": ids, "dtype": torch.float16, "s": "a"})
    assert len(inputs) == 2 and inputs[0] is x and inputs[1] is ids


def test_mismatch_compares_every_output_leaf_by_value_shape_and_count():
    x = torch.randn(4, H)
    out = (x * 2, x.sum())

    def call(output):
        return RecordedCall((x,), {}, output)

    class Fn(nn.Module):
        def __init__(self, fn):
            super().__init__()
            self.fn = fn

        def forward(self, x):
            return self.fn(x)

    assert mismatch(Fn(lambda x: (x * 2, x.sum())), call(out), "p") is None
    assert mismatch(Fn(lambda x: (x * 2 * (1 + 1e-7), x.sum())), call(out), "p") is None, "within 1e-6 relative"
    assert mismatch(Fn(lambda x: (x * 2.001, x.sum())), call(out), "p")
    assert mismatch(Fn(lambda x: (x.reshape(2, -1) * 2, x.sum())), call(out), "p")
    assert mismatch(Fn(lambda x: (x * 2,)), call(out), "p")
    assert mismatch(Fn(lambda x: F.linear(x, torch.ones(3, 3))), call(out), "p"), "raising is not reproducing"


# ---------------------------------------------------------------- module paths

def test_within_matches_whole_path_components_and_empty_scope_is_the_model():
    assert within("layers.1.mlp", "layers.1") and within("layers.1", "")
    assert not within("layers.10.mlp", "layers.1"), "a name prefix is not a parent module"
    assert not within("layers.1", "layers.1"), "a module is not inside itself"


def test_qualified_joins_piece_and_name_without_a_leading_dot_for_the_model():
    assert qualified("", "fc1") == "fc1"
    assert qualified("layers.0", "mlp.fc1") == "layers.0.mlp.fc1"
