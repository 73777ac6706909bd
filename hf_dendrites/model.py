"""Injection of dendritic layers into a model, and the `DendriticModel` wrapper."""

from __future__ import annotations

import contextlib
import functools
import logging
import re
from dataclasses import dataclass, field
from typing import Iterator, Optional, Union

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import DendriteConfig
from .constants import DEFAULT_TARGET_MODULES, HEAD_MODULE_NAMES
from .layers import DENDRITE_PARAM_NAMES, DendriticLayerMixin, dendritic_class_for, unsupported_reason

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- matching
def _matches(name: str, pattern: Union[str, list[str]]) -> bool:
    """PEFT-style matching: a string is a full-match regex; a list matches exactly or as a dotted suffix."""
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == p or name.endswith("." + p) for p in pattern)


def _head_module_names(model: nn.Module) -> set[str]:
    """Names of modules that belong to the output embedding or a task head (never targeted by all-linear)."""
    heads: set[str] = set()
    output_embeddings = None
    get_output = getattr(model, "get_output_embeddings", None)
    if callable(get_output):
        try:
            output_embeddings = get_output()
        except (AttributeError, NotImplementedError):
            output_embeddings = None
    base_model = getattr(model, "base_model", model)
    base_ids = {id(m) for m in base_model.modules()} if isinstance(base_model, nn.Module) and base_model is not model else None
    for name, module in model.named_modules():
        parts = set(name.split("."))
        if module is output_embeddings or parts & HEAD_MODULE_NAMES:
            heads.add(name)
        elif base_ids is not None and id(module) not in base_ids:
            # Outside the transformers base model (e.g. BertForSequenceClassification.classifier): a head.
            heads.add(name)
    return heads


def resolve_target_modules(model: nn.Module, config: DendriteConfig) -> list[str]:
    """Names of the modules of `model` that `config` selects, in `named_modules()` order.

    Raises a `ValueError` naming candidate layers when nothing matches, and a `TypeError` when a selected
    module is not a supported layer kind.
    """
    targets = config.target_modules
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGET_MODULES:
            known = ", ".join(sorted(DEFAULT_TARGET_MODULES))
            what = f"model_type {model_type!r}" if model_type else f"{type(model).__name__} (not a transformers model)"
            raise ValueError(
                f"No default dendrite targets for {what}. Pass `target_modules` explicitly (a list of names, a regex "
                f"or 'all-linear'). Defaults exist for: {known}."
            )
        targets = DEFAULT_TARGET_MODULES[model_type]

    names: list[str] = []
    if targets == "all-linear":
        heads = _head_module_names(model)
        for name, module in model.named_modules():
            if type(module) in (nn.Linear, Conv1D) and name not in heads:
                names.append(name)
    else:
        for name, module in model.named_modules():
            if name and _matches(name, targets):
                names.append(name)
    if config.exclude_modules is not None:
        names = [n for n in names if not _matches(n, config.exclude_modules)]

    if not names:
        candidates = [n for n, m in model.named_modules() if dendritic_class_for(m) is not None]
        shown = ", ".join(candidates[:12]) + (", ..." if len(candidates) > 12 else "")
        raise ValueError(
            f"target_modules={targets!r} (exclude_modules={config.exclude_modules!r}) matched no layer of "
            f"{type(model).__name__}. Supported layers in this model include: {shown or 'none'}."
        )
    modules = dict(model.named_modules())
    for name in names:
        reason = unsupported_reason(modules[name])
        if reason is not None:
            raise TypeError(
                f"Module {name!r} was selected by target_modules={targets!r} but cannot get dendrites: {reason}. "
                "Narrow `target_modules` or add it to `exclude_modules`."
            )
    return names


def _replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _move_accelerate_hook(old: nn.Module, new: nn.Module) -> None:
    """Re-attach an accelerate hook (device_map / offload) from the replaced layer to its replacement.

    A hook that offloads the layer's weights (they wait on "meta" and the hook loads them from its weights map
    for each forward pass) knows only the base parameters. On a dendritic layer it is wrapped so that it never
    sees the dendrite parameters: those stay on the hook's execution device, where new dendrites are created.
    """
    hook = old.__dict__.get("_hf_hook")
    if hook is None:
        return
    from accelerate.hooks import add_hook_to_module

    inner = hook.hook if isinstance(hook, _DendriteOffloadHook) else hook
    if isinstance(new, DendriticLayerMixin) and getattr(inner, "offload", False):
        device = getattr(inner, "execution_device", None)
        new._dendrite_device = torch.device(device) if device is not None else torch.device("cpu")
        hook = _DendriteOffloadHook(inner)
    else:
        hook = inner
    # add_hook_to_module re-runs init_hook, which records the tensors' current devices as their original ones; an
    # offloading hook already moved them to meta, so keep what it recorded when the model was dispatched
    # (remove_hook_from_module restores the weights there).
    original_devices = getattr(inner, "original_devices", None)
    add_hook_to_module(new, hook)
    if original_devices is not None:
        inner.original_devices = original_devices


