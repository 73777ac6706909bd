"""`DendriteScheduleCallback`: the dendrite schedule (docs/schedule.md) as a `TrainerCallback`.

`DendriticTrainer` installs one. It owns everything the schedule needs: the `DendriteSchedule` state machine, the
run history (one record per evaluation), the best-weight snapshots and, with the correlation learning rule, the
running candidate phase. It reacts to public Trainer events:

- `on_train_begin`: remember which parameters the user froze (restored in every phase where neurons train);
- `on_evaluate` (inside the Trainer's evaluation, before the checkpoint of that step is written, so a checkpoint
  always reflects the decision taken at its step): feed the score to the schedule and carry out the decision
  (restore best weights, grow / discard dendrites, freeze / unfreeze, then ask the trainer to rebuild its
  optimizer and LR scheduler);
- `on_train_end`: drop a candidate phase cut short, warn when the step / epoch cap stopped the schedule, and write
  the evaluation CSV and the training curve into `output_dir`.

The saved model: `weights` records which evaluation the model's current weights are (its step, metrics, cycle and
try, and how they got there: the last model, restored by the schedule, or loaded as the best checkpoint by
`load_best_model_at_end`); None while they were trained past their last evaluation or changed by a growth.
Every step, restore, growth and checkpoint load updates it, checkpoints carry it, and `DendriticTrainer.train`
evaluates the final model when it is None. `training_summary()["saved_model"]` and its `eval_results` report it,
so the model card describes the saved model, not the last evaluation.

Growth recipe options (`DendriticTrainingArguments`): `dendrite_restarts_only` carries out every growth event
without adding dendrites; `dendrite_restart_steps` makes the schedule end cycles at fixed steps (see `schedule.py`),
and this callback asks for an evaluation at `max_steps` so the last cycle is judged; `dendrite_lr_search` trains
every cycle once per candidate learning rate from a snapshot of the post-growth weights (`lr_start`), keeping the
best candidate's best weights (`lr_best`) until the cycle ends.

Attribution: when a cycle k >= 1 is kept, the dendrites it grew are measured twice.

- Weight ratio (`DendriticModel.dendrite_weight_ratios` on the cycle's best weights): the size of their contribution
  relative to the neurons' own weights, max and median over layers; a WARNING when the maximum is below
  `NEGLIGIBLE_DENDRITE_WEIGHT`.
- Ablation: the kept model is evaluated once more with those dendrites switched off
  (`DendriticModel.dendrites_disabled(first=<counts before the cycle>)`), on the schedule's evaluation set and
  metric. `ablation_score` is that score, `ablation_delta` the kept score minus it, signed so that positive means
  the dendrites help (`greater_is_better` aware). A WARNING is logged when the kept score does not beat the ablated
  one by the schedule's own improvement rule (`DendriteSchedule.is_improvement`, the cycle's threshold and epsilon):
  the dendrites then do not earn their parameters, and the gain likely came from restoring the best weights and
  restarting the optimizer and LR, which `dendrite_restarts_only=True` measures.

  The kept score is the cycle's recorded best (the evaluation of the very weights that are kept); the ablation runs
  right after the decision restored those weights (`GROW` / `COMPLETE`, before any new growth), so it costs one
  evaluation and no extra copy of the model. It goes through `Trainer.evaluation_loop` on every process together
  (distributed evaluation is collective), is neither logged nor shown to callbacks (`on_prediction_step`,
  `on_evaluate`) and does not feed the schedule; the random number generators (Python, NumPy, torch CPU and CUDA)
  are restored afterwards, so the training trajectory is the one without it. `ablation_evaluation_running()` tells
  a `compute_metrics` with side effects that it is being called for this evaluation.

Both go into the evaluation record of that decision (`dendrite_evaluations.csv`), `training_summary()["cycles"]` and
the model card's cycle table.

The trainer asks it to write and read its state in checkpoints (`write_state` / `load_state`). The state is written
from `DendriticTrainer.save_model` rather than `on_save`: the Trainer rotates old checkpoints (`save_total_limit`)
before `on_save`, and the snapshot files of older checkpoints must still be there to be hard-linked.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .constants import DENDRITE_CURVE_NAME, DENDRITE_EVAL_CSV_NAME
from .learning_rules import CorrelationRule, perforate
from .saving import checkpoint_save_options
from .schedule import PHASE_DENDRITE, Action, Decision, DendriteSchedule
from .trainer_state import (
    Snapshot,
    read_candidates,
    read_schedule_payload,
    read_snapshots,
    write_schedule_state,
)

if TYPE_CHECKING:
    from .model import DendriticModel

logger = logging.getLogger(__name__)

# Numeric codes of the `dendrite_event` log entry (TensorBoard and W&B plot numbers, not strings).
EVENT_CODES = {Action.GROW: 1, Action.RETRY: 2, Action.SWITCH: 3, Action.COMPLETE: 4, Action.NEXT_LR: 5}
# Below this (largest over layers of `DendriticModel.dendrite_weight_ratios`) a kept cycle's dendrites add under 5 %
# of what the neurons compute from their own weights: too little to explain a gain, so the run says so.
NEGLIGIBLE_DENDRITE_WEIGHT = 0.05
# Status of a cycle try in `training_summary["cycles"]`.
STATUS_KEPT, STATUS_DISCARDED, STATUS_CUT_SHORT = "kept", "discarded", "cut short"
# How the saved model's weights got there (`DendriteScheduleCallback.weights["origin"]`).
ORIGIN_LAST, ORIGIN_RESTORED, ORIGIN_BEST_CHECKPOINT, ORIGIN_AFTER_TRAINING = (
    "last model", "restored by the schedule", "best checkpoint", "evaluated after training",
)


_ABLATION_RUNNING = False


def ablation_evaluation_running() -> bool:
    """True while a `DendriteScheduleCallback` evaluates a kept model with a cycle's dendrites switched off (see the
    module docstring): a `compute_metrics` that counts its calls or replays scores can tell that evaluation apart."""
    return _ABLATION_RUNNING


@contextlib.contextmanager
def _preserved_rng_states():
    """Restore the Python, NumPy and torch (CPU and initialised CUDA devices) random states on exit."""
    import numpy as np
    import torch

    python, numpy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@dataclass
class CorrelationPhaseState:
    """Plateau tracking of the candidates' score S during a candidate phase (JSON-serialisable)."""

    best: float | None = None
    evals_without_improvement: int = 0
    history_index: int = 0  # entries of CorrelationRule.history already averaged into an evaluation
    start_step: int = 0


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)) and math.isfinite(float(value)):
            out[key] = float(value) if isinstance(value, float) else value
    return out


