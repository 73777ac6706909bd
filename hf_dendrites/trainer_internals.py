"""Every private transformers / accelerate name that `DendriticTrainer` still relies on, in one place.

Growing dendrites replaces parameters in the middle of training, which neither library offers a public hook for.
Each entry below says what is used, why, and what is relied on; `tests/test_private_surface.py` checks each one
(signature and behaviour) and fails with `SUPPORTED_RANGE` in its message if an upgrade changes it. Nothing else in
the package touches a private transformers or accelerate name: go through the helpers here.

====================================================  ===============================================================
name                                                  why / what we rely on
====================================================  ===============================================================
`Trainer._load_from_checkpoint(resume_from_checkpoint, model=None)`
                                                      Overridden: a dendritic checkpoint has another parameter set
                                                      than the model at hand. `Trainer.train` calls it before it
                                                      creates the optimizer (so the optimizer state of the checkpoint
                                                      fits) and only for single-process / DDP runs.
`Trainer._load_best_model()`                          Overridden for `load_best_model_at_end`: the best checkpoint's
                                                      dendrite layout must be rebuilt before its weights load. Called
                                                      by `Trainer.train` at the end, with `state.best_model_checkpoint`.
`Trainer.save_model(output_dir, _internal_call)`      Public, but we rely on `Trainer._save_checkpoint` calling it with
                                                      `<run_dir>/checkpoint-<global_step>` and `_internal_call=True`
                                                      *before* it writes the optimizer and rotates old checkpoints: that
                                                      is how a save is known to be a checkpoint (schedule state goes in,
                                                      and files of older checkpoints can still be hard-linked).
`Accelerator._optimizers` / `_schedulers` / `_models` Lists of prepared objects that accelerate steps, saves and
                                                      unwraps. A rebuilt optimizer / scheduler / DDP wrapper replaces
                                                      the old one, which must leave these lists (`forget_prepared`).
`module._is_accelerate_prepared`, `module._original_forward`
                                                      Set by `Accelerator.prepare_model`; removed before preparing the
                                                      same module again (a new DDP wrapper after a growth), so that
                                                      accelerate wraps it anew (`unmark_prepared`).
`Trainer._hp_search_setup(trial)`                     Overridden (hp_search.py): the trial's settings are applied
                                                      before `train()`; `Trainer.train` calls it after
                                                      `call_model_init(trial)` (so the trial's DendriteConfig converts
                                                      the new model first), before building the dataloaders.
`Trainer._report_to_hp_search(trial, step, metrics)`  Overridden (hp_search.py): pruning decided on the main process and
                                                      broadcast. Called by `Trainer._evaluate` after `evaluate()`.
`Trainer._get_output_dir(trial)`                      Called: the trial's run folder (`output_dir/run-<n>` or
                                                      `hp_name(trial)`), where a pruned trial's files are deleted and
                                                      the evaluation report is written (`run_output_dir`).
`Trainer.create_accelerator_and_postprocess()`        Called after a trial changes the arguments (a new accelerator for
                                                      the trial's batch size etc.), as `Trainer._hp_search_setup` does.
`Trainer._trial`, `_train_batch_size`,                Attributes the search sets or reads as transformers' own search
`hp_search_backend`, `hp_space`, `hp_name`,           does: `_trial` (set by `_hp_search_setup`, read by
`compute_objective`, `objective`                      `run_output_dir`), `_train_batch_size` (the per-trial batch
                                                      size), the search's backend / space / naming / objective.
TRL trainers' `_metrics` (a dict of lists per mode)   Copied and put back around the schedule's own evaluation of a
                                                      kept cycle without its dendrites
                                                      (`DendriticTrainerMixin.dendrite_unreported_evaluation`): TRL's
                                                      trainers collect evaluation metrics there for their next log
                                                      entry, which that evaluation must not reach. Only used when the
                                                      attribute is a dict; guarded by tests/test_trl.py (no `eval_`
                                                      metric in a dendrite event's log entry).
`Pipeline.check_model_type(self, supported_models)`   Its error record is filtered (`install_pipeline_type_check`,
                                                      for `pipeline(task, model=dendritic_model)`): transformers
                                                      checks the class name of the model it is given, `DendriticModel`,
                                                      against the task's model classes. We rely on the record being
                                                      logged by the `transformers.pipelines.base` logger from inside
                                                      `check_model_type`, whose locals `self` (the pipeline, with
                                                      `.model` and `.task`) and `supported_models` (by then the list of
                                                      class names) the filter reads to check the wrapped class instead.
`Accelerator.deepspeed_engine_wrapped`                The engine `accelerator.backward` runs backward and `step` on.
                                                      `Accelerator.prepare` sets it only while it is None (it warns and
                                                      keeps the old engine otherwise); a replaced engine is released
                                                      (`release_deepspeed_engine`) by setting it back to None.
`DeepSpeedEngine.module_forward_pre_hook` /           Handles of the forward hooks an engine registers on the model it
`module_forward_post_hook`                            wraps; `destroy()` leaves them there, so a replaced engine's are
                                                      removed (the model is wrapped by the next engine).
`DeepSpeedEngine.optimizer`, `basic_optimizer`,       The optimizers / schedulers an engine holds; set to None once the
`client_optimizer`, `lr_scheduler`,                   engine is destroyed, so that the Trainer's training loop, which
`client_lr_scheduler`                                 keeps the engine it started with to the end, does not keep its
                                                      optimizer state and partitions alive. (DeepSpeed names checked
                                                      with deepspeed 0.19.0 and 0.19.8.)
Under DeepSpeed `Trainer.train` does not call         The trainer calls it itself before `super().train()`
`_load_from_checkpoint`                               (`deepspeed_support.load_layout_before_engine`), and the Trainer
                                                      then loads DeepSpeed's checkpoint (`global_step<n>/`) into the
                                                      engine it built for that parameter set.
`model._hf_peft_config_loaded` (read by `transformers.trainer_utils.validate_quantization_for_training`)
                                                      `Trainer.__init__` refuses a quantized model (`is_quantized`)
                                                      unless this flag says adapters are attached (or it is a
                                                      PeftModel). `DendriticModel` answers it for itself (True when
                                                      it has dendritic layers, `QUANTIZED_ADAPTERS_FLAG`): a quantized
                                                      base with dendrites trains its dendrites as a base with LoRA
                                                      trains its adapters.
`transformers.integrations.moe._grouped_linear(input, weight, offs, bias=None, is_transposed=False)`
                                                      Called by the dendritic experts (hf_dendrites/moe.py) for the
                                                      base projections, as transformers' `grouped_mm` experts
                                                      implementation calls it: rows sorted by expert, `offs` the
                                                      cumulative row counts; it returns row i's product with its
                                                      group's weight (transposed: [E, in, out]) plus `bias` rows.
                                                      Computing the base the same way keeps insertion bit-exact.
`AcceleratorState.distributed_type` / `fsdp_plugin`   Set (`switch_to_fsdp`, FSDP2 on CPU, hf_dendrites/fsdp.py): on
(and `PartialState`'s `distributed_type`)             CPU processes accelerate keeps MULTI_CPU and drops the FSDP
                                                      plugin (DDP without a word); switched to FSDP with an FSDP2
                                                      plugin right after the Trainer built its accelerator, its
                                                      `prepare` shards with `fully_shard` (gloo).
torch FSDP2: `FSDPModule._get_fsdp_state()`; the      Removed (`remove_fsdp2`) to make a sharded module plain again
state's `_pre_forward_hook_handle`,                   before the dendrites change (fsdp.py): its forward hooks, the
`_post_forward_hook_handle`, `_fsdp_param_groups`     state-dict hooks its parameter groups put on the modules whose
(each group's `_module_to_pre_save_state_dict_hook_   parameters they hold, the FSDP class (the original class is
handle`, `_module_to_pre_load_state_dict_hook_handle` at `_orig_cls_mro_index`, 2, in its MRO), the composable state
and `fsdp_params[i]._post_load_hook_handle`); the     and registry entries in the module's `__dict__`, the module's
class `FSDP<cls>` (`_orig_cls_mro_index`);            entry in the global state map (`fully_shard` refuses a module
`_composable.contract.STATE_KEY` / `REGISTRY_KEY`;    that still has them), and the managed-module marks
`_composable_state._module_state_mapping`;            (`unmark_fsdp_managed`).
`_is_fsdp_managed_module`, `_fsdp_use_orig_params`
====================================================  ===============================================================
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import Any

from torch import nn

# The range the private surface above was checked against (keep in line with pyproject.toml).
SUPPORTED_RANGE = "transformers >= 5.4, < 6 and accelerate >= 1.7, < 2"

# (owner, name) of every private attribute used, for the test that guards them.
PRIVATE_TRAINER_METHODS = ("_load_from_checkpoint", "_load_best_model", "_save_checkpoint", "_hp_search_setup",
                           "_report_to_hp_search", "_get_output_dir")
# Public-looking methods the search calls whose behaviour is not documented API.
CALLED_TRAINER_METHODS = ("create_accelerator_and_postprocess", "call_model_init")
# Trainer attributes the hyperparameter search sets or reads (hp_search.py).
PRIVATE_TRAINER_ATTRIBUTES = ("_trial", "_train_batch_size", "hp_search_backend", "hp_space", "hp_name", "compute_objective", "objective")
PRIVATE_ACCELERATOR_LISTS = ("_optimizers", "_schedulers", "_models")
PRIVATE_MODULE_MARKS = ("_is_accelerate_prepared", "_original_forward")
# The attribute by which transformers' Trainer tells a quantized model with trainable adapters from a bare one.
QUANTIZED_ADAPTERS_FLAG = "_hf_peft_config_loaded"
# The logger and the function of transformers' pipeline model check (see `install_pipeline_type_check`).
PIPELINE_LOGGER = "transformers.pipelines.base"
PIPELINE_CHECK_FUNCTION = "check_model_type"
# DeepSpeed (hf_dendrites/deepspeed_support.py): the accelerator's engine reference and the engine's forward hooks.
DEEPSPEED_ACCELERATOR_ENGINE = "deepspeed_engine_wrapped"
DEEPSPEED_ENGINE_HOOKS = ("module_forward_pre_hook", "module_forward_post_hook")
DEEPSPEED_ENGINE_OPTIMIZERS = ("optimizer", "basic_optimizer", "client_optimizer", "lr_scheduler", "client_lr_scheduler")


class _WrappedModelTypeCheck(logging.Filter):
    """Makes transformers' pipeline model check judge the model a wrapper wraps, not the wrapper's class name."""

    def __init__(self, wrapper_class: type):
        super().__init__()
        self.wrapper_class = wrapper_class

    def filter(self, record: logging.LogRecord) -> bool:
        if record.funcName != PIPELINE_CHECK_FUNCTION or record.levelno < logging.ERROR:
            return True
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_name != PIPELINE_CHECK_FUNCTION:
            frame = frame.f_back
        if frame is None:
            return True
        pipe, supported = frame.f_locals.get("self"), frame.f_locals.get("supported_models")
        model = getattr(pipe, "model", None)
        if not isinstance(model, self.wrapper_class) or not isinstance(supported, list):
            return True
        wrapped = type(model.model).__name__
        if wrapped in supported:
            return False  # the wrapped model is one the task supports: the error would be false
        record.msg = (
            f"The model '{type(model).__name__}' wraps a '{wrapped}', which is not supported for "
            f"{getattr(pipe, 'task', '?')}. Supported models are {supported}."
        )
        record.args = ()
        return True


def install_pipeline_type_check(wrapper_class: type) -> None:
    """Let `pipeline(task, model=wrapper)` check the wrapped model's class (once per process; idempotent).

    transformers logs an error-level "The model 'DendriticModel' is not supported for <task>" for every dendritic
    model given to a pipeline, even when the model it wraps is one the task supports (PEFT's wrapper classes are
    listed in transformers itself). A filter on transformers' pipeline logger drops that record when the wrapped
    class is supported, and otherwise names the wrapped class in it. Nothing else is changed; no transformers module
    is imported.
    """
    target = logging.getLogger(PIPELINE_LOGGER)
    if not any(isinstance(f, _WrappedModelTypeCheck) and f.wrapper_class is wrapper_class for f in target.filters):
        target.addFilter(_WrappedModelTypeCheck(wrapper_class))


def forget_prepared(accelerator: Any, optimizers: Iterable[Any] = (), schedulers: Iterable[Any] = (), models: Iterable[Any] = ()) -> None:
    """Drop replaced objects from the accelerator's lists, so none of them is unscaled, stepped or saved again."""
    optimizers, schedulers, models = list(optimizers), list(schedulers), list(models)
    accelerator._optimizers = [o for o in accelerator._optimizers if not any(o is x for x in optimizers)]
    accelerator._schedulers = [s for s in accelerator._schedulers if not any(s is x for x in schedulers)]
    accelerator._models = [m for m in accelerator._models if not any(m is x for x in models)]


