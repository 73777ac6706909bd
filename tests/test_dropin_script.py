"""A stock transformers-style script (tests/scripts/run_classification_dropin.py) with `Trainer` /
`TrainingArguments` swapped for `DendriticTrainer` / `DendriticTrainingArguments`, run end to end as a real
process on a tiny BERT and CSV files made here: train + evaluate + predict, then evaluate/predict only from the
dendritic checkpoint the first run saved (issue 13: evaluation-only runs work, and the checkpoint keeps its
dendrites when loaded through `AutoModelForSequenceClassification` by the script).

Issue 22: what the runs write describes the saved model. A run whose step cap cuts the schedule, with
`load_best_model_at_end`, reports the restored checkpoint's own evaluation and provenance; resumed after its best
checkpoint was deleted, it says the last model was saved and why; an evaluation-only run keeps the training card."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cue_word_csv, tiny_bert_folder
from huggingface_hub import ModelCard

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
    done = _run(
        "--model_name_or_path", str(trained["out"]), "--validation_file", str(trained["train"]),
        "--test_file", str(trained["test"]), "--output_dir", str(out2), "--do_eval", "--do_predict",
        "--log_level", "info",
    )
    first = json.loads((trained["out"] / "eval_results.json").read_text())
    again = json.loads((out2 / "eval_results.json").read_text())
    # Same model, dendrites included: the evaluation of the reloaded checkpoint matches the training run's.
    assert again["eval_loss"] == pytest.approx(first["eval_loss"], rel=1e-5, abs=1e-6)
    assert again["eval_accuracy"] == first["eval_accuracy"]
    assert (out2 / "predict_results.txt").read_text() == (trained["out"] / "predict_results.txt").read_text()
    # Issue 22 (4): the evaluation-only run's model card (the script ends with `create_model_card`, as run_glue.py
    # does) is the evaluated checkpoint's training card, not one made of this run's default schedule settings.
    # (The same lines: the checkpoint stores the summary with sorted keys, so lists may come in another order.)
    assert sorted((out2 / "README.md").read_text().splitlines()) == sorted((trained["out"] / "README.md").read_text().splitlines())
    assert "| `patience` | `[1]` |" in (out2 / "README.md").read_text()
    # Issue 22 (5): the script's --log_level applies to the line the conversion of the loaded checkpoint logs.
    log = done.stdout + done.stderr
    assert f"{trained['out']} is a dendritic checkpoint: restored its" in log, log[-3000:]


# ---------------------------------------------------------------------------------------------- issue 22 (2, 3)
def _card_metrics(folder: Path) -> dict:
    """The model-index metrics of a folder's model card, keyed as the Trainer names them (eval_<metric>)."""
    card = ModelCard.load(folder / "README.md")
    return {f"eval_{r.metric_type}": r.metric_value for r in card.data.eval_results or []}


def _capped_args(model_dir: Path, data: dict, out: Path, *extra: str) -> list:
    # Held-out validation with a high learning rate: the score goes up and down, so the step cap (18) cuts the
    # schedule in a cycle whose last evaluation is not the best one, and `load_best_model_at_end` restores another.
    return [
        "--model_name_or_path", str(model_dir), "--train_file", str(data["train"]), "--validation_file",
        str(data["valid"]), "--output_dir", str(out), "--do_train", "--do_eval", "--eval_strategy", "steps",
        "--eval_steps", "2", "--save_strategy", "steps", "--save_steps", "2", "--load_best_model_at_end",
        "--max_steps", "18", "--learning_rate", "1e-2", "--per_device_train_batch_size", "16", "--dendrite_patience",
        "2", "--max_dendrite_cycles", "3", "--target_modules", "all-linear", "--log_level", "info", *extra,
    ]


@pytest.fixture(scope="module")
def capped(tmp_path_factory):
    root = tmp_path_factory.mktemp("capped")
    data = {"model": tiny_bert_folder(root / "tiny-bert"), "train": cue_word_csv(root / "train.csv", 64, 0),
            "valid": cue_word_csv(root / "valid.csv", 32, 2)}
    out = root / "out"
    done = _run(*_capped_args(data["model"], data, out))
    # what the first run wrote, read before the resume test replaces it
    files = {name: (out / name).read_text() for name in ("README.md", "dendrite_config.json", "eval_results.json",
                                                          "trainer_state.json", "dendrite_evaluations.csv")}
    return {"root": root, "data": data, "out": out, "files": files, "card_metrics": _card_metrics(out),
            "log": done.stdout + done.stderr}


