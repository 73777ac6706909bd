"""FSDP2 (torch's `fully_shard`, prepared by accelerate) for the dendritic trainers (docs/distributed.md).

What FSDP2 does to a model: every parameter becomes a `DTensor` of which each process holds one shard (the
gradients and the optimizer state are sharded the same way); the parameters of a sharded module are gathered for
its forward and backward pass, and gradients are reduce-scattered once per module group. The groups are fixed
when the model is sharded: a parameter added later (a new dendrite) would belong to no group, and its gradient
would never be synchronised (the processes diverge silently); `torch.cat` of a sharded and a plain tensor fails;
and a module cannot be sharded twice.

So the trainer gathers, changes and shards again:

- **Before the schedule changes the parameter set** (growth, retry, phase switch, LR-search candidate, completion,
  a checkpoint or best model loaded): `unshard` gathers every parameter (`DTensor.full_tensor()`, on every
  process, onto the device it was sharded on) and turns the model back into a plain module (the FSDP hooks,
  module classes and state removed; `trainer_internals.remove_fsdp2`). Every process then holds the same whole
  model, and the schedule restores, grows and freezes exactly as in a single process.
- **`rebuild_optimizer_and_scheduler`** then shards the model again through accelerate (`Accelerator.prepare`
  with a new optimizer: accelerate's FSDP2 preparation with the run's auto-wrap policy), so every parameter,
  the new dendrites included, is sharded and gradient-synchronised. The model object stays the same (the
  Trainer's loop, the accelerator and the callbacks keep working on it).
- **Best-weight snapshots** gather each parameter to a CPU copy on every process (every process restores them).
- **Saving** (`trainer.save_model()`, checkpoints): each parameter is gathered to the CPU of the main process,
  which writes the same single-process checkpoint (`DendriticModel.save_pretrained`, `from_pretrained` loads it
  in one process); the others take part in the gathering only. The Trainer then writes its FSDP optimizer state
  (full or sharded, `fsdp_config["state_dict_type"]`), from which a resumed run continues exactly
  (`FreshOptimizerState` keeps an optimizer built at that step new across the save). `save_pretrained` on the
  sharded model itself is refused (`refuse_sharded_save`).

On CPU, accelerate runs `fsdp=` (or `accelerate launch --use_fsdp`) as plain DDP without saying so: its state
keeps the FSDP plugin only for GPU-like devices. `enable_fsdp2` switches the accelerator's state to FSDP with the
run's FSDP2 plugin right after the Trainer created it, so FSDP2 really runs (gloo), and `check_sharded` stops
training with an error if the model is not sharded when a step runs. FSDP version 1 is refused (it wraps the
model in a `FullyShardedDataParallel` whose flat parameters cannot follow a growth).

Not supported under FSDP (an error when the trainer is built): the `correlation` learning rule (its candidate
phase runs the bare model on every process, with candidate pools outside FSDP). Cost: while the schedule changes
the model, every process holds the whole model's weights (not its gradients or optimizer state) on its device.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from . import trainer_internals

logger = logging.getLogger(__name__)

SUPPORTED_FSDP_VERSION = 2


def fsdp_requested(args: Any) -> bool:
    """Whether the run asks for FSDP: `fsdp=` in the training arguments, or `accelerate launch --use_fsdp` (its
    environment variable)."""
    return bool(getattr(args, "fsdp", None)) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def requested_version(args: Any) -> int:
    """The FSDP version the run asks for: the version transformers passes to accelerate (`fsdp_plugin_args`; without
    `fsdp_config["version"]` transformers 5.25 passes 2, 5.4 passes 1), else `fsdp_config["version"]`, or accelerate's
    `FSDP_VERSION` environment variable for `accelerate launch --use_fsdp` (accelerate's default: 1)."""
    if getattr(args, "fsdp", None):
        plugin_args = getattr(args, "fsdp_plugin_args", None) or {}
        if "fsdp_version" in plugin_args:
            return int(plugin_args["fsdp_version"])
        config = getattr(args, "fsdp_config", None) or {}
        return int(config.get("version", config.get("fsdp_version", 2)))
    return int(os.environ.get("FSDP_VERSION", "1"))


def check_fsdp_args(args: Any, trainer_name: str) -> None:
    """Refuse FSDP settings the dendritic trainers cannot run, before anything is built."""
    if not fsdp_requested(args):
        return
    config = getattr(args, "fsdp_config", None) or {}
    if config.get("xla") or config.get("xla_fsdp_v2"):
        raise NotImplementedError(
            f"{trainer_name} does not support XLA FSDP (`fsdp_config['xla']`): use torch's FSDP2 "
            "(`fsdp_config={'version': 2}`) on GPUs or CPU processes (docs/distributed.md)."
        )
    version = requested_version(args)
    if version != SUPPORTED_FSDP_VERSION:
        where = (
            "`fsdp_config={'version': 2}` in the training arguments"
            if getattr(args, "fsdp", None)
            else "`accelerate launch --use_fsdp --fsdp_version 2` (or `fsdp_version: 2` in the accelerate config)"
        )
        raise NotImplementedError(
            f"{trainer_name} supports FSDP version 2 only, and this run asks for FSDP version {version}: FSDP 1 wraps "
            "the model in FullyShardedDataParallel, whose flattened parameters cannot follow a growth of the "
            f"dendrites. Set {where} (docs/distributed.md)."
        )
    if int(getattr(args, "world_size", 1) or 1) <= 1:
        # Refused before the Trainer builds an accelerator (which would export ACCELERATE_USE_FSDP for this process).
        raise RuntimeError(not_one_job_message(trainer_name, "NO"))


def not_one_job_message(trainer_name: str, distributed_type: str) -> str:
    return (
        f"{trainer_name}: FSDP is requested, but accelerate runs this process with distributed type {distributed_type}, "
        "not FSDP, and would train without sharding. FSDP needs several processes in one job: on GPUs `torchrun "
        "--nproc_per_node N train.py ...` or `accelerate launch --use_fsdp --fsdp_version 2 ...`; on CPU `torchrun "
        "--nproc_per_node N train.py --use_cpu ...` (docs/distributed.md)."
    )


def is_fsdp2(accelerator: Any) -> bool:
    """Whether `accelerator` shards models with FSDP2."""
    from accelerate.utils import DistributedType

    state = accelerator.state
    plugin = getattr(state, "fsdp_plugin", None)
    return state.distributed_type == DistributedType.FSDP and plugin is not None and plugin.fsdp_version == 2


def enable_fsdp2(trainer: Any) -> None:
    """Make the accelerator the Trainer just created run FSDP2 when the run asks for FSDP (see the module docs).

    On GPUs accelerate already does. On CPU processes joined into one job (`--use_cpu`), accelerate keeps the
    distributed type MULTI_CPU and drops the FSDP plugin, which would train with DDP: the state is switched to
    FSDP with the run's FSDP2 plugin. A run that is not one distributed job is refused.
    """
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    args, name = trainer.args, trainer._dendritic_class_name()
    if not fsdp_requested(args):
        return
    accelerator = trainer.accelerator
    state = accelerator.state
    if state.distributed_type == DistributedType.FSDP:
        if not is_fsdp2(accelerator):
            raise NotImplementedError(
                f"{name} supports FSDP version 2 only, and accelerate runs FSDP version "
                f"{getattr(state.fsdp_plugin, 'fsdp_version', '?')}: set `fsdp_config={{'version': 2}}` or "
                "`--fsdp_version 2` (docs/distributed.md)."
            )
        return
    if state.distributed_type != DistributedType.MULTI_CPU:
        raise RuntimeError(not_one_job_message(name, state.distributed_type.value))
    plugin_args = dict(getattr(args, "fsdp_plugin_args", None) or {"fsdp_version": SUPPORTED_FSDP_VERSION})
    plugin = FullyShardedDataParallelPlugin(**plugin_args)
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    trainer_internals.switch_to_fsdp(accelerator, plugin)
    trainer.is_fsdp_enabled = True
    logger.info("FSDP2 on CPU processes: accelerate's state switched from MULTI_CPU (DDP) to FSDP.")


def check_sharded(trainer: Any) -> None:
    """Stop training when the run asks for FSDP but the model is not sharded (never a silent DDP run)."""
    if not fsdp_requested(trainer.args):
        return
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(trainer.model_wrapped, FSDPModule):
        raise RuntimeError(
            f"{trainer._dendritic_class_name()}: FSDP is requested, but the model being trained is a "
            f"{type(trainer.model_wrapped).__name__}, not sharded by FSDP2 (accelerate's distributed type is "
            f"{trainer.accelerator.state.distributed_type.value}). Training stops rather than run without sharding; "
            "see docs/distributed.md for the launch commands."
        )


def check_model_supported(model: Any, trainer_name: str) -> None:
    """Refuse what FSDP2 runs cannot do with this dendritic model."""
    if model.dendrite_config.learning_rule == "correlation":
        raise NotImplementedError(
            f"{trainer_name} does not support the `correlation` learning rule under FSDP: its candidate phase runs the "
            "bare model on every process and keeps the candidate pools outside FSDP's shards. Use "
            "DendriteConfig(learning_rule='gd') with FSDP, or the correlation rule under DDP (docs/distributed.md)."
        )


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _sharded_parameters(model: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Parameter]]:
    """(module, name, parameter) of every sharded parameter, in a fixed order (the same on every process: each
    gather is a collective)."""
    if not torch.distributed.is_available():  # a torch build without distributed support has no DTensor
        return
    from torch.distributed.tensor import DTensor

    for module in model.modules():
        for name, param in module._parameters.items():
            if isinstance(param, DTensor):
                yield module, name, param