# Where launchers put the number of processes they started: torchrun, `accelerate launch` and hand-set environments
# WORLD_SIZE; MPI launchers (which accelerate also reads for CPU runs) their own variable.
LAUNCH_WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def launched_processes() -> tuple[int, str | None]:
    """How many processes the launcher started, and the environment variable that says so ((1, None) without one)."""
    launched: tuple[int, str | None] = (1, None)
    for name in LAUNCH_WORLD_SIZE_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > launched[0]:
            launched = (int(value), name)
    return launched


def processes_out_of_step(accelerator: Any) -> str | None:
    """Why the processes of this run cannot share the schedule's decisions, or None when they can.

    The schedule steps on the main process, which broadcasts its decision (accelerate's `broadcast_object_list`);
    that reaches the other processes only when accelerate runs them as one distributed job. A launcher can start
    processes that accelerate does not join: without a GPU, `torchrun` without `--use_cpu` leaves every process a
    single-process state (each trains its own copy and writes the same files), and with `--ddp_backend gloo` a
    process group but no DDP (distributed type NO: the broadcast does nothing and the other processes get no
    decision).
    """
    import torch.distributed as dist
    from accelerate.utils import TORCH_DISTRIBUTED_OPERATION_TYPES, DistributedType

    launched, variable = launched_processes()
    processes, kind = accelerator.num_processes, accelerator.distributed_type
    if kind == DistributedType.XLA:  # accelerate's broadcast goes through XLA; the launcher sets no WORLD_SIZE
        return None
    joined = kind in TORCH_DISTRIBUTED_OPERATION_TYPES and dist.is_available() and dist.is_initialized()
    if (processes == 1 and launched == 1) or (joined and launched in (1, processes)):
        return None
    started = f"{launched} processes were launched ({variable}={launched})" if variable else "several processes run"
    consequence = (
        "each process would train its own copy of the model and write the same files"
        if processes == 1
        else "the processes would train separate copies, and the schedule's decisions, taken on the main process, "
        "would not reach the others"
    )
    return (
        f"{started}, but accelerate runs this one as {processes} process(es) with distributed type {kind.value}, "
        f"not one DDP job: {consequence}. On CPU, accelerate joins the processes only when asked to: add `--use_cpu` "
        "to the script's arguments (`use_cpu=True` in the training arguments); `--ddp_backend gloo` alone is not "
        "enough. For example `torchrun --nproc_per_node 2 train.py --use_cpu ...` or `accelerate launch --multi_gpu "
        "--num_processes 2 train.py --use_cpu ...` (see docs/distributed.md)."
    )


