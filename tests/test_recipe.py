"""The growth recipe of DendriticTrainer (issue 12): restarts-only mode and replayed growth steps, per-cycle LR
schedules, ReduceLROnPlateau across growths, the LR search after growth, and the attribution of kept cycles.

Real (tiny) BERT, real Trainer loops and checkpoints; `ScriptedMetric` drives the schedule through chosen decisions
where the test is about what the trainer does at a decision rather than about the decision itself.
"""

import json
import logging

import pytest
import torch
import transformers
from dendritic_task import ScriptedMetric, all_linear, make_args, state_of, task_data, tiny_bert
from transformers import TrainerCallback

from hf_dendrites import DendriteConfig, DendriticTrainer, DendriticTrainingArguments, get_dendritic_model
from hf_dendrites.callback import NEGLIGIBLE_DENDRITE_WEIGHT
from hf_dendrites.constants import DENDRITE_SCHEDULE_NAME
from hf_dendrites.trainer import PhaseReduceLROnPlateau


def make_trainer(output_dir, model=None, callbacks=None, compute_metrics=None, **overrides):
    return DendriticTrainer(
        tiny_bert() if model is None else model,
        make_args(str(output_dir), **overrides),
        train_dataset=task_data(128, 1),
        eval_dataset=task_data(64, 2),
        dendrite_config=all_linear(),
        compute_metrics=compute_metrics,
        callbacks=callbacks,
    )


def scripted(output_dir, scores, callbacks=None, **overrides):
    kwargs = {"metric_for_best_model": "scripted", "greater_is_better": False}
    kwargs.update(overrides)
    return make_trainer(output_dir, compute_metrics=ScriptedMetric(scores), callbacks=callbacks, **kwargs)


def decisions(trainer):
    return [(r["step"], r["decision"]) for r in trainer.dendrite_history]


def lrs(trainer):
    """The learning rate each optimizer step used (logging_steps=1), by global step."""
    return {e["step"]: e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e}


class _Recorder(TrainerCallback):
    """Weights and optimizer state at every evaluation (before the schedule acts on it) and after every event."""

    def __init__(self):
        self.trainer = None
        self.at_eval = {}
        self.after_event = []

    def on_evaluate(self, args, state, control, **kwargs):
        self.at_eval[state.global_step] = state_of(self.trainer.model)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "dendrite_event" in logs:
            t = self.trainer
            self.after_event.append(
                {"step": state.global_step, "event": logs["dendrite_event"], "state": state_of(t.model),
                 "optimizer_state": len(t.optimizer.state), "lr": [g["lr"] for g in t.optimizer.param_groups]}
            )


def with_recorder(factory, *args, **kwargs):
    recorder = _Recorder()
    trainer = factory(*args, callbacks=[recorder], **kwargs)
    recorder.trainer = trainer
    return trainer, recorder


def assert_same_state(got, expected):
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)


class _Interrupted(Exception):
    pass


class _CrashWhen(TrainerCallback):
    """Simulates a crash right after the first checkpoint written when `condition(trainer)` holds."""

    def __init__(self, condition):
        self.condition = condition
        self.trainer = None
        self.crashed_at = None

    def on_save(self, args, state, control, **kwargs):
        if self.condition(self.trainer):
            self.crashed_at = state.global_step
            raise _Interrupted()


def assert_resume_is_exact(tmp_path, condition, **overrides):
    """Train uninterrupted; train again, crash at the first checkpoint where `condition` holds, resume in a fresh
    trainer with another model init; both runs must take the same decisions and end with the same weights."""
    common = {"save_strategy": "steps", "save_steps": 4, "logging_steps": 1, **overrides}
    reference = make_trainer(tmp_path / "uninterrupted", **common)
    reference.train()
    crash = _CrashWhen(condition)
    crashing = make_trainer(tmp_path / "run", callbacks=[crash], **common)
    crash.trainer = crashing
    with pytest.raises(_Interrupted):
        crashing.train()
    resumed = make_trainer(tmp_path / "run", model=tiny_bert(seed=123), **common)
    resumed.train(resume_from_checkpoint=True)
    assert decisions(resumed) == decisions(reference)
    assert [r["score"] for r in resumed.dendrite_history] == pytest.approx([r["score"] for r in reference.dendrite_history], abs=1e-6)
    assert lrs(resumed) == pytest.approx(lrs(reference), rel=1e-6)
    assert resumed.model.dendrite_counts() == reference.model.dendrite_counts()
    expected, got = state_of(reference.model), state_of(resumed.model)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)
    return reference, crash.crashed_at


