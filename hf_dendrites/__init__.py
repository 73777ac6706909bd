"""hf_dendrites: artificial dendrites for Hugging Face Transformers."""

__version__ = "0.1.0"

from .config import DendriteConfig
from .layers import DendriticConv1d, DendriticConv1D, DendriticConv2d, DendriticLayerMixin, DendriticLinear
from .model import DendriteSummary, DendriticModel, LayerSummary, get_dendritic_model, resolve_target_modules

__all__ = [
    "DendriteConfig",
    "DendriteSummary",
    "DendriticConv1D",
    "DendriticConv1d",
    "DendriticConv2d",
    "DendriticLayerMixin",
    "DendriticLinear",
    "DendriticModel",
    "LayerSummary",
    "get_dendritic_model",
    "resolve_target_modules",
]
