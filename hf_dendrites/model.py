"""Injection of dendritic layers into a model, and the `DendriticModel` wrapper.

`DendriticModel.save_pretrained` / `from_pretrained` / `push_to_hub` live here and orchestrate the file functions of
`hf_dendrites.saving` and the model card / upload functions of `hf_dendrites.hub`, which never import this module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import Any, Collection, Iterator, Optional, Union

import torch
from torch import nn
from transformers.utils import CONFIG_NAME, GENERATION_CONFIG_NAME

from . import (
    moe,
    quantized,  # noqa: F401  (registers the bitsandbytes kinds for when bitsandbytes is imported)
)
from .config import DendriteConfig
from .constants import (
    DEFAULT_TARGET_MODULES,
    DENDRITE_CONFIG_NAME,
    DENDRITE_TRAINED_BASE_NAME,
    DENDRITE_WEIGHTS_NAME,
    HEAD_MODULE_NAMES,
    MODEL_CARD_NAME,
    TRAINING_CURVE_NAME,
)
from .hub import hub_model_id, upload_checkpoint_folder, write_model_card
from .layers import (
    DendriticLayerMixin,
    dendritic_class_for,
    layer_kind_for,
    parameter_count,
    quantized_description,
    unsupported_reason,
)
from .peft_support import (
    ADAPTER,
    MODEL,
    active_adapters,
    adapter_layer_names,
    check_not_merged,
    checkpoint_peft_info,
    copy_adapter_tensors,
    describe_adapters,
    has_peft_layers,
    install_peft_save_guard,
    is_peft_model,
    is_plain_lora_layer,
    is_tuner_layer,
    load_adapters,
    module_roles,
    names_adapter_layer,
    plain_checkpoint_state,
    plain_key,
    read_adapter_tensors,
    replaced_module_keys,
    save_adapters,
    transformers_model,
)
from .saving import (
    CheckpointError,
    base_fingerprint,
    base_model_class,
    cached_hub_commit,
    check_adapter_only_keys,
    check_base_fingerprint,
    check_base_folder,
    check_base_tensors,
    check_dendrite_kind,
    check_layer_names,
    check_loading_info,
    describe_base_reference,
    find_dendritic_checkpoint,
    is_adapter_only,
    plain_load_notice_hidden,
    prepare_save_directory,
    read_base_state,
    read_checkpoint_metadata,
    read_dendrite_tensors,
    read_trained_base_tensors,
    resolve_checkpoint_dir,
    save_base_weights,
    save_dendrite_weights,
    split_adapter_state,
    split_state_dict,
    training_summary_from_metadata,
    write_checkpoint_metadata,
)
from .trainer_internals import QUANTIZED_ADAPTERS_FLAG, install_pipeline_type_check
from .utils import atomic_write_bytes, to_jsonable

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- matching
def _matches(name: str, pattern: Union[str, list[str]]) -> bool:
    """PEFT-style matching: a string is a full-match regex; a list matches exactly or as a dotted suffix."""
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == p or name.endswith("." + p) for p in pattern)


def _all_linear_kind(module: nn.Module) -> bool:
    """Whether "all-linear" selects `module` by its kind (nn.Linear, transformers Conv1D and the other kinds registered
    with `all_linear=True`), before the exclusions of `_all_linear_exclusions`."""
    kind = layer_kind_for(module)
    return kind is not None and kind.all_linear


def _skipped_quantized(model: nn.Module, excluded: Collection[str]) -> list[tuple[str, str]]:
    """(name, class) of the quantized linear layers of `model` that "all-linear" skips for want of a layer kind."""
    return [
        (n, q) for n, m in model.named_modules()
        if n not in excluded and not _all_linear_kind(m) and (q := quantized_description(m)) is not None
    ]


def _quantized_note(skipped: list[tuple[str, str]]) -> str:
    if not skipped:
        return ""
    classes = sorted({q for _, q in skipped})
    shown = ", ".join(f"`{n}`" for n, _ in skipped[:5]) + (", ..." if len(skipped) > 5 else "")
    return (
        f" It skipped {len(skipped)} quantized linear layer(s) of a kind hf_dendrites does not support ({', '.join(classes)}): "
        f"{shown}; bitsandbytes 4-bit / 8-bit layers are supported (docs/quantization.md)."
    )


def _all_linear_exclusions(model: nn.Module) -> dict[str, str]:
    """The modules that "all-linear" never targets, by name, each with the rule that excludes it.

    The output embedding (`get_output_embeddings()`), task heads (a name component in `HEAD_MODULE_NAMES`), and
    for a transformers task model every module outside its `base_model` (e.g. `BertForSequenceClassification`'s
    `classifier`): they are freshly initialised by `AutoModelFor*` classes and are not the pretrained network.
    """
    output_embeddings = None
    get_output = getattr(model, "get_output_embeddings", None)
    if callable(get_output):
        try:
            output_embeddings = get_output()
        except (AttributeError, NotImplementedError):
            output_embeddings = None
    base_model = getattr(model, "base_model", model)
    base_name = next((n for n, m in model.named_children() if m is base_model), None)
    base_ids = {id(m) for m in base_model.modules()} if isinstance(base_model, nn.Module) and base_model is not model else None
    excluded: dict[str, str] = {}
    for name, module in model.named_modules():
        if module is output_embeddings:
            excluded[name] = "the output embedding (the model's `get_output_embeddings()`)"
        elif set(name.split(".")) & HEAD_MODULE_NAMES:
            excluded[name] = "a task head"
        elif base_ids is not None and id(module) not in base_ids:
            where = f"`{base_name}`" if base_name else f"`{type(model).__name__}.base_model`"
            excluded[name] = f"a task head (outside the base model {where})"
    return excluded


def _no_match_message(model: nn.Module, config: DendriteConfig, targets: Union[str, list[str]], selected: list[str]) -> str:
    """Why `targets` selected no layer, and how to target one explicitly."""
    what = f"target_modules={targets!r} matched no layer of {type(model).__name__}"
    if selected:  # the targets matched, but exclude_modules removed everything
        shown = ", ".join(f"`{n}`" for n in selected[:5]) + (", ..." if len(selected) > 5 else "")
        return (
            f"{what} once exclude_modules={config.exclude_modules!r} is applied: it excludes every selected layer "
            f"({shown}). Narrow `exclude_modules`."
        )
    if targets == "all-linear":
        excluded = _all_linear_exclusions(model)
        skipped = [n for n, m in model.named_modules() if _all_linear_kind(m) and n in excluded]
        quantized = _quantized_note(_skipped_quantized(model, excluded))
        if skipped:
            reasons = "; ".join(f"`{n}` is {excluded[n]}" for n in skipped[:5]) + ("; ..." if len(skipped) > 5 else "")
            them = "it" if len(skipped) == 1 else "them"
            return (
                f"{what}: 'all-linear' targets every nn.Linear / Conv1D except task heads and the output embedding, and "
                f"this model has no other.{quantized} {reasons}, which 'all-linear' never targets; pass "
                f"target_modules={skipped[:5]!r} to target {them} explicitly."
            )
        return (
            f"{what}: it has no nn.Linear or transformers Conv1D layer.{quantized} Pass the names of the layers to target."
        )
    candidates = [n for n, m in model.named_modules() if dendritic_class_for(m) is not None]
    shown = ", ".join(candidates[:12]) + (", ..." if len(candidates) > 12 else "")
    return (
        f"{what} (exclude_modules={config.exclude_modules!r}). A list entry matches a module name exactly or as a "
        f"dotted suffix; a string is a regular expression matching the full name. Supported layers in this model "
        f"include: {shown or 'none'}."
    )


def resolve_target_modules(model: nn.Module, config: DendriteConfig) -> list[str]:
    """Names of the modules of `model` that `config` selects, in `named_modules()` order.

    Raises a `ValueError` when nothing matches, saying which rule excluded which layer (task head, output
    embedding, `exclude_modules`) and how to target layers explicitly, and a `TypeError` when a selected module is
    not a supported layer kind.

    Example:
        >>> resolve_target_modules(bert_classifier, DendriteConfig(target_modules=["query", "value"]))
        ['bert.encoder.layer.0.attention.self.query', 'bert.encoder.layer.0.attention.self.value', ...]
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

    moe.register_experts_kinds(model)  # the fused experts classes this model uses (hf_dendrites/moe.py)
    peft = has_peft_layers(model)
    roles = module_roles(model) if peft else {}
    modules = dict(model.named_modules())
    selected: list[str] = []
    if peft:
        selected = _peft_selection(model, targets, roles, modules)
    elif targets == "all-linear":
        excluded = _all_linear_exclusions(model)
        routers = moe.routers(model)  # MoE routers and gates: never dendritic (hf_dendrites/moe.py)
        for name, module in model.named_modules():
            if _all_linear_kind(module) and name not in excluded and name not in routers:
                selected.append(name)
        skipped = _skipped_quantized(model, excluded)
        if skipped and selected:
            logger.warning("target_modules='all-linear' leaves layers without dendrites.%s", _quantized_note(skipped))
    else:
        wrong = moe.parameter_pattern_error(model, targets, _matches)
        if wrong is not None:
            raise ValueError(wrong)
        for name, _ in model.named_modules():
            if name and _matches(name, targets):
                selected.append(name)
    names = selected
    if config.exclude_modules is not None:
        exclude = config.exclude_modules
        names = [n for n in selected if not (_matches(n, exclude) or (peft and _matches(roles[n][0], exclude)))]
    if not names:
        message = _no_match_message(transformers_model(model), config, targets, selected)
        if peft:
            example = sorted(adapter_layer_names(model))[:2]
            message += (
                " In a PEFT model, names are those of the model without PEFT (`q_proj` is the layer LoRA wraps); the "
                f"adapter's own layers are selected by naming them in a list, e.g. target_modules={example!r}."
            )
        raise ValueError(message)
    for name in names:
        reason = unsupported_reason(modules[name])
        if reason is not None:
            raise TypeError(
                f"Module {name!r} was selected by target_modules={targets!r} but cannot get dendrites: {reason}. "
                "Narrow `target_modules` or add it to `exclude_modules`."
            )
    return names