# ---------------------------------------------------------------------------------------------- restarts only
def test_restarts_only_runs_every_growth_event_without_adding_dendrites(tmp_path):
    # Cycle 0 plateaus at step 12, cycle 1 (kept) at 24, cycle 2 is discarded at 36, its retry ends the run at 48.
    scores = [1.0, 1.0, 1.0, 0.9, 0.9, 0.9, 0.95, 0.95, 0.95, 0.95, 0.95, 0.95]
    dendritic = scripted(tmp_path / "dendrites", scores, lr_scheduler_type="linear", max_steps=80, logging_steps=1)
    dendritic.train()
    trainer, recorder = with_recorder(scripted, tmp_path / "restarts", scores, lr_scheduler_type="linear", max_steps=80,
                                      logging_steps=1, dendrite_restarts_only=True)
    trainer.train()

    # The same keep/discard decisions as the dendritic run, at the same steps ...
    assert decisions(trainer) == decisions(dendritic)
    assert [a for _, a in decisions(trainer) if a != "continue"] == ["grow", "grow", "retry", "complete"]
    # ... but no dendrite was ever added.
    assert all(r["num_dendrites"] == 0 for r in trainer.dendrite_history)
    assert sum(trainer.model.dendrite_counts().values()) == 0
    assert sum(dendritic.model.dendrite_counts().values()) > 0
    # At every event: the best weights restored, a fresh optimizer (no state) at the full learning rate.
    best_step = {12: 4, 24: 16, 36: 16}  # the accepted best at each event
    for event in recorder.after_event[:3]:
        assert_same_state(event["state"], recorder.at_eval[best_step[event["step"]]])
        assert event["optimizer_state"] == 0 and event["lr"] == [3e-3, 3e-3]
    lr = lrs(trainer)
    assert lr[13] == lr[25] == lr[37] == pytest.approx(3e-3)  # the LR schedule restarts at every event
    summary = trainer.model.training_summary
    assert summary["schedule"]["restarts_only"] and [c["status"] for c in summary["cycles"]] == ["kept", "kept", "discarded", "discarded"]
    assert all(c["dendrite_weight"] is None for c in summary["cycles"])  # nothing to attribute without dendrites


def test_replayed_restart_steps_happen_at_exactly_those_steps_and_training_runs_to_max_steps(tmp_path):
    # Constant scores: with plateaus, patience 2 would grow at step 12. Replayed, events happen at 8 and 20 only.
    trainer = scripted(tmp_path, [1.0, 0.9, 0.95, 0.95, 0.96, 0.8, 0.8], max_steps=26, dendrite_restarts_only=True,
                       dendrite_restart_steps=[20, 8], max_dendrite_cycles=0, max_dendrite_tries=1)
    assert trainer.args.dendrite_restart_steps == [8, 20]
    trainer.train()
    # 8: cycle 0 ends (kept) -> restart; 20: cycle 1 (best 0.95) did not beat 0.9 -> discarded, restart from the
    # step-8 weights; 26 = max_steps (no evaluation step: one is added) ends the run and judges the last cycle.
    assert [d for d in decisions(trainer) if d[1] != "continue"] == [(8, "grow"), (20, "retry"), (26, "complete")]
    assert trainer.state.global_step == 26 and trainer.dendrite_schedule.done
    assert [(h.cycle, h.attempt, h.accepted) for h in trainer.dendrite_schedule.history] == [(0, 1, True), (1, 1, False), (1, 2, True)]
    assert trainer.dendrite_best_score == 0.8

    with pytest.raises(ValueError, match=r"\[6\] are not evaluation steps"):
        scripted(tmp_path / "bad", [1.0], max_steps=26, dendrite_restart_steps=[6, 8]).train()
    with pytest.raises(ValueError, match="restart_steps"):
        make_args(str(tmp_path), dendrite_restart_steps=[0])
    with pytest.raises(ValueError, match="cannot be combined"):
        make_args(str(tmp_path), dendrite_restart_steps=[8], dendrite_lr_search=[1.0, 0.1])
    with pytest.raises(ValueError, match="dendrites_only_phase=False"):
        make_args(str(tmp_path), dendrite_restarts_only=True, dendrites_only_phase=True)


