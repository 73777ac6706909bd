"""A tiny model and a small learnable task for DendriticTrainer tests (also imported by tests/scripts/ddp_train.py).

The task: sequences of 8 tokens; the label is whether exactly one of the first two tokens is below 13 (an XOR the
tiny BERT learns in a few dozen steps), with 10 % of labels flipped so that the evaluation loss plateaus.
"""

from __future__ import annotations

import argparse
import itertools
from typing import Any

import torch
import transformers

from hf_dendrites import DendriteConfig, DendriticTrainingArguments
from hf_dendrites.callback import ablation_evaluation_running

VOCAB = 24
SEQ = 8


def tiny_bert(seed: int = 0) -> transformers.BertForSequenceClassification:
    """A 1-layer BERT classifier without dropout (so runs are deterministic and resumable bit for bit)."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(config)


def task_data(n: int, seed: int, noise: float = 0.1) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, SEQ), generator=g)
    labels = ((ids[:, 0] < 13) ^ (ids[:, 1] < 13)).long()
    flip = torch.rand(n, generator=g) < noise
    labels = torch.where(flip, 1 - labels, labels)
    return [{"input_ids": i.tolist(), "attention_mask": [1] * SEQ, "labels": int(y)} for i, y in zip(ids, labels)]


def all_linear() -> DendriteConfig:
    return DendriteConfig(target_modules="all-linear", dendrite_seed=0)


def make_args(output_dir: str, **overrides: Any) -> DendriticTrainingArguments:
    """Fast CPU arguments: evaluation (and checkpoint) every 4 steps, no reporting, no progress bar."""
    kwargs: dict[str, Any] = {
        "output_dir": output_dir,
        "eval_strategy": "steps",
        "eval_steps": 4,
        "save_strategy": "no",
        "logging_steps": 4,
        "per_device_train_batch_size": 16,
        "per_device_eval_batch_size": 64,
        "learning_rate": 3e-3,
        "lr_scheduler_type": "constant",
        "num_train_epochs": 100,
        "dendrite_patience": [2],
        "dendrite_improvement_threshold": [0.01],
        "max_dendrite_cycles": 2,
        "max_dendrite_tries": 2,
        "report_to": [],
        "disable_tqdm": True,
        "use_cpu": True,
        "seed": 0,
        "dataloader_num_workers": 0,
    }
    kwargs.update(overrides)
    return DendriticTrainingArguments(**kwargs)


def launch_flags(argv: list[str]) -> dict[str, Any]:
    """The launch-related training arguments of a command line, read as a stock script's HfArgumentParser reads them
    (`--use_cpu`, `--ddp_backend NAME`): overrides for `make_args`, whose own default is `use_cpu=True`."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--use_cpu", action="store_true")
    parser.add_argument("--ddp_backend", default=None)
    return vars(parser.parse_args(argv))


class ScriptedMetric:
    """`compute_metrics` returning a fixed sequence of scores as "eval_scripted" (the last one repeats).

    Drives the schedule through chosen decisions whatever the model computes. The evaluation of a kept cycle with its
    dendrites switched off (`ablation_evaluation_running()`) gets `ablation` (default: the first score, the worst in
    these scripts) and does not advance the sequence.
    """

    def __init__(self, scores: list[float], ablation: float | None = None):
        self.scores = list(scores)
        self._it = itertools.chain(self.scores, itertools.repeat(self.scores[-1]))
        self.ablation = self.scores[0] if ablation is None else ablation
        self.calls = 0

    def __call__(self, eval_pred) -> dict[str, float]:
        if ablation_evaluation_running():
            return {"scripted": float(self.ablation)}
        self.calls += 1
        return {"scripted": float(next(self._it))}


def state_of(model: torch.nn.Module, prefix: str | None = None) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if prefix is None or k.startswith(prefix)}
