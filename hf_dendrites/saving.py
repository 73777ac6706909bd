"""Saving and loading dendritic checkpoints (ALGORITHM.md section 3).

A checkpoint folder holds:

    config.json, model.safetensors (or shards   the base model under its standard transformers names, dendrite
    + model.safetensors.index.json)             parameters excluded: a plain `AutoModel*.from_pretrained(folder)`
                                                loads the base model without missing / unexpected keys
    dendrite_config.json                        the `DendriteConfig`, the dendrite count of every layer, the library
                                                version, the base architecture, and a manifest of the weight files
    dendrite_model.safetensors                  the dendrite parameters only, keyed `<layer name>.<parameter name>`
    README.md (+ training_curve.png)            the model card (see `hf_dendrites.hub`)

Safety and completeness:

- Loading reads JSON and safetensors only. Nothing is ever unpickled: `.bin` / `.pt` files in the folder are
  ignored, and a folder whose base weights exist only as pickles is refused.
- `dendrite_config.json` is the marker that makes a folder loadable. A save first removes it, writes everything
  else, and writes it last, atomically, with the size of every weight file (and the SHA-256 of the dendrite file).
  A save interrupted at any point therefore leaves a folder that does not load; a file truncated, corrupted or
  replaced afterwards is detected on load. Every problem raises `CheckpointError` naming the file (and the layer).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import DendriteConfig
from .constants import CHECKPOINT_FORMAT_VERSION, DENDRITE_CONFIG_NAME, DENDRITE_WEIGHTS_NAME
from .utils import atomic_write_text, library_version, read_dendrite_config_file, read_json_file

if TYPE_CHECKING:
    from .model import DendriticModel

logger = logging.getLogger(__name__)

# Standard transformers file names (transformers.utils defines the same values).
CONFIG_NAME = "config.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
ADAPTER_CONFIG_NAME = "adapter_config.json"
# Base weight files written by `PreTrainedModel.save_pretrained` (single file, shards, index).
_BASE_WEIGHT_FILE_RE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")
# Fetched from the Hub first; then only the safetensors weight files that dendrite_config.json lists (never a pickle).
HUB_CONFIG_FILES = (CONFIG_NAME, "generation_config.json", DENDRITE_CONFIG_NAME)

_DENDRITE_FILE_CHUNK = 1 << 24


class CheckpointError(ValueError):
    """A dendritic checkpoint is missing, incomplete, corrupt, or does not match the model it is loaded into.

    The message names the file (and the layer where one is concerned) and says how to fix it.
    """


# ---------------------------------------------------------------------------------------------- helpers
def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_DENDRITE_FILE_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _jsonable(value: Any) -> Any:
    """Convert tensors / numpy scalars / tuples in a training summary to plain JSON values."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item"):  # numpy scalar
        return _jsonable(value.item())
    return str(value)


def _base_state_keys(dm: "DendriticModel") -> tuple[dict[str, torch.Tensor], set[str]]:
    """(the wrapped model's state dict, the names of its dendrite entries)."""
    return dm.model.state_dict(), set(dm.dendrite_state_dict())