def test_recipe_arguments_parse_from_the_command_line(tmp_path):
    parser = transformers.HfArgumentParser((DendriteConfig, DendriticTrainingArguments))
    common = ["--output_dir", str(tmp_path), "--eval_strategy", "steps"]
    _, args = parser.parse_args_into_dataclasses(common + ["--dendrite_restarts_only", "--dendrite_restart_steps", "40", "20"])
    assert args.dendrite_restarts_only and args.dendrite_restart_steps == [20, 40] and args.dendrite_lr_search is None
    _, args = parser.parse_args_into_dataclasses(common + ["--dendrite_cycle_steps", "50", "--dendrite_lr_search", "1", "0.1"])
    assert args.dendrite_cycle_steps == 50 and args.dendrite_lr_search == [1.0, 0.1] and args.dendrite_restart_steps is None


# ---------------------------------------------------------------------------------------------- LR schedules
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_cycle_steps_fix_the_length_of_every_restarted_schedule(tmp_path, kind):
    trainer = scripted(tmp_path, [1.0, 1.0, 1.0, 0.9, 0.8, 0.7, 0.6], max_steps=1000, lr_scheduler_type=kind,
                       learning_rate=1e-2, logging_steps=1, dendrite_cycle_steps=6, max_dendrite_cycles=1)
    trainer.train()
    assert decisions(trainer)[2] == (12, "grow")
    lr = lrs(trainer)
    # lr[k] is the rate of step k, i.e. the schedule at k - 1 steps into its cycle
    shape = {"linear": lambda t: (6 - t) / 6, "cosine": lambda t: 0.5 * (1 + torch.cos(torch.tensor(torch.pi * t / 6)).item())}[kind]
    for start in (0, 12):  # cycle 0 and the cycle after the growth: the same 6-step decay, whatever max_steps is
        for t in range(6):
            assert lr[start + 1 + t] == pytest.approx(1e-2 * shape(t), abs=1e-9)
        for t in range(6, 12):  # then it stays at its end value (a cosine would rise again)
            assert lr[start + 1 + t] == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="needs dendrite_lr_schedule='restart'"):
        make_args(str(tmp_path), dendrite_cycle_steps=10, dendrite_lr_schedule="continue")


@pytest.mark.parametrize("mode", ["restart", "continue"])
def test_reduce_lr_on_plateau_drops_inside_a_phase_and_resets_at_growth(tmp_path, mode):
    # Cycle 0: best 0.5 at step 4, then 0.8: the plateau scheduler halves the LR at steps 8 and 12; growth at 16.
    trainer = scripted(tmp_path, [0.5, 0.8, 0.8, 0.8, 0.9, 0.9, 0.9], max_steps=28, learning_rate=1e-2, logging_steps=1,
                       dendrite_patience=[3], lr_scheduler_type="reduce_lr_on_plateau", dendrite_lr_schedule=mode,
                       lr_scheduler_kwargs={"patience": 0, "factor": 0.5})
    trainer.train()
    assert decisions(trainer)[3] == (16, "grow")
    lr = lrs(trainer)
    assert (lr[8], lr[9], lr[13], lr[16]) == pytest.approx((1e-2, 5e-3, 2.5e-3, 2.5e-3))
    if mode == "restart":
        # Cycle 1 starts at the full LR with a fresh scheduler; the growth step's own score (0.8, of the model before
        # the growth) does not count as the new phase's first: its 0.9 at step 20 is, so the LR halves at 24 only.
        assert (lr[17], lr[21], lr[24], lr[25]) == pytest.approx((1e-2, 1e-2, 1e-2, 5e-3))
    else:  # one plateau scheduler over the run: the LR goes on from 2.5e-3 and halves at every evaluation
        assert (lr[17], lr[21], lr[25]) == pytest.approx((1.25e-3, 6.25e-4, 3.125e-4))
    assert isinstance(trainer.lr_scheduler, PhaseReduceLROnPlateau) and trainer.lr_scheduler.mode == "min"
    accuracy = make_trainer(tmp_path / "acc", lr_scheduler_type="reduce_lr_on_plateau", metric_for_best_model="accuracy")
    accuracy.create_optimizer()
    assert accuracy.create_scheduler(10).mode == "max"  # follows greater_is_better unless lr_scheduler_kwargs sets it


