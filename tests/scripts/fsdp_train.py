"""DendriticTrainer under FSDP2 (or DDP, for comparison) on two CPU processes:
`python -m torch.distributed.run --nproc_per_node 2 fsdp_train.py OUTPUT_DIR MODE [--resume CHECKPOINT] [--device cuda]`.

`--variant search` runs an LR search with `load_best_model_at_end` instead (see SEARCH_SCORES); `--variant restarts`
the schedule with `dendrite_restarts_only=True`.

MODE is `fsdp` (`fsdp=True`, `fsdp_config={"version": 2, ...}`; on CPU that is gloo, on `--device cuda` NCCL) or
`ddp` (the same run under DDP). Each rank trains the tiny task through a scripted sequence of scores that makes the
schedule grow, switch to the neuron phase, grow again, discard and retry a cycle, and complete (the same script as
tests/scripts/ddp_train.py, without gradient accumulation), with a checkpoint at every evaluation. It records, with
collectives:

- after every schedule event and at the end: whether the whole parameters (gathered from the shards) are identical
  on all ranks, whether the model is sharded by FSDP2 (`FSDPModule`, every parameter a `DTensor`), and how many
  parameters train;
- the final whole state dict (rank 0 writes it to OUTPUT_DIR/final_state.safetensors) and the logits of a fixed batch
  computed by the trained (sharded) model, after `trainer.save_model()` wrote OUTPUT_DIR/final;

and writes it to OUTPUT_DIR/rank<r>.json. With `--resume CHECKPOINT` the run continues from that checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
import transformers
from safetensors.torch import save_file
from transformers import TrainerCallback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from ddp_train import SCHEDULE, SCORES, digest, same_on_all_ranks, write_rank_result
from dendritic_task import SEQ, ScriptedMetric, all_linear, make_args, task_data, tiny_bert

from hf_dendrites import DendriticTrainer, fsdp
from hf_dendrites.fsdp import cpu_copy

# With the LR search (factors 1.0, 0.3): grow at step 4; factor 1.0 plateaus -> next LR (step 8); factor 0.3 scores
# 0.5 at step 10 and plateaus -> cycle 1 kept, grow (step 12, two dendrites per layer); next LR (step 16); max_steps
# (step 20) ends the run before the schedule completes, and `load_best_model_at_end` loads checkpoint-10 (one
# dendrite per layer).
SEARCH_SCORES = [1.0, 1.0, 0.9, 0.9, 0.5, 0.6, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7]


def full_state(model) -> dict[str, torch.Tensor]:
    """The whole state dict on the CPU (sharded parameters gathered: every rank must call it)."""
    return {k: cpu_copy(v) for k, v in model.state_dict().items()}


def sharding(model) -> dict:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    return {
        "fsdp_module": isinstance(model, FSDPModule),
        "all_dtensor": all(isinstance(p, DTensor) for p in params),
        "dendrites_dtensor": all(isinstance(p, DTensor) for p in model.dendrite_parameters()),
    }


class EventChecker(TrainerCallback):
    def __init__(self):
        self.trainer = None
        self.events = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "dendrite_event" not in logs:
            return
        t = self.trainer
        self.events.append(
            {
                "step": state.global_step,
                "event": logs["dendrite_event"],
                "params_identical": same_on_all_ranks(digest(sorted(full_state(t.model).items()))),
                **sharding(t.model),
                "optimizer_matches": sorted(id(p) for g in t.optimizer.param_groups for p in g["params"])
                == sorted(id(p) for p in t.model.parameters() if p.requires_grad),
                "prepared_models": len(t.accelerator._models),
                "trainable": sum(p.numel() for p in t.model.parameters() if p.requires_grad),
            }
        )


def fixed_batch() -> dict[str, torch.Tensor]:
    rows = task_data(8, 7)
    return {"input_ids": torch.tensor([r["input_ids"] for r in rows]), "attention_mask": torch.ones(8, SEQ, dtype=torch.long)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("mode", choices=["fsdp", "ddp"])
    parser.add_argument("--resume", default=None)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--variant", choices=["schedule", "search", "restarts"], default="schedule")
    parser.add_argument("--sharded-state-dict", action="store_true", help="fsdp_config state_dict_type SHARDED_STATE_DICT")
    parser.add_argument("--max-steps", type=int, default=-1)
    cli = parser.parse_args()
    transformers.logging.set_verbosity_error()
    launch = {"use_cpu": cli.device == "cpu", "ddp_backend": "gloo" if cli.device == "cpu" else None}
    if cli.mode == "fsdp":
        # BERT lists BertEmbeddings as a block not to split, and accelerate 1.16 then shards its word embeddings twice:
        # wrap the encoder layers only (the usual setting for BERT under FSDP).
        config = {"version": 2, "transformer_layer_cls_to_wrap": ["BertLayer"]}
        if cli.sharded_state_dict:  # checkpoints hold each process's shards of the optimizer (and FSDP's model copy)
            config["state_dict_type"] = "SHARDED_STATE_DICT"
        launch.update(fsdp=True, fsdp_config=config)
    settings = dict(SCHEDULE, max_steps=cli.max_steps)
    if cli.variant == "search":
        # An LR search over two factors after every growth, cut short by max_steps before the schedule completes, so
        # that `load_best_model_at_end` loads the best checkpoint (of another dendrite layout than the last model).
        settings.update(dendrite_lr_search=[1.0, 0.3], max_steps=20, load_best_model_at_end=True, dendrites_only_phase=False)
    if cli.variant == "restarts":  # the control: every growth event happens, no dendrite is added
        settings.update(dendrite_restarts_only=True, dendrites_only_phase=False)
    args = make_args(cli.output_dir, save_strategy="steps", save_steps=2, **settings, **launch)
    checker = EventChecker()
    metric = ScriptedMetric(SCORES if cli.variant == "schedule" else SEARCH_SCORES)
    if cli.resume:  # the scripted scores go on where the checkpoint's run was
        for _ in range(len(json.load(open(os.path.join(cli.resume, "dendrite_schedule.json")))["history"])):
            metric(None)
    data = {"train_dataset": task_data(128, 1), "eval_dataset": task_data(32, 2)}  # the DDP script's
    trainer = DendriticTrainer(tiny_bert(), args, **data, dendrite_config=all_linear(), compute_metrics=metric, callbacks=[checker])
    checker.trainer = trainer
    output = trainer.train(resume_from_checkpoint=cli.resume)
    trainer.save_model(os.path.join(cli.output_dir, "final"))
    model = trainer.model
    model.eval()
    final = sharding(model)  # before a forward pass (the root module keeps its parameters gathered after one)
    direct_save = None
    if cli.mode == "fsdp":  # DendriticModel.save_pretrained on the sharded model: refused (it would write the shards)
        try:
            model.save_pretrained(os.path.join(cli.output_dir, "direct"))
            direct_save = "saved"
        except RuntimeError as err:
            direct_save = str(err)
    batch = fixed_batch()
    with torch.no_grad():
        logits = model(**{k: v.to(trainer.args.device) for k, v in batch.items()}).logits.float().cpu()
    fsdp.unshard(model)  # the whole model, plain, on every rank: what the report below digests and compares
    if dist.get_rank() == 0:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, os.path.join(cli.output_dir, "final_state.safetensors"))
    write_rank_result(
        trainer, output, checker, cli.output_dir, final=final, inputs={k: v.tolist() for k, v in batch.items()},
        logits=logits.tolist(), direct_save=direct_save,
    )


if __name__ == "__main__":
    main()
    # Everything is written and the process group is destroyed. Under FSDP2 with gloo, the interpreter's own teardown
    # of torch's distributed objects occasionally aborted a rank afterwards ("terminate called without an active
    # exception", SIGABRT; 2 of about 30 launches): leave without it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
