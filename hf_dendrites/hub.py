"""Model cards and Hub uploads for dendritic models: functions over plain data and folders.

`DendriticModel.save_pretrained` / `push_to_hub` (in `hf_dendrites.model`) gather what the card shows (the model's
architecture, parameter counts, dendrite config, the training summary of a `DendriticTrainer` run) and call
`write_model_card`; pushes upload a saved folder with `upload_checkpoint_folder`. This module never sees the model.

The card is rendered from the Jinja template `model_cards/dendritic_model_card.md` with huggingface_hub's
`ModelCard.from_template`. The package reaches the template as the resource `hf_dendrites/model_cards/`, a link to
that folder in a source checkout, so a wheel ships the same single file (`[tool.setuptools.package-data]`).
"""

from __future__ import annotations

import logging
import os
from importlib import resources
from typing import TYPE_CHECKING, Any, Optional, Union

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .constants import (
    BASE_WEIGHT_FILE_GLOBS,
    DEFAULT_MODEL_CARD_TAGS,
    DENDRITE_CONFIG_NAME,
    DENDRITE_TRAINED_BASE_NAME,
    DENDRITE_WEIGHTS_NAME,
    LIBRARY_NAME,
    MODEL_CARD_NAME,
    MODEL_CARD_TEMPLATE_NAME,
    TRAINING_CURVE_NAME,
)
from .utils import library_version

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo

logger = logging.getLogger(__name__)

# Remote files that a push owns: those the new upload does not have are deleted in the same commit, so a repo never
# mixes the shards of two saves, nor shows the training curve of an earlier run.
MANAGED_FILE_GLOBS = (
    *BASE_WEIGHT_FILE_GLOBS, DENDRITE_WEIGHTS_NAME, DENDRITE_TRAINED_BASE_NAME, DENDRITE_CONFIG_NAME, TRAINING_CURVE_NAME
)

# How the card names a try's outcome; `DendriticTrainer` summaries written before the "kept / discarded / cut short"
# vocabulary used "accepted" and "stopped".
_STATUS_NAMES = {"accepted": "kept", "kept": "kept", "discarded": "discarded", "stopped": "cut short", "cut short": "cut short"}


def model_card_template_path() -> str:
    """Path of the model card template inside the installed package."""
    template = resources.files(LIBRARY_NAME) / "model_cards" / MODEL_CARD_TEMPLATE_NAME
    if not template.is_file():
        raise FileNotFoundError(
            f"Model card template {MODEL_CARD_TEMPLATE_NAME} not found in the hf_dendrites package; reinstall "
            "hf_dendrites (`pip install --force-reinstall hf_dendrites`)."
        )
    return str(template)


def pipeline_tag_for(architecture: str) -> Optional[str]:
    """The Hub pipeline tag of a transformers class name, from transformers' own task tables.

    `transformers.modelcard.TASK_MAPPING` (task -> the `AutoModelFor...` class names) decides; a bare backbone
    (`BertModel`) is `feature-extraction`. None when transformers does not know the class.
    """
    from transformers.modelcard import TASK_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES, MODEL_MAPPING_NAMES

    def class_names(mapping: dict) -> set[str]:  # values are a class name or a tuple of them
        return {name for value in mapping.values() for name in ((value,) if isinstance(value, str) else value)}

    tables = {**TASK_MAPPING, "multiple-choice": MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES}
    for task, mapping in tables.items():
        if architecture in class_names(mapping):
            return task
    if architecture in class_names(MODEL_MAPPING_NAMES):
        return "feature-extraction"
    return None


def hub_model_id(name_or_path: Optional[str]) -> Optional[str]:
    """`name_or_path` when it is a Hub repo id (not a local folder), else None.

    A local path means nothing on another machine (and would leak into pushed files), so only repo ids become a
    card's `base_model` or a checkpoint's recorded base.
    """
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


