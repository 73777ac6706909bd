"""Small helpers shared by the whole library: the version, atomic writes, JSON files."""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any

from .constants import ADAPTER_ONLY_FORMAT_VERSION


def library_version() -> str:
    from . import __version__

    return __version__


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file or the complete new one.

    The data goes to a temporary file in the same folder, which is flushed to disk and renamed over `path`; an
    interrupted write leaves no partial file under the final name. The library's one atomic writer: JSON state,
    model cards' companions and checkpoint markers all go through it (or `atomic_write_text`).
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates the file readable by its owner only; give it the mode a plain open() would have had.
        os.chmod(tmp, os.stat(path).st_mode & 0o777 if os.path.exists(path) else 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def to_jsonable(value: Any) -> Any:
    """`value` with tensors, numpy scalars and tuples turned into plain JSON values (non-finite floats: None).

    Used for the training summary that `DendriticTrainer` attaches to a model, which goes into
    `dendrite_config.json` and the model card.
    """
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    item = getattr(value, "item", None)
    if callable(item):  # a one-element tensor or a numpy scalar
        try:
            return to_jsonable(item())
        except (ValueError, RuntimeError):  # more than one element
            pass
    return str(value)


def read_json_file(path: str, error: type[Exception] = ValueError, hint: str = "the file is truncated or corrupt") -> Any:
    """Parse a JSON file; invalid JSON raises `error` naming the file and `hint`."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{path} is not valid JSON ({err}); {hint}.") from err


def read_dendrite_config_file(path: str) -> dict[str, Any]:
    """Read and check a `dendrite_config.json` (format version, JSON validity); errors name the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: this folder is not an hf_dendrites checkpoint (save one with "
            "`DendriticModel.save_pretrained` or `DendriteConfig.save_pretrained`)."
        )
    payload = read_json_file(path, hint="the file is truncated or corrupt, save the model again")
    if not isinstance(payload, dict) or "dendrite_config" not in payload:
        raise ValueError(f"{path} has no 'dendrite_config' entry; it was not written by hf_dendrites.")
    version = payload.get("format_version")
    if not isinstance(version, int) or version > ADAPTER_ONLY_FORMAT_VERSION:
        raise ValueError(
            f"{path} uses checkpoint format {version!r} (written by hf_dendrites {payload.get('library_version')}), "
            f"but this hf_dendrites {library_version()} reads format <= {ADAPTER_ONLY_FORMAT_VERSION}; "
            "upgrade with `pip install -U hf_dendrites`."
        )
    return payload
