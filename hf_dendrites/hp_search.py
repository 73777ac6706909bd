"""Dendrite settings in `Trainer.hyperparameter_search` (Optuna backend).

`DendriticTrainer.hyperparameter_search` searches `DendriteConfig` fields (dendrites per cycle, activation, rank,
cascade, learning rule, ...) together with training arguments (learning rate, the schedule's patience and
thresholds, ...). Every trial builds a fresh model with `model_init`, converts it with the trial's `DendriteConfig`,
runs the whole dendrite schedule with the trial's arguments, and reports the schedule's best validation score.

    trainer = DendriticTrainer(args=args, model_init=lambda: AutoModelForSequenceClassification.from_pretrained(path),
                               train_dataset=train, eval_dataset=valid, dendrite_config=DendriteConfig(target_modules=...))
    best = trainer.hyperparameter_search(
        hp_space=lambda trial: {**dendrite_hp_space(trial), "learning_rate": trial.suggest_float("learning_rate", 1e-5, 1e-3, log=True)},
        n_trials=20,
    )
    trainer.apply_hyperparameters(best.hyperparameters)
    trainer.train()
    trainer.save_model("best")

How a search differs from `transformers.Trainer.hyperparameter_search`
----------------------------------------------------------------------
- Backend: Optuna only (other backends raise `NotImplementedError`: the objective, the per-trial summary and the
  failure rules below are implemented on Optuna's trial API).
- Objective: the best score of the model the schedule keeps (`DendriticTrainer.dendrite_best_score`) on
  `metric_for_best_model`, not the last evaluation, which may belong to a cycle the schedule discarded. The
  direction follows `greater_is_better`; `compute_objective` is not accepted (choose the metric with
  `metric_for_best_model` and `compute_metrics`). Pruners see the score of every evaluation. When the epoch / step
  cap stops a trial before its schedule completes, the objective is still the score of the model the schedule
  would keep, not of the model trained so far (the user attribute `schedule_completed` is then False): give
  trials enough epochs.
- Keys of the search space: a `DendriteConfig` field goes into the trial's config (`dataclasses.replace` on the
  trainer's `dendrite_config`); a field of the training arguments is set on `args` (a scalar for a list-valued
  schedule argument such as `dendrite_patience` becomes a one-element list); any other key is an error naming it,
  raised before anything trains. `metric_for_best_model` and `greater_is_better` cannot be searched: they define
  the objective. Every trial starts from the settings the trainer had when the search began (a key one trial sets
  does not leak into the next), and those settings are restored when the search ends.
- The trial's settings are applied before `train()` starts, so `seed` (if searched) also seeds the model's
  initialisation and the dendrite config is known when `model_init`'s model is converted.
- A trial whose settings are invalid (e.g. `learning_rule="correlation"` with a `rank`) fails with the config's
  message (Optuna state FAIL, user attribute "error"); the search goes on.
- A pruned trial's folder (`output_dir/run-<number>`, or `hp_name(trial)`) is deleted when the trial created it:
  its checkpoints belong to a run that will never finish.
- Each finished trial's user attributes hold its dendrite summary: `best_score`, `kept_cycles`, `tried_cycles`,
  `schedule_completed`, `num_dendrites`, `dendrite_params`, `base_params`, `total_params`, `dendrite_config` and
  `hyperparameters` (the dict `hp_space` returned, also holding values it set without sampling).
- `BestRun.hyperparameters` is that dict; `BestRun.run_summary` is the Optuna `Study` (on the main process).

Several processes (`torchrun`)
------------------------------
As in transformers, the main process runs the Optuna study and the others follow: for each trial the main process
samples the space and broadcasts the resulting settings, and every process trains with them (the others see an
`optuna.trial.FixedTrial`). Decisions are taken once and broadcast: whether a trial's settings are valid, whether
to prune after an evaluation, and the best run, which every process receives (transformers returns None on the
others), so that `apply_hyperparameters(best.hyperparameters)` runs everywhere.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import shutil
from collections.abc import Callable
from typing import Any

from .config import DendriteConfig
from .constants import ACTIVATIONS

logger = logging.getLogger(__name__)

DENDRITE_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(DendriteConfig))
# Training arguments that define the objective: every trial of a study must share them.
UNSEARCHABLE_ARGUMENTS = frozenset({"metric_for_best_model", "greater_is_better"})
# Optuna `Study.optimize` keywords accepted by `hyperparameter_search` (the other keywords go to `create_study`).
_OPTIMIZE_KWARGS = ("timeout", "gc_after_trial", "callbacks", "show_progress_bar")


class InvalidTrialError(ValueError):
    """A trial's settings make an invalid `DendriteConfig` or invalid training arguments.

    `hyperparameter_search` marks that trial as failed (with the message as its "error" user attribute) and goes on
    with the next one.
    """


def dendrite_hp_space(
    trial,
    *,
    learning_rules: tuple[str, ...] = ("gd", "correlation"),
    ranks: tuple[int | None, ...] = (None, 4, 8, 16),
    max_dendrites_per_cycle: int = 2,
    max_cycles: int = 3,
) -> dict[str, Any]:
    """A default Optuna search space over dendrite settings, to merge with your own.

    Samples the `DendriteConfig` fields `dendrites_per_cycle`, `activation`, `cascade`, `init_scale` and
    `learning_rule`, then, for `"gd"`, `rank` (None = full-shape dendrites) and the `dendrites_only_phase` argument,
    or, for `"correlation"`, `candidate_pool_size` (with `rank` set to None, which that rule needs); and the schedule
    arguments `dendrite_patience`, `dendrite_improvement_threshold` and `max_dendrite_cycles`.

    Args:
        trial: the `optuna.Trial` passed to your `hp_space`.
        learning_rules: the learning rules to try.
        ranks: the dendrite ranks to try with the `"gd"` rule (None = full-shape dendrites).
        max_dendrites_per_cycle: the largest `dendrites_per_cycle` tried.
        max_cycles: the largest `max_dendrite_cycles` tried.

    Example:
        >>> def hp_space(trial):
        ...     return {**dendrite_hp_space(trial, ranks=(None, 8)), "learning_rate": trial.suggest_float("learning_rate", 1e-5, 1e-3, log=True)}
        >>> best = trainer.hyperparameter_search(hp_space=hp_space, n_trials=20)  # doctest: +SKIP
    """
    params: dict[str, Any] = {
        "dendrites_per_cycle": trial.suggest_int("dendrites_per_cycle", 1, max_dendrites_per_cycle),
        "activation": trial.suggest_categorical("activation", list(ACTIVATIONS)),
        "cascade": trial.suggest_categorical("cascade", [False, True]),
        "init_scale": trial.suggest_float("init_scale", 0.25, 2.0, log=True),
        "learning_rule": trial.suggest_categorical("learning_rule", list(learning_rules)),
        "dendrite_patience": trial.suggest_int("dendrite_patience", 1, 4),
        "dendrite_improvement_threshold": trial.suggest_float("dendrite_improvement_threshold", 1e-4, 3e-2, log=True),
        "max_dendrite_cycles": trial.suggest_int("max_dendrite_cycles", 1, max_cycles),
    }
    if params["learning_rule"] == "correlation":
        # Conditional, so that the space never produces the invalid correlation + rank combination.
        params["rank"] = None
        params["candidate_pool_size"] = trial.suggest_int("candidate_pool_size", max_dendrites_per_cycle, 2 * max_dendrites_per_cycle)
    else:
        params["rank"] = trial.suggest_categorical("rank", list(ranks))
        params["dendrites_only_phase"] = trial.suggest_categorical("dendrites_only_phase", [False, True])
    return params


def dendrite_config_from_params(base: DendriteConfig | None, params: dict[str, Any]) -> DendriteConfig:
    """The `DendriteConfig` a trial used: `base` with the `DendriteConfig` fields found in `params` replaced.

    Keys that are not `DendriteConfig` fields (training arguments such as `learning_rate`) are ignored, so
    `BestRun.hyperparameters` can be passed as it is. Raises `InvalidTrialError` (a `ValueError`) with the config's
    own message when the combination is invalid.

    Example:
        >>> dendrite_config_from_params(DendriteConfig(target_modules="all-linear"), {"rank": 8, "learning_rate": 1e-4}).rank
        8
    """
    updates = {k: v for k, v in params.items() if k in DENDRITE_CONFIG_FIELDS}
    try:
        return dataclasses.replace(base if base is not None else DendriteConfig(), **updates)
    except (TypeError, ValueError) as err:
        raise InvalidTrialError(f"Invalid DendriteConfig for {updates}: {err}") from err


def _cast_argument(args, key: str, value: Any) -> Any:
    """Give a sampled value the type of the argument it sets, as `Trainer._hp_search_setup` does; a scalar for a
    list-valued argument (the schedule's per-cycle `dendrite_patience`, ...) becomes a one-element list."""
    old = getattr(args, key)
    if isinstance(old, list):
        return list(value) if isinstance(value, (list, tuple)) else [value]
    if old is None or value is None:
        return value
    if isinstance(old, bool):
        if not isinstance(value, bool):
            raise InvalidTrialError(f"`{key}` is a boolean training argument; the search space gave {value!r}.")
        return value
    try:
        return type(old)(value)
    except (TypeError, ValueError) as err:
        raise InvalidTrialError(f"`{key}`={value!r} does not fit the training argument (a {type(old).__name__}): {err}") from err


def _broadcast_from_main(obj: Any) -> Any:
    from accelerate.utils import broadcast_object_list

    payload = [obj]
    broadcast_object_list(payload, from_process=0)
    return payload[0]


class DendriteHPSearchMixin:
    """`hyperparameter_search` for `DendriticTrainer`: dendrite settings searched with Optuna (see the module docs).

    Relies on the trainer for `dendrite_config`, `to_dendritic_model(model)`, `dendrite_best_score`,
    `dendrite_schedule` and a `call_model_init` that starts a fresh schedule for each new model. Overrides, and why:

    - `hyperparameter_search`: runs the Optuna study itself, to report the schedule's best score, record each trial's
      dendrite summary, fail (not abort on) invalid trials, and keep several processes in step.
    - `call_model_init`: converts `model_init`'s plain model with the current trial's `DendriteConfig`.
    - `_hp_search_setup` (private in transformers): the trial's settings were applied before `train()`; this only
      does the rest of the Trainer's per-trial setup (batch size, accelerator).
    - `_report_to_hp_search` (private in transformers): decides pruning on the main process and broadcasts it, so
      every process stops the same trial.
    """

    # The last search's Optuna study (main process only).
    hp_search_study = None
    # Within a search: the settings it started from, and the running trial's parameters.
    _hp_base_dendrite_config: DendriteConfig | None = None
    _hp_original_args: dict[str, Any] | None = None
    _hp_trial_params: dict[str, Any] | None = None

    # ------------------------------------------------------------------ public API
    def hyperparameter_search(
        self,
        hp_space: Callable[[Any], dict[str, Any]] | None = None,
        compute_objective: Callable | None = None,
        n_trials: int = 20,
        direction: str | None = None,
        backend: str | Any | None = None,
        hp_name: Callable[[Any], str] | None = None,
        **kwargs,
    ):
        """Search dendrite settings and training arguments with Optuna; each trial runs the whole dendrite schedule.

        Args:
            hp_space: `trial -> dict` of settings; keys are `DendriteConfig` fields or training-argument fields.
                Defaults to `dendrite_hp_space`.
            compute_objective: not supported (must be None): the objective is the schedule's best score on
                `metric_for_best_model`.
            n_trials: number of trials.
            direction: "minimize" or "maximize"; defaults to the one `greater_is_better` implies, and must agree
                with it.
            backend: None or "optuna".
            hp_name: `trial -> str`, the name of the trial's folder under `output_dir` (default `run-<number>`).
            kwargs: `optuna.create_study` arguments (`sampler`, `pruner`, `storage`, `study_name`,
                `load_if_exists`) and `Study.optimize` arguments (`timeout`, `catch`, `callbacks`,
                `gc_after_trial`, `show_progress_bar`; `n_jobs` must be 1).

        Returns:
            `transformers.trainer_utils.BestRun`: `run_id` (the trial number), `objective` (its best score),
            `hyperparameters` (the dict `hp_space` returned for it) and `run_summary` (the Optuna `Study`, None on
            processes other than the main one). Rebuild the best model with `apply_hyperparameters` and `train()`.
        """
        from transformers.trainer_utils import BestRun, HPSearchBackend
        from transformers.training_args import ParallelMode

        if backend is not None and HPSearchBackend(backend) is not HPSearchBackend.OPTUNA:
            raise NotImplementedError(
                f"DendriticTrainer.hyperparameter_search supports the Optuna backend only, got {backend!r}: the "
                "schedule's objective, per-trial dendrite summaries and failed-trial handling are built on Optuna's "
                "trial API. Use backend='optuna' (pip install optuna)."
            )
        try:
            import optuna
        except ImportError as err:
            raise ImportError("hyperparameter_search needs Optuna: pip install optuna") from err
        if getattr(self, "is_deepspeed_enabled", False):
            raise NotImplementedError(
                "DendriticTrainer.hyperparameter_search does not run under DeepSpeed: a trial's arguments (batch size, "
                "learning rate) would need a DeepSpeed config of their own. Run the search with DDP or a single "
                "process, then train the chosen settings under DeepSpeed."
            )
        if getattr(self, "model_init", None) is None:
            raise RuntimeError(
                "hyperparameter_search needs `model_init`: pass DendriticTrainer(model_init=fn, ...) where fn() returns "
                "the plain transformers model; each trial converts a fresh one with its own DendriteConfig."
            )
        if compute_objective is not None:
            raise ValueError(
                "DendriticTrainer.hyperparameter_search optimises the dendrite schedule's best score on "
                f"`metric_for_best_model` ({self.args.metric_for_best_model!r}); it does not take `compute_objective`. "
                "Return the metric you want from `compute_metrics` and set `metric_for_best_model` / `greater_is_better`."
            )
        direction = self._hp_direction(direction)
        if kwargs.pop("n_jobs", 1) != 1:
            raise ValueError("`n_jobs` must be 1: the trials share one trainer and run one after another.")
        if self.args.world_size > 1 and self.args.parallel_mode != ParallelMode.DISTRIBUTED:
            raise RuntimeError("hyperparameter_search on several processes supports DDP (torchrun / accelerate launch) only.")
        optimize_kwargs = {k: kwargs.pop(k) for k in _OPTIMIZE_KWARGS if k in kwargs}
        catch = kwargs.pop("catch", ())
        catch = tuple(catch) if isinstance(catch, (list, tuple)) else (catch,)

        self.hp_search_backend = HPSearchBackend.OPTUNA
        self.hp_space = dendrite_hp_space if hp_space is None else hp_space
        self.hp_name = hp_name
        self.compute_objective = self._schedule_objective
        self._hp_base_dendrite_config = self.dendrite_config
        self._hp_original_args = {}
        try:
            if self.args.process_index == 0:
                best = self._run_study(optuna, n_trials, direction, catch, kwargs, optimize_kwargs)
            else:
                best = self._follow_study(optuna, catch)
            if self.args.world_size > 1:
                best = _broadcast_from_main(best)
        finally:
            self.hp_search_backend = None
            self._end_search()
        if "error" in best:  # no trial completed: the same error on every process
            raise RuntimeError(best["error"])
        return BestRun(
            run_id=best["run_id"], objective=best["objective"], hyperparameters=best["hyperparameters"],
            run_summary=self.hp_search_study if self.args.process_index == 0 else None,
        )

    def apply_hyperparameters(self, params: dict[str, Any]) -> None:
        """Set a trial's settings on this trainer, to rebuild its model with `train()` (which calls `model_init`).

        `params` is typically `BestRun.hyperparameters`: `DendriteConfig` fields replace those of the trainer's
        `dendrite_config`, training-argument fields are set on `args`; the rules are those of the search, and a key
        that is neither is an error. Call it on the trainer the search ran on (the search restores its settings
        when it ends), then `train()`: with the same seed the run repeats the trial.

        Example:
            >>> best = trainer.hyperparameter_search(n_trials=10)  # doctest: +SKIP
            >>> trainer.apply_hyperparameters(best.hyperparameters)  # doctest: +SKIP
            >>> trainer.train(); trainer.save_model("best-dendritic-model")  # doctest: +SKIP
        """
        config, arg_updates = self._split_hyperparameters(params, self.dendrite_config)
        for key, value in arg_updates.items():
            setattr(self.args, key, value)
        self.dendrite_config = config
        self._train_batch_size = self.args.train_batch_size
        self.create_accelerator_and_postprocess()

    # ------------------------------------------------------------------ Trainer overrides
    def call_model_init(self, trial=None):
        """Build `model_init`'s model and convert it with the current `dendrite_config` (the trial's during a
        search); a conversion error of a trial's config fails that trial only. (`DendriticTrainer.call_model_init`
        runs this, then starts a fresh dendrite schedule for the new model.)"""
        model = super().call_model_init(trial)
        from .model import DendriticModel

        searching = self._hp_trial_params is not None
        if searching and isinstance(model, DendriticModel) and DENDRITE_CONFIG_FIELDS & set(self._hp_trial_params):
            raise ValueError(
                "model_init returned a DendriticModel, so the searched DendriteConfig fields "
                f"{sorted(DENDRITE_CONFIG_FIELDS & set(self._hp_trial_params))} cannot apply: return the plain "
                "transformers model and pass the fixed settings as DendriticTrainer(dendrite_config=...)."
            )
        try:
            model = self.to_dendritic_model(model)
        except ValueError as err:
            if not searching:
                raise
            raise InvalidTrialError(f"The trial's DendriteConfig does not fit the model: {err}") from err
        if getattr(self, "callback_handler", None) is not None:  # None while Trainer.__init__ builds the first model
            self.callback_handler.model = model  # callbacks see this model, not the first one model_init built
        return model

    def _hp_search_setup(self, trial) -> None:
        """Replaces `Trainer._hp_search_setup`, which would set every key of `hp_space(trial)` on `args` (a
        `DendriteConfig` key only warned about, a scalar for a list-valued schedule argument failing its cast).
        The trial's settings were applied before `train()` started; what remains is the Trainer's per-trial setup:
        the batch size and a new accelerator for the trial's arguments."""
        self._trial = trial
        if self.hp_search_backend is None or trial is None:
            return
        logger.info("Trial %s: %s", trial.number, self._hp_trial_params)
        self._train_batch_size = self.args.train_batch_size
        self.create_accelerator_and_postprocess()

    def _report_to_hp_search(self, trial, step: int, metrics: dict[str, float]) -> None:
        """Report the evaluation's score to Optuna and prune when its pruner says so. The main process decides and
        broadcasts, so that every process stops the same trial at the same step."""
        if self.hp_search_backend is None or trial is None:
            return
        import optuna

        self.objective = self.compute_objective(metrics)
        prune = False
        if self.args.process_index == 0 and hasattr(trial, "study"):
            trial.report(self.objective, step)
            prune = trial.should_prune()
        if self.args.world_size > 1:
            prune = _broadcast_from_main(prune)
        if prune:
            self.callback_handler.on_train_end(self.args, self.state, self.control)
            raise optuna.TrialPruned(f"pruned at step {step} (score {self.objective})")

    # ------------------------------------------------------------------ the study
    def _hp_direction(self, direction: str | None) -> str:
        implied = "maximize" if self.args.greater_is_better else "minimize"
        if direction is None:
            return implied
        if not isinstance(direction, str) or direction not in ("minimize", "maximize"):
            raise ValueError(
                f"`direction` must be 'minimize' or 'maximize' (multi-objective searches are not supported), got {direction!r}."
            )
        if direction != implied:
            raise ValueError(
                f"direction={direction!r} contradicts greater_is_better={self.args.greater_is_better} for "
                f"metric_for_best_model={self.args.metric_for_best_model!r}, which the dendrite schedule optimises: "
                "leave `direction` unset, or fix `greater_is_better`."
            )
        return direction

    def _schedule_objective(self, metrics: dict[str, float]) -> float:
        key = self.args.metric_for_best_model
        key = key if key.startswith("eval_") else f"eval_{key}"
        if key not in metrics:
            raise KeyError(
                f"The search reports `metric_for_best_model` ({key!r}), which the evaluation did not return; it "
                f"returned {sorted(metrics)}. Set `metric_for_best_model` to one of those."
            )
        return float(metrics[key])

    def _run_study(self, optuna, n_trials, direction, catch, study_kwargs, optimize_kwargs) -> dict[str, Any]:
        """Main process: run the study; tell the other processes each trial's settings, then to stop."""
        distributed = self.args.world_size > 1
        study = optuna.create_study(direction=direction, **study_kwargs)
        self.hp_search_study = study

        def objective(trial) -> float:
            try:
                params = self.hp_space(trial)
                config, arg_updates = self._split_hyperparameters(params, self._hp_base_dendrite_config)
            except InvalidTrialError as err:
                trial.set_user_attr("error", str(err))
                raise
            except Exception as err:
                if distributed:  # the other processes wait for this trial's settings: stop them too
                    _broadcast_from_main({"abort": str(err)})
                raise
            if distributed:
                _broadcast_from_main({"number": trial.number, "params": params, "suggested": dict(trial.params)})
            return self._run_trial(optuna, trial, params, config, arg_updates)

        study.optimize(objective, n_trials=n_trials, catch=(InvalidTrialError, *catch), **optimize_kwargs)
        if distributed:
            _broadcast_from_main({"stop": True})
        complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if not complete:
            states = sorted({t.state.name for t in study.trials})
            return {
                "error": f"No trial of the search completed (trial states: {states}). A failed trial's reason is in its "
                "user attribute 'error' (the study is `trainer.hp_search_study`) and in the log."
            }
        best = study.best_trial
        return {"run_id": str(best.number), "objective": best.value, "hyperparameters": best.user_attrs.get("hyperparameters", best.params)}

    def _follow_study(self, optuna, catch) -> None:
        """Other processes: train every trial the main process announces, with the same settings."""
        while True:
            message = _broadcast_from_main(None)
            if "stop" in message:
                return
            if "abort" in message:
                raise ValueError(message["abort"])
            trial = optuna.trial.FixedTrial(message["suggested"], message["number"])
            self.hp_space(trial)  # fills trial.params, which model_init(trial) may read, as on the main process
            config, arg_updates = self._split_hyperparameters(message["params"], self._hp_base_dendrite_config)
            try:
                self._run_trial(optuna, trial, message["params"], config, arg_updates)
            except (optuna.TrialPruned, InvalidTrialError, *catch) as err:
                logger.info("Trial %d ended on this process: %s", trial.number, err)

    def _run_trial(self, optuna, trial, params, config: DendriteConfig, arg_updates: dict[str, Any]) -> float:
        """Apply the trial's settings, run the schedule, and return its best score (all processes)."""
        for key, value in self._hp_original_args.items():  # start from the search's base settings
            setattr(self.args, key, value)
        for key, value in arg_updates.items():
            self._hp_original_args.setdefault(key, getattr(self.args, key))
            setattr(self.args, key, value)
        self.dendrite_config = config
        self._hp_trial_params = params
        self.objective = None
        self._release_trial_model()
        run_dir = self._get_output_dir(trial)
        existed = os.path.exists(run_dir)
        try:
            self.train(trial=trial)
        except optuna.TrialPruned:
            if hasattr(trial, "set_user_attr"):
                trial.set_user_attr("pruned_at_step", int(self.state.global_step))
                trial.set_user_attr("hyperparameters", params)
            if self.args.should_save and not existed:
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
        except InvalidTrialError as err:
            if hasattr(trial, "set_user_attr"):
                trial.set_user_attr("error", str(err))
            raise
        finally:
            self._hp_trial_params = None
            self.is_in_train = False  # also after a pruned trial: a later evaluate() must not feed the schedule
        score = self.dendrite_best_score
        if score is None:  # no evaluation during training (e.g. max_steps < eval_steps)
            score = self.compute_objective(self.evaluate())
        self.objective = score
        if hasattr(trial, "set_user_attr"):
            for key, value in self._trial_summary(config, params).items():
                trial.set_user_attr(key, value)
        return score

    def _release_trial_model(self) -> None:
        """Drop the previous model and its training objects before `model_init` builds the trial's model, so that
        one model at a time is in (accelerator) memory, not two; transformers' own search frees each trial's model
        as well. Every reference is dropped: the accelerator's lists and the callback handler's too."""
        from accelerate.utils.memory import clear_device_cache

        self.accelerator.free_memory()
        self.model = self.model_wrapped = None
        self.optimizer = self.lr_scheduler = None
        for attr in ("model", "optimizer", "lr_scheduler"):
            setattr(self.callback_handler, attr, None)
        clear_device_cache(garbage_collection=True)

    def _trial_summary(self, config: DendriteConfig, params: dict[str, Any]) -> dict[str, Any]:
        summary = self.model.dendrite_summary()
        history = self.dendrite_schedule.history
        return {
            "best_score": self.dendrite_best_score,
            "kept_cycles": sum(1 for h in history if h.cycle > 0 and h.accepted),
            "tried_cycles": sum(1 for h in history if h.cycle > 0),
            "schedule_completed": bool(self.dendrite_schedule.done),
            "num_dendrites": summary.num_dendrites,
            "dendrite_params": summary.dendrite_params,
            "base_params": summary.base_params,
            "total_params": summary.total_params,
            "dendrite_config": config.to_dict(),
            "hyperparameters": params,
        }

    def _split_hyperparameters(self, params: dict[str, Any], base: DendriteConfig | None) -> tuple[DendriteConfig, dict[str, Any]]:
        """`params` -> (the trial's DendriteConfig, typed training-argument updates). Unknown or unsearchable keys
        raise `ValueError`; invalid values `InvalidTrialError`."""
        if not isinstance(params, dict):
            raise TypeError(f"`hp_space` must return a dict of settings, got {type(params).__name__}.")
        arg_fields = {f.name for f in dataclasses.fields(self.args)}
        unknown = sorted(k for k in params if k not in DENDRITE_CONFIG_FIELDS and k not in arg_fields)
        if unknown:
            raise ValueError(
                f"Search-space keys {unknown} are neither DendriteConfig fields nor fields of "
                f"{type(self.args).__name__}. Use field names (e.g. 'dendrite_seed' for the dendrites' seed, 'seed' for "
                "training), or read model settings in model_init(trial) instead of returning them from hp_space."
            )
        fixed = sorted(UNSEARCHABLE_ARGUMENTS & set(params))
        if fixed:
            raise ValueError(
                f"{fixed} cannot be searched: they define the objective that every trial is compared on. Set them on "
                "the training arguments."
            )
        config = dendrite_config_from_params(base, params)
        updates = {k: _cast_argument(self.args, k, v) for k, v in params.items() if k not in DENDRITE_CONFIG_FIELDS}
        trial_args = copy.copy(self.args)
        for key, value in updates.items():
            setattr(trial_args, key, value)
        if hasattr(trial_args, "dendrite_schedule_settings"):
            try:
                trial_args.dendrite_schedule_settings()
            except ValueError as err:
                raise InvalidTrialError(f"Invalid dendrite schedule arguments {updates}: {err}") from err
        return config, updates

    def _end_search(self) -> None:
        """Put back the settings the search started from."""
        touched = bool(self._hp_original_args)
        for key, value in (self._hp_original_args or {}).items():
            setattr(self.args, key, value)
        self.dendrite_config = self._hp_base_dendrite_config
        self._hp_original_args = None
        self._hp_trial_params = None
        if touched:
            self._train_batch_size = self.args.train_batch_size
            self.create_accelerator_and_postprocess()
