"""A stock transformers-style script (tests/scripts/run_classification_dropin.py) with `Trainer` /
`TrainingArguments` swapped for `DendriticTrainer` / `DendriticTrainingArguments`, run end to end as a real
process on a tiny BERT and CSV files made here: train + evaluate + predict, then evaluate/predict only from the
dendritic checkpoint the first run saved (issue 13: evaluation-only runs work, and the checkpoint keeps its
dendrites when loaded through `AutoModelForSequenceClassification` by the script)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cue_word_csv, tiny_bert_folder

SCRIPT = Path(__file__).resolve().parent / "scripts" / "run_classification_dropin.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--report_to", "none", "--use_cpu", "--dendrite_seed", "0", *args],
        capture_output=True, text=True, timeout=600, env=env, stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, f"script failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("dropin")
    model_dir = tiny_bert_folder(root / "tiny-bert")
    train = cue_word_csv(root / "train.csv", 64, 0)
    test = cue_word_csv(root / "test.csv", 24, 1)
    out = root / "out"
    # Validation = training data: the loss keeps falling with more training, so the dendrite cycle is kept.
    done = _run(
        "--model_name_or_path", str(model_dir), "--train_file", str(train), "--validation_file", str(train),
        "--test_file", str(test), "--output_dir", str(out), "--do_train", "--do_eval", "--do_predict",
        "--eval_strategy", "steps", "--eval_steps", "4", "--save_strategy", "no", "--max_steps", "200",
        "--learning_rate", "3e-3", "--per_device_train_batch_size", "16", "--dendrite_patience", "1",
        "--max_dendrite_cycles", "1", "--max_dendrite_tries", "2", "--target_modules", "all-linear",
        "--log_level", "info",
    )
    return {"root": root, "out": out, "train": train, "test": test, "log": done.stdout + done.stderr}


def test_train_evaluate_predict_writes_a_dendritic_checkpoint(trained):
    out = trained["out"]
    for name in ("config.json", "model.safetensors", "dendrite_config.json", "dendrite_model.safetensors",
                 "README.md", "eval_results.json", "train_results.json", "trainer_state.json"):
        assert (out / name).is_file(), name
    counts = json.loads((out / "dendrite_config.json").read_text())["layers"]
    assert sum(counts.values()) > 0, "the run kept no dendrite cycle; the reload check below would be vacuous"
    lines = (out / "predict_results.txt").read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 1 + 24
    # The schedule's decisions reach a script's log at info level, through transformers' verbosity.
    assert "hf_dendrites" in trained["log"] and "grow" in trained["log"].lower()


def test_evaluate_and_predict_only_from_the_dendritic_checkpoint(trained):
    out2 = trained["root"] / "eval_only"
    _run(
        "--model_name_or_path", str(trained["out"]), "--validation_file", str(trained["train"]),
        "--test_file", str(trained["test"]), "--output_dir", str(out2), "--do_eval", "--do_predict",
    )
    first = json.loads((trained["out"] / "eval_results.json").read_text())
    again = json.loads((out2 / "eval_results.json").read_text())
    # Same model, dendrites included: the evaluation of the reloaded checkpoint matches the training run's.
    assert again["eval_loss"] == pytest.approx(first["eval_loss"], rel=1e-5, abs=1e-6)
    assert again["eval_accuracy"] == first["eval_accuracy"]
    assert (out2 / "predict_results.txt").read_text() == (trained["out"] / "predict_results.txt").read_text()
