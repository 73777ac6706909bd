"""DendriticTrainer on real (tiny) transformers models, real Trainer loops and real checkpoints on disk."""

import csv
import json
import logging
import os
import types

import pytest
import torch
import transformers
from dendritic_task import (
    ScriptedMetric,
    all_linear,
    make_args,
    state_of,
    task_data,
    tiny_bert,
)
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_dendrites import (
    DendriteConfig,
    DendriticModel,
    DendriticTrainer,
    DendriticTrainingArguments,
    get_dendritic_model,
)
from hf_dendrites.constants import (
    DENDRITE_CONFIG_NAME,
    DENDRITE_CURVE_NAME,
    DENDRITE_EVAL_CSV_NAME,
    DENDRITE_SCHEDULE_NAME,
    DENDRITE_SCHEDULE_WEIGHTS_NAME,
)
from hf_dendrites.logging_utils import follow_transformers_verbosity
from hf_dendrites.plotting import EVAL_CSV_FIELDS
from hf_dendrites.saving import load_dendritic_state
from hf_dendrites.trainer import _check_args_supported


def make_trainer(output_dir, model=None, callbacks=None, compute_metrics=None, train_n=128, **arg_overrides):
    return DendriticTrainer(
        tiny_bert() if model is None else model,
        make_args(str(output_dir), **arg_overrides),
        train_dataset=task_data(train_n, 1),
        eval_dataset=task_data(64, 2),
        dendrite_config=all_linear(),
        compute_metrics=compute_metrics,
        callbacks=callbacks,
    )


def scripted(output_dir, scores, **overrides):
    """A trainer whose schedule sees `scores` (one per evaluation) instead of the real loss."""
    kwargs = {"metric_for_best_model": "scripted", "greater_is_better": False, "dendrite_improvement_threshold": [0.01]}
    kwargs.update(overrides)
    return make_trainer(output_dir, compute_metrics=ScriptedMetric(scores), **kwargs)


def decisions(trainer):
    return [(r["step"], r["decision"]) for r in trainer.dendrite_history]


# ---------------------------------------------------------------------------------------------- arguments
def test_arguments_default_to_eval_loss(tmp_path):
    args = DendriticTrainingArguments(output_dir=str(tmp_path), eval_strategy="epoch", dendrite_patience=4, dendrite_improvement_threshold=0.05)
    assert args.metric_for_best_model == "loss" and args.greater_is_better is False
    assert args.dendrite_patience == [4] and args.dendrite_improvement_threshold == [0.05]
    settings = args.dendrite_schedule_settings()
    assert settings.patience == (4,) and settings.greater_is_better is False and settings.max_cycles == 3
    acc = DendriticTrainingArguments(output_dir=str(tmp_path), eval_strategy="epoch", metric_for_best_model="accuracy")
    assert acc.greater_is_better is True and acc.dendrite_schedule_settings().greater_is_better
    with pytest.raises(ValueError, match="dendrite_lr_schedule"):
        DendriticTrainingArguments(output_dir=str(tmp_path), eval_strategy="epoch", dendrite_lr_schedule="cosine")
    with pytest.raises(ValueError, match="patience"):
        DendriticTrainingArguments(output_dir=str(tmp_path), eval_strategy="epoch", dendrite_patience=[0])
    # Every dendrite field has a help text (shown by HfArgumentParser --help).
    for f in DendriticTrainingArguments.__dataclass_fields__.values():
        if "dendrite" in f.name:
            assert f.metadata.get("help"), f.name


def test_evaluate_and_predict_only_runs_need_no_evaluation_strategy(tmp_path):
    """Issue 13: a script run with --do_eval / --do_predict and no --do_train must work; training still needs
    evaluations, and says so when it starts."""
    args = DendriticTrainingArguments(output_dir=str(tmp_path), eval_strategy="no", use_cpu=True, report_to=[])
    evals = task_data(16, 2)
    trainer = DendriticTrainer(tiny_bert(), args, eval_dataset=evals, dendrite_config=all_linear())
    assert trainer.evaluate()["eval_loss"] > 0
    prediction = trainer.predict(evals)
    assert prediction.predictions.shape == (16, 2) and prediction.metrics["test_loss"] > 0
    assert trainer.dendrite_history == [] and trainer.dendrite_best_score is None  # outside train(): no schedule step
    trainer.train_dataset = task_data(16, 1)
    with pytest.raises(ValueError, match="eval_strategy='steps'"):
        trainer.train()


def test_hf_argument_parser_reads_the_dendrite_fields(tmp_path):
    parser = transformers.HfArgumentParser(DendriticTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--eval_strategy", "steps", "--eval_steps", "5", "--dendrite_patience", "4", "2",
         "--dendrites_only_phase", "--max_dendrite_cycles", "1"]
    )
    assert args.dendrite_patience == [4, 2] and args.dendrites_only_phase and args.max_dendrite_cycles == 1


