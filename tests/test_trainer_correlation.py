"""DendriticTrainer with learning_rule="correlation": candidate phases, installation, perforation, resume."""

import csv
import dataclasses
import json

import pytest
import torch
from dendritic_task import make_args, state_of, task_data, tiny_bert
from transformers import TrainerCallback

from hf_dendrites import DendriteConfig, DendriticModel, DendriticTrainer
from hf_dendrites.constants import (
    DENDRITE_CONFIG_NAME,
    DENDRITE_EVAL_CSV_NAME,
    DENDRITE_SCHEDULE_NAME,
)
from hf_dendrites.learning_rules import CandidateOptimizer
from hf_dendrites.trainer_state import DENDRITE_CANDIDATES_NAME


def correlation_config(**overrides):
    return DendriteConfig(target_modules="all-linear", dendrite_seed=0, learning_rule="correlation", candidate_pool_size=3, **overrides)


def make_trainer(output_dir, model=None, callbacks=None, **overrides):
    kwargs = {"correlation_patience": 1, "max_dendrite_cycles": 2, "candidate_learning_rate": 0.02}
    kwargs.update(overrides)
    return DendriticTrainer(
        tiny_bert() if model is None else model,
        make_args(str(output_dir), **kwargs),
        train_dataset=task_data(128, 1),
        eval_dataset=task_data(64, 2),
        dendrite_config=correlation_config(),
        callbacks=callbacks,
    )


class _PhaseProbe(TrainerCallback):
    """Records, at every optimizer step, what trains and with which optimizer."""

    def __init__(self):
        self.trainer = None
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        t = self.trainer
        self.steps.append(
            {
                "candidate_phase": t.dendrite_callback.correlation is not None,
                "candidate_optimizer": isinstance(getattr(t.optimizer, "optimizer", t.optimizer), CandidateOptimizer),
                "model_trainable": sum(p.numel() for p in t.model.parameters() if p.requires_grad),
            }
        )


def test_correlation_rule_end_to_end(tmp_path):
    probe = _PhaseProbe()
    trainer = make_trainer(tmp_path, callbacks=[probe])
    probe.trainer = trainer
    trainer.train()
    history = trainer.dendrite_history
    decisions = [r["decision"] for r in history]

    # grow -> candidate phase (neurons frozen, candidates trained by their own optimizer) -> install -> ...
    assert "grow" in decisions and "install" in decisions and decisions[-1] == "complete"
    assert decisions.index("grow") < decisions.index("install")
    candidate_steps = [s for s in probe.steps if s["candidate_phase"]]
    assert candidate_steps and all(s["candidate_optimizer"] and s["model_trainable"] == 0 for s in candidate_steps)
    neuron_steps = [s for s in probe.steps if not s["candidate_phase"]]
    assert all(not s["candidate_optimizer"] and s["model_trainable"] > 0 for s in neuron_steps)
    correlations = [r["correlation"] for r in history if "correlation" in r]
    assert correlations and all(c > 0 for c in correlations)
    # The candidates climbed their objective S during the first candidate phase (per-batch S is noisy).
    phase_s = [r["correlation"] for r in history[decisions.index("grow") + 1 : decisions.index("install") + 1]]
    assert len(phase_s) >= 2 and max(phase_s[1:]) > phase_s[0]

    # Installed dendrites: input side frozen and perforated, output weights trained away from zero.
    dm = trainer.model
    layers = list(dm.dendritic_layers())
    if sum(dm.dendrite_counts().values()):
        for _, layer in layers:
            if layer.num_dendrites:
                assert layer.dendrite_detach_input
                assert not layer.dendrite_weight.requires_grad and not layer.dendrite_bias.requires_grad
                assert layer.dendrite_out.requires_grad
        assert any(layer.dendrite_out.abs().sum() > 0 for _, layer in layers if layer.num_dendrites)
    assert trainer.dendrite_callback.correlation is None and not any(layer._forward_hooks for _, layer in layers)

    # The CSV has the candidates' S and the plot was written; the saved model records the rule.
    with open(tmp_path / DENDRITE_EVAL_CSV_NAME, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert any(r["correlation"] for r in rows)
    trainer.save_model(str(tmp_path / "final"))
    meta = json.loads((tmp_path / "final" / DENDRITE_CONFIG_NAME).read_text())
    assert meta["dendrite_config"]["learning_rule"] == "correlation"
    reloaded = DendriticModel.from_pretrained(str(tmp_path / "final"))
    assert reloaded.dendrite_config.learning_rule == "correlation"
    assert reloaded.dendrite_counts() == dm.dendrite_counts()


class _Interrupted(Exception):
    pass


class _CrashInCandidatePhase(TrainerCallback):
    def __init__(self):
        self.trainer = None
        self.crashed_at = None

    def on_save(self, args, state, control, **kwargs):
        if self.trainer.dendrite_callback.correlation is not None and self.trainer.dendrite_callback.correlation.history:
            self.crashed_at = state.global_step
            raise _Interrupted()


def test_resume_in_the_middle_of_a_candidate_phase(tmp_path):
    common = {"save_strategy": "steps", "save_steps": 4, "correlation_patience": 2, "max_dendrite_cycles": 1}
    reference = make_trainer(tmp_path / "uninterrupted", **common)
    reference.train()

    crash = _CrashInCandidatePhase()
    crashing = make_trainer(tmp_path / "run", callbacks=[crash], **common)
    crash.trainer = crashing
    with pytest.raises(_Interrupted):
        crashing.train()
    checkpoint = tmp_path / "run" / f"checkpoint-{crash.crashed_at}"
    saved = json.loads((checkpoint / DENDRITE_SCHEDULE_NAME).read_text())
    assert saved["correlation"] is not None and (checkpoint / DENDRITE_CANDIDATES_NAME).is_file()

    resumed = make_trainer(tmp_path / "run", model=tiny_bert(seed=99), **common)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    ref_rows = [(r["step"], r["decision"]) for r in reference.dendrite_history]
    assert [(r["step"], r["decision"]) for r in resumed.dendrite_history] == ref_rows
    got_s = [r.get("correlation") for r in resumed.dendrite_history]
    ref_s = [r.get("correlation") for r in reference.dendrite_history]
    assert [v is None for v in got_s] == [v is None for v in ref_s]  # pytest>=9.2's approx rejects None entries
    assert [v for v in got_s if v is not None] == pytest.approx([v for v in ref_s if v is not None], rel=1e-5)
    assert resumed.model.dendrite_counts() == reference.model.dendrite_counts()
    expected, got = state_of(reference.model), state_of(resumed.model)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)


def test_candidate_phase_cut_short_by_the_step_budget_leaves_a_clean_model(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=12, correlation_patience=50, dendrite_patience=[1])
    trainer.train()
    assert trainer.dendrite_callback.correlation is None
    dm = trainer.model
    assert not any(layer._forward_hooks for _, layer in dm.dendritic_layers())
    assert all(p.requires_grad for p in dm.parameters())
    assert sum(dm.dendrite_counts().values()) == 0


def test_correlation_arguments_are_checked(tmp_path):
    for bad in ({"candidate_learning_rate": 0.0}, {"correlation_patience": 0}, {"correlation_improvement_threshold": -1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            make_args(str(tmp_path), **bad)
    assert dataclasses.fields(make_args(str(tmp_path)))  # defaults are valid
