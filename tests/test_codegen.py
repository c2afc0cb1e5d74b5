"""moefx.codegen Triton kernels against ``moefx.op.moe_reference`` (fp64), interpreter on CPU and CUDA.

The interpreter cases run in ONE subprocess with TRITON_INTERPRET=1 and MOEFX_KERNELS=triton
(this file re-run as a script, ``--worker``): ``triton.jit`` picks interpreter or compiler when
a kernel is defined, so the variable must be set before moefx.codegen is first imported, and it
must not reach other test files (``torch.export`` of a triton_op fails under the interpreter).
The worker poisons every buffer the launcher allocates (NaN, or out-of-range indices) so that an
element no kernel writes, or an index read before it is written, shows up as an error.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moefx.op import unflatten

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    tokens: int
    experts: int
    top_k: int
    hidden: int = 40  # not a multiple of any block size
    width: int = 24
    gated: bool = True
    bias: bool = True
    activation: str = "silu"
    scoring: str = "softmax"
    renormalize: bool = True
    top_p: float = 1.0
    min_k: int = 1
    num_zero: int = 0
    num_copy: int = 0
    num_const: int = 0
    dtype: str = "float32"
    deterministic: bool = False
    one_expert: bool = False  # router bias sends every token's first choice to expert 0
    router_hidden: int = 0  # > 0: pre-gating, the router reads its own input of this width instead of x
    entry: str = "moe_triton"  # or "op": through torch.ops.moefx.moe, or "triton_op": torch.ops.moefx.moe_triton
    nan_token: bool = False  # token 1's router input is NaN (needs router_hidden): its output must be NaN
    router_shift: float = 0.0  # added to every router bias: -200 underflows fp32 sigmoid scores to 0

    def __str__(self):
        return self.name


# A representative grid (the full cross product would not fit the interpreter's time budget).
CASES = [
    Case("t0", 0, 8, 2),
    Case("t1-e1-k1", 1, 1, 1),
    Case("t1-e8-kE-plain-unit-dense", 1, 8, 8, gated=False, bias=False, activation="relu", scoring="unit",
         renormalize=False),
    Case("t3-e3-k2-sigmoid-gelu", 3, 3, 2, activation="gelu", scoring="sigmoid", entry="op"),
    Case("t17-e8-k2", 17, 8, 2, entry="triton_op"),
    Case("t17-e8-k2-deterministic", 17, 8, 2, deterministic=True),
    Case("t17-e3-k1-one-expert", 17, 3, 1, one_expert=True),
    Case("t130-e64-k2-plain-gelu_tanh", 130, 64, 2, gated=False, activation="gelu_tanh", renormalize=False),
    Case("t130-e8-kE-unit-nobias", 130, 8, 8, bias=False, scoring="unit", renormalize=False),
    Case("t130-e1-k1-one-expert", 130, 1, 1, bias=False, one_expert=True),
    Case("t17-e8-k4-dynamic-k-zero-copy-const", 17, 8, 4, top_p=0.5, num_zero=1, num_copy=1, num_const=2),
    Case("t17-e8-k4-dynamic-k-zc-deterministic", 17, 8, 4, top_p=0.5, min_k=2, num_zero=1, num_copy=1, num_const=2,
         deterministic=True, scoring="sigmoid"),
    Case("t2-e8-k4-dynamic-k-zc-decode", 2, 8, 4, top_p=0.5, num_zero=1, num_copy=1, num_const=2),
    Case("t17-e8-k2-fp16", 17, 8, 2, dtype="float16"),
    Case("t1-e8-k2-fp16-decode", 1, 8, 2, dtype="float16", gated=False),
    Case("t17-e8-k2-pregated", 17, 8, 2, router_hidden=32, num_copy=1),
    Case("t2-e8-k2-pregated-decode", 2, 8, 2, router_hidden=56),
    # A NaN router row gives that token NaN (the reference's answer), never a zero row or an out-of-range id.
    Case("t17-e8-k2-nan-router-row", 17, 8, 2, router_hidden=32, nan_token=True),
    Case("t2-e8-k2-nan-router-row-decode", 2, 8, 2, router_hidden=32, nan_token=True),
    Case("t17-e8-k2-unit-nan-router-row", 17, 8, 2, router_hidden=32, nan_token=True, scoring="unit",
         renormalize=False),
    # Renormalised sigmoid scores that underflow in fp32 (0/0 without the log-space renormalisation).
    Case("t17-e8-k2-sigmoid-underflow", 17, 8, 2, scoring="sigmoid", router_shift=-200.0),
    Case("t2-e8-k2-sigmoid-underflow-decode", 2, 8, 2, scoring="sigmoid", router_shift=-200.0),
    # Many router blocks: the permutation's chunked walk over block counts and 64-bit row offsets.
    Case("t1024-e4-k1-many-blocks", 1024, 4, 1, hidden=20, width=12),
]
TOLERANCE = {"float32": 1e-5, "float16": 3e-3, "bfloat16": 2e-2}


def make_inputs(case: Case, device="cpu", seed=0):
    """The op's positional arguments for ``case``; weights scaled so activations stay O(1)."""
    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, case.dtype)
    choices = case.experts + case.num_zero + case.num_copy + case.num_const
    f_in = 2 * case.width if case.gated else case.width

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)

    x = rand(case.tokens, case.hidden)
    router_hidden = case.router_hidden or case.hidden
    router_input = rand(case.tokens, router_hidden) if case.router_hidden else x
    w_router = rand(choices, router_hidden, scale=2 / math.sqrt(router_hidden))
    b_router = rand(choices, scale=0.5) if case.bias else None
    if case.one_expert:
        b_router = torch.zeros(choices, dtype=dtype, device=device) if b_router is None else b_router
        b_router[0] += 30.0
    if case.router_shift:
        b_router = b_router + case.router_shift
    if case.nan_token:
        router_input[1, 3] = math.nan
    w_in = rand(case.experts, f_in, case.hidden, scale=1 / math.sqrt(case.hidden))
    b_in = rand(case.experts, f_in, scale=0.1) if case.bias else None
    w_out = rand(case.experts, case.hidden, case.width, scale=1 / math.sqrt(case.width))
    b_out = rand(case.experts, case.hidden, scale=0.1) if case.bias else None
    const = rand(case.num_const, case.hidden) if case.num_const else None
    return (x, router_input, w_router, b_router, w_in, b_in, w_out, b_out, const, case.top_k, case.activation, case.gated,
            case.scoring, case.renormalize, case.top_p, case.min_k, 1.25, case.num_zero, case.num_copy)


