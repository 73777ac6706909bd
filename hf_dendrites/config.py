"""`DendriteConfig`: what the user chooses about dendrites (which layers, how many, what they compute)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional, Union

from .constants import ACTIVATIONS, CHECKPOINT_FORMAT_VERSION, DENDRITE_CONFIG_NAME, LEARNING_RULES

# Values of `DendriteConfig.dendrite_dtype`.
DENDRITE_DTYPES = ("float32", "bfloat16", "float16")

# A single command-line value with one of these characters is a regular expression, never a module name.
_REGEX_CHARS = frozenset("*+?[](){}|^$\\")


@dataclass
class DendriteConfig:
    """Configuration of artificial dendrites added to a model.

    Example:
        >>> from hf_dendrites import DendriteConfig
        >>> cfg = DendriteConfig(target_modules="all-linear", dendrites_per_cycle=1, activation="tanh")
        >>> DendriteConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    # Annotated as a list so that `HfArgumentParser` turns it into a multi-value flag; a string is accepted too.
    target_modules: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": (
                "Which layers get dendrites. A list matches a module name exactly or as a dotted suffix "
                "(e.g. ['query', 'value'] or ['attention.output.dense']); a string is a regular expression that "
                "must match the full module name; 'all-linear' targets every nn.Linear / transformers Conv1D "
                "and MoE experts module (docs/moe.md) except the output embedding (LM head), task heads and MoE "
                "routers / gates; None uses the per-architecture defaults "
                "(attention projections and MLP layers) for the model types listed in "
                "hf_dendrites.constants.DEFAULT_TARGET_MODULES. On the command line: `--target_modules query value`, "
                "`--target_modules all-linear`, or one regular expression (a single value containing any of "
                "*+?[](){}|^$ is read as a regex, e.g. `--target_modules '.*layer\\.0\\..*dense'`). In a PEFT model, "
                "names are those of the model without PEFT (`q_proj` is the layer LoRA wraps); LoRA's own layers get "
                "dendrites only when a list names them (['lora_A', 'lora_B']; docs/peft.md)."
            )
        },
    )
    exclude_modules: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Modules never targeted, with the same matching rules (and command-line forms) as `target_modules`."},
    )
    dendrites_per_cycle: int = field(
        default=1,
        metadata={"help": "How many dendrites every target layer gets at each growth (`add_dendrites()` default)."},
    )
    activation: str = field(
        default="tanh",
        metadata={"help": f"Dendrite nonlinearity phi, one of {', '.join(ACTIVATIONS)}."},
    )
    cascade: bool = field(
        default=False,
        metadata={
            "help": (
                "If True, dendrite k also receives the activations of dendrites j < k through per-neuron "
                "weights c_kj (started at zero), as in Cascade-Correlation."
            )
        },
    )
    init_scale: float = field(
        default=1.0,
        metadata={
            "help": (
                "Scale of the random initialisation of the dendrites' input weights: they are drawn uniformly "
                "with standard deviation init_scale / sqrt(fan_in), so a dendrite's pre-activation has about "
                "init_scale**2 times the mean square of the layer input. Dendrite biases and the "
                "dendrite-to-neuron weights start at zero."
            )
        },
    )
    rank: Optional[int] = field(
        default=None,
        metadata={
            "help": (
                "None: every dendrite has a full weight of the layer's shape. An int r: each dendrite's weight "
                "is the product B_k A_k of rank r, much cheaper on wide layers."
            )
        },
    )
    learning_rule: str = field(
        default="gd",
        metadata={
            "help": (
                "How new dendrites learn. 'gd': by ordinary backpropagation, jointly with the network or in a "
                "dendrites-only phase. 'correlation' (Cascade-Correlation): with the neurons frozen, a pool of "
                "candidate dendrites per layer is trained to maximise the covariance of its activation with the "
                "layer's output error; the best are installed with frozen input weights and a perforated backward "
                "pass (no error flows through them). Needs full-shape dendrites (rank=None)."
            )
        },
    )
    candidate_pool_size: int = field(
        default=4,
        metadata={
            "help": (
                "correlation rule: candidate dendrites trained per layer and growth; the dendrites_per_cycle best "
                "are installed (must be >= dendrites_per_cycle)."
            )
        },
    )
    correlation_normalize: bool = field(
        default=False,
        metadata={
            "help": (
                "correlation rule: maximise the Pearson correlation between candidate activation and neuron error "
                "instead of the covariance (Fahlman & Lebiere's S)."
            )
        },
    )
    dendrite_seed: Optional[int] = field(
        default=None,
        metadata={
            "help": (
                "Seed of the random initialisation of new dendrites. With a seed, growth is reproducible and "
                "identical on every process; None uses torch's global random generator (DendriticTrainer then "
                "uses the training arguments' `seed`). Named apart from `TrainingArguments.seed` so that both "
                "dataclasses parse together with `HfArgumentParser`."
            )
        },
    )

    dendrite_dtype: Optional[str] = field(
        default=None,
        metadata={
            "help": (
                "dtype of the dendrites of quantized layers (bitsandbytes 4-bit / 8-bit, whose weights are not "
                "floating point): 'float32', 'bfloat16' or 'float16'. None: the layer's compute dtype "
                "(bnb_4bit_compute_dtype) or the model's dtype. Dendrites of other layers always take their weight's "
                "dtype (docs/quantization.md)."
            )
        },
    )

    def __post_init__(self) -> None:
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (tuple, set)):
                value = sorted(value) if isinstance(value, set) else list(value)
                setattr(self, name, value)
            if value is not None and not isinstance(value, (str, list)):
                raise TypeError(f"`{name}` must be None, a string (regex or 'all-linear') or a list of names, got {value!r}.")
            if isinstance(value, list) and len(value) == 1 and (value[0] == "all-linear" or _REGEX_CHARS & set(value[0])):
                # the command-line forms: one value that is "all-linear" or a regex (module names have no such chars)
                value = value[0]
                setattr(self, name, value)
            if isinstance(value, list):
                if not value or not all(isinstance(v, str) and v for v in value):
                    raise ValueError(f"`{name}` must be a non-empty list of module names, got {value!r}.")
        if self.exclude_modules == "all-linear":
            raise ValueError("`exclude_modules='all-linear'` would exclude every layer; list the modules to exclude.")
        if not isinstance(self.dendrites_per_cycle, int) or isinstance(self.dendrites_per_cycle, bool) or self.dendrites_per_cycle < 1:
            raise ValueError(
                f"`dendrites_per_cycle` must be an integer >= 1, got {self.dendrites_per_cycle!r}. To get the "
                "schedule's restarts without dendrites (the restarts-only control), keep dendrites_per_cycle=1 and set "
                "DendriticTrainingArguments(dendrite_restarts_only=True)."
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"`activation` must be one of {list(ACTIVATIONS)}, got {self.activation!r}.")
        if not isinstance(self.init_scale, (int, float)) or isinstance(self.init_scale, bool) or not self.init_scale > 0:
            raise ValueError(f"`init_scale` must be a positive number, got {self.init_scale!r}.")
        self.init_scale = float(self.init_scale)
        if self.rank is not None and (not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1):
            raise ValueError(f"`rank` must be None (full-shape dendrites) or an integer >= 1, got {self.rank!r}.")
        if self.learning_rule not in LEARNING_RULES:
            raise ValueError(f"`learning_rule` must be one of {list(LEARNING_RULES)}, got {self.learning_rule!r}.")
        if not isinstance(self.candidate_pool_size, int) or isinstance(self.candidate_pool_size, bool) or self.candidate_pool_size < 1:
            raise ValueError(f"`candidate_pool_size` must be an integer >= 1, got {self.candidate_pool_size!r}.")
        if self.learning_rule == "correlation":
            if self.rank is not None:
                raise ValueError(
                    "learning_rule='correlation' needs full-shape dendrites: set rank=None, or use learning_rule='gd' "
                    "with low-rank dendrites."
                )
            if self.candidate_pool_size < self.dendrites_per_cycle:
                raise ValueError(
                    f"candidate_pool_size={self.candidate_pool_size} is smaller than dendrites_per_cycle="
                    f"{self.dendrites_per_cycle}: the correlation rule installs the best dendrites_per_cycle candidates "
                    "of each pool; raise candidate_pool_size."
                )
        if self.dendrite_seed is not None and (not isinstance(self.dendrite_seed, int) or isinstance(self.dendrite_seed, bool)):
            raise ValueError(f"`dendrite_seed` must be None or an integer, got {self.dendrite_seed!r}.")
        if self.dendrite_dtype is not None and self.dendrite_dtype not in DENDRITE_DTYPES:
            raise ValueError(f"`dendrite_dtype` must be None or one of {list(DENDRITE_DTYPES)}, got {self.dendrite_dtype!r}.")

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-compatible dict (field name -> value)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DendriteConfig":
        """Build a config from `to_dict()` output; unknown keys are an error (they mean a newer library)."""
        data = dict(data)
        if "seed" in data and "dendrite_seed" not in data:
            data["dendrite_seed"] = data.pop("seed")  # hf_dendrites 0.1.0 called the field `seed`
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"Unknown DendriteConfig fields {unknown}: this config was probably written by a newer hf_dendrites; "
                "upgrade with `pip install -U hf_dendrites`."
            )
        return cls(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: Union[str, os.PathLike]) -> str:
        """Write the config alone as `dendrite_config.json` in `save_directory`; returns the file path.

        The file has the same layout as the one a dendritic model checkpoint holds, without layer counts.
        """
        from .utils import atomic_write_text, library_version

        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, DENDRITE_CONFIG_NAME)
        payload = {
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "library_version": library_version(),
            "dendrite_config": self.to_dict(),
        }
        atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike]) -> "DendriteConfig":
        """Read the config from a folder (or a `dendrite_config.json` file) written by `save_pretrained`."""
        from .utils import read_dendrite_config_file

        if os.path.isdir(path):
            path = os.path.join(path, DENDRITE_CONFIG_NAME)
        payload = read_dendrite_config_file(path)
        try:
            return cls.from_dict(payload["dendrite_config"])
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: invalid dendrite config: {err}") from err