def _peft_selection(
    model: nn.Module, targets: Union[str, list[str]], roles: dict[str, tuple[str, str]], modules: dict[str, nn.Module]
) -> list[str]:
    """What `targets` selects in a PeftModel or a model with PEFT layers (docs/peft.md), in `named_modules()` order.

    Targets match the model's own layers by the names of the model without PEFT (`q_proj` is the layer LoRA wraps,
    `...q_proj.base_layer`) or by their full names; "all-linear" and the defaults never select an adapter's sublayer.
    Those are selected only by a list entry that names one (`"lora_A"`, `"q_proj.lora_B"`): the supported layers of
    the matching module (LoRA's `lora_A` is a ModuleDict of one Linear per adapter) are taken.
    """
    own = [n for n, (_, role) in roles.items() if role == MODEL]
    if targets == "all-linear":
        inner = transformers_model(model)
        excluded = {id(inner.get_submodule(n)) for n in [*_all_linear_exclusions(inner), *moe.routers(inner)]}
        return [n for n in own if _all_linear_kind(modules[n]) and id(modules[n]) not in excluded]
    selected = {n for n in own if n and (_matches(roles[n][0], targets) or _matches(n, targets))}
    adapter_names = adapter_layer_names(model)
    entries = [t for t in targets if names_adapter_layer(t, adapter_names)] if isinstance(targets, list) else []
    for name, (plain, role) in roles.items():
        if entries and role == ADAPTER and _matches(plain, entries):
            if dendritic_class_for(modules[name]) is not None:
                selected.add(name)
            else:
                selected.update(f"{name}.{c}" for c, child in modules[name].named_children() if dendritic_class_for(child))
    return [n for n in modules if n in selected]


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
        hidden = {name: module._parameters.pop(name) for name in module.dendrite_param_names if name in module._parameters}
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
        # The Hub id of the base model that a loaded checkpoint recorded, so that a model loaded from a local folder
        # and saved again keeps its card's `base_model` (see `_base_hub_id`).
        self.base_model_id: Optional[str] = None
        # The base that an adapter-only checkpoint this model was loaded from references ({"name_or_path",
        # "revision", "dtype"}): an adapter-only save references it again (see `save_pretrained`).
        self.base_reference: Optional[dict[str, Any]] = None
        # Keep the wrapped model's forward signature visible (the Trainer drops dataset columns by it); a PeftModel's
        # forward takes (*args, **kwargs), so the signature is the transformers model's under it.
        self.forward = functools.wraps(transformers_model(model).forward)(functools.partial(DendriticModel._forward, self))
        install_peft_save_guard()
        install_pipeline_type_check(DendriticModel)  # pipeline(task, model=self) checks the wrapped model's class

    def _forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    @property
    def _hf_peft_config_loaded(self) -> bool:
        """transformers' Trainer trains a quantized model only with adapters attached (trainer_internals.py,
        `QUANTIZED_ADAPTERS_FLAG`): the dendrites are this model's."""
        return any(True for _ in self.dendritic_layers()) or bool(getattr(self.model, QUANTIZED_ADAPTERS_FLAG, False))

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
        install_peft_save_guard()  # peft may have been imported since this model was built (docs/peft.md)
        for name, module in self.model.named_modules():
            if isinstance(module, DendriticLayerMixin):
                yield name, module

    def _checkpoint_layers(self) -> dict[str, DendriticLayerMixin]:
        """The dendritic layers by the names checkpoints use: the wrapped model's names, or for a PEFT model the
        plain model's names (`...q_proj`, not `base_model.model....q_proj.base_layer`; see peft_support.py)."""
        if not has_peft_layers(self.model):
            return dict(self.dendritic_layers())
        roles = module_roles(self.model)
        return {roles[name][0]: layer for name, layer in self.dendritic_layers()}

    def checkpoint_names(self) -> dict[str, str]:
        """{name in `.model.state_dict()`: name in checkpoints} of the model's own tensors (base and dendrites): the
        same names, or for a PEFT model the plain model's names (see peft_support.py), the adapter's tensors left
        out (a checkpoint holds them in `peft_adapter/`)."""
        keys = self.model.state_dict(keep_vars=True).keys()
        if not has_peft_layers(self.model):
            return {key: key for key in keys}
        roles = module_roles(self.model)
        names = {}
        for key in keys:
            plain, role = plain_key(key, roles)
            if role == MODEL:
                names[key] = plain
        return names

    def dendrite_counts(self) -> dict[str, int]:
        """Number of dendrites of every dendritic layer, by layer name."""
        return {name: layer.num_dendrites for name, layer in self.dendritic_layers()}

    def _growth_generator(self) -> Optional[torch.Generator]:
        if self.dendrite_config.dendrite_seed is None:
            return None
        return torch.Generator().manual_seed(hash((self.dendrite_config.dendrite_seed, self.growth_count)) & 0x7FFF_FFFF_FFFF_FFFF)

    def growth_generator(self) -> Optional[torch.Generator]:
        """The seeded generator of the next growth (None without `dendrite_seed`). The correlation rule draws its
        candidates from it, so that every process, and a resumed run, draws the same ones."""
        return self._growth_generator()

    def add_dendrites(self, n: Optional[int] = None) -> None:
        """Give every dendritic layer `n` more dendrites (default: `dendrite_config.dendrites_per_cycle`).

        The new dendrites' output weights are zero, so the model computes exactly what it computed before. New
        parameters are new `Parameter` objects: rebuild any optimizer afterwards. Every dendrite parameter is
        trainable afterwards, whatever froze it before (e.g. `peft.get_peft_model`, which freezes all but the adapter).
        """
        n = self.dendrite_config.dendrites_per_cycle if n is None else n
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"add_dendrites(n): n must be an integer >= 1, got {n!r}.")
        generator = self._growth_generator()
        for _, layer in self.dendritic_layers():
            layer.add_dendrites(n, generator=generator)
            for param in layer.dendrite_parameters():
                param.requires_grad_(True)
        self.growth_count += 1

    def set_dendrite_counts(self, counts: Union[int, dict[str, int]], *, initialize: bool = True) -> None:
        """Grow or truncate layers to the given dendrite counts (one int for all layers, or by layer name).

        Truncation drops the newest dendrites; growth adds freshly initialised ones (`initialize=False`: uninitialised
        input weights, for callers that overwrite every dendrite parameter next, such as checkpoint loading).
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
                layer.add_dendrites(k - layer.num_dendrites, generator=generator, initialize=initialize)

    def load_snapshot_state(self, state: dict[str, torch.Tensor]) -> None:
        """`load_state_dict(state, strict=True)` for a `state_dict()` of this model taken earlier (a best-weight
        snapshot). Entries that are neither parameters nor buffers (a quantized layer's quantization state, which
        bitsandbytes writes into the state dict but does not load back, derived from its frozen weight) must equal the
        model's current ones, and are then left out of the load; one that differs is an error."""
        own = {n for n, _ in self.named_parameters(remove_duplicate=False)}
        own |= {n for n, _ in self.named_buffers(remove_duplicate=False)}
        derived = [k for k in state if k not in own]
        current = self.state_dict() if derived else {}
        changed = sorted(k for k in derived if k in current and not torch.equal(current[k].detach().cpu(), state[k].cpu()))
        if changed:
            raise RuntimeError(
                f"Cannot restore these weights: the quantization state {changed[:3]} differs from the model's (a frozen "
                "quantized weight changed since they were taken)."
            )
        self.load_state_dict({k: v for k, v in state.items() if k in own or k not in current}, strict=True)

    def dendrite_parameters(self) -> list[nn.Parameter]:
        """All dendrite parameters (weights, biases, output and cascade weights) of all layers."""
        return [p for _, layer in self.dendritic_layers() for p in layer.dendrite_parameters()]

    @torch.no_grad()
    def dendrite_weight_ratios(
        self, state: Optional[dict[str, torch.Tensor]] = None, first: Optional[dict[str, int]] = None
    ) -> dict[str, float]:
        """How much the dendrites carry, per dendritic layer, relative to the layer's own weights.

        For the dendrites k of a layer with base weight W and dendrite input weights D_k (B_k A_k for low rank),
        output weights w_k: `RMS(w) * RMS(D) / RMS(W)`, the size of the dendrites' contribution to a neuron's
        pre-activation relative to the neuron's own, to first order (an activation of slope about 1 near 0). Zero
        output weights (new dendrites, identity at insertion) give 0; dendrites that carry as much as the neurons
        give about 1.

        Args:
            state: a state dict of this model (keys as `self.state_dict()`; its dendrite counts may differ from the
                model's), e.g. a best-weight snapshot; default: the current weights.
            first: per layer name, the index of the first dendrite to include (e.g. the count before a growth, to
                measure that growth's dendrites only); default 0. Layers without such dendrites are left out.

        Example:
            >>> dm.add_dendrites(); dm.dendrite_weight_ratios()  # doctest: +SKIP
            {'bert.encoder.layer.0.intermediate.dense': 0.0, ...}
        """
        out: dict[str, float] = {}
        for name, layer in self.dendritic_layers():

            def get(pname: str, name: str = name, layer: DendriticLayerMixin = layer) -> Optional[torch.Tensor]:
                return state.get(f"model.{name}.{pname}") if state is not None else getattr(layer, pname)

            if isinstance(layer, moe.DendriticExperts):  # [E, K, N] per projection (hf_dendrites/moe.py)
                out_weights = get(f"{layer.projections[0]}_dendrite_out")
                k_all, start = (0 if out_weights is None else out_weights.shape[1]), (first or {}).get(name, 0)
            else:
                out_weights = get("dendrite_out")  # [K, N]: K is the dendrite count of `state`, which may differ from now
                k_all, start = (0 if out_weights is None else out_weights.shape[0]), (first or {}).get(name, 0)
            if k_all <= start:
                continue
            out[name] = layer.dendrite_weight_ratio(get, start, k_all)
        return out

    def dendrite_state_dict(self) -> dict[str, torch.Tensor]:
        """The dendrite parameters only, keyed `<layer name>.<parameter name>` (names of the wrapped model)."""
        state = {}
        for name, layer in self.dendritic_layers():
            for pname in layer.dendrite_param_names:
                p = getattr(layer, pname)
                if p is not None:
                    state[f"{name}.{pname}"] = p.detach()
        return state

    # ------------------------------------------------------------------ switching dendrites off (ablation)
    def _dendrites_to_disable(
        self, growths: Optional[Union[int, list[int], tuple[int, ...]]], first: Optional[dict[str, int]]
    ) -> dict[str, list[int]]:
        """Per layer, the dendrite indices that `growths` / `first` select (see `disable_dendrites`)."""
        layers = dict(self.dendritic_layers())
        if growths is not None and first is not None:
            raise ValueError("Pass `growths=` or `first=`, not both.")
        if first is not None:
            unknown = sorted(set(first) - set(layers))
            if unknown:
                raise KeyError(f"No dendritic layers named {unknown[:5]}; dendritic layers are e.g. {sorted(layers)[:5]}.")
            return {name: list(range(int(first.get(name, 0)), layer.num_dendrites)) for name, layer in layers.items()}
        if growths is None:
            return {name: list(range(layer.num_dendrites)) for name, layer in layers.items()}
        chosen = [growths] if isinstance(growths, int) else list(growths)
        per = self.dendrite_config.dendrites_per_cycle
        present = max((-(-layer.num_dendrites // per) for layer in layers.values()), default=0)
        bad = [g for g in chosen if isinstance(g, bool) or not isinstance(g, int) or not 1 <= g <= present]
        if bad:
            raise ValueError(
                f"growths={growths!r}: this model has {present} growth(s) of dendrites (numbered 1 to {present}, "
                f"{per} dendrite(s) per layer each, `dendrites_per_cycle`); got {bad}."
            )
        return {name: [k for g in chosen for k in range((g - 1) * per, min(g * per, layer.num_dendrites))]
                for name, layer in layers.items()}

    def disable_dendrites(
        self, growths: Optional[Union[int, list[int], tuple[int, ...]]] = None, *, first: Optional[dict[str, int]] = None
    ) -> "DendriticModel":
        """Switch dendrites off, for ablations: the model computes what it would compute without them, until
        `enable_dendrites()`.

        A switched-off dendrite's output weights and the cascade weights that feed its activation to later
        dendrites (`cascade=True`) count as zero in every forward path, fused or not. No parameter is written:
        the state dict, `save_pretrained` and an optimizer see the real weights (the switch is not saved), and
        switching back on gives exactly the previous outputs. Gradients do not reach the output weights of
        switched-off dendrites. Dendrites switched off earlier stay off.

        Args:
            growths: None (all dendrites), or growth numbers (1-based, an int or a list): growth g is the g-th block
                of `dendrite_config.dendrites_per_cycle` dendrites of every layer, i.e. the dendrites that the kept
                cycle g of a `DendriticTrainer` run added (discarded cycles leave none).
            first: instead of `growths`, per layer name the index of the first dendrite to switch off (later ones
                too; layers not named: all), e.g. the dendrite counts before a growth, as in
                `dendrite_weight_ratios`.

        Returns the model. See `dendrites_disabled` for a context manager.
        """
        selection = self._dendrites_to_disable(growths, first)
        for name, layer in self.dendritic_layers():
            if selection[name]:
                layer.disable_dendrites(selection[name])
        return self

    def enable_dendrites(self) -> "DendriticModel":
        """Switch every dendrite back on (undo `disable_dendrites`). Returns the model."""
        for _, layer in self.dendritic_layers():
            layer.enable_dendrites()
        return self

    def disabled_dendrites(self) -> dict[str, tuple[int, ...]]:
        """The indices of the switched-off dendrites of every layer that has some (empty when all are on)."""
        return {name: off for name, layer in self.dendritic_layers() if (off := layer.disabled_dendrites)}

    @contextlib.contextmanager
    def dendrites_disabled(
        self, growths: Optional[Union[int, list[int], tuple[int, ...]]] = None, *, first: Optional[dict[str, int]] = None
    ) -> Iterator["DendriticModel"]:
        """Context manager: `disable_dendrites(growths, first=first)` inside, the previous switches afterwards.

        Example:
            >>> with dm.dendrites_disabled(growths=[2]):  # doctest: +SKIP
            ...     without = trainer.evaluate()           # the model without the second growth's dendrites
        """
        selection = self._dendrites_to_disable(growths, first)  # validate before switching anything
        previous = {name: layer._dendrites_off for name, layer in self.dendritic_layers()}
        try:
            for name, layer in self.dendritic_layers():
                if selection[name]:
                    layer.disable_dendrites(selection[name])
            yield self
        finally:
            for name, layer in self.dendritic_layers():
                layer._dendrites_off = previous.get(name)

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
            count = parameter_count(p)  # a packed quantized weight counts the values it encodes
            if id(p) in dendrite_ids:
                dendrite += count
            else:
                base += count
            if p.requires_grad:
                trainable += count
        layers = []
        for name, layer in self.dendritic_layers():
            base_params = layer.base_parameters()
            dend_params = layer.dendrite_parameters()
            layers.append(
                LayerSummary(
                    name=name,
                    kind=layer.kind_name,
                    num_dendrites=layer.num_dendrites,
                    base_params=layer.base_parameter_count(),
                    dendrite_params=sum(p.numel() for p in dend_params),
                    trainable_params=sum(parameter_count(p) for p in base_params + dend_params if p.requires_grad),
                )
            )
        return DendriteSummary(base_params=base, dendrite_params=dendrite, trainable_params=trainable, layers=layers)

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
        unfused = sorted({layer.kind_name for _, layer in self.dendritic_layers() if not layer.supports_fusion})
        for _, layer in self.dendritic_layers():
            layer.fuse()
        if unfused:
            logger.info("fuse_for_inference: %s layers do not fuse (their kind computes base and dendrites apart); "
                        "they stay unfused.", ", ".join(unfused))
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
        quantized.release_cpu_repacking(self.model)
        model = self.model
        del self.model
        return model

    def merge_and_unload(self, **kwargs: Any) -> "DendriticModel":
        """For a `DendriticModel` wrapping a LoRA `PeftModel`: merge the adapter into the base weights
        (`PeftModel.merge_and_unload(**kwargs)`) and return a `DendriticModel` of the plain transformers model, with
        the same dendrites (same Parameter objects), `growth_count` and training summary.

        The dendrites read the layer's input, so merging LoRA's update into the weight leaves them as they were.
        Refused for dendrites on the adapter's own layers (merging would drop them) and for adapters other than
        plain LoRA (DoRA, IA3, LoHa, ... rescale what the base layer computes, dendrites included). This
        `DendriticModel` is unusable afterwards. See docs/peft.md.
        """
        if not is_peft_model(self.model):
            raise ValueError(
                "merge_and_unload() merges the PEFT adapter of a DendriticModel that wraps a PeftModel; this one wraps "
                f"a {type(self.model).__name__}. When LoRA was added after the dendrites (`get_peft_model(dm.model, "
                "...)`), call merge_and_unload() on that PeftModel: `dm` then holds the merged model."
            )
        roles = module_roles(self.model)
        on_adapter = [name for name, _ in self.dendritic_layers() if roles[name][1] == ADAPTER]
        if on_adapter:
            raise ValueError(
                f"Cannot merge: {on_adapter[0]!r} (and {len(on_adapter) - 1} more) is a layer of the adapter with "
                "dendrites, which merging the adapter into the base weights would drop. Save the model as it is "
                "(`save_pretrained`) instead."
            )
        other = [n for n, m in self.model.named_modules() if is_tuner_layer(m) and not is_plain_lora_layer(m)]
        if other:
            raise ValueError(
                f"Cannot merge {type(self.model.get_submodule(other[0])).__module__} layers such as {other[0]!r} with "
                "dendrites: only plain LoRA (no DoRA) adds its update to the layer's output, which merging keeps exact "
                "with the dendrites."
            )
        merged = self.model.merge_and_unload(**kwargs)
        dm = DendriticModel(merged, self.dendrite_config)
        dm.growth_count, dm.training_summary, dm.base_model_id = self.growth_count, self.training_summary, self.base_model_id
        dm.train(merged.training)
        del self.model
        return dm

    # ------------------------------------------------------------------ saving and loading (files: saving.py, card: hub.py)
    def save_pretrained(
        self,
        save_directory: Union[str, os.PathLike],
        *,
        state_dict: Optional[dict[str, torch.Tensor]] = None,
        safe_serialization: bool = True,
        max_shard_size: Optional[Union[int, str]] = None,
        processing_class: Any = None,
        is_main_process: bool = True,
        push_to_hub: bool = False,
        repo_id: Optional[str] = None,
        tags: Optional[list[str]] = None,
        adapter_only: bool = False,
        trainable: Optional[Collection[str]] = None,
        base_model_name_or_path: Optional[str] = None,
        base_revision: Optional[str] = None,
        **push_kwargs: Any,
    ) -> str:
        """Save the base model (standard transformers files), the dendrites, `dendrite_config.json` and a model card.

        The folder layout is described in `hf_dendrites.saving`. Files of an earlier save in the folder are replaced
        (weights, shards, training curve); other files (e.g. a Trainer's `optimizer.pt`) are left alone. The model is
        not modified. `DendriticTrainer` checkpoints and `trainer.save_model()` call this.

        With `adapter_only=True` (for a model whose base is frozen) the folder holds only what training changes: the
        dendrites, the parameters that train (e.g. a task head, adapters) and the persistent buffers, plus
        `config.json`, a reference to the base model (`base_model_name_or_path`, default: where the model was
        loaded from) and a fingerprint of the frozen weights; `from_pretrained` loads the base from the reference
        and refuses one whose frozen weights differ. The default is a full, self-contained save, as transformers'
        `save_pretrained` writes (it loads with nothing else at hand, and plain transformers loads its base);
        `DendriticTrainer` writes adapter-only Trainer checkpoints on its own when the run's base is frozen. For a
        PEFT model the adapters are written to `peft_adapter/` as in a full save, and the fingerprint covers the
        frozen base under the plain model's names (so the base, loaded by transformers, is checked as it is).

        Args:
            save_directory: the folder (created if needed).
            state_dict: the full state dict to save instead of the model's own tensors (keys of `dm.state_dict()` or
                of `dm.model.state_dict()`, e.g. gathered under FSDP).
            safe_serialization: must be True: checkpoints are safetensors only.
            max_shard_size: shard the base weights above this size (transformers' `max_shard_size`).
            processing_class: a tokenizer, processor or feature extractor saved alongside.
            is_main_process: False on the other processes of a distributed run: nothing is written there.
            push_to_hub: also upload the files this save wrote to `repo_id` (default: the folder's name, as in
                transformers), in one commit; `push_kwargs` are those of `push_to_hub` (`token`, `private`,
                `commit_message`, `commit_description`, `revision`, `create_pr`).
            repo_id: the Hub repo the folder is for (used in the model card's loading example).
            tags: extra model card tags.
            adapter_only: write an adapter-only checkpoint (see above). Needs at least one frozen parameter.
            trainable: with `adapter_only`, the names of the parameters that train (as `named_parameters()` of this
                model or of `.model` gives them), when `requires_grad` does not say it (the Trainer's dendrites-only
                phase freezes the base for a while); default: those with `requires_grad=True`.
            base_model_name_or_path: with `adapter_only`, the base to reference (a Hub id or a local folder, which
                only that machine can load); default: the reference of the adapter-only checkpoint this model was
                loaded from, else `config._name_or_path` (a pushed checkpoint needs a Hub id).
            base_revision: the base's revision (default, for a Hub id: the commit of its main branch in the local
                Hub cache, which a load of the default branch used; pass it when the base was loaded at another).

        Returns:
            The folder path.
        """
        if not safe_serialization:
            raise ValueError(
                "hf_dendrites checkpoints are safetensors only; call save_pretrained with safe_serialization=True."
            )
        unknown = sorted(set(push_kwargs) - {"token", "private", "commit_message", "commit_description", "revision", "create_pr"})
        if unknown or (push_kwargs and not push_to_hub):
            raise TypeError(
                f"save_pretrained() got unexpected keyword arguments {unknown or sorted(push_kwargs)}; the Hub arguments "
                "(token, private, commit_message, commit_description, revision, create_pr) apply with push_to_hub=True."
            )
        directory = os.fspath(save_directory)
        if os.path.isfile(directory):
            raise ValueError(f"save_pretrained needs a folder, but {directory} is a file.")
        if state_dict is None:
            from .fsdp import refuse_sharded_save

            refuse_sharded_save(self)  # FSDP2 shards: each process holds a part; `trainer.save_model()` gathers them
        adapter = self._adapter_save_options(adapter_only, trainable, base_model_name_or_path, base_revision)
        if not is_main_process:
            return directory
        if not push_to_hub:
            self._write_checkpoint(directory, state_dict, max_shard_size, processing_class, repo_id, tags, adapter)
            return directory
        self._check_pushable(adapter)

        from huggingface_hub import HfApi

        token = push_kwargs.pop("token", None)
        repo_id = repo_id or os.path.basename(os.path.normpath(directory))
        repo_id = HfApi(token=token).create_repo(
            repo_id, private=push_kwargs.pop("private", None), exist_ok=True, repo_type="model"
        ).repo_id

        def stamps() -> dict[str, int]:
            if not os.path.isdir(directory):
                return {}
            return {e.name: e.stat().st_mtime_ns for e in os.scandir(directory) if e.is_file()}

        before = stamps()
        own = self._write_checkpoint(directory, state_dict, max_shard_size, processing_class, repo_id, tags, adapter)
        # The files this save wrote: its own, plus the processing class's (changed since), whatever the clock's
        # granularity; files that were already in the folder (e.g. Trainer checkpoints) stay local.
        written = sorted(name for name, stamp in stamps().items() if before.get(name) != stamp or name in own)
        written += sorted(name for name in own if "/" in name)  # a PEFT model's adapter files (peft_adapter/)
        upload_checkpoint_folder(directory, repo_id, token=token, allow_patterns=written, **push_kwargs)
        return directory

    def _adapter_save_options(
        self,
        adapter_only: bool,
        trainable: Optional[Collection[str]],
        base_model_name_or_path: Optional[str],
        base_revision: Optional[str],
    ) -> Optional[dict[str, Any]]:
        """None for a full save; for `adapter_only=True`: the trainable names (relative to `.model`) and the base
        reference."""
        if not isinstance(adapter_only, bool):
            raise TypeError(f"save_pretrained(adapter_only=...) takes True or False, got {adapter_only!r}.")
        if not adapter_only:
            given = [n for n, v in (("trainable", trainable), ("base_model_name_or_path", base_model_name_or_path),
                                    ("base_revision", base_revision)) if v is not None]
            if given:
                raise TypeError(f"save_pretrained({', '.join(given)}=...) applies to adapter_only=True saves only.")
            return None
        names = None
        if trainable is not None:
            if isinstance(trainable, str):
                raise TypeError("save_pretrained(trainable=...) takes a collection of parameter names, not one string.")
            own = {n for n, _ in self.model.named_parameters(remove_duplicate=False)}
            names = {n if n in own else n[len("model."):] for n in trainable}
            unknown = sorted(names - own)
            if unknown:
                raise ValueError(
                    f"save_pretrained(trainable=...) names parameters the model does not have, e.g. {unknown[:3]}."
                )
        base = transformers_model(self.model)
        config = getattr(base, "config", None)
        if base_model_name_or_path is not None:
            source, revision = os.fspath(base_model_name_or_path), base_revision
        elif self.base_reference is not None:
            source = self.base_reference.get("name_or_path")
            revision = base_revision or self.base_reference.get("revision")
        else:
            source = getattr(config, "_name_or_path", None) or None
            revision = base_revision or (cached_hub_commit(source) if hub_model_id(source) else None)
        if source and hub_model_id(source) is None and os.path.exists(source):
            source = os.path.abspath(source)
        dtype = getattr(base, "dtype", None)
        reference = {
            "name_or_path": source,
            "revision": revision,
            "dtype": str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else None,
        }
        return {"trainable": names, "reference": reference}

    @staticmethod
    def _check_pushable(adapter: Optional[dict[str, Any]]) -> None:
        """An adapter-only checkpoint goes to the Hub only with a base that others can load: a Hub id."""
        if adapter is None:
            return
        source = adapter["reference"]["name_or_path"]
        if hub_model_id(source) is None:
            raise ValueError(
                f"An adapter-only checkpoint pushed to the Hub must reference its base by Hub id, but the base is "
                f"{source!r} (a local folder, or none). Pass base_model_name_or_path='<owner>/<repo>' (the repo "
                "holding exactly these base weights; push the base there first), or push a full checkpoint "
                "(adapter_only=False)."
            )

    def _write_checkpoint(
        self,
        directory: str,
        state_dict: Optional[dict[str, torch.Tensor]],
        max_shard_size: Optional[Union[int, str]],
        processing_class: Any,
        repo_id: Optional[str],
        tags: Optional[list[str]],
        adapter: Optional[dict[str, Any]] = None,
    ) -> set[str]:
        """Write the checkpoint files in the order that keeps an interrupted save unloadable (marker last); returns
        the names of the checkpoint's own files. `adapter` (from `_adapter_save_options`): an adapter-only save."""
        training = to_jsonable(self.training_summary) if self.training_summary else None
        # Read before the folder is cleaned: the curve may be the one an earlier save put there.
        curve = (training or {}).get("curve_png")
        curve_bytes = None
        if curve:
            if os.path.isfile(curve):
                with open(curve, "rb") as handle:
                    curve_bytes = handle.read()
            else:
                logger.warning("Training curve %s not found; the model card will not show it.", curve)

        peft = has_peft_layers(self.model)
        if peft:
            check_not_merged(self.model, "DendriticModel.save_pretrained")
        model_state = self.model.state_dict()
        base_state, dendrite_state = split_state_dict(state_dict, model_state, set(self.dendrite_state_dict()))
        layers = self.dendrite_counts()
        if peft:  # the plain model's names, so the base files load into the transformers class (peft_support.py)
            base_state, dendrite_state, layers = plain_checkpoint_state(self.model, base_state, dendrite_state, layers)
        summary = self.dendrite_summary()
        adapter_entry: dict[str, Any] = {}
        if adapter is not None:  # split and fingerprint before the folder is touched: errors leave it as it was
            trained, frozen, aliases = self._split_adapter_only(base_state, adapter["trainable"])
            if not frozen:
                raise ValueError(
                    "save_pretrained(adapter_only=True): every parameter of the base model trains, so an adapter-only "
                    "checkpoint would hold all of them; freeze the base (requires_grad=False) or save with "
                    "adapter_only=False."
                )
            fingerprint = base_fingerprint(frozen)
            adapter_entry = {"reference": adapter["reference"], "fingerprint": fingerprint, "aliases": aliases}
        prepare_save_directory(directory)
        if adapter is None:
            with self._dendrites_hidden_from_quantized_save(state_dict):
                base_files = save_base_weights(
                    transformers_model(self.model), directory, base_state, base_params=summary.base_params,
                    max_shard_size=max_shard_size,
                )
        else:
            base_files = []
            save_dendrite_weights(directory, trained, DENDRITE_TRAINED_BASE_NAME)
            self._save_base_config(directory)
        save_dendrite_weights(directory, dendrite_state)
        adapters, adapter_files = save_adapters(self.model, directory) if peft else ([], [])

        if curve_bytes is not None:
            atomic_write_bytes(os.path.join(directory, TRAINING_CURVE_NAME), curve_bytes)
        if training is not None:
            training["curve_png"] = TRAINING_CURVE_NAME if curve_bytes is not None else None
        config = getattr(self.model, "config", None)
        base_id = self._base_hub_id()
        write_model_card(
            directory,
            architecture=type(transformers_model(self.model)).__name__,
            model_type=getattr(config, "model_type", None),
            name_or_path=base_id,
            dendrite_config=self.dendrite_config.to_dict(),
            summary=summary.to_dict(),
            training_summary=training,
            repo_id=repo_id,
            tags=tags,
            curve_file=TRAINING_CURVE_NAME if curve_bytes is not None else None,
            adapter_base=describe_base_reference(adapter["reference"]) if adapter is not None else None,
            peft_adapters=describe_adapters(self.model) if peft else None,
        )
        if processing_class is not None:
            processing_class.save_pretrained(directory)
        write_checkpoint_metadata(
            directory,
            dendrite_config=self.dendrite_config.to_dict(),
            layers=layers,
            growth_count=self.growth_count,
            base_model={
                "architecture": type(transformers_model(self.model)).__name__,
                "model_type": getattr(config, "model_type", None),
                # A Hub id only: a local path means nothing elsewhere (and would leak into pushed files).
                "name_or_path": base_id,
                **adapter_entry,
                **({"peft": {"adapters": adapters, "active": active_adapters(self.model)}} if peft else {}),
            },
            base_files=base_files + adapter_files,
            training_summary=training,
        )
        logger.info(
            "Saved dendritic model (%d dendrites in %d layers) to %s", summary.num_dendrites, len(summary.layers), directory
        )
        own = {*base_files, *adapter_files, DENDRITE_WEIGHTS_NAME, DENDRITE_CONFIG_NAME, MODEL_CARD_NAME, CONFIG_NAME, GENERATION_CONFIG_NAME}
        own |= {DENDRITE_TRAINED_BASE_NAME} if adapter is not None else set()
        return own | ({TRAINING_CURVE_NAME} if curve_bytes is not None else set())

    @contextlib.contextmanager
    def _dendrites_hidden_from_quantized_save(self, state_dict: Optional[dict[str, torch.Tensor]]) -> Iterator[None]:
        """transformers saves a quantized model's own `state_dict()` whatever state dict it is given (its quantizer
        supplies the tensors): for a full save of a quantized base, the dendrite parameters leave the layers while
        the base files are written, so that those hold the base only."""
        base = transformers_model(self.model)
        if getattr(base, "hf_quantizer", None) is None:
            yield
            return
        if state_dict is not None:
            raise ValueError(
                "save_pretrained(state_dict=...) cannot save a quantized base in full: transformers writes a quantized "
                "model's own tensors. Save without state_dict, or with adapter_only=True (docs/quantization.md)."
            )
        hidden = []
        try:
            for _, layer in self.dendritic_layers():
                params = {n: layer._parameters.pop(n) for n in layer.dendrite_param_names if n in layer._parameters}
                hidden.append((layer, params))
            yield
        finally:
            for layer, params in hidden:
                layer._parameters.update(params)

    def _split_adapter_only(
        self, base_state: dict[str, torch.Tensor], trainable: Optional[set[str]] = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, str]]:
        """(trained, frozen, aliases) of an adapter-only save (`split_adapter_state`), `base_state` and the results
        under checkpoint names (`trainable`: names relative to `.model`, None: by `requires_grad`). A PEFT model's
        base is fingerprinted as the plain model has it, so the same base loaded by transformers matches; its
        adapters go to `peft_adapter/` whether they train or not, and the frozen originals of the modules PEFT trains
        a copy of (`replaced_module_keys`: usually a new head, random at every load of the base) are stored."""
        names = self.checkpoint_names()
        trainable = None if trainable is None else {names[n] for n in trainable if n in names}
        trained, frozen, aliases = split_adapter_state(self.model, base_state, trainable, names)
        for name in sorted({names[key] for key in replaced_module_keys(self.model)} & set(frozen)):
            trained[name] = frozen.pop(name)
        return trained, frozen, aliases

    def _save_base_config(self, directory: str) -> None:
        """What transformers' `save_pretrained` writes besides the weights: the config (with the architecture and
        dtype), the generation config, and the code of a model class registered for an Auto class."""
        model = transformers_model(self.model)  # under a PeftModel, the transformers model
        config = getattr(model, "config", None)
        if config is None or not callable(getattr(model, "save_pretrained", None)):
            raise TypeError(
                f"DendriticModel.save_pretrained needs a transformers PreTrainedModel, got {type(model).__name__}."
            )
        dtype = getattr(model, "dtype", None)
        if isinstance(dtype, torch.dtype):
            config.dtype = str(dtype).removeprefix("torch.")
        config.architectures = [type(model).__name__]
        if getattr(model, "_auto_class", None) is not None:
            from transformers.dynamic_module_utils import custom_object_save

            custom_object_save(model, directory, config=config)
        config.save_pretrained(directory)
        can_generate = getattr(model, "can_generate", None)
        if callable(can_generate) and can_generate() and getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(directory)

    def _base_hub_id(self) -> Optional[str]:
        """The base model's Hub id: where the wrapped model was loaded from when that is a Hub repo, else the one a
        loaded checkpoint recorded (a local folder's path means nothing elsewhere)."""
        return hub_model_id(getattr(getattr(self.model, "config", None), "_name_or_path", None)) or self.base_model_id

    def save_model_card(
        self, directory: Union[str, os.PathLike], *, repo_id: Optional[str] = None, tags: Optional[list[str]] = None
    ) -> str:
        """Write the model card alone (`README.md`, and the training curve of `training_summary`) into `directory`.

        For a folder that already holds the checkpoint (e.g. `DendriticTrainer.create_model_card`); returns the
        card's path.
        """
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        training = to_jsonable(self.training_summary) if self.training_summary else None
        curve, curve_file = (training or {}).get("curve_png"), None
        if curve and os.path.isfile(curve):
            target = os.path.join(directory, TRAINING_CURVE_NAME)
            if os.path.abspath(curve) != os.path.abspath(target):
                with open(curve, "rb") as handle:
                    atomic_write_bytes(target, handle.read())
            curve_file = TRAINING_CURVE_NAME
        config = getattr(self.model, "config", None)
        return write_model_card(
            directory,
            architecture=type(transformers_model(self.model)).__name__,
            model_type=getattr(config, "model_type", None),
            name_or_path=self._base_hub_id(),
            dendrite_config=self.dendrite_config.to_dict(),
            summary=self.dendrite_summary().to_dict(),
            training_summary=training,
            repo_id=repo_id,
            tags=tags,
            curve_file=curve_file,
        )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: Union[str, os.PathLike],
        *,
        model_class: Any = None,
        revision: Optional[str] = None,
        dtype: Any = None,
        device_map: Any = None,
        token: Optional[Union[str, bool]] = None,
        cache_dir: Optional[str] = None,
        force_download: bool = False,
        local_files_only: bool = False,
        base_model: Any = None,
        base_revision: Optional[str] = None,
        is_trainable: Optional[bool] = None,
        **model_kwargs: Any,
    ) -> "DendriticModel":
        """Load a model saved by `save_pretrained` / `push_to_hub` from a folder or a Hub repo id.

        The base model is loaded by transformers (`model_class`, default: the class the checkpoint was saved from)
        from the safetensors files only, converted with the saved `DendriteConfig`, each layer is grown to its saved
        count (without initialising what is about to be overwritten) and the dendrites are loaded: no training is
        replayed, and the outputs are bit-identical to those of the saved model. `dtype`, `device_map` and other
        keyword arguments (e.g. `attn_implementation`) go to the transformers `from_pretrained`; dendrites follow
        the dtype and device of their layer. A base class that is not in transformers but registered for an Auto
        class (`config.json`'s `auto_map`) is imported from hf_dendrites when it ships it
        (`hf_dendrites.modeling_mean_pooled`); code in the folder itself runs only with `trust_remote_code=True`.
        From the Hub only JSON configs and safetensors files are downloaded (`revision`, `token`, `cache_dir`,
        `force_download` and `local_files_only` as in `huggingface_hub.snapshot_download`).

        An adapter-only checkpoint (`save_pretrained(adapter_only=True)`, or a Trainer checkpoint of a frozen-base run)
        loads its base from the reference it records (a Hub id at its revision, or a local folder; with the saved
        `config.json` and, unless `dtype` is given, the saved dtype), or from `base_model`: a path or Hub id (at
        `base_revision`), or a transformers model, used in place. The base's frozen weights must match the
        checkpoint's fingerprint, else `CheckpointError`; they come back frozen (`requires_grad=False`).

        A checkpoint of a PEFT model (docs/peft.md) comes back as a `DendriticModel` wrapping a `PeftModel` with its
        adapters (`is_trainable`, as in `PeftModel.from_pretrained`: False, the default, loads them frozen). When it is
        adapter-only, the base is loaded and checked as above (the fingerprint names the plain model's tensors), then
        wrapped with the adapters (a `base_model` given as a model gets PEFT's layers in place).

        This is one of the ways to continue training a dendritic checkpoint (see `get_dendritic_model` for all of
        them): pass the result to `DendriticTrainer`.

        Example:
            >>> dm = DendriticModel.from_pretrained("path/to/checkpoint")
            >>> dm.dendrite_counts()
        """
        if model_kwargs.get("use_safetensors") is False:
            raise ValueError("hf_dendrites loads safetensors only; do not pass use_safetensors=False.")
        model_kwargs.pop("use_safetensors", None)
        trust_remote_code = model_kwargs.pop("trust_remote_code", False) is True
        directory = resolve_checkpoint_dir(
            pretrained_model_name_or_path,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=local_files_only,
            code=trust_remote_code,
        )
        payload = read_checkpoint_metadata(directory)
        if is_adapter_only(payload):
            hub = dict(token=token, cache_dir=cache_dir, force_download=force_download, local_files_only=local_files_only)
            return cls._from_adapter_only(
                directory, payload, pretrained_model_name_or_path, base_model, base_revision, model_class,
                trust_remote_code, dtype, device_map, hub, model_kwargs, is_trainable,
            )
        if base_model is not None or base_revision is not None:
            raise ValueError(
                f"base_model= / base_revision= apply to adapter-only checkpoints; {pretrained_model_name_or_path} holds "
                "its own base weights."
            )
        check_base_folder(directory)
        model_class = model_class or base_model_class(directory, payload, trust_remote_code=trust_remote_code)
        if trust_remote_code:
            model_kwargs["trust_remote_code"] = True
        if dtype is not None:
            model_kwargs["dtype"] = dtype
        if device_map is not None:
            model_kwargs["device_map"] = device_map
        with plain_load_notice_hidden(directory):
            model, info = model_class.from_pretrained(directory, use_safetensors=True, output_loading_info=True, **model_kwargs)
        check_loading_info(directory, payload, info, type(model).__name__)
        if getattr(model, "config", None) is not None:
            # What the user asked for (repo id or folder), as transformers records it, not the cache folder.
            model.config._name_or_path = os.fspath(pretrained_model_name_or_path)
        peft = checkpoint_peft_info(payload)
        if peft is not None:  # rebuilt as saved: the transformers model, in a PeftModel with the adapters, converted
            model = load_adapters(model, directory, peft, is_trainable=bool(is_trainable))
        elif is_trainable is not None:
            raise ValueError(f"is_trainable= applies to checkpoints of PEFT models; {directory} holds no adapter.")
        config = DendriteConfig.from_dict(payload["dendrite_config"])
        dm = get_dendritic_model(model, config, restore_dendrites=False)
        dm._load_dendrites(directory, payload)
        dm.train(model.training)
        return dm

    @classmethod
    def _from_adapter_only(
        cls,
        directory: str,
        payload: dict[str, Any],
        source: Union[str, os.PathLike],
        base_model: Any,
        base_revision: Optional[str],
        model_class: Any,
        trust_remote_code: bool,
        dtype: Any,
        device_map: Any,
        hub: dict[str, Any],
        model_kwargs: dict[str, Any],
        is_trainable: Optional[bool],
    ) -> "DendriticModel":
        """`from_pretrained` of an adapter-only checkpoint: the base from its reference (or `base_model`), checked
        against the fingerprint, then (a PEFT model's) the adapters, the dendrites and the trained base entries."""
        entry = payload["base_model"]
        reference = dict(entry["reference"])
        path = os.path.join(directory, DENDRITE_CONFIG_NAME)
        peft = checkpoint_peft_info(payload)
        if peft is None and is_trainable is not None:
            raise ValueError(f"is_trainable= applies to checkpoints of PEFT models; {directory} holds no adapter.")
        if isinstance(base_model, nn.Module):
            if any(isinstance(m, (DendriticModel, DendriticLayerMixin)) for m in base_model.modules()):
                raise ValueError("from_pretrained(base_model=...) takes the plain base model, not a dendritic one.")
            options = (("dtype", dtype), ("device_map", device_map), ("base_revision", base_revision))
            given = [n for n, v in options if v is not None]
            if given or model_kwargs:
                raise ValueError(
                    f"from_pretrained(base_model=<a model>) uses that model as it is; {given + sorted(model_kwargs)} "
                    "apply when the base is loaded from a path or Hub id."
                )
            model, described = base_model, f"the given base_model, a {type(base_model).__name__}"
        else:
            if base_model is not None:
                name, revision = os.fspath(base_model), base_revision
            else:
                name, revision = reference.get("name_or_path"), reference.get("revision")
            if not name:
                raise CheckpointError(
                    f"{path}: this adapter-only checkpoint records no base model (the model it was saved from had no "
                    "name or path); pass base_model= (the path, Hub id or model it was trained on)."
                )
            if base_model is None and os.path.isabs(name) and not os.path.isdir(name):
                raise CheckpointError(
                    f"{path}: this adapter-only checkpoint references its base as the local folder {name}, which does "
                    "not exist here; pass base_model= (the path, Hub id or model it was trained on)."
                )
            model_class = model_class or base_model_class(directory, payload, trust_remote_code=trust_remote_code)
            import transformers

            config_class = getattr(model_class, "config_class", None) or transformers.AutoConfig
            config = config_class.from_pretrained(directory, **({"trust_remote_code": True} if trust_remote_code else {}))
            saved_dtype = getattr(torch, reference.get("dtype") or "", None)
            if dtype is None and isinstance(saved_dtype, torch.dtype):
                dtype = saved_dtype
            kwargs = {**model_kwargs, **{k: v for k, v in hub.items() if v}, "config": config, "use_safetensors": True}
            options = (("dtype", dtype), ("device_map", device_map), ("revision", revision))
            kwargs.update({k: v for k, v in options if v is not None})
            if trust_remote_code:
                kwargs["trust_remote_code"] = True
            if "quantization_config" not in kwargs:  # the base quantized at load as the checkpoint's was
                kwargs.update(quantized.quantization_load_kwargs(config))
            with plain_load_notice_hidden(name):
                model = model_class.from_pretrained(name, **kwargs)
            described = f"{name!r}" + (f" at revision {revision}" if revision else "")
            reference.update(name_or_path=name, revision=revision)
        architecture = type(model).__name__
        trained = read_trained_base_tensors(directory, payload)
        state = model.state_dict()
        check_adapter_only_keys(directory, payload, trained, state, architecture)
        check_base_fingerprint(directory, payload, state, described)
        config_dict = DendriteConfig.from_dict(payload["dendrite_config"])
        # The fingerprint names the plain model's tensors: a PEFT model's adapters are added after the check.
        wrapped = load_adapters(model, directory, peft, is_trainable=bool(is_trainable)) if peft is not None else model
        try:
            dm = get_dendritic_model(wrapped, config_dict, restore_dendrites=False)
            try:
                dm._load_dendrites(directory, payload)
            except BaseException:
                dm.unload()
                raise
        except BaseException:
            if wrapped is not model:
                wrapped.unload()  # PEFT's layers out again: a model the user passed is left as it was
            raise
        dm._copy_trained_base(trained)
        frozen = set(entry["fingerprint"]["tensors"]) | set(entry.get("aliases", {}))
        names = dm.checkpoint_names()
        for name, param in dm.model.named_parameters(remove_duplicate=False):
            if names.get(name) in frozen:  # the base stays frozen, as in training (further training trains the rest)
                param.requires_grad_(False)
        dm.base_reference = reference
        if getattr(model, "config", None) is not None:
            model.config._name_or_path = os.fspath(source)
        logger.info("Loaded adapter-only checkpoint %s on the base %s.", source, described)
        dm.train(model.training)
        return dm

    def _copy_trained_base(self, trained: dict[str, torch.Tensor]) -> None:
        """Copy an adapter-only checkpoint's trained base entries (checkpoint names) into the model."""
        keys = {name: key for key, name in self.checkpoint_names().items()}
        with torch.no_grad():
            state = self.model.state_dict(keep_vars=True)
            for name, tensor in trained.items():
                state[keys[name]].copy_(tensor)

    def _load_dendrites(self, directory: str, payload: dict[str, Any]) -> None:
        """Resize the layers to the checkpoint's counts and copy its dendrite tensors in (strict).

        Every tensor is read and checked before the model changes; new dendrites are created uninitialised since
        every value is overwritten. Restores `growth_count` and `training_summary` too.
        """
        layers = self._checkpoint_layers()
        check_layer_names(directory, payload, set(layers), type(transformers_model(self.model)).__name__)
        counts = payload["layers"]
        expected = {name: layers[name].expected_dendrite_shapes(k) for name, k in counts.items()}
        tensors = read_dendrite_tensors(directory, payload, expected)
        names = {id(layer): name for name, layer in self.dendritic_layers()}
        self.set_dendrite_counts({names[id(layers[name])]: k for name, k in counts.items()}, initialize=False)
        with torch.no_grad():
            for name, tensor in tensors.items():
                layer_name, _, pname = name.rpartition(".")
                param = getattr(layers[layer_name], pname)
                if param.device.type == "meta":
                    raise CheckpointError(
                        f"Cannot load {name} into layer {layer_name!r}: the layer is offloaded (meta device). Load with "
                        "a device_map that keeps every dendritic layer on a device (no 'disk' offload)."
                    )
                param.copy_(tensor)
        self.growth_count = int(payload.get("growth_count", 0))
        self.training_summary = training_summary_from_metadata(directory, payload)
        self.base_model_id = payload["base_model"].get("name_or_path") or self.base_model_id

    def load_dendritic_state(self, directory: Union[str, os.PathLike]) -> None:
        """Load a checkpoint folder into this model, in place and strictly.

        Resizes every dendritic layer to the count recorded in the folder's `dendrite_config.json` (truncating or
        growing; a layer whose count already matches keeps its Parameter objects), then copies the base weights and
        the dendrite weights in and restores `growth_count` and `training_summary`. `DendriticTrainer` uses it to
        resume from a checkpoint and for `load_best_model_at_end`: rebuild the optimizer afterwards when counts
        changed. The base weights are read by the wrapped class's own `from_pretrained` into a CPU copy built from
        its config (`hf_dendrites.saving.read_base_state`), so names that transformers changes on save (its
        checkpoint conversion mapping: ViT and GPT-NeoX in transformers 5) map back to the model's.

        An adapter-only checkpoint holds no base weights: the model's frozen ones must match its fingerprint (else
        `CheckpointError`); the trained base entries (e.g. a head) are copied in.

        The model must have the same dendritic layers (same base architecture and `target_modules`) and the same
        dendrite kind (activation, rank, cascade) as the checkpoint. Any missing, unexpected or mis-shaped tensor,
        a truncated / corrupt file or an incomplete folder raises `CheckpointError` naming the file and the layer;
        the model is only modified once every check has passed.
        """
        directory = os.fspath(directory)
        payload = read_checkpoint_metadata(directory)
        check_dendrite_kind(directory, payload, self.dendrite_config)
        peft = checkpoint_peft_info(payload)
        if (peft is not None) != has_peft_layers(self.model):
            raise CheckpointError(
                f"{directory} was saved from a model {'with' if peft else 'without'} PEFT adapters, but this model has "
                f"{'none' if peft else 'some'}: load it with `DendriticModel.from_pretrained` (docs/peft.md)."
            )
        layers = self._checkpoint_layers()
        architecture = type(transformers_model(self.model)).__name__
        check_layer_names(directory, payload, set(layers), architecture)
        if is_adapter_only(payload):
            trained = read_trained_base_tensors(directory, payload)
            dendrite_keys = set(self.dendrite_state_dict())
            names = self.checkpoint_names()  # a PEFT model's base under the plain names, as fingerprinted
            state = {names[k]: v for k, v in self.model.state_dict().items() if k in names and k not in dendrite_keys}
            check_adapter_only_keys(directory, payload, trained, state, architecture)
            check_base_fingerprint(directory, payload, state, f"this model's {architecture}")
            adapter_tensors = read_adapter_tensors(self.model, directory, peft["adapters"]) if peft else []
            self._load_dendrites(directory, payload)
            self._copy_trained_base(trained)
            copy_adapter_tensors(adapter_tensors)
            self.base_reference = dict(payload["base_model"]["reference"])
            logger.info("Loaded adapter-only checkpoint %s (%d dendrites)", directory, sum(payload["layers"].values()))
            return
        if getattr(transformers_model(self.model), "hf_quantizer", None) is not None:
            raise CheckpointError(
                f"{directory} is a full checkpoint, which cannot be loaded in place into a quantized model (its base "
                "weights would have to be quantized again). Load it with `DendriticModel.from_pretrained(folder)`, "
                "which reloads the quantized base exactly, or save adapter-only checkpoints "
                "(`save_pretrained(adapter_only=True)`; DendriticTrainer writes them for a quantized base)."
            )
        base = read_base_state(directory, payload, transformers_model(self.model))
        adapter_tensors = read_adapter_tensors(self.model, directory, peft["adapters"]) if peft else []
        roles = module_roles(self.model) if peft else {}

        def checkpoint_key(key: str) -> tuple[str, str]:
            """A model tensor's name in the checkpoint and its role (a PEFT model's plain names; see peft_support)."""
            return plain_key(key, roles) if peft else (key, MODEL)

        dendrite_keys = {checkpoint_key(k)[0] for k in self.dendrite_state_dict()} | {
            f"{layer}.{p}" for layer, k in payload["layers"].items() for p in layers[layer].expected_dendrite_shapes(k)
        }
        by_id: dict[int, list[str]] = {}  # a tied weight appears under several names and is saved under one
        for name, tensor in [*self.model.named_parameters(remove_duplicate=False), *self.model.named_buffers(remove_duplicate=False)]:
            plain, role = checkpoint_key(name)
            if role == MODEL:
                by_id.setdefault(id(tensor), []).append(plain)
        model_state = {checkpoint_key(k)[0]: v for k, v in self.model.state_dict().items() if checkpoint_key(k)[1] == MODEL}
        check_base_tensors(
            directory,
            base,
            model_state,
            dendrite_keys=dendrite_keys,
            tied_aliases={name: set(names) - {name} for names in by_id.values() for name in names},
            ignore_patterns=list(getattr(self.model, "_keys_to_ignore_on_save", None) or []),
            architecture=architecture,
        )
        self._load_dendrites(directory, payload)
        with torch.no_grad():
            state = {checkpoint_key(k)[0]: v for k, v in self.model.state_dict(keep_vars=True).items() if checkpoint_key(k)[1] == MODEL}
            for key, (_, tensor) in base.items():
                state[key].copy_(tensor)
        copy_adapter_tensors(adapter_tensors)
        logger.info("Loaded dendritic checkpoint %s (%d dendrites)", directory, sum(payload["layers"].values()))

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: Optional[bool] = None,
        token: Optional[Union[str, bool]] = None,
        commit_message: Optional[str] = None,
        commit_description: Optional[str] = None,
        revision: Optional[str] = None,
        create_pr: bool = False,
        processing_class: Any = None,
        max_shard_size: Optional[Union[int, str]] = None,
        tags: Optional[list[str]] = None,
        safe_serialization: bool = True,
        adapter_only: bool = False,
        base_model_name_or_path: Optional[str] = None,
        base_revision: Optional[str] = None,
    ):
        """Save the model (base, dendrites, model card, `processing_class`) and upload it to `repo_id` in one commit.

        `adapter_only`, `base_model_name_or_path` and `base_revision` as in `save_pretrained`: an adapter-only
        checkpoint must reference its base by Hub id.

        The repo is created if needed (`private` applies then); `revision` names a branch (created from the default
        branch if missing); `create_pr=True` opens a pull request instead. Remote weight files that the new save
        does not have are deleted in the same commit. The model card is hf_dendrites' own. Returns the
        `huggingface_hub.CommitInfo`.

        Example:
            >>> dm.push_to_hub("me/bert-dendrites", private=True, commit_message="2 dendrite cycles")
            >>> DendriticModel.from_pretrained("me/bert-dendrites")
        """
        from huggingface_hub import HfApi

        adapter = {"adapter_only": adapter_only, "base_model_name_or_path": base_model_name_or_path,
                   "base_revision": base_revision}
        self._check_pushable(self._adapter_save_options(adapter_only, None, base_model_name_or_path, base_revision))
        repo_id = HfApi(token=token).create_repo(repo_id, private=private, exist_ok=True, repo_type="model").repo_id
        with tempfile.TemporaryDirectory(prefix="hf_dendrites_push_") as folder:
            self.save_pretrained(
                folder,
                processing_class=processing_class,
                max_shard_size=max_shard_size,
                repo_id=repo_id,
                tags=tags,
                safe_serialization=safe_serialization,
                **adapter,
            )
            info = upload_checkpoint_folder(
                folder,
                repo_id,
                token=token,
                commit_message=commit_message,
                commit_description=commit_description,
                revision=revision,
                create_pr=create_pr,
            )
        logger.info("Pushed dendritic model to %s", info.commit_url)
        return info

