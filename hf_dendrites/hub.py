"""Model cards and Hub uploads for dendritic models.

The model card is rendered from the Jinja template `model_cards/dendritic_model_card.md` (repository root) with
huggingface_hub's `ModelCard.from_template`. The package reaches the template as `hf_dendrites/model_cards/`, a
link to that folder, so a wheel ships the same single file (`[tool.setuptools.package-data]` in pyproject.toml).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from importlib import resources
from typing import TYPE_CHECKING, Any, Optional, Union

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .constants import DENDRITE_CONFIG_NAME, DENDRITE_WEIGHTS_NAME
from .utils import library_version

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo

    from .model import DendriticModel

logger = logging.getLogger(__name__)

MODEL_CARD_NAME = "README.md"
MODEL_CARD_TEMPLATE = "dendritic_model_card.md"
TRAINING_CURVE_NAME = "training_curve.png"
LIBRARY_NAME = "hf_dendrites"
DEFAULT_TAGS = ("hf_dendrites", "dendrites", "artificial-dendrites")

# Hub pipeline tag of a transformers class, by class-name suffix (first match wins).
_PIPELINE_TAGS = (
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForMultipleChoice", "multiple-choice"),
    ("ForMaskedLM", "fill-mask"),
    ("ForCausalLM", "text-generation"),
    ("LMHeadModel", "text-generation"),
    ("ForConditionalGeneration", "text2text-generation"),
    ("ForImageClassification", "image-classification"),
    ("ForAudioClassification", "audio-classification"),
    ("Model", "feature-extraction"),
)


def model_card_template_path() -> str:
    """Path of the model card template (inside the installed package, or in a source checkout's model_cards/)."""
    packaged = resources.files("hf_dendrites") / "model_cards" / MODEL_CARD_TEMPLATE
    if packaged.is_file():
        return str(packaged)
    checkout = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "model_cards", MODEL_CARD_TEMPLATE
    )
    if os.path.isfile(checkout):
        return checkout
    raise FileNotFoundError(
        f"Model card template {MODEL_CARD_TEMPLATE} not found in the hf_dendrites package or next to it; reinstall "
        "hf_dendrites (`pip install --force-reinstall hf_dendrites`)."
    )


def _pipeline_tag(architecture: str) -> Optional[str]:
    for suffix, tag in _PIPELINE_TAGS:
        if architecture.endswith(suffix):
            return tag
    return None


def _hub_model_id(name_or_path: Optional[str]) -> Optional[str]:
    """`name_or_path` when it looks like a Hub repo id (not a local folder), else None."""
    if not name_or_path or os.path.exists(name_or_path) or os.path.isabs(name_or_path) or name_or_path.startswith("."):
        return None
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name_or_path)
    except ValueError:
        return None
    return name_or_path


def _eval_results(training: dict[str, Any], task: str) -> tuple[list[tuple[str, Any]], list[EvalResult]]:
    rows, results = [], []
    for name, value in (training.get("eval_results") or {}).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        metric = name[len("eval_") :] if name.startswith("eval_") else name
        rows.append((metric, f"{value:.4f}" if isinstance(value, float) else value))
        results.append(
            EvalResult(
                task_type=task,
                dataset_type=str(training.get("dataset_id") or training.get("dataset_name") or "custom"),
                dataset_name=str(training.get("dataset_name") or "evaluation set"),
                metric_type=metric,
                metric_value=value,
            )
        )
    return rows, results


