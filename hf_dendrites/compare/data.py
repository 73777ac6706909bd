"""Data for `compare`: load the splits, check them before any training, encode labels, preprocess.

Every check here runs before the first run trains, so bad input fails in seconds with a message naming the
problem and the fix.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from .settings import CompareSettings

logger = logging.getLogger(__name__)

_FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass
class Splits:
    """The raw splits (a `datasets.Dataset` each; `test` may be None) and the label names (index = class id)."""

    train: Any
    validation: Any
    test: Any | None
    label_names: list[str]
    validation_source: str  # "given" or "stratified split of train"


def _load_file(path: str):
    from datasets import load_dataset

    if os.path.isdir(path):
        return load_dataset("imagefolder", data_dir=path, split="train")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Data file {path} does not exist.")
    ext = os.path.splitext(path)[1].lower()
    if ext not in _FILE_BUILDERS:
        raise ValueError(f"{path}: unsupported data file type {ext!r}; use .csv, .tsv, .json, .jsonl, .parquet or an imagefolder directory.")
    kwargs = {"delimiter": "\t"} if ext == ".tsv" else {}
    return load_dataset(_FILE_BUILDERS[ext], data_files=path, split="train", **kwargs)


def load_raw_splits(s: CompareSettings) -> dict[str, Any]:
    """{'train', 'validation'?, 'test'?} as `datasets.Dataset`s, from --dataset or the files."""
    if s.dataset is not None:
        from datasets import load_dataset

        ds = load_dataset(s.dataset, s.dataset_config)
        if "train" not in ds:
            raise ValueError(f"Dataset {s.dataset!r} has no 'train' split (it has {list(ds)}).")
        out = {"train": ds["train"]}
        for name, aliases in (("validation", ("validation", "valid", "dev")), ("test", ("test",))):
            for alias in aliases:
                if alias in ds:
                    out[name] = ds[alias]
                    break
        return out
    out = {"train": _load_file(s.train_file)}
    if s.validation_file:
        out["validation"] = _load_file(s.validation_file)
    if s.test_file:
        out["test"] = _load_file(s.test_file)
    return out


def _check_columns(name: str, ds, columns: list[str]) -> None:
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        flags = {"text": "--text-column", "image": "--image-column", "label": "--label-column"}
        raise ValueError(
            f"The {name} data has no column {missing[0]!r}; its columns are {ds.column_names}. Choose one with "
            f"{' / '.join(flags.values())}."
        )


def _label_strings(ds, column: str) -> list[str]:
    """Labels as strings: class names for a ClassLabel column (imagefolder), str(value) otherwise."""
    feature = ds.features[column]
    values = ds[column]
    names = getattr(feature, "names", None)
    if names is not None:
        return [names[v] for v in values]
    return ["" if v is None else str(v) for v in values]


def stratified_split(labels: list[int], size: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, validation indices): every class keeps its share in both parts.

    `size` is a fraction in (0, 1) or a row count. Each class contributes round(share * its count) rows to
    validation (at least one, and at least one row stays in train); rounding differences are taken from the
    largest classes.
    """
    labels = np.asarray(labels)
    n = len(labels)
    n_val = int(round(size * n)) if size < 1 else int(size)
    classes = np.unique(labels)
    if n_val < len(classes) or n - n_val < len(classes):
        raise ValueError(
            f"Not enough rows for the splits: {n} training rows in {len(classes)} classes cannot give a stratified "
            f"validation split of {n_val} rows with every class on both sides (needs at least {len(classes)} rows on "
            "each side). Lower or raise --validation-size, add data, or pass --validation-file."
        )
    counts = {c: int((labels == c).sum()) for c in classes}
    if min(counts.values()) < 2:
        rare = [str(c) for c, k in counts.items() if k < 2]
        raise ValueError(
            f"Not enough rows for the splits: class(es) {rare} have a single training row, so a stratified "
            "validation split cannot put them on both sides. Add data or pass --validation-file."
        )
    take = {c: min(max(1, int(round(n_val * k / n))), k - 1) for c, k in counts.items()}
    # fix rounding so that exactly n_val rows are taken
    order = sorted(classes, key=lambda c: -counts[c])
    i = 0
    while sum(take.values()) != n_val and i < 10 * n:
        c = order[i % len(order)]
        if sum(take.values()) < n_val and take[c] < counts[c] - 1:
            take[c] += 1
        elif sum(take.values()) > n_val and take[c] > 1:
            take[c] -= 1
        i += 1
    rng = np.random.default_rng(seed)
    val: list[int] = []
    for c in classes:
        idx = np.flatnonzero(labels == c)
        val.extend(rng.permutation(idx)[: take[c]].tolist())
    val_set = set(val)
    return [i for i in range(n) if i not in val_set], sorted(val)