def register_prepared_model(accelerator: Any, model: nn.Module) -> None:
    """List `model` as prepared (the Trainer's evaluation then does not prepare, and flag, the bare model itself)."""
    accelerator._models.append(model)


def run_output_dir(trainer: Any) -> str:
    """The folder of the run being trained: `output_dir`, or during a hyperparameter search the trial's folder."""
    return trainer._get_output_dir(getattr(trainer, "_trial", None))


def unmark_prepared(model: nn.Module) -> None:
    """Undo what `Accelerator.prepare_model` left on a module, so that preparing it again wraps it anew."""
    model.__dict__.pop("_is_accelerate_prepared", None)
    original_forward = model.__dict__.pop("_original_forward", None)
    if original_forward is not None:  # accelerate's autocast wrapper; prepare() applies it again
        model.forward = original_forward


def release_deepspeed_engine(accelerator: Any, engine: Any) -> None:
    """Take a replaced DeepSpeed engine out of use: `destroy()` removes its optimizer's gradient hooks, its forward
    hooks leave the model (which the next engine wraps again), it lets go of its optimizers (freed although the
    Trainer's training loop may still hold the engine), and the accelerator forgets it as the engine that
    `accelerator.backward` steps, so that the next `prepare` installs the new one."""
    engine.destroy()
    for name in DEEPSPEED_ENGINE_HOOKS:
        handle = getattr(engine, name, None)
        if handle is not None:
            handle.remove()
            setattr(engine, name, None)
    for name in DEEPSPEED_ENGINE_OPTIMIZERS:  # the training loop may still hold the engine: free its optimizer state now
        if name in vars(engine):
            setattr(engine, name, None)
    accelerator.deepspeed_engine_wrapped = None


