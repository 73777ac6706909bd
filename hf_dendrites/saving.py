"""Saving and loading dendritic checkpoints: functions over files, state dicts and plain data.

`DendriticModel.save_pretrained` / `from_pretrained` / `load_dendritic_state` (in `hf_dendrites.model`) orchestrate
these functions; this module never sees the model class. A checkpoint folder holds:

    config.json, model.safetensors (or shards   the base model under its standard transformers names, dendrite
    + model.safetensors.index.json)             parameters excluded: a plain `AutoModel*.from_pretrained(folder)`
                                                loads the base model without missing keys; its one unexpected key,
                                                `PLAIN_LOAD_NOTICE_KEY`, is the notice (in transformers' load report,
                                                a WARNING) that the dendrites were not loaded
    dendrite_config.json                        the `DendriteConfig`, the dendrite count of every layer, the library
                                                version, the base architecture, and a manifest of the weight files
    dendrite_model.safetensors                  the dendrite parameters only, keyed `<layer name>.<parameter name>`
    README.md (+ training_curve.png)            the model card (see `hf_dendrites.hub`)

An adapter-only checkpoint (`save_pretrained(adapter_only=True)`, and Trainer checkpoints of runs whose base is
frozen) has no base weight files. In their place:

    dendrite_base_trained.safetensors           the base model's entries that training changes: the parameters that
                                                train (a task head, adapters) and the persistent buffers
    dendrite_config.json: base_model            a reference to the base (`reference`: name or path, revision, dtype)
                                                and a `fingerprint` of every frozen tensor (dtype, shape, SHA-256 of
                                                its bytes), so a different base is refused instead of silently used

`config.json` is still written (it carries what the base's own config lacks, e.g. a classifier's labels). A PEFT
model's adapters are in `peft_adapter/` as in its full checkpoints; its fingerprint and trained entries use the plain
model's names (peft_support.py), so the base is checked as transformers loads it.
`DendriticModel.from_pretrained` loads the base from the reference (or from `base_model=`), checks the fingerprint,
then loads the trained entries and the dendrites; `load_dendritic_state` checks the fingerprint against the model it
loads into. Such a folder is format 3 (`ADAPTER_ONLY_FORMAT_VERSION`); full checkpoints stay format 2.

Safety and completeness:

- Loading reads JSON and safetensors only. Nothing is ever unpickled: `.bin` / `.pt` files in the folder are
  ignored, and a folder whose base weights exist only as pickles is refused.
- `dendrite_config.json` is the marker that makes a folder loadable. A save first removes it (`prepare_save_directory`),
  writes everything else, and writes it last, atomically, with the size of every weight file and the SHA-256 of the
  dendrite file (`write_checkpoint_metadata`). A save interrupted at any point therefore leaves a folder that does
  not load; a file truncated, corrupted or replaced afterwards is detected on load. Every problem raises
  `CheckpointError` naming the file (and the layer).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Collection, Iterator, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers.utils import (
    ADAPTER_CONFIG_NAME,
    CONFIG_NAME,
    GENERATION_CONFIG_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
)

from .config import DendriteConfig
from .constants import (
    ADAPTER_ONLY_FORMAT_VERSION,
    BASE_WEIGHT_FILE_PATTERN,
    CHECKPOINT_FORMAT_VERSION,
    DENDRITE_CONFIG_NAME,
    DENDRITE_TRAINED_BASE_NAME,
    DENDRITE_WEIGHTS_NAME,
    PEFT_ADAPTER_FILE_PATTERN,
    PLAIN_LOAD_NOTICE_KEY,
    TRAINING_CURVE_NAME,
)
from .utils import atomic_write_text, library_version, read_dendrite_config_file, read_json_file

logger = logging.getLogger(__name__)

BASE_WEIGHT_FILE_RE = re.compile(BASE_WEIGHT_FILE_PATTERN)
PEFT_ADAPTER_FILE_RE = re.compile(PEFT_ADAPTER_FILE_PATTERN)
# Fetched from the Hub first; then only the safetensors weight files that dendrite_config.json lists (never a pickle).
HUB_CONFIG_FILES = (CONFIG_NAME, GENERATION_CONFIG_NAME, DENDRITE_CONFIG_NAME)

_HASH_CHUNK = 1 << 24


class CheckpointError(ValueError):
    """A dendritic checkpoint is missing, incomplete, corrupt, or does not match the model it is loaded into.

    The message names the file (and the layer where one is concerned) and says how to fix it.
    """


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- save
def split_state_dict(
    state_dict: Optional[dict[str, torch.Tensor]],
    model_state: dict[str, torch.Tensor],
    dendrite_keys: set[str],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split a full state dict into (base entries, dendrite entries), names relative to the wrapped model.

    Args:
        state_dict: what to save, keyed like `model_state` or with a `model.` prefix (as the Trainer's
            `accelerator.get_state_dict(dendritic_model)` gives); None saves `model_state` itself.
        model_state: the wrapped model's own `state_dict()`, the reference for names and dendrite shapes.
        dendrite_keys: the names of the dendrite entries in `model_state`.
    """
    if state_dict is None:
        full = model_state
    else:
        keys = list(state_dict)
        if (
            keys
            and not all(k in model_state for k in keys)
            and all(k.startswith("model.") and k[6:] in model_state for k in keys)
        ):
            state_dict = {k[6:]: v for k, v in state_dict.items()}
        unknown = sorted(set(state_dict) - set(model_state))
        if unknown:
            raise ValueError(
                f"save_pretrained(state_dict=...) has keys that are not in the model, e.g. {unknown[:5]}; pass the "
                "state dict of the DendriticModel (or of its `.model`) unchanged."
            )
        missing = sorted(dendrite_keys - set(state_dict))
        if missing:
            raise ValueError(
                f"save_pretrained(state_dict=...) lacks dendrite parameters, e.g. {missing[:5]}; the state dict must "
                "hold every parameter of the DendriticModel."
            )
        wrong = sorted(k for k in dendrite_keys if tuple(state_dict[k].shape) != tuple(model_state[k].shape))
        if wrong:
            raise ValueError(
                f"save_pretrained(state_dict=...): {wrong[0]} has shape {tuple(state_dict[wrong[0]].shape)}, but the "
                f"model's has {tuple(model_state[wrong[0]].shape)}; the state dict must match the model's current "
                "dendrite counts."
            )
        full = state_dict
    base = {k: v for k, v in full.items() if k not in dendrite_keys}
    dendrites = {k: full[k] for k in sorted(dendrite_keys)}
    return base, dendrites