def test_plain_training_arguments_are_converted(tmp_path):
    plain = TrainingArguments(output_dir=str(tmp_path), eval_strategy="steps", eval_steps=3, learning_rate=1e-3, use_cpu=True, report_to=[])
    trainer = DendriticTrainer(tiny_bert(), plain, train_dataset=task_data(16, 1), eval_dataset=task_data(16, 2), dendrite_config=all_linear())
    assert isinstance(trainer.args, DendriticTrainingArguments)
    assert trainer.args.eval_steps == 3 and trainer.args.learning_rate == 1e-3 and trainer.args.dendrite_patience == [3]


def test_unsupported_setups_fail_with_a_clear_error(tmp_path):
    data = {"train_dataset": task_data(16, 1), "eval_dataset": task_data(16, 2)}
    model = tiny_bert()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="optimizer_cls_and_kwargs"):
        DendriticTrainer(model, make_args(str(tmp_path)), optimizers=(opt, None), **data)
    with pytest.raises(ValueError, match="model_init"):
        DendriticTrainer(None, make_args(str(tmp_path)), **data)
    # FSDP2 (named: transformers before 5.25 defaults `fsdp=True` to version 1) in one process: no sharding would happen
    fsdp2 = {"fsdp": True, "fsdp_config": {"version": 2}}
    with pytest.raises(RuntimeError, match="FSDP is requested, but accelerate runs this process with distributed type NO"):
        DendriticTrainer(tiny_bert(), make_args(str(tmp_path), **fsdp2), dendrite_config=all_linear(), **data)
    with pytest.raises(NotImplementedError, match="FSDP version 2 only, and this run asks for FSDP version 1"):
        DendriticTrainer(tiny_bert(), make_args(str(tmp_path), fsdp=True, fsdp_config={"version": 1}), **data)
    ds_zero3 = types.SimpleNamespace(config={"zero_optimization": {"stage": 3}})  # ZeRO-3: tests/test_deepspeed.py
    with pytest.raises(NotImplementedError, match="DeepSpeed ZeRO stages 0, 1 and 2, not stage 3"):
        _check_args_supported(types.SimpleNamespace(deepspeed="ds_config.json", hf_deepspeed_config=ds_zero3, fsdp=None))
    with pytest.raises(ValueError, match="eval_dataset"):
        DendriticTrainer(tiny_bert(), make_args(str(tmp_path)), train_dataset=task_data(16, 1), dendrite_config=all_linear())
    dm = get_dendritic_model(tiny_bert(), all_linear())
    with pytest.raises(ValueError, match="already a DendriticModel"):
        DendriticTrainer(dm, make_args(str(tmp_path)), dendrite_config=DendriteConfig(target_modules="all-linear", dendrite_seed=1), **data)


def test_wraps_a_plain_model_and_keeps_what_the_trainer_reads_from_it(tmp_path):
    config = DendriteConfig(target_modules="all-linear")  # no seed: the trainer uses args.seed
    plain = Trainer(tiny_bert(), make_args(str(tmp_path / "plain")), train_dataset=task_data(16, 1), eval_dataset=task_data(16, 2))
    trainer = DendriticTrainer(
        tiny_bert(), make_args(str(tmp_path), seed=7), train_dataset=task_data(16, 1), eval_dataset=task_data(16, 2), dendrite_config=config
    )
    assert isinstance(trainer.model, DendriticModel) and trainer.dendritic_model is trainer.model
    assert trainer.model.dendrite_config.dendrite_seed == 7 and config.dendrite_seed is None  # the user's object is left alone
    assert trainer.label_names == plain.label_names == ["labels"]
    assert trainer.can_return_loss == plain.can_return_loss
    assert trainer.model_accepts_loss_kwargs == plain.model_accepts_loss_kwargs
    dm = get_dendritic_model(tiny_bert(), DendriteConfig(target_modules="all-linear", dendrite_seed=3))
    assert DendriticTrainer(dm, make_args(str(tmp_path)), train_dataset=task_data(16, 1), eval_dataset=task_data(16, 2)).model is dm


def test_missing_metric_names_the_available_ones(tmp_path):
    trainer = make_trainer(tmp_path, metric_for_best_model="accuracy", max_steps=4)
    with pytest.raises(KeyError, match="metric_for_best_model.*eval_loss"):
        trainer.train()


# ---------------------------------------------------------------------------------------------- loss parity
def _tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    return transformers.GPT2LMHeadModel(config)


def _lm_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(3, 11, (1,), generator=g))
        ids = torch.randint(1, 50, (length,), generator=g).tolist()
        pad = 10 - length
        rows.append({"input_ids": ids + [0] * pad, "attention_mask": [1] * length + [0] * pad, "labels": ids + [-100] * pad})
    return rows


