"""Disk cost of DendriticTrainer checkpoints (issue 13): the best-weight snapshots are stored once per change."""

import json
import os

import torch
import transformers
from dendritic_task import ScriptedMetric, make_args, task_data
from transformers import Trainer, TrainingArguments

from hf_dendrites import DendriteConfig, DendriticTrainer, get_dendritic_model
from hf_dendrites.constants import DENDRITE_SCHEDULE_NAME, DENDRITE_WEIGHTS_NAME
from hf_dendrites.trainer_state import read_schedule_payload, read_snapshots

# Cycle 0 plateaus at the third evaluation (growth at step 6); cycle 1 keeps improving until max_steps.
SCORES = [1.0, 1.0, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]
COMMON = {
    "eval_strategy": "steps", "eval_steps": 2, "save_strategy": "steps", "save_steps": 2, "max_steps": 20, "per_device_train_batch_size": 16,
    "learning_rate": 1e-3, "lr_scheduler_type": "constant", "use_cpu": True, "report_to": [], "disable_tqdm": True, "seed": 0,
}


def _model():
    """Big enough that weights, not the small JSON / RNG files, dominate a checkpoint."""
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=2000, hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128,
        max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(config)


def _disk_use(folder) -> int:
    """Bytes of every file in the checkpoints under `folder`, each inode counted once (hard links are free)."""
    seen, total = set(), 0
    for root, _, files in os.walk(folder):
        if "checkpoint-" not in root:
            continue
        for name in files:
            st = os.stat(os.path.join(root, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def _dendritic_run(output_dir, **overrides):
    trainer = DendriticTrainer(
        _model(),
        make_args(str(output_dir), **{**COMMON, **overrides}, metric_for_best_model="scripted", greater_is_better=False,
                  dendrite_patience=[2], dendrite_improvement_threshold=[0.01], max_dendrite_cycles=1),
        train_dataset=task_data(64, 1), eval_dataset=task_data(16, 2),
        dendrite_config=DendriteConfig(target_modules=["intermediate.dense"], dendrite_seed=0),
        compute_metrics=ScriptedMetric(SCORES),
    )
    trainer.train()
    return trainer


def test_checkpoints_with_one_growth_cost_little_more_than_without_dendrites(tmp_path):
    dendritic = _dendritic_run(tmp_path / "dendritic")
    assert [a for a in (r["decision"] for r in dendritic.dendrite_history) if a != "continue"] == ["grow"]
    plain = Trainer(_model(), TrainingArguments(output_dir=str(tmp_path / "plain"), **COMMON),
                    train_dataset=task_data(64, 1), eval_dataset=task_data(16, 2))
    plain.train()
    checkpoints = sorted(p.name for p in (tmp_path / "dendritic").iterdir() if p.name.startswith("checkpoint-"))
    assert checkpoints == sorted(p.name for p in (tmp_path / "plain").iterdir() if p.name.startswith("checkpoint-"))
    assert len(checkpoints) == 10

    # The dendrites themselves (and their Adam moments in optimizer.pt) are the allowance on top of 1.2x.
    dendrite_bytes = sum(
        3 * os.path.getsize(tmp_path / "dendritic" / c / DENDRITE_WEIGHTS_NAME) for c in checkpoints
    )
    used, baseline = _disk_use(tmp_path / "dendritic"), _disk_use(tmp_path / "plain")
    assert used <= 1.2 * baseline + dendrite_bytes, (used, baseline, dendrite_bytes)

    # How: cycle 0's best (step 2) is checkpoint-2's own model; later checkpoints hard-link those files.
    source = os.stat(tmp_path / "dendritic" / "checkpoint-2" / "model.safetensors").st_ino
    for c in checkpoints:
        snapshots = json.loads((tmp_path / "dendritic" / c / DENDRITE_SCHEDULE_NAME).read_text())["snapshots"]
        # before the growth (step 6) cycle 0's best is the cycle's best; from then on it is the accepted model
        info = snapshots["cycle_best" if int(c.split("-")[1]) < 6 else "accepted"]
        assert info["step"] == 2
        folder = tmp_path / "dendritic" / c / info["stored"]["path"]
        assert info["stored"]["kind"] == "model" and (info["stored"]["path"] == ".") == (c == "checkpoint-2")
        assert os.stat(folder / "model.safetensors").st_ino == source


def test_rotated_checkpoints_keep_the_snapshots_the_last_one_needs(tmp_path):
    trainer = _dendritic_run(tmp_path, save_total_limit=2)
    checkpoints = sorted((p for p in tmp_path.iterdir() if p.name.startswith("checkpoint-")), key=lambda p: int(p.name.split("-")[1]))
    assert [p.name for p in checkpoints] == ["checkpoint-18", "checkpoint-20"]
    last = checkpoints[-1]
    payload = read_schedule_payload(str(last))
    fresh = get_dendritic_model(_model(), DendriteConfig(target_modules=["intermediate.dense"], dendrite_seed=0))
    snaps = read_snapshots(str(last), payload, fresh)
    # The accepted best (cycle 0's model, saved as checkpoint-2, long rotated away) survives through its hard links.
    accepted = trainer.dendrite_callback.accepted
    assert snaps["accepted"].step == accepted.step == 2
    assert snaps["accepted"].state.keys() == accepted.state.keys()
    for key, value in accepted.state.items():
        assert torch.equal(snaps["accepted"].state[key], value), key
    assert snaps["cycle_best"].step == 20 and payload["snapshots"]["cycle_best"]["stored"] == {"kind": "model", "path": "."}