def prepare_save_directory(directory: str) -> None:
    """Create `directory` and remove what an earlier save there wrote that a new save replaces.

    The marker goes first (the folder stops being loadable), then the base and dendrite weight files (a sharded
    save must not leave the single file behind, or the other way round) and the training curve (a model saved
    without one must not show an old run's). Other files, such as a Trainer's `optimizer.pt`, are left alone.
    """
    os.makedirs(directory, exist_ok=True)
    marker = os.path.join(directory, DENDRITE_CONFIG_NAME)
    if os.path.exists(marker):
        os.remove(marker)
    for name in os.listdir(directory):
        if BASE_WEIGHT_FILE_RE.fullmatch(name) or name in (
            DENDRITE_WEIGHTS_NAME,
            DENDRITE_WEIGHTS_NAME + ".tmp",
            DENDRITE_TRAINED_BASE_NAME,
            DENDRITE_TRAINED_BASE_NAME + ".tmp",
            TRAINING_CURVE_NAME,
        ):
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                os.remove(path)


def save_base_weights(
    model: Any,
    directory: str,
    state_dict: dict[str, torch.Tensor],
    *,
    base_params: int,
    max_shard_size: Optional[Union[int, str]] = None,
) -> list[str]:
    """Save the base model with transformers' own `save_pretrained` (config, tied weights, sharding).

    `model` is the wrapped transformers model and `state_dict` its base entries (`split_state_dict`); `base_params`
    is the base parameter count, recorded in the shard index in place of transformers' `num_parameters()`, which
    would count the dendrites the files do not hold. The plain-load notice tensor (`PLAIN_LOAD_NOTICE_KEY`) is saved
    with the base weights. Returns the weight files written (index + shards, or the single file).
    """
    save_model = getattr(model, "save_pretrained", None)
    if not callable(save_model):
        raise TypeError(
            f"DendriticModel.save_pretrained needs a transformers PreTrainedModel, got {type(model).__name__}; for a "
            "plain torch module save `dm.state_dict()` with safetensors.torch.save_file."
        )
    if PLAIN_LOAD_NOTICE_KEY in state_dict:
        raise ValueError(f"The model has a tensor named {PLAIN_LOAD_NOTICE_KEY!r}, a name hf_dendrites reserves.")
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    # A fresh dict: transformers' save pops the tensors it writes.
    state_dict = {**state_dict, PLAIN_LOAD_NOTICE_KEY: torch.zeros(1, dtype=torch.uint8)}
    save_model(directory, state_dict=state_dict, **kwargs)
    index_path = os.path.join(directory, SAFE_WEIGHTS_INDEX_NAME)
    if os.path.isfile(index_path):
        index = read_json_file(index_path)
        if isinstance(index.get("metadata"), dict) and "total_parameters" in index["metadata"]:
            index["metadata"]["total_parameters"] = base_params
            atomic_write_text(index_path, json.dumps(index, indent=2, sort_keys=True) + "\n")
        return [SAFE_WEIGHTS_INDEX_NAME] + sorted(set(index["weight_map"].values()))
    if os.path.isfile(os.path.join(directory, SAFE_WEIGHTS_NAME)):
        return [SAFE_WEIGHTS_NAME]
    raise RuntimeError(
        f"transformers' save_pretrained wrote no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME} in {directory}."
    )


def save_dendrite_weights(directory: str, tensors: dict[str, torch.Tensor], name: str = DENDRITE_WEIGHTS_NAME) -> str:
    """Write the dendrite tensors as `dendrite_model.safetensors` (or, for an adapter-only checkpoint, the trained
    base entries under `name`), via a temporary name so a partial file never has the final name; returns its path."""
    cpu = {}
    file_name = name
    for name, tensor in tensors.items():
        if tensor.device.type == "meta":
            raise ValueError(
                f"Cannot save {name!r}: it is on the meta device (offloaded). Load the model without disk "
                "offloading, or pass the gathered `state_dict=` to save_pretrained."
            )
        cpu[name] = tensor.detach().to("cpu").contiguous()
    metadata = {
        "format": "pt",
        "hf_dendrites_version": library_version(),
        "format_version": str(CHECKPOINT_FORMAT_VERSION),
    }
    path = os.path.join(directory, file_name)
    save_file(cpu, path + ".tmp", metadata=metadata)
    os.replace(path + ".tmp", path)
    return path


def write_checkpoint_metadata(
    directory: str,
    *,
    dendrite_config: dict[str, Any],
    layers: dict[str, int],
    growth_count: int,
    base_model: dict[str, Any],
    base_files: list[str],
    training_summary: Optional[dict[str, Any]] = None,
) -> str:
    """Write `dendrite_config.json`, the marker that makes the folder loadable: last, and atomically.

    It records the config, the dendrite count of every layer, the base model (`architecture`, `model_type`,
    `name_or_path`; for an adapter-only checkpoint also `reference` and `fingerprint`), the size of every weight file
    and the SHA-256 of the dendrite file (and of the trained base file of an adapter-only checkpoint), so
    `read_checkpoint_metadata` detects missing, truncated or replaced files. `training_summary` must be plain JSON
    data. Returns the path.
    """
    files = {name: {"size": os.path.getsize(os.path.join(directory, name))} for name in base_files}
    adapter_only = "fingerprint" in base_model
    for name in (DENDRITE_WEIGHTS_NAME, DENDRITE_TRAINED_BASE_NAME) if adapter_only else (DENDRITE_WEIGHTS_NAME,):
        path = os.path.join(directory, name)
        files[name] = {"size": os.path.getsize(path), "sha256": _sha256(path)}
    payload = {
        "format_version": ADAPTER_ONLY_FORMAT_VERSION if adapter_only else CHECKPOINT_FORMAT_VERSION,
        "library_version": library_version(),
        "dendrite_config": dendrite_config,
        "layers": dict(layers),
        "growth_count": int(growth_count),
        "base_model": base_model,
        "files": files,
    }
    if training_summary is not None:
        payload["training_summary"] = training_summary
    path = os.path.join(directory, DENDRITE_CONFIG_NAME)
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return path