def relative_error(out, args) -> float:
    from moefx.op import moe_reference
    ref = moe_reference(*unflatten([a.double().cpu() if isinstance(a, torch.Tensor) else a for a in args]))
    if ref.numel() == 0:
        return 0.0 if out.shape == ref.shape else math.inf
    out = out.double().cpu()
    nan_rows = ref.isnan().any(-1)
    if not torch.equal(out.isnan().all(-1), nan_rows) or not torch.isfinite(out[~nan_rows]).all():
        return math.inf  # NaN exactly in the reference's NaN rows (whole rows), finite elsewhere
    return ((out[~nan_rows] - ref[~nan_rows]).norm() / ref[~nan_rows].norm()).item()


def routing_facts(args) -> dict:
    """How the reference routes: proves a case exercises what its name says."""
    from moefx.op import route
    x, router_input, w_router, b_router, w_in = args[:5]
    if x.shape[0] == 0:
        return {}
    gates, ids = route(router_input, w_router, b_router, unflatten(args)[1])
    num_experts = w_in.shape[0]
    return {"dropped": int((gates == 0).sum()), "zero_computation": int((ids >= num_experts).sum()),
            "experts_used": int(ids.unique().numel()), "nan_rows": int(gates.isnan().any(-1).sum())}


def run(case: Case) -> torch.Tensor:
    args = make_inputs(case)
    torch.use_deterministic_algorithms(case.deterministic)
    if case.entry == "op":
        return torch.ops.moefx.moe(*args)
    if case.entry == "triton_op":
        return torch.ops.moefx.moe_triton(*args)
    from moefx.codegen import moe_triton
    return moe_triton(*unflatten(args))