def test_same_losses_and_weights_as_the_plain_trainer_with_gradient_accumulation(tmp_path):
    """No growth happens in 8 steps; with gradient accumulation over batches of different token counts, a
    dendritic model (zero dendrites) must log the same losses and end with the same weights as the plain model."""
    common = {
        "eval_strategy": "steps", "eval_steps": 4, "logging_steps": 1, "max_steps": 8, "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2, "learning_rate": 1e-2, "use_cpu": True, "report_to": [], "disable_tqdm": True, "seed": 0,
    }
    train, evals = _lm_data(64, 1), _lm_data(16, 2)
    plain = Trainer(_tiny_gpt2(), TrainingArguments(output_dir=str(tmp_path / "plain"), **common), train_dataset=train, eval_dataset=evals)
    plain.train()
    dendritic = DendriticTrainer(
        _tiny_gpt2(), DendriticTrainingArguments(output_dir=str(tmp_path / "dendritic"), dendrite_patience=[10], **common),
        train_dataset=train, eval_dataset=evals, dendrite_config=DendriteConfig(dendrite_seed=0),
    )
    dendritic.train()
    assert dendritic.model_accepts_loss_kwargs == plain.model_accepts_loss_kwargs

    def losses(trainer, key):
        return [entry[key] for entry in trainer.state.log_history if key in entry]

    assert len(losses(plain, "loss")) == 8 and len(losses(plain, "eval_loss")) == 2
    for key in ("loss", "eval_loss", "grad_norm"):
        assert losses(dendritic, key) == pytest.approx(losses(plain, key), rel=1e-6, abs=1e-7), key
    plain_state = plain.model.state_dict()
    for name, value in dendritic.model.model.state_dict().items():
        torch.testing.assert_close(value, plain_state[name], rtol=1e-6, atol=1e-7)


def test_label_smoothing_shifts_causal_lm_labels_like_the_plain_trainer(tmp_path):
    common = {"eval_strategy": "steps", "eval_steps": 4, "label_smoothing_factor": 0.1, "use_cpu": True, "report_to": []}
    evals = _lm_data(4, 2)
    plain = Trainer(_tiny_gpt2(), TrainingArguments(output_dir=str(tmp_path / "p"), **common), eval_dataset=evals)
    dendritic = DendriticTrainer(
        _tiny_gpt2(), DendriticTrainingArguments(output_dir=str(tmp_path / "d"), **common), eval_dataset=evals,
        dendrite_config=DendriteConfig(dendrite_seed=0),
    )
    batch = transformers.default_data_collator(evals)
    expected = plain.compute_loss(plain.model, dict(batch))
    torch.testing.assert_close(dendritic.compute_loss(dendritic.model, dict(batch)), expected)
    unshifted = transformers.trainer_pt_utils.LabelSmoother(epsilon=0.1)(plain.model(**batch), batch["labels"])
    assert not torch.allclose(unshifted, expected)


