"""`DendriticTrainerMixin`: any `transformers.Trainer` subclass running the dendrite phase schedule (docs/schedule.md);
`DendriticTrainer`: the mixin plus `Trainer`. (TRL's trainers with the mixin: hf_dendrites/trl.py, docs/trl.md.)

Users switch an existing fine-tuning script to dendrites by changing two class names:

    args = DendriticTrainingArguments(output_dir="out", eval_strategy="steps", eval_steps=100, ...)
    trainer = DendriticTrainer(model, args, train_dataset=train, eval_dataset=valid)
    trainer.train()

Where things live
-----------------
- `schedule.py`: the phase state machine (pure Python).
- `callback.py`: `DendriteScheduleCallback`, which owns the schedule, the run history and the best-weight
  snapshots, and reacts to the Trainer's events (the decision of an evaluation is taken in `on_evaluate`, inside
  the Trainer's evaluation and before the checkpoint of that step is written).
- `trainer_state.py`: the schedule's files inside a checkpoint.
- `trainer_internals.py`: the few private transformers / accelerate names still used, each guarded by a test.
- `training_args.py`: the schedule's settings (`DendriteScheduleArguments`, a mixin for any arguments class).
- this module: `DendriticTrainerMixin`, which converts the model the trainer's own `__init__` prepared, rebuilds
  the training objects when the parameter set changes, saves and loads dendritic checkpoints, writes the dendritic
  model card and tags the logs; every method calls the trainer's own (`super()`), so a `Trainer` subclass (TRL's SFT
  and DPO trainers, a user's) keeps its loss, logging and data handling. `DendriticTrainer` is the mixin + `Trainer`.

Rebuilding after a growth
-------------------------
Growth, retries and phase switches replace parameters (new `Parameter` objects), so the trainer rebuilds:

- the optimizer, for the new trainable set, prepared by accelerate (the old one leaves the accelerator's lists so
  that no stale optimizer is unscaled, stepped or saved);
- the LR scheduler (see "LR schedule" below);
- under DDP, the model wrapper (a DDP wrapper registers its parameters once; the new wrapper also broadcasts
  rank 0's parameters, so all ranks start the cycle identical);
- under DeepSpeed ZeRO-0/1/2, the engine, for the same reason (`deepspeed_support.py`);
- under FSDP2, the shards: the model was gathered into a plain module before the schedule changed it
  (`prepare_model_change`) and is sharded again, new dendrites included (hf_dendrites/fsdp.py).

The Trainer's epoch loop keeps the wrapper it started the epoch with in a local variable; `training_step` swaps a
stale wrapper for the current one (keeping the loop's `no_sync` gradient-accumulation window), which covers every
step on every transformers release. The loop itself is not copied, so logging, the progress bar, callbacks,
checkpointing and `report_to` integrations run unchanged. `COMPLETE` restores the best model and sets
`control.should_training_stop`; the Trainer then finishes normally, whatever epochs remain.

LR schedule across cycles
-------------------------
`dendrite_lr_schedule="restart"` (default): every rebuild (growth, retry, switch to the neuron phase) starts the
configured schedule (`lr_scheduler_type`, with its warmup) afresh over the steps that remain until `max_steps`,
so each cycle gets a full warmup-and-decay. `"continue"`: one schedule over the whole run as in the plain
Trainer; a rebuilt scheduler is advanced to the current step, so later cycles train at the decayed rate. In both
cases the optimizer state (e.g. Adam moments) starts fresh at each rebuild: a checkpoint written at a growth holds
an optimizer without state, and resuming from it is exact.

- `dendrite_cycle_steps=N` (with "restart"): every schedule, the first one included, spans N steps (warmup
  included) and then holds its final value, so the shape of a cycle's LR does not depend on the overall step cap.
- `lr_scheduler_type="reduce_lr_on_plateau"`: a fresh `PhaseReduceLROnPlateau` at each rebuild, at the full
  learning rate ("restart"), stepped by the evaluation score inside the phase; its `mode` follows
  `greater_is_better`. With "continue" the new one takes over the old one's reduced LR and plateau counters.

Growth recipe
-------------
- `dendrite_restarts_only=True`: every growth event happens (restore the best weights, fresh optimizer, LR
  restart, the same keep/discard rule), but no dendrites are added: the control that tells what restarts alone
  give.
- `dendrite_restart_steps=[...]`: growth events at exactly these steps (at their evaluations) instead of at
  plateaus, e.g. to replay another run's growth and retry steps; training runs to `max_steps`, where the last
  cycle is judged and the accepted best model restored.
- `dendrite_lr_search=[1.0, 0.1, ...]` (factors of `learning_rate`): after every growth the cycle is trained once
  per factor, each from a snapshot of the post-growth weights and each until its plateau; the candidate with the
  best validation score is kept (its best weights restored) and the schedule then decides as usual. Every
  candidate and its score is logged, listed in the cycle's `dendrite_schedule.history` entry (`lr_candidates`,
  `lr_pick`) and in `training_summary["cycles"]`. The decisions are taken on the main process and broadcast, and
  the snapshots are part of every checkpoint, so a run resumed during any candidate continues identically.

Best weights
------------
The weights to restore are kept in CPU memory: a copy of the model at the best evaluation of the current cycle,
and a copy of the last accepted cycle's best (shared when they are the same). Checkpoints store them once per
change (a reference to the checkpoint's own model files when they are the snapshot, else hard links to the files
an earlier checkpoint wrote; see `trainer_state.py`), with the schedule state (`dendrite_schedule.json`), so a
resumed run restores exactly what the uninterrupted run would have.

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
for the cycle. Under DDP the candidate phase runs without a DDP wrapper (nothing of the model trains); the rule
all-reduces its statistics, so every rank installs the same candidates. A checkpoint written during a candidate
phase carries the candidates (`dendrite_candidates.safetensors`), and their optimizer state is the checkpoint's
optimizer state.

Freezing in the dendrites-only phase (`dendrites_only_phase=True`)
------------------------------------------------------------------
Every parameter that is not a dendrite parameter is frozen (embeddings, norms and task heads included). All
dendrite parameters of a layer train, the older dendrites' too: a layer's dendrites share one stacked weight.
In the neuron phase every parameter trains again, except those the user had frozen before training.

Logging
-------
The library logs through the `hf_dendrites` logger, whose level follows transformers' verbosity (set by the
Trainer from `log_level`, or by `transformers.logging.set_verbosity_info()`) whenever a `DendriticTrainer` is
built (first thing, before it converts the model) or starts training; every schedule decision is logged at info
with its reason.

The saved model
---------------
`DendriteScheduleCallback.weights` records which evaluation the model's weights are; `_load_best_model` sets it to
the loaded checkpoint's, and `train` evaluates the final model when no evaluation was of its weights, so that the
training summary and the model card report the saved model's own scores and where it came from. A trainer that
never trained leaves the model's training summary (its checkpoint's) as it is.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import logging
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import ReduceLROnPlateau
from transformers import Trainer, TrainingArguments
from transformers.trainer_pt_utils import LabelSmoother
from transformers.trainer_utils import (
    PREFIX_CHECKPOINT_DIR,
    IntervalStrategy,
    SchedulerType,
    TrainOutput,
    get_last_checkpoint,
)
from transformers.utils import can_return_loss, find_labels

from . import deepspeed_support, fsdp, trainer_internals
from .callback import DendriteScheduleCallback, processes_out_of_step
from .config import DendriteConfig
from .constants import DENDRITE_CONFIG_NAME
from .hp_search import DendriteHPSearchMixin
from .logging_utils import follow_transformers_verbosity
from .model import DendriticModel, get_dendritic_model
from .peft_support import transformers_model
from .schedule import DendriteSchedule
from .trainer_state import read_schedule_payload
from .training_args import DendriteScheduleArguments, DendriticTrainingArguments, to_dendritic_args

logger = logging.getLogger(__name__)

TRAINING_ARGS_NAME = "training_args.bin"  # the name transformers' Trainer gives it


class _CausalLabelSmoother(LabelSmoother):
    """Label smoothing that shifts labels, as the Trainer does for causal LMs.

    The Trainer decides whether to shift from the class name of the model it trains; for a `DendriticModel` it
    cannot tell, so the trainer installs this smoother when the wrapped model is a causal LM.
    """

    def __call__(self, model_output, labels, shift_labels=False, **kwargs):
        return super().__call__(model_output, labels, shift_labels=True, **kwargs)



# ---------------------------------------------------------------------------------------------- trainer
# Which trainer goes with which arguments class, for the error a wrong mix gets (matched along the class's MRO).
_ARGS_ADVICE = {
    "DendriticTrainingArguments": "DendriticTrainer",
    "DendriticSFTConfig": "DendriticSFTTrainer",
    "DendriticDPOConfig": "DendriticDPOTrainer",
    "SFTConfig": "DendriticSFTTrainer with DendriticSFTConfig (from hf_dendrites import DendriticSFTTrainer, DendriticSFTConfig)",
    "DPOConfig": "DendriticDPOTrainer with DendriticDPOConfig (from hf_dendrites import DendriticDPOTrainer, DendriticDPOConfig)",
}


def _wrong_arguments_message(trainer: str, expected: type, got: Any) -> str:
    """Why `got` cannot be `trainer`'s arguments, and which classes to use."""
    got_name = type(got).__name__
    match = next((_ARGS_ADVICE[c.__name__] for c in type(got).__mro__ if c.__name__ in _ARGS_ADVICE), None)
    if expected is DendriteScheduleArguments:
        fix = (
            f"make the arguments class dendritic: `@dataclass class Dendritic{got_name}(DendriteScheduleArguments, "
            f"{got_name})` (docs/trl.md)"
        )
    else:
        fix = f"pass {expected.__name__}(...) with the same settings"
    where = f" {got_name} goes with {match}." if match and not match.startswith(trainer + " ") and match != trainer else ""
    return (
        f"{trainer} needs its training arguments as {expected.__name__} (the trainer's arguments plus the dendrite "
        f"schedule's settings), got {got_name}.{where} For {trainer}, {fix}."
    )


