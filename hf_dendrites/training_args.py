"""The settings of the dendrite schedule, as a dataclass that mixes into any `TrainingArguments` subclass.

`DendriteScheduleArguments` holds the fields and their validation; `DendriticTrainingArguments` is it plus
`TrainingArguments`, and another trainer's arguments become dendritic the same way (hf_dendrites/trl.py does it for
TRL's `SFTConfig` and `DPOConfig`):

    @dataclass
    class DendriticSFTConfig(DendriteScheduleArguments, SFTConfig):
        pass

The mixin comes first, so that its `__post_init__` runs (it calls the other class's first). Kept apart from the
trainer (as TRL keeps `SFTConfig` apart from `SFTTrainer`), so the arguments can be read, parsed with
`HfArgumentParser` and validated on their own. What the schedule does with them: docs/schedule.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from .schedule import ScheduleSettings

logger = logging.getLogger(__name__)

LR_SCHEDULE_MODES = ("restart", "continue")


# ---------------------------------------------------------------------------------------------- arguments
@dataclass
class DendriteScheduleArguments:
    """The settings of the dendrite schedule (docs/schedule.md), to mix into a `TrainingArguments` subclass.

    Every field has a default, so the mixin can come before any arguments class (dataclass fields are ordered base
    classes first: these come after the other class's). List it first, `class MyArgs(DendriteScheduleArguments,
    TheirArgs)`: its `__post_init__` runs the other class's, then validates these settings; a class that lists it
    after a `TrainingArguments` class is refused when it is defined (its validation would never run).

    The schedule is driven by evaluations: training needs an `eval_strategy` other than "no" (checked when
    `train()` starts; evaluation- and prediction-only runs need none). The score is the evaluation metric named by
    `metric_for_best_model` (default "loss", i.e. `eval_loss`) and `greater_is_better`. `num_train_epochs` /
    `max_steps` stay the overall cap: the schedule usually ends training before it.
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
                "warmup) over the remaining steps, or over `dendrite_cycle_steps`. 'continue': one LR schedule over "
                "the whole run."
            )
        },
    )
    dendrite_cycle_steps: int | None = field(
        default=None,
        metadata={
            "help": (
                "With dendrite_lr_schedule='restart': the length in steps of every (re)started LR schedule (warmup "
                "and decay of lr_scheduler_type); after it the LR stays at the schedule's final value. Default: the "
                "steps left until max_steps, which makes the decay depend on the overall step cap."
            )
        },
    )
    dendrite_restarts_only: bool = field(
        default=False,
        metadata={
            "help": (
                "Run every growth event of the schedule (restore the best weights, fresh optimizer, LR restart, same "
                "keep/discard rule) without adding dendrites: the control that tells dendrite gains from restart "
                "gains."
            )
        },
    )
    dendrite_restart_steps: list[int] | None = field(
        default=None,
        metadata={
            "help": (
                "Global steps at which growth events happen (at the evaluation of that step) instead of at plateaus, "
                "e.g. the growth / retry steps of another run to replay; training then runs to max_steps, where the "
                "last cycle is judged. max_dendrite_cycles and max_dendrite_tries do not apply. Each step must be an "
                "evaluation step."
            )
        },
    )
    dendrite_lr_search: list[float] | None = field(
        default=None,
        metadata={
            "help": (
                "Restart learning rates to try after every growth, as multiples of learning_rate (e.g. 1 0.1 0.01): "
                "the cycle is trained once per candidate, each from the same post-growth weights until its plateau; "
                "the candidate with the best validation score is kept. Default: no search."
            )
        },
    )

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        mro = cls.__mro__
        args_classes = [c for c in mro if issubclass(c, TrainingArguments)]
        if args_classes and mro.index(args_classes[-1]) < mro.index(DendriteScheduleArguments):
            others = [c.__name__ for c in cls.__bases__ if c is not DendriteScheduleArguments]
            first = next((c for c in cls.__bases__ if issubclass(c, TrainingArguments)), args_classes[-1])
            raise TypeError(
                f"{cls.__name__} lists DendriteScheduleArguments after {first.__name__}, whose __post_init__ "
                "does not call on: the dendrite settings would never be validated. List the mixin first: "
                f"`class {cls.__name__}(DendriteScheduleArguments, {', '.join(others) or 'TrainingArguments'})`."
            )

    def __post_init__(self) -> None:
        if not isinstance(self, TrainingArguments):
            raise TypeError(
                "DendriteScheduleArguments is a mixin for a `TrainingArguments` subclass: use DendriticTrainingArguments, "
                "or define `@dataclass class MyArgs(DendriteScheduleArguments, MyTrainingArguments)`."
            )
        if getattr(self, "deepspeed", None):
            from .deepspeed_support import require_deepspeed

            require_deepspeed()  # transformers' own error without the package is an obscure TypeError
        super().__post_init__()
        # No check of `eval_strategy` here: evaluation- or prediction-only runs need no evaluations during
        # training; `DendriticTrainer.train()` raises when a training run has none.
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
        if self.dendrite_cycle_steps is not None:
            if isinstance(self.dendrite_cycle_steps, bool) or not isinstance(self.dendrite_cycle_steps, int) or self.dendrite_cycle_steps < 1:
                raise ValueError(f"`dendrite_cycle_steps` must be an integer >= 1, got {self.dendrite_cycle_steps!r}.")
            if self.dendrite_lr_schedule != "restart":
                raise ValueError(
                    "`dendrite_cycle_steps` sets the length of each restarted LR schedule: it needs "
                    "dendrite_lr_schedule='restart' (got 'continue')."
                )
        if self.dendrite_restarts_only and self.dendrites_only_phase:
            raise ValueError(
                "`dendrite_restarts_only=True` adds no dendrites, so a dendrites-only phase would train nothing: set "
                "dendrites_only_phase=False."
            )
        for name in ("dendrite_restart_steps", "dendrite_lr_search"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (list, tuple)):
                setattr(self, name, [value])
        if self.dendrite_restart_steps is not None:
            self.dendrite_restart_steps = sorted(self.dendrite_restart_steps)
        if self.dendrite_lr_search is not None:
            self.dendrite_lr_search = list(self.dendrite_lr_search)
            if not self.dendrite_lr_search:
                raise ValueError("`dendrite_lr_search` must hold at least one learning-rate factor, or be None for no search.")
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
            restart_steps=self.dendrite_restart_steps,
            lr_search=tuple(self.dendrite_lr_search or ()),
        )


@dataclass
class DendriticTrainingArguments(DendriteScheduleArguments, TrainingArguments):
    """`TrainingArguments` plus the settings of the dendrite schedule (`DendriteScheduleArguments`, docs/schedule.md).

    Example:
        >>> args = DendriticTrainingArguments(
        ...     output_dir="out", eval_strategy="steps", eval_steps=50, dendrite_patience=[4, 2], max_dendrite_cycles=2
        ... )
    """


def to_dendritic_args(args: TrainingArguments) -> DendriticTrainingArguments:
    """Plain `TrainingArguments` -> `DendriticTrainingArguments` with the default dendrite settings."""
    data = args.to_dict()
    # to_dict() masks tokens; keep the real ones.
    for key in data:
        if key.endswith("_token"):
            data[key] = getattr(args, key)
    logger.info("DendriticTrainer got plain TrainingArguments; using the default dendrite schedule settings.")
    return DendriticTrainingArguments(**data)