def _accelerate_model_hook():
    from accelerate.hooks import ModelHook

    return ModelHook


class _DendriteOffloadHook(_accelerate_model_hook()):
    """An offloading accelerate hook, run with the dendrite parameters hidden from it (see `_move_accelerate_hook`)."""

    def __init__(self, hook):
        self.hook = hook

    @property
    def no_grad(self) -> bool:
        return self.hook.no_grad

    @contextlib.contextmanager
    def _without_dendrites(self, module: nn.Module):
        hidden = {name: module._parameters.pop(name) for name in DENDRITE_PARAM_NAMES if name in module._parameters}
        try:
            yield
        finally:
            module._parameters.update(hidden)

    def init_hook(self, module):
        with self._without_dendrites(module):
            return self.hook.init_hook(module)

    def pre_forward(self, module, *args, **kwargs):
        with self._without_dendrites(module):
            return self.hook.pre_forward(module, *args, **kwargs)

    def post_forward(self, module, output):
        with self._without_dendrites(module):
            return self.hook.post_forward(module, output)

    def detach_hook(self, module):
        with self._without_dendrites(module):
            return self.hook.detach_hook(module)

    def __repr__(self) -> str:
        return f"DendriteOffloadHook({self.hook!r})"


# ---------------------------------------------------------------------------------------------- summary
@dataclass
class LayerSummary:
    name: str
    kind: str
    num_dendrites: int
    base_params: int
    dendrite_params: int
    trainable_params: int