# ---------------------------------------------------------------------------------------------- end to end
def test_end_to_end_grows_twice_and_completes_before_the_cap(tmp_path):
    trainer = make_trainer(tmp_path)
    cap = trainer.args.num_train_epochs * (128 // 16)
    output = trainer.train()
    history = trainer.dendrite_history
    actions = [r["decision"] for r in history]

    # The schedule grew at least twice, completed on its own, and training stopped long before the cap.
    assert sum(a in ("grow", "retry") for a in actions) >= 2 and actions[-1] == "complete"
    assert trainer.dendrite_schedule.done and output.global_step == history[-1]["step"] < cap / 4
    # The Trainer's log carries cycle, phase, dendrite and parameter counts; events are logged as numbers.
    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    assert len(evals) == len(history)
    assert [e["dendrite_cycle"] for e in evals] == [r["cycle"] for r in history]
    assert [e["total_params"] for e in evals] == [r["params"] for r in history]
    assert all({"dendrite_phase", "dendrite_count", "dendrite_params", "trainable_params"} <= set(e) for e in evals)
    events = [e for e in trainer.state.log_history if "dendrite_event" in e]
    assert len(events) == sum(a != "continue" for a in actions) and events[-1]["dendrite_event"] == 4

    # The task was learned, and the final model is the accepted best, restored.
    schedule = trainer.dendrite_schedule
    assert schedule.accepted_best < history[0]["score"] - 0.02
    assert trainer.evaluate()["eval_loss"] == pytest.approx(schedule.accepted_best, abs=1e-6)
    accepted_rows = [r for r in history if r["step"] == schedule.accepted_best_step and r["cycle"] == schedule.accepted_cycle]
    assert sum(trainer.model.dendrite_counts().values()) == accepted_rows[0]["num_dendrites"] > 0
    assert all(p.requires_grad for p in trainer.model.parameters())

    # output_dir: a CSV of every evaluation and the PNG plot.
    with open(tmp_path / DENDRITE_EVAL_CSV_NAME, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == EVAL_CSV_FIELDS and len(rows) == len(history)
    assert [int(r["step"]) for r in rows] == [r["step"] for r in history]
    assert [float(r["score"]) for r in rows] == pytest.approx([r["score"] for r in history])
    assert (tmp_path / DENDRITE_CURVE_NAME).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The saved model carries the training summary (model card) and loads back with its dendrites.
    trainer.save_model(str(tmp_path / "final"))
    meta = json.loads((tmp_path / "final" / DENDRITE_CONFIG_NAME).read_text())
    summary = meta["training_summary"]
    assert summary["metric"] == "eval_loss" and summary["completed"] and summary["curve_png"]
    # One entry per cycle try, in order; cycle 0 and every accepted cycle are kept, rejected tries discarded.
    tries = [(h.cycle, h.attempt, h.accepted) for h in schedule.history]
    assert [(c["cycle"], c["try"], c["status"] == "kept") for c in summary["cycles"]] == tries
    assert {c["status"] for c in summary["cycles"]} <= {"kept", "discarded"} and not summary["stopped_by_cap"]
    assert summary["schedule"]["max_cycles"] == 2 and summary["schedule"]["learning_rule"] == "gd"
    assert summary["hyperparameters"]["learning_rate"] == 3e-3 and summary["hyperparameters"]["seed"] == 0
    assert summary["eval_results"]["eval_loss"] == pytest.approx(schedule.accepted_best)
    assert "dendrite" in (tmp_path / "final" / "README.md").read_text().lower()
    reloaded = DendriticModel.from_pretrained(str(tmp_path / "final"))
    assert reloaded.dendrite_counts() == trainer.model.dendrite_counts()
    for name, value in state_of(reloaded).items():
        torch.testing.assert_close(value, trainer.model.state_dict()[name])


class _Interrupted(Exception):
    pass


class _CrashAfterFirstGrowth(TrainerCallback):
    """Simulates a crash right after the first checkpoint written after a growth."""

    def __init__(self):
        self.trainer = None
        self.crashed_at = None

    def on_save(self, args, state, control, **kwargs):
        if self.trainer.dendrite_schedule.cycle >= 1:
            self.crashed_at = state.global_step
            raise _Interrupted()


def test_resume_after_a_growth_takes_the_same_decisions_and_ends_with_the_same_weights(tmp_path):
    common = {"save_strategy": "steps", "save_steps": 4, "lr_scheduler_type": "linear", "warmup_steps": 2}
    reference = make_trainer(tmp_path / "uninterrupted", **common)
    reference.train()
    assert sum(a in ("grow", "retry") for _, a in decisions(reference)) >= 2

    crash = _CrashAfterFirstGrowth()
    crashing = make_trainer(tmp_path / "run", callbacks=[crash], **common)
    crash.trainer = crashing
    with pytest.raises(_Interrupted):
        crashing.train()
    first_growth = next(step for step, a in decisions(reference) if a == "grow")
    assert crash.crashed_at == first_growth

    # The checkpoint written after the growth carries the dendrite layout and the schedule state.
    checkpoint = tmp_path / "run" / f"checkpoint-{first_growth}"
    meta = json.loads((checkpoint / DENDRITE_CONFIG_NAME).read_text())
    assert set(meta["layers"].values()) == {1}
    saved = json.loads((checkpoint / DENDRITE_SCHEDULE_NAME).read_text())
    assert saved["schedule"]["state"]["cycle"] == 1 and saved["snapshots"]["accepted"] is not None
    # Cycle 0's best score came at the growth step itself: those weights (without the new dendrites) are in no
    # checkpoint's model files, so this checkpoint writes them once.
    accepted = saved["snapshots"]["accepted"]
    assert accepted["step"] == first_growth
    assert accepted["stored"] == {"kind": "tensors", "path": os.path.join("dendrite_snapshots", "accepted.safetensors")}
    assert not (checkpoint / DENDRITE_SCHEDULE_WEIGHTS_NAME).exists()  # the format-1 file with both snapshots
    # The optimizer was rebuilt at the growth: the checkpoint's optimizer state is empty (and resuming is exact).
    assert torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"] == {}

    # A new process: a fresh model (other init) resumes from the last checkpoint.
    resumed = make_trainer(tmp_path / "run", model=tiny_bert(seed=123), **common)
    resumed.train(resume_from_checkpoint=True)
    assert decisions(resumed) == decisions(reference)
    assert [r["score"] for r in resumed.dendrite_history] == pytest.approx([r["score"] for r in reference.dendrite_history], abs=1e-6)
    cycles = [(h.cycle, h.attempt, h.accepted, h.best_step, h.end_step) for h in reference.dendrite_schedule.history]
    assert [(h.cycle, h.attempt, h.accepted, h.best_step, h.end_step) for h in resumed.dendrite_schedule.history] == cycles
    assert resumed.model.dendrite_counts() == reference.model.dendrite_counts()
    expected = state_of(reference.model)
    got = state_of(resumed.model)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)
    assert resumed.state.global_step == reference.state.global_step
    # The next checkpoint (written by the resumed run) hard-links that snapshot instead of writing it again.
    later = tmp_path / "run" / f"checkpoint-{first_growth + 4}"
    stored = json.loads((later / DENDRITE_SCHEDULE_NAME).read_text())["snapshots"]["accepted"]["stored"]
    assert (later / stored["path"]).stat().st_ino == (checkpoint / accepted["stored"]["path"]).stat().st_ino

    # Relaunching the finished job resumes from the checkpoint written at completion and trains no more.
    last = resumed.state.global_step
    assert (tmp_path / "run" / f"checkpoint-{last}").is_dir()
    again = make_trainer(tmp_path / "run", model=tiny_bert(seed=7), **common)
    assert again.train(resume_from_checkpoint=True).global_step == last
    assert again.dendrite_schedule.done and again.model.dendrite_counts() == reference.model.dendrite_counts()
    for name, value in state_of(again.model).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- scripted schedules
def test_load_best_model_at_end_rebuilds_the_best_checkpoints_architecture(tmp_path):
    # Best score at step 4 (no dendrites yet); growth at step 12; the step cap ends training mid-cycle 1.
    trainer = scripted(
        tmp_path, [1.0, 2.0, 2.0, 3.0, 3.0], max_steps=20, save_strategy="steps", save_steps=4, load_best_model_at_end=True
    )
    trainer.train()
    assert decisions(trainer)[2] == (12, "grow") and not trainer.dendrite_schedule.done
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-4")
    assert set(trainer.model.dendrite_counts().values()) == {0}
    expected = get_dendritic_model(tiny_bert(seed=5), all_linear())
    load_dendritic_state(expected, trainer.state.best_model_checkpoint)
    for name, value in state_of(expected).items():
        torch.testing.assert_close(trainer.model.state_dict()[name], value)
    # Issue 22: the summary (model card, model-index) reports the restored checkpoint's evaluation, not the last one.
    summary = trainer.model.training_summary
    saved = summary["saved_model"]
    assert (saved["origin"], saved["checkpoint"], saved["step"], saved["cycle"], saved["try"]) == ("best checkpoint", "checkpoint-4", 4, 0, 1)
    assert saved["status"] == "kept" and saved["end_step"] == 20 and saved["evaluated"]
    assert summary["eval_results"]["eval_scripted"] == 1.0 and trainer.dendrite_history[-1]["score"] == 3.0


def test_a_model_changed_after_its_last_evaluation_is_evaluated_for_the_summary(tmp_path):
    """Issue 22: the step cap ends training at the evaluation that grows dendrites (step 12): the final model (the
    restored best of step 4 with new dendrites) was never evaluated, so train() evaluates it and the summary reports
    that evaluation and where the model came from."""
    trainer = scripted(tmp_path, [1.0, 2.0, 2.0, 0.5], max_steps=12)
    trainer.train()
    assert decisions(trainer) == [(4, "continue"), (8, "continue"), (12, "grow")] and trainer.compute_metrics.calls == 4
    summary = trainer.model.training_summary
    saved = summary["saved_model"]
    assert (saved["origin"], saved["step"], saved["cycle"], saved["try"], saved["status"]) == ("evaluated after training", 12, 1, 1, "cut short")
    assert summary["eval_results"]["eval_scripted"] == 0.5 and trainer.state.log_history[-1]["eval_scripted"] == 0.5
    # a checkpoint written between evaluations says its weights were not evaluated (and claims no score)
    trainer.dendrite_callback.weights = None
    unevaluated = trainer.dendrite_callback.training_summary()
    assert not unevaluated["saved_model"]["evaluated"] and unevaluated["eval_results"] == {}


def test_a_best_checkpoint_written_after_a_growth_is_evaluated_again(tmp_path):
    """Issue 22: the Trainer's best evaluation (step 12, a raw best too small to count as an improvement) is also the
    schedule's plateau, so the checkpoint of that step holds the restored weights with new dendrites; after the cap,
    `load_best_model_at_end` loads it, and the summary reports its own evaluation, not the one that made it the best."""
    trainer = scripted(
        tmp_path, [1.0, 0.999, 0.998, 2.0, 0.7], max_steps=16, save_strategy="steps", save_steps=4, load_best_model_at_end=True
    )
    trainer.train()
    assert decisions(trainer) == [(4, "continue"), (8, "continue"), (12, "grow"), (16, "continue")]
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-12") and trainer.compute_metrics.calls == 5
    summary = trainer.model.training_summary
    saved = summary["saved_model"]
    assert (saved["origin"], saved["checkpoint"], saved["step"], saved["cycle"], saved["try"], saved["status"]) == (
        "evaluated after training", "checkpoint-12", 16, 1, 1, "cut short")
    assert "`checkpoint-12`" in saved["note"] and summary["eval_results"]["eval_scripted"] == 0.7


def test_log_level_applies_to_what_the_conversion_of_a_dendritic_checkpoint_logs(tmp_path):
    """Issue 22 (5): a model loaded with plain transformers from a dendritic checkpoint is converted inside
    DendriticTrainer.__init__, before Trainer.__init__ applies `log_level`; its "restored N dendrites" line must still
    show at that level, the first time."""
    dm = get_dendritic_model(tiny_bert(), all_linear())
    dm.add_dendrites(1)
    dm.save_pretrained(tmp_path / "ckpt")
    plain = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "ckpt")
    library = logging.getLogger("hf_dendrites")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    library.addHandler(handler)
    library.setLevel(logging.NOTSET)  # as in a fresh process: nothing has set the library's level yet
    transformers.logging.set_verbosity_warning()
    try:
        DendriticTrainer(plain, make_args(str(tmp_path / "out"), log_level="info"), eval_dataset=task_data(8, 0))
    finally:
        library.removeHandler(handler)
        transformers.logging.set_verbosity_error()
        follow_transformers_verbosity()
    assert any("is a dendritic checkpoint: restored its 7 dendrites" in r.getMessage() for r in records)