def random_split(n: int, size: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, validation indices) of `n` rows (documents), `size` a fraction in (0, 1) or a row count."""
    n_val = int(round(size * n)) if size < 1 else int(size)
    if n_val < 1 or n - n_val < 1:
        raise ValueError(
            f"Not enough rows for the splits: {n} training documents cannot give a validation split of {n_val} with "
            "a document left on each side. Lower or raise --validation-size, add data, or pass --validation-file."
        )
    val = sorted(np.random.default_rng(seed).permutation(n)[:n_val].tolist())
    val_set = set(val)
    return [i for i in range(n) if i not in val_set], val


def _load_lm_splits(s: CompareSettings, raw: dict[str, Any]) -> Splits:
    """causal-lm: only the text column matters (no labels); a validation split is taken by whole documents."""
    for name, ds in raw.items():
        _check_columns(name, ds, [s.text_column])
    keep = {name: ds.remove_columns([c for c in ds.column_names if c != s.text_column]) for name, ds in raw.items()}
    train, source = keep["train"], "given"
    if "validation" in keep:
        validation = keep["validation"]
    else:
        train_idx, val_idx = random_split(len(train), s.validation_size, s.split_seed)
        validation, train = train.select(val_idx), train.select(train_idx)
        source = "random split of train by document"
    if "test" not in keep:
        logger.warning("No test data: the table reports validation scores, which also drove the decisions.")
    return Splits(train, validation, keep.get("test"), [], source)


def load_splits(s: CompareSettings) -> Splits:
    """Load, check and label-encode the data (no preprocessing yet). Raises ValueError on bad input."""
    raw = load_raw_splits(s)
    if s.task == "causal-lm":
        return _load_lm_splits(s, raw)
    data_column = s.text_column if s.task == "text-classification" else s.image_column
    for name, ds in raw.items():
        _check_columns(name, ds, [data_column, s.label_column])
    train_labels = _label_strings(raw["train"], s.label_column)
    names = sorted(set(train_labels), key=lambda v: (len(v), v) if v.isdigit() else (float("inf"), v))
    if len(names) < 2:
        raise ValueError(
            f"The label column {s.label_column!r} has a single class ({names[0] if names else 'none'!r}) in the "
            f"{len(train_labels)} training rows: a classifier needs at least two. Check --label-column and the data."
        )
    index = {v: i for i, v in enumerate(names)}

    def encode(name: str, ds):
        labels = _label_strings(ds, s.label_column)
        unknown = sorted(set(labels) - set(index))
        if unknown:
            raise ValueError(
                f"The {name} data has label(s) {unknown[:5]} that the training data lacks (training classes: "
                f"{names[:20]}); the model cannot learn them. Fix the label column or the splits."
            )
        ids = [index[v] for v in labels]
        ds = ds.remove_columns([c for c in ds.column_names if c != data_column])
        return ds.add_column("labels", ids), ids

    train, train_ids = encode("train", raw["train"])
    source = "given"
    if "validation" in raw:
        validation, _ = encode("validation", raw["validation"])
    else:
        train_idx, val_idx = stratified_split(train_ids, s.validation_size, s.split_seed)
        validation, train = train.select(val_idx), train.select(train_idx)
        source = "stratified split of train"
    test = encode("test", raw["test"])[0] if "test" in raw else None
    if test is None:
        logger.warning("No test data: the table reports validation scores, which also drove the decisions.")
    if len(train) < s.batch_size:
        raise ValueError(
            f"Not enough rows for the splits: {len(train)} training rows are fewer than one batch of "
            f"--batch-size {s.batch_size}. Lower --batch-size or add data."
        )
    return Splits(train, validation, test, names, source)


def preprocess(splits: Splits, s: CompareSettings, model_path: str):
    """(train, validation, test, processing_class, data_collator) ready for the Trainer.

    Text is tokenized once (truncated to --max-length, padded per batch); images are converted on the fly by
    the model's image processor (resized and normalised as the model expects). causal-lm text is tokenized,
    every document ended with the tokenizer's EOS token, concatenated and cut into blocks of --max-length tokens
    whose labels are their input ids (the model shifts them); the last partial block of a split is dropped.
    """
    if s.task == "causal-lm":
        return _preprocess_lm(splits, s, model_path)
    if s.task == "text-classification":
        from transformers import AutoTokenizer, DataCollatorWithPadding

        tokenizer = AutoTokenizer.from_pretrained(model_path)
        column = s.text_column

        def tokenize(batch):
            texts = ["" if t is None else str(t) for t in batch[column]]
            return tokenizer(texts, truncation=True, max_length=s.max_length)

        def apply(ds):
            return None if ds is None else ds.map(tokenize, batched=True, remove_columns=[column])

        return apply(splits.train), apply(splits.validation), apply(splits.test), tokenizer, DataCollatorWithPadding(tokenizer)

    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(model_path)
    column = s.image_column

    def transform(batch):
        images = [img.convert("RGB") for img in batch[column]]
        out = processor(images=images, return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "labels": batch["labels"]}

    def apply(ds):
        if ds is None:
            return None
        ds = ds.with_transform(transform)
        return ds

    import torch

    def collate(rows):
        return {"pixel_values": torch.stack([r["pixel_values"] for r in rows]),
                "labels": torch.tensor([r["labels"] for r in rows])}

    return apply(splits.train), apply(splits.validation), apply(splits.test), processor, collate


def _preprocess_lm(splits: Splits, s: CompareSettings, model_path: str):
    from datasets import Dataset
    from transformers import AutoTokenizer, default_data_collator

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    size = s.max_length

    def blocks(name: str, ds):
        if ds is None:
            return None
        texts = ["" if t is None else str(t) for t in ds[s.text_column]]
        stream = [i for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] for i in [*ids, *eos]]
        n = len(stream) // size
        if n == 0:
            raise ValueError(
                f"Not enough rows for the splits: the {name} text gives {len(stream)} tokens, less than one block of "
                f"--max-length {size}. Add text or lower --max-length."
            )
        ids = [stream[k * size : (k + 1) * size] for k in range(n)]
        return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * size] * n, "labels": ids})

    train = blocks("train", splits.train)
    if len(train) < s.batch_size:
        raise ValueError(
            f"Not enough rows for the splits: the training text gives {len(train)} blocks of {size} tokens, fewer "
            f"than one batch of --batch-size {s.batch_size}. Lower --batch-size or --max-length, or add text."
        )
    return train, blocks("validation", splits.validation), blocks("test", splits.test), tokenizer, default_data_collator