class DendriteScheduleCallback(TrainerCallback):
    """Runs the dendrite schedule of a trainer made dendritic with `DendriticTrainerMixin` (see the module docstring).

    The mixin builds and installs it (`trainer.dendrite_callback`); it cannot drive a trainer without the mixin,
    which would not rebuild its optimizer after a growth nor save the dendrites, and refuses one by name. Read access:
    `schedule` (the `DendriteSchedule`; its `history` lists every finished cycle try), `history` (one dict per
    evaluation: step, epoch, score, cycle, try, phase, dendrite and parameter counts, decision), `best_score`,
    `training_summary()`.
    """

    def __init__(self, trainer: Trainer | None = None):
        # The dendritic trainer that installed this callback: asked to rebuild its optimizer and scheduler (and to
        # log) after every change of the parameter set. (Typed `Trainer`, and checked by the mixin's method, so that
        # this module does not import trainer.py.)
        if not callable(getattr(trainer, "rebuild_optimizer_and_scheduler", None)) or not hasattr(
            getattr(trainer, "args", None), "dendrite_schedule_settings"
        ):
            raise TypeError(
                "DendriteScheduleCallback is installed by the dendritic trainers themselves (DendriticTrainer, "
                "DendriticSFTTrainer, DendriticDPOTrainer, or any `class X(DendriticTrainerMixin, YourTrainer)` with "
                f"arguments that mix in DendriteScheduleArguments); it cannot drive {type(trainer).__name__}. Use one of "
                "those trainers instead of adding the callback (docs/trl.md)."
            )
        self.trainer = trainer
        self.reset()

    def reset(self, model: DendriticModel | None = None) -> None:
        """Forget all schedule state (for a new model): schedule rebuilt from the trainer's arguments, empty
        history, no snapshots, no candidate phase. The trainability of `model` (default: the trainer's) is what
        the user froze: it is restored in every phase where the neurons train."""
        if getattr(self, "correlation", None) is not None:
            self.correlation.finish()
        self.schedule = DendriteSchedule(self.trainer.args.dendrite_schedule_settings())
        self.history: list[dict[str, Any]] = []
        self.cycle_best: Snapshot | None = None
        self.accepted: Snapshot | None = None
        # LR search: the post-growth weights every candidate starts from, and the best candidate's best weights
        self.lr_start: Snapshot | None = None
        self.lr_best: Snapshot | None = None
        self.correlation: CorrelationRule | None = None
        self.correlation_state = CorrelationPhaseState()
        self.curve_path: str | None = None
        self.stopped_by_cap = False
        # Whether this callback holds a training run (`train()` started, or a checkpoint's schedule was loaded): an
        # evaluation-only trainer leaves the model's own training summary (the one its checkpoint carries) alone.
        self.has_run = False
        # The evaluation the model's current weights are (see the module docstring), and why they are the saved ones.
        self.weights: dict[str, Any] | None = None
        self.weights_note: str | None = None
        self.loaded_checkpoint: str | None = None  # the best checkpoint `load_best_model_at_end` loaded
        self.loaded_view: dict[str, Any] | None = None  # its cycle and try, when its weights are no evaluation's
        model = self.trainer.model if model is None else model
        dendrite_ids = {id(p) for p in model.dendrite_parameters()}
        self.base_requires_grad = {n: p.requires_grad for n, p in model.named_parameters() if id(p) not in dendrite_ids}

    # ------------------------------------------------------------------ views
    @property
    def model(self) -> DendriticModel:
        return self.trainer.model

    @property
    def _main(self) -> bool:
        return self.trainer.accelerator.is_main_process

    def score_key(self) -> str:
        """The metrics key of the score that drives the schedule (`eval_` + `metric_for_best_model`)."""
        key = self.trainer.args.metric_for_best_model
        return key if key.startswith("eval_") else f"eval_{key}"

    def _score_from(self, metrics: dict[str, Any]) -> float:
        key = self.score_key()
        if key not in metrics:
            raise KeyError(
                f"DendriticTrainer reads the score from `metric_for_best_model`={self.trainer.args.metric_for_best_model!r} "
                f"({key!r}), which the evaluation did not return; it returned {sorted(metrics)}. Set "
                "`metric_for_best_model` to one of those, or return it from `compute_metrics`."
            )
        return float(metrics[key])

    @property
    def best_score(self) -> float | None:
        """Best validation score of the model the schedule would keep if it completed now (None before any
        evaluation): the current cycle's best when it beats the accepted best (or in cycle 0), else the accepted
        best."""
        s = self.schedule
        if s.cycle_best is None or s.done:
            return s.accepted_best
        if s.accepted_best is None or s.cycle == 0 or s.is_improvement(s.cycle_best, s.accepted_best):
            return s.cycle_best
        return s.accepted_best

    def model_view(self) -> dict[str, Any]:
        """Cycle, try, phase and dendrite / parameter counts of the model as it is now."""
        summary = self.model.dendrite_summary()
        s = self.schedule
        return {
            "cycle": s.cycle,
            "try": s.attempt,
            "phase": s.phase,
            "lr_factor": s.lr_factor,
            "num_dendrites": summary.num_dendrites,
            "params": summary.total_params,
            "dendrite_params": summary.dendrite_params,
            "trainable_params": summary.trainable_params,
        }

    @staticmethod
    def log_fields(view: dict[str, Any]) -> dict[str, float]:
        """`model_view()` as numbers for the Trainer's log (console, `log_history`, `report_to` integrations)."""
        return {
            "dendrite_cycle": view["cycle"],
            "dendrite_try": view["try"],
            "dendrite_phase": 1 if view["phase"] == PHASE_DENDRITE else 0,
            "dendrite_count": view["num_dendrites"],
            "dendrite_params": view["dendrite_params"],
            "total_params": view["params"],
            "trainable_params": view["trainable_params"],
        }

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, **kwargs):
        self.stopped_by_cap = False
        self.has_run = True
        self.weights_note = self.loaded_checkpoint = self.loaded_view = None
        return control

    def on_step_end(self, args, state, control, **kwargs):
        self.weights = None  # an optimizer step: the weights are no longer those of any evaluation
        # Replayed growth steps: the last cycle is judged at the last step, so make sure there is an evaluation.
        if args.dendrite_restart_steps is not None and state.global_step >= state.max_steps and not self.schedule.done:
            control.should_evaluate = True
        return control

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        """Feed a training-time evaluation to the schedule and carry out its decision (evaluations outside
        `train()` change nothing)."""
        trainer = self.trainer
        if not trainer.is_in_train or self.schedule.done or metrics is None:
            return control
        if isinstance(trainer.eval_dataset, dict) and self.score_key() not in metrics:
            return control  # one of several evaluation sets, not the one that holds the score
        if self.correlation is not None:
            self._candidate_step(metrics, state)
        else:
            self._schedule_step(metrics, state, control)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.correlation is not None:
            # The step budget ran out during a candidate phase: drop the candidates (the model is the restored best).
            logger.warning("Training stopped during a candidate phase; its candidates were not installed.")
            self.correlation.finish()
            self.correlation = None
            self.apply_phase_trainability()
        best_step = getattr(state, "best_global_step", None)
        if args.load_best_model_at_end and state.best_model_checkpoint is None and best_step and not self.schedule.done:
            # The Trainer dropped a best checkpoint that no longer exists (it warned when the run resumed).
            self.weights_note = (
                f"`load_best_model_at_end` is set, but no checkpoint of the best evaluation (step {best_step}, "
                f"{self.score_key()} {state.best_metric:.6g}) existed when training ended (`{PREFIX_CHECKPOINT_DIR}-"
                f"{best_step}` was deleted, e.g. before the run was resumed, or never written), so the "
                "Trainer kept the last model."
            )
            if self._main:
                logger.warning("%s The saved model is the last one.", self.weights_note)
        if not self.schedule.done and self.history:
            self.stopped_by_cap = state.global_step >= state.max_steps
            if self.stopped_by_cap and self._main:
                flag = "max_steps" if args.max_steps > 0 else "num_train_epochs"
                logger.warning(
                    "Training stopped at step %d (the `%s` cap) before the dendrite schedule completed (cycle %d, try "
                    "%d, %s phase): the model is the one trained so far (or the best checkpoint, with "
                    "`load_best_model_at_end`), not the completed schedule's choice. Raise `%s` to let the schedule finish.",
                    state.global_step, flag, self.schedule.cycle, self.schedule.attempt, self.schedule.phase, flag,
                )
        self.write_report()
        return control

    # ------------------------------------------------------------------ the schedule
    def _decide(self, score: float, step: int, final: bool = False) -> tuple[float, Decision]:
        """Step the schedule once, on the main process, and give every process the same state and decision."""
        acc = self.trainer.accelerator
        problem = processes_out_of_step(acc)  # refused when the trainer was built: only if the state changed since
        if problem is not None:
            raise RuntimeError(f"The dendrite schedule cannot take one decision for all processes: {problem}")
        if acc.num_processes <= 1:
            return score, self.schedule.step(score, step, final=final)
        from accelerate.utils import broadcast_object_list

        payload: list[str | None] = [None]
        if acc.is_main_process:
            decision = self.schedule.step(score, step, final=final)
            payload = [json.dumps({"score": score, "decision": decision.to_dict(), "schedule": self.schedule.to_dict()})]
        broadcast_object_list(payload, from_process=0)
        data = json.loads(payload[0])
        if not acc.is_main_process:
            self.schedule = DendriteSchedule.from_dict(data["schedule"])
        return float(data["score"]), Decision.from_dict(data["decision"])

    def _schedule_step(self, metrics: dict[str, Any], state, control) -> None:
        view = self.model_view()  # the model that was evaluated (nothing changed since the evaluation)
        self.weights = self._evaluated(state.global_step, metrics, view, ORIGIN_LAST)
        final = self.trainer.args.dendrite_restart_steps is not None and state.global_step >= state.max_steps
        score, decision = self._decide(self._score_from(metrics), state.global_step, final=final)
        record = {"step": state.global_step, "epoch": state.epoch, "score": score, **view, "decision": decision.action.value}
        self.history.append(record)

        if decision.new_best:
            self.cycle_best = Snapshot.of(self.model, state.global_step, _numeric(metrics))
        if decision.lr_pick is not None:
            # LR search: the cycle's best weights are those of the winning candidate (kept when it plateaued)
            if decision.lr_pick != len(self.schedule.settings.lr_search) - 1:
                self.cycle_best = self.lr_best
            self.lr_start = self.lr_best = None
        # the dendrites a kept cycle grew: those beyond the last accepted model's counts
        grown_from = self.accepted.counts if self.accepted is not None else None
        if decision.cycle_accepted and view["cycle"] >= 1:
            self._attribute(record, view["cycle"], state.global_step)
        if decision.cycle_accepted:
            self.accepted = self.cycle_best
        if decision.action is Action.CONTINUE:
            return
        self.trainer.prepare_model_change()  # FSDP2: gathered into a plain model until the rebuild shards it again
        if self._main:
            logger.info("Step %d: %s", state.global_step, decision.message)

        if decision.action in (Action.GROW, Action.RETRY):
            self.restore(self.accepted, "the last accepted best model")
            if decision.cycle_accepted and view["cycle"] >= 1:
                self._ablate(record, view["cycle"], state.global_step, grown_from)
            self.cycle_best = None
            self.grow_dendrites()
            if self.schedule.settings.lr_search and self.correlation is None:
                self.lr_start = Snapshot.of(self.model, state.global_step, {})
        elif decision.action is Action.NEXT_LR:
            if decision.lr_best_so_far:
                self.lr_best = self.cycle_best
            self.restore(self.lr_start, "the post-growth weights")
            self.cycle_best = None
        elif decision.action is Action.SWITCH:
            self.restore(self.cycle_best, "this cycle's best model")
        elif decision.action is Action.COMPLETE:
            self.restore(self.accepted, "the last accepted best model")
            if decision.cycle_accepted and view["cycle"] >= 1:
                self._ablate(record, view["cycle"], state.global_step, grown_from)
        self.apply_phase_trainability()
        # Also at completion: a checkpoint written now must hold an optimizer state that fits the final model.
        self.trainer.rebuild_optimizer_and_scheduler()
        if decision.action is Action.COMPLETE:
            control.should_training_stop = True
        event = {**self.log_fields(self.model_view()), "dendrite_event": EVENT_CODES[decision.action]}
        if self.schedule.settings.lr_search:
            event["dendrite_lr_factor"] = self.schedule.lr_factor
        if "ablation_delta" in record:
            event["dendrite_ablation_delta"] = record["ablation_delta"]
        self.trainer.log(event)

    def _attribute(self, record: dict[str, Any], cycle: int, step: int) -> None:
        """Measure how much a kept cycle's new dendrites carry (see the module docstring); warn when it is almost
        nothing."""
        best, before = self.cycle_best, self.accepted
        if best is None or self.trainer.args.dendrite_restarts_only:
            return
        # only the dendrites grown in this cycle: those beyond the last accepted model's counts
        ratios = self.model.dendrite_weight_ratios(best.state, first=before.counts if before is not None else None)
        if not ratios:
            return
        values = sorted(ratios.values())
        mid = len(values) // 2
        median = values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2
        record["dendrite_weight_max"], record["dendrite_weight_median"] = values[-1], median
        if values[-1] < NEGLIGIBLE_DENDRITE_WEIGHT and self._main:
            logger.warning(
                "Cycle %d was kept at step %d, but its dendrites carry almost nothing: their contribution is at most "
                "%.3g (median %.3g) of the neurons' own weights, below %g. The gain likely came from restoring the best "
                "weights and restarting the optimizer and learning rate, not from the dendrites; train with "
                "`dendrite_restarts_only=True` (same settings) to check.", cycle, step, values[-1], median,
                NEGLIGIBLE_DENDRITE_WEIGHT,
            )

    def _ablate(self, record: dict[str, Any], cycle: int, step: int, grown_from: dict[str, int] | None) -> None:
        """Evaluate the kept model (the weights just restored) with cycle `cycle`'s dendrites (those from the counts
        `grown_from` on) switched off; record the score and the difference, warn when they do not help (see the
        module docstring). Runs on every process."""
        kept, s = self.accepted, self.schedule
        if kept is None or self.trainer.args.dendrite_restarts_only or s.accepted_best is None:
            return
        dm = self.model
        first = {name: (grown_from or {}).get(name, 0) for name in kept.counts}
        if all(kept.counts[name] <= k for name, k in first.items()):
            return  # no dendrites were grown in this cycle
        with dm.dendrites_disabled(first=first), _preserved_rng_states():
            without = self._score_from(self._evaluate_unreported())
        with_them = float(s.accepted_best)
        delta = with_them - without if s.settings.greater_is_better else without - with_them
        record["ablation_score"], record["ablation_delta"] = without, delta
        helps = not math.isfinite(without) or s.is_improvement(with_them, without, cycle=cycle)
        if not self._main:
            return
        if helps:
            logger.info(
                "Cycle %d's dendrites switched off: %s %.6g instead of %.6g (the dendrites gain %.4g).",
                cycle, self.score_key(), without, with_them, delta,
            )
            return
        logger.warning(
            "Cycle %d was kept at step %d, but switching its dendrites off does not make %s worse by the schedule's "
            "improvement rule (threshold %g, epsilon %g): %.6g with them, %.6g without (difference %.4g, positive = "
            "the dendrites help). The gain likely came from restoring the best weights and restarting the optimizer "
            "and learning rate, not from the dendrites; train with `dendrite_restarts_only=True` (same settings) to "
            "check.", cycle, step, self.score_key(), s.settings.threshold_for(cycle), s.settings.epsilon_for(cycle),
            with_them, without, delta,
        )

    def _evaluate_unreported(self) -> dict[str, Any]:
        """Metrics of the model as it is now on the evaluation set that holds the score, computed like
        `Trainer.evaluate` but neither logged nor shown to callbacks."""
        global _ABLATION_RUNNING
        trainer, key = self.trainer, self.score_key()
        datasets = trainer.eval_dataset
        names = ([n for n in datasets if key.startswith(f"eval_{n}_")] or list(datasets)) if isinstance(datasets, dict) else [None]
        handler = trainer.callback_handler
        quiet = copy.copy(handler)
        quiet.callbacks = []
        trainer.callback_handler, _ABLATION_RUNNING = quiet, True
        metrics: dict[str, Any] = {}
        try:
            with trainer.dendrite_unreported_evaluation():
                for name in names:
                    output = trainer.evaluation_loop(
                        trainer.get_eval_dataloader(name),
                        description="Evaluation without the new dendrites",
                        prediction_loss_only=True if trainer.compute_metrics is None else None,
                        ignore_keys=getattr(trainer, "dendrite_ignore_keys_for_eval", None),
                        metric_key_prefix="eval" if name is None else f"eval_{name}",
                    )
                    metrics.update(output.metrics)
                    if key in metrics:
                        break
        finally:
            trainer.callback_handler, _ABLATION_RUNNING = handler, False
        return metrics

    def grow_dendrites(self) -> None:
        """gd: add `dendrites_per_cycle` dendrites to every dendritic layer (seeded: identical on every process).
        correlation: start a candidate phase (seeded candidates); they are installed when their S plateaus.
        `dendrite_restarts_only`: nothing (the restore and the optimizer / LR restart are the whole event)."""
        dm = self.model
        if self.trainer.args.dendrite_restarts_only:
            if self._main:
                logger.info("Restarts-only mode: no dendrites added; training goes on from the restored weights with a fresh optimizer and LR schedule.")
            return
        if dm.dendrite_config.learning_rule != "correlation":
            dm.add_dendrites()
            self.weights = None  # new dendrites: not the evaluated model
            if self._main:
                logger.info("Grew %d dendrite(s) in each of %d layers.", dm.dendrite_config.dendrites_per_cycle, len(dm.dendrite_counts()))
            return
        self.correlation = self._new_correlation_rule(generator=dm.growth_generator())
        dm.growth_count += 1  # a retried cycle gets fresh candidates
        self.correlation_state = CorrelationPhaseState(start_step=self.trainer.state.global_step)
        self.correlation.start()
        if self._main:
            logger.info(
                "Started a candidate phase: %d candidate(s) per layer train to correlate with the neurons' errors; "
                "the network is frozen until their score S plateaus.", dm.dendrite_config.candidate_pool_size,
            )

    def _new_correlation_rule(self, generator=None) -> CorrelationRule:
        cfg = self.model.dendrite_config
        return CorrelationRule(
            self.model,
            pool_size=cfg.candidate_pool_size,
            normalize=cfg.correlation_normalize,
            learning_rate=self.trainer.args.candidate_learning_rate,
            generator=generator,
        )

    def _candidate_step(self, metrics: dict[str, Any], state) -> None:
        """An evaluation during a candidate phase: track S and install the best candidates when it plateaus."""
        args = self.trainer.args
        rule, st = self.correlation, self.correlation_state
        recent = rule.history[st.history_index :]
        st.history_index = len(rule.history)
        view = self.model_view()
        score = self._score_from(metrics)
        self.weights = self._evaluated(state.global_step, metrics, view, ORIGIN_LAST)
        if not recent:  # no optimizer step since the last evaluation
            self.history.append({"step": state.global_step, "epoch": state.epoch, "score": score, **view, "decision": "candidates"})
            return
        s_value = float(sum(recent) / len(recent))
        improved = st.best is None or s_value > st.best * (1.0 + args.correlation_improvement_threshold)
        if improved:
            st.best, st.evals_without_improvement = s_value, 0
        else:
            st.evals_without_improvement += 1
        install = st.evals_without_improvement >= args.correlation_patience
        self.history.append(
            {"step": state.global_step, "epoch": state.epoch, "score": score, **view,
             "correlation": s_value, "decision": "install" if install else "candidates"}
        )
        self.trainer.log({"dendrite_correlation": s_value})
        if not install:
            return
        per_cycle = self.model.dendrite_config.dendrites_per_cycle
        if self._main:
            logger.info(
                "Step %d: candidate score S plateaued at %.6g after %d evaluation(s) without a %.3g relative "
                "improvement: installing the best %d candidate(s) per layer",
                state.global_step, s_value, args.correlation_patience, args.correlation_improvement_threshold, per_cycle,
            )
        self.correlation.install(per_cycle)
        self.weights = None  # new dendrites: not the evaluated model
        self.correlation = None
        if self.schedule.settings.lr_search:
            self.lr_start = Snapshot.of(self.model, state.global_step, {})
        self.apply_phase_trainability()
        self.trainer.rebuild_optimizer_and_scheduler()
        self.trainer.log({**self.log_fields(self.model_view()), "dendrite_event": EVENT_CODES[Action.GROW]})

    def restore(self, snapshot: Snapshot | None, what: str = "the best model") -> None:
        """Put the model back to a snapshot: dendrite counts first (truncating or growing), then the weights."""
        if snapshot is None:
            logger.warning("No best weights recorded for this cycle (no finite score); keeping the current weights.")
            return
        dm = self.model
        dm.set_dendrite_counts(snapshot.counts)
        dm.load_snapshot_state(snapshot.state)
        # a snapshot without metrics (the post-growth weights of an LR search) was never evaluated
        self.weights = self._evaluation_at(snapshot.step, snapshot.metrics, ORIGIN_RESTORED) if snapshot.metrics else None
        if self._main:
            logger.info(
                "Restored %s: the weights of step %d (%s=%s, %d dendrites).", what, snapshot.step, self.score_key(),
                snapshot.metrics.get(self.score_key()), sum(snapshot.counts.values()),
            )

    # ------------------------------------------------------------------ the saved model's provenance
    @staticmethod
    def _evaluated(step: int, metrics: dict[str, Any], view: dict[str, Any], origin: str) -> dict[str, Any]:
        return {"step": int(step), "metrics": _numeric(metrics), "cycle": view["cycle"], "try": view["try"], "origin": origin}

    def _evaluation_at(self, step: int, metrics: dict[str, Any], origin: str) -> dict[str, Any]:
        """The weights evaluated at `step` (a snapshot's): their cycle and try are those of that evaluation's record."""
        record = next((r for r in reversed(self.history) if r["step"] == step), None)
        view = record if record is not None else {"cycle": None, "try": None}
        return self._evaluated(step, metrics, view, origin)

    def loaded_best_checkpoint(self, directory: str) -> None:
        """`load_best_model_at_end` replaced the weights with checkpoint `directory`'s: they are the evaluation that
        checkpoint recorded, or none when the schedule changed the weights at that evaluation (before the checkpoint
        was written) or the checkpoint predates these records."""
        payload = read_schedule_payload(directory) or {}
        recorded = payload.get("weights")
        name = self.loaded_checkpoint = os.path.basename(os.path.normpath(directory))
        if isinstance(recorded, dict):
            self.weights = {**recorded, "origin": ORIGIN_BEST_CHECKPOINT, "checkpoint": name}
            return
        self.weights = None
        written = (payload.get("schedule") or {}).get("state") or {}  # the schedule when the checkpoint was written
        self.loaded_view = {"cycle": written.get("cycle"), "try": written.get("attempt")}
        self.weights_note = (
            f"`load_best_model_at_end` loaded the best checkpoint, `{name}`, whose weights are not those of the "
            "evaluation that made it the best (the schedule changed them at that step, or the checkpoint does not "
            "record it), so they were evaluated again after training."
        )

    def record_final_evaluation(self, metrics: dict[str, Any]) -> None:
        """`DendriticTrainer.train` evaluated the final model because its weights were no evaluation's: record it and
        refresh the model's training summary."""
        step = self.trainer.state.global_step
        view = self.loaded_view or {"cycle": self.schedule.cycle, "try": self.schedule.attempt}
        self.weights = self._evaluated(step, metrics, view, ORIGIN_AFTER_TRAINING)
        self.weights["checkpoint"] = self.loaded_checkpoint
        self.model.training_summary = self.training_summary()

    def saved_model(self) -> dict[str, Any]:
        """Where the model's current weights come from (the `saved_model` entry of `training_summary()`): `evaluated`,
        `step` (the evaluation they are), `cycle`, `try`, `status` of that try, `origin` ("last model", "restored by
        the schedule", "best checkpoint" or "evaluated after training"), `checkpoint`, `end_step` (where training
        stopped), `last_evaluation_step`, `note` (why they are the saved ones, when that is unusual) and `metrics`."""
        names = {"accepted": STATUS_KEPT, "discarded": STATUS_DISCARDED, "stopped": STATUS_CUT_SHORT}
        statuses = {(r["cycle"], r["try"]): names[r["status"]] for r in self.cycle_rows()}
        w = self.weights
        out: dict[str, Any] = {
            "evaluated": w is not None,
            "step": None,
            "cycle": self.schedule.cycle,
            "try": self.schedule.attempt,
            "origin": ORIGIN_LAST,
            "checkpoint": None,
            "end_step": int(self.trainer.state.global_step),
            "last_evaluation_step": self.history[-1]["step"] if self.history else None,
            "note": self.weights_note,
            "metrics": {},
        }
        if w is not None:
            out.update({k: w.get(k) for k in ("step", "cycle", "try", "origin", "checkpoint")})
            out["metrics"] = {k: v for k, v in w["metrics"].items() if k.startswith("eval_") and not k.endswith(("_runtime", "_per_second"))}
        out["status"] = statuses.get((out["cycle"], out["try"]))
        if out["status"] is None and not self.schedule.done and (out["cycle"], out["try"]) == (self.schedule.cycle, self.schedule.attempt):
            out["status"] = STATUS_CUT_SHORT  # the try training stopped in, before its first evaluation
        return out

    def apply_phase_trainability(self) -> None:
        """requires_grad for the phase: dendrites always train; other parameters are frozen in the dendrites-only
        phase and otherwise keep the flags they had before training."""
        dm = self.model
        if self.correlation is not None:
            return  # candidate phase: CorrelationRule.start() froze the whole model
        base = self.base_requires_grad
        dendrite_ids = {id(p) for p in dm.dendrite_parameters()}
        only_dendrites = self.schedule.phase == PHASE_DENDRITE and not self.schedule.done
        for name, param in dm.named_parameters():
            if id(param) in dendrite_ids:
                param.requires_grad_(True)
            else:
                param.requires_grad_(False if only_dendrites else base.get(name, True))
        if dm.dendrite_config.learning_rule == "correlation":
            # installed correlation dendrites: input side frozen and cut from the backward pass; output weights train
            for _, layer in dm.dendritic_layers():
                perforate(layer)

    # ------------------------------------------------------------------ checkpoints
    def save_options(self, output_dir: str, internal_call: bool) -> dict[str, Any]:
        """The `save_pretrained` arguments of a save by the trainer: a Trainer checkpoint of a run whose base the user
        froze is adapter-only (`checkpoint_save_options`); `trainer.save_model()` writes a full model."""
        trainer = self.trainer
        name = f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}"
        if internal_call and trainer.is_in_train and os.path.basename(os.path.normpath(output_dir)) == name:
            # The model's own parameters decide (a PEFT model's adapters are saved in full in any case).
            own = {f"model.{name}" for name in self.model.checkpoint_names()}
            return checkpoint_save_options({n: flag for n, flag in self.base_requires_grad.items() if n in own})
        return {}

    def write_state(self, directory: str) -> None:
        """Write the schedule state into checkpoint `directory` (after the model files; main process only)."""
        candidates = correlation = None
        rule = self.correlation
        if rule is not None:
            candidates = {f"{layer}/{k}": v.detach().cpu().contiguous() for layer, pool in rule.pools.items() for k, v in pool.state_dict().items()}
            candidates.update({f"{layer}/last_scores": v.detach().cpu().contiguous() for layer, v in rule.last_scores.items()})
            correlation = {"phase": dataclasses.asdict(self.correlation_state), "history": list(rule.history)}
        write_schedule_state(
            directory, self.model, schedule=self.schedule.to_dict(), history=self.history,
            snapshots={"cycle_best": self.cycle_best, "accepted": self.accepted, "lr_start": self.lr_start, "lr_best": self.lr_best},
            candidates=candidates, correlation=correlation, weights=self.weights,
        )

    def load_state(self, directory: str) -> dict[str, Any] | None:
        """Read the schedule state of checkpoint `directory`, before its model is loaded (snapshots stored as model
        files pass through the model). Returns what `finish_loading` needs, or None when the folder has none."""
        payload = read_schedule_payload(directory)
        if payload is None:
            logger.warning("%s has no dendrite schedule state: the dendrite schedule starts from the beginning.", directory)
            return None
        schedule = DendriteSchedule.from_dict(payload["schedule"])
        if schedule.settings != self.trainer.args.dendrite_schedule_settings():
            logger.warning(
                "The schedule settings in %s differ from this run's arguments; continuing with the checkpoint's: %s",
                directory, schedule.settings,
            )
        self.schedule = schedule
        self.history = list(payload.get("history", []))
        self.has_run = True
        self.weights = payload.get("weights")  # the checkpoint's weights are the model's now
        snaps = read_snapshots(directory, payload, self.model)
        self.cycle_best, self.accepted = snaps["cycle_best"], snaps["accepted"]
        self.lr_start, self.lr_best = snaps.get("lr_start"), snaps.get("lr_best")
        return payload

    def finish_loading(self, directory: str, payload: dict[str, Any]) -> None:
        """After the checkpoint's model is loaded: growth count, the candidate phase it was written in, trainability."""
        self.model.growth_count = int(payload.get("growth_count", self.model.growth_count))
        if self.correlation is not None:
            self.correlation.finish()
            self.correlation = None
        info = payload.get("correlation")
        if info is not None:
            tensors = read_candidates(directory)
            rule = self._new_correlation_rule()
            rule.start()
            for layer, pool in rule.pools.items():
                state = {k: tensors[f"{layer}/{k}"] for k in pool.state_dict() if f"{layer}/{k}" in tensors}
                if set(state) != set(pool.state_dict()):
                    rule.finish()
                    raise ValueError(f"{directory} has no candidates for layer {layer!r}; it does not belong to this model.")
                pool.load_state_dict(state)
                if f"{layer}/last_scores" in tensors:
                    rule.last_scores[layer] = tensors[f"{layer}/last_scores"].to(pool.bias.device)
            rule.history = [float(v) for v in info.get("history", [])]
            self.correlation = rule
            self.correlation_state = CorrelationPhaseState(**info["phase"])
        self.apply_phase_trainability()
        if self._main:
            s = self.schedule
            logger.info(
                "Resumed the dendrite schedule from %s: cycle %d, try %d, %s phase%s.", directory, s.cycle, s.attempt,
                s.phase, " (candidate phase)" if self.correlation is not None else "",
            )

    # ------------------------------------------------------------------ report
    def cycle_rows(self) -> list[dict[str, Any]]:
        """One row per cycle try: cycle, try, num_dendrites, params, best_score, best_step, status ("accepted",
        "discarded" or, still running when training stopped, "stopped"), correlation."""
        from .plotting import cycle_table

        history = [dataclasses.asdict(h) for h in self.schedule.history]
        return cycle_table(self.history, history, bool(self.trainer.args.greater_is_better))

    def training_summary(self) -> dict[str, Any] | None:
        """What the model card shows (`DendriticModel.training_summary`); see `DendriticTrainer.save_model`.

        `eval_results` and `saved_model` describe the model as it is now (see `saved_model()`). A trainer that never
        trained (evaluation or prediction only) returns the model's own summary unchanged: the one its checkpoint
        carries, describing the run that trained it (None for a model that no `DendriticTrainer` trained)."""
        from transformers.modelcard import extract_hyperparameters_from_trainer

        if not self.has_run:
            return self.model.training_summary

        args = self.trainer.args
        rows = self.cycle_rows()
        status = {"accepted": STATUS_KEPT, "discarded": STATUS_DISCARDED, "stopped": STATUS_CUT_SHORT}
        cycles = [
            {"cycle": r["cycle"], "try": r["try"], "num_dendrites": r["num_dendrites"], "params": r["params"],
             "best_score": r["best_score"], "best_step": r["best_step"], "status": status[r["status"]],
             "dendrite_weight": r.get("dendrite_weight"), "ablation_score": r.get("ablation_score"),
             "ablation_delta": r.get("ablation_delta"), "lr_candidates": r.get("lr_candidates"), "lr_pick": r.get("lr_pick")}
            for r in rows
        ]
        saved = self.saved_model()
        settings = self.schedule.settings
        try:
            hyperparameters = extract_hyperparameters_from_trainer(self.trainer)
        except (AttributeError, KeyError, TypeError, ValueError) as err:  # a summary must never stop a save
            logger.debug("Could not extract the training hyperparameters: %s", err)
            hyperparameters = {}
        return {
            "metric": self.score_key(),
            "trainer": type(self.trainer).__name__,
            "greater_is_better": bool(args.greater_is_better),
            "completed": self.schedule.done,
            "stopped_by_cap": self.stopped_by_cap,
            "cycles": cycles,
            "schedule": {
                "patience": list(settings.patience),
                "improvement_threshold": list(settings.improvement_threshold),
                "improvement_epsilon": list(settings.improvement_epsilon),
                "max_cycles": settings.max_cycles,
                "max_tries": settings.max_tries,
                "dendrites_only_phase": settings.dendrites_only_phase,
                "learning_rule": self.model.dendrite_config.learning_rule,
                "dendrites_per_cycle": self.model.dendrite_config.dendrites_per_cycle,
                "dendrite_lr_schedule": args.dendrite_lr_schedule,
                "dendrite_cycle_steps": args.dendrite_cycle_steps,
                "restarts_only": bool(args.dendrite_restarts_only),
                "restart_steps": list(settings.restart_steps) if settings.restart_steps is not None else None,
                "lr_search": list(settings.lr_search) or None,
                "negligible_dendrite_weight": NEGLIGIBLE_DENDRITE_WEIGHT,
            },
            "hyperparameters": hyperparameters,
            # older key (every try, with the candidates' S of the correlation rule), read by earlier model-card code
            "tries": [{**r, "status": status[r["status"]]} for r in rows],
            "curve_png": self.curve_path if self.curve_path and os.path.isfile(self.curve_path) else None,
            "saved_model": saved,
            "eval_results": dict(saved["metrics"]),
        }

    def write_report(self) -> None:
        """Write the evaluation CSV and the training curve into the run's folder (main process only): `output_dir`,
        or during `hyperparameter_search` the trial's own folder (`output_dir/run-<n>`), so trials do not overwrite
        each other's reports."""
        from .trainer_internals import run_output_dir

        args = self.trainer.args
        if not args.should_save or not self.history:
            return
        from .plotting import plot_training_curve, write_eval_csv

        folder = run_output_dir(self.trainer)
        os.makedirs(folder, exist_ok=True)
        csv_path = write_eval_csv(self.history, os.path.join(folder, DENDRITE_EVAL_CSV_NAME))
        history = [dataclasses.asdict(h) for h in self.schedule.history]
        png_path = os.path.join(folder, DENDRITE_CURVE_NAME)
        try:
            self.curve_path = plot_training_curve(self.history, history, png_path, self.score_key(), bool(args.greater_is_better))
        except ImportError as err:
            logger.warning("Not plotting the training curve: %s", err)
        self.model.training_summary = self.training_summary()
        logger.info("Wrote %s%s", csv_path, f" and {self.curve_path}" if self.curve_path else "")

