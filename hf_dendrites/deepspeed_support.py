"""DeepSpeed ZeRO stages 0-2 for `DendriticTrainer` (docs/distributed.md, "DeepSpeed").

A DeepSpeed engine registers the model's parameters once: ZeRO-1 and ZeRO-2 flatten the trainable ones into
buffers the engine owns, partition their optimizer state (and, for ZeRO-2, gradients) across the processes and hook
their gradients. Growth, discard, the switch to or from a dendrites-only phase and a restore of best weights change
that set, so at each of them `DendriticTrainerMixin.rebuild_optimizer_and_scheduler` asks `rebuild_engine` for a new
engine: the old one is destroyed (its gradient hooks and forward hooks leave the model) and dropped from the
accelerator, a fresh optimizer for the current trainable parameters is built by the trainer (`create_optimizer`, at
the LR-search candidate's learning rate) and `accelerator.prepare(model, optimizer)` makes a new engine, which
broadcasts rank 0's parameters, as a new DDP wrapper does. The LR scheduler stays the trainer's own (a
`transformers` scheduler on the new optimizer), so the LR schedule across cycles is the one of a DDP run.

Checkpoints: the Trainer saves the model with the trainer's `save_model` (parameters are whole on every process
under ZeRO-1/2, so the folder holds the same `save_pretrained` files as a single-process run, loadable with
`DendriticModel.from_pretrained`), then DeepSpeed's own checkpoint (`global_step<n>/`, the partitioned optimizer
state of the current engine) and the LR scheduler. On resume the Trainer builds the engine before it loads anything,
so `load_layout_before_engine` first rebuilds the checkpoint's dendrite layout, weights and schedule state (the
trainer's `_load_from_checkpoint`); the engine then fits the checkpoint DeepSpeed loads into it.

Not supported, with an error while the trainer is built (`check_deepspeed_arguments`, `check_deepspeed_setup`):

- ZeRO-3: it partitions the parameters themselves; dendrites grown into a partitioned layer are plain parameters
  DeepSpeed does not know (`'Parameter' object has no attribute 'ds_status'`). ZeRO-2 is the supported stage.
- `optimizer` / `scheduler` sections in the DeepSpeed config: the trainer builds both from `TrainingArguments`
  (`optim`, `learning_rate`, `lr_scheduler_type`) at every change of the parameter set.
- the correlation learning rule: its candidate phase trains candidate dendrites outside the model, which an engine
  cannot step. Use DDP for it.

Also refused: resuming with `model_init` (`load_layout_before_engine`) and `hyperparameter_search` (hp_search.py).
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from . import trainer_internals

logger = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "hf_dendrites[deepspeed]"'
SUPPORTED_STAGES = (0, 1, 2)


def require_deepspeed() -> None:
    """Raise an ImportError naming the extra when DeepSpeed is not installed."""
    try:
        import deepspeed  # noqa: F401
    except ImportError as err:
        raise ImportError(
            f"DendriticTrainer with `deepspeed=` needs the DeepSpeed package, which is not installed: {INSTALL_HINT} "
            "(it installs without CUDA; ZeRO-1 and ZeRO-2 also run on CPU processes with `use_cpu=True`)."
        ) from err


def deepspeed_config_problem(config: dict[str, Any], trainer_name: str = "DendriticTrainer") -> Exception | None:
    """The error a DeepSpeed config gets from `trainer_name`, or None when the trainer can grow dendrites under it."""
    zero = config.get("zero_optimization") or {}
    stage = zero.get("stage", 0)
    if stage not in SUPPORTED_STAGES:
        return NotImplementedError(
            f"{trainer_name} supports DeepSpeed ZeRO stages 0, 1 and 2, not stage {stage} "
            "(`zero_optimization.stage`): ZeRO-3 partitions the parameters themselves, and dendrites grown into a "
            "partitioned layer are parameters DeepSpeed does not manage. Use ZeRO-2 (`\"stage\": 2`), which "
            "partitions optimizer state and gradients; see docs/distributed.md."
        )
    sections = [key for key in ("optimizer", "scheduler") if key in config]
    if sections:
        return ValueError(
            f"{trainer_name} builds the optimizer and the LR scheduler itself at every growth, so the DeepSpeed config "
            f"cannot have {' / '.join(repr(s) for s in sections)} section(s). Remove them and choose the optimizer "
            "and the schedule with TrainingArguments (`optim`, `learning_rate`, `weight_decay`, `lr_scheduler_type`, "
            "`warmup_steps`)."
        )
    return None


def check_deepspeed_arguments(args: Any, trainer_name: str = "DendriticTrainer") -> None:
    """Before the trainer builds anything: DeepSpeed is installed and `args.deepspeed`'s config is one the trainer
    supports."""
    require_deepspeed()
    hf_config = getattr(args, "hf_deepspeed_config", None)
    problem = deepspeed_config_problem(hf_config.config, trainer_name) if hf_config is not None else None
    if problem is not None:
        raise problem


def check_deepspeed_setup(trainer: Any) -> None:
    """After the Trainer's `__init__`: the config the accelerator runs (from `deepspeed=` or an accelerate config
    with `--use_deepspeed`) and the model's learning rule are supported."""
    name = trainer._dendritic_class_name()
    require_deepspeed()
    plugin = trainer.accelerator.state.deepspeed_plugin
    problem = deepspeed_config_problem(plugin.deepspeed_config, name)
    if problem is not None:
        raise problem
    if trainer.model.dendrite_config.learning_rule == "correlation":
        raise NotImplementedError(
            f"{name} does not run the correlation learning rule under DeepSpeed: its candidate phase trains candidate "
            "dendrites outside the model, which a DeepSpeed engine cannot step. Use DDP (`torchrun` without "
            "`deepspeed=`) or DendriteConfig(learning_rule='gd')."
        )


