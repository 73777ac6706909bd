"""hf_dendrites: artificial dendrites for Hugging Face Transformers."""

__version__ = "0.1.0"

from .callback import DendriteScheduleCallback
from .config import DendriteConfig
from .hp_search import dendrite_hp_space
from .layers import (
    DendriticConv1D,
    DendriticConv1d,
    DendriticConv2d,
    DendriticLayerMixin,
    DendriticLinear,
    LayerKind,
    layer_kinds,
    register_layer_kind,
)
from .model import DendriteSummary, DendriticModel, LayerSummary, get_dendritic_model, resolve_target_modules
from .saving import CheckpointError, load_dendritic_state
from .schedule import Action, Decision, DendriteSchedule, ScheduleSettings
from .trainer import DendriticTrainer, DendriticTrainerMixin
from .training_args import DendriteScheduleArguments, DendriticTrainingArguments

__all__ = [
    "Action",
    "CheckpointError",
    "Decision",
    "DendriteConfig",
    "DendriteSchedule",
    "DendriteScheduleArguments",
    "DendriteScheduleCallback",
    "DendriteSummary",
    "DendriticConv1D",
    "DendriticConv1d",
    "DendriticConv2d",
    "DendriticLayerMixin",
    "DendriticLinear",
    "DendriticModel",
    "DendriticTrainer",
    "DendriticTrainerMixin",
    "DendriticTrainingArguments",
    "dendrite_hp_space",
    "get_dendritic_model",
    "LayerKind",
    "layer_kinds",
    "LayerSummary",
    "load_dendritic_state",
    "register_layer_kind",
    "resolve_target_modules",
    "ScheduleSettings",
]

# TRL's trainers made dendritic (hf_dendrites/trl.py): imported on first use, so the package imports without TRL (and
# left out of __all__, so that `from hf_dendrites import *` does too).
_TRL_NAMES = ("DendriticDPOConfig", "DendriticDPOTrainer", "DendriticSFTConfig", "DendriticSFTTrainer")


def __getattr__(name: str):
    if name in _TRL_NAMES:
        from . import trl

        return getattr(trl, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
