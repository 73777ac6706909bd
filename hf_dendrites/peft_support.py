"""Dendrites on PEFT models: which layers are the model's own, checkpoint names, adapter files, guards.

A PEFT tuner layer (LoRA's `lora.Linear`, IA3, LoHa, ...) replaces a model layer and keeps the original one as its
`base_layer`. For hf_dendrites, a layer name always means the model's own layer: `q_proj` in a LoRA model is the
wrapped `...q_proj.base_layer`. The adapter's own sublayers (`lora_A`, `lora_B`, ...) are selected only by a
`target_modules` list entry that names them (e.g. `["lora_A", "lora_B"]`), never by the defaults or "all-linear".

Checkpoints of a PEFT model with dendrites store everything under the plain model's names (`.base_layer` and PEFT's
`base_model.model.` prefix removed), so the base weights load into the plain transformers class; the adapter is
written as PEFT writes it (`adapter_config.json`, `adapter_model.safetensors`) into `peft_adapter/`. See docs/peft.md.

peft is never imported here unless the user imported it: a model can only hold PEFT layers once peft is loaded.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
from typing import Any, Optional

import torch
from torch import nn

from .constants import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, PEFT_ADAPTER_DIR

# The roles of a module in a PEFT model: the model's own network, a PEFT tuner layer wrapping a model layer, or a
# part of the adapter (its sublayers and parameters).
MODEL, TUNER, ADAPTER = "model", "tuner", "adapter"


def peft_loaded() -> bool:
    return "peft" in sys.modules


def is_tuner_layer(module: nn.Module) -> bool:
    """A PEFT layer that wraps a model layer (`base_layer`): LoRA, IA3, LoHa, LoKr, ..."""
    if not peft_loaded():
        return False
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(module, BaseTunerLayer)


def _is_aux_wrapper(module: nn.Module) -> bool:
    """PEFT's `modules_to_save` / trainable-token wrappers, which keep the model's layer as `original_module`."""
    if not peft_loaded():
        return False
    from peft.utils import AuxiliaryTrainingWrapper

    return isinstance(module, AuxiliaryTrainingWrapper)


def is_plain_lora_layer(module: nn.Module) -> bool:
    """A LoRA layer without DoRA: its update is added to the base layer's output."""
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer) and not any(getattr(module, "use_dora", {}).values())


def is_peft_model(model: Any) -> bool:
    if not peft_loaded():
        return False
    from peft import PeftModel

    return isinstance(model, PeftModel)


def has_peft_layers(model: nn.Module) -> bool:
    """Whether `model` is a PeftModel or has PEFT layers injected (e.g. `get_peft_model(dm.model, ...)`)."""
    return peft_loaded() and (is_peft_model(model) or any(is_tuner_layer(m) or _is_aux_wrapper(m) for m in model.modules()))


def transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model under a PeftModel (with PEFT's layers in it), or `model` itself."""
    return model.get_base_model() if is_peft_model(model) else model


def module_roles(model: nn.Module) -> dict[str, tuple[str, str]]:
    """{module name: (plain name, role)} for every module of `model`.

    The plain name is the name in the model without PEFT: a tuner layer and its `base_layer` share the name of the
    layer they replace, PeftModel's `base_model.model.` prefix is dropped, and an adapter sublayer is named under its
    layer (`...q_proj.lora_A.default`). Roles: MODEL (the model's own modules), TUNER, ADAPTER.
    """
    out: dict[str, tuple[str, str]] = {}

    def walk(module: nn.Module, name: str, plain: str, role: str) -> None:
        wrapper = is_tuner_layer(module) or _is_aux_wrapper(module)
        out[name] = (plain, TUNER if role == MODEL and wrapper else role)
        for child_name, child in module._modules.items():
            if child is None:
                continue
            full = f"{name}.{child_name}" if name else child_name
            if role == MODEL and wrapper and child_name in ("base_layer", "original_module"):
                walk(child, full, plain, MODEL)
            elif role == MODEL and wrapper:
                walk(child, full, f"{plain}.{child_name}", ADAPTER)
            else:
                walk(child, full, f"{plain}.{child_name}" if plain else child_name, role)

    if is_peft_model(model):
        inner = model.get_base_model()
        inner_name = next(n for n, m in model.named_modules() if m is inner)
        for name, _ in model.named_modules():
            if name != inner_name and not name.startswith(inner_name + "."):
                out[name] = (name, TUNER)  # PeftModel's own containers (`base_model`)
        walk(inner, inner_name, "", MODEL)
        return out
    walk(model, "", "", MODEL)
    return out


def adapter_layer_names(model: nn.Module) -> set[str]:
    """The names PEFT gives its adapter sublayers in `model` (`lora_A`, `lora_B`, `hada_w1_a`, ...)."""
    return {n for m in model.modules() if is_tuner_layer(m) for n in getattr(m, "adapter_layer_names", ())}


def names_adapter_layer(entry: str, adapter_names: set[str]) -> bool:
    """Whether a `target_modules` list entry names an adapter sublayer (one of its components is one)."""
    return bool(set(entry.split(".")) & adapter_names)


def plain_key(key: str, roles: dict[str, tuple[str, str]]) -> tuple[str, str]:
    """(plain name, role) of a state-dict key of the model `roles` describes."""
    module, _, tensor = key.rpartition(".")
    plain, role = roles.get(module, (module, MODEL))
    return (f"{plain}.{tensor}" if plain else tensor), role


def plain_checkpoint_state(
    model: nn.Module, base: dict[str, Any], dendrites: dict[str, Any], layers: dict[str, int]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, int]]:
    """The base tensors, dendrite tensors and dendrite counts of `model` under the plain model's names; the adapter's
    tensors are left out of the base (they are written by `save_adapters`)."""
    roles = module_roles(model)
    plain_base = {}
    for key, tensor in base.items():
        plain, role = plain_key(key, roles)
        if role == MODEL:
            plain_base[plain] = tensor
    plain_dendrites = {plain_key(k, roles)[0]: v for k, v in dendrites.items()}
    return plain_base, plain_dendrites, {roles[name][0]: k for name, k in layers.items()}


