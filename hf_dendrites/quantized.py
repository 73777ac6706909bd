"""Quantized frozen bases: bitsandbytes' `Linear4bit` (nf4 / fp4) and `Linear8bitLt` as layer kinds.

The quantized weight stays as it is (same packed parameter, same quantization state) and frozen; the dendrites
(full-shape or low-rank) are ordinary floating-point parameters fed the layer's input, in the layer's compute dtype:
for `Linear4bit` its `compute_dtype` (transformers sets it from `BitsAndBytesConfig(bnb_4bit_compute_dtype=...)`),
for `Linear8bitLt` (which has none) the model's dtype; `DendriteConfig(dendrite_dtype=...)` chooses another. The
layer's output is bitsandbytes' own output plus the dendrites' contribution, cast back to the output's dtype, so a
layer with zero output weights computes exactly what bitsandbytes computes.

The kinds are registered when bitsandbytes has been imported (a model loaded with a `BitsAndBytesConfig` has
imported it), through `hf_dendrites.layers.register_lazy_layer_kind`: hf_dendrites itself imports without
bitsandbytes. Fusion for inference does not apply (the packed weight cannot be concatenated with the dendrites');
the correlation rule does (its candidates are floating-point dendrites). See docs/quantization.md.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .layers import LinearFeaturesKind, parameter_count, register_layer_kind, register_lazy_layer_kind

# The oldest bitsandbytes tests/test_quantized.py passes on (see pyproject.toml's `quantization` extra).
BITSANDBYTES_MIN_VERSION = "0.49.0"
EXTRA_HINT = 'pip install "hf_dendrites[quantization]"'


def require_bitsandbytes():
    """Import bitsandbytes, or raise an ImportError that names the `quantization` extra."""
    try:
        import bitsandbytes
    except ImportError as err:
        raise ImportError(
            f"Dendrites on bitsandbytes-quantized layers need bitsandbytes>={BITSANDBYTES_MIN_VERSION}: {EXTRA_HINT}."
        ) from err
    from packaging.version import Version

    if Version(bitsandbytes.__version__) < Version(BITSANDBYTES_MIN_VERSION):
        raise ImportError(
            f"bitsandbytes {bitsandbytes.__version__} is older than hf_dendrites supports "
            f"(>= {BITSANDBYTES_MIN_VERSION}): {EXTRA_HINT}."
        )
    return bitsandbytes


def quantization_load_kwargs(config) -> dict:
    """For loading the base of an adapter-only checkpoint of a model that was quantized at load: the checkpoint's
    config records the quantization (`quantization_config`), which transformers would read as "these weights are
    already quantized" while the referenced base holds the original ones. Moves it out of `config` (in place) into
    the `quantization_config=` argument of `from_pretrained`, so the base is quantized as it was in training; a base
    saved quantized (its own config.json says so) keeps its own. Returns {} for a config without quantization."""
    quantization = getattr(config, "quantization_config", None)
    if quantization is None:
        return {}
    from transformers.quantizers.auto import AutoQuantizationConfig

    del config.quantization_config
    if isinstance(quantization, dict):
        quantization = AutoQuantizationConfig.from_dict(quantization)
    return {"quantization_config": quantization}


class _DendriticQuantizedLinear(LinearFeaturesKind):
    """Dendrites on a quantized Linear: the weight is read only by the module's own forward (bitsandbytes')."""

    supports_fusion = False
    uses_dendrite_dtype = True

    @classmethod
    def from_base_layer(cls, base, *args, **kwargs):
        layer = super().from_base_layer(base, *args, **kwargs)
        _repoint_weight(layer, base)
        return layer

    def to_base_layer(self) -> nn.Module:
        base = super().to_base_layer()
        _repoint_weight(base, self)
        return base

    def _apply_kind(self, x, weight, bias):
        return F.linear(x.to(weight.dtype), weight, bias)  # the input in the dendrites' dtype, as bitsandbytes does

    @property
    def dendrite_dtype(self) -> torch.dtype:
        return self._dendrite_dtype or torch.get_default_dtype()

    @classmethod
    def default_dendrite_dtype(cls, base: nn.Module) -> Optional[torch.dtype]:
        bias = getattr(base, "bias", None)
        return bias.dtype if bias is not None and bias.is_floating_point() else None

    @torch.no_grad()
    def base_weight(self, stored: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The weight as the layer applies it: its forward on the identity, without bias (the stored packed weight
        is frozen, so `stored` is not needed)."""
        eye = torch.eye(self.in_features, dtype=self.dendrite_dtype, device=self._reference().device)
        out = self._base_forward(eye).float()
        if getattr(self, "bias", None) is not None:
            out = out - self.bias.float()
        return out.t()

    def base_parameter_count(self) -> int:
        return sum(parameter_count(p) for p in self.base_parameters())


