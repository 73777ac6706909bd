"""DendriticSFTTrainer under DDP: `python -m torch.distributed.run --nproc_per_node 2 ddp_sft.py OUTPUT_DIR MODEL_DIR
--use_cpu [--fsdp2]` (MODEL_DIR: a tiny Llama folder, tests/trl_task.py; the flags after it are launch-related
training arguments, as a user passes them; `--fsdp2` trains under FSDP version 2 instead of DDP).

Each rank has TRL load the model from MODEL_DIR and trains it on CPU (gloo) through a scripted sequence of scores that
makes the schedule grow, discard and retry the cycle, and complete. After every schedule event and at the end it
checks, with collectives, that all parameters are identical on both ranks and that the model is wrapped anew (DDP),
and writes what it saw to OUTPUT_DIR/rank<r>.json for the test to assert on.
"""

from __future__ import annotations

import os
import sys

import transformers

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from ddp_train import EventChecker, write_rank_result
from dendritic_task import ScriptedMetric, launch_flags
from trl_task import sft_data, trl_args

from hf_dendrites import DendriteConfig, DendriticSFTTrainer

SCORES = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.9, 0.9, 0.9]  # grow, retry (discard), complete


def main(output_dir: str, model_dir: str, flags: list[str]) -> None:
    transformers.logging.set_verbosity_error()
    launch = {}
    if "--fsdp2" in flags:  # shard the decoder layers (and the rest at the root), as for any Llama under FSDP2
        flags = [f for f in flags if f != "--fsdp2"]
        launch = {"fsdp": True, "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}}
    args = trl_args(
        "sft", output_dir, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        metric_for_best_model="scripted", greater_is_better=False, **launch_flags(flags), **launch,
    )
    if launch:  # under FSDP2: the checker that gathers the sharded parameters and records the sharding
        from fsdp_train import EventChecker as FsdpEventChecker

        checker = FsdpEventChecker()
    else:
        checker = EventChecker()
    trainer = DendriticSFTTrainer(
        model=model_dir, args=args, train_dataset=sft_data(64, 1), eval_dataset=sft_data(16, 2),
        compute_metrics=ScriptedMetric(SCORES), callbacks=[checker],
        dendrite_config=DendriteConfig(target_modules="all-linear"),  # no seed: args.seed, the same on every rank
    )
    checker.trainer = trainer
    output = trainer.train()
    if launch:
        from hf_dendrites import fsdp

        fsdp.unshard(trainer.model)  # the whole model, plain, on every rank: what the report digests and compares
    write_rank_result(trainer, output, checker, output_dir)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