# ---------------------------------------------------------------------------------------------- reading
def read_checkpoint_metadata(directory: Union[str, os.PathLike], *, check_files: bool = True) -> dict[str, Any]:
    """Read and validate a checkpoint's `dendrite_config.json` (and, by default, that its files are complete).

    Returns the parsed JSON: `format_version`, `library_version`, `dendrite_config`, `layers` ({layer name: count}),
    `growth_count`, `base_model`, `files`, and `training_summary` when the model came from `DendriticTrainer`.
    Raises `CheckpointError` for a folder that is not a complete, intact dendritic checkpoint.
    """
    directory = os.fspath(directory)
    path = os.path.join(directory, DENDRITE_CONFIG_NAME)
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(directory, CONFIG_NAME)):
            raise CheckpointError(
                f"{path} not found: {directory} is not a complete hf_dendrites checkpoint (a save or download was "
                "interrupted, or it is a plain transformers checkpoint: load that with transformers and convert it "
                "with `get_dendritic_model`)."
            )
        raise CheckpointError(f"{path} not found: {directory} is not an hf_dendrites checkpoint.")
    try:
        payload = read_dendrite_config_file(path)
    except (ValueError, OSError) as err:
        raise CheckpointError(str(err)) from err
    if "layers" not in payload:
        raise CheckpointError(
            f"{path} holds a DendriteConfig only (written by `DendriteConfig.save_pretrained`), not a model checkpoint; "
            "save the model with `DendriticModel.save_pretrained`."
        )
    layers, files = payload.get("layers"), payload.get("files")
    if not isinstance(layers, dict) or not all(
        isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in layers.values()
    ):
        raise CheckpointError(f"{path}: 'layers' must map layer names to dendrite counts >= 0, got {layers!r}.")
    if (
        not isinstance(files, dict)
        or DENDRITE_WEIGHTS_NAME not in files
        or not isinstance(payload.get("base_model"), dict)
    ):
        raise CheckpointError(
            f"{path} lacks the 'files' manifest or 'base_model' entry; the file is damaged, save the model again."
        )
    adapter_only = "fingerprint" in payload["base_model"]
    allowed = {DENDRITE_WEIGHTS_NAME, DENDRITE_TRAINED_BASE_NAME} if adapter_only else {DENDRITE_WEIGHTS_NAME}
    strange = sorted(
        n for n in files
        if not (n in allowed or PEFT_ADAPTER_FILE_RE.fullmatch(n) or (not adapter_only and BASE_WEIGHT_FILE_RE.fullmatch(n)))
    )
    if strange:
        raise CheckpointError(
            f"{path} lists unexpected files {strange[:3]} (only safetensors weight files belong there); the file is damaged."
        )
    if adapter_only:
        _check_adapter_only_entry(path, payload)
    try:
        DendriteConfig.from_dict(payload["dendrite_config"])
    except (TypeError, ValueError, NotImplementedError) as err:
        raise CheckpointError(f"{path}: invalid dendrite config: {err}") from err
    if check_files:
        _check_manifest(directory, payload)
    return payload


def _check_manifest(directory: str, payload: dict[str, Any]) -> None:
    """Every file the manifest lists exists with the recorded size (catches interrupted downloads, truncation and
    weight files replaced by those of another model)."""
    for name, info in sorted(payload["files"].items()):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise CheckpointError(
                f"{path} is missing: the checkpoint in {directory} is incomplete (interrupted copy or download); "
                "save or download it again."
            )
        size = os.path.getsize(path)
        if size != info.get("size"):
            what = "truncated" if size < info.get("size", 0) else "modified"
            raise CheckpointError(
                f"{path} is {size} bytes but {DENDRITE_CONFIG_NAME} records {info.get('size')}: the file is {what} or "
                "was replaced by another model's; it does not belong to this checkpoint. Save the model again."
            )


def _check_sha256(directory: str, payload: dict[str, Any], name: str) -> None:
    """The file `name` has the SHA-256 that the manifest records (when it records one)."""
    path = os.path.join(directory, name)
    recorded = payload["files"][name].get("sha256")
    if recorded is not None and _sha256(path) != recorded:
        raise CheckpointError(
            f"{path} is corrupt: its SHA-256 differs from the one recorded in {DENDRITE_CONFIG_NAME}. Save or download "
            "the checkpoint again."
        )


def read_dendrite_tensors(
    directory: str, payload: dict[str, Any], expected: dict[str, dict[str, tuple[int, ...]]]
) -> dict[str, torch.Tensor]:
    """Read `dendrite_model.safetensors` after checking its checksum and that it holds exactly the tensors (with
    the shapes) that the layers' recorded counts need.

    Args:
        directory: the checkpoint folder.
        payload: its `read_checkpoint_metadata` (the `layers` counts and the file manifest).
        expected: {layer name: {parameter name: shape}} for the recorded counts (from each dendritic layer's
            `expected_dendrite_shapes(count)`).

    Returns:
        {"<layer>.<parameter>": tensor} on the CPU. Any missing, unexpected or mis-shaped tensor raises
        `CheckpointError` naming the file and the layer.
    """
    path = os.path.join(directory, DENDRITE_WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise CheckpointError(
            f"{path} is missing: the checkpoint in {directory} is incomplete (interrupted copy or download); save or "
            "download it again."
        )
    _check_sha256(directory, payload, DENDRITE_WEIGHTS_NAME)
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({err}); save or download the checkpoint again."
        ) from err

    wanted = {f"{layer}.{p}": shape for layer, params in expected.items() for p, shape in params.items()}
    counts = payload["layers"]
    for name in sorted(set(shapes) - set(wanted)):
        layer = name.rpartition(".")[0]
        if layer in counts:
            raise CheckpointError(
                f"{path} holds {name} of shape {shapes[name]}, which layer {layer!r} with the {counts[layer]} dendrites "
                f"recorded in {DENDRITE_CONFIG_NAME} does not have: the dendrite counts do not match the file."
            )
        raise CheckpointError(f"{path} holds {name}, but {layer!r} is not a dendritic layer of this model.")
    for name, shape in sorted(wanted.items()):
        layer = name.rpartition(".")[0]
        if name not in shapes:
            raise CheckpointError(
                f"{path} lacks {name}: layer {layer!r} has {counts[layer]} dendrites in {DENDRITE_CONFIG_NAME}, which "
                "needs it. The file is incomplete or belongs to another checkpoint."
            )
        if shapes[name] != shape:
            raise CheckpointError(
                f"{path}: {name} has shape {shapes[name]}, but layer {layer!r} with {counts[layer]} dendrites needs "
                f"{shape}: the dendrite counts in {DENDRITE_CONFIG_NAME} do not match the file, or the base model "
                "does not match the dendrites."
            )
    return tensors