def get_dendritic_model(
    model: nn.Module, config: Optional[DendriteConfig] = None, *, restore_dendrites: bool = True
) -> DendriticModel:
    """Convert the layers of `model` selected by `config` into dendritic layers, in place.

    The converted layers keep their parameters (same objects, same names) and start with zero dendrites, so the
    model computes exactly what it computed before; call `add_dendrites()` to grow them.

    A model loaded from a dendritic checkpoint keeps its dendrites: when the model's source (`model.name_or_path`,
    i.e. `config._name_or_path`: a local folder, or a Hub repo id whose files are in the local cache or can be
    downloaded) holds `dendrite_config.json` and `dendrite_model.safetensors`, the layers are converted as the
    checkpoint says and its dendrites restored (logged at info level), instead of starting from zero dendrites.

    Continuing training from a dendritic checkpoint (a folder written by `DendriticModel.save_pretrained`,
    `DendriticTrainer.save_model()` or a Trainer checkpoint, or its Hub repo) works in three ways:

    1. `DendriticModel.from_pretrained(path)`, then `DendriticTrainer(model=dm, ...)`: rebuilds the class the model
       was saved from.
    2. `AutoModelFor...from_pretrained(path)`, then `get_dendritic_model(model)` or `DendriticTrainer(model=model, ...)`
       (which calls this function): what an unmodified fine-tuning script does with `--model_name_or_path path`.
    3. `trainer.train(resume_from_checkpoint=path)` for a checkpoint of the same run: also restores the dendrite
       schedule (phase, best score) and the optimizer, to continue exactly where the run stopped.

    Args:
        model: a transformers model (any `torch.nn.Module` works when `config.target_modules` is explicit).
        config: which layers and what kind of dendrites; the default uses the per-architecture targets, or the
            checkpoint's config for a model loaded from a dendritic checkpoint. For such a model, the fields of an
            explicit config that select layers and the kind of dendrites (`target_modules`, `exclude_modules`,
            `activation`, `rank`, `cascade`, `dendrite_dtype`) take the checkpoint's values where they are left at
            their defaults;
            where they are set, they must agree with the checkpoint. Its other settings (`dendrites_per_cycle`,
            `learning_rule`, ...) govern the growth from now on.
        restore_dendrites: False converts the model with zero dendrites even when its source holds dendrites
            (its base weights are then used without the dendrites they were trained with).

    Example:
        >>> dm = get_dendritic_model(model, DendriteConfig(target_modules="all-linear"))
        >>> dm.add_dendrites(1)
    """
    if isinstance(model, DendriticModel):
        raise ValueError("This model is already a DendriticModel; grow it with `add_dendrites()` instead of converting it again.")
    if any(isinstance(m, DendriticLayerMixin) for m in model.modules()) and has_peft_layers(model):
        raise ValueError(
            "This PEFT model's layers already have dendrites (PEFT was applied after `get_dendritic_model`): keep "
            "using the DendriticModel that `get_dendritic_model` returned (PEFT changed its `.model` in place) with "
            "DendriticTrainer and save_pretrained. See docs/peft.md."
        )
    if any(isinstance(m, DendriticLayerMixin) for m in model.modules()):
        raise ValueError(
            "This model already contains dendritic layers; wrap it once with `get_dendritic_model`, or call "
            "`DendriticModel.unload()` first to get the plain model back."
        )
    checkpoint, payload = None, None
    if restore_dendrites:
        source = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
        revision = getattr(getattr(model, "config", None), "_commit_hash", None)
        checkpoint = find_dendritic_checkpoint(source, revision=revision)
        if checkpoint is not None:
            payload = read_checkpoint_metadata(checkpoint, check_files=False)
            if checkpoint_peft_info(payload) is not None:
                raise ValueError(
                    f"{source} is a checkpoint of a PEFT model with dendrites: its adapter is in its "
                    f"`peft_adapter` folder, which loading the base model alone leaves out. Load it with "
                    f"`DendriticModel.from_pretrained({source!r})` (see docs/peft.md), or pass restore_dendrites=False "
                    "to start from its base weights with zero dendrites and no adapter."
                )
            saved = DendriteConfig.from_dict(payload["dendrite_config"])
            config = saved if config is None else _inherit_structure(config, saved)
            _check_restorable(model, config, saved, payload, source)
    config = DendriteConfig() if config is None else config
    names = resolve_target_modules(model, config)
    requested = _requested_dendrite_dtype(model, config, names)
    model_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    quantized.hold_cpu_repacking(model)  # bitsandbytes' lossy CPU repacking would change the frozen 4-bit base
    for name in names:
        old = model.get_submodule(name)
        cls = dendritic_class_for(old)
        new = cls.from_base_layer(
            old,
            activation=config.activation,
            cascade=config.cascade,
            rank=config.rank,
            init_scale=config.init_scale,
            dtype=requested or cls.default_dendrite_dtype(old) or model_dtype,
        )
        _replace_module(model, name, new)
        _move_accelerate_hook(old, new)
    dm = DendriticModel(model, config)
    _check_experts(dm, config)
    if checkpoint is not None:
        try:
            dm._load_dendrites(checkpoint, payload)
        except BaseException:
            dm.unload()  # leave the user's model as it was
            raise
        logger.info(
            "%s is a dendritic checkpoint: restored its %d dendrites in %d layers (pass restore_dendrites=False to "
            "start from zero dendrites).",
            source,
            sum(payload["layers"].values()),
            len(payload["layers"]),
        )
    return dm