def is_engine(module: Any) -> bool:
    """Whether `module` is a DeepSpeed engine."""
    try:
        from deepspeed import DeepSpeedEngine
    except ImportError:
        return False
    return isinstance(module, DeepSpeedEngine)


def rebuild_engine(trainer: Any, old_wrapped: nn.Module) -> None:
    """Replace the trainer's engine by a new one for the current trainable parameters and `trainer.optimizer` (a
    fresh optimizer the trainer just built; its old optimizer and scheduler already left the accelerator). Sets
    `trainer.model_wrapped` / `trainer.deepspeed` to the new engine and `trainer.optimizer` to its optimizer."""
    acc = trainer.accelerator
    trainer_internals.forget_prepared(acc, models=[old_wrapped, trainer.model])
    if is_engine(old_wrapped):
        trainer_internals.release_deepspeed_engine(acc, old_wrapped)
    trainer.model_wrapped, trainer.optimizer = acc.prepare(trainer.model, trainer.optimizer)
    trainer.deepspeed = trainer.model_wrapped


def load_layout_before_engine(trainer: Any, checkpoint: str) -> None:
    """Resuming under DeepSpeed: rebuild the checkpoint's dendrite layout, weights and schedule state now.

    `Trainer.train` does not call `_load_from_checkpoint` under DeepSpeed: it builds the engine for the model at hand
    and then lets DeepSpeed load its checkpoint into it, which must find the checkpoint's parameter set.
    With `model_init` the Trainer makes a new model after this point, so that combination is refused.
    """
    if trainer.model_init is not None:
        raise NotImplementedError(
            f"{trainer._dendritic_class_name()} cannot resume a DeepSpeed run with `model_init`: the model `model_init` "
            "returns is made after the checkpoint's dendrites would be rebuilt. Pass the model itself (`model=`) to "
            "resume."
        )
    trainer._load_from_checkpoint(checkpoint)
