"""Running the arms of `compare`: the shared context, one run per (arm, seed), resume and worker processes."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..utils import atomic_write_text, library_version, read_json_file
from . import models as M
from .data import Splits, load_splits, preprocess
from .settings import ARMS, LORA_ARMS, CompareSettings

logger = logging.getLogger(__name__)

SETTINGS_NAME = "compare_settings.json"
RUNS_DIR = "runs"
RESTARTS_FIELD = "dendrite_restarts_only"
# A replaying arm replays the growth / retry steps of the run with the same seed of the first of its arms that the
# compare trains (baseline-restarts of frozen-dendrites: the head alone with the low-rank dendritic run's restarts).
REPLAYS = {"baseline-restarts": ("dendrites", "frozen-dendrites"), "lora-restarts": ("lora-dendrites",)}


def replays_dendritic_run(s: CompareSettings) -> bool:
    """Whether baseline-restarts replays the dendrites run's restart steps. Not with --lr-search: each LR
    candidate trains to its own plateau, so those steps cannot be replayed; the control then runs the same recipe
    (restarts at its own plateaus, the same restart-LR search) instead."""
    return not s.lr_search


def replayed_arm(arms: list[str], replaying: str = "baseline-restarts") -> str | None:
    """The arm whose runs `replaying` replays (baseline-restarts: `dendrites` if trained, else `frozen-dendrites`;
    lora-restarts: `lora-dendrites`), or None."""
    return next((a for a in REPLAYS[replaying] if a in arms), None)


def run_path(output_dir: str, arm: str, seed: int, lr: float | None = None) -> str:
    """runs/<arm>/seed-<k>.json, or runs/<arm>/lr-<lr>/seed-<k>.json for a run of --lr-grid."""
    parts = [output_dir, RUNS_DIR, arm] + ([f"lr-{lr:g}"] if lr is not None else [])
    return os.path.join(*parts, f"seed-{seed}.json")


# ---------------------------------------------------------------------------------------------- context
@dataclass
class Context:
    """What every run of one compare shares: settings, data (preprocessed once per process) and the
    parameter budgets of the matched arms."""

    settings: CompareSettings
    splits: Splits
    train: Any
    validation: Any
    test: Any
    processing_class: Any
    collator: Any
    arms: list[str]
    skipped: dict[str, str]  # arm -> why it does not apply (only for the default arm list)
    budgets: dict[str, Any]

    @property
    def num_labels(self) -> int:
        return len(self.splits.label_names)


def arm_applicability(s: CompareSettings, num_labels: int) -> tuple[dict[str, str], dict[str, Any]]:
    """(arm -> reason it does not apply, parameter budgets), decided on a weightless (meta) copy of the model.

    Budgets: `wider_units` (MLP units added per block) with the dendrite parameters they match, and
    `lora_rank` with the frozen-dendrites parameters it matches.
    """
    reasons: dict[str, str] = {}
    budgets: dict[str, Any] = {}
    meta = M.build_model_on_meta(s, num_labels)
    try:
        config = M.dendrite_config(s, meta, seed=0)
        from ..model import resolve_target_modules

        targets = resolve_target_modules(meta, config)
    except (ValueError, TypeError) as err:
        raise ValueError(f"--targets {s.targets!r}: {err}") from err
    if s.rank is not None:
        reasons["correlation"] = "the correlation rule needs full-shape dendrites; drop --rank"
    if s.max_cycles == 0:
        for arm in ("baseline-restarts", "wider", "dendrites", "dendrites-only-phase", "correlation", "frozen-dendrites", "lora"):
            reasons.setdefault(arm, "--max-cycles 0 adds no dendrites")
    try:
        layout = M.find_mlp(meta)
        added = M.dendrite_params_added(M.build_model_on_meta(s, num_labels), config, s.max_cycles)
        budgets["dendrite_params"] = added
        budgets["wider_units"] = M.wider_units(layout, added) if added else 0
        budgets["wider_params_per_unit"] = layout.params_per_unit
    except ValueError as err:
        reasons.setdefault("wider", f"arm does not apply to this model: {err}")
    if s.freeze_base:
        reasons.setdefault("wider", "with --freeze-base the MLP is frozen, so extra units would never train")
    for arm in ("frozen-dendrites", "lora", *LORA_ARMS):
        # LoRA of --lora-rank needs no task head: with causal-lm only LoRA (and dendrites) train
        if s.task == "causal-lm" and (arm == "frozen-dendrites" or (arm == "lora" and s.lora_rank is None)):
            reasons.setdefault(arm, "the frozen-base arms train a classification head; causal-lm has none "
                                    "(the LoRA arms with --lora-rank apply)")
        elif s.from_scratch:
            reasons.setdefault(arm, "a frozen base needs pretrained weights (drop --from-scratch)")
    for arm in ("lora", *LORA_ARMS):
        if arm not in reasons:
            try:
                import peft  # noqa: F401
            except ImportError:
                reasons[arm] = "needs PEFT: pip install peft"
    if s.max_cycles == 0:
        for arm in LORA_ARMS:
            reasons.setdefault(arm, "--max-cycles 0 adds no dendrites")
    if any(a not in reasons for a in LORA_ARMS):
        try:
            budgets.update(lora_family_budgets(s, num_labels, config, targets))
        except ValueError as err:
            for arm in LORA_ARMS:
                reasons.setdefault(arm, f"arm does not apply to this model: {err}")
    if s.lora_rank is not None:
        budgets["lora_rank"] = s.family_lora_rank()
        budgets["lora_targets"] = targets
    elif "lora" not in reasons or "frozen-dendrites" not in reasons:
        frozen_cfg = dataclasses.replace(config, rank=s.frozen_rank)
        frozen_added = M.dendrite_params_added(M.build_model_on_meta(s, num_labels), frozen_cfg, s.max_cycles)
        budgets["frozen_dendrite_params"] = frozen_added
        try:
            budgets["lora_rank"] = M.lora_rank_for(meta, targets, frozen_added)
            budgets["lora_targets"] = targets
        except ValueError as err:
            reasons.setdefault("lora", f"arm does not apply to this model: {err}")
    return reasons, budgets


def lora_family_budgets(s: CompareSettings, num_labels: int, config, targets: list[str]) -> dict[str, Any]:
    """The lora-* arms' sizes, counted on weightless (meta) copies: `family_lora_rank`, `lora_dendrite_params` (what
    --max-cycles growths of dendrites on LoRA's layers add), `lora_rank_step` (trainable parameters of one more
    LoRA rank) and `lora_wider_rank`, the rank whose trainable parameters come closest to LoRA of
    `family_lora_rank` plus those dendrites (lora-dendrites' largest count)."""
    rank = s.family_lora_rank()
    meta = M.build_model_on_meta(s, num_labels)
    step = M.lora_rank_for(meta, targets, 0, per_rank_only=True)
    with torch.device("meta"):
        M.add_lora(meta, targets, rank)
    on_lora = dataclasses.replace(config, target_modules=list(M.LORA_LAYERS))
    added = M.dendrite_params_added(meta, on_lora, s.max_cycles)
    return {"family_lora_rank": rank, "lora_dendrite_params": added, "lora_rank_step": step,
            "lora_wider_rank": rank + max(1, int(round(added / step))), "lora_targets": targets}


def choose_arms(s: CompareSettings, reasons: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """The arms to run: --arms (each must apply), or every arm that applies."""
    if s.arms is not None:
        bad = [a for a in s.arms if a in reasons]
        if bad:
            raise ValueError(
                "Arm(s) that do not apply: " + "; ".join(f"{a}: {reasons[a]}" for a in bad) + ". Leave them out of --arms."
            )
        arms = list(dict.fromkeys(s.arms))
        for replaying, sources in REPLAYS.items():
            if replaying in arms and replayed_arm(arms, replaying) is None and replays_dendritic_run(s):
                raise ValueError(
                    f"{replaying} replays the growth and retry steps of the dendritic run with the same seed: add "
                    f"{' or '.join(sources)} to --arms."
                )
        return arms, {}
    # by default the lora-* arms only when --lora-rank asks for them (each adds a run per seed)
    if s.lora_rank is None:
        reasons.update({a: "not asked for (pass --lora-rank or name it in --arms)" for a in LORA_ARMS if a not in reasons})
    arms = [a for a in ARMS if a not in reasons]
    return arms, {a: r for a, r in reasons.items()}


def check_dependencies() -> None:
    """compare needs `datasets` (data) and `scipy` (intervals, tests): fail before training, not after it."""
    import importlib.util

    missing = [name for name in ("datasets", "scipy") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"hf-dendrites compare needs {' and '.join(missing)}: pip install {' '.join(missing)}")


def build_context(s: CompareSettings) -> Context:
    """Load and check the data and the arms (every bad-input error is raised here, before any training)."""
    check_dependencies()
    splits = load_splits(s)
    reasons, budgets = arm_applicability(s, len(splits.label_names))
    arms, skipped = choose_arms(s, reasons)
    train, validation, test, processing_class, collator = preprocess(splits, s, s.model)
    return Context(s, splits, train, validation, test, processing_class, collator, arms, skipped, budgets)


# ---------------------------------------------------------------------------------------------- one run
class BestTracker:
    """Follows the validation score of a run: keeps a CPU copy of the weights (and dendrite counts) at its best
    evaluation, for runs that hit --max-steps before the schedule completed (then those weights are scored, as
    `load_best_model_at_end` would), and with `test_dataset` scores the test data at every new best.

    `entries` lists every evaluation during training: `step`, `val` and `test` (None unless a new best), so the test
    score of any model the run may end with (cycle 0's best = the baseline at its plateau, a later cycle's best) is
    known without scoring the test data at every evaluation; validation alone drives every decision. The test data
    is scored with `trainer.predict`, which (unlike `evaluate`) does not reach the schedule's `on_evaluate`.
    """

    def __init__(self, metric: str, greater_is_better: bool, test_dataset=None, keep_weights: bool = True):
        from transformers import TrainerCallback

        self.key, self.test_key, self.greater = f"eval_{metric}", f"test_{metric}", greater_is_better
        self.test_dataset, self.keep_weights = test_dataset, keep_weights
        self.best: float | None = None
        self.state: dict | None = None
        self.counts: dict | None = None
        self.entries: list[dict[str, Any]] = []
        self.trainer = None
        outer = self

        class Callback(TrainerCallback):
            def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
                outer._seen(metrics or {}, state.global_step)

        self.callback = Callback()

    def _seen(self, metrics: dict, step: int) -> None:
        if self.trainer is None or not self.trainer.is_in_train or self.key not in metrics:
            return
        score = float(metrics[self.key])
        entry = {"step": step, "val": score, "test": None}
        if self.best is None or (score > self.best if self.greater else score < self.best):
            self.best = score
            if self.keep_weights:
                dm = self.trainer.model
                self.counts = dm.dendrite_counts()
                self.state = {k: v.detach().to("cpu", copy=True) for k, v in dm.state_dict().items()}
            if self.test_dataset is not None:
                entry["test"] = float(self.trainer.predict(self.test_dataset, metric_key_prefix="test").metrics[self.test_key])
        self.entries.append(entry)

    def best_entry(self, steps: set[int] | None = None) -> dict[str, Any] | None:
        """The evaluation with the best validation score (among `steps`, if given)."""
        best = None
        for e in self.entries:
            if (steps is None or e["step"] in steps) and (
                    best is None or (e["val"] > best["val"] if self.greater else e["val"] < best["val"])):
                best = e
        return best


@dataclass
class TrainedRun:
    """What `train_and_score` returns: the trainer, its `BestTracker`, the final model's validation and test
    metrics, whether the schedule completed, and the training time."""

    trainer: Any
    tracker: BestTracker
    validation: dict[str, float]
    test: dict[str, float]
    completed: bool
    seconds: float


def train_and_score(model, args, train, validation, test=None, *, task: str = "text-classification",
                    processing_class=None, data_collator=None, dendrite_config=None, test_at_best: bool = False,
                    quiet: bool = True) -> TrainedRun:
    """Train `model` (a `DendriticModel`, or a model with `dendrite_config`) with `DendriticTrainer` on `train`, the
    `validation` data driving the schedule (`args.metric_for_best_model`), then score the final model.

    The final model is the one the schedule restored (its accepted best) when it completed; when training ran out of
    steps first, the weights of the best validation evaluation. Both splits are scored after training
    (`trainer.evaluate`); the test data never influences a decision. `test_at_best` also scores the test data at
    every new best validation score (`tracker.entries`). What `compare` and the benchmark suite train with.
    """
    from transformers.trainer_callback import PrinterCallback

    from ..trainer import DendriticTrainer

    start = time.perf_counter()
    metric = args.metric_for_best_model
    tracker = BestTracker(metric, bool(args.greater_is_better), test if test_at_best else None)
    trainer = DendriticTrainer(
        model, args, train_dataset=train, eval_dataset=validation, **metric_functions(task),
        processing_class=processing_class, data_collator=data_collator, callbacks=[tracker.callback],
        dendrite_config=dendrite_config,
    )
    if quiet:
        trainer.remove_callback(PrinterCallback)  # no per-step dict printing
    tracker.trainer = trainer
    trainer.train()
    seconds = time.perf_counter() - start
    dm = trainer.dendritic_model
    completed = bool(trainer.dendrite_schedule.done)
    if not completed and tracker.state is not None:
        # out of steps before the schedule ended: score the best validation checkpoint
        dm.set_dendrite_counts(tracker.counts)
        dm.load_state_dict(tracker.state, strict=True)
    val = trainer.evaluate()
    scored = trainer.evaluate(test, metric_key_prefix="test") if test is not None else {}
    return TrainedRun(trainer, tracker, val, scored, completed, seconds)


def arm_model(ctx: Context, arm: str, seed: int):
    """(DendriticModel, training-argument overrides, extra record fields) for one arm and seed (at any LR of
    --lr-grid: a replaying arm replays its source's run at the LR chosen for that source).

    The model is built after seeding with `seed`, so every arm starts from the same weights for a seed (the wider
    arm's extra units aside); the overrides go to `training_arguments`.
    """
    from transformers import set_seed

    from ..model import get_dendritic_model

    s, b = ctx.settings, ctx.budgets
    set_seed(seed)
    extra: dict[str, Any] = {}
    overrides: dict[str, Any] = {}
    if arm == "wider" and s.from_scratch:
        model = M.build_model(s, ctx.num_labels, extra_mlp=b["wider_units"])
    else:
        model = M.build_model(s, ctx.num_labels)
    config = M.dendrite_config(s, model, seed)
    if arm == "baseline":
        overrides["max_dendrite_cycles"] = 0
    elif arm in ("baseline-restarts", "lora-restarts") and not replays_dendritic_run(s):
        overrides[RESTARTS_FIELD] = True
        extra["recipe"] = "restarts at its own plateaus, with the same restart-LR search"
    elif arm in REPLAYS:
        # The control for the dendritic run of this seed: its restarts at its growth / retry steps, its step count.
        source = replayed_arm(ctx.arms, arm)
        replayed, source_lr = replayed_run(ctx, source, seed) if source else (None, None)
        if replayed is None:
            source = source or REPLAYS[arm][0]
            raise ValueError(
                f"{arm} (seed {seed}) replays the {source} arm's run with the same seed, which is not finished in "
                f"{os.path.join(s.output_dir, RUNS_DIR, source)}: train that arm first."
            )
        overrides.update({RESTARTS_FIELD: True, "dendrite_restart_steps": list(replayed["growth_steps"]),
                          "max_steps": int(replayed["steps"])})
        extra.update(recipe=f"restarts of the {source} run replayed", replayed_arm=source)
        if source_lr is not None:
            extra["replayed_learning_rate"] = source_lr
    elif arm == "lora" and s.lora_rank is not None:
        overrides["max_dendrite_cycles"] = 0
        extra["recipe"] = "stop at first plateau"
    elif arm in ("wider", "lora", "lora-wider"):
        overrides[RESTARTS_FIELD] = True
        extra["recipe"] = "restarts"
    if arm == "wider":
        if not s.from_scratch:
            M.widen_mlp(model, b["wider_units"], generator=torch.Generator().manual_seed(seed))
        extra.update(wider_units=b["wider_units"], matched_dendrite_params=b["dendrite_params"])
    elif arm == "dendrites-only-phase":
        overrides["dendrites_only_phase"] = True
    elif arm == "correlation":
        config = dataclasses.replace(config, learning_rule="correlation")
    if arm in LORA_ARMS or (arm == "lora" and s.lora_rank is not None):
        # LoRA of --lora-rank (lora-wider: the matched rank) on the target layers; the base frozen, the head trains
        rank = b["lora_wider_rank"] if arm == "lora-wider" else s.family_lora_rank()
        # the task head trains; a causal LM's head stays frozen (often tied to the embeddings): only LoRA trains
        heads = [] if s.task == "causal-lm" else M.head_module_names(model)
        M.add_lora(model, b["lora_targets"], rank)
        M.freeze_base(model, heads + M.lora_module_names(model))
        extra["lora_rank"] = rank
        if arm == "lora-dendrites":
            config = dataclasses.replace(config, target_modules=list(M.LORA_LAYERS))
        elif arm == "lora-base-dendrites":
            config = dataclasses.replace(config, target_modules=list(b["lora_targets"]))
        else:  # the dendrite wrapper goes on the head (or LoRA's layers) only: no dendrites ever grow in these arms
            config = dataclasses.replace(config, target_modules=heads or list(M.LORA_LAYERS))
        if arm == "lora-wider":
            extra.update(matched_dendrite_params=b["lora_dendrite_params"], lora_rank_step=b["lora_rank_step"])
    elif arm in ("frozen-dendrites", "lora"):
        heads = M.head_module_names(model)
        config = dataclasses.replace(config, rank=s.frozen_rank)
        if arm == "lora":
            M.add_lora(model, b["lora_targets"], b["lora_rank"])
            heads = heads + M.lora_module_names(model)
            extra.update(lora_rank=b["lora_rank"], matched_dendrite_params=b["frozen_dendrite_params"])
            # the dendrite wrapper goes on the head only: no dendrites ever grow in this arm
            config = dataclasses.replace(config, target_modules=M.head_module_names(model))
        M.freeze_base(model, heads)
    elif s.freeze_base or (arm == "baseline-restarts" and replayed_arm(ctx.arms) == "frozen-dendrites"):
        # every other arm: only the task head trains (dendrites grown later always train); the control of the
        # frozen-dendrites arm is the head alone with its restarts
        M.freeze_base(model, M.head_module_names(model))
    dm = get_dendritic_model(model, config)
    return dm, overrides, extra


def replayed_run(ctx: Context, source: str, seed: int) -> tuple[dict[str, Any] | None, float | None]:
    """(the finished run of arm `source` with this seed that a replaying arm replays, its LR): with --lr-grid the run
    at the LR chosen for `source` on validation (every seed of it must be finished)."""
    s = ctx.settings
    if not s.lr_grid:
        return finished_run(s, source, seed), None
    runs = {(source, k, lr): finished_run(s, source, k, lr) for k in s.seed_values() for lr in s.lr_grid}
    if any(r is None for r in runs.values()):
        return None, None
    lr = choose_learning_rates(list(runs.values()), [source], s.metric)[source]["chosen"]
    return runs[(source, seed, lr)], lr


def validation_value(record: dict[str, Any], metric: str) -> float:
    """The validation number a decision reads: the loss (lower is better) or the accuracy (higher is better)."""
    return float(record["validation_loss"] if metric == "loss" else record["validation_score"])


def choose_learning_rates(records: list[dict[str, Any]], arms: list[str], metric: str) -> dict[str, dict[str, Any]]:
    """Per arm: the LR whose runs have the best mean validation `metric` over their seeds (the first LR of the grid
    on a tie). Only validation numbers are read. Returns {arm: {"chosen": lr, "validation": {lr: mean}, "seeds": n}}."""
    out: dict[str, dict[str, Any]] = {}
    for arm in arms:
        by_lr: dict[float, list[float]] = {}
        for r in records:
            if r["arm"] == arm:
                by_lr.setdefault(float(r["learning_rate"]), []).append(validation_value(r, metric))
        if not by_lr:
            continue
        means = {lr: float(np.mean(v)) for lr, v in by_lr.items()}
        sign = -1.0 if metric == "accuracy" else 1.0
        chosen = min(means, key=lambda lr: sign * means[lr])  # min() keeps the first of equal values
        out[arm] = {"chosen": chosen, "validation": means, "seeds": min(len(v) for v in by_lr.values())}
    return out


def training_arguments(s: CompareSettings, out: str, seed: int, **overrides):
    """The `DendriticTrainingArguments` every arm shares (same seed, data order, evaluation points and budget),
    with the arm's `overrides`. No checkpoints: the schedule keeps its best weights in memory. Dataset columns
    are prepared by `data.preprocess`, so none is dropped by the model's forward signature (the LoRA and DSN
    models have other signatures)."""
    kw = dict(
        seed=seed, data_seed=seed, learning_rate=s.learning_rate, lr_scheduler_type=s.lr_scheduler_type,
        per_device_train_batch_size=s.batch_size, per_device_eval_batch_size=s.eval_batch_size, max_steps=s.max_steps,
        eval_steps=s.eval_steps, logging_strategy="no", metric_for_best_model=s.metric,
        greater_is_better=s.metric == "accuracy", dendrite_patience=s.patience, dendrite_improvement_threshold=s.threshold,
        dendrite_improvement_epsilon=s.epsilon, max_dendrite_cycles=s.max_cycles, max_dendrite_tries=s.max_tries,
        remove_unused_columns=False, label_names=["labels"], log_level="error",
    )
    if s.lr_search:
        kw["dendrite_lr_search"] = list(s.lr_search)
    if s.cycle_steps is not None:
        kw["dendrite_cycle_steps"] = int(s.cycle_steps)
    kw.update(overrides)
    return common_training_arguments(out, **kw)


def common_training_arguments(output_dir: str, **overrides):
    """`DendriticTrainingArguments` with what every comparison run shares (`compare`'s arms, the benchmark suite):
    evaluations every `eval_steps`, no checkpoints (the schedule keeps its best weights in memory), no external
    loggers or progress bars, no data-loading workers, the GPU when there is one; `overrides` on top."""
    from ..trainer import DendriticTrainingArguments

    kw = dict(output_dir=output_dir, eval_strategy="steps", save_strategy="no", report_to=[], disable_tqdm=True,
              dataloader_num_workers=0, use_cpu=not torch.cuda.is_available())
    kw.update(overrides)
    return DendriticTrainingArguments(**kw)


def _accuracy(eval_pred) -> dict[str, float]:
    logits, labels = eval_pred
    logits = logits[0] if isinstance(logits, tuple) else logits
    return {"accuracy": float((np.asarray(logits).argmax(-1) == np.asarray(labels)).mean())}


def _predicted_tokens(logits, labels):
    """causal-lm: keep only the argmax token of every position (the full logits would fill memory)."""
    logits = logits[0] if isinstance(logits, tuple) else logits
    return logits.argmax(-1)


def _next_token_accuracy(eval_pred) -> dict[str, float]:
    """Share of positions whose predicted next token is the real one (labels shifted as the model's loss does)."""
    predicted, labels = (np.asarray(v) for v in eval_pred)
    predicted, labels = predicted[:, :-1], labels[:, 1:]
    mask = labels != -100
    return {"accuracy": float((predicted[mask] == labels[mask]).mean()) if mask.any() else math.nan}


def metric_functions(task: str) -> dict[str, Any]:
    """The Trainer's compute_metrics (and, for causal-lm, preprocess_logits_for_metrics) of a task."""
    if task == "causal-lm":
        return {"compute_metrics": _next_token_accuracy, "preprocess_logits_for_metrics": _predicted_tokens}
    return {"compute_metrics": _accuracy}


def run_one(ctx: Context, arm: str, seed: int, lr: float | None = None) -> dict[str, Any]:
    """Train one arm with one seed (at `lr` of --lr-grid, else --learning-rate) and return its record (also written
    atomically to `run_path`)."""
    s = ctx.settings
    start = time.perf_counter()
    dm, overrides, extra = arm_model(ctx, arm, seed)
    path = run_path(s.output_dir, arm, seed, lr)
    scratch = path[: -len(".json")] + "-trainer"
    if lr is not None:
        overrides["learning_rate"] = lr
    args = training_arguments(s, scratch, seed, **overrides)
    run = train_and_score(dm, args, ctx.train, ctx.validation, ctx.test, task=s.task,
                          processing_class=ctx.processing_class, data_collator=ctx.collator)
    trainer, val, test, completed = run.trainer, run.validation, run.test, run.completed
    summary = dm.dendrite_summary()
    trainable = sum(p.numel() for p in {id(p): p for p in dm.parameters() if p.requires_grad}.values())
    history = trainer.dendrite_history
    record = {
        "arm": arm,
        "seed": seed,
        "learning_rate": float(args.learning_rate),
        "test_score": test.get("test_accuracy"),
        "test_loss": test.get("test_loss"),
        "validation_score": val.get("eval_accuracy"),
        "validation_loss": val.get("eval_loss"),
        **({"test_perplexity": _perplexity(test.get("test_loss")), "validation_perplexity": _perplexity(val.get("eval_loss"))}
           if s.task == "causal-lm" else {}),
        "params": summary.total_params,
        "trainable_params": trainable,
        "dendrite_params": summary.dendrite_params,
        "dendrites_kept": summary.num_dendrites,
        "steps": int(trainer.state.global_step),
        "completed": completed,
        "curve": [{"step": r["step"], "score": r["score"], "cycle": r.get("cycle"), "decision": r.get("decision")} for r in history],
        "growth_steps": [r["step"] for r in history if r.get("decision") in ("grow", "retry")],
        # per cycle try, with a kept cycle's attribution: its dendrites' weight ratio and the validation score of the
        # kept model with them switched off (ablation_delta > 0: the dendrites help)
        "cycles": [{k: r.get(k) for k in ("cycle", "try", "status", "best_score", "best_step", "num_dendrites",
                                          "dendrite_weight", "ablation_score", "ablation_delta")}
                   for r in trainer.dendrite_callback.cycle_rows()],
        "seconds": round(time.perf_counter() - start, 2),
        "settings_fingerprint": s.fingerprint(),
        **extra,
    }
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=1, default=_json_default) + "\n")
    return record