def is_sharded(model: nn.Module) -> bool:
    return bool(_fsdp_modules(model))


def gather(tensor: torch.Tensor, device: Any = None) -> torch.Tensor:
    """The whole value of `tensor` (a sharded `DTensor`: gathered, a collective on every process), detached, on
    `device` (default: where it is)."""
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor.detach()
    return full if device is None else full.to(device)


def unshard(model: nn.Module) -> bool:
    """Gather a sharded model and make it a plain module again, in place (see the module docs). Every process
    must call it at the same point. Returns whether the model was sharded."""
    modules = _fsdp_modules(model)
    if not modules:
        return False
    for module in modules:
        module.reshard()  # the sharded parameters registered (a root kept unsharded after forward)
    gathered: dict[int, nn.Parameter] = {}
    for module, name, param in list(_sharded_parameters(model)):
        if id(param) not in gathered:  # tied parameters stay tied
            gathered[id(param)] = nn.Parameter(gather(param), requires_grad=param.requires_grad)
        module._parameters[name] = gathered[id(param)]
    for module in modules:
        trainer_internals.remove_fsdp2(module)
    for module in model.modules():
        trainer_internals.unmark_fsdp_managed(module)
    return True


@contextlib.contextmanager
def full_parameters(model: nn.Module, on_this_process: bool) -> Iterator[None]:
    """Give the model its whole parameters on the CPU while the block runs (for saving), then its shards back.

    Every process gathers (a collective); only where `on_this_process` (the process that writes) are the full
    values kept, one parameter at a time on the device and then in CPU memory. A model that is not sharded is
    left as it is."""
    if not is_sharded(model):
        yield
        return
    for module in _fsdp_modules(model):
        module.reshard()
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    full: dict[int, nn.Parameter] = {}
    try:
        for module, name, param in list(_sharded_parameters(model)):
            if id(param) not in full:
                value = gather(param, "cpu")
                full[id(param)] = nn.Parameter(value, requires_grad=param.requires_grad) if on_this_process else None
            if on_this_process:
                swapped.append((module, name, param))
                module._parameters[name] = full[id(param)]
        full.clear()
        yield
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param