def test_capped_run_reports_the_restored_best_checkpoint(capped):
    """Issue 22 (2): the step cap cuts the schedule and `load_best_model_at_end` restores the best checkpoint: the
    card, the model-index and the training summary report that checkpoint's own evaluation and where it came from."""
    files = capped["files"]
    assert "before the dendrite schedule completed" in capped["log"]
    state = json.loads(files["trainer_state.json"])
    rows = list(csv.DictReader(files["dendrite_evaluations.csv"].splitlines()))
    saved_eval = json.loads(files["eval_results.json"])  # the script's --do_eval of the model it saved
    # Not vacuous: the last evaluation (what the card used to report) is another model's score.
    assert float(rows[-1]["score"]) != pytest.approx(saved_eval["eval_loss"], rel=1e-6)
    assert state["best_model_checkpoint"] and state["best_global_step"] != int(rows[-1]["step"])

    # The card's evaluation results and model-index are the saved model's own evaluation.
    card = capped["card_metrics"]
    assert set(card) == {"eval_loss", "eval_accuracy"}
    for key, value in card.items():
        assert value == pytest.approx(saved_eval[key], rel=1e-6), key
    # Where it came from: the best checkpoint, its step, cycle, try and that try's status.
    summary = json.loads(files["dendrite_config.json"])["training_summary"]
    saved = summary["saved_model"]
    best_step = state["best_global_step"]
    row = next(r for r in rows if int(r["step"]) == best_step)
    status = next(c["status"] for c in summary["cycles"] if (c["cycle"], c["try"]) == (saved["cycle"], saved["try"]))
    assert saved["origin"] == "best checkpoint" and saved["checkpoint"] == os.path.basename(state["best_model_checkpoint"])
    assert (saved["step"], saved["cycle"], saved["try"]) == (best_step, int(row["cycle"]), int(row["try"]))
    assert saved["status"] == status and saved["end_step"] == 18
    assert summary["eval_results"] == {k: pytest.approx(v, rel=1e-6) for k, v in card.items()}
    text = " ".join(files["README.md"].split())
    assert (
        f"The saved model is the best checkpoint, `checkpoint-{best_step}`, that `load_best_model_at_end` loaded when "
        f"training ended at step 18: the weights evaluated at step {best_step} (cycle {saved['cycle']}, try "
        f"{saved['try']}, {status})" in text
    )
    assert "best one found" not in text and f"Of the saved model: its evaluation at step {best_step}" in text


def test_resume_without_the_best_checkpoint_says_the_last_model_was_saved(capped):
    """Issue 22 (3): resumed after its best checkpoint was deleted, the Trainer keeps the last model; the card says
    so (and why), and reports that model's own evaluation."""
    out = capped["out"]
    state = json.loads(capped["files"]["trainer_state.json"])
    best = state["best_global_step"]
    assert best < 16, "the best checkpoint must come before the checkpoint the run resumes from"
    shutil.rmtree(out / f"checkpoint-{best}")
    done = _run(*_capped_args(capped["data"]["model"], capped["data"], out, "--resume_from_checkpoint", str(out / "checkpoint-16")))
    log = done.stdout + done.stderr
    assert "does not exist anymore" in log  # transformers' own warning: it drops the best checkpoint

    saved_eval = json.loads((out / "eval_results.json").read_text())
    card = _card_metrics(out)
    assert set(card) == {"eval_loss", "eval_accuracy"}
    for key, value in card.items():
        assert value == pytest.approx(saved_eval[key], rel=1e-6), key
    saved = json.loads((out / "dendrite_config.json").read_text())["training_summary"]["saved_model"]
    assert saved["origin"] in ("last model", "evaluated after training") and saved["checkpoint"] is None
    assert f"checkpoint-{best}" in saved["note"] and "kept the last model" in saved["note"]
    text = " ".join((out / "README.md").read_text().split())
    assert "The saved model is the last one" in text and "the Trainer kept the last model" in text
    assert "best one found" not in text and "are not in the saved model" not in text