def grouped_linear() -> Any:
    """transformers' grouped experts product (`transformers.integrations.moe._grouped_linear`, see the table above)."""
    from transformers.integrations.moe import _grouped_linear

    return _grouped_linear


# ---------------------------------------------------------------------------------------------- FSDP2 (fsdp.py)
FSDP2_MODULE_MARKS = ("_is_fsdp_managed_module", "_fsdp_use_orig_params")


def switch_to_fsdp(accelerator: Any, plugin: Any) -> None:
    """Make `accelerator` shard with `plugin` (FSDP2) where accelerate chose DDP (CPU processes)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    state = accelerator.state
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def remove_fsdp2(module: nn.Module) -> None:
    """Undo `fully_shard` on one module whose parameters were already replaced by plain ones (its hooks, FSDP class,
    composable state), so that it runs as a plain module and `fully_shard` accepts it again."""
    import importlib

    from torch.distributed._composable_state import _module_state_mapping

    contract = importlib.import_module("torch.distributed._composable.contract")  # the module, not its function

    state = module._get_fsdp_state()
    hooks = [state._pre_forward_hook_handle, state._post_forward_hook_handle]
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:  # older torch releases: one group per state
        groups = [g] if (g := getattr(state, "_fsdp_param_group", None)) is not None else []
    for group in groups:  # state-dict hooks of the modules whose parameters the group holds
        hooks += [*group._module_to_pre_save_state_dict_hook_handle.values(), *group._module_to_pre_load_state_dict_hook_handle.values()]
        hooks += [getattr(p, "_post_load_hook_handle", None) for p in group.fsdp_params]
    handles = {id(h): h for h in hooks if h is not None}
    for handle in handles.values():
        handle.remove()
    fsdp_class = type(module)
    module.__class__ = fsdp_class.__mro__[getattr(fsdp_class, "_orig_cls_mro_index", 2)]
    module.__dict__.pop(contract.STATE_KEY, None)
    module.__dict__.pop(contract.REGISTRY_KEY, None)
    _module_state_mapping.pop(module, None)
    if getattr(module.__dict__.get("generate"), "__self__", None) is module:
        del module.__dict__["generate"]  # `register_fsdp_forward_method(model, "generate")`, as the Trainer does


def unmark_fsdp_managed(module: nn.Module) -> None:
    """Drop the marks `fully_shard` leaves on the modules it manages (read by dynamo)."""
    for name in FSDP2_MODULE_MARKS:
        module.__dict__.pop(name, None)
