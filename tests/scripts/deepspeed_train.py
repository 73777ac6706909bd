"""DendriticTrainer under DeepSpeed ZeRO (or DDP, for comparison) on two CPU processes:
`python -m torch.distributed.run --nproc_per_node 2 deepspeed_train.py OUTPUT_DIR [--zero STAGE] [--resume_step N]
[--lr_search F ...] [--max_steps N] [--load_best]`.

Each rank trains the tiny task with gradient accumulation 2 through the scripted scores of ddp_train.py, given by
evaluation step (grow, switch to the neuron phase, grow, switch, discard and retry, switch, complete: dendrites-only
phases throughout), with a Trainer checkpoint at every evaluation. `--zero STAGE` runs it under DeepSpeed
ZeRO-STAGE (`deepspeed=` with a config dict, `use_cpu=True`); without it, under DDP. `--lr_search` sets
`dendrite_lr_search`, `--max_steps` cuts the run short and `--load_best` sets `load_best_model_at_end`. After every
schedule event it records, collectively, whether all parameters are identical on both ranks, which engine wraps the
model and whether it is a new one, whether the engine's optimizer holds exactly the trainable parameters, and how
many forward hooks the model carries. At the end rank 0 saves the final model (`trainer.save_model`) to
OUTPUT_DIR/final and the logits of fixed inputs and the state dict to OUTPUT_DIR/final_logits.pt.

`--resume_step N`: then a second trainer (same settings, new model) resumes from OUTPUT_DIR/checkpoint-N and trains
to the end; the rank result also says whether its final parameters, history and schedule equal the uninterrupted
run's. Results go to OUTPUT_DIR/rank<r>.json (see ddp_train.write_rank_result).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import weakref

import torch
import torch.distributed as dist
import transformers

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ddp_train import SCORES, EventChecker, digest, same_on_all_ranks, write_rank_result
from dendritic_task import all_linear, make_args, task_data, tiny_bert

from hf_dendrites import DendriticTrainer
from hf_dendrites.callback import ablation_evaluation_running


def deepspeed_config(stage: int) -> dict:
    return {
        "zero_optimization": {"stage": stage},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
    }


class StepScores:
    """SCORES by evaluation step (step 2 gets SCORES[0], ...), so a resumed run sees the uninterrupted run's scores;
    the evaluation of a kept cycle without its dendrites gets the worst score, as ScriptedMetric gives it."""

    def __init__(self):
        self.trainer = None

    def __call__(self, eval_pred) -> dict[str, float]:
        if ablation_evaluation_running():
            return {"scripted": SCORES[0]}
        index = min(self.trainer.state.global_step // 2 - 1, len(SCORES) - 1)
        return {"scripted": SCORES[index]}


class EngineChecker(EventChecker):
    """EventChecker, plus what a DeepSpeed engine's optimizer holds, the forward hooks on the model, and whether the
    optimizer of the engine an event replaced was freed by the next step's end (the Trainer's epoch loop may still
    hold that engine then; the callbacks of the evaluation that decided the event held its optimizer until they
    returned)."""

    current_optimizer = None  # a weak reference to the engine optimizer in use
    replaced_optimizer = None  # the one the last event replaced, until the next step ends

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        self.current_optimizer = self._engine_optimizer()

    def _engine_optimizer(self):
        inner = getattr(self.trainer.model_wrapped, "optimizer", None)
        return weakref.ref(inner) if inner is not None else None

    def _check_replaced(self):
        if self.replaced_optimizer is not None:
            gc.collect()
            self.events[-1]["old_optimizer_freed"] = self.replaced_optimizer() is None
            self.replaced_optimizer = None

    def on_step_end(self, args, state, control, **kwargs):
        self._check_replaced()

    def on_train_end(self, args, state, control, **kwargs):
        self._check_replaced()

    def on_log(self, args, state, control, logs=None, **kwargs):
        count = len(self.events)
        super().on_log(args, state, control, logs=logs, **kwargs)
        if len(self.events) == count:
            return
        t = self.trainer
        self.replaced_optimizer, self.current_optimizer = self.current_optimizer, self._engine_optimizer()
        inner = getattr(t.model_wrapped, "optimizer", None)
        groups = getattr(inner, "bit16_groups", None)  # ZeRO-1/2: the model parameters the engine flattened
        if groups is not None:
            self.events[-1]["optimizer_matches"] = sorted(id(p) for g in groups for p in g) == sorted(
                id(p) for p in t.model.parameters() if p.requires_grad
            )
        self.events[-1]["forward_hooks"] = len(t.model._forward_pre_hooks) + len(t.model._forward_hooks)


def build(output_dir: str, cli: argparse.Namespace) -> tuple[DendriticTrainer, EventChecker]:
    args = make_args(
        output_dir,
        eval_steps=2,
        logging_steps=2,
        save_strategy="steps",
        save_steps=2,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        dendrite_patience=[1],
        dendrite_improvement_threshold=[0.01],
        dendrites_only_phase=True,
        max_dendrite_cycles=2,
        max_dendrite_tries=2,
        metric_for_best_model="scripted",
        greater_is_better=False,
        ddp_backend="gloo",
        deepspeed=deepspeed_config(cli.zero) if cli.zero is not None else None,
        dendrite_lr_search=cli.lr_search,
        max_steps=cli.max_steps,
        load_best_model_at_end=cli.load_best,
    )
    checker, scores = EngineChecker(), StepScores()
    trainer = DendriticTrainer(
        tiny_bert(),
        args,
        train_dataset=task_data(128, 1),
        eval_dataset=task_data(32, 2),
        dendrite_config=all_linear(),
        compute_metrics=scores,
        callbacks=[checker],
    )
    checker.trainer = scores.trainer = trainer
    return trainer, checker


def probe_inputs() -> dict[str, torch.Tensor]:
    rows = task_data(8, 5)
    return {k: torch.tensor([r[k] for r in rows]) for k in ("input_ids", "attention_mask")}


def main(cli: argparse.Namespace) -> None:
    transformers.logging.set_verbosity_error()
    output_dir = cli.output_dir
    trainer, checker = build(output_dir, cli)
    output = trainer.train()
    engines = {e["wrapper"] for e in checker.events}
    extra = {"engines": sorted(engines), "engine_type": type(trainer.model_wrapped).__name__,
             "best_model_checkpoint": trainer.state.best_model_checkpoint, "origin": trainer.dendrite_callback.weights}
    final_digest = digest(sorted(trainer.model.state_dict().items()))
    if cli.resume_step is not None:
        history = json.dumps(trainer.dendrite_history, sort_keys=True)
        schedule = json.dumps(trainer.dendrite_schedule.to_dict(), sort_keys=True)
        resumed, _ = build(output_dir, cli)
        resumed_output = resumed.train(resume_from_checkpoint=os.path.join(output_dir, f"checkpoint-{cli.resume_step}"))
        extra.update(
            resumed_step=resumed_output.global_step,
            resumed_params_equal=digest(sorted(resumed.model.state_dict().items())) == final_digest,
            resumed_history_equal=json.dumps(resumed.dendrite_history, sort_keys=True) == history,
            resumed_schedule_equal=json.dumps(resumed.dendrite_schedule.to_dict(), sort_keys=True) == schedule,
            resumed_identical_on_ranks=same_on_all_ranks(digest(sorted(resumed.model.state_dict().items()))),
        )
    trainer.save_model(os.path.join(output_dir, "final"))
    if dist.get_rank() == 0:
        model = trainer.model.eval()
        with torch.no_grad():
            logits = model(**probe_inputs()).logits
        torch.save({"logits": logits, "state": {k: v.detach().clone() for k, v in model.state_dict().items()}},
                   os.path.join(output_dir, "final_logits.pt"))
    write_rank_result(trainer, output, checker, output_dir, **extra)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--zero", type=int, default=None)
    parser.add_argument("--resume_step", type=int, default=None)
    parser.add_argument("--lr_search", type=float, nargs="+", default=None)
    parser.add_argument("--max_steps", type=int, default=-1)
    parser.add_argument("--load_best", action="store_true")
    main(parser.parse_args())