@dataclass
class DendriteSummary:
    """Exact parameter counts of a dendritic model (shared / tied parameters counted once)."""

    base_params: int
    dendrite_params: int
    trainable_params: int
    layers: list[LayerSummary] = field(default_factory=list)

    @property
    def total_params(self) -> int:
        return self.base_params + self.dendrite_params

    @property
    def num_dendrites(self) -> int:
        return sum(layer.num_dendrites for layer in self.layers)

    def to_dict(self) -> dict:
        return {
            "total_params": self.total_params,
            "base_params": self.base_params,
            "dendrite_params": self.dendrite_params,
            "trainable_params": self.trainable_params,
            "num_dendritic_layers": len(self.layers),
            "num_dendrites": self.num_dendrites,
            "layers": [vars(layer).copy() for layer in self.layers],
        }

    def __str__(self) -> str:
        width = max([len("layer")] + [len(layer.name) for layer in self.layers])
        lines = [f"{'layer':<{width}}  {'kind':<8} {'dendrites':>9} {'base':>12} {'dendrite':>12} {'trainable':>12}"]
        for layer in self.layers:
            lines.append(
                f"{layer.name:<{width}}  {layer.kind:<8} {layer.num_dendrites:>9} {layer.base_params:>12,} "
                f"{layer.dendrite_params:>12,} {layer.trainable_params:>12,}"
            )
        pct = 100.0 * self.dendrite_params / max(self.base_params, 1)
        lines.append(
            f"total: {self.total_params:,} params = base {self.base_params:,} + dendrites {self.dendrite_params:,} "
            f"({pct:.2f}% of base) in {len(self.layers)} dendritic layers with {self.num_dendrites} dendrites; "
            f"trainable {self.trainable_params:,}"
        )
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- wrapper
class DendriticModel(nn.Module):
    """A model whose target layers carry dendrites.

    Like PEFT's `PeftModel`, it wraps the model (`.model`) and passes forward calls and attribute access through
    to it, so `model.config`, `model.generate(...)` and `transformers.Trainer` keep working. Build one with
    `get_dendritic_model`.

    Example:
        >>> from transformers import AutoModelForSequenceClassification
        >>> from hf_dendrites import DendriteConfig, get_dendritic_model
        >>> model = get_dendritic_model(AutoModelForSequenceClassification.from_pretrained(path), DendriteConfig())
        >>> model.add_dendrites()          # every target layer gets one dendrite; outputs are unchanged
        >>> print(model.dendrite_summary())
    """

    def __init__(self, model: nn.Module, dendrite_config: DendriteConfig):
        super().__init__()
        self.model = model
        self.dendrite_config = dendrite_config
        # Number of growths so far; part of the seed of each growth so retried cycles get fresh dendrites.
        self.growth_count = 0
        # Set by DendriticTrainer before saving (metric, per-cycle table, curve, eval results); shown on the model card.
        self.training_summary: Optional[dict] = None
        # Keep the wrapped model's forward signature visible (the Trainer drops dataset columns by it).
        self.forward = functools.wraps(model.forward)(functools.partial(DendriticModel._forward, self))

    def _forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    # ------------------------------------------------------------------ layers
    def dendritic_layers(self) -> Iterator[tuple[str, DendriticLayerMixin]]:
        """(name, layer) for every dendritic layer, names relative to the wrapped model."""
        for name, module in self.model.named_modules():
            if isinstance(module, DendriticLayerMixin):
                yield name, module

    def dendrite_counts(self) -> dict[str, int]:
        """Number of dendrites of every dendritic layer, by layer name."""
        return {name: layer.num_dendrites for name, layer in self.dendritic_layers()}

    def _growth_generator(self) -> Optional[torch.Generator]:
        if self.dendrite_config.dendrite_seed is None:
            return None
        return torch.Generator().manual_seed(hash((self.dendrite_config.dendrite_seed, self.growth_count)) & 0x7FFF_FFFF_FFFF_FFFF)

    def add_dendrites(self, n: Optional[int] = None) -> None:
        """Give every dendritic layer `n` more dendrites (default: `dendrite_config.dendrites_per_cycle`).

        The new dendrites' output weights are zero, so the model computes exactly what it computed before. New
        parameters are new `Parameter` objects: rebuild any optimizer afterwards.
        """
        n = self.dendrite_config.dendrites_per_cycle if n is None else n
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"add_dendrites(n): n must be an integer >= 1, got {n!r}.")
        generator = self._growth_generator()
        for _, layer in self.dendritic_layers():
            layer.add_dendrites(n, generator=generator)
        self.growth_count += 1

    def set_dendrite_counts(self, counts: Union[int, dict[str, int]]) -> None:
        """Grow or truncate layers to the given dendrite counts (one int for all layers, or by layer name).

        Truncation drops the newest dendrites; growth adds freshly initialised ones.
        """
        layers = dict(self.dendritic_layers())
        if isinstance(counts, int):
            counts = {name: counts for name in layers}
        unknown = sorted(set(counts) - set(layers))
        if unknown:
            raise KeyError(f"No dendritic layers named {unknown[:5]}; dendritic layers are e.g. {sorted(layers)[:5]}.")
        generator = self._growth_generator()
        for name, k in counts.items():
            layer = layers[name]
            if k < layer.num_dendrites:
                layer.truncate_dendrites(k)
            elif k > layer.num_dendrites:
                layer.add_dendrites(k - layer.num_dendrites, generator=generator)

    def dendrite_parameters(self) -> list[nn.Parameter]:
        """All dendrite parameters (weights, biases, output and cascade weights) of all layers."""
        return [p for _, layer in self.dendritic_layers() for p in layer.dendrite_parameters()]

    def dendrite_state_dict(self) -> dict[str, torch.Tensor]:
        """The dendrite parameters only, keyed `<layer name>.<parameter name>` (names of the wrapped model)."""
        state = {}
        for name, layer in self.dendritic_layers():
            for pname in DENDRITE_PARAM_NAMES:
                p = getattr(layer, pname)
                if p is not None:
                    state[f"{name}.{pname}"] = p.detach()
        return state

    # ------------------------------------------------------------------ accounting
    def dendrite_summary(self) -> DendriteSummary:
        """Exact parameter counts: base / dendrite / trainable, in total and per dendritic layer."""
        dendrite_ids = {id(p) for p in self.dendrite_parameters()}
        seen: set[int] = set()
        base = dendrite = trainable = 0
        for p in self.model.parameters():  # parameters() already yields shared parameters once
            if id(p) in seen:
                continue
            seen.add(id(p))
            if id(p) in dendrite_ids:
                dendrite += p.numel()
            else:
                base += p.numel()
            if p.requires_grad:
                trainable += p.numel()
        layers = []
        for name, layer in self.dendritic_layers():
            base_params = layer.base_parameters()
            dend_params = layer.dendrite_parameters()
            layers.append(
                LayerSummary(
                    name=name,
                    kind=layer.base_class.__name__,
                    num_dendrites=layer.num_dendrites,
                    base_params=sum(p.numel() for p in base_params),
                    dendrite_params=sum(p.numel() for p in dend_params),
                    trainable_params=sum(p.numel() for p in base_params + dend_params if p.requires_grad),
                )
            )
        return DendriteSummary(base_params=base, dendrite_params=dendrite, trainable_params=trainable, layers=layers)

    def print_dendrite_summary(self) -> None:
        """Print `dendrite_summary()` as a table."""
        print(self.dendrite_summary())

    # ------------------------------------------------------------------ inference fusion
    def fuse_for_inference(self) -> "DendriticModel":
        """Fuse every dendritic layer so that base and dendrites run as one matmul / convolution.

        For inference only: run the model under `torch.no_grad()` / `torch.inference_mode()`; a forward pass
        that needs gradients raises until `unfuse()`. Outputs equal the unfused model's within float rounding.
        Each fused layer holds a concatenated copy of its base and dendrite input weights (memory: those weights
        once more) outside its parameters, so parameter names, the state dict and `save_pretrained` are
        unaffected; the copy is refreshed automatically when a parameter changes. `add_dendrites` and
        `set_dendrite_counts` unfuse the layers they change. `torch.compile` ignores the fusion (inductor fuses
        by itself). Returns the model, so `model.fuse_for_inference().eval()` chains.
        """
        for _, layer in self.dendritic_layers():
            layer.fuse()
        return self

    def unfuse(self) -> "DendriticModel":
        """Undo `fuse_for_inference` and free the fused weight copies (training works again)."""
        for _, layer in self.dendritic_layers():
            layer.unfuse()
        return self

    @property
    def is_fused(self) -> bool:
        """True when any dendritic layer is fused for inference."""
        return any(layer.is_fused for _, layer in self.dendritic_layers())

    # ------------------------------------------------------------------ unwrapping
    def get_base_model(self) -> nn.Module:
        """The wrapped model, still with its dendritic layers."""
        return self.model

    def unload(self) -> nn.Module:
        """Put the plain layers back (same Parameter objects, dendrites dropped) and return the plain model.

        This `DendriticModel` is unusable afterwards.
        """
        for name, layer in list(self.dendritic_layers()):
            plain = layer.to_base_layer()
            _replace_module(self.model, name, plain)
            _move_accelerate_hook(layer, plain)
        model = self.model
        del self.model
        return model

    # ------------------------------------------------------------------ saving (implemented in saving.py / hub.py)
    def save_pretrained(self, save_directory, **kwargs) -> str:
        """Save the base model (standard transformers files), the dendrites, `dendrite_config.json` and a model card.

        See `hf_dendrites.saving.save_dendritic_model` for the arguments (`state_dict`, `max_shard_size`,
        `processing_class`, ...). With `push_to_hub=True` the folder is also uploaded (`repo_id`, default: the
        folder's name, and the arguments of `push_to_hub`).
        """
        from .hub import push_saved_folder
        from .saving import save_dendritic_model

        if kwargs.pop("push_to_hub", False):
            return push_saved_folder(self, save_directory, **kwargs)
        return save_dendritic_model(self, save_directory, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "DendriticModel":
        """Load a model saved by `save_pretrained` / `push_to_hub` from a folder or a Hub repo id.

        See `hf_dendrites.saving.load_dendritic_model` (`model_class`, `revision`, `dtype`, `device_map`, ...).
        """
        from .saving import load_dendritic_model

        return load_dendritic_model(pretrained_model_name_or_path, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs):
        """Upload the model (base, dendrites, model card) to the Hub in one commit; see `hf_dendrites.hub.push_to_hub`."""
        from .hub import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)