def check_layer_names(directory: str, payload: dict[str, Any], layer_names: set[str], architecture: str) -> None:
    """The model's dendritic layers (`layer_names`, of a model of class `architecture`) are the checkpoint's."""
    want = set(payload["layers"])
    if layer_names != want:
        missing, extra = sorted(want - layer_names), sorted(layer_names - want)
        path = os.path.join(directory, DENDRITE_CONFIG_NAME)
        detail = []
        if missing:
            detail.append(f"the checkpoint has dendritic layer(s) the model lacks, e.g. {missing[:3]}")
        if extra:
            detail.append(f"the model has dendritic layer(s) the checkpoint lacks, e.g. {extra[:3]}")
        saved = payload["base_model"].get("architecture")
        raise CheckpointError(
            f"{path}: the dendritic layers do not match the model ({'; '.join(detail)}). The base model "
            f"({architecture}) does not match the one the checkpoint was saved from ({saved}), or the model was "
            "converted with other `target_modules`."
        )


def check_dendrite_kind(directory: str, payload: dict[str, Any], current: DendriteConfig) -> None:
    """The dendrites of `current` compute what the checkpoint's did (same activation, rank and cascade)."""
    saved = DendriteConfig.from_dict(payload["dendrite_config"])
    path = os.path.join(directory, DENDRITE_CONFIG_NAME)
    for field_name in ("activation", "rank", "cascade"):
        if getattr(saved, field_name) != getattr(current, field_name):
            raise CheckpointError(
                f"{path} was saved with {field_name}={getattr(saved, field_name)!r}, but the model has "
                f"{field_name}={getattr(current, field_name)!r}; build the model with the checkpoint's DendriteConfig "
                "(`DendriteConfig.from_pretrained(folder)`) or load it with `DendriticModel.from_pretrained`."
            )