def build_model_card(
    dm: "DendriticModel",
    *,
    repo_id: Optional[str] = None,
    tags: Optional[list[str]] = None,
    curve_file: Optional[str] = None,
) -> ModelCard:
    """Render the model card of `dm` (a `huggingface_hub.ModelCard`).

    The card's metadata holds `library_name: hf_dendrites`, the base model (when it is a Hub repo id), tags, the
    pipeline tag and, when `dm.training_summary` has `eval_results`, a model-index. The text shows the dendrite
    config, the parameter counts (total and per layer), the per-cycle table and the training curve of a
    `DendriticTrainer` run (`curve_file`: the curve's file name next to the card), and how to load the model.
    """
    import torch
    import transformers

    config = getattr(dm.model, "config", None)
    architecture = type(dm.model).__name__
    model_type = getattr(config, "model_type", None) or "unknown"
    name_or_path = getattr(config, "_name_or_path", None) or None
    base_id = _hub_model_id(name_or_path)
    task = _pipeline_tag(architecture)
    model_name = (repo_id or "").split("/")[-1] or f"dendritic-{model_type}"

    summary = dm.dendrite_summary()
    summary_view = summary.to_dict()
    summary_view["dendrite_pct"] = 100.0 * summary.dendrite_params / max(summary.base_params, 1)

    training = dict(dm.training_summary) if isinstance(getattr(dm, "training_summary", None), dict) else None
    eval_rows: list[tuple[str, Any]] = []
    eval_results: list[EvalResult] = []
    if training is not None:
        training.setdefault("metric", "eval_loss")
        training.setdefault("greater_is_better", False)
        training["cycles"] = list(training.get("cycles") or [])
        training["curve"] = curve_file
        eval_rows, eval_results = _eval_results(training, task or "other")

    card_data = ModelCardData(
        base_model=base_id,
        library_name=LIBRARY_NAME,
        pipeline_tag=task,
        tags=[*DEFAULT_TAGS, model_type, *(tags or [])],
        model_name=model_name if eval_results else None,
        eval_results=eval_results or None,
        metrics=sorted({r.metric_type for r in eval_results}) or None,
    )
    if base_id:
        base_description = f"[`{base_id}`](https://huggingface.co/{base_id})"
    else:
        base_description = f"a `{architecture}`"
    return ModelCard.from_template(
        card_data,
        template_path=model_card_template_path(),
        title=repo_id or f"Dendritic {architecture}",
        base_description=base_description,
        architecture=architecture,
        model_type=model_type,
        dendrite_config=[(k, v) for k, v in dm.dendrite_config.to_dict().items()],
        summary=summary_view,
        training=training,
        eval_results=eval_rows,
        load_id=repo_id or "path/to/this/folder",
        versions={
            "hf_dendrites": library_version(),
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
    )


def write_model_card(
    dm: "DendriticModel",
    directory: Union[str, os.PathLike],
    *,
    repo_id: Optional[str] = None,
    tags: Optional[list[str]] = None,
) -> str:
    """Write `README.md` (and `training_curve.png`, copied from `dm.training_summary["curve_png"]`) into
    `directory`; returns the card's path. `DendriticModel.save_pretrained` calls it."""
    directory = os.fspath(directory)
    curve_file = None
    training = getattr(dm, "training_summary", None)
    curve = training.get("curve_png") if isinstance(training, dict) else None
    if curve:
        target = os.path.join(directory, TRAINING_CURVE_NAME)
        if not os.path.isfile(curve):
            logger.warning("Training curve %s not found; the model card will not show it.", curve)
        else:
            if os.path.abspath(curve) != os.path.abspath(target):
                shutil.copyfile(curve, target)
            curve_file = TRAINING_CURVE_NAME
    card = build_model_card(dm, repo_id=repo_id, tags=tags, curve_file=curve_file)
    path = os.path.join(directory, MODEL_CARD_NAME)
    card.save(path)
    return path


# Files a push replaces: remote copies not part of the new upload are deleted in the same commit, so a repo never
# mixes the shards of two saves.
def _managed(path: str) -> bool:
    from .saving import _BASE_WEIGHT_FILE_RE

    return bool(_BASE_WEIGHT_FILE_RE.fullmatch(path)) or path in (
        DENDRITE_WEIGHTS_NAME,
        DENDRITE_CONFIG_NAME,
        TRAINING_CURVE_NAME,
    )


def upload_checkpoint_folder(
    folder: Union[str, os.PathLike],
    repo_id: str,
    *,
    token: Optional[Union[str, bool]] = None,
    commit_message: Optional[str] = None,
    commit_description: Optional[str] = None,
    revision: Optional[str] = None,
    create_pr: bool = False,
    paths: Optional[list[str]] = None,
) -> "CommitInfo":
    """Upload a saved checkpoint folder (or only `paths` in it) to an existing Hub repo in one commit. The files are
    sent as they are on disk, so the folder's README.md is the card that lands."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    folder = os.fspath(folder)
    api = HfApi(token=token)
    if revision is not None and not create_pr:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    if paths is None:
        paths = [
            os.path.relpath(os.path.join(root, name), folder) for root, _, names in os.walk(folder) for name in names
        ]
    local = sorted(p.replace(os.sep, "/") for p in paths)
    operations: list = [
        CommitOperationAdd(path_in_repo=rel, path_or_fileobj=os.path.join(folder, rel)) for rel in local
    ]
    remote = api.list_repo_files(repo_id, revision=None if create_pr else revision)
    operations += [CommitOperationDelete(path_in_repo=p) for p in remote if _managed(p) and p not in local]
    return api.create_commit(
        repo_id,
        operations,
        commit_message=commit_message or "Upload dendritic model with hf_dendrites",
        commit_description=commit_description,
        revision=revision,
        create_pr=create_pr,
    )


def push_to_hub(
    dm: "DendriticModel",
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
) -> "CommitInfo":
    """Save `dm` (base model, dendrites, model card, `processing_class`) and upload it to `repo_id` in one commit.

    This is `DendriticModel.push_to_hub`. The repo is created if needed (`private` applies then); `revision` names
    a branch (created from the default branch if missing); `create_pr=True` opens a pull request instead. The model
    card is hf_dendrites' own: transformers' push (which would write a generic README) is not used. Returns the
    `huggingface_hub.CommitInfo`.

    Example:
        >>> dm.push_to_hub("me/bert-dendrites", private=True, commit_message="2 dendrite cycles")
        >>> DendriticModel.from_pretrained("me/bert-dendrites")
    """
    from huggingface_hub import HfApi

    from .saving import save_dendritic_model

    repo_id = HfApi(token=token).create_repo(repo_id, private=private, exist_ok=True, repo_type="model").repo_id
    with tempfile.TemporaryDirectory(prefix="hf_dendrites_push_") as folder:
        save_dendritic_model(
            dm,
            folder,
            processing_class=processing_class,
            max_shard_size=max_shard_size,
            repo_id=repo_id,
            tags=tags,
            safe_serialization=safe_serialization,
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


def push_saved_folder(
    dm: "DendriticModel",
    save_directory: Union[str, os.PathLike],
    *,
    repo_id: Optional[str] = None,
    private: Optional[bool] = None,
    token: Optional[Union[str, bool]] = None,
    commit_message: Optional[str] = None,
    commit_description: Optional[str] = None,
    revision: Optional[str] = None,
    create_pr: bool = False,
    tags: Optional[list[str]] = None,
    **save_kwargs: Any,
) -> str:
    """`save_pretrained(save_directory, push_to_hub=True, ...)`: save into the folder, then upload in one commit to
    `repo_id` (default: the folder's name, as in transformers) the files this save wrote; other files already in
    the folder (e.g. Trainer checkpoints) are not uploaded. Returns the folder path."""
    from huggingface_hub import HfApi

    from .saving import read_checkpoint_metadata, save_dendritic_model

    save_directory = os.fspath(save_directory)
    repo_id = repo_id or os.path.basename(os.path.normpath(save_directory))
    repo_id = HfApi(token=token).create_repo(repo_id, private=private, exist_ok=True, repo_type="model").repo_id

    def stamps() -> dict[str, int]:
        if not os.path.isdir(save_directory):
            return {}
        return {e.name: e.stat().st_mtime_ns for e in os.scandir(save_directory) if e.is_file()}

    before = stamps()
    save_dendritic_model(dm, save_directory, repo_id=repo_id, tags=tags, **save_kwargs)
    after = stamps()
    # Changed files (tokenizer, ...) plus the checkpoint's own files, whatever the clock's granularity says.
    meta = read_checkpoint_metadata(save_directory, check_files=False)
    own = {*meta["files"], DENDRITE_CONFIG_NAME, MODEL_CARD_NAME, "config.json", "generation_config.json"}
    if (meta.get("training_summary") or {}).get("curve_png"):
        own.add(TRAINING_CURVE_NAME)
    written = sorted(name for name, stamp in after.items() if before.get(name) != stamp or name in own)
    upload_checkpoint_folder(
        save_directory,
        repo_id,
        token=token,
        commit_message=commit_message,
        commit_description=commit_description,
        revision=revision,
        create_pr=create_pr,
        paths=written,
    )
    return save_directory
