"""torch.compile(model, backend="moefx"): passes, then Inductor; output, gradients, registration."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import torch
from torch._dynamo.utils import counters

import moefx.compile.backend  # noqa: F401  (registers backend="moefx"; moefx/__init__ will import it)
from tests.conftest import relative_error
from tests.test_moe_blocks import BiasedExperts, tiny_moe_model, token_ids


def fresh_compile(model, **kwargs):
    torch._dynamo.reset()
    counters.clear()
    return torch.compile(model, backend="moefx", **kwargs)


def test_compiled_model_matches_eager_with_one_op_per_moe_layer_and_no_graph_break():
    model, moe_layers = tiny_moe_model("qwen2_moe")
    compiled = fresh_compile(model)
    ids = token_ids(5)
    with torch.no_grad():
        out = compiled(ids).logits
        ref = model(ids).logits
    assert counters["moefx"]["graphs"] == 1 and not counters["graph_break"], "one graph, no break in MoE blocks"
    assert counters["moefx"]["moe_calls"] == moe_layers == 2
    assert relative_error(out, ref) <= 1e-5


def test_training_gradients_through_the_op_match_eager():
    model, _ = tiny_moe_model("mixtral")
    block = model.model.layers[0].mlp.train()
    compiled = fresh_compile(block)
    x = torch.randn(2, 5, 32, requires_grad=True)
    out = compiled(x)
    out.square().sum().backward()
    grads = [x.grad.clone()] + [p.grad.clone() for p in block.parameters()]
    assert counters["moefx"]["moe_calls"] == 1
    x.grad = None
    block.zero_grad()
    ref = block(x)
    ref.square().sum().backward()
    ref_grads = [x.grad] + [p.grad for p in block.parameters()]
    assert relative_error(out, ref) <= 1e-5
    for grad, ref_grad in zip(grads, ref_grads):
        assert relative_error(grad, ref_grad) <= 1e-5


def test_graph_the_passes_cannot_rewrite_still_compiles_and_says_why(caplog):
    torch.manual_seed(0)
    block = BiasedExperts()
    compiled = fresh_compile(block)
    x = torch.randn(6, 16)
    with caplog.at_level(logging.DEBUG, logger="moefx"), torch.no_grad():
        out = compiled(x)
    assert counters["moefx"]["graphs"] == 1 and counters["moefx"]["moe_calls"] == 0
    assert "not rewritten" in caplog.text
    with torch.no_grad():
        assert relative_error(out, block(x)) <= 1e-5


def test_backend_name_resolves_through_the_entry_point_without_importing_moefx():
    script = textwrap.dedent("""
        import sys, torch
        assert "moefx" not in sys.modules
        f = torch.compile(lambda x: torch.relu(x) * 2, backend="moefx")
        x = torch.randn(8)
        assert torch.equal(f(x), torch.relu(x) * 2)
        from torch._dynamo.utils import counters
        assert "moefx.compile.backend" in sys.modules and counters["moefx"]["graphs"] == 1
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd="/",
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