def _perplexity(loss: float | None) -> float | None:
    return None if loss is None else float(math.exp(min(loss, 700.0)))


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# ---------------------------------------------------------------------------------------------- resume
def check_output_dir(s: CompareSettings) -> None:
    """Refuse an output folder that holds runs made with other settings; record this compare's settings."""
    path = os.path.join(s.output_dir, SETTINGS_NAME)
    mine = s.run_defining()
    if os.path.isfile(path):
        theirs = read_json_file(path).get("settings", {})
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if diff:
            shown = "; ".join(f"{k}: {theirs.get(k)!r} there, {mine.get(k)!r} now" for k in diff[:6])
            raise ValueError(
                f"{s.output_dir} holds runs made with different settings ({shown}). Use another --output-dir, or "
                "delete that folder to start over."
            )
        return
    os.makedirs(s.output_dir, exist_ok=True)
    atomic_write_text(path, json.dumps({"library_version": library_version(), "settings": mine}, indent=1) + "\n")


def finished_run(s: CompareSettings, arm: str, seed: int, lr: float | None = None) -> dict[str, Any] | None:
    """The record of a finished run with these settings, or None (missing, partial or other settings)."""
    path = run_path(s.output_dir, arm, seed, lr)
    if not os.path.isfile(path):
        return None
    try:
        record = read_json_file(path)
    except ValueError:
        return None
    return record if record.get("settings_fingerprint") == s.fingerprint() else None


