"""bench/gpu_check.sh (the first device call of a GPU session) runs end to end as a CPU dry run: every step
succeeds under the Triton interpreter at tiny shapes and writes its JSON, so the script cannot reach a
lent GPU broken."""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIGURES = ("environment", "pytest_gpu", "kernels", "bench_moe", "bench_compile", "summary")


def test_dry_run_writes_every_figure_as_json():
    # its own temporary folder: pytest sessions started meanwhile may prune older tmp_path folders
    with tempfile.TemporaryDirectory() as out:
        _check_dry_run(Path(out))


def _check_dry_run(tmp_path: Path):
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run"], cwd=REPO,
                          env={**os.environ, "OUT": str(tmp_path)}, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    figures = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in FIGURES}
    assert [s["status"] for s in figures["summary"]["steps"]] == ["ok"] * 5
    assert figures["summary"]["dry_run"] and figures["environment"]["dry_run"]
    assert figures["pytest_gpu"]["counts"]["skipped"] > 0 and not figures["pytest_gpu"]["counts"]["failure"]
    assert all(row["ok"] for row in figures["kernels"]["rows"]) and figures["kernels"]["rows"]
    assert figures["bench_moe"]["rows"][0]["rel_err_vs_grouped_mm"] <= 1e-5
    assert figures["bench_compile"]["results"][0]["variant"] == "eager"
    assert len(list(tmp_path.iterdir())) <= 8, "the device tool returns at most 8 files from $OUT"


def test_unknown_argument_is_named():
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--fast"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "unknown argument '--fast'" in proc.stderr
