"""Small helpers shared by config, model and saving code."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from .constants import CHECKPOINT_FORMAT_VERSION


def library_version() -> str:
    from . import __version__

    return __version__


def atomic_write_text(path: str, text: str) -> None:
    """Write `text` to `path` so that readers see either the old file or the complete new one."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
    if not isinstance(version, int) or version > CHECKPOINT_FORMAT_VERSION:
        raise ValueError(
            f"{path} uses checkpoint format {version!r} (written by hf_dendrites {payload.get('library_version')}), "
            f"but this hf_dendrites {library_version()} reads format <= {CHECKPOINT_FORMAT_VERSION}; "
            "upgrade with `pip install -U hf_dendrites`."
        )
    return payload