def replaced_module_keys(model: nn.Module) -> set[str]:
    """The `model.state_dict()` names of the modules PEFT replaces by a trained copy (`modules_to_save`, e.g. a
    classifier with `task_type="SEQ_CLS"`): the originals, frozen. An adapter-only checkpoint stores them instead of
    fingerprinting them: such a module is usually a new task head, randomly initialised every time the base is
    loaded, and small."""
    if not peft_loaded():
        return set()
    from peft.utils import ModulesToSaveWrapper

    prefixes = tuple(f"{name}.original_module." for name, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper))
    return {key for key in model.state_dict(keep_vars=True) if key.startswith(prefixes)} if prefixes else set()


def check_not_merged(model: nn.Module, what: str) -> None:
    """Saving the base weights of a model whose adapters are merged into them would save the merge as the base."""
    merged = [n for n, m in model.named_modules() if is_tuner_layer(m) and getattr(m, "merged", False)]
    if merged:
        raise ValueError(
            f"{what}: the adapter is merged into the base weights of {merged[0]!r} (and {len(merged) - 1} more); call "
            "`unmerge_adapter()` first, or `merge_and_unload()` to get a plain dendritic model."
        )


def _without_dendrites(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model.state_dict()` without the dendrite tensors, which PEFT would take for the adapter's: it keeps every
    tensor whose name contains "lora_" (low-rank dendrites are `dendrite_lora_A`) or lies in an adapter sublayer."""
    return {k: v for k, v in model.state_dict().items() if not k.rpartition(".")[2].startswith("dendrite_")}


def save_adapters(model: nn.Module, directory: str) -> tuple[list[str], list[str]]:
    """Write the PEFT adapters of `model` (a PeftModel, or a model with PEFT layers injected) into
    `<directory>/peft_adapter/` as PEFT writes them (`adapter_config.json`, `adapter_model.safetensors`; an adapter
    other than "default" in a sub-folder of its name). Returns (adapter names, files written relative to `directory`).

    A sub-folder, because transformers' `from_pretrained` of a folder that holds `adapter_config.json` would load the
    adapter into the base model by itself. Dendrites on the adapter's own sublayers are not written here (they are
    in `dendrite_model.safetensors`)."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    inner = transformers_model(model)
    shutil.rmtree(os.path.join(directory, PEFT_ADAPTER_DIR), ignore_errors=True)  # an earlier save's adapters
    adapters, files = [], []
    for adapter, config in inner.peft_config.items():
        relative = PEFT_ADAPTER_DIR if adapter == "default" else f"{PEFT_ADAPTER_DIR}/{adapter}"
        folder = os.path.join(directory, relative)
        os.makedirs(folder, exist_ok=True)
        state = get_peft_model_state_dict(inner, state_dict=_without_dendrites(inner), adapter_name=adapter)
        state = {"base_model.model." + k: v.detach().cpu().contiguous() for k, v in state.items()}
        save_file(state, os.path.join(folder, ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
        config.save_pretrained(folder)
        adapters.append(adapter)
        files += [f"{relative}/{ADAPTER_CONFIG_NAME}", f"{relative}/{ADAPTER_WEIGHTS_NAME}"]
    return adapters, files


def describe_adapters(model: nn.Module) -> list[str]:
    """The PEFT adapters of `model` as the model card names them: "`default` (LORA, r=8)"."""
    out = []
    for name, config in transformers_model(model).peft_config.items():
        kind = getattr(config.peft_type, "value", config.peft_type)
        rank = getattr(config, "r", None)
        out.append(f"`{name}` ({kind}{f', r={rank}' if isinstance(rank, int) else ''})")
    return out


def active_adapters(model: nn.Module) -> list[str]:
    """The adapters `model`'s PEFT layers compute with (PEFT sets them on every layer alike)."""
    return next((list(m.active_adapters) for m in model.modules() if is_tuner_layer(m)), [])


def load_adapters(model: nn.Module, directory: str, info: dict[str, Any], is_trainable: bool) -> nn.Module:
    """Wrap the transformers `model` in a PeftModel with the adapters `save_adapters` wrote into `directory`, the
    saved model's active ones active (`info`: the checkpoint's `peft` entry, see `checkpoint_peft_info`)."""
    from peft import PeftModel

    folder = os.path.join(directory, PEFT_ADAPTER_DIR)
    adapters = info["adapters"]
    peft_model = PeftModel.from_pretrained(model, folder, adapter_name=adapters[0], is_trainable=is_trainable)
    for adapter in adapters[1:]:
        peft_model.load_adapter(os.path.join(folder, adapter), adapter_name=adapter, is_trainable=is_trainable)
    active = info.get("active") or adapters[:1]
    if active != active_adapters(peft_model):
        peft_model.base_model.set_adapter(active if len(active) > 1 else active[0], inference_mode=not is_trainable)
    return peft_model


def read_adapter_tensors(model: nn.Module, directory: str, adapters: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(model tensor, saved tensor) for every adapter tensor `save_adapters` wrote into `directory`, checked strictly
    against `model`'s adapters (same adapters, same tensors, same shapes) before anything is copied: for resuming a
    Trainer checkpoint of a PEFT model. Copy with `copy_adapter_tensors`."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    from .saving import CheckpointError

    inner = transformers_model(model)
    if sorted(getattr(inner, "peft_config", {})) != sorted(adapters):
        raise CheckpointError(
            f"{directory} holds the PEFT adapters {sorted(adapters)}, but the model has {sorted(getattr(inner, 'peft_config', {}))}."
        )
    pairs = []
    for adapter in adapters:
        relative = PEFT_ADAPTER_DIR if adapter == "default" else f"{PEFT_ADAPTER_DIR}/{adapter}"
        path = os.path.join(directory, relative, ADAPTER_WEIGHTS_NAME)
        saved = {k.removeprefix("base_model.model."): v for k, v in load_file(path).items()}
        # PEFT's own view of the adapter: tensors that share the parameters' storage.
        current = get_peft_model_state_dict(inner, state_dict=_without_dendrites(inner), adapter_name=adapter)
        wrong = sorted(set(saved) ^ set(current)) or sorted(k for k in saved if saved[k].shape != current[k].shape)
        if wrong:
            raise CheckpointError(f"{path} does not match the model's adapter {adapter!r} (e.g. {wrong[0]!r}).")
        pairs += [(current[key], tensor) for key, tensor in saved.items()]
    return pairs


@torch.no_grad()
def copy_adapter_tensors(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for target, tensor in pairs:
        target.copy_(tensor)


def install_peft_save_guard() -> None:
    """Make `PeftModel.save_pretrained` refuse a model with dendrites: PEFT writes only the adapter, so the dendrites
    of the model's own layers would be lost without a word. Installed once peft is loaded and a model gets
    dendrites (or a DendriticModel is built); `DendriticModel.save_pretrained` is the path that keeps them."""
    if not peft_loaded():
        return
    from peft import PeftModel

    original = PeftModel.save_pretrained
    if getattr(original, "_hf_dendrites_guard", False):
        return

    @functools.wraps(original)
    def save_pretrained(self, *args: Any, **kwargs: Any):
        from .layers import DendriticLayerMixin

        dendritic = [n for n, m in self.named_modules() if isinstance(m, DendriticLayerMixin)]
        if dendritic:
            raise ValueError(
                f"PeftModel.save_pretrained writes only the adapter, and this model has dendritic layers (e.g. "
                f"{dendritic[0]!r}) whose dendrites it would drop. Save with hf_dendrites instead: "
                "`get_dendritic_model(peft_model).save_pretrained(path)` / `dm.save_pretrained(path)` (base, dendrites "
                "and adapter; reload with `DendriticModel.from_pretrained(path)`), or `merge_and_unload()` first. "
                "See docs/peft.md."
            )
        return original(self, *args, **kwargs)

    save_pretrained._hf_dendrites_guard = True
    PeftModel.save_pretrained = save_pretrained


def checkpoint_peft_info(payload: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The `peft` entry a checkpoint of a PEFT model records in `dendrite_config.json` (None for other ones)."""
    return (payload.get("base_model") or {}).get("peft")