def _call_arguments(init: Callable, args: tuple, kwargs: dict) -> tuple[list[str], list[Any]]:
    """The names of the positional parameters of the trainer's `__init__` (Trainer's order, `model, args, ...`, for
    one that takes `*args, **kwargs`), and the positional values of a call, to read and replace `model` / `args`
    where the caller put them."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = [p.name for p in inspect.signature(init).parameters.values() if p.kind in kinds]
    if "args" not in names:
        names = [p.name for p in list(inspect.signature(Trainer.__init__).parameters.values())[1:] if p.kind in kinds]
    return names, list(args)


class DendriticTrainerMixin(DendriteHPSearchMixin):
    """Makes a `transformers.Trainer` subclass grow dendrites when the evaluation score plateaus (docs/schedule.md).

    A cooperative mixin: list it first, before the trainer class, and give the trainer arguments that carry the
    schedule's settings (`DendriteScheduleArguments` mixed into the trainer's own arguments class):

        @dataclass
        class DendriticMyArguments(DendriteScheduleArguments, MyTrainingArguments):
            pass

        class DendriticMyTrainer(DendriticTrainerMixin, MyTrainer):
            dendrite_args_class = DendriticMyArguments  # optional: refuse other arguments classes by name

    `DendriticTrainer` is `DendriticTrainerMixin` + `Trainer`; hf_dendrites/trl.py makes TRL's SFT and DPO trainers
    dendritic the same way (docs/trl.md). Every method calls `super()`, so the trainer's own overrides (its loss,
    logging, evaluation, dataset preparation) keep running.

    Construction: the trainer's own `__init__` runs first with the model as given (so it can load a model from a
    string id, wrap it with PEFT, patch it, prepare its datasets); the model it ends up with (`self.model`) is then
    converted with `dendrite_config` (`to_dendritic_model`, the hook point) and replaces the trainer's model, and the
    schedule's callback is installed. The mixin takes one keyword argument of its own, `dendrite_config`; the others
    go to the trainer class as they are. It owns: the optimizer and LR-scheduler rebuild after every growth, saving
    and loading dendritic checkpoints (with the schedule state), `load_best_model_at_end`, and the model card (the
    trainer's own card, e.g. TRL's, is replaced by the dendritic one; the model's tags are kept).

    `optimizers=(optimizer, scheduler)` is not supported (the trainer must build optimizers for parameters that do
    not exist yet); pass `optimizer_cls_and_kwargs=(cls, kwargs)` to choose the optimizer.
    """

    # The arguments class this trainer needs (a `DendriteScheduleArguments` subclass); others are refused by name.
    dendrite_args_class: type = DendriteScheduleArguments
    dendrite_callback: DendriteScheduleCallback | None = None  # set once the trainer's __init__ has run

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        mro = cls.__mro__
        before = [c for c in mro[1 : mro.index(DendriticTrainerMixin)] if issubclass(c, Trainer) and not issubclass(c, DendriticTrainerMixin)]
        if before:
            others = ", ".join(c.__name__ for c in cls.__bases__ if not issubclass(c, DendriticTrainerMixin))
            raise TypeError(
                f"{cls.__name__} lists DendriticTrainerMixin after {before[0].__name__}, whose methods would then run "
                "instead of the mixin's (no dendrites, no optimizer rebuild). List the mixin first: "
                f"`class {cls.__name__}(DendriticTrainerMixin, {others})`."
            )

    def __init__(self, *args: Any, dendrite_config: DendriteConfig | None = None, **kwargs: Any):
        name = self._dendritic_class_name()
        names, positional = _call_arguments(super().__init__, args, kwargs)

        def given(key: str) -> Any:
            if key in kwargs:
                return kwargs[key]
            index = names.index(key) if key in names else len(positional)
            return positional[index] if index < len(positional) else None

        training_args = self._dendrite_arguments(given("args"))
        if "args" in kwargs or names.index("args") >= len(positional):
            kwargs["args"] = training_args
        else:
            positional[names.index("args")] = training_args
        model = given("model")
        if model is None and given("model_init") is None:
            raise ValueError(f"{name} needs a `model` (a transformers model or a DendriticModel) or a `model_init`.")
        optimizers = given("optimizers")
        if optimizers is not None and any(o is not None for o in optimizers):
            raise ValueError(
                f"{name} rebuilds the optimizer and LR scheduler whenever dendrites grow, so it cannot use "
                "the objects passed as `optimizers=`. Pass `optimizer_cls_and_kwargs=(optimizer_class, kwargs)` and "
                "choose the schedule with `lr_scheduler_type` instead."
            )
        _check_args_supported(training_args)
        # The level Trainer.__init__ is about to apply, applied before the model is converted, so that the
        # conversion's lines (e.g. the dendrites restored from a checkpoint) show at the user's log level.
        follow_transformers_verbosity(training_args.get_process_log_level())
        if isinstance(model, DendriticModel):
            if dendrite_config is not None and dendrite_config != model.dendrite_config:
                raise ValueError(
                    "The model is already a DendriticModel with its own DendriteConfig; drop `dendrite_config=` "
                    "or pass the plain transformers model."
                )
            dendrite_config = model.dendrite_config
        self.dendrite_config = dendrite_config
        self.args = training_args  # to_dendritic_model reads args.seed (model_init); Trainer.__init__ sets it again
        if isinstance(model, nn.Module) and not isinstance(model, DendriticModel) and getattr(model, "is_quantized", False):
            # Trainer.__init__ refuses a quantized model without adapters: it gets its dendritic layers first.
            model = self.to_dendritic_model(model)
            if "model" in kwargs or names.index("model") >= len(positional):
                kwargs["model"] = model
            else:
                positional[names.index("model")] = model
        super().__init__(*positional, **kwargs)
        if not isinstance(self.model, DendriticModel):
            # The model the trainer prepared (loaded from a string id, wrapped, patched): converted now.
            self._use_model(self.to_dendritic_model(self.model))
        self._check_setup_supported()
        self._inspect_wrapped_model()
        if getattr(self, "loss_is_scaled_for_ga", None) is not None and "loss_is_scaled_for_ga" not in vars(Trainer):
            # A trainer whose loss says how it is scaled (TRL's), on a transformers release that does not read the
            # attribute (< 5.19): keep what the trainer set, as it did before the model was inspected again.
            self.model_accepts_loss_kwargs = False
        self.dendrite_callback = DendriteScheduleCallback(self)
        self.add_callback(self.dendrite_callback)
        self.dendrite_fsdp_optimizer = fsdp.FreshOptimizerState(self) if fsdp.is_fsdp2(self.accelerator) else None
        if self.dendrite_fsdp_optimizer is not None:
            self.add_callback(self.dendrite_fsdp_optimizer)
        follow_transformers_verbosity()

    def create_accelerator_and_postprocess(self) -> None:
        """The Trainer's accelerator; with `fsdp` set, one that really runs FSDP2, also on CPU processes, where
        accelerate would run DDP (`fsdp.enable_fsdp2`, docs/distributed.md)."""
        super().create_accelerator_and_postprocess()
        fsdp.enable_fsdp2(self)

    def prepare_model_change(self) -> None:
        """Called before the parameter set changes (the schedule restores, grows or freezes; a checkpoint or the best
        model loads): under FSDP2 the model is gathered into a plain module on every process, until
        `rebuild_optimizer_and_scheduler` shards it again (hf_dendrites/fsdp.py). Nothing to do otherwise."""
        if fsdp.is_fsdp2(self.accelerator):
            fsdp.unshard(self.model)

    def _dendrite_arguments(self, args: Any) -> DendriteScheduleArguments:
        """The training arguments, checked: an instance of `dendrite_args_class` (plain `TrainingArguments` are
        converted with default dendrite settings when that class is `DendriticTrainingArguments`)."""
        name, expected = self._dendritic_class_name(), self.dendrite_args_class
        if args is None:
            raise ValueError(
                f"{name} needs `args`: e.g. {expected.__name__}(output_dir='out', eval_strategy='steps', eval_steps=100)."
            )
        if type(args) is TrainingArguments and expected is DendriticTrainingArguments:
            return to_dendritic_args(args)
        if not isinstance(args, expected) or not isinstance(args, DendriteScheduleArguments):
            raise TypeError(_wrong_arguments_message(name, expected, args))
        return args

    @contextlib.contextmanager
    def dendrite_unreported_evaluation(self):
        """Context of an evaluation the schedule runs for itself (a kept cycle's model with its dendrites switched
        off), which is neither logged nor shown to callbacks. Metrics that the trainer accumulates during evaluation
        for its next log entry (TRL's trainers keep them in `self._metrics`) are put back as they were afterwards, so
        that none of that evaluation's reaches the log."""
        saved = getattr(self, "_metrics", None)
        kept = copy.deepcopy(saved) if isinstance(saved, dict) else None
        try:
            yield
        finally:
            if kept is not None:
                self._metrics = kept

    def _dendritic_class_name(self) -> str:
        """The trainer's name in messages: the library class it is or extends (`DendriticTrainer`,
        `DendriticSFTTrainer`, ...), or its own class for a trainer made dendritic with the recipe."""
        own = type(self)
        library = next((c for c in own.__mro__ if c.__module__.startswith("hf_dendrites.") and issubclass(c, Trainer)), None)
        return (library or own).__name__

    def _use_model(self, model: DendriticModel) -> None:
        """Make `model` the model this trainer trains (after its `__init__` kept the plain one)."""
        self.model = self.model_wrapped = model
        self.callback_handler.model = model

    # ------------------------------------------------------------------ model conversion and public state
    def to_dendritic_model(self, model: nn.Module) -> DendriticModel:
        """Convert a plain transformers model with `self.dendrite_config` (a `DendriticModel` passes through).

        The hook point of the conversion: called with the model the trainer's `__init__` prepared (for TRL's
        trainers after they loaded, wrapped and patched it) and with every model `model_init` returns.

        When the config has no `dendrite_seed`, `args.seed` is used, so that growth is identical on every process
        and after a resume.
        """
        dm = model if isinstance(model, DendriticModel) else get_dendritic_model(model, self.dendrite_config)
        if dm.dendrite_config.dendrite_seed is None:
            dm.dendrite_config = dataclasses.replace(dm.dendrite_config, dendrite_seed=int(self.args.seed))
            logger.info("DendriteConfig.dendrite_seed is None; using args.seed=%d for dendrite growth.", self.args.seed)
        return dm

    def call_model_init(self, trial=None) -> DendriticModel:
        """`model_init`'s model, converted with `to_dendritic_model`; a new model starts a new schedule."""
        model = self.to_dendritic_model(super().call_model_init(trial))
        if self.dendrite_callback is not None:
            self.dendrite_callback.reset(model)
        return model

    def reset_dendrite_schedule(self) -> None:
        """Forget all schedule state (schedule rebuilt from `self.args`, history, snapshots, candidate phase), e.g.
        before training a new model. The parameters the model has frozen now stay frozen in every phase."""
        if self.dendrite_callback is not None:  # None while Trainer.__init__ builds the first model: nothing to forget
            self.dendrite_callback.reset(self.model)

    @property
    def dendrite_schedule(self) -> DendriteSchedule:
        """The `DendriteSchedule` (cycle, phase, best scores; `history` lists every finished cycle try)."""
        return self.dendrite_callback.schedule

    @property
    def dendrite_history(self) -> list[dict[str, Any]]:
        """One dict per training evaluation: step, epoch, score, cycle, try, phase, counts, decision."""
        return self.dendrite_callback.history

    @property
    def dendrite_best_score(self) -> float | None:
        """Best validation score of the model the schedule would keep (None before any evaluation)."""
        return self.dendrite_callback.best_score

    @property
    def dendritic_model(self) -> DendriticModel:
        """The `DendriticModel` being trained (never a DDP wrapper)."""
        return self.model

    # ------------------------------------------------------------------ construction checks
    def _check_setup_supported(self) -> None:
        """Raise for distributed setups whose wrappers cannot follow a change of the parameter set, and for
        launches whose processes accelerate does not run as one job (they could not share the schedule's decisions)."""
        unsupported = []
        if self.is_deepspeed_enabled:
            deepspeed_support.check_deepspeed_setup(self)  # ZeRO-0/1/2 run (hf_dendrites/deepspeed_support.py)
        if getattr(self, "is_fsdp_xla_enabled", False) or (self.is_fsdp_enabled and not fsdp.is_fsdp2(self.accelerator)):
            unsupported.append("FSDP version 1 (FSDP version 2 is supported: fsdp_config={'version': 2})")
        if fsdp.is_fsdp2(self.accelerator):
            fsdp.check_model_supported(self.model, self._dendritic_class_name())
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
                f"{self._dendritic_class_name()} does not support {', '.join(unsupported)}: growing dendrites replaces parameters, "
                "which these engines shard or register once. Train with a single process, DDP (`torchrun` / "
                "`accelerate launch`), DeepSpeed ZeRO-1/2 or FSDP version 2 (docs/distributed.md); use low-rank dendrites "
                "(DendriteConfig(rank=...)) to keep large models affordable."
            )
        problem = processes_out_of_step(self.accelerator)
        if problem is not None:
            raise RuntimeError(f"{self._dendritic_class_name()} cannot train or evaluate this launch: {problem}")

    def _inspect_wrapped_model(self) -> None:
        """Take from the wrapped transformers model what the Trainer reads off the class of the model it trains.

        The Trainer finds label names and whether the model can return a loss from `type(model).forward`, and
        whether to shift labels for label smoothing from the class name: for a `DendriticModel` all three would
        be wrong (no `eval_loss`, unshifted causal-LM smoothing). Loss scaling under gradient accumulation
        (`model_accepts_loss_kwargs`) is taken from the wrapped model as well, so a dendritic model reports the
        same loss as the plain one.
        """
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        )

        inner = transformers_model(self.model.model)  # under a PeftModel, the transformers model (docs/peft.md)
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

    # ------------------------------------------------------------------ Trainer overrides: the loop
    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None):
        """Train as `Trainer.train` does, with the dendrite schedule.

        Overridden to check that the schedule can run (it needs evaluations), to make the library's logging follow
        transformers' verbosity, and to return at once, without training, when resuming from a checkpoint written
        after the schedule completed (the Trainer's loop would otherwise train at least one more step). With
        `resume_from_checkpoint`, the checkpoint's dendrite layout is rebuilt before its weights are loaded and the
        schedule continues where it was.
        """
        if self.args.eval_strategy == IntervalStrategy.NO:
            raise ValueError(
                f"{self._dendritic_class_name()} decides when to grow dendrites from evaluation scores, so training needs evaluations: "
                "set `eval_strategy='steps'` (with `eval_steps`) or `eval_strategy='epoch'`, and pass an `eval_dataset`. "
                "(Evaluation or prediction alone, `trainer.evaluate()` / `trainer.predict()`, work without.)"
            )
        follow_transformers_verbosity()
        self.dendrite_ignore_keys_for_eval = ignore_keys_for_eval  # for the ablation evaluations of kept cycles
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)
            if checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        self._check_restart_steps()
        if isinstance(checkpoint, (str, os.PathLike)) and self.model_init is None:
            payload = read_schedule_payload(os.fspath(checkpoint))
            if payload is not None and payload["schedule"]["state"].get("done"):
                return self._finished_run(os.fspath(checkpoint))
        if self.is_deepspeed_enabled and checkpoint:
            deepspeed_support.load_layout_before_engine(self, os.fspath(checkpoint))
        output = super().train(resume_from_checkpoint=checkpoint or None, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval)
        self._evaluate_final_model()
        return output

    def _evaluate_final_model(self) -> None:
        """Evaluate the model training ended with when its weights are no evaluation's (trained past the last one,
        given new dendrites, or loaded from a best checkpoint written after the schedule changed them), so that the
        training summary and the model card report the saved model's own scores."""
        cb = self.dendrite_callback
        if cb.weights is not None or not cb.has_run or self.eval_dataset is None:
            return
        logger.info(
            "The model at the end of training (step %d) has not been evaluated as it is; evaluating it for the training "
            "summary and the model card.", self.state.global_step,
        )
        cb.record_final_evaluation(self.evaluate())

    def _check_restart_steps(self) -> None:
        """`dendrite_restart_steps` must fall on evaluations (a growth event happens at an evaluation)."""
        args, steps = self.args, self.args.dendrite_restart_steps
        if not steps or args.eval_strategy != IntervalStrategy.STEPS:
            return
        every = args.eval_steps if args.eval_steps and args.eval_steps >= 1 else None
        off = [s for s in steps if every is not None and s % int(every)]
        if off:
            raise ValueError(
                f"`dendrite_restart_steps` {off} are not evaluation steps (eval_steps={int(every)}): growth events happen "
                "at evaluations. Use multiples of eval_steps, e.g. the steps where the replayed run grew."
            )

    def _finished_run(self, checkpoint: str) -> TrainOutput:
        """Load a checkpoint written when the schedule had completed, and report that nothing is left to train."""
        from transformers.trainer import TRAINER_STATE_NAME
        from transformers.trainer_callback import TrainerState

        self._load_from_checkpoint(checkpoint)
        self.state = TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_NAME))
        logger.info("%s was written after the dendrite schedule completed: nothing left to train.", checkpoint)
        self.dendrite_callback.write_report()
        return TrainOutput(self.state.global_step, 0.0, {})

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        """Run the step on the current model wrapper, and feed a candidate phase.

        After a growth in the middle of an epoch, the epoch loop still holds the DDP wrapper it started with; its
        parameters are stale. The step runs on the new wrapper instead, inside its `no_sync` when the loop had
        suspended gradient synchronisation on the old one (gradient accumulation). During a candidate phase
        (correlation rule) the errors this backward pass captured are folded into the rule's statistics.
        """
        fsdp.check_sharded(self)  # with FSDP requested: never a silent DDP run
        current = self.model_wrapped
        if model is current or current is None:
            loss = super().training_step(model, inputs, num_items_in_batch)
        else:
            context = contextlib.nullcontext()
            if getattr(model, "require_backward_grad_sync", True) is False:
                context = self.accelerator.no_sync(current)
            with context:
                loss = super().training_step(current, inputs, num_items_in_batch)
        rule = self.dendrite_callback.correlation
        if rule is not None:
            rule.accumulate()
        return loss

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """During a candidate phase (correlation rule) the optimizer trains the candidates, not the (frozen)
        model; otherwise the Trainer's own optimizer, at the learning rate of the current LR-search candidate
        (`dendrite_lr_search`: every group's LR times the candidate's factor)."""
        rule = self.dendrite_callback.correlation if self.dendrite_callback is not None else None
        if rule is not None:
            if self.optimizer is None:
                self.optimizer = rule.optimizer(lr=self.args.candidate_learning_rate)
            return self.optimizer
        new = self.optimizer is None
        optimizer = super().create_optimizer(model)
        factor = self.dendrite_schedule.lr_factor if self.dendrite_callback is not None else 1.0
        if new and factor != 1.0:
            for group in optimizer.param_groups:  # before the LR scheduler is built: it takes these as its base
                group["lr"] *= factor
        return optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """Create the LR scheduler for the current phase (see "LR schedule across cycles" in the module docs).

        With `dendrite_lr_schedule="restart"` the schedule spans `dendrite_cycle_steps` (then holds its final value)
        or the steps from the start of the current phase to `max_steps`; a resumed run rebuilds the same scheduler
        before loading its state. `lr_scheduler_type="reduce_lr_on_plateau"` gets a `PhaseReduceLROnPlateau` whose
        `mode` follows `greater_is_better` unless `lr_scheduler_kwargs` sets it.
        """
        if self.lr_scheduler is not None or self.dendrite_callback is None:
            return super().create_scheduler(num_training_steps=num_training_steps, optimizer=optimizer)
        args = self.args
        if SchedulerType(args.lr_scheduler_type) is SchedulerType.REDUCE_ON_PLATEAU:
            kwargs = dict(args.lr_scheduler_kwargs or {})
            kwargs.setdefault("mode", "max" if args.greater_is_better else "min")
            self.lr_scheduler = PhaseReduceLROnPlateau(optimizer if optimizer is not None else self.optimizer, **kwargs)
            self._created_lr_scheduler = True  # as Trainer.create_scheduler: rebuilt when train() starts again
            return self.lr_scheduler
        cycle_steps = args.dendrite_cycle_steps if args.dendrite_lr_schedule == "restart" else None
        if cycle_steps is not None:
            num_training_steps = cycle_steps
        elif args.dendrite_lr_schedule == "restart":
            num_training_steps = max(num_training_steps - self.dendrite_schedule.phase_start_step, 1)
        scheduler = super().create_scheduler(num_training_steps=num_training_steps, optimizer=optimizer)
        if cycle_steps is not None:
            _hold_after(scheduler, cycle_steps)
        return scheduler

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the dendrite state (cycle, phase, dendrite and parameter counts) to the evaluation log entries of a
        training run, so that it reaches the console, `log_history` and every `report_to` integration. (The
        Trainer logs an evaluation before `on_evaluate` runs: the state is that of the evaluated model.) What the
        trainer's own `log` adds to the entry in place (TRL's trainers add their evaluation metrics, which
        `evaluate()` then returns and `on_evaluate` sees) still reaches the caller's dict; the dendrite fields do
        not."""
        cb = self.dendrite_callback
        if cb is not None and self.is_in_train and "dendrite_event" not in logs and any(k.startswith("eval_") for k in logs):
            fields = cb.log_fields(cb.model_view())
            entry = {**logs, **fields}
            super().log(entry, start_time)
            logs.update({k: v for k, v in entry.items() if k not in fields})
            return
        super().log(logs, start_time)

    def rebuild_optimizer_and_scheduler(self) -> None:
        """New optimizer and LR scheduler for the new parameter set, prepared by accelerate; under DDP a new model
        wrapper. The replaced objects are dropped from the accelerator so none of them is used again. Called by
        `DendriteScheduleCallback` after every change of the parameter set."""
        acc = self.accelerator
        old_wrapped, old_optimizer, old_scheduler = self.model_wrapped, self.optimizer, self.lr_scheduler
        trainer_internals.forget_prepared(acc, optimizers=[old_optimizer], schedulers=[old_scheduler])
        self.optimizer = None
        self.lr_scheduler = None
        if fsdp.is_fsdp2(acc):
            fsdp.unshard(self.model)  # the optimizer is built on the plain parameters, then sharded with them
        self.create_optimizer()
        distributed = acc.num_processes > 1 and not isinstance(old_wrapped, nn.DataParallel)
        if self.is_deepspeed_enabled:
            deepspeed_support.rebuild_engine(self, old_wrapped)  # a new engine for the new parameter set
        elif fsdp.is_fsdp2(acc):
            # FSDP2: shard the changed model anew (new dendrites included), mapping the new optimizer to the shards.
            fsdp.reshard(self)
        elif distributed and self.dendrite_callback.correlation is not None:
            # Candidate phase: nothing of the model trains, and DDP refuses a module without trainable parameters.
            # Run the bare model; the correlation rule all-reduces its own statistics.
            trainer_internals.forget_prepared(acc, models=[old_wrapped, self.model])
            trainer_internals.register_prepared_model(acc, self.model)
            self.model_wrapped = self.model
            self.optimizer = acc.prepare(self.optimizer)
        elif distributed:
            # DDP (possibly compiled): wrap anew; DDP's constructor broadcasts rank 0's parameters. (DataParallel
            # replicates the module at every forward, so its wrapper stays valid.) Depending on the backend
            # accelerate lists the wrapper or the model itself; list the new wrapper once.
            trainer_internals.forget_prepared(acc, models=[old_wrapped, self.model])
            trainer_internals.unmark_prepared(self.model)
            self.model_wrapped, self.optimizer = acc.prepare(self.model, self.optimizer)
        else:
            self.optimizer = acc.prepare(self.optimizer)
        self.create_scheduler(num_training_steps=self.state.max_steps)
        if isinstance(self.lr_scheduler, PhaseReduceLROnPlateau):
            if self.args.dendrite_lr_schedule == "continue" and isinstance(old_scheduler, ReduceLROnPlateau):
                self.lr_scheduler.continue_from(old_scheduler)
            else:
                # Rebuilt inside an evaluation, which the Trainer then feeds to the scheduler: that score belongs to
                # the model before the change, not to the phase that starts now.
                self.lr_scheduler.skip_next_step = True
        elif self.args.dendrite_lr_schedule == "continue":
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
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save with `DendriticModel.save_pretrained` (base model under standard names, dendrites, model card).

        Overridden because the Trainer only knows to save a bare state dict for a model that is not a
        `PreTrainedModel`. `model.training_summary` (the model card's training section) is set before every save.
        A checkpoint (the Trainer saves `<output_dir>/checkpoint-<step>` before its optimizer state) also gets the
        schedule state.
        """
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        dm = self.model
        dm.training_summary = self.dendrite_callback.training_summary()
        # FSDP2: every process takes part in gathering the whole model; the writing process holds it on the CPU.
        with fsdp.full_parameters(dm, on_this_process=self.args.should_save):
            if self.args.should_save:
                os.makedirs(output_dir, exist_ok=True)
                logger.info("Saving dendritic model checkpoint to %s", output_dir)
                processing_class = self.processing_class
                if processing_class is None and getattr(self.data_collator, "tokenizer", None) is not None:
                    processing_class = self.data_collator.tokenizer
                options = self.dendrite_callback.save_options(output_dir, _internal_call)  # adapter-only for a frozen base
                dm.save_pretrained(output_dir, processing_class=processing_class, tags=getattr(dm, "model_tags", None), **options)
                torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
                is_checkpoint = os.path.basename(os.path.normpath(output_dir)) == f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
                if _internal_call and self.is_in_train and is_checkpoint:
                    self.dendrite_callback.write_state(output_dir)
        if _internal_call and self.is_in_train and getattr(self, "dendrite_fsdp_optimizer", None) is not None:
            self.dendrite_fsdp_optimizer.checkpoint_saved_model(output_dir, write=self.args.should_save)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Rebuild the checkpoint's dendrite layout, load its weights and the schedule state (private Trainer hook,
        see `trainer_internals`).

        The Trainer calls this before it creates the optimizer, so the optimizer it then builds (and whose saved
        state it loads) has exactly the checkpoint's parameters. A checkpoint of a plain Trainer run (no
        `dendrite_config.json`) loads into the wrapped base model.
        """
        from .saving import load_dendritic_state

        dm = self.model
        self.prepare_model_change()
        if getattr(self, "dendrite_fsdp_optimizer", None) is not None:
            self.dendrite_fsdp_optimizer.loading_checkpoint(resume_from_checkpoint)
        schedule_state = self.dendrite_callback.load_state(resume_from_checkpoint)
        if os.path.isfile(os.path.join(resume_from_checkpoint, DENDRITE_CONFIG_NAME)):
            load_dendritic_state(dm, resume_from_checkpoint)
        else:
            logger.warning(
                "%s has no %s: loading it as a plain transformers checkpoint into the base model.",
                resume_from_checkpoint, DENDRITE_CONFIG_NAME,
            )
            super()._load_from_checkpoint(resume_from_checkpoint, model=dm.model)
        if schedule_state is not None:
            self.dendrite_callback.finish_loading(resume_from_checkpoint, schedule_state)
        else:
            self.dendrite_callback.apply_phase_trainability()
        if fsdp.is_fsdp2(self.accelerator) and self.optimizer is not None:
            # Under FSDP the Trainer loads a checkpoint after it sharded the model: shard the loaded layout again.
            self.rebuild_optimizer_and_scheduler()

    def _load_best_model(self) -> None:
        """`load_best_model_at_end` with a changed architecture (private Trainer hook, see `trainer_internals`):
        rebuild the best checkpoint's dendrite layout before loading its weights. When the schedule completed, the
        model already is the schedule's best (a cycle's raw best may be one the schedule discarded), and nothing is
        loaded."""
        from .saving import load_dendritic_state

        if self.dendrite_schedule.done:
            logger.info("The dendrite schedule completed and restored its best model; not loading %s.", self.state.best_model_checkpoint)
            return
        checkpoint = self.state.best_model_checkpoint
        logger.info("Loading best model from %s (score: %s).", checkpoint, self.state.best_metric)
        self.prepare_model_change()
        load_dendritic_state(self.model, checkpoint)
        self.dendrite_callback.loaded_best_checkpoint(checkpoint)
        self.dendrite_callback.apply_phase_trainability()
        if fsdp.is_fsdp2(self.accelerator):
            self.rebuild_optimizer_and_scheduler()

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """Write the dendritic model card (dendrite config, parameter counts, per-cycle table, training curve) into
        `output_dir`. The Trainer's own card (or TRL's, which its trainers write at every checkpoint) knows nothing of
        dendrites and would replace the one `save_model` wrote when `push_to_hub()` runs. Of the arguments only
        `tags` is used, with the model's own tags (`model.model_tags`, e.g. TRL's "trl", "sft") added; the others
        (Trainer's or TRL's, e.g. `dataset_name`) are accepted and not shown. A trainer that did not train
        (evaluation / prediction only) writes the card of the model it evaluated, with the training summary its
        checkpoint carries (docs/checkpoints.md)."""
        if not self.is_world_process_zero():
            return
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        tags += [t for t in (getattr(self.model, "model_tags", None) or []) if t not in tags]
        self.model.training_summary = self.dendrite_callback.training_summary()
        self.model.save_model_card(self.args.output_dir, repo_id=self.hub_model_id, tags=tags or None)


class PhaseReduceLROnPlateau(ReduceLROnPlateau):
    """`torch.optim.lr_scheduler.ReduceLROnPlateau` for one phase of the dendrite schedule.

    The trainer builds a fresh one (with a fresh optimizer at the full learning rate) at every growth, retry, phase
    switch and LR-search candidate, inside the evaluation that decided it; the Trainer then steps the scheduler with
    that evaluation's score, which belongs to the model before the change. `skip_next_step` makes the new scheduler
    ignore it, so a phase's plateau tracking starts with the phase's own first evaluation. The flag is part of
    `state_dict()`, so a resumed run behaves the same. With `dendrite_lr_schedule="continue"` the new scheduler
    takes over the old one's state instead (`continue_from`), and that evaluation counts as for a plain Trainer.
    """

    skip_next_step = False

    def step(self, metrics, epoch=None):
        """Step with the evaluation score, unless this is the first step after a rebuild (see the class docs)."""
        if self.skip_next_step:
            self.skip_next_step = False
            return
        if epoch is None:
            super().step(metrics)
        else:
            super().step(metrics, epoch)

    def continue_from(self, old: ReduceLROnPlateau) -> None:
        """`dendrite_lr_schedule="continue"`: go on with the old scheduler's reduced learning rate and its plateau
        tracking (the optimizer is new; its groups take the old ones' learning rates)."""
        for key in ("best", "num_bad_epochs", "cooldown_counter", "last_epoch"):
            setattr(self, key, getattr(old, key))
        lrs = [g["lr"] for g in old.optimizer.param_groups]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]


