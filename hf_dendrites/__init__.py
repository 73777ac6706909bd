"""hf_dendrites: artificial dendrites for Hugging Face Transformers."""

__version__ = "0.1.0"

from .callback import DendriteScheduleCallback
from .config import DendriteConfig
from .hp_search import dendrite_hp_space
from .layers import DendriticConv1D, DendriticConv1d, DendriticConv2d, DendriticLayerMixin, DendriticLinear
from .model import DendriteSummary, DendriticModel, LayerSummary, get_dendritic_model, resolve_target_modules
from .saving import CheckpointError, load_dendritic_state
from .schedule import Action, Decision, DendriteSchedule, ScheduleSettings
from .trainer import DendriticTrainer
from .training_args import DendriticTrainingArguments

__all__ = [
    "Action",
    "CheckpointError",
    "Decision",
    "DendriteConfig",
    "DendriteSchedule",
    "DendriteScheduleCallback",
    "DendriteSummary",
    "DendriticConv1D",
    "DendriticConv1d",
    "DendriticConv2d",
    "DendriticLayerMixin",
    "DendriticLinear",
    "DendriticModel",
    "DendriticTrainer",
    "DendriticTrainingArguments",
    "dendrite_hp_space",
    "get_dendritic_model",
    "LayerSummary",
    "load_dendritic_state",
    "resolve_target_modules",
    "ScheduleSettings",
]