def test_reduce_lr_on_plateau_resumes_exactly_after_a_growth(tmp_path):
    reference, crashed_at = assert_resume_is_exact(
        tmp_path, lambda t: t.dendrite_schedule.cycle >= 1, lr_scheduler_type="reduce_lr_on_plateau",
        lr_scheduler_kwargs={"patience": 0, "factor": 0.5}, learning_rate=1e-2,
    )
    grow = next(step for step, a in decisions(reference) if a == "grow")
    assert crashed_at == grow
    lr = lrs(reference)
    assert min(v for s, v in lr.items() if s <= grow) < 1e-2 and lr[grow + 1] == pytest.approx(1e-2)


# ---------------------------------------------------------------------------------------------- LR search
def test_lr_search_trains_each_candidate_from_the_post_growth_weights_and_keeps_the_best(tmp_path, info_logs):
    # Cycle 0 plateaus at 12. Candidate 1 (factor 1) is best at 16 (0.9), plateaus at 24; candidate 2 (factor 0.1)
    # restarts from the post-growth weights, reaches 0.95 only and plateaus at 36: candidate 1's weights are kept.
    scores = [1.0, 1.0, 1.0, 0.9, 0.92, 0.92, 0.95, 0.95, 0.95]
    trainer, recorder = with_recorder(scripted, tmp_path, scores, learning_rate=1e-2, logging_steps=1, max_steps=200,
                                      max_dendrite_cycles=1, dendrite_lr_search=[1.0, 0.1])
    trainer.train()
    assert [d for d in decisions(trainer) if d[1] != "continue"] == [(12, "grow"), (24, "next_lr"), (36, "complete")]
    grow, next_lr, complete = recorder.after_event
    assert (grow["event"], next_lr["event"]) == (1, 5)
    # The second candidate starts from exactly the weights the growth produced, with a fresh optimizer at 0.1 x LR.
    assert_same_state(next_lr["state"], grow["state"])
    assert next_lr["optimizer_state"] == 0 and next_lr["lr"] == pytest.approx([1e-3, 1e-3])
    lr = lrs(trainer)
    assert lr[13] == pytest.approx(1e-2) and lr[25] == pytest.approx(1e-3)
    assert [r["lr_factor"] for r in trainer.dendrite_history] == [1.0] * 3 + [1.0] * 3 + [0.1] * 3
    # The winner's best weights (step 16) are the final model, with the dendrites it grew.
    assert_same_state(state_of(trainer.model), recorder.at_eval[16])
    assert trainer.dendrite_best_score == 0.9 and sum(trainer.model.dendrite_counts().values()) > 0
    # Every candidate is in the history, the summary and the log.
    cycle = trainer.dendrite_schedule.history[1]
    assert cycle.lr_pick == 0 and cycle.best_score == 0.9 and cycle.best_step == 16 and cycle.accepted
    assert [(c["factor"], c["best_score"], c["best_step"]) for c in cycle.lr_candidates] == [(1.0, 0.9, 16), (0.1, 0.95, 28)]
    summary = trainer.model.training_summary
    assert summary["cycles"][1]["lr_candidates"] == cycle.lr_candidates and summary["cycles"][1]["lr_pick"] == 0
    assert summary["schedule"]["lr_search"] == [1.0, 0.1]
    text = "\n".join(r.getMessage() for r in info_logs())
    assert "with LR factor 1 (best 0.9): trying LR factor 0.1 from the post-growth weights" in text
    assert "(LR factors 1: 0.9, 0.1: 0.95; keeping 1)" in text
    events = [e for e in trainer.state.log_history if e.get("dendrite_event") == 5]
    assert len(events) == 1 and events[0]["dendrite_lr_factor"] == 0.1


def test_lr_search_resumes_exactly_from_a_checkpoint_of_the_second_candidate(tmp_path):
    reference, crashed_at = assert_resume_is_exact(
        tmp_path, lambda t: t.dendrite_schedule.lr_index == 1, dendrite_lr_search=[1.0, 0.3], max_dendrite_cycles=1,
    )
    next_lr = next(step for step, a in decisions(reference) if a == "next_lr")
    assert crashed_at == next_lr
    saved = json.loads((tmp_path / "run" / f"checkpoint-{next_lr}" / DENDRITE_SCHEDULE_NAME).read_text())
    assert saved["snapshots"]["lr_start"] is not None and saved["schedule"]["state"]["lr_index"] == 1
    assert [c["factor"] for c in reference.dendrite_schedule.history[1].lr_candidates] == [1.0, 0.3]