def training_summary_from_metadata(directory: str, payload: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The checkpoint's training summary, its `curve_png` made a path into `directory` (None when the file is gone)."""
    summary = payload.get("training_summary")
    if not isinstance(summary, dict):
        return None
    summary = dict(summary)
    curve = summary.get("curve_png")
    path = os.path.join(directory, curve) if curve else None
    summary["curve_png"] = path if path and os.path.isfile(path) else None
    return summary


def read_base_state(directory: str, payload: dict[str, Any], model: Any) -> dict[str, tuple[str, torch.Tensor]]:
    """{state name: (folder, tensor)}: the folder's base weights as `model`'s own class loads them, keyed like
    `model.state_dict()` (on the CPU; `model` itself is not touched).

    transformers does not always save a model under the names it has in memory: its checkpoint conversion mapping
    renames keys on save and back on load (transformers 5 saves ViT's `vit.layers.0.attention.q_proj` under the
    original `vit.encoder.layer.0.attention.attention.query`, GPT-NeoX's `lm_head` as `embed_out`) and may fuse or
    split tensors. So the files are not matched by name: the class's own `from_pretrained` (safetensors only) loads
    them into a copy built from `model.config`, in the widest floating dtype of `model` (each value then reaches
    `model` cast once, as if copied from the file). Its load report must list no missing, unexpected or mis-shaped
    key other than the plain-load notice (`check_loading_info`), else `CheckpointError`. The global random state is
    left as it was.
    """
    from_pretrained = getattr(model, "from_pretrained", None)
    config = getattr(model, "config", None)
    if not callable(from_pretrained) or config is None:
        raise TypeError(
            f"load_dendritic_state needs a DendriticModel of a transformers PreTrainedModel, got "
            f"{type(model).__name__}; for a plain torch module load a saved `state_dict()` with `load_state_dict`."
        )
    floating = {t.dtype for t in model.state_dict().values() if t.is_floating_point()}
    dtype = max(floating, key=lambda d: torch.finfo(d).bits) if floating else None
    architecture = type(model).__name__
    kwargs = {"dtype": dtype} if dtype is not None else {}  # else "auto" would take config.dtype
    with torch.random.fork_rng(devices=[]), plain_load_notice_hidden(directory):
        try:
            # Eager attention: the copy never runs, and a CPU copy could not be built with e.g. flash attention.
            # Mismatched shapes are reported in `info` (checked below) rather than raised.
            loaded, info = type(model).from_pretrained(
                directory, config=config, use_safetensors=True, output_loading_info=True,
                ignore_mismatched_sizes=True, attn_implementation="eager", **kwargs,
            )
        except (OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(
                f"transformers could not load the base weights in {directory} into {architecture} ({err}); the base "
                "checkpoint does not match the model."
            ) from err
    check_loading_info(
        directory, payload, info, architecture,
        remedy="The base checkpoint does not match the model (another architecture or size).",
    )
    return {key: (directory, tensor) for key, tensor in loaded.state_dict().items()}


def check_base_tensors(
    directory: str,
    base: dict[str, tuple[str, torch.Tensor]],
    model_state: dict[str, torch.Tensor],
    *,
    dendrite_keys: set[str],
    tied_aliases: dict[str, set[str]],
    ignore_patterns: list[str],
    architecture: str,
) -> None:
    """Check base tensors read by `read_base_state` (keyed like the model's state) against a model's state before
    anything is copied: the same names (a model changed since it was built from its config may differ from a fresh
    copy), the same shapes, nothing offloaded.

    Args:
        model_state: the wrapped model's `state_dict()`.
        dendrite_keys: its dendrite entries (now and after resizing to the checkpoint's counts): not base weights.
        tied_aliases: for every state name, the other names of the same tensor (a tied weight is saved once).
        ignore_patterns: the model class's `_keys_to_ignore_on_save` (regexes of entries transformers never saves).
        architecture: the model's class name, for the messages.
    """
    base_keys = {k for k in model_state if k not in dendrite_keys}
    unexpected = sorted(set(base) - base_keys)
    if unexpected:
        file = base[unexpected[0]][0]
        raise CheckpointError(
            f"{file} holds {len(unexpected)} tensor(s) the model does not have, e.g. {unexpected[:3]}: the base "
            f"checkpoint does not match {architecture}."
        )
    ignore = [re.compile(p) for p in ignore_patterns]
    missing = sorted(
        k
        for k in base_keys - set(base)
        if not (tied_aliases.get(k, set()) & set(base)) and not any(p.search(k) for p in ignore)
    )
    if missing:
        raise CheckpointError(
            f"The base weights in {directory} lack {len(missing)} tensor(s) of {architecture}, e.g. {missing[:3]}: the "
            "base checkpoint does not match the model."
        )
    for key, (file, tensor) in sorted(base.items()):
        if tuple(tensor.shape) != tuple(model_state[key].shape):
            raise CheckpointError(
                f"{file}: {key} has shape {tuple(tensor.shape)}, but the model's has {tuple(model_state[key].shape)}: "
                "the base checkpoint does not match the model."
            )
        if model_state[key].device.type == "meta":
            raise CheckpointError(f"Cannot load {key} from {file} in place: the model keeps it offloaded (meta device).")


# ---------------------------------------------------------------------------------------------- adapter-only checkpoints
def is_adapter_only(payload: dict[str, Any]) -> bool:
    """Whether a checkpoint (its `read_checkpoint_metadata`) is adapter-only: no base weights, a base reference."""
    return isinstance(payload.get("base_model"), dict) and "fingerprint" in payload["base_model"]


def _check_adapter_only_entry(path: str, payload: dict[str, Any]) -> None:
    entry = payload["base_model"]
    fingerprint, reference = entry.get("fingerprint"), entry.get("reference")
    if (
        not isinstance(fingerprint, dict)
        or not isinstance(fingerprint.get("tensors"), dict)
        or not isinstance(reference, dict)
        or not isinstance(entry.get("aliases", {}), dict)
        or DENDRITE_TRAINED_BASE_NAME not in payload["files"]
    ):
        raise CheckpointError(
            f"{path} is an adapter-only checkpoint but lacks its base reference, fingerprint or "
            f"{DENDRITE_TRAINED_BASE_NAME} entry; the file is damaged, save the model again."
        )


def tensor_sha256(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes: its values in its own dtype, in row-major order (dtype and shape are recorded
    beside it)."""
    data = tensor.detach().to("cpu").contiguous().reshape(-1)
    return hashlib.sha256(data.view(torch.uint8).numpy()).hexdigest()


def tensor_digests(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """`tensor_sha256` of every tensor, hashed on several threads (hashlib releases the GIL on large buffers)."""
    names = list(tensors)
    offloaded = [name for name in names if tensors[name].device.type == "meta"]
    if offloaded:
        raise ValueError(
            f"Cannot fingerprint the frozen base weights: {offloaded[:3]} are on the meta device (offloaded). Load the "
            "model without disk offloading, or save a full checkpoint (adapter_only=False)."
        )
    workers = max(1, min(8, os.cpu_count() or 1, len(names)))
    with ThreadPoolExecutor(workers) as pool:
        return dict(zip(names, pool.map(lambda name: tensor_sha256(tensors[name]), names)))


def split_adapter_state(
    model: Any,
    base_state: dict[str, torch.Tensor],
    trainable: Optional[Collection[str]] = None,
    names: Optional[dict[str, str]] = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, str]]:
    """Split the base entries of an adapter-only save into (trained, frozen, aliases).

    Args:
        model: the wrapped model (its `state_dict(keep_vars=True)` tells parameters from buffers and tied names).
        base_state: the base entries to save (`split_state_dict`), under their checkpoint names.
        trainable: the checkpoint names of the parameters that train; None: those with `requires_grad=True`.
        names: {name in `model.state_dict()`: checkpoint name} of the entries that belong to the base (for a PEFT
            model the plain model's names, the adapter's tensors left out: `DendriticModel.checkpoint_names`);
            None: every entry, under its own name.

    Trained: the parameters that train and every persistent buffer (buffers change without gradients, e.g. running
    statistics, and are small). Frozen: the other parameters, which the checkpoint references and fingerprints
    instead of storing, and the entries that are neither parameters nor buffers (a quantized layer's quantization
    state, such as bitsandbytes' `weight.absmax`, derived from its frozen weight). A tensor under several names
    (tied weights) is kept under its first name; `aliases` maps its other names to that one.
    """
    kept = model.state_dict(keep_vars=True)
    if names is not None:
        kept = {names[key]: tensor for key, tensor in kept.items() if key in names}
    param_ids = {id(p) for p in model.parameters()}
    buffer_ids = {id(b) for b in model.buffers()}
    groups: dict[int, list[str]] = {}
    for key, tensor in kept.items():
        groups.setdefault(id(tensor), []).append(key)
    names = {group[0]: group for group in groups.values() if any(k in base_state for k in group)}
    aliases = {alias: canonical for canonical, group in names.items() for alias in group if alias != canonical}
    trained: dict[str, torch.Tensor] = {}
    frozen: dict[str, torch.Tensor] = {}
    for canonical, group in names.items():
        tensor = kept[canonical]
        value = next((base_state[k] for k in group if k in base_state), None)
        if value is None:
            raise ValueError(f"save_pretrained(state_dict=...) lacks {canonical!r}; pass the model's full state dict.")
        if id(tensor) not in param_ids:
            trains = id(tensor) in buffer_ids
        elif trainable is None:
            trains = tensor.requires_grad
        else:
            trains = any(k in trainable for k in group)
        (trained if trains else frozen)[canonical] = value
    return trained, frozen, aliases


def base_fingerprint(frozen: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The fingerprint of the frozen base tensors: per tensor its dtype, shape and `tensor_sha256`, and one SHA-256
    over that table."""
    digests = tensor_digests(frozen)
    tensors = {
        name: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "sha256": digests[name]}
        for name, t in sorted(frozen.items())
    }
    table = json.dumps(tensors, sort_keys=True).encode("utf-8")
    return {"algorithm": "sha256", "tensors": tensors, "sha256": hashlib.sha256(table).hexdigest()}


def describe_base_reference(reference: dict[str, Any]) -> str:
    """`name` (revision `rev`) of a checkpoint's base reference, for messages."""
    name = reference.get("name_or_path")
    if not name:
        return "no base (the model it was saved from had no name or path)"
    revision = reference.get("revision")
    return f"{name!r}" + (f" at revision {revision}" if revision else "")


def _base_fix(entry: dict[str, Any]) -> str:
    return (
        f"Load it with the base it was trained on, unchanged ({describe_base_reference(entry['reference'])}): "
        "`DendriticModel.from_pretrained(folder, base_model=...)` takes a path, a Hub id or the model itself. A base "
        "with other weights (another revision or dtype, a fine-tuned copy) would silently change the outputs."
    )


def check_adapter_only_keys(
    directory: str,
    payload: dict[str, Any],
    trained: dict[str, torch.Tensor],
    model_state: dict[str, torch.Tensor],
    architecture: str,
) -> None:
    """The base model (its non-dendrite `state_dict()` entries, `model_state`) has exactly the entries the
    adapter-only checkpoint covers (frozen, trained, tied names) and the trained ones with the saved shapes."""
    entry = payload["base_model"]
    path = os.path.join(directory, DENDRITE_CONFIG_NAME)
    covered = set(entry["fingerprint"]["tensors"]) | set(trained) | set(entry.get("aliases", {}))
    missing, extra = sorted(covered - set(model_state)), sorted(set(model_state) - covered)
    if missing or extra:
        detail = []
        if missing:
            detail.append(f"the checkpoint has {len(missing)} tensor(s) the model lacks, e.g. {missing[:3]}")
        if extra:
            detail.append(f"the model has {len(extra)} tensor(s) the checkpoint does not cover, e.g. {extra[:3]}")
        raise CheckpointError(
            f"{path}: the base model ({architecture}) does not match the adapter-only checkpoint ({'; '.join(detail)}). "
            + _base_fix(entry)
        )
    for key, tensor in sorted(trained.items()):
        if tuple(tensor.shape) != tuple(model_state[key].shape):
            raise CheckpointError(
                f"{os.path.join(directory, DENDRITE_TRAINED_BASE_NAME)}: {key} has shape {tuple(tensor.shape)}, but the "
                f"model's has {tuple(model_state[key].shape)}: the base model does not match the checkpoint. "
                + _base_fix(entry)
            )
        if model_state[key].device.type == "meta":
            raise CheckpointError(f"Cannot load {key} in place: the model keeps it offloaded (meta device).")


def check_base_fingerprint(
    directory: str, payload: dict[str, Any], model_state: dict[str, torch.Tensor], base: str
) -> None:
    """The frozen tensors of the base model (`model_state`: its `state_dict()` entries, names relative to the
    wrapped model; `base` says where it came from) are the ones the adapter-only checkpoint was trained on: same
    dtype, shape and SHA-256, else `CheckpointError` naming the tensors and the fix."""
    entry = payload["base_model"]
    recorded = entry["fingerprint"]["tensors"]
    path = os.path.join(directory, DENDRITE_CONFIG_NAME)
    missing = sorted(set(recorded) - set(model_state))
    if missing:
        raise CheckpointError(
            f"{path}: the base model ({base}) lacks {len(missing)} frozen tensor(s) of the checkpoint's base, e.g. "
            f"{missing[:3]}. " + _base_fix(entry)
        )
    offloaded = sorted(name for name in recorded if model_state[name].device.type == "meta")
    if offloaded:
        raise CheckpointError(
            f"Cannot check the base model's frozen weights against {path}: {offloaded[:3]} are offloaded (meta "
            "device). Load the base without disk offloading."
        )
    for name, info in sorted(recorded.items()):
        tensor = model_state[name]
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype != info.get("dtype"):
            raise CheckpointError(
                f"{path}: the base model ({base}) has {name} in {dtype}, but the checkpoint was trained on a base in "
                f"{info.get('dtype')}: load the base with dtype=torch.{info.get('dtype')}. " + _base_fix(entry)
            )
        if list(tensor.shape) != list(info.get("shape", [])):
            raise CheckpointError(
                f"{path}: the base model ({base}) has {name} of shape {tuple(tensor.shape)}, but the checkpoint's base "
                f"had {tuple(info.get('shape', []))}. " + _base_fix(entry)
            )
    digests = tensor_digests({name: model_state[name] for name in recorded})
    differ = sorted(name for name, info in recorded.items() if digests[name] != info.get("sha256"))
    if differ:
        raise CheckpointError(
            f"{path}: the base model ({base}) is not the one the checkpoint was trained on: {len(differ)} of its "
            f"{len(recorded)} frozen tensors have other values (fingerprint mismatch), e.g. {differ[:3]}. "
            + _base_fix(entry)
        )


def read_trained_base_tensors(directory: str, payload: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The trained base entries of an adapter-only checkpoint (`dendrite_base_trained.safetensors`), after checking
    the file's SHA-256."""
    path = os.path.join(directory, DENDRITE_TRAINED_BASE_NAME)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing: the checkpoint in {directory} is incomplete; save or download it again.")
    _check_sha256(directory, payload, DENDRITE_TRAINED_BASE_NAME)
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            return {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file ({err}); save the checkpoint again.") from err


def cached_hub_commit(repo_id: str) -> Optional[str]:
    """The commit that `repo_id`'s main branch points to in the local Hub cache (where a model loaded from the Hub
    has its files), or None. transformers does not record the commit a model was loaded at; this is the commit a
    load of the default branch used."""
    from huggingface_hub import try_to_load_from_cache

    try:
        path = try_to_load_from_cache(repo_id, CONFIG_NAME)
    except ValueError:  # not a repo id
        return None
    return os.path.basename(os.path.dirname(path)) if isinstance(path, str) else None


def checkpoint_save_options(requires_grad: dict[str, bool]) -> dict[str, Any]:
    """How a Trainer checkpoint is saved (`save_pretrained` arguments), given the run's trainability: for every base
    parameter (names of `DendriticModel.named_parameters()`), whether the user lets it train.

    A run that freezes any of them writes adapter-only checkpoints holding only what trains: the frozen weights
    cannot change during the run, so a resume (into the same base, checked by the fingerprint) is exact. The run's
    flags are passed because the schedule freezes the base for a while (dendrites-only phase, candidate phase).
    """
    if all(requires_grad.values()):
        return {}
    return {"adapter_only": True, "trainable": {name for name, flag in requires_grad.items() if flag}}


def frozen_state_names(directory: str) -> set[str]:
    """The checkpoint names (relative to the wrapped model; a PEFT model's plain names) of the tensors that checkpoint
    `directory` fingerprints instead of storing: empty for a full checkpoint (or a folder without
    `dendrite_config.json`)."""
    path = os.path.join(directory, DENDRITE_CONFIG_NAME)
    if not os.path.isfile(path):
        return set()
    payload = read_json_file(path, CheckpointError, "the checkpoint is damaged")
    if not is_adapter_only(payload):
        return set()
    entry = payload["base_model"]
    return set(entry["fingerprint"].get("tensors", {})) | set(entry.get("aliases", {}))


def load_dendritic_state(model: Any, directory: Union[str, os.PathLike]) -> None:
    """Load a checkpoint folder into an existing `DendriticModel`, in place and strictly.

    The same as `model.load_dendritic_state(directory)` (see `DendriticModel.load_dendritic_state`).
    """
    model.load_dendritic_state(directory)


# ---------------------------------------------------------------------------------------------- from_pretrained
def resolve_checkpoint_dir(
    path_or_repo_id: Union[str, os.PathLike],
    *,
    revision: Optional[str] = None,
    token: Optional[Union[str, bool]] = None,
    cache_dir: Optional[str] = None,
    force_download: bool = False,
    local_files_only: bool = False,
    code: bool = False,
) -> str:
    """A local folder as it is, or a Hub repo downloaded into the cache: first the JSON configs, then exactly the
    weight files that `dendrite_config.json` lists, from the same commit (with `code=True`, for `trust_remote_code`,
    also the repo's `.py` files). Nothing else (no pickle) is fetched."""
    path = os.fspath(path_or_repo_id)
    if os.path.isdir(path):
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    kwargs = dict(token=token, cache_dir=cache_dir, force_download=force_download, local_files_only=local_files_only)
    try:
        folder = snapshot_download(path, revision=revision, allow_patterns=list(HUB_CONFIG_FILES), **kwargs)
    except HFValidationError as err:
        raise FileNotFoundError(f"{path!r} is neither a local folder nor a valid Hub repo id ({err}).") from err
    try:
        payload = read_checkpoint_metadata(folder, check_files=False)
    except CheckpointError as err:
        raise CheckpointError(f"Hub repo {path!r} (revision {revision or 'main'}): {err}") from err
    commit = os.path.basename(os.path.normpath(folder))  # the cache's snapshots/<commit hash> folder
    weights = sorted(
        name for name in payload["files"] if name.endswith((".safetensors", ".safetensors.index.json")) or PEFT_ADAPTER_FILE_RE.fullmatch(name)
    )
    return snapshot_download(path, revision=commit, allow_patterns=weights + (["*.py"] if code else []), **kwargs)


# Model classes that hf_dendrites ships for `auto_map` entries of saved folders (`register_for_auto_class`): the
# `auto_map` reference `<module file>.<class>` -> the importable module. DendriticModel.from_pretrained builds these
# from the installed package, never from the copy of the file in the folder.
SHIPPED_AUTO_MAP_CLASSES = {
    "modeling_mean_pooled.BertForMeanPooledClassification": "hf_dendrites.modeling_mean_pooled",
}


def base_model_class(directory: str, payload: dict[str, Any], *, trust_remote_code: bool = False) -> Any:
    """The class to rebuild the base model with (its `from_pretrained` gets `trust_remote_code` from the caller).

    The class is the one the checkpoint was saved from, which must agree with `config.json`'s `architectures`: a
    transformers class by name; else a class that `config.json`'s `auto_map` names (a model class registered with
    `register_for_auto_class`, whose module file `save_pretrained` copied into the folder): one that hf_dendrites
    ships (`SHIPPED_AUTO_MAP_CLASSES`) is imported from the installed package, any other is built by its transformers
    Auto class from the folder's code, which happens only with `trust_remote_code=True`.
    """
    config_path = os.path.join(directory, CONFIG_NAME)
    base_config = read_json_file(config_path, CheckpointError, "the checkpoint is damaged")
    saved_arch = payload["base_model"].get("architecture")
    architectures = base_config.get("architectures") or []
    if architectures and saved_arch and architectures[0] != saved_arch:
        raise CheckpointError(
            f"{config_path} describes a {architectures[0]}, but {DENDRITE_CONFIG_NAME} was saved from a "
            f"{saved_arch}: the base checkpoint does not match the dendrites."
        )
    arch = saved_arch or (architectures[0] if architectures else None)
    import transformers

    model_class = getattr(transformers, arch, None) if arch else None
    if model_class is not None:
        return model_class
    auto_map = base_config.get("auto_map") if isinstance(base_config.get("auto_map"), dict) else {}
    entries = [(auto, ref) for auto, ref in sorted(auto_map.items()) if isinstance(ref, str) and ref.rpartition(".")[2] == arch]
    for _, ref in entries:
        if ref in SHIPPED_AUTO_MAP_CLASSES:
            import importlib

            return getattr(importlib.import_module(SHIPPED_AUTO_MAP_CLASSES[ref]), arch)
    if entries and trust_remote_code:
        auto, _ = entries[0]
        auto_class = getattr(transformers, auto, None)
        if auto_class is not None:
            return auto_class
    if entries:
        auto, ref = entries[0]
        code = ref.rpartition(".")[0] + ".py"
        raise ValueError(
            f"{arch} is not a transformers class: {config_path} maps {auto} to {ref}, code in the checkpoint folder "
            f"({code}). hf_dendrites runs code from a checkpoint only when asked to: read {code}, then pass "
            "`trust_remote_code=True`, or pass `model_class=` (the class, imported from your own code)."
        )
    raise ValueError(
        f"Cannot tell which transformers class to build for {directory} (architecture {arch!r}); pass "
        "`model_class=` (e.g. transformers.AutoModelForSequenceClassification or your own class)."
    )


class _HideNoticeReport(logging.Filter):
    """Drops transformers' load report of `directory` when the plain-load notice is the only key it lists."""

    def __init__(self, directory: str):
        super().__init__()
        self.directory = directory

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if PLAIN_LOAD_NOTICE_KEY not in message or self.directory not in message:
            return True
        rows = [line for line in message.splitlines() if " | " in line and not line.startswith("Key ")]
        return any(PLAIN_LOAD_NOTICE_KEY not in row for row in rows)  # other keys: keep the report


@contextlib.contextmanager
def plain_load_notice_hidden(directory: str) -> Iterator[None]:
    """While hf_dendrites loads the base model of `directory` with transformers: no load-report WARNING for the
    plain-load notice tensor (which is there to be seen by plain loads only). A report that lists any other key is
    logged as usual (and `check_loading_info` raises for it)."""
    target = logging.getLogger("transformers.modeling_utils")  # the logger transformers' load report goes to
    hide = _HideNoticeReport(directory)
    target.addFilter(hide)
    try:
        yield
    finally:
        target.removeFilter(hide)


def check_base_folder(directory: str) -> None:
    """The folder has the base model's config and nothing that hf_dendrites never writes (a PEFT adapter)."""
    config_path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{config_path} is missing: the base model's config is needed to rebuild the model.")
    if os.path.isfile(os.path.join(directory, ADAPTER_CONFIG_NAME)):
        raise CheckpointError(
            f"{directory} contains {ADAPTER_CONFIG_NAME} (a PEFT adapter), which hf_dendrites checkpoints never hold; "
            "refusing to load it (adapter files may be pickles)."
        )


def check_loading_info(
    directory: str,
    payload: dict[str, Any],
    info: dict[str, Any],
    architecture: str,
    *,
    remedy: str = "The base checkpoint does not belong to these dendrites, or `model_class` is wrong.",
) -> None:
    """transformers' `output_loading_info` of the base model: any missing / unexpected / mismatched key is an error
    (its message ends with `remedy`), except the plain-load notice tensor, which every checkpoint of format >= 2 has."""
    found = {key: info.get(key) for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")}
    found["unexpected_keys"] = [k for k in found["unexpected_keys"] or () if k != PLAIN_LOAD_NOTICE_KEY]
    problems = {key: value for key, value in found.items() if value}
    if problems:
        files = ", ".join(n for n in sorted(payload["files"]) if n != DENDRITE_WEIGHTS_NAME)
        detail = "; ".join(f"{key}: {sorted(map(str, value))[:5]}" for key, value in problems.items())
        raise CheckpointError(
            f"The base weights ({files} in {directory}) do not match {architecture}: {detail}. {remedy}"
        )


def find_dendritic_checkpoint(name_or_path: Optional[str], *, revision: Optional[str] = None) -> Optional[str]:
    """The folder holding the dendrites of the checkpoint a model was loaded from, or None for a plain model.

    `name_or_path` is what transformers records as the model's source (`config._name_or_path`). A local folder is
    a dendritic checkpoint when it holds `dendrite_config.json` with layer counts; a Hub repo id when that file and
    `dendrite_model.safetensors` are in the local cache or, unless offline, can be downloaded (only those two
    files, at `revision`: the commit the model came from). A folder with dendrite weights but no
    `dendrite_config.json` (an interrupted save) and a repo that cannot be checked are logged as warnings.
    """
    if not name_or_path:
        return None
    path = os.fspath(name_or_path)
    if os.path.isdir(path):
        marker = os.path.join(path, DENDRITE_CONFIG_NAME)
        if os.path.isfile(marker):
            payload = read_json_file(marker, CheckpointError, "the checkpoint is damaged")
            return path if isinstance(payload, dict) and "layers" in payload else None  # else: a DendriteConfig alone
        if os.path.isfile(os.path.join(path, DENDRITE_WEIGHTS_NAME)):
            logger.warning(
                "%s holds %s but no %s (an interrupted save?): the model is converted without its dendrites.",
                path, DENDRITE_WEIGHTS_NAME, DENDRITE_CONFIG_NAME,
            )
        return None
    if os.path.isabs(path) or path.startswith("."):
        return None
    from huggingface_hub import constants as hub_constants
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError

    try:
        cached = try_to_load_from_cache(path, DENDRITE_CONFIG_NAME, revision=revision)
    except HFValidationError:
        return None  # neither a folder nor a repo id
    if cached is not None and not isinstance(cached, str):
        return None  # the cache knows the repo has no such file
    if cached is None and hub_constants.HF_HUB_OFFLINE:
        logger.info(
            "Offline: cannot tell whether the Hub repo %s holds dendrites (%s is not in the local cache).",
            path, DENDRITE_CONFIG_NAME,
        )
        return None
    try:
        marker = hf_hub_download(path, DENDRITE_CONFIG_NAME, revision=revision)
    except EntryNotFoundError:
        return None
    except (OSError, ValueError) as err:  # network, authentication, missing repo
        logger.warning(
            "Could not check whether the Hub repo %s holds dendrites (%s); the model is converted without them. Load "
            "it with DendriticModel.from_pretrained to be sure.",
            path, err,
        )
        return None
    payload = read_json_file(marker, CheckpointError, "the checkpoint is damaged")
    if not (isinstance(payload, dict) and "layers" in payload):
        return None
    folder = os.path.dirname(marker)  # the cache snapshot of the commit the marker came from
    try:
        hf_hub_download(path, DENDRITE_WEIGHTS_NAME, revision=os.path.basename(folder))
    except (OSError, ValueError, EntryNotFoundError) as err:
        raise CheckpointError(
            f"The Hub repo {path} is a dendritic checkpoint ({DENDRITE_CONFIG_NAME}), but its {DENDRITE_WEIGHTS_NAME} "
            f"could not be fetched ({err}). Connect to the Hub (or download the repo) to restore its dendrites, or "
            "pass restore_dendrites=False to get_dendritic_model to start from zero dendrites."
        ) from err
    return folder