def _requested_dendrite_dtype(model: nn.Module, config: DendriteConfig, names: list[str]) -> Optional[torch.dtype]:
    """`config.dendrite_dtype` as a torch dtype (None when unset), refused when no selected layer is of a kind whose
    dendrites take it (quantized bases): the other kinds keep their dendrites in their weight's dtype.

    Without it, the dendrites of such layers take the kind's default (bitsandbytes 4-bit: the compute dtype) or the
    model's dtype (its first floating-point parameter's, as transformers' `model.dtype`)."""
    if config.dendrite_dtype is None:
        return None
    if not any(dendritic_class_for(model.get_submodule(n)).uses_dendrite_dtype for n in names):
        raise ValueError(
            f"DendriteConfig(dendrite_dtype={config.dendrite_dtype!r}) sets the dtype of the dendrites of quantized "
            "layers (bitsandbytes 4-bit / 8-bit), and no selected layer is one: dendrites of other layers take their "
            "weight's dtype (convert the model with `model.to(dtype)` first). Leave dendrite_dtype=None."
        )
    return getattr(torch, config.dendrite_dtype)


def _check_experts(dm: DendriticModel, config: DendriteConfig) -> None:
    """MoE checks after conversion: the correlation rule does not apply to experts; warn about experts left plain."""
    experts = [name for name, layer in dm.dendritic_layers() if isinstance(layer, moe.DendriticExperts)]
    if experts and config.learning_rule == "correlation":
        dm.unload()
        raise ValueError(
            f"learning_rule='correlation' does not apply to dendritic experts ({experts[0]!r} and {len(experts) - 1} "
            "more): its candidate pools are built for single-weight layers. Use learning_rule='gd', or exclude the "
            "experts (exclude_modules=['experts'])."
        )
    if experts and (note := moe.experts_implementation_note(dm.model)):
        logger.warning(note)
    if config.target_modules is None or config.target_modules == "all-linear":
        share, names = moe.unsupported_experts_share(dm.model, dict(dm.dendritic_layers()))
        if names:
            logger.warning(
                "%.1f %% of the parameters of %s are in mixture-of-experts layers whose experts layout hf_dendrites does "
                "not support (%s, e.g. %s): they get no dendrites. Supported: the fused experts of transformers "
                "(`use_experts_implementation`, docs/moe.md).",
                100 * share, type(transformers_model(dm.model)).__name__,
                type(dm.model.get_submodule(names[0])).__name__, names[0],
            )