def _tiny_vit(seed=0):
    torch.manual_seed(seed)
    config = transformers.ViTConfig(
        image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return transformers.ViTForImageClassification(config)


def _image_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 8, 8, generator=g)
    return [{"pixel_values": x, "labels": int(x[0, 0, 0] > 0)} for x in images]


def test_vit_resumes_and_loads_its_best_checkpoint(tmp_path):
    """transformers saves ViT under other key names than it has in memory: resuming (with the schedule's model
    snapshots) and load_best_model_at_end still load every weight."""

    def run(output_dir, model, resume=None):
        args = make_args(
            str(output_dir), max_steps=16, save_strategy="steps", save_steps=4, load_best_model_at_end=True,
            metric_for_best_model="scripted", greater_is_better=False,
        )
        trainer = DendriticTrainer(
            model, args, train_dataset=_image_data(64, 1), eval_dataset=_image_data(32, 2), dendrite_config=all_linear(),
            compute_metrics=ScriptedMetric([1.0, 2.0, 2.0, 3.0]),  # best at step 4, growth at step 12
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    reference = run(tmp_path / "reference", _tiny_vit())
    assert decisions(reference)[2] == (12, "grow") and reference.state.best_model_checkpoint.endswith("checkpoint-4")
    best = get_dendritic_model(_tiny_vit(seed=5), all_linear())
    load_dendritic_state(best, reference.state.best_model_checkpoint)
    assert set(reference.model.dendrite_counts().values()) == {0}
    for name, value in state_of(best).items():
        assert torch.equal(reference.model.state_dict()[name], value), name

    # A fresh model (other init) resumes after the growth and computes what the uninterrupted run computed.
    resumed = run(tmp_path / "resumed", _tiny_vit(seed=3), resume=str(tmp_path / "reference" / "checkpoint-12"))
    assert decisions(resumed) == decisions(reference)
    losses = [[r["eval_loss"] for r in t.state.log_history if "eval_loss" in r] for t in (reference, resumed)]
    assert len(losses[0]) == 4 and losses[1] == pytest.approx(losses[0], abs=1e-6)


@pytest.fixture
def info_logs(caplog):
    """hf_dendrites' log messages at info and above, with transformers' verbosity at info (as a script sets it)."""
    transformers.logging.set_verbosity_info()
    caplog.set_level(logging.INFO)
    try:
        yield lambda: [r.getMessage() for r in caplog.records if r.name.startswith("hf_dendrites")]
    finally:
        transformers.logging.set_verbosity_error()
        follow_transformers_verbosity()


def test_completed_schedule_keeps_its_own_best_over_a_discarded_cycles_raw_best(tmp_path, info_logs):
    # Cycle 1 reaches 0.995 (the Trainer's best) but not 1 % better than cycle 0's 1.0: it is discarded, so is the
    # retry, and the schedule restores cycle 0's model, which load_best_model_at_end must not overwrite.
    trainer = scripted(
        tmp_path, [1.0, 1.0, 1.0, 0.995, 0.995, 0.995, 0.999, 0.999, 0.999],
        save_strategy="steps", save_steps=4, load_best_model_at_end=True,
    )
    trainer.train()
    assert [a for _, a in decisions(trainer)] == ["continue"] * 2 + ["grow"] + ["continue"] * 2 + ["retry"] + ["continue"] * 2 + ["complete"]
    assert trainer.state.best_metric == 0.995
    assert set(trainer.model.dendrite_counts().values()) == {0}
    assert [c.accepted for c in trainer.dendrite_schedule.history] == [True, False, False]
    # Every decision is logged with its reason, and so is which weights were restored.
    text = "\n".join(info_logs())
    assert "without beating the accepted best 1 of cycle 0: discarding it, try 2 with fresh dendrites" in text
    assert "without beating the accepted best 1 of cycle 0 after 2 tries: training complete" in text
    assert text.count("Restored the last accepted best model: the weights of step 4") == 3  # grow, retry, complete
    assert "The dendrite schedule completed and restored its best model; not loading" in text
    summary = trainer.model.training_summary
    assert [(c["cycle"], c["try"], c["status"]) for c in summary["cycles"]] == [(0, 1, "kept"), (1, 1, "discarded"), (1, 2, "discarded")]
    assert summary["completed"] and not summary["stopped_by_cap"]


class _PhaseRecorder(TrainerCallback):
    def __init__(self):
        self.trainer = None
        self.steps = []
        self.events = []

    def on_step_end(self, args, state, control, **kwargs):
        t = self.trainer
        dendrite_ids = {id(p) for p in t.model.dendrite_parameters()}
        trainable = {n for n, p in t.model.named_parameters() if p.requires_grad}
        in_optimizer = {id(p) for g in t.optimizer.param_groups for p in g["params"]}
        self.steps.append(
            {
                "phase": t.dendrite_schedule.phase,
                "only_dendrites": all(id(p) in dendrite_ids for p in t.model.parameters() if p.requires_grad),
                "embeddings_frozen": not any("word_embeddings" in n for n in trainable),
                "optimizer_matches": in_optimizer == {id(p) for p in t.model.parameters() if p.requires_grad},
                "prepared_optimizers": len(t.accelerator._optimizers),
            }
        )

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "dendrite_event" in logs:
            base = {n: p.detach().clone() for n, p in self.trainer.model.named_parameters() if "dendrite_" not in n}
            self.events.append((logs["dendrite_event"], logs["trainable_params"], base))


def test_dendrites_only_phase_freezes_the_neurons_and_rebuilds_the_optimizer(tmp_path):
    recorder = _PhaseRecorder()
    model = tiny_bert()
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)  # the user's own freezing
    trainer = DendriticTrainer(
        model,
        make_args(str(tmp_path), dendrites_only_phase=True, max_dendrite_cycles=1, metric_for_best_model="scripted",
                  greater_is_better=False, logging_steps=1),
        train_dataset=task_data(128, 1), eval_dataset=task_data(64, 2), dendrite_config=all_linear(),
        compute_metrics=ScriptedMetric([1.0, 1.0, 1.0, 0.9, 0.9, 0.9, 0.8, 0.8, 0.8]), callbacks=[recorder],
    )
    recorder.trainer = trainer
    trainer.train()
    assert [a for _, a in decisions(trainer) if a != "continue"] == ["grow", "switch", "complete"]
    phases = [s["phase"] for s in recorder.steps]
    assert phases == ["neuron"] * 12 + ["dendrite"] * 12 + ["neuron"] * 12
    for s in recorder.steps:
        assert s["embeddings_frozen"] and s["optimizer_matches"] and s["prepared_optimizers"] == 1
        assert s["only_dendrites"] == (s["phase"] == "dendrite")
    (grow, grow_trainable, base_at_growth), (switch, _, base_at_switch), _ = recorder.events
    assert (grow, switch) == (1, 3) and grow_trainable == trainer.model.dendrite_summary().dendrite_params
    for name, value in base_at_growth.items():  # neurons did not move during the dendrites-only phase
        torch.testing.assert_close(base_at_switch[name], value, rtol=0, atol=0)
    assert not trainer.model.model.bert.embeddings.word_embeddings.weight.requires_grad


