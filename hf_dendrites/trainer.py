"""`DendriticTrainer`: `transformers.Trainer` running the dendrite phase schedule (ALGORITHM.md section 2).

Users switch an existing fine-tuning script to dendrites by changing two class names:

    args = DendriticTrainingArguments(output_dir="out", eval_strategy="steps", eval_steps=100, ...)
    trainer = DendriticTrainer(model, args, train_dataset=train, eval_dataset=valid)
    trainer.train()

How the schedule lives inside the Trainer's loop
------------------------------------------------
Every evaluation made during training (`Trainer._evaluate`) feeds its score to `DendriteSchedule`, and the
decision is carried out right there, between the evaluation and the checkpoint the Trainer may save at that
step, so a checkpoint always reflects the decision taken at its step. Growth, retries and phase switches
replace parameters (new `Parameter` objects), so they rebuild the training objects in place:

- the optimizer is created anew for the new trainable set and prepared by accelerate (the old one is removed
  from the accelerator's lists so that no stale optimizer is unscaled, stepped or saved);
- the LR scheduler is created anew (see "LR schedule" below);
- under DDP the model is wrapped anew by `accelerator.prepare` (a DDP wrapper registers its parameters once;
  the new wrapper also broadcasts rank 0's parameters, so all ranks start the cycle identical).

The Trainer's inner loop keeps the wrapper it started with in a local variable. Two small overrides make the
loop use the current one: `_run_epoch` hands the current `model_wrapped` to every epoch, and `training_step`
swaps a stale wrapper for the current one for the rest of the epoch in which a growth happened (keeping the
loop's `no_sync` gradient-accumulation window). The loop itself is not copied, so logging, the progress bar,
callbacks, checkpointing and `report_to` integrations run unchanged. `COMPLETE` restores the best model and
sets `control.should_training_stop`; the Trainer then finishes normally, whatever epochs remain.

LR schedule across cycles
-------------------------
`dendrite_lr_schedule="restart"` (default): every rebuild (growth, retry, switch to the neuron phase) starts the
configured schedule (`lr_scheduler_type`, with its warmup) afresh over the steps that remain until `max_steps`,
so each cycle gets a full warmup-and-decay. `"continue"`: one schedule over the whole run as in the plain
Trainer; a rebuilt scheduler is advanced to the current step, so later cycles train at the decayed rate. In both
cases the optimizer state (e.g. Adam moments) starts fresh at each rebuild.

Best weights
------------
The weights to restore are kept in CPU memory: a copy of the model at the best evaluation of the current cycle,
and a copy of the last accepted cycle's best (shared when they are the same). Every Trainer checkpoint carries
them (`dendrite_schedule_weights.safetensors`, up to twice the model's size) with the schedule state
(`dendrite_schedule.json`), so a resumed run restores exactly what the uninterrupted run would have.

The correlation learning rule (`DendriteConfig(learning_rule="correlation")`)
----------------------------------------------------------------------------
A growth (or retry) does not add dendrites at once: it starts a *candidate phase*. The network is frozen and a
`CorrelationRule` trains a pool of candidate dendrites per layer against the errors captured in the ordinary
backward pass; the Trainer's optimizer is then a `CandidateOptimizer` (Adam at `candidate_learning_rate`, driven
by the usual LR scheduler), so gradient accumulation, logging and checkpoints work unchanged. Evaluations still
run, but their score does not feed the schedule (the model does not change); instead the candidates' mean S
since the previous evaluation is logged (`dendrite_correlation`) and the phase ends when S has not improved by
`correlation_improvement_threshold` (relative) for `correlation_patience` evaluations. The best
`dendrites_per_cycle` candidates of every layer are then installed with output weights at zero, their input
weights frozen and their input detached (perforated backward), and training goes on with the schedule's phase
for the cycle: everything but the dendrites' input side trains (or, with `dendrites_only_phase=True`, first
only the dendrites' output weights). Under DDP the candidate phase runs without a DDP wrapper (nothing of the
model trains); the rule all-reduces its statistics, so every rank installs the same candidates. A checkpoint
written during a candidate phase carries the candidates (`dendrite_candidates.safetensors`), and their optimizer
state is the checkpoint's optimizer state.

Freezing in the dendrites-only phase (`dendrites_only_phase=True`)
------------------------------------------------------------------
Every parameter that is not a dendrite parameter is frozen (embeddings, norms and task heads included). All
dendrite parameters of a layer train, the older dendrites' too: a layer's dendrites share one stacked weight.
In the neuron phase every parameter trains again, except those the user had frozen before training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.trainer_pt_utils import LabelSmoother
from transformers.trainer_utils import IntervalStrategy
from transformers.utils import can_return_loss, find_labels

from .config import DendriteConfig
from .constants import (
    DENDRITE_CONFIG_NAME,
    DENDRITE_CURVE_NAME,
    DENDRITE_EVAL_CSV_NAME,
    DENDRITE_SCHEDULE_NAME,
    DENDRITE_SCHEDULE_WEIGHTS_NAME,
)

DENDRITE_CANDIDATES_NAME = "dendrite_candidates.safetensors"
from .model import DendriticModel, get_dendritic_model
from .learning_rules import CorrelationRule, perforate
from .utils import read_json_file
from .schedule import PHASE_DENDRITE, Action, Decision, DendriteSchedule, ScheduleSettings

logger = logging.getLogger(__name__)

TRAINING_ARGS_NAME = "training_args.bin"  # the name transformers' Trainer gives it
LR_SCHEDULE_MODES = ("restart", "continue")
# Numeric codes of the `dendrite_event` log entry (TensorBoard and W&B plot numbers, not strings).
EVENT_CODES = {Action.GROW: 1, Action.RETRY: 2, Action.SWITCH: 3, Action.COMPLETE: 4}
_STATE_FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------- arguments
@dataclass
class DendriticTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the settings of the dendrite schedule (ALGORITHM.md section 2).

    The schedule is driven by evaluations: an `eval_strategy` other than "no" is required. The score is the
    evaluation metric named by `metric_for_best_model` (default "loss", i.e. `eval_loss`) and `greater_is_better`.
    `num_train_epochs` / `max_steps` stay the overall cap: the schedule usually ends training before it.

    Example:
        >>> args = DendriticTrainingArguments(
        ...     output_dir="out", eval_strategy="steps", eval_steps=50, dendrite_patience=[4, 2], max_dendrite_cycles=2
        ... )
    """

    dendrite_patience: list[int] = field(
        default_factory=lambda: [3],
        metadata={
            "help": (
                "Evaluations in a row without improvement after which a phase has plateaued. An int, or a list "
                "indexed by dendrite cycle (cycle 0 = before the first growth; the last entry repeats)."
            )
        },
    )
    dendrite_improvement_threshold: list[float] = field(
        default_factory=lambda: [1e-3],
        metadata={
            "help": (
                "Relative improvement a score needs to count as better: it must beat the reference by more than "
                "threshold * |reference|. A float or a list indexed by cycle."
            )
        },
    )
    dendrite_improvement_epsilon: list[float] = field(
        default_factory=lambda: [0.0],
        metadata={
            "help": (
                "Absolute improvement a score needs to count as better (in addition to the relative threshold). A "
                "float or a list indexed by cycle."
            )
        },
    )
    max_dendrite_cycles: int = field(
        default=3,
        metadata={"help": "Number of accepted dendrite cycles (growths) after which training is complete; 0 = none."},
    )
    max_dendrite_tries: int = field(
        default=2,
        metadata={
            "help": (
                "How often a cycle may be tried: a cycle whose best score does not beat the best before it is "
                "discarded (its dendrites dropped) and retried with fresh dendrites until this many tries are used; "
                "then training is complete."
            )
        },
    )
    dendrites_only_phase: bool = field(
        default=False,
        metadata={
            "help": (
                "gd learning rule: if True, each cycle starts with a dendrites-only phase (every non-dendrite "
                "parameter frozen) that runs until it plateaus, followed by a phase where everything trains. If "
                "False, new dendrites train jointly with the network from the start."
            )
        },
    )
    candidate_learning_rate: float = field(
        default=1e-2,
        metadata={"help": "correlation rule: Adam learning rate of the candidate dendrites (the LR scheduler scales it)."},
    )
    correlation_patience: int = field(
        default=2,
        metadata={
            "help": (
                "correlation rule: evaluations in a row without improvement of the candidates' score S after which "
                "the candidate phase ends and the best candidates are installed."
            )
        },
    )
    correlation_improvement_threshold: float = field(
        default=1e-2,
        metadata={"help": "correlation rule: relative improvement of S that counts as an improvement."},
    )
    dendrite_lr_schedule: str = field(
        default="restart",
        metadata={
            "help": (
                "'restart': each growth / retry / phase switch restarts the LR schedule (lr_scheduler_type, with "
                "warmup) over the remaining steps. 'continue': one LR schedule over the whole run."
            )
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.eval_strategy == IntervalStrategy.NO:
            raise ValueError(
                "DendriticTrainer decides when to grow dendrites from evaluation scores, so it needs evaluations: set "
                "`eval_strategy='steps'` (with `eval_steps`) or `eval_strategy='epoch'`, and pass an `eval_dataset`."
            )
        if self.metric_for_best_model is None:
            self.metric_for_best_model = "loss"
            if self.greater_is_better is None:
                self.greater_is_better = False
        for name in ("dendrite_patience", "dendrite_improvement_threshold", "dendrite_improvement_epsilon"):
            value = getattr(self, name)
            setattr(self, name, list(value) if isinstance(value, (list, tuple)) else [value])
        if not self.candidate_learning_rate > 0:
            raise ValueError(f"`candidate_learning_rate` must be > 0, got {self.candidate_learning_rate!r}.")
        if isinstance(self.correlation_patience, bool) or not isinstance(self.correlation_patience, int) or self.correlation_patience < 1:
            raise ValueError(f"`correlation_patience` must be an integer >= 1, got {self.correlation_patience!r}.")
        if not self.correlation_improvement_threshold >= 0:
            raise ValueError(
                f"`correlation_improvement_threshold` must be >= 0, got {self.correlation_improvement_threshold!r}."
            )
        if self.dendrite_lr_schedule not in LR_SCHEDULE_MODES:
            raise ValueError(f"`dendrite_lr_schedule` must be one of {list(LR_SCHEDULE_MODES)}, got {self.dendrite_lr_schedule!r}.")
        try:
            self.dendrite_schedule_settings()
        except ValueError as err:
            raise ValueError(f"Invalid dendrite schedule argument: {err}") from err

    def dendrite_schedule_settings(self) -> ScheduleSettings:
        """The `ScheduleSettings` these arguments describe."""
        return ScheduleSettings(
            patience=self.dendrite_patience,
            improvement_threshold=self.dendrite_improvement_threshold,
            improvement_epsilon=self.dendrite_improvement_epsilon,
            max_cycles=self.max_dendrite_cycles,
            max_tries=self.max_dendrite_tries,
            dendrites_only_phase=self.dendrites_only_phase,
            greater_is_better=bool(self.greater_is_better),
        )


def _to_dendritic_args(args: TrainingArguments) -> DendriticTrainingArguments:
    """Plain `TrainingArguments` -> `DendriticTrainingArguments` with the default dendrite settings."""
    data = args.to_dict()
    # to_dict() masks tokens; keep the real ones.
    for key in data:
        if key.endswith("_token"):
            data[key] = getattr(args, key)
    logger.info("DendriticTrainer got plain TrainingArguments; using the default dendrite schedule settings.")
    return DendriticTrainingArguments(**data)


# ---------------------------------------------------------------------------------------------- helpers
@dataclass
class _Snapshot:
    """A CPU copy of the model (dendrite counts + state dict) and the evaluation it scored."""

    counts: dict[str, int]
    state: dict[str, torch.Tensor]
    step: int
    metrics: dict[str, float]


@dataclass
class _CorrelationPhaseState:
    """Plateau tracking of the candidates' score S during a candidate phase (JSON-serialisable)."""

    best: Optional[float] = None
    evals_without_improvement: int = 0
    history_index: int = 0  # entries of CorrelationRule.history already averaged into an evaluation
    start_step: int = 0


class _CausalLabelSmoother(LabelSmoother):
    """Label smoothing that shifts labels, as the Trainer does for causal LMs.

    The Trainer decides whether to shift from the class name of the model it trains; for a `DendriticModel` it
    cannot tell, so the trainer installs this smoother when the wrapped model is a causal LM.
    """

    def __call__(self, model_output, labels, shift_labels=False, **kwargs):
        return super().__call__(model_output, labels, shift_labels=True, **kwargs)


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)) and math.isfinite(float(value)):
            out[key] = float(value) if isinstance(value, float) else value
    return out