# ---------------------------------------------------------------------------------------------- workers
_WORKER: dict[str, Any] = {}  # per worker process: its Context, built once by _init_worker


def _init_worker(settings: dict[str, Any]) -> None:
    s = CompareSettings(**settings)
    configure_threads(s.threads)
    quiet_libraries()
    _WORKER["ctx"] = build_context(s)


def _work(task: tuple[str, int, float | None]) -> dict[str, Any]:
    return run_one(_WORKER["ctx"], *task)


def configure_threads(threads: int | None) -> None:
    """Use `threads` torch CPU threads (None: torch's default)."""
    if threads:
        torch.set_num_threads(threads)


def quiet_libraries() -> None:
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


@contextlib.contextmanager
def _exit_on_sigterm(output_dir: str):
    """Turn SIGTERM into SystemExit while the worker pool runs, so that leaving the `with Pool` block terminates the
    workers (a plain SIGTERM would end this process and leave them training, writing into `output_dir`)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        logger.warning("Stopped by SIGTERM: finished runs are kept in %s; the same command resumes.", output_dir)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_all(ctx: Context, tasks: list[tuple[str, int, float | None]], done: int, total: int) -> list[dict[str, Any]]:
    """Train `tasks` (arm, seed, LR of --lr-grid or None), in --jobs worker processes when > 1; logs progress as
    runs finish.

    The replaying arms (baseline-restarts, lora-restarts) replay the finished dendritic run of their seed, so they
    train after every other run.
    """
    records: list[dict[str, Any]] = []
    for wave in ([t for t in tasks if t[0] not in REPLAYS], [t for t in tasks if t[0] in REPLAYS]):
        if wave:
            records += _run_wave(ctx, wave, done + len(records), total)
    return records


def _run_wave(ctx: Context, tasks: list[tuple[str, int, float | None]], done: int, total: int) -> list[dict[str, Any]]:
    s = ctx.settings
    records = []

    def report(i: int, r: dict[str, Any]) -> None:
        score = r["test_score"] if r["test_score"] is not None else r["validation_score"]
        logger.info("[%d/%d] %s seed %d (lr %g) done: score %.4f, %d steps, %d dendrites (%.0f s)",
                    i, total, r["arm"], r["seed"], r["learning_rate"], score, r["steps"], r["dendrites_kept"], r["seconds"])

    if s.jobs <= 1 or len(tasks) <= 1:
        for arm, seed, lr in tasks:
            logger.info("[%d/%d] training %s, seed %d%s", done, total, arm, seed, f", lr {lr:g}" if lr is not None else "")
            records.append(run_one(ctx, arm, seed, lr))
            done += 1
            report(done, records[-1])
        return records
    import multiprocessing

    mp = multiprocessing.get_context("spawn")
    logger.info("Training %d runs in %d worker processes (%s threads each)", len(tasks), s.jobs, s.threads or "default")
    with _exit_on_sigterm(s.output_dir), mp.Pool(min(s.jobs, len(tasks)), initializer=_init_worker,
                                                 initargs=(s.to_dict(),)) as pool:
        for record in pool.imap_unordered(_work, tasks):
            records.append(record)
            done += 1
            report(done, record)
    return records