@pytest.mark.parametrize("mode", ["restart", "continue"])
def test_lr_schedule_across_a_growth(tmp_path, mode):
    trainer = scripted(
        tmp_path, [1.0, 1.0, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3], max_steps=40, lr_scheduler_type="linear",
        learning_rate=1e-2, logging_steps=1, dendrite_lr_schedule=mode,
    )
    trainer.train()
    assert decisions(trainer)[2] == (12, "grow")
    lr = {e["step"]: e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e}
    assert lr[12] == pytest.approx(1e-2 * (40 - 11) / 40)
    if mode == "restart":  # a fresh linear decay over the 28 remaining steps
        assert lr[13] == pytest.approx(1e-2) and lr[20] == pytest.approx(1e-2 * (28 - 7) / 28)
    else:  # the one schedule over 40 steps goes on
        assert lr[13] == pytest.approx(1e-2 * (40 - 12) / 40) and lr[20] == pytest.approx(1e-2 * (40 - 19) / 40)


def test_checkpoints_are_dendritic_and_save_model_writes_a_model_card(tmp_path):
    trainer = scripted(tmp_path, [1.0, 1.0, 1.0, 0.9], max_steps=16, save_strategy="steps", save_steps=8)
    trainer.train()
    before, after = tmp_path / "checkpoint-8", tmp_path / "checkpoint-16"
    assert set(json.loads((before / DENDRITE_CONFIG_NAME).read_text())["layers"].values()) == {0}
    assert set(json.loads((after / DENDRITE_CONFIG_NAME).read_text())["layers"].values()) == {1}
    for folder in (before, after):
        assert {"config.json", "model.safetensors", "optimizer.pt", "trainer_state.json", DENDRITE_SCHEDULE_NAME} <= set(os.listdir(folder))
    # push_to_hub() writes the Trainer's model card: it must be the dendritic one.
    trainer.create_model_card(tags="demo")
    card = (tmp_path / "README.md").read_text()
    assert "hf_dendrites" in card and "demo" in card
    # The base weights load into the plain transformers class.
    plain = transformers.BertForSequenceClassification.from_pretrained(str(after))
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(value, trainer.model.model.state_dict()[name])


