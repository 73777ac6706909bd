"""DendriticTrainer with the correlation rule under DDP: `accelerate launch --multi_gpu --num_processes 2
ddp_correlation.py OUT --use_cpu` (or torch.distributed.run; the flags after OUT are launch-related training arguments).

Two CPU ranks train the tiny task with gradient accumulation 2 and different data shards. The candidates'
statistics are all-reduced, so after every candidate step the candidates must be identical on both ranks, and
after every installation and at the end all parameters must be. Results go to OUT/rank<r>.json.
"""

from __future__ import annotations

import json
import os
import sys

import torch.distributed as dist
import transformers
from transformers import TrainerCallback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from ddp_train import digest, same_on_all_ranks
from dendritic_task import launch_flags, make_args, task_data, tiny_bert

from hf_dendrites import DendriteConfig, DendriticTrainer


class Probe(TrainerCallback):
    def __init__(self):
        self.trainer = None
        self.candidate_steps = 0
        self.candidates_identical = []
        self.events = []

    def on_step_end(self, args, state, control, **kwargs):
        rule = self.trainer.dendrite_callback.correlation
        if rule is not None:
            self.candidate_steps += 1
            tensors = sorted((f"{n}/{k}", v) for n, pool in rule.pools.items() for k, v in pool.state_dict().items())
            self.candidates_identical.append(same_on_all_ranks(digest(tensors)))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "dendrite_event" in logs:
            model = self.trainer.model
            self.events.append(
                {
                    "event": logs["dendrite_event"],
                    "params_identical": same_on_all_ranks(digest(sorted(model.state_dict().items()))),
                    "wrapper": type(self.trainer.model_wrapped).__name__,
                }
            )


def main(output_dir: str, flags: list[str]) -> None:
    transformers.logging.set_verbosity_error()
    args = make_args(
        output_dir,
        eval_steps=2,
        logging_steps=2,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        dendrite_patience=[1],
        correlation_patience=1,
        max_dendrite_cycles=2,
        max_steps=60,
        **launch_flags(flags),
    )
    probe = Probe()
    config = DendriteConfig(target_modules="all-linear", dendrite_seed=0, learning_rule="correlation", candidate_pool_size=2)
    trainer = DendriticTrainer(
        tiny_bert(), args, train_dataset=task_data(128, 1), eval_dataset=task_data(32, 2), dendrite_config=config, callbacks=[probe]
    )
    probe.trainer = trainer
    trainer.train()
    result = {
        "world_size": dist.get_world_size(),
        "distributed_type": str(trainer.accelerator.distributed_type),
        "candidate_steps": probe.candidate_steps,
        "candidates_identical": probe.candidates_identical,
        "events": probe.events,
        "decisions": [r["decision"] for r in trainer.dendrite_history],
        "final_params_identical": same_on_all_ranks(digest(sorted(trainer.model.state_dict().items()))),
        "history_identical": same_on_all_ranks(json.dumps(trainer.dendrite_history, sort_keys=True)),
        "dendrite_counts": sorted(set(trainer.model.dendrite_counts().values())),
    }
    with open(os.path.join(output_dir, f"rank{dist.get_rank()}.json"), "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=1)
    dist.barrier()
    # Tear the gloo group down before exit: left to interpreter shutdown, a rank could abort (SIGABRT,
    # 'terminate called without an active exception') while the other was still leaving.
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