def _split_state_dict(
    dm: "DendriticModel", state_dict: Optional[dict[str, torch.Tensor]]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split a full state dict into (base entries, dendrite entries), names relative to `dm.model`.

    `state_dict` may be keyed like `dm.model.state_dict()` or like `dm.state_dict()` (a `model.` prefix, as the
    Trainer's `accelerator.get_state_dict(model)` gives); None uses the model's own tensors.
    """
    own, dendrite_keys = _base_state_keys(dm)
    if state_dict is None:
        full = own
    else:
        keys = list(state_dict)
        if keys and not all(k in own for k in keys) and all(k.startswith("model.") and k[6:] in own for k in keys):
            state_dict = {k[6:]: v for k, v in state_dict.items()}
        unknown = sorted(set(state_dict) - set(own))
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
        wrong = sorted(k for k in dendrite_keys if tuple(state_dict[k].shape) != tuple(own[k].shape))
        if wrong:
            raise ValueError(
                f"save_pretrained(state_dict=...): {wrong[0]} has shape {tuple(state_dict[wrong[0]].shape)}, but the "
                f"model's has {tuple(own[wrong[0]].shape)}; the state dict must match the model's current dendrite counts."
            )
        full = state_dict
    base = {k: v for k, v in full.items() if k not in dendrite_keys}
    dendrites = {k: full[k] for k in sorted(dendrite_keys)}
    return base, dendrites


def _remove_stale_files(directory: str) -> None:
    """Delete the marker first (the folder stops being loadable), then weight files a new save replaces."""
    marker = os.path.join(directory, DENDRITE_CONFIG_NAME)
    if os.path.exists(marker):
        os.remove(marker)
    for name in os.listdir(directory):
        if _BASE_WEIGHT_FILE_RE.fullmatch(name) or name in (DENDRITE_WEIGHTS_NAME, DENDRITE_WEIGHTS_NAME + ".tmp"):
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                os.remove(path)


def _written_base_files(directory: str) -> list[str]:
    """Names of the base weight files `save_pretrained` just wrote (index + shards, or the single file)."""
    index_path = os.path.join(directory, SAFE_WEIGHTS_INDEX_NAME)
    if os.path.isfile(index_path):
        with open(index_path, encoding="utf-8") as handle:
            index = json.load(handle)
        return [SAFE_WEIGHTS_INDEX_NAME] + sorted(set(index["weight_map"].values()))
    if os.path.isfile(os.path.join(directory, SAFE_WEIGHTS_NAME)):
        return [SAFE_WEIGHTS_NAME]
    raise RuntimeError(
        f"transformers' save_pretrained wrote no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME} in {directory}."
    )


def _fix_index_total(directory: str, base_params: int) -> None:
    """transformers records `num_parameters()` (which counts the dendrites) in the shard index; the files hold the
    base model only, so record the base count."""
    index_path = os.path.join(directory, SAFE_WEIGHTS_INDEX_NAME)
    if not os.path.isfile(index_path):
        return
    with open(index_path, encoding="utf-8") as handle:
        index = json.load(handle)
    if isinstance(index.get("metadata"), dict) and "total_parameters" in index["metadata"]:
        index["metadata"]["total_parameters"] = base_params
        atomic_write_text(index_path, json.dumps(index, indent=2, sort_keys=True) + "\n")


def _cpu_contiguous(tensor: torch.Tensor, name: str) -> torch.Tensor:
    if tensor.device.type == "meta":
        raise ValueError(
            f"Cannot save dendrite parameter {name!r}: it is on the meta device (offloaded). Load the model without "
            "disk offloading, or pass the gathered `state_dict=` to save_pretrained."
        )
    return tensor.detach().to("cpu").contiguous()


# ---------------------------------------------------------------------------------------------- save
def save_dendritic_model(
    dm: "DendriticModel",
    save_directory: Union[str, os.PathLike],
    *,
    state_dict: Optional[dict[str, torch.Tensor]] = None,
    safe_serialization: bool = True,
    max_shard_size: Optional[Union[int, str]] = None,
    processing_class: Any = None,
    is_main_process: bool = True,
    repo_id: Optional[str] = None,
    tags: Optional[list[str]] = None,
) -> str:
    """Write `dm` as a dendritic checkpoint folder (see the module docstring); returns the folder path.

    This is `DendriticModel.save_pretrained`; `DendriticTrainer` checkpoints and `trainer.save_model()` call it with
    `state_dict=` (keys of `dm.state_dict()` or of `dm.model.state_dict()`) and `safe_serialization=True`.

    Args:
        dm: the model to save. It is not modified.
        save_directory: the folder (created if needed). Files of an earlier save there are replaced; other files
            (e.g. a Trainer's `optimizer.pt`) are left alone.
        state_dict: the full state dict to save instead of the model's own tensors (e.g. gathered under FSDP).
        safe_serialization: must be True: checkpoints are safetensors only.
        max_shard_size: shard the base weights above this size (transformers' `max_shard_size`).
        processing_class: a tokenizer, processor or feature extractor saved alongside (`.save_pretrained(folder)`).
        is_main_process: False on the other processes of a distributed run: nothing is written there.
        repo_id: the Hub repo the folder is for; used in the model card's loading example.
        tags: extra model card tags.
    """
    if not safe_serialization:
        raise ValueError(
            "hf_dendrites checkpoints are safetensors only; call save_pretrained with safe_serialization=True."
        )
    save_directory = os.fspath(save_directory)
    if os.path.isfile(save_directory):
        raise ValueError(f"save_pretrained needs a folder, but {save_directory} is a file.")
    if not is_main_process:
        return save_directory
    save_model = getattr(dm.model, "save_pretrained", None)
    if not callable(save_model):
        raise TypeError(
            f"DendriticModel.save_pretrained needs a transformers PreTrainedModel, got {type(dm.model).__name__}; for a "
            "plain torch module save `dm.state_dict()` with safetensors.torch.save_file."
        )
    from .hub import _hub_model_id, write_model_card

    os.makedirs(save_directory, exist_ok=True)
    _remove_stale_files(save_directory)
    base_state, dendrite_state = _split_state_dict(dm, state_dict)
    summary = dm.dendrite_summary()

    # 1. The base model under its standard names, as transformers writes it (tied weights, sharding, config).
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    save_model(save_directory, state_dict=base_state, **kwargs)
    base_files = _written_base_files(save_directory)
    _fix_index_total(save_directory, summary.base_params)

    # 2. The dendrites, written to a temporary name and renamed, so a partial file never has the final name.
    dendrite_path = os.path.join(save_directory, DENDRITE_WEIGHTS_NAME)
    tensors = {name: _cpu_contiguous(t, name) for name, t in dendrite_state.items()}
    metadata = {
        "format": "pt",
        "hf_dendrites_version": library_version(),
        "format_version": str(CHECKPOINT_FORMAT_VERSION),
    }
    tmp_path = dendrite_path + ".tmp"
    save_file(tensors, tmp_path, metadata=metadata)
    os.replace(tmp_path, dendrite_path)

    # 3. Model card (and training curve), tokenizer / processor.
    training_summary = _jsonable(dm.training_summary) if getattr(dm, "training_summary", None) else None
    write_model_card(dm, save_directory, repo_id=repo_id, tags=tags)
    if training_summary is not None:
        from .hub import TRAINING_CURVE_NAME

        has_curve = os.path.isfile(os.path.join(save_directory, TRAINING_CURVE_NAME)) and training_summary.get(
            "curve_png"
        )
        training_summary["curve_png"] = TRAINING_CURVE_NAME if has_curve else None
    if processing_class is not None:
        processing_class.save_pretrained(save_directory)

    # 4. The marker, last and atomically: only now does the folder load.
    files = {name: {"size": os.path.getsize(os.path.join(save_directory, name))} for name in base_files}
    files[DENDRITE_WEIGHTS_NAME] = {"size": os.path.getsize(dendrite_path), "sha256": _sha256(dendrite_path)}
    config = getattr(dm.model, "config", None)
    payload = {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "library_version": library_version(),
        "dendrite_config": dm.dendrite_config.to_dict(),
        "layers": dm.dendrite_counts(),
        "growth_count": int(dm.growth_count),
        "base_model": {
            "architecture": type(dm.model).__name__,
            "model_type": getattr(config, "model_type", None),
            # A Hub id only: a local path means nothing elsewhere (and would leak into pushed files).
            "name_or_path": _hub_model_id(getattr(config, "_name_or_path", None)),
        },
        "files": files,
    }
    if training_summary is not None:
        payload["training_summary"] = training_summary
    atomic_write_text(
        os.path.join(save_directory, DENDRITE_CONFIG_NAME), json.dumps(payload, indent=2, sort_keys=True) + "\n"
    )
    logger.info(
        "Saved dendritic model (%d dendrites in %d layers) to %s",
        summary.num_dendrites,
        len(summary.layers),
        save_directory,
    )
    return save_directory


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
    strange = sorted(n for n in files if not (_BASE_WEIGHT_FILE_RE.fullmatch(n) or n == DENDRITE_WEIGHTS_NAME))
    if strange:
        raise CheckpointError(
            f"{path} lists unexpected files {strange[:3]} (only safetensors weight files belong there); the file is damaged."
        )
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


def _dendrite_file_tensors(
    directory: str, payload: dict[str, Any], expected: dict[str, dict[str, tuple[int, ...]]]
) -> dict[str, torch.Tensor]:
    """Read `dendrite_model.safetensors` after checking its checksum and that it holds exactly the tensors (with
    the shapes) that the layers' recorded counts need. `expected`: {layer: {param name: shape}}."""
    path = os.path.join(directory, DENDRITE_WEIGHTS_NAME)
    recorded = payload["files"][DENDRITE_WEIGHTS_NAME].get("sha256")
    if recorded is not None and _sha256(path) != recorded:
        raise CheckpointError(
            f"{path} is corrupt: its SHA-256 differs from the one recorded in {DENDRITE_CONFIG_NAME}. Save or download "
            "the checkpoint again."
        )
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


def _check_layers(dm: "DendriticModel", payload: dict[str, Any], directory: str) -> None:
    have = {name for name, _ in dm.dendritic_layers()}
    want = set(payload["layers"])
    if have != want:
        missing, extra = sorted(want - have), sorted(have - want)
        path = os.path.join(directory, DENDRITE_CONFIG_NAME)
        detail = []
        if missing:
            detail.append(f"the checkpoint has dendritic layer(s) the model lacks, e.g. {missing[:3]}")
        if extra:
            detail.append(f"the model has dendritic layer(s) the checkpoint lacks, e.g. {extra[:3]}")
        raise CheckpointError(
            f"{path}: the dendritic layers do not match the model ({'; '.join(detail)}). The base model "
            f"({type(dm.model).__name__}) does not match the one the checkpoint was saved from "
            f"({payload['base_model'].get('architecture')})."
        )


def _load_dendrites(dm: "DendriticModel", directory: str, payload: dict[str, Any]) -> None:
    """Resize the layers to the recorded counts and copy the saved dendrite tensors in (strict)."""
    _check_layers(dm, payload, directory)
    layers = dict(dm.dendritic_layers())
    counts = payload["layers"]
    expected = {name: layers[name].expected_dendrite_shapes(k) for name, k in counts.items()}
    tensors = _dendrite_file_tensors(directory, payload, expected)
    dm.set_dendrite_counts(counts)
    with torch.no_grad():
        for name, tensor in tensors.items():
            layer_name, _, pname = name.rpartition(".")
            param = getattr(layers[layer_name], pname)
            if param.device.type == "meta":
                raise CheckpointError(
                    f"Cannot load {name} into layer {layer_name!r}: the layer is offloaded (meta device). Load with a "
                    "device_map that keeps every dendritic layer on a device (no 'disk' offload)."
                )
            param.copy_(tensor)
    dm.growth_count = int(payload.get("growth_count", 0))
    summary = payload.get("training_summary")
    if isinstance(summary, dict):
        summary = dict(summary)
        curve = summary.get("curve_png")
        summary["curve_png"] = (
            os.path.join(directory, curve) if curve and os.path.isfile(os.path.join(directory, curve)) else None
        )
    dm.training_summary = summary


# ---------------------------------------------------------------------------------------------- in-place load
def _tied_aliases(model: torch.nn.Module) -> dict[str, set[str]]:
    """For every state name, the other names of the same tensor (tied weights)."""
    by_id: dict[int, list[str]] = {}
    for name, tensor in list(model.named_parameters(remove_duplicate=False)) + list(
        model.named_buffers(remove_duplicate=False)
    ):
        by_id.setdefault(id(tensor), []).append(name)
    return {name: set(names) - {name} for names in by_id.values() for name in names}


def _read_base_tensors(directory: str, payload: dict[str, Any]) -> dict[str, tuple[str, torch.Tensor]]:
    """{state name: (file, tensor)} for the base weight files listed in the manifest."""
    names = [n for n in payload["files"] if n != DENDRITE_WEIGHTS_NAME and not n.endswith(".json")]
    out: dict[str, tuple[str, torch.Tensor]] = {}
    for name in sorted(names):
        path = os.path.join(directory, name)
        try:
            with safe_open(path, framework="pt", device="cpu") as handle:
                for key in handle.keys():
                    out[key] = (path, handle.get_tensor(key))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(
                f"{path} is not a readable safetensors file ({err}); save the checkpoint again."
            ) from err
    return out


def load_dendritic_state(dm: "DendriticModel", directory: Union[str, os.PathLike]) -> None:
    """Load a checkpoint folder into an existing `DendriticModel`, in place and strictly.

    Resizes every dendritic layer to the count recorded in the folder's `dendrite_config.json` (truncating or
    growing; a layer whose count already matches keeps its Parameter objects), then copies the base weights and the
    dendrite weights in and restores `growth_count` and `training_summary`. Used by `DendriticTrainer` to resume
    from a checkpoint and for `load_best_model_at_end`: rebuild the optimizer afterwards when counts changed.

    The model must have the same dendritic layers (same base architecture and `target_modules`) and the same
    dendrite kind (activation, rank, cascade) as the checkpoint. Any missing, unexpected or mis-shaped tensor,
    a truncated / corrupt file or an incomplete folder raises `CheckpointError` naming the file and the layer;
    the model is only modified once every check has passed.
    """
    directory = os.fspath(directory)
    payload = read_checkpoint_metadata(directory)
    path = os.path.join(directory, DENDRITE_CONFIG_NAME)
    saved = DendriteConfig.from_dict(payload["dendrite_config"])
    current = dm.dendrite_config
    for field_name in ("activation", "rank", "cascade"):
        if getattr(saved, field_name) != getattr(current, field_name):
            raise CheckpointError(
                f"{path} was saved with {field_name}={getattr(saved, field_name)!r}, but the model has "
                f"{field_name}={getattr(current, field_name)!r}; build the model with the checkpoint's DendriteConfig "
                "(`DendriteConfig.from_pretrained(folder)`) or load it with `DendriticModel.from_pretrained`."
            )
    _check_layers(dm, payload, directory)

    # Check the base tensors against the model before touching it.
    base = _read_base_tensors(directory, payload)
    state = dm.model.state_dict()
    layers = dict(dm.dendritic_layers())
    dendrite_keys = set(dm.dendrite_state_dict()) | {
        f"{layer}.{p}" for layer, k in payload["layers"].items() for p in layers[layer].expected_dendrite_shapes(k)
    }
    base_keys = {k for k in state if k not in dendrite_keys}
    unexpected = sorted(set(base) - base_keys)
    if unexpected:
        file = base[unexpected[0]][0]
        raise CheckpointError(
            f"{file} holds {len(unexpected)} tensor(s) the model does not have, e.g. {unexpected[:3]}: the base "
            f"checkpoint does not match {type(dm.model).__name__}."
        )
    aliases = _tied_aliases(dm.model)
    ignore = [re.compile(p) for p in (getattr(dm.model, "_keys_to_ignore_on_save", None) or [])]
    missing = sorted(
        k
        for k in base_keys - set(base)
        if not (aliases.get(k, set()) & set(base)) and not any(p.search(k) for p in ignore)
    )
    if missing:
        raise CheckpointError(
            f"The base weights in {directory} lack {len(missing)} tensor(s) of {type(dm.model).__name__}, e.g. "
            f"{missing[:3]}: the base checkpoint does not match the model."
        )
    for key, (file, tensor) in sorted(base.items()):
        if tuple(tensor.shape) != tuple(state[key].shape):
            raise CheckpointError(
                f"{file}: {key} has shape {tuple(tensor.shape)}, but the model's has {tuple(state[key].shape)}: the base "
                "checkpoint does not match the model."
            )
        if state[key].device.type == "meta":
            raise CheckpointError(
                f"Cannot load {key} from {file} in place: the model keeps it offloaded (meta device)."
            )

    _load_dendrites(dm, directory, payload)
    with torch.no_grad():
        state = dm.model.state_dict(keep_vars=True)
        for key, (_, tensor) in base.items():
            state[key].copy_(tensor)
    logger.info("Loaded dendritic checkpoint %s (%d dendrites)", directory, sum(payload["layers"].values()))


# ---------------------------------------------------------------------------------------------- from_pretrained
def _resolve_checkpoint_dir(
    path_or_repo_id: Union[str, os.PathLike],
    *,
    revision: Optional[str],
    token: Optional[Union[str, bool]],
    cache_dir: Optional[str],
    force_download: bool,
    local_files_only: bool,
) -> str:
    """A local folder as it is, or a Hub repo downloaded into the cache: first the JSON configs, then exactly the
    weight files that `dendrite_config.json` lists, from the same commit. Nothing else (no pickle) is fetched."""
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
    weights = sorted(name for name in payload["files"] if name.endswith((".safetensors", ".safetensors.index.json")))
    return snapshot_download(path, revision=commit, allow_patterns=weights, **kwargs)


def load_dendritic_model(
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
    **model_kwargs: Any,
) -> "DendriticModel":
    """Rebuild a `DendriticModel` from a checkpoint folder or a Hub repo (this is `DendriticModel.from_pretrained`).

    The base model is loaded by transformers (`model_class`, default: the class named in `config.architectures`)
    from the safetensors files only, converted with the saved `DendriteConfig`, each layer is grown to its saved
    count and the dendrites are loaded: no training is replayed, and the outputs are bit-identical to those of the
    saved model. `dtype`, `device_map` and other keyword arguments (e.g. `attn_implementation`) go to the
    transformers `from_pretrained`; dendrites follow the dtype and device of their layer.

    From the Hub only JSON configs and safetensors files are downloaded (`revision`, `token`, `cache_dir`,
    `force_download` and `local_files_only` as in `huggingface_hub.snapshot_download`).
    """
    from .model import get_dendritic_model

    if model_kwargs.get("use_safetensors") is False:
        raise ValueError("hf_dendrites loads safetensors only; do not pass use_safetensors=False.")
    model_kwargs.pop("use_safetensors", None)
    directory = _resolve_checkpoint_dir(
        pretrained_model_name_or_path,
        revision=revision,
        token=token,
        cache_dir=cache_dir,
        force_download=force_download,
        local_files_only=local_files_only,
    )
    payload = read_checkpoint_metadata(directory)
    config_path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{config_path} is missing: the base model's config is needed to rebuild the model.")
    if os.path.isfile(os.path.join(directory, ADAPTER_CONFIG_NAME)):
        raise CheckpointError(
            f"{directory} contains {ADAPTER_CONFIG_NAME} (a PEFT adapter), which hf_dendrites checkpoints never hold; "
            "refusing to load it (adapter files may be pickles)."
        )
    base_config = read_json_file(config_path, CheckpointError, "the checkpoint is damaged")
    saved_arch = payload["base_model"].get("architecture")
    architectures = base_config.get("architectures") or []
    if model_class is None:
        if architectures and saved_arch and architectures[0] != saved_arch:
            raise CheckpointError(
                f"{config_path} describes a {architectures[0]}, but {DENDRITE_CONFIG_NAME} was saved from a "
                f"{saved_arch}: the base checkpoint does not match the dendrites."
            )
        arch = saved_arch or (architectures[0] if architectures else None)
        import transformers

        model_class = getattr(transformers, arch, None) if arch else None
        if model_class is None:
            raise ValueError(
                f"Cannot tell which transformers class to build for {directory} (architecture {arch!r}); pass "
                "`model_class=` (e.g. transformers.AutoModelForSequenceClassification or your own class)."
            )
    if dtype is not None:
        model_kwargs["dtype"] = dtype
    if device_map is not None:
        model_kwargs["device_map"] = device_map
    model, info = model_class.from_pretrained(directory, use_safetensors=True, output_loading_info=True, **model_kwargs)
    problems = {
        key: info.get(key)
        for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")
        if info.get(key)
    }
    if problems:
        files = ", ".join(n for n in sorted(payload["files"]) if n != DENDRITE_WEIGHTS_NAME)
        detail = "; ".join(f"{key}: {sorted(map(str, value))[:5]}" for key, value in problems.items())
        raise CheckpointError(
            f"The base weights ({files} in {directory}) do not match {type(model).__name__}: {detail}. The base "
            "checkpoint does not belong to these dendrites, or `model_class` is wrong."
        )
    if getattr(model, "config", None) is not None:
        # What the user asked for (repo id or folder), as transformers records it, not the cache folder.
        model.config._name_or_path = os.fspath(pretrained_model_name_or_path)
    dm = get_dendritic_model(model, DendriteConfig.from_dict(payload["dendrite_config"]))
    _load_dendrites(dm, directory, payload)
    dm.train(model.training)
    return dm