# ---------------------------------------------------------------------------------------------- logging, summary, hooks
def test_schedule_decisions_are_logged_at_info_and_the_step_cap_warns(tmp_path, caplog, info_logs):
    """Issue 13: with transformers' logging at info a script sees every decision and its reason, and a warning
    names the flag to raise when the step cap stops training before the schedule completes."""
    trainer = scripted(tmp_path, [1.0, 2.0, 2.0, 3.0, 3.0], max_steps=20)
    trainer.train()
    text = "\n".join(info_logs())
    assert "plateaued after 2 evaluation(s) without improvement (best 1 at step 4): growing dendrites for cycle 1" in text
    assert "Restored the last accepted best model: the weights of step 4 (eval_scripted=1.0, 0 dendrites)" in text
    assert "Grew 1 dendrite(s) in each of 7 layers" in text
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("hf_dendrites") and r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "the `max_steps` cap" in warnings[0] and "Raise `max_steps`" in warnings[0]

    summary = trainer.model.training_summary
    assert summary["stopped_by_cap"] and not summary["completed"]
    assert [(c["cycle"], c["try"], c["status"]) for c in summary["cycles"]] == [(0, 1, "kept"), (1, 1, "cut short")]
    assert summary["cycles"][0]["best_step"] == 4 and summary["cycles"][1]["num_dendrites"] == 7
    assert summary["hyperparameters"]["training_steps"] == 20

    # At transformers' verbosity for tests (error), the library's info lines are off again.
    transformers.logging.set_verbosity_error()
    follow_transformers_verbosity()
    assert logging.getLogger("hf_dendrites").getEffectiveLevel() == logging.ERROR