def get_dendritic_model(model: nn.Module, config: Optional[DendriteConfig] = None) -> DendriticModel:
    """Convert the layers of `model` selected by `config` into dendritic layers, in place.

    The converted layers keep their parameters (same objects, same names) and start with zero dendrites, so the
    model computes exactly what it computed before; call `add_dendrites()` to grow them.

    Args:
        model: a transformers model (any `torch.nn.Module` works when `config.target_modules` is explicit).
        config: which layers and what kind of dendrites; the default uses the per-architecture targets.

    Example:
        >>> dm = get_dendritic_model(model, DendriteConfig(target_modules="all-linear"))
        >>> dm.add_dendrites(1)
    """
    config = DendriteConfig() if config is None else config
    if isinstance(model, DendriticModel):
        raise ValueError("This model is already a DendriticModel; grow it with `add_dendrites()` instead of converting it again.")
    if any(isinstance(m, DendriticLayerMixin) for m in model.modules()):
        raise ValueError(
            "This model already contains dendritic layers; wrap it once with `get_dendritic_model`, or call "
            "`DendriticModel.unload()` first to get the plain model back."
        )
    for name in resolve_target_modules(model, config):
        old = model.get_submodule(name)
        new = dendritic_class_for(old).from_base_layer(
            old,
            activation=config.activation,
            cascade=config.cascade,
            rank=config.rank,
            init_scale=config.init_scale,
        )
        _replace_module(model, name, new)
        _move_accelerate_hook(old, new)
    return DendriticModel(model, config)