# bitsandbytes' Linear4bit flag for its CPU repacking (see DendriticLinear4bitMixin), and where its value is kept.
_CPU_PACKING_FLAG = "support_avx512bf16_for_cpu"
_CPU_PACKING_SAVED = "_dendrite_cpu_packing"


def hold_cpu_repacking(root: nn.Module) -> None:
    """Turn bitsandbytes' CPU repacking of 4-bit weights off in `root` and its submodules (see
    `DendriticLinear4bitMixin`): `get_dendritic_model` does it for every 4-bit layer of the model, converted or not,
    since a layer left plain would change the frozen base too."""
    for module in root.modules():
        if module.__dict__.get(_CPU_PACKING_FLAG):
            module.__dict__[_CPU_PACKING_FLAG] = False
            module.__dict__[_CPU_PACKING_SAVED] = True


def release_cpu_repacking(root: nn.Module) -> None:
    """Undo `hold_cpu_repacking` (`DendriticModel.unload`)."""
    for module in root.modules():
        if module.__dict__.pop(_CPU_PACKING_SAVED, False):
            module.__dict__[_CPU_PACKING_FLAG] = True


def _repoint_weight(new: nn.Module, old: nn.Module) -> None:
    """bitsandbytes' 4-bit weight refers back to its module (to update the module's quantization state): make it
    refer to the module that replaces `old`."""
    weight = new._parameters.get("weight")
    if weight is not None and getattr(weight, "module", None) is old:
        weight.module = new


class DendriticLinear4bitMixin(_DendriticQuantizedLinear):
    """bitsandbytes `Linear4bit` (nf4 / fp4, and its `LinearNF4` / `LinearFP4` subclasses) with dendrites.

    bitsandbytes (0.50.2) repacks a 4-bit weight for its CPU inference kernel at the first forward pass in eval mode
    without gradients (on CPUs with AVX512-BF16), and unpacks it when the state dict is read, rounding the blocks'
    scales (`absmax`) on the way: the frozen base would change (and no longer match an adapter-only checkpoint's
    fingerprint, nor its own outputs before). The converted layer, and every other 4-bit layer of a model
    `get_dendritic_model` converts, has that repacking turned off (bitsandbytes' `support_avx512bf16_for_cpu` flag,
    `hold_cpu_repacking`); `to_base_layer` and `DendriticModel.unload` put the flag back.
    """

    @classmethod
    def from_base_layer(cls, base, *args, **kwargs):
        layer = super().from_base_layer(base, *args, **kwargs)
        hold_cpu_repacking(layer)
        return layer

    def to_base_layer(self) -> nn.Module:
        base = super().to_base_layer()
        release_cpu_repacking(base)
        return base

    @classmethod
    def default_dendrite_dtype(cls, base: nn.Module) -> Optional[torch.dtype]:
        return getattr(base, "compute_dtype", None) or super().default_dendrite_dtype(base)


class DendriticLinear8bitLtMixin(_DendriticQuantizedLinear):
    """bitsandbytes `Linear8bitLt` (int8 weights with outlier decomposition) with dendrites."""


def _check_8bit(module: nn.Module) -> Optional[str]:
    state = getattr(module, "state", None)
    if state is not None and getattr(state, "has_fp16_weights", False):
        return (
            "its Linear8bitLt keeps trainable fp16 weights (has_fp16_weights=True), which is not a frozen quantized base; "
            "load the model with BitsAndBytesConfig(load_in_8bit=True)"
        )
    return None


def register_bitsandbytes_kinds() -> None:
    """Register the bitsandbytes kinds (called once bitsandbytes is imported; safe to call again)."""
    bnb = require_bitsandbytes()
    register_layer_kind(bnb.nn.Linear4bit, DendriticLinear4bitMixin, name="bitsandbytes.Linear4bit", all_linear=True)
    register_layer_kind(
        bnb.nn.Linear8bitLt, DendriticLinear8bitLtMixin, name="bitsandbytes.Linear8bitLt", all_linear=True, check=_check_8bit
    )


register_lazy_layer_kind("bitsandbytes", register_bitsandbytes_kinds)