def _num(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else "n/a"


def _cycle_rows(training: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per try of a cycle, each with a status ("kept", "discarded" or "cut short").

    Summaries list every try under "cycles" with its status; older ones list the kept cycles under "cycles" and
    every try under "tries".
    """
    rows = training.get("tries") or training.get("cycles") or []
    out = []
    for row in rows:
        row = dict(row)
        row["status"] = _STATUS_NAMES.get(row.get("status") or "kept", row.get("status"))
        weight = row.get("dendrite_weight")  # attribution of a kept cycle (DendriteScheduleCallback._attribute)
        # non-finite values (e.g. a ratio over all-zero base weights) were saved as None: shown as "n/a"
        if isinstance(weight, dict):
            row["dendrite_weight_text"] = f"{_num(weight.get('max'), '.3g')} (median {_num(weight.get('median'), '.3g')})"
        else:
            row["dendrite_weight_text"] = ""
        without, gain = row.get("ablation_score"), row.get("ablation_delta")  # the kept cycle without its dendrites
        row["ablation_text"] = f"{_num(without, '.4f')} ({_num(gain, '+.4g')})" if "ablation_score" in row and (without, gain) != (None, None) else ""
        out.append(row)
    return out


def _describe_schedule(training: dict[str, Any]) -> str:
    """One sentence on how the run grew its dendrites, true to the schedule settings it used."""
    schedule = training.get("schedule") or {}
    metric = f"`{training['metric']}` ({'higher' if training['greater_is_better'] else 'lower'} is better)"
    trainer = training.get("trainer") or "DendriticTrainer"  # summaries written before the key existed: DendriticTrainer
    text = f"Trained with `{trainer}`, which grows dendrites in every target layer when {metric} plateaus"
    if schedule.get("learning_rule") == "correlation":
        text += (
            "; the new dendrites are trained as candidates with the correlation rule (Cascade-Correlation) while the "
            "neurons are frozen, then installed"
        )
    elif schedule.get("dendrites_only_phase"):
        text += "; it alternates neuron phases with dendrite phases in which only the new dendrites train"
    elif schedule:
        text += "; new dendrites train together with the rest of the network (no dendrite-only phase)"
    text += ". A cycle that does not beat the best score before it is discarded (its dendrites dropped)."
    if schedule.get("restarts_only"):
        text += (
            " This run is the restarts-only control: every growth event restored the best weights and restarted the "
            "optimizer and learning rate, but no dendrites were added."
        )
    if any(isinstance(r.get("dendrite_weight"), dict) for r in training.get("cycles") or []):
        threshold = schedule.get("negligible_dendrite_weight", 0.05)
        text += (
            " *Dendrite weight*: how much a kept cycle's new dendrites add to the neurons' pre-activations relative to "
            f"the neurons' own weights (largest over layers); below {threshold:g} the gain is more likely due to the "
            "restart (restored best weights, fresh optimizer, LR reset) than to the dendrites."
        )
    if any(isinstance(r.get("ablation_delta"), (int, float)) for r in training.get("cycles") or []):
        text += (
            " *Without its dendrites*: the validation score of the kept model with that cycle's new dendrites switched "
            "off, and in parentheses how much better the score is with them (negative: the model does better without "
            "them)."
        )
    return text


def _describe_saved_model(training: dict[str, Any], num_dendrites: int) -> Optional[str]:
    """Which model was saved and why (`training["saved_model"]`, see `DendriteScheduleCallback.saved_model`); None for
    summaries written before it was recorded."""
    saved = training.get("saved_model")
    if not isinstance(saved, dict):
        return None
    cycle, attempt, status = saved.get("cycle"), saved.get("try"), saved.get("status")
    where = f"cycle {cycle}, try {attempt}" + (f", {_STATUS_NAMES.get(status, status)}" if status else "")
    origin, step, end = saved.get("origin"), saved.get("step"), saved.get("end_step")
    checkpoint = f"`{saved['checkpoint']}`" if saved.get("checkpoint") else None
    if not saved.get("evaluated"):
        text = (
            f"The saved model is the one at step {end} ({where}). It was trained past its last evaluation (step "
            f"{saved.get('last_evaluation_step')}) and has not been evaluated since: no evaluation results are shown."
        )
    elif origin == "restored by the schedule":
        text = f"The saved model is the one the schedule restored when training ended at step {end}: the weights evaluated at step {step} ({where})."
    elif origin == "best checkpoint":
        text = (
            f"The saved model is the best checkpoint, {checkpoint}, that `load_best_model_at_end` loaded when training "
            f"ended at step {end}: the weights evaluated at step {step} ({where})."
        )
    elif origin == "evaluated after training":
        source = f"the best checkpoint {checkpoint}, loaded by `load_best_model_at_end`" if checkpoint else "the last model"
        text = (
            f"The saved model is {source} ({where}), as it was when training ended at step {end}; no evaluation during "
            "training was of these weights, so they were evaluated after training."
        )
    else:
        text = f"The saved model is the last one, as training left it at step {end}: the weights evaluated at step {step} ({where})."
    if saved.get("note"):
        text += " " + saved["note"]
    if isinstance(cycle, int) and cycle >= 1:
        text += (
            f" It holds {num_dendrites} dendrites (see [Parameters](#parameters)): those of cycle {cycle} (try {attempt}) "
            "and of the cycles kept before it; the other tries in the table are not in it."
        )
    elif cycle == 0:
        text += f" It comes from cycle 0, before any growth ({num_dendrites} dendrites); no later try is in it."
    return text


def build_model_card(
    *,
    architecture: str,
    model_type: Optional[str],
    name_or_path: Optional[str],
    dendrite_config: dict[str, Any],
    summary: dict[str, Any],
    training_summary: Optional[dict[str, Any]] = None,
    repo_id: Optional[str] = None,
    tags: Optional[list[str]] = None,
    curve_file: Optional[str] = None,
    adapter_base: Optional[str] = None,
    peft_adapters: Optional[list[str]] = None,
) -> ModelCard:
    """Render a dendritic model's card (a `huggingface_hub.ModelCard`) from plain data.

    Args:
        architecture: the wrapped transformers class name (`BertForSequenceClassification`).
        model_type: its `config.model_type`.
        name_or_path: where the base model came from (`config._name_or_path`); only a Hub repo id becomes
            `base_model` in the card's metadata.
        dendrite_config: `DendriteConfig.to_dict()`.
        summary: `DendriteSummary.to_dict()` of the model being saved: the dendrites the card reports are the
            ones in the saved files, whatever the training summary says about earlier cycles.
        training_summary: `DendriticModel.training_summary` as plain JSON data, or None (no Training section).
            Keys used: "metric", "greater_is_better", "completed", "stopped_by_cap", "cycles" (one entry per try with
            "cycle", "try", "num_dendrites", "params", "best_score", "best_step", "status" and, for kept cycles,
            "dendrite_weight", "ablation_score", "ablation_delta"; older summaries: "tries"),
            "schedule" (the settings used), "hyperparameters", "saved_model" (which model was saved and why),
            "eval_results" (the saved model's own evaluation).
        repo_id: the Hub repo the card is for (title and loading example).
        tags: extra tags.
        curve_file: the training curve's file name next to the card, or None.
        adapter_base: for an adapter-only checkpoint, its base reference as the card names it; None for a full one.
        peft_adapters: the PEFT adapters saved with the model (under `peft_adapter/`), as the card names them
            ("`default` (LORA, r=8)"); None for a model without PEFT.

    The metadata holds `library_name: hf_dendrites`, `base_model` (a Hub id), tags, the pipeline tag and, when the
    training summary has `eval_results`, a model-index.
    """
    import torch
    import transformers

    model_type = model_type or "unknown"
    base_id = hub_model_id(name_or_path)
    task = pipeline_tag_for(architecture)
    model_name = (repo_id or "").split("/")[-1] or f"dendritic-{model_type}"
    summary_view = dict(summary)
    summary_view["dendrite_pct"] = 100.0 * summary["dendrite_params"] / max(summary["base_params"], 1)

    training = dict(training_summary) if isinstance(training_summary, dict) else None
    eval_rows: list[tuple[str, Any]] = []
    eval_results: list[EvalResult] = []
    if training is not None:
        training.setdefault("metric", "eval_loss")
        training.setdefault("greater_is_better", False)
        training["rows"] = _cycle_rows(training)
        training["with_dendrite_weight"] = any(r["dendrite_weight_text"] for r in training["rows"])
        training["with_ablation"] = any(r["ablation_text"] for r in training["rows"])
        training["description"] = _describe_schedule(training)
        training["schedule_items"] = sorted((training.get("schedule") or {}).items())
        training["hyperparameter_items"] = list((training.get("hyperparameters") or {}).items())
        training["curve"] = curve_file
        training["saved_description"] = _describe_saved_model(training, summary["num_dendrites"])
        eval_rows, eval_results = _eval_results(training, task or "other")
    saved = (training or {}).get("saved_model") or {}
    eval_caption = None
    if eval_rows and saved.get("step") is not None:
        when = "after training" if saved.get("origin") == "evaluated after training" else "during training"
        eval_caption = f"Of the saved model: its evaluation at step {saved['step']} ({when}, on the evaluation set)."

    card_data = ModelCardData(
        base_model=base_id,
        library_name=LIBRARY_NAME,
        pipeline_tag=task,
        tags=[*DEFAULT_MODEL_CARD_TAGS, model_type, *(tags or [])],
        model_name=model_name if eval_results else None,
        eval_results=eval_results or None,
        metrics=sorted({r.metric_type for r in eval_results}) or None,
    )
    base_description = f"[`{base_id}`](https://huggingface.co/{base_id})" if base_id else f"a `{architecture}`"
    return ModelCard.from_template(
        card_data,
        template_path=model_card_template_path(),
        title=repo_id or f"Dendritic {architecture}",
        base_description=base_description,
        architecture=architecture,
        model_type=model_type,
        dendrite_config=list(dendrite_config.items()),
        summary=summary_view,
        training=training,
        eval_results=eval_rows,
        eval_caption=eval_caption,
        load_id=repo_id or "path/to/this/folder",
        adapter_base=adapter_base,
        peft_adapters=peft_adapters or None,
        versions={
            "hf_dendrites": library_version(),
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
    )


def write_model_card(directory: Union[str, os.PathLike], **card_fields: Any) -> str:
    """Render the card (`build_model_card(**card_fields)`) into `directory/README.md`; returns its path.

    `card_fields["curve_file"]` names a training curve that must already be in `directory`. To write the card of a
    `DendriticModel`, call its `save_model_card(directory)`.
    """
    if hasattr(directory, "save_model_card"):
        raise TypeError(
            "write_model_card(directory, **card_fields) takes a folder; for a DendriticModel call "
            "model.save_model_card(directory, repo_id=..., tags=...)."
        )
    path = os.path.join(os.fspath(directory), MODEL_CARD_NAME)
    build_model_card(**card_fields).save(path)
    return path


def upload_checkpoint_folder(
    folder: Union[str, os.PathLike],
    repo_id: str,
    *,
    token: Optional[Union[str, bool]] = None,
    commit_message: Optional[str] = None,
    commit_description: Optional[str] = None,
    revision: Optional[str] = None,
    create_pr: bool = False,
    allow_patterns: Optional[list[str]] = None,
) -> "CommitInfo":
    """Upload a saved checkpoint folder (or the files `allow_patterns` selects) to an existing Hub repo.

    `HfApi.upload_folder` does the work: the files go as they are on disk (so the folder's README.md is the card
    that lands), and the remote weight files, dendrite files and training curve that the upload does not replace are
    deleted in the same commit. `revision` names a branch, created from the default branch when missing;
    `create_pr=True` opens a pull request against the default branch instead. Returns the `CommitInfo`.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    if revision is not None and not create_pr:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=os.fspath(folder),
        commit_message=commit_message or "Upload dendritic model with hf_dendrites",
        commit_description=commit_description,
        revision=None if create_pr else revision,
        create_pr=create_pr,
        allow_patterns=allow_patterns,
        delete_patterns=list(MANAGED_FILE_GLOBS),
    )