def poison_allocations():
    """Make torch.empty/empty_like return NaN floats and out-of-range integers (worker process only)."""
    def poisoned(alloc):
        def wrapper(*args, **kwargs):
            t = alloc(*args, **kwargs)
            return t.fill_(float("nan") if t.is_floating_point() else 2 ** 30)
        return wrapper
    torch.empty = poisoned(torch.empty)
    torch.empty_like = poisoned(torch.empty_like)


def worker():
    assert os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("MOEFX_KERNELS") == "triton"
    import moefx.codegen  # noqa: F401  registers moefx::moe_triton, kernels defined under the interpreter
    poison_allocations()
    results = {}
    for case in CASES:
        try:
            out = run(case)
            results[case.name] = {"rel_err": relative_error(out, make_inputs(case)), "shape": list(out.shape),
                                  "dtype": str(out.dtype), **routing_facts(make_inputs(case))}
        except Exception as exc:  # reported per case by the parent
            results[case.name] = {"exception": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(results))


@pytest.fixture(scope="module")
def interpreter_results():
    env = {**os.environ, "TRITON_INTERPRET": "1", "MOEFX_KERNELS": "triton",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, __file__, "--worker"], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", CASES, ids=str)
def test_interpreter_matches_reference(case, interpreter_results):
    result = interpreter_results[case.name]
    assert "exception" not in result, result["exception"]
    assert result["shape"] == [case.tokens, case.hidden] and result["dtype"] == f"torch.{case.dtype}"
    assert result["rel_err"] <= TOLERANCE[case.dtype], result
    if case.top_p < 1.0:
        assert result["dropped"] > 0, "dynamic-k dropped no choice: the case does not test it"
    if case.num_zero + case.num_copy + case.num_const:
        assert result["zero_computation"] > 0, "no token chose a zero-computation expert"
    if case.one_expert and case.top_k == 1:
        assert result["experts_used"] == 1
    if case.nan_token:
        assert result["nan_rows"] == 1


