"""What the benchmark scripts share beyond `hf_dendrites.compare`: the text task's model, model reduction, and one
training run as a `RunResult`.

The examples train one dendritic model each; the benchmarks compare it with controls (the baseline at its
plateau, the baseline trained on for as many steps, a wider model), over several seeds. Training, the training
arguments, the best-validation tracking and every statistic come from `hf_dendrites.compare` (`runner`, `report`),
the engine of `hf-dendrites compare`, so the suite and the command compute them one way. Offline models and data
come from `hf_dendrites.example_data`; the MiniLM classifier with mean pooling is the one of
`examples/text_classification.py`, so the benchmark measures the model the main example trains.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from hf_dendrites.compare.runner import common_training_arguments, configure_threads, quiet_libraries, train_and_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from text_classification import BERT_MLP_TARGETS, BertForMeanPooledClassification  # noqa: E402, F401

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Dendrites on every MLP Linear of a BERT encoder (intermediate.dense and output.dense of each layer).
MLP_TARGETS = BERT_MLP_TARGETS


quiet = quiet_libraries  # silence progress bars and load reports of datasets / transformers


# `threads` CPU threads in torch (None: torch's default). On a machine whose cores are busy with other work, one
# thread avoids OpenMP threads waiting on each other and is several times faster for small models.
set_threads = configure_threads


def set_seed(seed: int) -> None:
    from transformers import set_seed as hf_set_seed

    hf_set_seed(seed)


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
    """`compare`'s common training arguments with the suite's own: constant LR without warmup, weight decay 0.01,
    a log line every 50 steps."""
    defaults = dict(eval_steps=50, logging_strategy="steps", logging_steps=50, lr_scheduler_type="constant",
                    warmup_steps=0, weight_decay=0.01)
    defaults.update(overrides)
    return common_training_arguments(output_dir, **defaults)


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


def run_trainer(
    name: str,
    model: nn.Module,
    args,
    datasets: dict,
    dendrite_config=None,
    data_collator=None,
    processing_class=None,
) -> tuple[Any, RunResult]:
    """Train with `compare`'s `train_and_score` on `datasets["train"]`, the validation set driving the schedule
    (`args.metric_for_best_model`), the test set scored at every new best validation score.

    Returns the trainer and a `RunResult` whose scores are those of the final model: the schedule's accepted best,
    or, when training ran out of steps first, the evaluation with the best validation score. `plateau` is cycle 0's
    best: the model without dendrites at its first plateau. The test set never influences any decision.
    """
    metric = args.metric_for_best_model
    run = train_and_score(model, args, datasets["train"], datasets["validation"], datasets["test"],
                          processing_class=processing_class, data_collator=data_collator,
                          dendrite_config=dendrite_config, test_at_best=True, quiet=False)
    trainer = run.trainer
    history = trainer.dendrite_history
    plateau = run.tracker.best_entry({r["step"] for r in history if r["cycle"] == 0})
    summary = trainer.dendritic_model.dendrite_summary()
    result = RunResult(
        name=name,
        seed=int(args.seed),
        params=summary.total_params,
        dendrite_params=summary.dendrite_params,
        num_dendrites=summary.num_dendrites,
        val_score=float(run.validation[f"eval_{metric}"]),
        test_score=float(run.test[f"test_{metric}"]),
        steps=int(trainer.state.global_step),
        train_seconds=round(run.seconds, 2),
        plateau=plateau,
        cycles=trainer.dendrite_callback.cycle_rows(),
        curve=[{k: r.get(k) for k in ("step", "score", "cycle", "try", "phase", "num_dendrites", "decision")} for r in history],
    )
    return trainer, result