def _hold_after(scheduler: Any, steps: int) -> None:
    """Make a `LambdaLR` schedule stay at its value of step `steps` afterwards (`dendrite_cycle_steps`): a cosine
    schedule would otherwise rise again, a polynomial one fail past its end."""
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        return

    def held(fn):
        # a plain function (not a callable object): LambdaLR.state_dict() then stores nothing for it, and a resumed
        # run rebuilds the same schedule before loading the state
        def lr_lambda(step: int) -> float:
            return fn(min(step, steps))

        return lr_lambda

    scheduler.lr_lambdas = [held(fn) for fn in scheduler.lr_lambdas]


def _check_args_supported(args: TrainingArguments) -> None:
    """Fail before building anything for arguments that select an unsupported engine."""
    if getattr(args, "deepspeed", None):
        deepspeed_support.check_deepspeed_arguments(args)  # ZeRO-0/1/2 (hf_dendrites/deepspeed_support.py)
    fsdp.check_fsdp_args(args, "DendriticTrainer")  # FSDP version 2 only (hf_dendrites/fsdp.py)


class DendriticTrainer(DendriticTrainerMixin, Trainer):
    """A `transformers.Trainer` that grows dendrites when the evaluation score plateaus: `DendriticTrainerMixin` +
    `Trainer`.

    Args:
        model: a plain transformers model (converted with `dendrite_config`, or the per-architecture defaults) or
            a `DendriticModel`. May be None when `model_init` is given.
        args: `DendriticTrainingArguments` (plain `TrainingArguments` are converted with default dendrite
            settings). Training needs an `eval_strategy` and an `eval_dataset`; evaluation / prediction alone do not.
        model_init: a function returning a fresh model (plain ones are converted with `dendrite_config`), as for
            `Trainer` (e.g. for `hyperparameter_search`).
        dendrite_config: how to convert a plain model (ignored for a `DendriticModel`, which carries its own). When
            its `dendrite_seed` is None the trainer uses `args.seed`, so that growth is identical on every process
            and after a resume. Kept as `trainer.dendrite_config`.
        Every other argument is the Trainer's. `optimizers=(optimizer, scheduler)` is not supported (the trainer
        must build optimizers for parameters that do not exist yet); pass `optimizer_cls_and_kwargs=(cls, kwargs)`
        to choose the optimizer.

    After `train()`, `output_dir` (during `hyperparameter_search`, the trial's `output_dir/run-<n>`) holds
    `dendrite_evaluations.csv` (one row per evaluation: step, score, phase, cycle, try, dendrites, parameters, LR
    factor, dendrite weight of a kept cycle, decision) and `dendrite_training_curve.png`. `trainer.dendrite_schedule` is
    the schedule (its `history` lists every cycle try), `trainer.dendrite_history` the evaluation rows and
    `trainer.dendrite_callback` the `DendriteScheduleCallback` that runs the schedule.

    Supported: a single process (CPU / one GPU), DDP (`torchrun` / `accelerate launch`; CPU processes with
    `use_cpu=True`), DeepSpeed ZeRO-1/2 (`deepspeed=`) and FSDP version 2 (`fsdp=True, fsdp_config={"version": 2}`;
    docs/distributed.md). Not supported, with an error at construction: DeepSpeed ZeRO-3, FSDP version 1, tensor /
    context / sequence
    parallelism, SageMaker model parallelism, models sharded at load time, and several processes that accelerate
    does not run as one job (on CPU without `use_cpu=True`).
    """

    dendrite_args_class = DendriticTrainingArguments

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        others = [c for c in cls.__mro__ if issubclass(c, Trainer) and c is not Trainer and not issubclass(c, DendriticTrainer)]
        if others:
            raise TypeError(
                f"{cls.__name__} combines DendriticTrainer with {others[0].__name__}: DendriticTrainer is "
                f"DendriticTrainerMixin + Trainer, and cannot be mixed into another trainer. Make that trainer dendritic "
                f"with the mixin, listed first: `class {cls.__name__}(DendriticTrainerMixin, {others[0].__name__})` "
                "with arguments that mix in DendriteScheduleArguments (docs/trl.md); for TRL's SFT and DPO trainers use "
                "hf_dendrites' DendriticSFTTrainer / DendriticDPOTrainer."
            )

    def __init__(
        self,
        model: nn.Module | None = None,
        args: TrainingArguments | None = None,
        data_collator: Callable | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        model_init: Callable | None = None,
        compute_loss_func: Callable | None = None,
        compute_metrics: Callable | None = None,
        callbacks: list | None = None,
        optimizers: tuple = (None, None),
        optimizer_cls_and_kwargs: tuple | None = None,
        preprocess_logits_for_metrics: Callable | None = None,
        dendrite_config: DendriteConfig | None = None,
    ):
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            model_init=model_init,
            compute_loss_func=compute_loss_func,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            dendrite_config=dendrite_config,
        )
