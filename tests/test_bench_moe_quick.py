"""benchmarks/bench_moe.py's quick mode, end to end in a real process (the full run is committed in
benchmarks/results/moe_cost.json)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_moe_quick(tmp_path):
    out = tmp_path / "moe_cost.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_moe.py"), "--quick", "--output", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=str(ROOT), stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    result = json.loads(out.read_text())
    assert result["quick"] is True and result["command"].startswith("python benchmarks/bench_moe.py --quick")
    (row,) = result["rows"]
    assert row["K"] == 1 and row["experts"] == 4
    assert set(row["variants"]) == {"plain_wide", "dendritic", "plain", "dendritic_rank"}
    assert all(v["median_ms"] > 0 and v["ratio"] > 0 for v in row["variants"].values())
    assert row["variants"]["plain_wide"]["ratio"] == 1.0
