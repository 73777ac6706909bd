"""What the benchmark scripts share: the text task's model, model reduction, one training run, statistics.

The examples train one dendritic model each; the benchmarks compare it with controls (the baseline at its
plateau, the baseline trained on for as many steps, a wider model), over several seeds. Offline models and data
come from `hf_dendrites.example_data`; the MiniLM classifier with mean pooling is the one of
`examples/text_classification.py`, so the benchmark measures the model the main example trains.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from scipy import stats
from torch import nn
from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from text_classification import BERT_MLP_TARGETS, BertForMeanPooledClassification  # noqa: E402, F401

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Dendrites on every MLP Linear of a BERT encoder (intermediate.dense and output.dense of each layer).
MLP_TARGETS = BERT_MLP_TARGETS


def quiet() -> None:
    """Silence progress bars and load reports of datasets / transformers (the Trainer's logs stay)."""
    import datasets
    from transformers import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def set_threads(threads: Optional[int]) -> None:
    """Use `threads` CPU threads in torch (None: torch's default). On a machine whose cores are busy with other
    work, one thread avoids OpenMP threads waiting on each other and is several times faster for small models."""
    if threads:
        torch.set_num_threads(threads)


def set_seed(seed: int) -> None:
    from transformers import set_seed as hf_set_seed

    hf_set_seed(seed)


def accuracy_metrics() -> Callable:
    """`compute_metrics` for classification: logits -> {"accuracy": ...}."""

    def compute_metrics(eval_pred):
        logits, labels = eval_pred
        logits = logits[0] if isinstance(logits, tuple) else logits
        return {"accuracy": float((np.asarray(logits).argmax(-1) == np.asarray(labels)).mean())}

    return compute_metrics


def tokenize_text_dataset(ds, tokenizer, max_length: int):
    """Tokenize the `text` column (truncated to `max_length`); padding happens per batch in the collator."""
    return ds.map(lambda b: tokenizer(b["text"], truncation=True, max_length=max_length), batched=True, remove_columns=["text"])


# ---------------------------------------------------------------------------------------------- reduction
def layer_list(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks of a BERT / ViT / Llama-style model."""
    base = getattr(model, "base_model", model)
    for path in ("encoder.layer", "layers", "h"):
        try:
            layers = base.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ValueError(f"Cannot find the list of blocks of {type(model).__name__}")


def keep_first_layers(model: nn.Module, num_layers: int) -> nn.Module:
    """Keep the first `num_layers` blocks, in place (what `from_pretrained(..., num_hidden_layers=N)` loads)."""
    layers = layer_list(model)
    if not 1 <= num_layers <= len(layers):
        raise ValueError(f"num_layers must be in [1, {len(layers)}], got {num_layers}")
    del layers[num_layers:]
    model.config.num_hidden_layers = num_layers
    if getattr(model.config, "layer_types", None) is not None:
        model.config.layer_types = model.config.layer_types[:num_layers]
    return model


def _slice_linear(layer: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    weight = layer.weight.detach().index_select(dim, index)
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=layer.bias is not None, dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        new.weight.copy_(weight)
        if layer.bias is not None:
            new.bias.copy_(layer.bias.detach() if dim == 1 else layer.bias.detach().index_select(0, index))
    return new


def narrow_mlp(model: nn.Module, width: int) -> nn.Module:
    """Keep the `width` most important hidden units of every block's MLP, in place (pretrained weights kept).

    Importance of hidden unit j: ||W_in[j, :]|| * ||W_out[:, j]|| (the norms of its incoming and outgoing weights;
    for gated MLPs the gate's and the up projection's incoming norms are multiplied in too). Units keep their
    order, and `config.intermediate_size` is set so that a saved model reloads with plain transformers.
    """
    for block in layer_list(model):
        if hasattr(block, "intermediate"):  # BERT-style
            pairs = [(block.intermediate, "dense", 0), (block.output, "dense", 1)]
        elif hasattr(block, "mlp") and hasattr(block.mlp, "fc1"):  # ViT (transformers 5)
            pairs = [(block.mlp, "fc1", 0), (block.mlp, "fc2", 1)]
        elif hasattr(block, "mlp") and hasattr(block.mlp, "gate_proj"):  # Llama
            pairs = [(block.mlp, "gate_proj", 0), (block.mlp, "up_proj", 0), (block.mlp, "down_proj", 1)]
        else:
            raise ValueError(f"Unknown MLP layout in {type(block).__name__}")
        score = None
        for parent, name, dim in pairs:
            norms = getattr(parent, name).weight.detach().float().norm(dim=1 - dim)
            score = norms if score is None else score * norms
        if not 1 <= width <= score.numel():
            raise ValueError(f"width must be in [1, {score.numel()}], got {width}")
        keep = torch.topk(score, width).indices.sort().values
        for parent, name, dim in pairs:
            setattr(parent, name, _slice_linear(getattr(parent, name), keep, dim))
    model.config.intermediate_size = width
    return model


def mlp_dendrite_params_per_dendrite(hidden: int, width: int, num_layers: int) -> int:
    """Parameters one dendrite adds to every MLP Linear of `num_layers` blocks (in: hidden->width, out:
    width->hidden): a full-shape weight, a bias and one output weight per neuron."""
    return num_layers * ((hidden * width + 2 * width) + (width * hidden + 2 * hidden))


# ---------------------------------------------------------------------------------------------- one run
def training_arguments(output_dir: str, **overrides):
    """`DendriticTrainingArguments` that every benchmark run shares: evaluations every `eval_steps`, no
    checkpoints (the schedule keeps its best weights in memory), constant LR, no external loggers, quiet."""
    from hf_dendrites import DendriticTrainingArguments

    defaults = dict(
        output_dir=output_dir,
        eval_strategy="steps",
        eval_steps=50,
        save_strategy="no",
        logging_strategy="steps",
        logging_steps=50,
        report_to=[],
        disable_tqdm=True,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.01,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
    )
    defaults.update(overrides)
    return DendriticTrainingArguments(**defaults)


@dataclass
class RunResult:
    """What one training run produced, as plain numbers (JSON-ready)."""

    name: str
    seed: int
    params: int
    dendrite_params: int
    num_dendrites: int
    val_score: float
    test_score: float
    steps: int
    train_seconds: float
    plateau: Optional[dict[str, Any]] = None  # cycle 0 (no dendrites) at its best validation score
    cycles: list[dict[str, Any]] = field(default_factory=list)
    curve: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


class TestAtBestCallback(TrainerCallback):
    """Scores the test set whenever the validation score reaches a new best of the run (and only then).

    The test score of any model the run may end with (cycle 0's best = the baseline at its plateau, a later
    cycle's best, the best of a run without dendrites) is thus known without scoring the test set at every
    evaluation. Validation alone drives every decision. The test set is scored with `trainer.predict`, which
    (unlike `evaluate`) does not reach the schedule's `on_evaluate`.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, trainer, test_dataset, metric: str, greater_is_better: bool):
        self.trainer = trainer
        self.test_dataset = test_dataset
        self.val_key, self.test_key = f"eval_{metric}", f"test_{metric}"
        self.greater_is_better = greater_is_better
        self.best: Optional[float] = None
        self.entries: list[dict[str, Any]] = []  # every evaluation: step, val, test (None unless a new best)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        metrics = metrics or {}
        if self.val_key not in metrics or not self.trainer.is_in_train:
            return control
        val = float(metrics[self.val_key])
        entry = {"step": state.global_step, "val": val, "test": None}
        if self.best is None or (val > self.best if self.greater_is_better else val < self.best):
            self.best = val
            entry["test"] = float(self.trainer.predict(self.test_dataset, metric_key_prefix="test").metrics[self.test_key])
        self.entries.append(entry)
        return control


def run_trainer(
    name: str,
    model: nn.Module,
    args,
    datasets: dict,
    metric: str,
    greater_is_better: bool,
    dendrite_config=None,
    compute_metrics=None,
    data_collator=None,
    processing_class=None,
    preprocess_logits_for_metrics=None,
) -> tuple[Any, RunResult]:
    """Train with `DendriticTrainer` on `datasets["train"]`, the validation set driving the schedule.

    `args.metric_for_best_model` must be `metric`. Returns the trainer and a `RunResult` whose scores are those
    of the final model: when the schedule completed, the model it restored (its accepted best), scored on
    validation and test after training; when training ran out of steps first, the evaluation with the best
    validation score (what `load_best_model_at_end` would load). `plateau` is cycle 0's best: the model without
    dendrites at its first plateau. The test set never influences any decision.
    """
    from hf_dendrites import DendriticTrainer

    trainer = DendriticTrainer(
        model=model,
        args=args,
        train_dataset=datasets["train"],
        eval_dataset=datasets["validation"],
        compute_metrics=compute_metrics,
        data_collator=data_collator,
        processing_class=processing_class,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        dendrite_config=dendrite_config,
    )
    tester = TestAtBestCallback(trainer, datasets["test"], metric, greater_is_better)
    trainer.add_callback(tester)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start

    def best_of(entries):
        best = None
        for e in entries:
            if best is None or (e["val"] > best["val"] if greater_is_better else e["val"] < best["val"]):
                best = e
        return best

    history = trainer.dendrite_history
    cycle0_steps = {r["step"] for r in history if r["cycle"] == 0}
    plateau = best_of([e for e in tester.entries if e["step"] in cycle0_steps])
    if trainer.dendrite_schedule.done:
        val = trainer.evaluate()[f"eval_{metric}"]  # the restored (accepted best) model
        test = trainer.predict(datasets["test"], metric_key_prefix="test").metrics[f"test_{metric}"]
    else:
        best = best_of(tester.entries)
        val, test = best["val"], best["test"]
    summary = trainer.dendritic_model.dendrite_summary()
    result = RunResult(
        name=name,
        seed=int(args.seed),
        params=summary.total_params,
        dendrite_params=summary.dendrite_params,
        num_dendrites=summary.num_dendrites,
        val_score=float(val),
        test_score=float(test),
        steps=int(trainer.state.global_step),
        train_seconds=round(seconds, 2),
        plateau=plateau,
        cycles=trainer.dendrite_callback.cycle_rows(),
        curve=[{k: r.get(k) for k in ("step", "score", "cycle", "try", "phase", "num_dendrites", "decision")} for r in history],
    )
    return trainer, result


# ---------------------------------------------------------------------------------------------- statistics
def error_of(score: float, greater_is_better: bool, bounded: bool = True) -> float:
    """Error for a score: 1 - accuracy for bounded scores (accuracy), the score itself for losses/perplexity."""
    return 1.0 - score if greater_is_better and bounded else score


def relative_error_change(base_score: float, new_score: float, greater_is_better: bool = True, bounded: bool = True) -> float:
    """(error_new - error_base) / error_base: negative means the new model makes fewer errors."""
    base, new = error_of(base_score, greater_is_better, bounded), error_of(new_score, greater_is_better, bounded)
    return (new - base) / base if base else float("nan")


def mean_std_ci(values: list[float], confidence: float = 0.95) -> dict[str, float]:
    """Mean, sample standard deviation and a two-sided Student-t interval for the mean (`scipy.stats.t`)."""
    n = len(values)
    mean = statistics.fmean(values) if n else float("nan")
    std = statistics.stdev(values) if n > 1 else float("nan")
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / n**0.5 if n > 1 else float("nan")
    return {"n": n, "mean": mean, "std": std, "ci95_low": mean - half, "ci95_high": mean + half}
