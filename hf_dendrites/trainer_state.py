"""The dendrite schedule's files inside a Trainer checkpoint: written by `DendriticTrainer` at every checkpoint,
read back by `resume_from_checkpoint`.

A checkpoint folder holds, next to the model files and the Trainer's own files:

- `dendrite_schedule.json`: the schedule state (`DendriteSchedule.to_dict()`), the evaluation history, the
  growth count, a description of the best-weight snapshots and, during a candidate phase (correlation rule), the
  candidates' plateau tracker;
- the best-weight snapshots the schedule may restore (the best model of the current cycle, the last accepted one;
  during an LR search also the post-growth weights and the best candidate's best weights).
  They are stored once per change, not copied into every checkpoint:

  * when the checkpoint's own model IS a snapshot (the usual case: a new best at an evaluation that is also a save
    step), the snapshot is a reference to the checkpoint's model files (`{"kind": "model", "path": "."}`);
  * otherwise, when an earlier checkpoint already holds the snapshot, its files are hard-linked into
    `dendrite_snapshots/<name>/` (a copy where the file system refuses links), so rotation with
    `save_total_limit` never loses them and they cost no disk space twice;
  * otherwise the snapshot is written once, as `dendrite_snapshots/<name>.safetensors`; in an adapter-only
    checkpoint (a run whose base is frozen) without the frozen tensors that the checkpoint's model files fingerprint,
    which are taken from the model when the snapshot is read back.
- `dendrite_candidates.safetensors`, during a candidate phase: the candidates (their Adam state is the checkpoint's
  optimizer state).

A checkpoint written at a growth (or retry, or phase switch) holds the freshly rebuilt optimizer, which has no
state yet: its `optimizer.pt` is legitimately almost empty, and resuming from it is exact (the uninterrupted run
continues with exactly that empty state).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from typing import Any

import torch

from .constants import (
    DENDRITE_CONFIG_NAME,
    DENDRITE_SCHEDULE_NAME,
    DENDRITE_SCHEDULE_WEIGHTS_NAME,
)
from .utils import atomic_write_text, library_version, read_json_file

logger = logging.getLogger(__name__)

DENDRITE_CANDIDATES_NAME = "dendrite_candidates.safetensors"
SNAPSHOT_DIR = "dendrite_snapshots"
# the best model of the current cycle, the last accepted one, and for an LR search the post-growth weights and the
# best candidate's best weights
SNAPSHOT_NAMES = ("cycle_best", "accepted", "lr_start", "lr_best")
# 1: both snapshots in one `dendrite_schedule_weights.safetensors` in every checkpoint (still read).
# 2: snapshots stored once per change (see the module docstring).
STATE_FORMAT_VERSION = 2


@dataclass(eq=False)
class Snapshot:
    """A CPU copy of the model (dendrite counts + state dict) and the evaluation it scored.

    `location` remembers where the weights already lie on disk (kind "model": a folder of model files; kind
    "tensors": a safetensors file), so the next checkpoint can link them instead of writing them again.
    """

    counts: dict[str, int]
    state: dict[str, torch.Tensor]
    step: int
    metrics: dict[str, float]
    location: tuple[str, str] | None = field(default=None, repr=False)

    @classmethod
    def of(cls, dm, step: int, metrics: dict[str, float]) -> Snapshot:
        """Copy the current weights of `dm` (a `DendriticModel`) to CPU memory (under FSDP2 gathered from the shards,
        by every process)."""
        from .fsdp import cpu_copy

        state = {k: cpu_copy(v) for k, v in dm.state_dict().items()}
        return cls(dm.dendrite_counts(), state, int(step), dict(metrics))

    def matches(self, dm) -> bool:
        """Whether `dm` holds exactly these weights (same dendrite counts, bitwise equal tensors)."""
        if dm.dendrite_counts() != self.counts:
            return False
        current = dm.state_dict()
        if current.keys() != self.state.keys():
            return False
        return all(torch.equal(current[k].detach().cpu(), v) for k, v in self.state.items())


# ---------------------------------------------------------------------------------------------- writing
def _model_files(folder: str) -> list[str]:
    """The files that make `folder` a loadable dendritic model: the marker, its manifest and `config.json`."""
    meta = read_json_file(os.path.join(folder, DENDRITE_CONFIG_NAME))
    names = [DENDRITE_CONFIG_NAME, *meta.get("files", {})]
    if os.path.isfile(os.path.join(folder, "config.json")):
        names.append("config.json")
    return names


def _link_or_copy(source: str, target: str) -> None:
    """Hard-link a weight file (a copy where the file system refuses links); copy small JSON files.

    Only files that are never rewritten in place are linked: a save removes old weight files before writing new
    ones, whereas `config.json` may be rewritten in place, which would change every link to it.
    """
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if os.path.lexists(target):
        os.remove(target)
    if not target.endswith(".safetensors"):
        shutil.copy2(source, target)
        return
    try:
        os.link(source, target)
    except OSError:  # no hard links on this file system (or across devices): pay for a copy
        shutil.copy2(source, target)


def frozen_state_keys(directory: str, dm) -> set[str]:
    """The names in `dm.state_dict()` of the tensors that checkpoint `directory`'s adapter-only model files fingerprint
    instead of storing (the fingerprint uses checkpoint names: a PEFT model's plain names); empty for a full one."""
    from .saving import frozen_state_names

    names = frozen_state_names(directory)
    if not names:
        return set()
    return {f"model.{key}" for key, name in dm.checkpoint_names().items() if name in names}


def _store_snapshot(snapshot: Snapshot, name: str, directory: str, dm, frozen: set[str]) -> dict[str, str]:
    """Put `snapshot` into checkpoint `directory` at the lowest cost (without the `frozen` entries, which the
    checkpoint's adapter-only model files fingerprint); return how it is stored."""
    if snapshot.matches(dm):
        snapshot.location = ("model", directory)
        return {"kind": "model", "path": "."}
    kind, source = snapshot.location or (None, None)
    if kind == "model" and os.path.isfile(os.path.join(source, DENDRITE_CONFIG_NAME)):
        relative = os.path.join(SNAPSHOT_DIR, name)
        target = os.path.join(directory, relative)
        for file in _model_files(source):
            _link_or_copy(os.path.join(source, file), os.path.join(target, file))
        snapshot.location = ("model", target)
        return {"kind": "model", "path": relative}
    relative = os.path.join(SNAPSHOT_DIR, f"{name}.safetensors")
    target = os.path.join(directory, relative)
    if kind == "tensors" and os.path.isfile(source):
        _link_or_copy(source, target)
    else:
        from safetensors.torch import save_file

        os.makedirs(os.path.dirname(target), exist_ok=True)
        tensors = {k: v.contiguous() for k, v in snapshot.state.items() if k not in frozen}
        save_file(tensors, target + ".tmp", metadata={"format": "pt"})
        os.replace(target + ".tmp", target)
    snapshot.location = ("tensors", target)
    return {"kind": "tensors", "path": relative}


def write_schedule_state(
    directory: str,
    dm,
    *,
    schedule: dict[str, Any],
    history: list[dict[str, Any]],
    snapshots: dict[str, Snapshot | None],
    candidates: dict[str, torch.Tensor] | None = None,
    correlation: dict[str, Any] | None = None,
    weights: dict[str, Any] | None = None,
) -> None:
    """Write the schedule state into checkpoint `directory`, after the model files were saved there.

    `snapshots` maps the `SNAPSHOT_NAMES` to a `Snapshot` (the same object under several names when they coincide,
    stored once) or None. `candidates` / `correlation`: a running candidate phase's tensors and JSON state.
    `weights`: which evaluation the checkpoint's model weights are (`DendriteScheduleCallback.weights`), or None.
    """
    info: dict[str, Any] = {}
    stored: dict[int, str] = {}
    frozen = frozen_state_keys(directory, dm)
    for name in SNAPSHOT_NAMES:
        snap = snapshots.get(name)
        if snap is None:
            info[name] = None
        elif id(snap) in stored:
            info[name] = {"same_as": stored[id(snap)]}
        else:
            stored[id(snap)] = name
            info[name] = {"counts": snap.counts, "step": snap.step, "metrics": snap.metrics,
                          "stored": _store_snapshot(snap, name, directory, dm, frozen)}
    if candidates is not None:
        from safetensors.torch import save_file

        tmp = os.path.join(directory, DENDRITE_CANDIDATES_NAME + ".tmp")
        save_file(candidates, tmp, metadata={"format": "pt"})
        os.replace(tmp, os.path.join(directory, DENDRITE_CANDIDATES_NAME))
    payload = {
        "format_version": STATE_FORMAT_VERSION,
        "library_version": library_version(),
        "schedule": schedule,
        "history": history,
        "growth_count": int(dm.growth_count),
        "snapshots": info,
        "correlation": correlation,
        "weights": weights,
    }
    atomic_write_text(os.path.join(directory, DENDRITE_SCHEDULE_NAME), json.dumps(payload, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------- reading
def read_schedule_payload(directory: str) -> dict[str, Any] | None:
    """The parsed `dendrite_schedule.json` of a checkpoint, or None when the folder has none."""
    path = os.path.join(directory, DENDRITE_SCHEDULE_NAME)
    if not os.path.isfile(path):
        return None
    payload = read_json_file(path, hint="the checkpoint is damaged, resume from another one")
    version = payload.get("format_version")
    if not isinstance(version, int) or version > STATE_FORMAT_VERSION:
        raise ValueError(f"{path} has format {version!r}, newer than this hf_dendrites reads; upgrade hf_dendrites.")
    return payload


def read_snapshots(directory: str, payload: dict[str, Any], dm) -> dict[str, Snapshot | None]:
    """Load the snapshots that `payload` (from `read_schedule_payload`) describes.

    Snapshots stored as model files are loaded through `dm` (its layout and weights change): load the checkpoint's
    own model into `dm` afterwards.
    """
    from safetensors.torch import load_file

    from .saving import load_dendritic_state

    path = os.path.join(directory, DENDRITE_SCHEDULE_NAME)
    frozen_names = frozen_state_keys(directory, dm)
    frozen: dict[str, torch.Tensor] | None = None  # CPU copies of the model's frozen tensors, shared by the snapshots
    legacy: dict[str, torch.Tensor] | None = None
    snaps: dict[str, Snapshot | None] = {}
    for name in SNAPSHOT_NAMES:
        info = payload.get("snapshots", {}).get(name)
        if info is None:
            snaps[name] = None
            continue
        if "same_as" in info:
            snaps[name] = snaps[info["same_as"]]
            continue
        stored = info.get("stored")
        if stored is None:  # format 1: one file with both snapshots, keys prefixed by the snapshot's name
            weights_path = os.path.join(directory, DENDRITE_SCHEDULE_WEIGHTS_NAME)
            if legacy is None:
                legacy = load_file(weights_path, device="cpu") if os.path.isfile(weights_path) else {}
            prefix = f"{name}/"
            state = {k[len(prefix):]: v for k, v in legacy.items() if k.startswith(prefix)}
            location = None
        else:
            source = os.path.normpath(os.path.join(directory, stored["path"]))
            if stored["kind"] == "model":
                load_dendritic_state(dm, source)
                state = {k: v.detach().to("cpu", copy=True) for k, v in dm.state_dict().items()}
            else:
                state = load_file(source, device="cpu") if os.path.isfile(source) else {}
                if state and frozen_names - set(state):  # stored without the frozen base (adapter-only checkpoint)
                    if frozen is None:
                        current = dm.state_dict()
                        frozen = {k: current[k].detach().to("cpu", copy=True) for k in frozen_names if k in current}
                    state.update({k: v for k, v in frozen.items() if k not in state})
            location = (stored["kind"], source)
        if not state:
            raise ValueError(f"The {name!r} weights that {path} refers to are missing; the checkpoint is incomplete.")
        snaps[name] = Snapshot(dict(info["counts"]), state, int(info["step"]), dict(info.get("metrics", {})), location)
    return snaps


def read_candidates(directory: str) -> dict[str, torch.Tensor]:
    """The candidate tensors of a checkpoint written during a candidate phase."""
    from safetensors.torch import load_file

    path = os.path.join(directory, DENDRITE_CANDIDATES_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"{path} is missing: the checkpoint was written during a candidate phase and is incomplete.")
    return load_file(path, device="cpu")