# ---------------------------------------------------------------------------------------------- attribution
@pytest.mark.parametrize("rank", [None, 2])
def test_dendrite_weight_ratios_measure_the_new_dendrites_against_the_base_weights(rank):
    dm = get_dendritic_model(tiny_bert(), DendriteConfig(target_modules="all-linear", dendrite_seed=0, rank=rank))
    dm.add_dendrites()
    assert set(dm.dendrite_weight_ratios().values()) == {0.0}  # identity at insertion: nothing carried
    before = dm.dendrite_counts()
    dm.add_dendrites()
    name, layer = next(dm.dendritic_layers())
    with torch.no_grad():
        layer.dendrite_out.copy_(torch.tensor([[0.0], [0.5]]).expand_as(layer.dendrite_out))
    if rank is None:
        d_new = layer.dendrite_weight[layer.num_neurons:]
    else:
        a, b = layer.dendrite_lora_A, layer.dendrite_lora_B
        d_new = b[1] @ a[rank:]
    rms = lambda t: t.detach().pow(2).mean().sqrt().item()  # noqa: E731
    expected = 0.5 * rms(d_new) / rms(layer.weight)
    assert dm.dendrite_weight_ratios(first=before)[name] == pytest.approx(expected, rel=1e-5)
    assert dm.dendrite_weight_ratios()[name] == pytest.approx(rms(layer.dendrite_out) * rms(torch.cat([
        layer.dendrite_weight if rank is None else torch.cat([b[k] @ a[k * rank:(k + 1) * rank] for k in range(2)])
    ])) / rms(layer.weight), rel=1e-5)
    # a state dict (e.g. a snapshot) is measured without touching the model
    state = {k: v.clone() for k, v in dm.state_dict().items()}
    with torch.no_grad():
        layer.dendrite_out.zero_()
    assert dm.dendrite_weight_ratios(state, first=before)[name] == pytest.approx(expected, rel=1e-5)


def test_a_kept_cycle_whose_dendrites_carry_almost_nothing_is_flagged(tmp_path, info_logs):
    # A learning rate so small that the dendrites cannot move; the scripted scores keep cycle 1 anyway.
    trainer = scripted(tmp_path, [1.0, 1.0, 1.0, 0.9, 0.9, 0.9], learning_rate=1e-7, max_dendrite_cycles=1)
    trainer.train()
    cycle = trainer.model.training_summary["cycles"][1]
    assert cycle["status"] == "kept" and cycle["dendrite_weight"]["max"] < NEGLIGIBLE_DENDRITE_WEIGHT
    assert 0 < cycle["dendrite_weight"]["median"] <= cycle["dendrite_weight"]["max"]
    warnings = [r.getMessage() for r in info_logs() if r.levelno == logging.WARNING]
    assert any("Cycle 1 was kept at step 24, but its dendrites carry almost nothing" in w and "dendrite_restarts_only=True" in w
               for w in warnings), warnings
    row = next(r for r in trainer.dendrite_history if r["step"] == 24)
    assert row["dendrite_weight_max"] == cycle["dendrite_weight"]["max"]
    # The model card's cycle table shows it.
    trainer.save_model(str(tmp_path / "final"))
    card = (tmp_path / "final" / "README.md").read_text()
    assert "| dendrite weight |" in card and f"{cycle['dendrite_weight']['max']:.3g} (median" in card
    assert "more likely due to the restart" in card


def test_dendrites_that_carry_weight_are_not_flagged(tmp_path, info_logs):
    trainer = scripted(tmp_path, [1.0, 1.0, 1.0, 0.9, 0.9, 0.9], learning_rate=3e-2, max_dendrite_cycles=1)
    trainer.train()
    cycle = trainer.model.training_summary["cycles"][1]
    assert cycle["status"] == "kept" and cycle["dendrite_weight"]["max"] >= NEGLIGIBLE_DENDRITE_WEIGHT
    assert not any("carry almost nothing" in r.getMessage() for r in info_logs())