# What a checkpoint's dendrites are made of: a config that leaves these at their defaults takes the checkpoint's.
_STRUCTURE_FIELDS = ("target_modules", "exclude_modules", "activation", "rank", "cascade", "dendrite_dtype")


def _inherit_structure(config: DendriteConfig, saved: DendriteConfig) -> DendriteConfig:
    """`config` with every structural field it leaves at its default taken from the checkpoint's config.

    A script that always builds a `DendriteConfig` from its command line (e.g. with `HfArgumentParser`) passes
    one even when the user set no dendrite flag; such a config must not conflict with the checkpoint it loads.
    """
    defaults = DendriteConfig()
    inherited = {
        name: getattr(saved, name)
        for name in _STRUCTURE_FIELDS
        if getattr(config, name) == getattr(defaults, name) and getattr(saved, name) != getattr(defaults, name)
    }
    return dataclasses.replace(config, **inherited) if inherited else config


def _check_restorable(
    model: nn.Module, config: DendriteConfig, saved: DendriteConfig, payload: dict[str, Any], source: str
) -> None:
    """Before converting: the checkpoint's dendrites fit `model` converted with `config`, or a clear error."""
    how = (
        f"To continue with the checkpoint's dendrites, pass no DendriteConfig (or `DendriteConfig.from_pretrained("
        f"{source!r})`); to start from its base weights with zero dendrites, convert the model yourself with "
        "`get_dendritic_model(model, config, restore_dendrites=False)` and pass the result to DendriticTrainer."
    )
    saved_arch = payload["base_model"].get("architecture")
    layers = set(resolve_target_modules(model, config))
    if has_peft_layers(model):  # the checkpoint's names are the plain model's
        roles = module_roles(model)
        layers = {roles[name][0] for name in layers}
        model = transformers_model(model)
    if layers != set(payload["layers"]):
        if saved_arch and saved_arch != type(model).__name__:
            raise CheckpointError(
                f"{source} holds dendrites saved on a {saved_arch}, but the model was loaded as a "
                f"{type(model).__name__}, whose layers have other names: its dendrites cannot be restored. Load it "
                f"with transformers.{saved_arch} (or DendriticModel.from_pretrained({source!r})), or pass "
                "restore_dendrites=False to start from the base weights with zero dendrites."
            )
        extra, missing = sorted(layers - set(payload["layers"])), sorted(set(payload["layers"]) - layers)
        raise ValueError(
            f"{source} is a dendritic checkpoint whose dendrites are in other layers than the given DendriteConfig "
            f"selects (target_modules={config.target_modules!r}; selected but not in the checkpoint: {extra[:3]}; in "
            f"the checkpoint but not selected: {missing[:3]}). {how}"
        )
    for name in ("activation", "rank", "cascade", "dendrite_dtype"):
        if getattr(config, name) != getattr(saved, name):
            raise ValueError(
                f"{source} is a dendritic checkpoint with {name}={getattr(saved, name)!r}, but the given DendriteConfig "
                f"has {name}={getattr(config, name)!r}. {how}"
            )
