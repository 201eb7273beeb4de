"""bench/gpu.sh end to end in its shrunk CPU mode: dependencies checked, the GPU tier run (skipped
here), the side-by-side bench for both models written to the folder asked for, not bench/results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_script_runs_end_to_end_in_its_cpu_mode(tmp_path: Path) -> None:
    results = ROOT / "bench" / "results"
    before = sorted(results.iterdir()) if results.exists() else []
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODSERVE_")}
    env["PYTHON"] = sys.executable
    out = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--cpu-smoke", "--out-dir", str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "[2/3] GPU test tier" in out.stdout and "skipped" in out.stdout  # no CUDA here
    (summary_path,) = tmp_path.glob("gpu-summary-*-cpu-smoke.json")
    summary = json.loads(summary_path.read_text())
    assert {r["config"] for r in summary["runs"]} == {"compute", "unet"}
    for run in summary["runs"]:
        assert not any(run["errors"].values()), run
        assert run["best_rps"]["service"] > 0 and run["best_rps"]["service_v2"] > 0
        assert run["pipeline_c1_ms"] > 0 and set(run["ceiling_images_per_s"]) == {"1", "2"}
    assert len(list(tmp_path.glob("*.png"))) == 2
    assert (sorted(results.iterdir()) if results.exists() else []) == before
