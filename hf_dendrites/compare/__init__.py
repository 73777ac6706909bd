"""`hf-dendrites compare`: do dendrites help this model on this data? Several arms, several seeds, one table.

    hf-dendrites compare --model PATH --layers 1 --train-file train.csv --validation-file validation.csv \\
        --test-file test.csv --text-column text --label-column label \\
        --arms baseline,baseline-restarts,wider,dendrites --seeds 3 --output-dir OUT

(also `python -m hf_dendrites.compare ...`, or `compare(model=..., ...)` from Python, which returns the results).

Tasks: text and image classification, and `--task causal-lm` (next-token prediction on a text column; the
documents are concatenated and cut into blocks of `--max-length` tokens; the score is next-token accuracy and each
run also records its loss and perplexity; `example_data.small_lm_folder` writes a small Llama config with a
tokenizer fitted to your text for a from-scratch LM).

Every arm trains with `DendriticTrainer` on the same data, seeds (model init, data order) and evaluation
points; the validation data drives every decision (plateaus, growth, the reported checkpoint) and the test data
is only scored at the end. A run that reaches `--max-steps` before its schedule completes is scored at its best
validation evaluation. The arms (`settings.ARMS`):

- `baseline`: no dendrites, stopped at the first plateau (`max_dendrite_cycles=0`).
- `baseline-restarts`: no dendrites, but the dendritic run's recipe replayed: at the steps where the `dendrites` run
  of the same seed grew or retried, restore the best weights, fresh optimizer, LR restart; the same total steps
  (`DendriticTrainingArguments(dendrite_restarts_only=True, dendrite_restart_steps=...)`): the control that
  separates dendrites from restarts and extra training. Needs the `dendrites` arm, or `frozen-dendrites`, whose
  runs it then replays with the base frozen (the head alone with the same restarts).
- `wider`: every MLP gets as many extra units as give the parameters that `max_cycles` growths of the dendrites
  arm add (computed exactly on a weightless copy of the converted model; the kept count may end lower). From
  scratch the config's intermediate size is raised; pretrained, the new units get random input weights and zero
  output weights, so the model computes the same function at the start. Restarts at its own plateaus (best
  weights restored, fresh optimizer, LR restart), without dendrites.
- `dendrites`, `dendrites-only-phase`, `correlation`: the dendritic schedule with the gd rule (joint, or with a
  dendrites-only phase first) or the correlation rule.
- `frozen-dendrites` / `lora`: the base frozen except the task head; low-rank dendrites of `--frozen-rank`
  against PEFT LoRA on the same layers with the rank whose trainable parameters match those dendrites'.
- The adapter arms (base frozen, task head trains, LoRA of `--lora-rank`, default 8, on the target layers):
  `lora` (with `--lora-rank`: stopped at its first plateau), `lora-dendrites` (Perforated AI's PEFT recipe:
  dendrites on LoRA's own `lora_A` / `lora_B` layers only, the schedule deciding growth), `lora-restarts` (that
  run's restarts replayed at the same steps, the same total steps, no dendrites), `lora-wider` (LoRA at the rank whose
  trainable parameters come closest to lora-dendrites' largest count) and `lora-base-dendrites` (dendrites on the
  base layers LoRA adapts). `--lr-grid 1e-4,1e-3` trains every arm at each LR and reports each arm at the LR with
  its best mean validation score (`lr_choice` in compare.json).

Outputs in `--output-dir`: `compare.md` (the table), `compare.json` (settings, summary, every run),
`compare.png`, and `runs/<arm>/seed-<k>.json`, written atomically when a run ends (beside it, the trainer's
`seed-<k>-trainer/` folder with its evaluation CSV and training curve; the run's JSON lists every cycle try under
`cycles`, with a kept cycle's attribution: `dendrite_weight` and `ablation_score` / `ablation_delta`, its validation
score with its new dendrites switched off and the kept score's lead over it); a rerun with the same settings skips
finished runs, and a folder holding runs with other settings is an error. SIGTERM (like Ctrl-C) stops the worker
processes of `--jobs N` too; the runs they had not finished are trained again by the rerun.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
import types
from typing import Any, Union, get_args, get_origin, get_type_hints

from ..utils import atomic_write_text, library_version
from . import report
from .runner import build_context, check_output_dir, choose_learning_rates, configure_threads, finished_run, run_all
from .settings import ARMS, CompareSettings

logger = logging.getLogger(__name__)

__all__ = ["ARMS", "CompareSettings", "build_parser", "compare", "main"]


def compare(settings: CompareSettings | None = None, **kwargs) -> dict[str, Any]:
    """Train every arm with every seed (skipping runs already in `output_dir`) and write the report.

    Pass a `CompareSettings` or its fields as keyword arguments. Returns what `compare.json` holds:
    `settings`, `arms`, `seeds`, `reference`, `summary` (one row per arm), `table` (markdown) and `runs`; with
    `lr_grid`, `runs` holds each arm's runs at its chosen LR, `lr_grid_runs` the others and `lr_choice` the choice.

    Example:
        >>> results = compare(model="my-bert", train_file="train.csv", test_file="test.csv",
        ...                   arms="baseline,dendrites", seeds=3, output_dir="out")
        >>> print(results["table"])
    """
    s = settings if settings is not None else CompareSettings(**kwargs)
    if settings is not None and kwargs:
        s = dataclasses.replace(settings, **kwargs)
    configure_threads(s.threads)
    ctx = build_context(s)  # every bad-input error is raised here, before any training
    for arm, why in ctx.skipped.items():
        logger.info("Arm %s left out: %s", arm, why)
    check_output_dir(s)
    seeds, lrs = s.seed_values(), s.learning_rates()
    tasks = [(arm, seed, lr) for lr in lrs for seed in seeds for arm in ctx.arms]
    records = {}
    for task in tasks:
        found = finished_run(s, *task)
        if found is not None:
            records[task] = found
    todo = [t for t in tasks if t not in records]
    logger.info("%d runs (%d arms x %d seeds x %d learning rates): %d already finished in %s, %d to train",
                len(tasks), len(ctx.arms), len(seeds), len(lrs), len(records), s.output_dir, len(todo))
    start = time.perf_counter()
    for record in run_all(ctx, todo, len(records), len(tasks)):
        records[(record["arm"], record["seed"], record["learning_rate"] if s.lr_grid else None)] = record
    ordered = [records[t] for t in sorted(records, key=lambda t: (ctx.arms.index(t[0]), t[1], t[2] or 0.0))]
    lr_choice: dict[str, Any] = {}
    if s.lr_grid:  # each arm at the LR with its best mean validation score; the other LRs' runs kept aside
        lr_choice = choose_learning_rates(ordered, ctx.arms, s.metric)
        runs = [r for r in ordered if r["learning_rate"] == lr_choice[r["arm"]]["chosen"]]
        others = [r for r in ordered if r["learning_rate"] != lr_choice[r["arm"]]["chosen"]]
    else:
        runs, others = ordered, []

    accuracy = "next-token accuracy" if s.task == "causal-lm" else "accuracy"
    score_name = f"test {accuracy}" if ctx.test is not None else f"validation {accuracy} (no test data)"
    rows, reference = report.summarise(runs, ctx.arms)
    table = report.markdown_table(rows, reference, score_name)
    if lr_choice:
        table += "\n\n" + report.lr_choice_line(lr_choice, s.metric)
    results = {
        "library_version": library_version(),
        "settings": s.to_dict(),
        "arms": ctx.arms,
        "arms_left_out": ctx.skipped,
        "seeds": seeds,
        "labels": ctx.splits.label_names,
        "data": {"train": len(ctx.train), "validation": len(ctx.validation), "test": len(ctx.test) if ctx.test is not None else 0,
                 "validation_source": ctx.splits.validation_source},
        "budgets": {k: v for k, v in ctx.budgets.items() if k != "lora_targets"},
        "score": score_name,
        "reference": reference,
        "summary": rows,
        "table": table,
        "runs": runs,
        **({"lr_choice": lr_choice, "lr_grid_runs": others} if s.lr_grid else {}),
    }
    atomic_write_text(os.path.join(s.output_dir, "compare.md"), table + "\n")
    atomic_write_text(os.path.join(s.output_dir, "compare.json"), json.dumps(results, indent=1, default=_json_safe) + "\n")
    try:
        report.plot(runs, ctx.arms, os.path.join(s.output_dir, "compare.png"), score_name, s.metric)
    except ImportError as err:
        logger.warning("Not plotting compare.png (%s): pip install matplotlib", err)
    logger.info("Trained %d runs in %.0f s; wrote %s/compare.{md,json,png}", len(todo), time.perf_counter() - start, s.output_dir)
    return results


def _json_safe(value):
    import math

    if isinstance(value, float) and math.isnan(value):
        return None
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# ---------------------------------------------------------------------------------------------- CLI
def _field_type(tp):
    """(element type, is_list) of a CompareSettings field's type."""
    if get_origin(tp) in (Union, types.UnionType):
        tp = next(a for a in get_args(tp) if a is not type(None))
    if get_origin(tp) is list:
        return get_args(tp)[0], True
    return tp, False


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser: one option per `CompareSettings` field, with the field's help text."""
    parser = argparse.ArgumentParser(
        prog="hf-dendrites compare",
        description=(
            "Train a model with and without dendrites (and with controls: same restarts, a wider MLP, LoRA) over "
            "several seeds on the same data, and print one table: score mean ± std, 95 % t-interval, relative "
            "error change paired per seed against baseline-restarts (else baseline, else lora-restarts) with a paired "
            "t-test, "
            "parameters, steps and dendrites kept."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    hints = get_type_hints(CompareSettings)
    for f in dataclasses.fields(CompareSettings):
        flag = "--" + f.name.replace("_", "-")
        tp, is_list = _field_type(hints[f.name])
        help_text = f.metadata["help"].replace("%", "%%")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if tp is bool:
            parser.add_argument(flag, action="store_true", help=help_text)
        elif is_list:
            parser.add_argument(flag, type=str, default=None if default is None else ",".join(map(str, default)),
                                metavar="A,B,..", help=help_text)
        else:
            parser.add_argument(flag, type=tp, default=default, help=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Console entry point (`hf-dendrites compare ...` / `python -m hf_dendrites.compare ...`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compare":  # `hf-dendrites compare ...`: the subcommand name
        argv = argv[1:]
    parser = build_parser()
    ns = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    # Its own level: the trainer sets the `hf_dendrites` logger to transformers' verbosity (errors only here).
    logging.getLogger(__name__).setLevel(logging.INFO)
    from .runner import quiet_libraries

    quiet_libraries()
    try:
        results = compare(CompareSettings(**vars(ns)))
    except (ValueError, FileNotFoundError, ImportError) as err:
        parser.exit(2, f"hf-dendrites compare: error: {err}\n")
    print()
    print(results["table"])
    return 0