def test_triton_op_has_the_op_schema_and_traces_without_host_sync():
    """moefx::moe_triton is a drop-in for moefx::moe; its body runs on fake tensors (no .item(), no sync)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    import moefx.op  # noqa: F401
    from moefx.codegen import TRITON_OP

    ours, theirs = torch.ops.moefx.moe_triton.default._schema, torch.ops.moefx.moe.default._schema
    assert TRITON_OP == "moefx::moe_triton"
    assert [(a.name, str(a.type)) for a in ours.arguments] == [(a.name, str(a.type)) for a in theirs.arguments]
    assert [str(r.type) for r in ours.returns] == [str(r.type) for r in theirs.returns]
    for tokens, deterministic in ((1, False), (300, False), (300, True)):
        case = Case("trace", tokens, 8, 2, top_p=0.7, num_copy=1, num_const=1, deterministic=deterministic)
        args = make_inputs(case)
        torch.use_deterministic_algorithms(deterministic)
        try:
            gm = make_fx(lambda *a: torch.ops.moefx.moe_triton(*a, *args[9:]), tracing_mode="fake")(*args[:9])
        finally:
            torch.use_deterministic_algorithms(False)
        assert "moefx.moe_triton" in gm.code


SM90_SHAPES = {"qwen3-30b-a3b": (2048, 768, 128, 8), "mixtral": (4096, 14336, 8, 2)}


def meta_args(hidden, width, experts, top_k, tokens, dtype=torch.bfloat16):
    """Op arguments on the meta device: shapes and dtypes only, nothing allocated."""
    def empty(*shape):
        return torch.empty(*shape, dtype=dtype, device="meta")
    x = empty(tokens, hidden)
    return (x, x, empty(experts, hidden), None, empty(experts, 2 * width, hidden), None, empty(experts, hidden, width),
            None, None, top_k, "silu", True, "softmax", True, 1.0, 1, 1.0, 0, 0)


@pytest.mark.parametrize("tokens, deterministic, kernels", [
    (1, False, ["router_logits_kernel", "decode_up_kernel", "decode_down_kernel"]),
    (4096, False, ["router_kernel", "permute_kernel", "grouped_up_kernel", "grouped_down_kernel"]),
    (4096, True, ["router_kernel", "permute_kernel", "grouped_up_kernel", "grouped_down_kernel", "combine_kernel"]),
])
def test_pipeline_launches(tokens, deterministic, kernels):
    """At most 4 launches (decode 3), 5 with the deterministic combine; nothing else runs."""
    from moefx.codegen.launch import plan
    torch.use_deterministic_algorithms(deterministic)
    try:
        _, launches = plan(*unflatten(meta_args(*SM90_SHAPES["qwen3-30b-a3b"], tokens)), kind="sm90",
                           multiprocessors=132)
    finally:
        torch.use_deterministic_algorithms(False)
    assert [step.kernel.__name__ for step in launches] == kernels


@pytest.mark.parametrize("bucket", [(3, 4), (5, 6, 7, 8), (17, 24, 32), (4097, 9000, 16384), (16385, 50000)], ids=str)
def test_token_counts_in_a_bucket_share_compiled_kernels(bucket):
    """Within a token bucket every launch has the same constexprs and options, and every integer
    argument that changes with the token count is exempt from Triton's specialisation: one
    compiled variant per bucket, so serving never JIT-compiles for a new token count."""
    from moefx.codegen.launch import plan
    plans = [plan(*unflatten(meta_args(*SM90_SHAPES["qwen3-30b-a3b"], tokens)), kind="sm90", multiprocessors=132)[1]
             for tokens in bucket]
    for steps in zip(*plans):
        kernel = steps[0].kernel
        assert all(step.kernel is kernel for step in steps)
        assert all(step.kwargs == steps[0].kwargs for step in steps), kernel.__name__
        exempt = {kernel.arg_names[i] if isinstance(i, int) else i for i in kernel.do_not_specialize or ()}
        for name, *values in zip(kernel.arg_names, *(step.args for step in steps)):
            if isinstance(values[0], int) and len(set(values)) > 1:
                assert name in exempt, f"{kernel.__name__}.{name} varies with the token count but is specialised"


def _has_nvidia_toolchain():
    try:
        from moefx.codegen.aot import nvidia_tool
    except ImportError:
        return False
    return os.path.exists(nvidia_tool("ptxas")) and os.path.exists(nvidia_tool("cuobjdump"))


@pytest.mark.skipif(not _has_nvidia_toolchain(), reason="triton wheel without the NVIDIA backend tools")
@pytest.mark.parametrize("shape", SM90_SHAPES, ids=str)
def test_kernels_compile_for_sm90_without_spills(shape):
    """Every launch of the decode, grouped and deterministic pipelines lowers to sm90 SASS with no
    register spills, and the large-token grouped GEMMs use Hopper's wgmma (HGMMA)."""
    from moefx.codegen.aot import resource_report
    from moefx.codegen.launch import plan
    reports = []
    for tokens, deterministic in ((1, False), (64, False), (16384, True)):
        torch.use_deterministic_algorithms(deterministic)
        try:
            _, launches = plan(*unflatten(meta_args(*SM90_SHAPES[shape], tokens)), kind="sm90", multiprocessors=132)
        finally:
            torch.use_deterministic_algorithms(False)
        reports += [(tokens, resource_report(step)) for step in launches]
    spilled = [r for _, r in reports if r["spill_stack"] or r["local_loads"]]
    assert not spilled, spilled
    assert all("HGMMA" in r["matrix_instructions"] for tokens, r in reports
               if tokens == 16384 and r["kernel"].startswith("grouped"))


