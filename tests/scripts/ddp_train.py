"""DendriticTrainer under DDP: `python -m torch.distributed.run --nproc_per_node 2 ddp_train.py OUTPUT_DIR --use_cpu
--ddp_backend gloo` (the flags after OUTPUT_DIR are the launch-related training arguments, as a user passes them).

Each rank trains the tiny task on CPU (gloo) with gradient accumulation 2, through a scripted sequence of scores
that makes the schedule grow, switch phases, discard and retry a cycle, and complete. It checks across ranks, with
collectives, that:

- the dendrites a growth adds are identical on every rank before anything is broadcast (seeded growth);
- after every schedule event (growth, retry, phase switch, completion) and at the end all parameters are identical;
- the model is wrapped anew (a new DDP wrapper around the same DendriticModel) after every rebuild;
- every rank holds the same schedule and evaluation log.

and writes what it saw to OUTPUT_DIR/rank<r>.json for the test to assert on. Launched without `--use_cpu`, it must
stop while building the trainer.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import torch
import torch.distributed as dist
import transformers
from transformers import TrainerCallback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from dendritic_task import ScriptedMetric, all_linear, launch_flags, make_args, task_data, tiny_bert

from hf_dendrites import DendriticTrainer

# Cycle 0 plateaus -> grow; cycle 1 dendrite phase -> switch; cycle 1 neuron phase beats cycle 0 -> grow;
# cycle 2 does not beat cycle 1 -> retry; cycle 2 try 2 beats it -> complete (max_dendrite_cycles=2).
SCORES = [1.0, 1.0, 0.95, 0.95, 0.9, 0.9, 0.97, 0.97, 0.96, 0.96, 0.85, 0.85, 0.8, 0.8]


def digest(tensors) -> str:
    h = hashlib.sha256()
    for name, t in tensors:
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def same_on_all_ranks(value) -> bool:
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return all(g == gathered[0] for g in gathered)


class CheckingTrainer(DendriticTrainer):
    """Records, collectively, whether freshly grown dendrites are identical on all ranks (before DDP re-wraps)."""

    growth_checks: list
    stale_wrapper_steps = 0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.growth_checks = []
        grow = self.dendrite_callback.grow_dendrites

        def checked_grow():
            grow()
            self.growth_checks.append(same_on_all_ranks(digest(sorted(self.model.dendrite_state_dict().items()))))

        self.dendrite_callback.grow_dendrites = checked_grow

    def training_step(self, model, inputs, num_items_in_batch=None):
        # Micro-batches the epoch loop still hands the wrapper it started with (a growth happened mid-epoch).
        self.stale_wrapper_steps += model is not self.model_wrapped
        return super().training_step(model, inputs, num_items_in_batch)


class EventChecker(TrainerCallback):
    def __init__(self):
        self.trainer = None
        self.events = []
        self.last_wrapper = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.last_wrapper = self.trainer.model_wrapped

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "dendrite_event" not in logs:
            return
        t = self.trainer
        wrapped = t.model_wrapped
        self.last_wrapper, previous = wrapped, self.last_wrapper
        self.events.append(
            {
                "step": state.global_step,
                "event": logs["dendrite_event"],
                "params_identical": same_on_all_ranks(digest(sorted(t.model.state_dict().items()))),
                "wrapper": type(wrapped).__name__,
                "wraps_model": getattr(wrapped, "module", None) is t.model,
                "new_wrapper": wrapped is not previous,
                "optimizer_matches": sorted(id(p) for g in t.optimizer.param_groups for p in g["params"])
                == sorted(id(p) for p in t.model.parameters() if p.requires_grad),
                "prepared_optimizers": len(t.accelerator._optimizers),
                "prepared_models": len(t.accelerator._models),
                "trainable": sum(p.numel() for p in t.model.parameters() if p.requires_grad),
            }
        )



def write_rank_result(trainer, output, checker, output_dir: str, **extra) -> None:
    """Write what this rank saw (steps, schedule events, whether parameters, history and schedule are identical on
    every rank, plus `extra`) to OUTPUT_DIR/rank<r>.json, then leave the process group together with the other rank."""
    result = {
        "world_size": dist.get_world_size(),
        "distributed_type": str(trainer.accelerator.distributed_type),
        "global_step": output.global_step,
        "done": trainer.dendrite_schedule.done,
        **extra,
        "events": checker.events,
        "final_params_identical": same_on_all_ranks(digest(sorted(trainer.model.state_dict().items()))),
        "history_identical": same_on_all_ranks(json.dumps(trainer.dendrite_history, sort_keys=True)),
        "schedule_identical": same_on_all_ranks(json.dumps(trainer.dendrite_schedule.to_dict(), sort_keys=True)),
        "history": trainer.dendrite_history,
        "dendrite_counts": sorted(set(trainer.model.dendrite_counts().values())),
    }
    with open(os.path.join(output_dir, f"rank{dist.get_rank()}.json"), "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=1)
    dist.barrier()
    # Tear the gloo group down before exit: left to interpreter shutdown, a rank could abort (SIGABRT,
    # 'terminate called without an active exception') while the other was still leaving.
    dist.destroy_process_group()

# The schedule settings that SCORES drives (also used by tests/scripts/fsdp_train.py).
SCHEDULE = {
    "eval_steps": 2, "logging_steps": 2, "per_device_train_batch_size": 4, "dendrite_patience": [1],
    "dendrite_improvement_threshold": [0.01], "dendrites_only_phase": True, "max_dendrite_cycles": 2,
    "max_dendrite_tries": 2, "metric_for_best_model": "scripted", "greater_is_better": False,
}


def main(output_dir: str, flags: list[str]) -> None:
    transformers.logging.set_verbosity_error()
    args = make_args(output_dir, gradient_accumulation_steps=2, **SCHEDULE, **launch_flags(flags))
    checker = EventChecker()
    trainer = CheckingTrainer(
        tiny_bert(),
        args,
        train_dataset=task_data(128, 1),
        eval_dataset=task_data(32, 2),
        dendrite_config=all_linear(),
        compute_metrics=ScriptedMetric(SCORES),
        callbacks=[checker],
    )
    checker.trainer = trainer
    output = trainer.train()
    write_rank_result(
        trainer, output, checker, output_dir,
        growth_checks=trainer.growth_checks, stale_wrapper_steps=trainer.stale_wrapper_steps,
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