# ---------------------------------------------------------------------------------------------- trainer
class DendriticTrainer(Trainer):
    """A `transformers.Trainer` that grows dendrites when the evaluation score plateaus.

    Args:
        model: a plain transformers model (converted with `dendrite_config`, or the per-architecture defaults) or
            a `DendriticModel`.
        args: `DendriticTrainingArguments` (plain `TrainingArguments` are converted with default dendrite
            settings). An `eval_strategy` and an `eval_dataset` are required.
        dendrite_config: how to convert a plain model (ignored for a `DendriticModel`, which carries its own).
            When its `seed` is None the trainer uses `args.seed`, so that growth is identical on every process
            and after a resume.
        Every other argument is the Trainer's. `optimizers=(optimizer, scheduler)` and `model_init` are not
        supported (the trainer must build optimizers for parameters that do not exist yet); pass
        `optimizer_cls_and_kwargs=(cls, kwargs)` to choose the optimizer.

    After `train()`, `output_dir` holds `dendrite_evaluations.csv` (one row per evaluation: step, score, phase,
    cycle, try, dendrites, parameters, decision) and `dendrite_training_curve.png`. `trainer.dendrite_schedule` is
    the schedule (its `history` lists every cycle) and `trainer.dendrite_history` the evaluation rows.

    Supported: a single process (CPU / one GPU) and DDP (`torchrun` / `accelerate launch`). Not
    supported, with an error at construction: DeepSpeed, FSDP, tensor / context / sequence parallelism, SageMaker
    model parallelism and models sharded at load time.
    """

    # Set before Trainer.__init__ runs, which may already call overridden methods.
    _tag_eval_logs = False
    _eval_view: Optional[dict[str, Any]] = None
    _saving_checkpoint = False
    _curve_path: Optional[str] = None

    def __init__(
        self,
        model: Optional[nn.Module] = None,
        args: Optional[TrainingArguments] = None,
        data_collator: Optional[Callable] = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        model_init: Optional[Callable] = None,
        compute_loss_func: Optional[Callable] = None,
        compute_metrics: Optional[Callable] = None,
        callbacks: Optional[list] = None,
        optimizers: tuple = (None, None),
        optimizer_cls_and_kwargs: Optional[tuple] = None,
        preprocess_logits_for_metrics: Optional[Callable] = None,
        dendrite_config: Optional[DendriteConfig] = None,
    ):
        if args is None:
            raise ValueError(
                "DendriticTrainer needs `args`: e.g. DendriticTrainingArguments(output_dir='out', eval_strategy='steps', "
                "eval_steps=100)."
            )
        if not isinstance(args, DendriticTrainingArguments):
            args = _to_dendritic_args(args)
        if model_init is not None:
            raise ValueError(
                "DendriticTrainer does not support `model_init` (nor hyperparameter_search): pass the model itself."
            )
        if model is None:
            raise ValueError("DendriticTrainer needs a `model` (a transformers model or a DendriticModel).")
        if optimizers is not None and any(o is not None for o in optimizers):
            raise ValueError(
                "DendriticTrainer rebuilds the optimizer and LR scheduler whenever dendrites grow, so it cannot use "
                "the objects passed as `optimizers=`. Pass `optimizer_cls_and_kwargs=(optimizer_class, kwargs)` and "
                "choose the schedule with `lr_scheduler_type` instead."
            )
        _check_args_supported(args)
        model = self._as_dendritic_model(model, dendrite_config, args)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_loss_func=compute_loss_func,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )
        self._check_setup_supported()
        self._inspect_wrapped_model()

        self.dendrite_schedule = DendriteSchedule(args.dendrite_schedule_settings())
        self.dendrite_history: list[dict[str, Any]] = []
        self._cycle_best: Optional[_Snapshot] = None
        self._accepted: Optional[_Snapshot] = None
        dendrite_ids = {id(p) for p in model.dendrite_parameters()}
        # The user's own freezing, restored in every phase where neurons train.
        self._base_requires_grad = {n: p.requires_grad for n, p in model.named_parameters() if id(p) not in dendrite_ids}
        self._saving_checkpoint = False
        self._tag_eval_logs = False
        self._eval_view: Optional[dict[str, Any]] = None
        self._curve_path: Optional[str] = None
        # correlation rule: the running candidate phase (None outside one) and its plateau tracker
        self._correlation: Optional[CorrelationRule] = None
        self._correlation_state = _CorrelationPhaseState()

    # ------------------------------------------------------------------ construction helpers
    @staticmethod
    def _as_dendritic_model(model: nn.Module, dendrite_config: Optional[DendriteConfig], args) -> DendriticModel:
        if isinstance(model, DendriticModel):
            if dendrite_config is not None and dendrite_config != model.dendrite_config:
                raise ValueError(
                    "The model is already a DendriticModel with its own DendriteConfig; drop `dendrite_config=` "
                    "or pass the plain transformers model."
                )
            dm = model
        else:
            dm = get_dendritic_model(model, dendrite_config)
        if dm.dendrite_config.dendrite_seed is None:
            # A seed makes every growth identical on all processes and reproducible after a resume.
            dm.dendrite_config = dataclasses.replace(dm.dendrite_config, dendrite_seed=int(args.seed))
            logger.info("DendriteConfig.dendrite_seed is None; using args.seed=%d for dendrite growth.", args.seed)
        return dm

    def _check_setup_supported(self) -> None:
        """Raise for distributed setups whose wrappers cannot follow a change of the parameter set."""
        unsupported = []
        if self.is_deepspeed_enabled:
            unsupported.append("DeepSpeed")
        if self.is_fsdp_enabled or getattr(self, "is_fsdp_xla_enabled", False):
            unsupported.append("FSDP")
        if getattr(self, "is_distributed_loading_by_transformers", False):
            unsupported.append("models sharded at load time (from_pretrained(distributed_config=...))")
        pc = getattr(self.accelerator, "parallelism_config", None)
        if pc is not None and any(getattr(pc, f"{k}_enabled", False) for k in ("tp", "cp", "sp")):
            unsupported.append("tensor / context / sequence parallelism")
        from transformers.utils import is_sagemaker_mp_enabled

        if is_sagemaker_mp_enabled():
            unsupported.append("SageMaker model parallelism")
        if unsupported:
            raise NotImplementedError(
                f"DendriticTrainer does not support {', '.join(unsupported)}: growing dendrites replaces parameters, "
                "which these engines shard or register once. Train with a single process or DDP (`torchrun` / "
                "`accelerate launch` without a DeepSpeed or FSDP config); use low-rank dendrites "
                "(DendriteConfig(rank=...)) to keep large models affordable."
            )

    def _inspect_wrapped_model(self) -> None:
        """Take from the wrapped transformers model what the Trainer reads off the class of the model it trains.

        The Trainer finds label names and whether the model can return a loss from `type(model).forward`, and
        whether to shift labels for label smoothing from the class name: for a `DendriticModel` all three would
        be wrong (no `eval_loss`, unshifted causal-LM smoothing). Loss scaling under gradient accumulation
        (`model_accepts_loss_kwargs`) is taken from the wrapped model as well, so a dendritic model reports the
        same loss as the plain one.
        """
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        inner = self.model.model
        if self.args.label_names is None:
            self.label_names = find_labels(type(inner))
        self.can_return_loss = can_return_loss(type(inner))
        if hasattr(inner, "accepts_loss_kwargs"):
            self.model_accepts_loss_kwargs = inner.accepts_loss_kwargs
        else:
            params = inspect.signature(inner.forward).parameters.values()
            self.model_accepts_loss_kwargs = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params)
        pc = getattr(self.accelerator, "parallelism_config", None)
        if pc is not None and getattr(pc, "sp_backend", None) == "deepspeed" and getattr(pc, "sp_enabled", False):
            self.model_accepts_loss_kwargs = False
        if self.label_smoother is not None and type(inner).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
            self.label_smoother = _CausalLabelSmoother(epsilon=self.label_smoother.epsilon)

    # ------------------------------------------------------------------ public helpers
    @property
    def dendritic_model(self) -> DendriticModel:
        """The `DendriticModel` being trained (never a DDP wrapper)."""
        return self.model

    # ------------------------------------------------------------------ Trainer overrides: the loop
    def train(self, resume_from_checkpoint: Union[str, bool, None] = None, trial=None, ignore_keys_for_eval=None):
        """Train as `Trainer.train` does, then write the evaluation CSV and the training-curve PNG to `output_dir`.

        With `resume_from_checkpoint`, the checkpoint's dendrite layout is rebuilt before its weights are loaded,
        and the schedule continues where it was.
        """
        output = super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval)
        if self._correlation is not None:
            # The step budget ran out during a candidate phase: drop the candidates (the model is the restored best).
            logger.warning("Training stopped during a candidate phase; its candidates were not installed.")
            self._correlation.finish()
            self._correlation = None
            self._apply_phase_trainability()
        self._write_report()
        return output

    def _run_epoch(self, model, *args, **kwargs):
        """Give each epoch the current model wrapper (a growth in an earlier epoch replaced it), and train no more
        once the schedule is complete (e.g. when resuming from a checkpoint written at completion)."""
        if self.dendrite_schedule.done:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(self.model_wrapped, *args, **kwargs)

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        """Run the step on the current model wrapper.

        After a growth in the middle of an epoch, the epoch loop still holds the DDP wrapper it started with; its
        parameters are stale. The step runs on the new wrapper instead, inside its `no_sync` when the loop had
        suspended gradient synchronisation on the old one (gradient accumulation).
        """
        current = self.model_wrapped
        if model is current or current is None:
            loss = super().training_step(model, inputs, num_items_in_batch)
        else:
            context = contextlib.nullcontext()
            if getattr(model, "require_backward_grad_sync", True) is False:
                context = self.accelerator.no_sync(current)
            with context:
                loss = super().training_step(current, inputs, num_items_in_batch)
        if self._correlation is not None:
            # candidate phase: fold the errors this backward pass captured into the rule's statistics
            self._correlation.accumulate()
        return loss

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """During a candidate phase (correlation rule) the optimizer trains the candidates, not the (frozen)
        model; otherwise the Trainer's own optimizer."""
        if self._correlation is not None:
            if self.optimizer is None:
                self.optimizer = self._correlation.optimizer(lr=self.args.candidate_learning_rate)
            return self.optimizer
        return super().create_optimizer(model)

    def _evaluate(self, trial, ignore_keys_for_eval, skip_scheduler: bool = False):
        """Run the Trainer's evaluation, then feed its score to the schedule and carry out the decision."""
        self._eval_view = self._model_view()
        self._tag_eval_logs = True
        try:
            metrics = super()._evaluate(trial, ignore_keys_for_eval, skip_scheduler=skip_scheduler)
        finally:
            self._tag_eval_logs = False
        self._schedule_step(metrics)
        return metrics

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        """Add the dendrite state (cycle, phase, dendrite and parameter counts) to the evaluation log entries, so
        that it reaches the console, `log_history` and every `report_to` integration."""
        if self._tag_eval_logs and self._eval_view is not None and any(k.startswith("eval_") for k in logs):
            logs = {**logs, **self._log_fields(self._eval_view)}
        super().log(logs, start_time)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """Create the LR scheduler for the current phase (see "LR schedule across cycles" in the module docs).

        With `dendrite_lr_schedule="restart"` the schedule spans the steps from the start of the current phase to
        `max_steps`; a resumed run rebuilds the same scheduler before loading its state.
        """
        schedule = getattr(self, "dendrite_schedule", None)
        if self.lr_scheduler is None and schedule is not None and self.args.dendrite_lr_schedule == "restart":
            num_training_steps = max(num_training_steps - schedule.phase_start_step, 1)
        return super().create_scheduler(num_training_steps=num_training_steps, optimizer=optimizer)

    # ------------------------------------------------------------------ the schedule
    def _score_key(self) -> str:
        key = self.args.metric_for_best_model
        return key if key.startswith("eval_") else f"eval_{key}"

    def _score_from(self, metrics: dict[str, Any]) -> float:
        key = self._score_key()
        if key not in metrics:
            raise KeyError(
                f"DendriticTrainer reads the score from `metric_for_best_model`={self.args.metric_for_best_model!r} "
                f"({key!r}), which the evaluation did not return; it returned {sorted(metrics)}. Set "
                "`metric_for_best_model` to one of those, or return it from `compute_metrics`."
            )
        return float(metrics[key])

    def _model_view(self) -> dict[str, Any]:
        summary = self.model.dendrite_summary()
        s = self.dendrite_schedule
        return {
            "cycle": s.cycle,
            "try": s.attempt,
            "phase": s.phase,
            "num_dendrites": summary.num_dendrites,
            "params": summary.total_params,
            "dendrite_params": summary.dendrite_params,
            "trainable_params": summary.trainable_params,
        }

    @staticmethod
    def _log_fields(view: dict[str, Any]) -> dict[str, float]:
        return {
            "dendrite_cycle": view["cycle"],
            "dendrite_try": view["try"],
            "dendrite_phase": 1 if view["phase"] == PHASE_DENDRITE else 0,
            "dendrite_count": view["num_dendrites"],
            "dendrite_params": view["dendrite_params"],
            "total_params": view["params"],
            "trainable_params": view["trainable_params"],
        }

    def _decide(self, score: float) -> tuple[float, Decision]:
        """Step the schedule once, on the main process, and give every process the same state and decision."""
        if self.accelerator.num_processes <= 1:
            return score, self.dendrite_schedule.step(score, self.state.global_step)
        from accelerate.utils import broadcast_object_list

        payload: list[Optional[str]] = [None]
        if self.accelerator.is_main_process:
            decision = self.dendrite_schedule.step(score, self.state.global_step)
            payload = [json.dumps({"score": score, "decision": decision.to_dict(), "schedule": self.dendrite_schedule.to_dict()})]
        broadcast_object_list(payload, from_process=0)
        data = json.loads(payload[0])
        if not self.accelerator.is_main_process:
            self.dendrite_schedule = DendriteSchedule.from_dict(data["schedule"])
        return float(data["score"]), Decision.from_dict(data["decision"])

    def _schedule_step(self, metrics: dict[str, Any]) -> None:
        if self.dendrite_schedule.done or not self.is_in_train:
            return
        if self._correlation is not None:
            self._candidate_step(metrics)
            return
        view = self._eval_view or self._model_view()
        score, decision = self._decide(self._score_from(metrics))
        record = {"step": self.state.global_step, "epoch": self.state.epoch, "score": score, **view, "decision": decision.action.value}
        self.dendrite_history.append(record)

        if decision.new_best:
            self._cycle_best = self._snapshot(_numeric(metrics))
        if decision.cycle_accepted:
            self._accepted = self._cycle_best
        if decision.action is Action.CONTINUE:
            return
        if self.accelerator.is_main_process:
            logger.info("Step %d: %s", self.state.global_step, decision.message)

        if decision.action in (Action.GROW, Action.RETRY):
            self._restore(self._accepted)
            self._cycle_best = None
            self._grow_dendrites()
        elif decision.action is Action.SWITCH:
            self._restore(self._cycle_best)
        elif decision.action is Action.COMPLETE:
            self._restore(self._accepted)
        self._apply_phase_trainability()
        # Also at completion: a checkpoint written now must hold an optimizer state that fits the final model.
        self._rebuild_training_objects()
        if decision.action is Action.COMPLETE:
            self.control.should_training_stop = True
        self.log({**self._log_fields(self._model_view()), "dendrite_event": EVENT_CODES[decision.action]})

    def _grow_dendrites(self) -> None:
        """gd: add `dendrites_per_cycle` dendrites to every dendritic layer (seeded: identical on every process).
        correlation: start a candidate phase (seeded candidates); they are installed when their S plateaus."""
        dm = self.model
        if dm.dendrite_config.learning_rule != "correlation":
            dm.add_dendrites()
            return
        self._correlation = self._new_correlation_rule(generator=dm._growth_generator())
        dm.growth_count += 1  # a retried cycle gets fresh candidates
        self._correlation_state = _CorrelationPhaseState(start_step=self.state.global_step)
        self._correlation.start()

    def _new_correlation_rule(self, generator=None) -> CorrelationRule:
        cfg = self.model.dendrite_config
        return CorrelationRule(
            self.model,
            pool_size=cfg.candidate_pool_size,
            normalize=cfg.correlation_normalize,
            learning_rate=self.args.candidate_learning_rate,
            generator=generator,
        )

    def _candidate_step(self, metrics: dict[str, Any]) -> None:
        """An evaluation during a candidate phase: track S and install the best candidates when it plateaus."""
        rule, st = self._correlation, self._correlation_state
        recent = rule.history[st.history_index :]
        st.history_index = len(rule.history)
        view = self._eval_view or self._model_view()
        score = self._score_from(metrics)
        if not recent:  # no optimizer step since the last evaluation
            self.dendrite_history.append({"step": self.state.global_step, "epoch": self.state.epoch, "score": score, **view, "decision": "candidates"})
            return
        s_value = float(sum(recent) / len(recent))
        improved = st.best is None or s_value > st.best * (1.0 + self.args.correlation_improvement_threshold)
        if improved:
            st.best, st.evals_without_improvement = s_value, 0
        else:
            st.evals_without_improvement += 1
        install = st.evals_without_improvement >= self.args.correlation_patience
        self.dendrite_history.append(
            {"step": self.state.global_step, "epoch": self.state.epoch, "score": score, **view,
             "correlation": s_value, "decision": "install" if install else "candidates"}
        )
        self.log({"dendrite_correlation": s_value})
        if not install:
            return
        if self.accelerator.is_main_process:
            logger.info(
                "Step %d: candidate score S plateaued at %.6g after %d evaluation(s): installing the best %d candidate(s) "
                "per layer", self.state.global_step, s_value, self.args.correlation_patience,
                self.model.dendrite_config.dendrites_per_cycle,
            )
        self._correlation.install(self.model.dendrite_config.dendrites_per_cycle)
        self._correlation = None
        self._apply_phase_trainability()
        self._rebuild_training_objects()
        self.log({**self._log_fields(self._model_view()), "dendrite_event": EVENT_CODES[Action.GROW]})

    def _snapshot(self, metrics: dict[str, float]) -> _Snapshot:
        dm = self.model
        state = {k: v.detach().to("cpu", copy=True) for k, v in dm.state_dict().items()}
        return _Snapshot(dm.dendrite_counts(), state, self.state.global_step, metrics)

    def _restore(self, snapshot: Optional[_Snapshot]) -> None:
        """Put the model back to a snapshot: dendrite counts first (truncating or growing), then the weights."""
        if snapshot is None:
            logger.warning("No best weights recorded for this cycle (no finite score); keeping the current weights.")
            return
        dm = self.model
        dm.set_dendrite_counts(snapshot.counts)
        dm.load_state_dict(snapshot.state, strict=True)

    def _apply_phase_trainability(self) -> None:
        """requires_grad for the phase: dendrites always train; other parameters are frozen in the dendrites-only
        phase and otherwise keep the flags they had before training."""
        dm = self.model
        if self._correlation is not None:
            return  # candidate phase: CorrelationRule.start() froze the whole model
        dendrite_ids = {id(p) for p in dm.dendrite_parameters()}
        only_dendrites = self.dendrite_schedule.phase == PHASE_DENDRITE and not self.dendrite_schedule.done
        for name, param in dm.named_parameters():
            if id(param) in dendrite_ids:
                param.requires_grad_(True)
            else:
                param.requires_grad_(False if only_dendrites else self._base_requires_grad.get(name, True))
        if dm.dendrite_config.learning_rule == "correlation":
            # installed correlation dendrites: input side frozen and cut from the backward pass; output weights train
            for _, layer in dm.dendritic_layers():
                perforate(layer)

    def _rebuild_training_objects(self) -> None:
        """New optimizer and LR scheduler for the new parameter set, prepared by accelerate; under DDP a new model
        wrapper. The replaced objects are dropped from the accelerator so none of them is used again."""
        acc = self.accelerator
        old_wrapped, old_optimizer, old_scheduler = self.model_wrapped, self.optimizer, self.lr_scheduler
        acc._optimizers = [o for o in acc._optimizers if o is not old_optimizer]
        acc._schedulers = [s for s in acc._schedulers if s is not old_scheduler]
        self.optimizer = None
        self.lr_scheduler = None
        self._created_lr_scheduler = False
        self.create_optimizer()
        distributed = acc.num_processes > 1 and not isinstance(old_wrapped, nn.DataParallel)
        if distributed and self._correlation is not None:
            # Candidate phase: nothing of the model trains, and DDP refuses a module without trainable parameters.
            # Run the bare model; the correlation rule all-reduces its own statistics.
            # Listed as prepared, so the Trainer's evaluation does not prepare (and flag) the bare model itself.
            acc._models = [m for m in acc._models if m is not old_wrapped and m is not self.model] + [self.model]
            self.model_wrapped = self.model
            self.optimizer = acc.prepare(self.optimizer)
        elif distributed:
            # DDP (possibly compiled): wrap anew; DDP's constructor broadcasts rank 0's parameters. (DataParallel
            # replicates the module at every forward, so its wrapper stays valid.)
            # Depending on the backend accelerate lists the wrapper or the model itself; list the new wrapper once.
            acc._models = [m for m in acc._models if m is not old_wrapped and m is not self.model]
            # accelerate skips models flagged as prepared (the bare model may be, after a candidate phase)
            self.model.__dict__.pop("_is_accelerate_prepared", None)
            original_forward = self.model.__dict__.pop("_original_forward", None)
            if original_forward is not None:  # undo accelerate's autocast wrapper; prepare() applies it again
                self.model.forward = original_forward
            self.model_wrapped, self.optimizer = acc.prepare(self.model, self.optimizer)
        else:
            self.optimizer = acc.prepare(self.optimizer)
        self.create_scheduler(num_training_steps=self.state.max_steps)
        if self.args.dendrite_lr_schedule == "continue":
            self._advance_scheduler(self.state.global_step)
        for attr in ("model", "optimizer", "lr_scheduler"):
            setattr(self.callback_handler, attr, getattr(self, attr))

    def _advance_scheduler(self, steps: int) -> None:
        from transformers.optimization import GreedyLR

        if isinstance(self.lr_scheduler, (torch.optim.lr_scheduler.ReduceLROnPlateau, GreedyLR)):
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()": intended here
            for _ in range(steps):
                self.lr_scheduler.step()

    # ------------------------------------------------------------------ Trainer overrides: saving and loading
    def _save_checkpoint(self, model, trial) -> None:
        """Mark the save as a checkpoint, so `_save` also writes the schedule state into the folder."""
        self._saving_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._saving_checkpoint = False

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        """Save with `DendriticModel.save_pretrained` (base model under standard names, dendrites, model card)
        instead of a bare state dict, which is all the Trainer knows to do for a model that is not a
        `PreTrainedModel`. Checkpoints also get the schedule state."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        dm = self.model
        dm.training_summary = self._training_summary()
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        logger.info("Saving dendritic model checkpoint to %s", output_dir)
        processing_class = self.processing_class
        if processing_class is None and getattr(self.data_collator, "tokenizer", None) is not None:
            processing_class = self.data_collator.tokenizer
        dm.save_pretrained(output_dir, state_dict=state_dict, processing_class=processing_class)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        if self._saving_checkpoint:
            self._write_schedule_state(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Optional[nn.Module] = None) -> None:
        """Rebuild the checkpoint's dendrite layout, load its weights and the schedule state.

        The Trainer calls this before it creates the optimizer, so the optimizer it then builds (and whose saved
        state it loads) has exactly the checkpoint's parameters. A checkpoint of a plain Trainer run (no
        `dendrite_config.json`) loads into the wrapped base model.
        """
        from .saving import load_dendritic_state

        dm = self.model
        if os.path.isfile(os.path.join(resume_from_checkpoint, DENDRITE_CONFIG_NAME)):
            load_dendritic_state(dm, resume_from_checkpoint)
        else:
            logger.warning(
                "%s has no %s: loading it as a plain transformers checkpoint into the base model.",
                resume_from_checkpoint, DENDRITE_CONFIG_NAME,
            )
            super()._load_from_checkpoint(resume_from_checkpoint, model=dm.model)
        self._read_schedule_state(resume_from_checkpoint)
        self._apply_phase_trainability()

    def _load_best_model(self) -> None:
        """`load_best_model_at_end` with a changed architecture: rebuild the best checkpoint's dendrite layout
        before loading its weights. When the schedule completed, the model already is the schedule's best (a
        cycle's raw best may be one the schedule discarded), and nothing is loaded."""
        from .saving import load_dendritic_state

        if self.dendrite_schedule.done:
            logger.info("The dendrite schedule completed and restored its best model; not loading %s.", self.state.best_model_checkpoint)
            return
        checkpoint = self.state.best_model_checkpoint
        logger.info("Loading best model from %s (score: %s).", checkpoint, self.state.best_metric)
        load_dendritic_state(self.model, checkpoint)
        self._apply_phase_trainability()

    def create_model_card(
        self,
        language: Optional[str] = None,
        license: Optional[str] = None,
        tags: Union[str, list[str], None] = None,
        model_name: Optional[str] = None,
        finetuned_from: Optional[str] = None,
        tasks: Union[str, list[str], None] = None,
        dataset_tags: Union[str, list[str], None] = None,
        dataset: Union[str, list[str], None] = None,
        dataset_args: Union[str, list[str], None] = None,
    ) -> None:
        """Write the dendritic model card (dendrite config, parameter counts, per-cycle table, training curve) into
        `output_dir`. The Trainer's own card knows nothing of dendrites and would replace the one `save_model`
        wrote when `push_to_hub()` runs; only `tags` is used from the arguments."""
        if not self.is_world_process_zero():
            return
        from .hub import write_model_card

        self.model.training_summary = self._training_summary()
        write_model_card(self.model, self.args.output_dir, repo_id=self.hub_model_id, tags=[tags] if isinstance(tags, str) else tags)

    # ------------------------------------------------------------------ schedule state on disk
    def _write_schedule_state(self, directory: str) -> None:
        from safetensors.torch import save_file

        from .utils import atomic_write_text, library_version

        snapshots: dict[str, Any] = {}
        tensors: dict[str, torch.Tensor] = {}
        for name, snap in (("cycle_best", self._cycle_best), ("accepted", self._accepted)):
            if snap is None:
                snapshots[name] = None
                continue
            if name == "accepted" and snap is self._cycle_best:
                snapshots[name] = {"same_as": "cycle_best"}
                continue
            snapshots[name] = {"counts": snap.counts, "step": snap.step, "metrics": snap.metrics}
            tensors.update({f"{name}/{k}": v.contiguous() for k, v in snap.state.items()})
        if tensors:
            tmp = os.path.join(directory, DENDRITE_SCHEDULE_WEIGHTS_NAME + ".tmp")
            save_file(tensors, tmp, metadata={"format": "pt"})
            os.replace(tmp, os.path.join(directory, DENDRITE_SCHEDULE_WEIGHTS_NAME))
        payload = {
            "format_version": _STATE_FORMAT_VERSION,
            "library_version": library_version(),
            "schedule": self.dendrite_schedule.to_dict(),
            "history": self.dendrite_history,
            "growth_count": int(self.model.growth_count),
            "snapshots": snapshots,
            "correlation": self._write_candidates(directory),
        }
        atomic_write_text(os.path.join(directory, DENDRITE_SCHEDULE_NAME), json.dumps(payload, indent=2) + "\n")

    def _write_candidates(self, directory: str) -> Optional[dict[str, Any]]:
        """Save a running candidate phase's candidates (their Adam state is the checkpoint's optimizer state)."""
        rule = self._correlation
        if rule is None:
            return None
        from safetensors.torch import save_file

        tensors = {f"{layer}/{k}": v.detach().cpu().contiguous() for layer, pool in rule.pools.items() for k, v in pool.state_dict().items()}
        tensors.update({f"{layer}/last_scores": v.detach().cpu().contiguous() for layer, v in rule.last_scores.items()})
        tmp = os.path.join(directory, DENDRITE_CANDIDATES_NAME + ".tmp")
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, os.path.join(directory, DENDRITE_CANDIDATES_NAME))
        return {"phase": dataclasses.asdict(self._correlation_state), "history": list(rule.history)}

    def _read_candidates(self, directory: str, info: Optional[dict[str, Any]]) -> None:
        """Restart the candidate phase a checkpoint was written in, with its candidates."""
        if self._correlation is not None:
            self._correlation.finish()
            self._correlation = None
        if info is None:
            return
        from safetensors.torch import load_file

        path = os.path.join(directory, DENDRITE_CANDIDATES_NAME)
        if not os.path.isfile(path):
            raise ValueError(f"{path} is missing: the checkpoint was written during a candidate phase and is incomplete.")
        tensors = load_file(path, device="cpu")
        rule = self._new_correlation_rule()
        rule.start()
        for layer, pool in rule.pools.items():
            state = {k: tensors[f"{layer}/{k}"] for k in pool.state_dict() if f"{layer}/{k}" in tensors}
            if set(state) != set(pool.state_dict()):
                rule.finish()
                raise ValueError(f"{path} has no candidates for layer {layer!r}; it does not belong to this model.")
            pool.load_state_dict(state)
            if f"{layer}/last_scores" in tensors:
                rule.last_scores[layer] = tensors[f"{layer}/last_scores"].to(pool.bias.device)
        rule.history = [float(v) for v in info.get("history", [])]
        self._correlation = rule
        self._correlation_state = _CorrelationPhaseState(**info["phase"])

    def _read_schedule_state(self, directory: str) -> None:
        path = os.path.join(directory, DENDRITE_SCHEDULE_NAME)
        if not os.path.isfile(path):
            logger.warning("%s not found: the dendrite schedule starts from the beginning.", path)
            return
        payload = read_json_file(path, hint="the checkpoint is damaged, resume from another one")
        version = payload.get("format_version")
        if not isinstance(version, int) or version > _STATE_FORMAT_VERSION:
            raise ValueError(f"{path} has format {version!r}, newer than this hf_dendrites reads; upgrade hf_dendrites.")
        schedule = DendriteSchedule.from_dict(payload["schedule"])
        if schedule.settings != self.args.dendrite_schedule_settings():
            logger.warning(
                "The schedule settings in %s differ from this run's arguments; continuing with the checkpoint's: %s",
                path, schedule.settings,
            )
        self.dendrite_schedule = schedule
        self.dendrite_history = list(payload.get("history", []))
        self.model.growth_count = int(payload.get("growth_count", self.model.growth_count))

        tensors: dict[str, torch.Tensor] = {}
        weights_path = os.path.join(directory, DENDRITE_SCHEDULE_WEIGHTS_NAME)
        if os.path.isfile(weights_path):
            from safetensors.torch import load_file

            tensors = load_file(weights_path, device="cpu")
        snaps: dict[str, Optional[_Snapshot]] = {}
        for name in ("cycle_best", "accepted"):
            info = payload.get("snapshots", {}).get(name)
            if info is None:
                snaps[name] = None
            elif "same_as" in info:
                snaps[name] = snaps[info["same_as"]]
            else:
                prefix = f"{name}/"
                state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                if not state:
                    raise ValueError(f"{weights_path} lacks the {name!r} weights that {path} refers to; the checkpoint is incomplete.")
                snaps[name] = _Snapshot(dict(info["counts"]), state, int(info["step"]), dict(info.get("metrics", {})))
        self._cycle_best, self._accepted = snaps["cycle_best"], snaps["accepted"]
        self._read_candidates(directory, payload.get("correlation"))

    # ------------------------------------------------------------------ report
    def _cycle_rows(self) -> list[dict[str, Any]]:
        from .plotting import cycle_table

        history = [dataclasses.asdict(h) for h in self.dendrite_schedule.history]
        return cycle_table(self.dendrite_history, history, bool(self.args.greater_is_better))

    def _training_summary(self) -> dict[str, Any]:
        """What the model card shows (`DendriticModel.training_summary`)."""
        rows = self._cycle_rows()
        final = self._accepted.metrics if self.dendrite_schedule.done and self._accepted is not None else None
        if final is None and self.dendrite_history:
            final = {self._score_key(): self.dendrite_history[-1]["score"]}
        return {
            "metric": self._score_key(),
            "greater_is_better": bool(self.args.greater_is_better),
            "cycles": [
                {"cycle": r["cycle"], "try": r["try"], "num_dendrites": r["num_dendrites"], "params": r["params"],
                 "best_score": r["best_score"], "status": r["status"]}
                for r in rows if r["status"] != "discarded"
            ],
            "tries": rows,
            "completed": self.dendrite_schedule.done,
            "curve_png": self._curve_path if self._curve_path and os.path.isfile(self._curve_path) else None,
            "eval_results": {k: v for k, v in (final or {}).items() if k.startswith("eval_") and not k.endswith(("_runtime", "_per_second"))},
        }

    def _write_report(self) -> None:
        """Write the evaluation CSV and the training curve into `output_dir` (main process only)."""
        if not self.args.should_save or not self.dendrite_history:
            return
        from .plotting import plot_training_curve, write_eval_csv

        os.makedirs(self.args.output_dir, exist_ok=True)
        csv_path = write_eval_csv(self.dendrite_history, os.path.join(self.args.output_dir, DENDRITE_EVAL_CSV_NAME))
        history = [dataclasses.asdict(h) for h in self.dendrite_schedule.history]
        png_path = os.path.join(self.args.output_dir, DENDRITE_CURVE_NAME)
        try:
            self._curve_path = plot_training_curve(
                self.dendrite_history, history, png_path, self._score_key(), bool(self.args.greater_is_better)
            )
        except ImportError as err:
            logger.warning("Not plotting the training curve: %s", err)
        self.model.training_summary = self._training_summary()
        logger.info("Wrote %s%s", csv_path, f" and {self._curve_path}" if self._curve_path else "")


def _check_args_supported(args: TrainingArguments) -> None:
    """Fail before building anything for arguments that select an unsupported engine."""
    if getattr(args, "deepspeed", None):
        raise NotImplementedError(
            "DendriticTrainer does not support DeepSpeed (`deepspeed=` is set): growing dendrites replaces "
            "parameters, which DeepSpeed's engine registers once. Use a single process or DDP (`torchrun`)."
        )
    if getattr(args, "fsdp", None):
        raise NotImplementedError(
            "DendriticTrainer does not support FSDP (`fsdp=` is set): growing dendrites replaces parameters, which "
            "FSDP shards once. Use a single process or DDP (`torchrun`); low-rank dendrites (DendriteConfig(rank=...)) "
            "keep large models affordable."
        )
