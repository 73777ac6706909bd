"""`CompareSettings`: everything `hf-dendrites compare` takes, one dataclass field per command-line option.

The command line is generated from the fields (`--field-name`, the field's help text), so the Python function
`compare(...)` and the CLI take the same names and defaults.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

# arm name -> one line for --help and the table. Order = table order.
ARMS: dict[str, str] = {
    "baseline": "no dendrites, stopped at its first validation plateau (max_dendrite_cycles=0)",
    "baseline-restarts": (
        "no dendrites, the dendritic run's recipe replayed: at the steps where the dendrites run of the same seed "
        "grew or retried, restore the best weights, fresh optimizer, LR restart; the same total steps "
        "(DendriticTrainingArguments.dendrite_restarts_only + dendrite_restart_steps); needs the dendrites arm, or "
        "frozen-dendrites, whose runs it then replays with only the task head training (the base frozen)"
    ),
    "wider": (
        "no dendrites; every MLP widened by as many neurons as give the parameters the dendrites arm can add "
        "(dendrite parameters of max_cycles growths); restarts at its own plateaus"
    ),
    "dendrites": "gd dendrites trained jointly with the network",
    "dendrites-only-phase": "gd dendrites, each cycle starting with a dendrites-only phase (neurons frozen)",
    "correlation": "Cascade-Correlation dendrites (learning_rule='correlation'; needs full-shape dendrites)",
    "frozen-dendrites": "frozen base (the task head trains) with low-rank dendrites of rank --frozen-rank",
    "lora": (
        "frozen base (the task head trains) with PEFT LoRA on the same target layers, its rank chosen so its "
        "trainable parameters match frozen-dendrites (needs `pip install peft`); with --lora-rank: LoRA of that "
        "rank stopped at its first plateau (the control of Perforated AI's PEFT case study)"
    ),
    "lora-restarts": (
        "LoRA of --lora-rank (frozen base, the task head trains) with the lora-dendrites run's restarts replayed at "
        "the same steps, the same total steps; needs the lora-dendrites arm"
    ),
    "lora-dendrites": (
        "Perforated AI's PEFT recipe: LoRA of --lora-rank, dendrites on LoRA's own Linear layers only (lora_A, "
        "lora_B), the schedule deciding growth"
    ),
    "lora-wider": (
        "LoRA at the rank whose trainable parameters match lora-dendrites' largest count (LoRA of --lora-rank plus "
        "--max-cycles growths); restarts at its own plateaus"
    ),
    "lora-base-dendrites": "LoRA of --lora-rank plus dendrites on the base layers LoRA adapts, the schedule deciding growth",
}
# The arms with LoRA of --lora-rank (and lora-wider's rank derived from it).
LORA_ARMS = ("lora-restarts", "lora-dendrites", "lora-wider", "lora-base-dendrites")
DEFAULT_LORA_RANK = 8
TASKS = ("text-classification", "image-classification", "causal-lm")
# Fields that do not change what a run computes: they may differ between a run and its resumption.
NOT_RUN_DEFINING = ("output_dir", "arms", "seeds", "seed_list", "threads", "jobs")


def _help(text: str, **kw) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class CompareSettings:
    """Settings of one comparison: model, data, training budget, schedule, arms and seeds.

    Example:
        >>> s = CompareSettings(model="path/to/bert", train_file="train.csv", test_file="test.csv", seeds=3)
        >>> s.seed_values()
        [0, 1, 2]
    """

    model: str | None = _help("Model to compare: a local folder or a Hub id (offline: the local cache).", default=None)
    output_dir: str = _help(
        "Folder for the results: compare.md, compare.json, compare.png, and runs/<arm>/seed-<k>.json (one per "
        "finished run; a rerun with the same settings skips them).", default="compare_output")
    task: str = _help(
        f"What the model learns: one of {', '.join(TASKS)}. causal-lm trains next-token prediction on the text "
        "column (no labels): documents are concatenated and cut into blocks of --max-length tokens; the score is "
        "next-token accuracy and every run also records its loss and perplexity.", default="text-classification")
    from_scratch: bool = _help("Initialise the model randomly from its config instead of loading its weights.", default=False)
    width_scale: float = _help(
        "With --from-scratch: multiply the hidden and intermediate (MLP) sizes by this factor; head counts are "
        "lowered where needed so that every head keeps an integer size.", default=1.0)
    layers: int | None = _help(
        "Keep only the first N transformer layers. 0 gives the DSN shape: embeddings, no encoder layer, and a "
        "linear head on the mean of the token (or patch) embeddings; its default dendrite target is that head.",
        default=None)
    pooling: str = _help(
        "The classification head: 'auto' (the model's own head, e.g. BERT's [CLS] pooler; a mean-pooled linear "
        "head with --layers 0) or 'mean' (a linear head on the mask-weighted mean of the last hidden states, with "
        "any --layers; useful when a cut or frozen model's [CLS] state carries little, e.g. a sentence-embedding "
        "model trained with mean pooling).", default="auto")
    dataset: str | None = _help("A `datasets` Hub name (read from the local cache when offline).", default=None)
    dataset_config: str | None = _help("Configuration name of --dataset, if it has several.", default=None)
    train_file: str | None = _help("Training data: a csv / json / jsonl / parquet file, or an imagefolder directory.", default=None)
    validation_file: str | None = _help(
        "Validation data (drives every decision). Without it (and without a validation split in --dataset), a "
        "stratified --validation-size part of the training data is held out (causal-lm: whole documents).", default=None)
    test_file: str | None = _help("Test data: only reported, never used for a decision.", default=None)
    text_column: str = _help("Column holding the text (text-classification, causal-lm).", default="text")
    image_column: str = _help("Column holding the image (image-classification).", default="image")
    label_column: str = _help("Column holding the class label (strings or integers; not used by causal-lm).", default="label")
    validation_size: float = _help(
        "Held-out share of the training data when no validation data is given: a fraction in (0, 1) or a number "
        "of rows (>= 1).", default=0.1)
    split_seed: int = _help("Seed of the stratified validation split (the same for every arm and training seed).", default=0)
    max_length: int = _help("Text is truncated to this many tokens (causal-lm: the block length).", default=128)
    arms: list[str] | None = _help(
        "Comma-separated arms to train (default: every arm that applies to the model). Known arms: "
        + "; ".join(f"{k}: {v}" for k, v in ARMS.items()) + ".", default=None)
    seeds: int = _help("Train every arm with seeds 0 .. K-1.", default=3)
    seed_list: list[int] | None = _help("Comma-separated training seeds (instead of --seeds).", default=None)
    learning_rate: float = _help("Learning rate (AdamW) of every arm.", default=1e-4)
    lr_grid: list[float] | None = _help(
        "Comma-separated learning rates (instead of --learning-rate): every arm trains every seed at each of them, "
        "and each arm is reported at the LR with its best mean validation --metric over the seeds (the test data "
        "plays no part); the replaying arms (baseline-restarts, lora-restarts) replay the runs at the LR chosen for "
        "the arm they replay. compare.json lists every LR's runs under `lr_grid_runs` and the choice under "
        "`lr_choice`.", default=None)
    lr_scheduler_type: str = _help(
        "transformers LR schedule (e.g. constant, linear, cosine); dendritic runs restart it at every growth.",
        default="constant")
    batch_size: int = _help("Training batch size.", default=32)
    eval_batch_size: int = _help("Evaluation batch size.", default=128)
    eval_steps: int = _help("Evaluate on the validation data every N training steps (the same points for every arm).", default=50)
    max_steps: int = _help("Cap on training steps of every run (the schedule usually ends a run earlier).", default=2000)
    metric: str = _help(
        "Validation metric that drives plateaus and best-model choices: accuracy (causal-lm: next-token accuracy) "
        "or loss.", default="accuracy")
    patience: list[int] = _help(
        "Evaluations without improvement that make a plateau; comma-separated values are used per cycle.",
        default_factory=lambda: [3])
    threshold: list[float] = _help(
        "Relative improvement a score needs to count; comma-separated values are used per cycle.",
        default_factory=lambda: [1e-3])
    epsilon: list[float] = _help("Absolute improvement a score needs to count (per cycle, like --threshold).", default_factory=lambda: [0.0])
    lr_search: list[float] | None = _help(
        "Restart-LR search after every growth: comma-separated multiples of --learning-rate (e.g. 1,0.3,0.1), each "
        "candidate trained from the same post-growth weights to its plateau, the best on validation kept "
        "(DendriticTrainingArguments.dendrite_lr_search). The restarts arms search the same candidates; "
        "baseline-restarts then restarts at its own plateaus instead of replaying the dendrites run's steps "
        "(a candidate's length is decided by its own plateau, so fixed steps cannot be replayed).", default=None)
    cycle_steps: int | None = _help(
        "Length in steps of every restarted LR schedule (warmup and decay of --lr-scheduler-type; "
        "DendriticTrainingArguments.dendrite_cycle_steps). Default: the steps left until --max-steps.", default=None)
    max_cycles: int = _help("Dendrite cycles (growths) at most.", default=2)
    max_tries: int = _help("Tries per cycle: a cycle that does not improve is discarded and retried this often in all.", default=2)
    dendrites_per_cycle: int = _help("Dendrites every target layer gets at each growth.", default=1)
    rank: int | None = _help("Rank of low-rank dendrites for the dendritic arms (default: full-shape dendrites).", default=None)
    frozen_rank: int = _help("Rank of the dendrites of the frozen-dendrites arm (lora matches its trainable parameters).", default=4)
    lora_rank: int | None = _help(
        "Rank of the LoRA of the lora-restarts, lora-dendrites and lora-base-dendrites arms (default "
        f"{DEFAULT_LORA_RANK}, Perforated AI's r); given, the lora arm uses it too and stops at its first plateau.",
        default=None)
    freeze_base: bool = _help(
        "Freeze the pretrained model in every arm: only the task head trains, plus what the arm adds (dendrites, "
        "LoRA); with --layers 0 the model is a linear probe of the frozen embeddings. Needs pretrained weights.",
        default=False)
    targets: str = _help(
        "Dendrite target layers: 'default' (the library's per-architecture defaults; the head for --layers 0), "
        "'mlp' (the MLP layers), 'all-linear', a regular expression, or comma-separated module names.",
        default="default")
    activation: str = _help("Dendrite nonlinearity (see DendriteConfig.activation).", default="tanh")
    threads: int | None = _help("torch CPU threads per run (1 is fastest on a busy machine).", default=None)
    jobs: int = _help("Runs in parallel worker processes (each with --threads threads).", default=1)

    def __post_init__(self) -> None:
        for name in ("arms", "seed_list", "patience", "threshold", "epsilon", "lr_search", "lr_grid"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                value = [value]
            setattr(self, name, list(value) if value is not None else None)
        self.patience = [int(v) for v in self.patience]
        self.threshold = [float(v) for v in self.threshold]
        self.epsilon = [float(v) for v in self.epsilon]
        if self.seed_list is not None:
            self.seed_list = [int(v) for v in self.seed_list]
        if self.lr_search is not None:
            self.lr_search = [float(v) for v in self.lr_search]
            if not self.lr_search or not all(math.isfinite(v) and v > 0 for v in self.lr_search):
                raise ValueError(f"--lr-search must be comma-separated learning-rate multiples > 0 (e.g. 1,0.3,0.1), got {self.lr_search}.")
        if self.lr_grid is not None:
            self.lr_grid = [float(v) for v in self.lr_grid]
            if not self.lr_grid or not all(math.isfinite(v) and v > 0 for v in self.lr_grid):
                raise ValueError(f"--lr-grid must be comma-separated learning rates > 0 (e.g. 1e-4,1e-3), got {self.lr_grid}.")
            if len(set(self.lr_grid)) != len(self.lr_grid):
                raise ValueError(f"--lr-grid repeats a learning rate: {self.lr_grid}.")
        if self.lora_rank is not None and (isinstance(self.lora_rank, bool) or int(self.lora_rank) < 1):
            raise ValueError(f"--lora-rank must be >= 1, got {self.lora_rank}.")
        if self.cycle_steps is not None and (isinstance(self.cycle_steps, bool) or int(self.cycle_steps) < 1):
            raise ValueError(f"--cycle-steps must be >= 1, got {self.cycle_steps}.")
        if not self.model:
            raise ValueError("Pass --model: a local model folder or a Hub id.")
        if self.task not in TASKS:
            raise ValueError(f"--task must be one of {list(TASKS)}, got {self.task!r}.")
        if self.arms is not None:
            unknown = [a for a in self.arms if a not in ARMS]
            if unknown:
                raise ValueError(f"Unknown arm(s) {unknown}; choose from {list(ARMS)}.")
            if not self.arms:
                raise ValueError("--arms is empty; choose from " + ", ".join(ARMS) + ".")
        if self.width_scale != 1.0 and not self.from_scratch:
            raise ValueError("--width-scale changes the architecture, so it needs --from-scratch (pretrained weights have a fixed width).")
        if self.freeze_base and self.from_scratch:
            raise ValueError("--freeze-base keeps pretrained weights fixed, so it needs a pretrained model (drop --from-scratch).")
        if not self.width_scale > 0:
            raise ValueError(f"--width-scale must be > 0, got {self.width_scale}.")
        if self.layers is not None and self.layers < 0:
            raise ValueError(f"--layers must be >= 0, got {self.layers}.")
        if self.pooling not in ("auto", "mean"):
            raise ValueError(f"--pooling must be 'auto' or 'mean', got {self.pooling!r}.")
        if self.task == "causal-lm" and self.pooling != "auto":
            raise ValueError("--pooling chooses a classification head; a causal LM keeps its LM head (drop --pooling).")
        if self.task == "causal-lm" and self.freeze_base:
            raise ValueError(
                "--freeze-base trains only a classification head; for causal-lm it would leave nothing but the LM head "
                "(tied to the embeddings) to train. Drop --freeze-base."
            )
        if self.metric not in ("accuracy", "loss"):
            raise ValueError(f"--metric must be 'accuracy' or 'loss', got {self.metric!r}.")
        if self.dataset is None and self.train_file is None:
            raise ValueError("Give the data: --dataset NAME, or --train-file (with --validation-file / --test-file).")
        if self.dataset is not None and self.train_file is not None:
            raise ValueError("Give either --dataset or --train-file, not both.")
        if not self.validation_size > 0 or (self.validation_size >= 1 and self.validation_size != int(self.validation_size)):
            raise ValueError(f"--validation-size must be a fraction in (0, 1) or a whole number of rows, got {self.validation_size}.")
        for name in ("seeds", "batch_size", "eval_batch_size", "eval_steps", "max_steps", "max_tries", "dendrites_per_cycle",
                     "frozen_rank", "jobs", "max_length"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}.")
        if self.max_cycles < 0:
            raise ValueError(f"--max-cycles must be >= 0, got {self.max_cycles}.")
        if self.seed_list is not None and len(set(self.seed_list)) != len(self.seed_list):
            raise ValueError(f"--seed-list repeats a seed: {self.seed_list}.")

    def seed_values(self) -> list[int]:
        """The training seeds: --seed-list, else 0 .. seeds-1."""
        return list(self.seed_list) if self.seed_list is not None else list(range(self.seeds))

    def learning_rates(self) -> list[float | None]:
        """The learning rates every arm trains at: --lr-grid, else [None] (--learning-rate)."""
        return list(self.lr_grid) if self.lr_grid else [None]

    def family_lora_rank(self) -> int:
        """The LoRA rank of the lora-* arms: --lora-rank, else DEFAULT_LORA_RANK."""
        return int(self.lora_rank) if self.lora_rank is not None else DEFAULT_LORA_RANK

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def run_defining(self) -> dict[str, Any]:
        """The settings that change what a run computes (a resumed compare must match them exactly)."""
        return {k: v for k, v in self.to_dict().items() if k not in NOT_RUN_DEFINING}

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.run_defining(), sort_keys=True).encode()).hexdigest()[:16]
