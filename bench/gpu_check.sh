#!/usr/bin/env bash
# The first device call of a session with a lent GPU: every GPU figure moefx owes, as JSON under $OUT.
#
#   bash bench/gpu_check.sh              # on an H100/H200, about 5 minutes from a cold start
#   bash bench/gpu_check.sh --dry-run    # on a CPU: Triton interpreter, tiny shapes, fp32 (CI runs this)
#
# Steps, each under its own time limit (LIMITS, about 6 minutes in all) so that the script always ends
# and says how far it got; each step's rows also go to log.txt as it runs:
#   1. install: moefx from this checkout (PYTHONPATH), wheels from .whl/ if a session carried some
#      (the device machine reaches no index)  -> environment.json (torch, triton, transformers, the GPU)
#   2. pytest -m gpu                          -> pytest_gpu.json (each test's outcome)
#   3. bench/check_kernels.py                 -> kernels.json  (Triton vs reference, bf16 and fp16, bench shapes)
#   4. bench/bench_moe.py (curated)           -> bench_moe.json (decode / mid / prefill rows of Mixtral,
#      Qwen3-30B-A3B and OLMoE, uniform routing, vs torch._grouped_mm and the measured memory floor)
#   5. bench/bench_compile.py                 -> bench_compile.json (eager vs inductor vs backend="moefx")
# plus summary.json (each step's status and seconds) and log.txt: 7 files, under the device tool's 8.
set -uo pipefail

DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    *) echo "gpu_check.sh: unknown argument '$arg'; the only option is --dry-run" >&2; exit 2 ;;
  esac
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$REPO/gpu_check_out}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$REPO" || exit 1
LOG="$OUT/log.txt"
: > "$LOG"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if [ "$DRY_RUN" = 1 ]; then
  export TRITON_INTERPRET=1 MOEFX_KERNELS=triton CUDA_VISIBLE_DEVICES=""
  LIMITS=(300 300 300 300)  # wall time on a possibly shared CPU; the GPU limits below are the budget
  CHECK_ARGS=(--device cpu --dtypes float32 --shape 64,48,8,2 --tokens 5)
  MOE_ARGS=(--device cpu --dtype float32 --shape 64,48,8,2 --tokens 5 --routing uniform)
  COMPILE_ARGS=(--tiny --device cpu --iters 2 --shapes "decode b=1" --variants eager)
else
  LIMITS=(75 45 90 130)
  CHECK_ARGS=(--shapes mixtral,qwen3-30b-a3b,olmoe --dtypes bfloat16,float16 --tokens 1,4096)
  MOE_ARGS=(--shapes mixtral,qwen3-30b-a3b,olmoe --tokens 1,256,4096 --routing uniform)
  COMPILE_ARGS=(--iters 20 --shapes "decode b=1" "prefill 1x4096" --variants eager inductor moefx)
fi

STEPS_JSON=""
step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, log it, record status and seconds
  local name="$1" limit="$2"
  shift 2
  local start=$SECONDS status rc
  echo "=== $name: $*" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  case "$rc" in 0) status=ok ;; 124) status=timeout ;; *) status=failed ;; esac
  local seconds=$((SECONDS - start))
  echo "=== $name: $status (exit $rc, ${seconds}s)" | tee -a "$LOG"
  STEPS_JSON="$STEPS_JSON${STEPS_JSON:+,}{\"step\": \"$name\", \"status\": \"$status\", \"exit\": $rc, \"seconds\": $seconds, \"limit_s\": $limit}"
}

if [ -d "$REPO/.whl" ] && ls "$REPO"/.whl/*.whl > /dev/null 2>&1; then
  step install 120 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$REPO"/.whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
step environment "$([ "$DRY_RUN" = 1 ] && echo 300 || echo 60)" "$PYTHON" - "$OUT/environment.json" "$DRY_RUN" <<'EOF'
import json, platform, sys
import torch, triton, transformers
import moefx  # noqa: F401  (this checkout)
cuda = torch.cuda.is_available()
env = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
       "transformers": transformers.__version__, "cuda": torch.version.cuda, "dry_run": sys.argv[2] == "1",
       "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
       "capability": list(torch.cuda.get_device_capability()) if cuda else None,
       "multiprocessors": torch.cuda.get_device_properties(0).multi_processor_count if cuda else None}
print(json.dumps(env))
if not cuda and sys.argv[2] != "1":
    sys.exit("no CUDA device here: run on a GPU machine, or pass --dry-run")
open(sys.argv[1], "w").write(json.dumps(env, indent=1))
EOF
step pytest_gpu "${LIMITS[0]}" "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests/test_codegen.py \
  --junitxml=/tmp/moefx_pytest_gpu.xml
"$PYTHON" - /tmp/moefx_pytest_gpu.xml "$OUT/pytest_gpu.json" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys, xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError) as why:
    sys.exit(f"no pytest report ({why})")
tests = []
for case in root.iter("testcase"):
    outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
    detail = next((child.get("message", "") for child in case if child.tag != "system-out"), "")
    tests.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                  "seconds": float(case.get("time", 0)), "message": detail[:500]})
counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failure", "error", "skipped")}
print("pytest -m gpu:", counts)
open(sys.argv[2], "w").write(json.dumps({"counts": counts, "tests": tests}, indent=1))
EOF
step check_kernels "${LIMITS[1]}" "$PYTHON" bench/check_kernels.py "${CHECK_ARGS[@]}" --json "$OUT/kernels.json"
step bench_moe "${LIMITS[2]}" "$PYTHON" bench/bench_moe.py "${MOE_ARGS[@]}" --json "$OUT/bench_moe.json"
step bench_compile "${LIMITS[3]}" "$PYTHON" bench/bench_compile.py "${COMPILE_ARGS[@]}" --json "$OUT/bench_compile.json"

echo "{\"dry_run\": $([ "$DRY_RUN" = 1 ] && echo true || echo false), \"steps\": [$STEPS_JSON]}" > "$OUT/summary.json"
cat "$OUT/summary.json"
if grep -q '"status": "\(failed\|timeout\)"' "$OUT/summary.json"; then
  exit 1
fi
