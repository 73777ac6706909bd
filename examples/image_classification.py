#!/usr/bin/env python
"""Train a small Vision Transformer on Fashion-MNIST with dendrites.

No pretrained vision transformer ships in the package registries these examples use offline, so the ViT is
randomly initialised from a small `ViTConfig` (28x28 grey images, 7x7 patches). `DendriticTrainer` trains it
until the validation accuracy plateaus, restores the best weights, adds dendrites to the MLP layers (`fc1`,
`fc2`) and trains on, keeping a dendrite cycle only if it beats the best validation accuracy before it.

    pip install "hf_dendrites[examples]"
    apt-get install -y dataset-fashion-mnist      # or pass --dataset digits (scikit-learn's 8x8 digits)
    python image_classification.py

The default run takes a few minutes on 2 CPU cores (8,000 training images, 2 layers of width 64); `--smoke`
about a minute. Every field of `ExampleArguments`, `DendriteConfig` (`--target_modules`, `--dendrites_per_cycle`,
`--rank`, `--learning_rule`, ...) and `DendriticTrainingArguments` (the Trainer's flags and the schedule's,
e.g. `--dendrite_patience`, `--max_dendrite_cycles`) is a flag; `--help` lists them. Full size (all 58,000
training images, a wider ViT; an hour or more on a CPU):

    python image_classification.py --train_size 58000 --test_size 10000 --hidden_size 192 --layers 6 \\
        --heads 6 --mlp_size 768 --eval_steps 400

Output (`--output_dir`, default `outputs/image_classification`): the dendritic model (`save_pretrained`,
reloaded with `DendriticModel.from_pretrained`), `eval_results.json` / `test_results.json`, and the schedule's
`dendrite_evaluations.csv` and `dendrite_training_curve.png`.

Comparing with a model without dendrites: `--max_dendrite_cycles 0` stops the same model at its first plateau;
`--max_dendrite_cycles 0 --dendrite_patience 1000000 --max_steps N` trains it for the dendritic run's N steps.
Use several `--seed` values; `hf-dendrites compare --task image-classification` runs controlled comparisons.
"""

import logging
import sys
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import transformers
from transformers import HfArgumentParser, ViTConfig, ViTForImageClassification, set_seed

from hf_dendrites import DendriteConfig, DendriticModel, DendriticTrainer, DendriticTrainingArguments
from hf_dendrites.example_data import load_fashion_mnist

logger = logging.getLogger(__name__)


@dataclass
class ExampleArguments:
    """Model and data sizes."""

    hidden_size: int = field(default=64, metadata={"help": "ViT hidden size."})
    layers: int = field(default=2, metadata={"help": "ViT layers."})
    heads: int = field(default=4, metadata={"help": "Attention heads (must divide hidden_size)."})
    mlp_size: int = field(default=128, metadata={"help": "Width of each layer's MLP (intermediate_size)."})
    patch_size: int = field(default=7, metadata={"help": "Patch size in pixels (must divide the image size: 28, or 8 for digits)."})
    dataset: str = field(
        default="fashion-mnist",
        metadata={"help": "'fashion-mnist' (Debian's dataset-fashion-mnist) or 'digits' (scikit-learn, no apt needed).", "choices": ["fashion-mnist", "digits"]},
    )
    train_size: int = field(default=8000, metadata={"help": "Training images (at most 58,000; digits: 1,197)."})
    val_size: int = field(default=2000, metadata={"help": "Validation images, cut from the official training set (digits: at most 300)."})
    test_size: int = field(default=2000, metadata={"help": "Test images (at most 10,000); only reported."})
    smoke: bool = field(default=False, metadata={"help": "Tiny sizes for a quick check (about a minute); explicit flags still win."})


DEFAULTS = dict(
    output_dir="outputs/image_classification",
    target_modules=["fc1", "fc2"],  # the MLP Linears of every ViT layer
    eval_strategy="steps",
    eval_steps=60,
    logging_steps=60,
    save_strategy="no",
    learning_rate=1e-3,
    lr_scheduler_type="constant",
    weight_decay=0.01,
    per_device_train_batch_size=64,
    per_device_eval_batch_size=256,
    num_train_epochs=30,  # a cap: the schedule normally ends training long before
    metric_for_best_model="accuracy",
    greater_is_better=True,
    dendrite_patience=[3],
    max_dendrite_cycles=2,
    max_dendrite_tries=2,
    report_to="none",
)
SMOKE_DEFAULTS = dict(
    train_size=512, val_size=256, test_size=256, hidden_size=32, mlp_size=64, output_dir="outputs/image_classification_smoke",
    eval_steps=8, logging_steps=8, num_train_epochs=8, dendrite_patience=[1], max_dendrite_cycles=1, max_dendrite_tries=1,
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

    # Data: pixel_values [1, H, W] in [0, 1] and label; validation images are never trained on.
    data, classes = load_fashion_mnist(
        n_train=example_args.train_size, n_val=example_args.val_size, n_test=example_args.test_size, dataset=example_args.dataset
    )
    image_size = data["train"][0]["pixel_values"].shape[-1]

    # Model: a ViT initialised at random (set_seed above makes it reproducible).
    config = ViTConfig(
        image_size=image_size,
        patch_size=example_args.patch_size,
        num_channels=1,
        hidden_size=example_args.hidden_size,
        num_hidden_layers=example_args.layers,
        num_attention_heads=example_args.heads,
        intermediate_size=example_args.mlp_size,
        num_labels=len(classes),
        id2label=dict(enumerate(classes)),
        label2id={c: i for i, c in enumerate(classes)},
    )
    if image_size % config.patch_size:
        raise ValueError(f"--patch_size {config.patch_size} does not divide the image size {image_size}; e.g. use 7 for 28x28 or 4 for 8x8.")
    model = ViTForImageClassification(config)
    logger.info(
        "ViT %d layers, hidden %d, MLP %d, %dx%d patches on %s: train %d / validation %d / test %d; dendrites on %s",
        config.num_hidden_layers, config.hidden_size, config.intermediate_size, config.patch_size, config.patch_size,
        example_args.dataset, len(data["train"]), len(data["validation"]), len(data["test"]), dendrite_config.target_modules,
    )

    trainer = DendriticTrainer(
        model=model,
        args=training_args,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
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
        dendritic_model.save_pretrained(training_args.output_dir)
        reloaded = DendriticModel.from_pretrained(training_args.output_dir)
        pixels = data["test"][:4]["pixel_values"].to(dendritic_model.device)
        dendritic_model.eval()
        reloaded.to(dendritic_model.device).eval()
        with torch.no_grad():
            same = torch.allclose(dendritic_model(pixel_values=pixels).logits, reloaded(pixel_values=pixels).logits, atol=1e-5)
        if not same:
            raise RuntimeError(f"The model reloaded from {training_args.output_dir} does not reproduce the trained model's outputs.")
        logger.info("Saved the dendritic model to %s; DendriticModel.from_pretrained reproduces its outputs.", training_args.output_dir)


if __name__ == "__main__":
    main()