def refuse_sharded_save(model: nn.Module) -> None:
    """`save_pretrained` of a model whose parameters are FSDP2 shards would write each process's part: refuse it."""
    if any(True for _ in _sharded_parameters(model)):
        raise RuntimeError(
            "save_pretrained was called on a model sharded by FSDP2: each process holds only its shards of the "
            "parameters. Call `trainer.save_model(output_dir)` on every process (the main process writes the whole "
            "model, gathered), or pass the gathered state as `state_dict=` (docs/distributed.md)."
        )


def reshard(trainer: Any) -> None:
    """Shard the (plain, changed) model again with the trainer's new optimizer, through accelerate's FSDP2
    preparation (see the module docs). The model object stays the same."""
    acc, model = trainer.accelerator, trainer.model
    trainer_internals.forget_prepared(acc, models=[model])
    trainer_internals.unmark_prepared(model)
    wrapped, trainer.optimizer = acc.prepare(model, trainer.optimizer)
    trainer.model = trainer.model_wrapped = wrapped
    if hasattr(wrapped, "generate"):  # as the Trainer does after its own preparation
        from torch.distributed.fsdp import register_fsdp_forward_method

        register_fsdp_forward_method(wrapped, "generate")


def cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A detached CPU copy of `tensor`; a sharded `DTensor` is gathered first (a collective on every process)."""
    if type(tensor).__name__ == "DTensor":
        return gather(tensor, "cpu")
    return tensor.detach().to("cpu", copy=True)


# Written into a checkpoint whose optimizer had no state yet (saved right after a rebuild), see `FreshOptimizerState`.
FRESH_OPTIMIZER_NAME = "dendrite_fsdp_fresh_optimizer.json"


class FreshOptimizerState(TrainerCallback):
    """Keeps a new optimizer new across the FSDP checkpoint of the step that built it.

    The Trainer saves an FSDP optimizer through `torch.distributed.checkpoint`, which first gives an optimizer
    without state one step with zero gradients and learning rate 0 (Adam: step 1, zero moments), to have a state to
    save. A checkpoint written right after a growth would thereby move Adam's bias correction by one step, and the
    run would no longer train as the same run under DDP (or one that writes no checkpoint there). After such a
    save (`on_save`) the state is cleared again, which is exactly the optimizer's state before the save; the
    checkpoint says so (`FRESH_OPTIMIZER_NAME`), and a run resumed from it clears the loaded state the same way
    (`on_train_begin`, after the Trainer loaded the optimizer), so the resumed run is exact too.
    """

    def __init__(self, trainer: Any):
        self.trainer = trainer
        self.clear_after_save: int | None = None  # the step of the checkpoint whose save leaves a state to clear
        self.clear_after_resume = False

    def checkpoint_saved_model(self, directory: str, write: bool) -> None:
        """`save_model` wrote the model of a checkpoint (`<run>/checkpoint-<step>`); its optimizer state follows."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        step = self.trainer.state.global_step
        if os.path.basename(os.path.normpath(directory)) != f"{PREFIX_CHECKPOINT_DIR}-{step}":
            return
        optimizer = self.trainer.optimizer
        self.clear_after_save = step if optimizer is not None and not optimizer.state else None
        if self.clear_after_save is not None and write:
            with open(os.path.join(directory, FRESH_OPTIMIZER_NAME), "w", encoding="utf-8") as handle:
                handle.write('{"optimizer_state": "none: the optimizer was new when this checkpoint was written"}\n')

    def loading_checkpoint(self, directory: str) -> None:
        self.clear_after_resume = os.path.isfile(os.path.join(directory, FRESH_OPTIMIZER_NAME))

    def _clear(self) -> None:
        if self.trainer.optimizer is not None:
            self.trainer.optimizer.state.clear()

    def on_save(self, args, state, control, **kwargs):
        if self.clear_after_save is not None and self.clear_after_save == state.global_step:
            self._clear()
        self.clear_after_save = None
        return control

    def on_train_begin(self, args, state, control, **kwargs):
        if self.clear_after_resume:
            self._clear()
            self.clear_after_resume = False
        return control