def test_model_init_and_the_hooks_for_hyperparameter_search(tmp_path):
    trainer = DendriticTrainer(
        args=make_args(str(tmp_path), metric_for_best_model="scripted", greater_is_better=False, max_dendrite_cycles=1),
        model_init=lambda: tiny_bert(), train_dataset=task_data(128, 1), eval_dataset=task_data(64, 2), dendrite_config=all_linear(),
        compute_metrics=ScriptedMetric([1.0, 1.0, 1.0, 0.9, 0.9, 0.9]),
    )
    assert isinstance(trainer.model, DendriticModel) and trainer.dendrite_config == all_linear()
    assert trainer.dendrite_best_score is None
    trainer.train()  # model_init builds a fresh model, converted with dendrite_config
    assert [a for _, a in decisions(trainer) if a != "continue"] == ["grow", "complete"]
    assert trainer.dendrite_best_score == 0.9 and set(trainer.model.dendrite_counts().values()) == {1}

    unseeded = DendriticTrainer(
        tiny_bert(), make_args(str(tmp_path / "b"), seed=5), train_dataset=task_data(16, 1), eval_dataset=task_data(16, 2),
        dendrite_config=DendriteConfig(target_modules="all-linear"),
    )
    converted = unseeded.to_dendritic_model(tiny_bert(seed=1))
    assert isinstance(converted, DendriticModel) and converted.dendrite_config.dendrite_seed == 5
    assert unseeded.to_dendritic_model(converted) is converted

    trainer.reset_dendrite_schedule()
    assert trainer.dendrite_history == [] and trainer.dendrite_schedule.num_evaluations == 0
    assert trainer.dendrite_best_score is None and trainer.dendrite_callback.accepted is None


def test_several_evaluation_sets_feed_the_schedule_from_the_one_the_metric_names(tmp_path):
    # The Trainer evaluates each set separately (one `on_evaluate` each); only set "b" carries the score.
    trainer = DendriticTrainer(
        tiny_bert(), make_args(str(tmp_path), max_steps=8, metric_for_best_model="eval_b_loss"),
        train_dataset=task_data(64, 1), eval_dataset={"a": task_data(16, 2), "b": task_data(16, 3)},
        dendrite_config=all_linear(),
    )
    trainer.train()
    assert [r["step"] for r in trainer.dendrite_history] == [4, 8]
    b_losses = [e["eval_b_loss"] for e in trainer.state.log_history if "eval_b_loss" in e]
    assert [r["score"] for r in trainer.dendrite_history] == pytest.approx(b_losses)


def test_each_search_trial_writes_its_report_into_its_own_run_folder(tmp_path):
    """Issue 11: the evaluation CSV and curve of a trial go to output_dir/run-<n>, not over the previous trial's."""
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    scores = {0: [1.0, 1.0, 1.0, 0.9, 0.9, 0.9], 1: [2.0, 2.0, 2.0]}
    trial_scores = []

    def model_init(trial):
        trial_scores.append(ScriptedMetric(scores[len(trial_scores) % 2]))
        return tiny_bert()

    trainer = DendriticTrainer(
        args=make_args(str(tmp_path), metric_for_best_model="scripted", greater_is_better=False, max_dendrite_cycles=1),
        model_init=model_init, train_dataset=task_data(128, 1), eval_dataset=task_data(64, 2),
        dendrite_config=all_linear(), compute_metrics=lambda pred: trial_scores[-1](pred),
    )
    trial_scores.clear()  # the first model_init call (in __init__) is not a trial
    trainer.hyperparameter_search(hp_space=lambda trial: {"learning_rate": trial.suggest_float("learning_rate", 1e-3, 1e-2)}, n_trials=2)
    assert not (tmp_path / DENDRITE_EVAL_CSV_NAME).exists()
    reports = {}
    for number in (0, 1):
        with open(tmp_path / f"run-{number}" / DENDRITE_EVAL_CSV_NAME, newline="") as handle:
            reports[number] = [float(r["score"]) for r in csv.DictReader(handle)]
        assert (tmp_path / f"run-{number}" / DENDRITE_CURVE_NAME).is_file()
    assert reports[0] == scores[0] and set(reports[1]) == {2.0}
