"""hyperparameter_search under DDP: run with `python -m torch.distributed.run --nproc_per_node 2 ddp_hp_search.py OUT`.

Both ranks run a 4-trial Optuna search on the tiny task (CPU, gloo). The trials are queued in advance:

0. one dendrite per cycle, full rank: completes (cycle 0 plateaus, one growth, the schedule completes);
1. the correlation rule with a rank: an invalid DendriteConfig, so the trial fails on the main process before
   anything trains, and the other rank must not train it either;
2. two dendrites per cycle, rank 2: completes;
3. scores badly at its third evaluation and is pruned there, which every rank must do at the same step.

At the end of every trial a rank trained (`on_train_end`, which also runs for a pruned trial) each rank records the
trial number, its DendriteConfig, dendrite counts, step, best score and a digest of all parameters, and writes them,
with what the main process's study holds and the best run each rank received, to OUT/rank<r>.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import optuna
import torch
import torch.distributed as dist
from transformers import TrainerCallback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from dendritic_task import ScriptedMetric, make_args, task_data, tiny_bert

from hf_dendrites import DendriteConfig, DendriticTrainer

TRIALS = [
    {"dendrites_per_cycle": 1, "rank": None, "learning_rule": "gd"},
    {"dendrites_per_cycle": 1, "rank": 4, "learning_rule": "correlation"},
    {"dendrites_per_cycle": 2, "rank": 2, "learning_rule": "gd"},
    {"dendrites_per_cycle": 1, "rank": 2, "learning_rule": "gd"},
]
GOOD = [1.0, 0.8, 0.8, 0.8, 0.7, 0.7, 0.7]  # plateau -> grow -> plateau, kept -> complete (max_dendrite_cycles=1)
BAD = [1.0, 0.9, 5.0]  # pruned at the third evaluation by ThresholdPruner(upper=2.0)


def digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class Recorder(TrainerCallback):
    """Records the model each trial ended with (completed or pruned)."""

    def __init__(self):
        self.trainer = None
        self.runs = []

    def on_train_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        model = trainer.model
        self.runs.append(
            {
                "trial": int(state.trial_name.split("-")[1]),
                "dendrite_config": model.dendrite_config.to_dict(),
                "num_dendrites": model.dendrite_summary().num_dendrites,
                "dendrite_params": model.dendrite_summary().dendrite_params,
                "global_step": state.global_step,
                "best_score": trainer.dendrite_best_score,
                "digest": digest(model),
            }
        )


def main(out: str) -> None:
    script = {"metric": ScriptedMetric(GOOD)}
    seen_by_model_init = []

    def model_init(trial):
        # Reads the trial's parameters, as a model_init choosing the model's size would (the other rank gets a
        # FixedTrial, which must hold them too).
        if trial is not None:
            seen_by_model_init.append({"number": trial.number, "params": dict(trial.params)})
        pruned_trial = trial is not None and trial.params.get("rank") == 2 and trial.params.get("dendrites_per_cycle") == 1
        script["metric"] = ScriptedMetric(BAD if pruned_trial else GOOD)
        return tiny_bert()

    recorder = Recorder()
    trainer = DendriticTrainer(
        model_init=model_init,
        args=make_args(
            os.path.join(out, "search"), metric_for_best_model="scripted", greater_is_better=False, max_dendrite_cycles=1,
            max_dendrite_tries=1, save_strategy="steps", save_steps=4,
        ),
        train_dataset=task_data(128, 1),
        eval_dataset=task_data(64, 2),
        compute_metrics=lambda eval_pred: script["metric"](eval_pred),
        dendrite_config=DendriteConfig(target_modules="all-linear"),
        callbacks=[recorder],
    )
    recorder.trainer = trainer

    study_kwargs = {}
    if trainer.args.process_index == 0:
        storage = optuna.storages.InMemoryStorage()
        queued = optuna.create_study(storage=storage, study_name="ddp", direction="minimize")
        for params in TRIALS:
            queued.enqueue_trial(params)
        study_kwargs = {"storage": storage, "study_name": "ddp", "load_if_exists": True}

    def hp_space(trial):
        return {
            "dendrites_per_cycle": trial.suggest_int("dendrites_per_cycle", 1, 2),
            "rank": trial.suggest_categorical("rank", [None, 2, 4]),
            "learning_rule": trial.suggest_categorical("learning_rule", ["gd", "correlation"]),
        }

    best = trainer.hyperparameter_search(
        hp_space=hp_space, n_trials=len(TRIALS), hp_name=lambda trial: f"trial-{trial.number}",
        pruner=optuna.pruners.ThresholdPruner(upper=2.0), **study_kwargs,
    )
    result = {
        "rank": dist.get_rank(),
        "world_size": dist.get_world_size(),
        "runs": recorder.runs,
        "model_init_saw": seen_by_model_init,
        "best": {"run_id": best.run_id, "objective": best.objective, "hyperparameters": best.hyperparameters},
    }
    if best.run_summary is not None:
        trials = best.run_summary.trials
        result["states"] = [t.state.name for t in trials]
        result["errors"] = {str(t.number): t.user_attrs["error"] for t in trials if "error" in t.user_attrs}
        result["user_attrs"] = {str(t.number): t.user_attrs for t in trials}
    with open(os.path.join(out, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(result, f, indent=1)
    dist.barrier()
    # Tear the gloo group down before exit: left to interpreter shutdown, a rank could abort (SIGABRT,
    # 'terminate called without an active exception') while the other was still leaving.
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
