"""A text-classification fine-tuning script written the way transformers' `run_glue.py` is, with the two
`Trainer` names swapped for their dendritic versions and `DendriteConfig` added to the parser.

tests/test_dropin_script.py runs it as a user would (a real process, CSV files, `--do_train` / `--do_eval` /
`--do_predict`, `--resume_from_checkpoint`), to check that hf_dendrites is a drop-in replacement in a stock script and
that what it writes (model card, training summary) describes the saved model.
"""

import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

import datasets
import numpy as np
import transformers
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    set_seed,
)

from hf_dendrites import DendriteConfig
from hf_dendrites import DendriticTrainer as Trainer
from hf_dendrites import DendriticTrainingArguments as TrainingArguments

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Path to a pretrained model (or a dendritic checkpoint)."})


@dataclass
class DataTrainingArguments:
    train_file: Optional[str] = field(default=None, metadata={"help": "CSV with the training data."})
    validation_file: Optional[str] = field(default=None, metadata={"help": "CSV with the validation data."})
    test_file: Optional[str] = field(default=None, metadata={"help": "CSV with the test data."})
    text_column: str = field(default="text", metadata={"help": "Column holding the text."})
    label_column: str = field(default="label", metadata={"help": "Column holding the label."})
    max_seq_length: int = field(default=16, metadata={"help": "Tokens per example."})


def main():
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, DendriteConfig, TrainingArguments))
    model_args, data_args, dendrite_config, training_args = parser.parse_args_into_dataclasses()

    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", handlers=[logging.StreamHandler(sys.stdout)])
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    set_seed(training_args.seed)

    data_files = {
        split: path
        for split, path in (("train", data_args.train_file), ("validation", data_args.validation_file), ("test", data_args.test_file))
        if path is not None
    }
    raw = datasets.load_dataset("csv", data_files=data_files)
    label_list = sorted(set(raw["validation" if "validation" in raw else "train"][data_args.label_column]))
    config = AutoConfig.from_pretrained(model_args.model_name_or_path, num_labels=len(label_list))
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    model = AutoModelForSequenceClassification.from_pretrained(model_args.model_name_or_path, config=config)

    def preprocess(batch):
        out = tokenizer(batch[data_args.text_column], truncation=True, max_length=data_args.max_seq_length)
        out["labels"] = [label_list.index(v) for v in batch[data_args.label_column]]
        return out

    raw = raw.map(preprocess, batched=True, remove_columns=raw["train" if "train" in raw else "validation"].column_names)

    def compute_metrics(p):
        preds = np.argmax(p.predictions, axis=1)
        return {"accuracy": float((preds == p.label_ids).mean())}

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=raw["train"] if training_args.do_train else None,
        eval_dataset=raw["validation"] if "validation" in raw else None,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
        dendrite_config=dendrite_config,
    )

    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()

    if training_args.do_eval:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    if training_args.do_predict:
        predictions = np.argmax(trainer.predict(raw["test"]).predictions, axis=1)
        if trainer.is_world_process_zero():
            with open(os.path.join(training_args.output_dir, "predict_results.txt"), "w") as writer:
                writer.write("index\tprediction\n")
                for index, item in enumerate(predictions):
                    writer.write(f"{index}\t{label_list[item]}\n")

    # as run_glue.py ends when it does not push to the Hub
    trainer.create_model_card(finetuned_from=model_args.model_name_or_path, tasks="text-classification")


if __name__ == "__main__":
    main()