def test_bad_dtype_is_named():
    from moefx.codegen import moe_triton
    args = list(make_inputs(Case("mixed", 3, 4, 2)))
    args[4] = args[4].half()
    with pytest.raises(ValueError, match="cast the experts"):
        moe_triton(*unflatten(args))


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_gpu_matches_reference(case, dtype):
    from moefx.codegen import moe_triton
    case = dataclasses.replace(case, dtype=dtype)
    args = make_inputs(case, device="cuda")
    torch.use_deterministic_algorithms(case.deterministic)
    try:
        out = moe_triton(*unflatten(args))
    finally:
        torch.use_deterministic_algorithms(False)
    assert relative_error(out, args) <= TOLERANCE[dtype]


@pytest.mark.gpu
@cuda
def test_gpu_indexing_past_2_31_elements():
    """x and y hold more than 2**31 elements: token offsets must be 64-bit."""
    from moefx.codegen import moe_triton
    hidden = 4096
    tokens = 2 ** 31 // hidden + 4096
    case = Case("big", tokens, 2, 1, hidden=hidden, width=16, dtype="bfloat16")
    args = make_inputs(case, device="cuda")
    out = moe_triton(*unflatten(args))
    tail = slice(tokens - 512, tokens)  # rows whose element offsets exceed 2**31
    tail_args = (args[0][tail], args[1][tail], *args[2:])
    assert relative_error(out[tail], tail_args) <= TOLERANCE["bfloat16"]


@pytest.mark.gpu
@cuda
def test_gpu_warmup_compiles_every_bucket_once():
    from moefx.codegen import launch, moe_triton, warmup
    case = Case("buckets", 8, 8, 2, hidden=256, width=128, dtype="bfloat16")
    args = make_inputs(case, device="cuda")
    warmup(*unflatten(args), max_tokens=512)
    kernels = [launch.router_kernel, launch.permute_kernel, launch.grouped_up_kernel, launch.grouped_down_kernel,
               launch.decode_up_kernel, launch.decode_down_kernel]

    def compiled():
        return sum(len(cache[0]) for k in kernels for cache in k.device_caches.values())

    before = compiled()
    for tokens in (1, 3, 5, 17, 100, 333, 511):
        x = torch.randn(tokens, case.hidden, dtype=torch.bfloat16, device="cuda")
        moe_triton(*unflatten((x, x, *args[2:])))
    torch.cuda.synchronize()
    assert compiled() == before


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("tokens", [1, 64, 1000])
def test_gpu_cuda_graph_replay(tokens):
    """No host sync anywhere: the whole op captures into a CUDA graph and replays on new inputs."""
    from moefx.codegen import moe_triton
    case = Case("graph", tokens, 16, 4, hidden=256, width=96, dtype="bfloat16", top_p=0.8, num_copy=1)
    args = list(make_inputs(case, device="cuda"))
    static_x = args[0].clone()
    run_args = (static_x, static_x, *args[2:])
    moe_triton(*unflatten(run_args))
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe_triton(*unflatten(run_args))
    static_x.copy_(torch.randn_like(static_x))
    graph.replay()
    torch.cuda.synchronize()
    assert relative_error(out, run_args) <= TOLERANCE["bfloat16"]


@pytest.mark.gpu
@cuda
def test_gpu_deterministic_mode_is_bitwise_repeatable():
    from moefx.codegen import moe_triton
    args = make_inputs(Case("det", 4096, 64, 8, hidden=512, width=256, dtype="bfloat16"), device="cuda")
    torch.use_deterministic_algorithms(True)
    try:
        first, second = moe_triton(*unflatten(args)), moe_triton(*unflatten(args))
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(first, second)


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    worker()
