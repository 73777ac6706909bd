"""The phase state machine alone (docs/schedule.md), without torch or training."""

import json
import math

import pytest

from hf_dendrites.schedule import (
    PHASE_DENDRITE,
    PHASE_NEURON,
    Action,
    Decision,
    DendriteSchedule,
    ScheduleSettings,
)


def run(schedule, scores, start=0, every=10):
    """Feed scores at steps start+every, start+2*every, ...; returns the actions as strings."""
    return [schedule.step(s, start + every * (i + 1)).action.value for i, s in enumerate(scores)]


def test_docstring_example_and_phase_bookkeeping():
    s = DendriteSchedule(ScheduleSettings(patience=1, max_cycles=1, greater_is_better=False))
    assert run(s, [1.0, 0.8, 0.8]) == ["continue", "continue", "grow"]
    assert (s.cycle, s.attempt, s.phase, s.phase_start_step) == (1, 1, PHASE_NEURON, 30)
    assert s.accepted_best == 0.8 and s.accepted_best_step == 20 and s.accepted_cycle == 0
    assert run(s, [0.5, 0.5], start=30) == ["continue", "complete"]
    assert s.done and s.accepted_best == 0.5 and s.accepted_cycle == 1
    assert [(h.cycle, h.attempt, h.accepted, h.best_score, h.best_step) for h in s.history] == [
        (0, 1, True, 0.8, 20),
        (1, 1, True, 0.5, 40),
    ]
    with pytest.raises(RuntimeError, match="complete"):
        s.step(0.1, 100)


def test_improvement_needs_relative_threshold_and_absolute_epsilon():
    s = DendriteSchedule(ScheduleSettings(improvement_threshold=0.1, improvement_epsilon=0.05, greater_is_better=False))
    assert s.is_improvement(1.0, None)
    assert not s.is_improvement(0.95, 1.0)  # 5 % < 10 % relative
    assert s.is_improvement(0.89, 1.0)  # 11 % relative and 0.11 absolute
    assert not s.is_improvement(0.0889, 0.1)  # 11 % relative, but only 0.011 absolute
    assert not s.is_improvement(float("nan"), 1.0)
    up = DendriteSchedule(ScheduleSettings(improvement_threshold=0.0, improvement_epsilon=0.0, greater_is_better=True))
    assert up.is_improvement(0.51, 0.5) and not up.is_improvement(0.5, 0.5) and not up.is_improvement(0.49, 0.5)
    # Negative references (e.g. log-likelihoods) use |reference|.
    assert up.is_improvement(-0.9, -1.0) and not up.is_improvement(-1.1, -1.0)


def test_patience_counts_evaluations_without_significant_improvement():
    # Tiny improvements do not reset patience, but they do move the raw best (the weights kept).
    s = DendriteSchedule(ScheduleSettings(patience=3, improvement_threshold=0.01, max_cycles=1))
    decisions = [s.step(v, i) for i, v in enumerate([1.0, 0.999, 0.998, 0.997])]
    assert [d.action for d in decisions] == [Action.CONTINUE] * 3 + [Action.GROW]
    assert [d.new_best for d in decisions] == [True, True, True, True]
    assert decisions[-1].cycle_accepted is True and s.accepted_best == 0.997


def test_patience_and_thresholds_indexed_by_cycle_last_entry_repeats():
    settings = ScheduleSettings(patience=[1, 2], improvement_threshold=[0.0, 0.5], max_cycles=5)
    assert [settings.patience_for(c) for c in range(4)] == [1, 2, 2, 2]
    assert [settings.threshold_for(c) for c in range(3)] == [0.0, 0.5, 0.5]
    assert settings.epsilon_for(7) == 0.0
    s = DendriteSchedule(settings)
    assert run(s, [1.0, 1.0]) == ["continue", "grow"]  # patience 1 in cycle 0
    # Cycle 1: patience 2 and a 50 % relative threshold, so neither 0.9 nor 0.8 improves on 1.0; and the cycle's
    # best (0.8) is not 50 % better than the accepted 1.0 either: the cycle is discarded.
    assert run(s, [1.0, 0.9], start=20) == ["continue", "continue"]
    assert s.evals_without_improvement == 1
    assert run(s, [0.8], start=40) == ["retry"]


def test_rejected_cycle_is_retried_then_training_completes():
    s = DendriteSchedule(ScheduleSettings(patience=1, max_cycles=3, max_tries=2, improvement_threshold=0.0))
    assert run(s, [1.0, 1.0]) == ["continue", "grow"]
    d = [s.step(v, 30 + i) for i, v in enumerate([1.2, 1.2])]
    assert [x.action for x in d] == [Action.CONTINUE, Action.RETRY] and d[-1].cycle_accepted is False
    assert (s.cycle, s.attempt, s.cycle_best) == (1, 2, None)
    assert run(s, [1.1, 1.1], start=40) == ["continue", "complete"]
    assert s.done and s.accepted_best == 1.0 and s.accepted_cycle == 0
    assert [(h.cycle, h.attempt, h.accepted) for h in s.history] == [(0, 1, True), (1, 1, False), (1, 2, False)]


def test_retry_that_beats_the_best_is_accepted_and_growth_continues():
    s = DendriteSchedule(ScheduleSettings(patience=1, max_cycles=2, max_tries=3, improvement_threshold=0.0))
    run(s, [1.0, 1.0])
    assert run(s, [1.5, 1.5], start=20) == ["continue", "retry"]
    assert run(s, [0.7, 0.7], start=40) == ["continue", "grow"]
    assert (s.cycle, s.attempt, s.accepted_best, s.accepted_cycle) == (2, 1, 0.7, 1)


def test_max_cycles_zero_is_early_stopping():
    s = DendriteSchedule(ScheduleSettings(patience=2, max_cycles=0))
    assert run(s, [3.0, 2.0, 2.5, 2.4]) == ["continue", "continue", "continue", "complete"]
    assert s.accepted_best == 2.0 and s.accepted_best_step == 20


def test_dendrites_only_phase_then_neuron_phase():
    s = DendriteSchedule(ScheduleSettings(patience=1, max_cycles=1, dendrites_only_phase=True, improvement_threshold=0.0))
    assert s.phase == PHASE_NEURON  # cycle 0 trains the network as given
    assert run(s, [1.0, 1.0]) == ["continue", "grow"]
    assert s.phase == PHASE_DENDRITE and s.phase_start_step == 20
    d = [s.step(v, 30 + 10 * i) for i, v in enumerate([0.9, 0.95])]
    assert [x.action for x in d] == [Action.CONTINUE, Action.SWITCH]
    assert d[-1].cycle_accepted is None and s.phase == PHASE_NEURON and s.phase_start_step == 40
    assert s.cycle_best == 0.9  # the cycle's best survives the phase switch
    d = [s.step(v, 50 + 10 * i) for i, v in enumerate([0.92, 0.93])]
    assert [x.action for x in d] == [Action.CONTINUE, Action.COMPLETE]
    assert [x.new_best for x in d] == [False, False]
    assert s.accepted_best == 0.9 and s.accepted_best_step == 30


def test_greater_is_better():
    s = DendriteSchedule(ScheduleSettings(patience=1, max_cycles=1, greater_is_better=True, improvement_threshold=0.0))
    assert run(s, [0.5, 0.6, 0.6]) == ["continue", "continue", "grow"]
    assert run(s, [0.55, 0.55], start=30) == ["continue", "retry"]
    assert run(s, [0.7, 0.7], start=50) == ["continue", "complete"]
    assert s.accepted_best == 0.7


def test_non_finite_scores_never_improve_nor_become_best():
    s = DendriteSchedule(ScheduleSettings(patience=2, max_cycles=1))
    d = [s.step(v, i) for i, v in enumerate([float("nan"), 1.0, float("inf"), float("nan")])]
    assert [x.new_best for x in d] == [False, True, False, False]
    assert d[-1].action is Action.GROW and s.accepted_best == 1.0


def test_json_round_trip_mid_run_takes_the_same_decisions():
    settings = ScheduleSettings(patience=[2, 1], improvement_threshold=[0.01, 0.02], max_cycles=3, max_tries=2, dendrites_only_phase=True)
    scores = [1.0, 0.9, 0.91, 0.9, 0.85, 0.86, 0.8, 0.81, 0.79, 0.8, 0.795, 0.8, 0.7, 0.75, 0.72, 0.71, 0.69, 0.7, 0.7, 0.68, 0.68, 0.6]

    def feed(schedule, start):
        return [schedule.step(v, start + i).to_dict() for i, v in enumerate(scores[start:]) if not schedule.done]

    reference = DendriteSchedule(settings)
    expected = feed(reference, 0)
    actions = [e["action"] for e in expected]
    assert {"grow", "switch", "retry"} <= set(actions) and actions[-1] == "complete"
    for cut in range(len(expected)):
        s = DendriteSchedule(settings)
        got = [s.step(v, i).to_dict() for i, v in enumerate(scores[:cut])]
        s = DendriteSchedule.from_dict(json.loads(json.dumps(s.to_dict())))
        got += feed(s, cut)
        assert got == expected
        assert s == reference


def test_decision_round_trip_and_settings_lists_stay_json():
    d = Decision(Action.RETRY, True, False, "msg")
    assert Decision.from_dict(json.loads(json.dumps(d.to_dict()))) == d
    settings = ScheduleSettings(patience=[3, 2], improvement_threshold=0.1)
    data = settings.to_dict()
    assert data["patience"] == [3, 2] and data["improvement_threshold"] == [0.1]
    assert ScheduleSettings.from_dict(json.loads(json.dumps(data))) == settings


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"patience": 0}, "patience"),
        ({"patience": [2, 0]}, "patience"),
        ({"patience": []}, "patience"),
        ({"patience": 1.5}, "integers"),
        ({"improvement_threshold": -0.1}, "finite and >= 0"),
        ({"improvement_epsilon": math.inf}, "finite and >= 0"),
        ({"max_cycles": -1}, "max_cycles"),
        ({"max_tries": 0}, "max_tries"),
        ({"max_tries": True}, "max_tries"),
    ],
)
def test_invalid_settings_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ScheduleSettings(**kwargs)


def test_state_from_a_newer_library_is_refused():
    data = DendriteSchedule().to_dict()
    with pytest.raises(ValueError, match="upgrade"):
        DendriteSchedule.from_dict({**data, "format_version": 99})
    with pytest.raises(ValueError, match="Unknown"):
        DendriteSchedule.from_dict({**data, "state": {**data["state"], "future_field": 1}})
    with pytest.raises(ValueError, match="phase"):
        DendriteSchedule.from_dict({**data, "state": {**data["state"], "phase": "sleep"}})


def test_module_has_no_torch_dependency():
    from pathlib import Path

    from hf_dendrites import schedule

    source = Path(schedule.__file__).read_text(encoding="utf-8")
    assert "import torch" not in source and "from torch" not in source


def test_replayed_restart_steps_end_cycles_at_those_steps_only():
    s = DendriteSchedule(ScheduleSettings(patience=1, max_cycles=1, max_tries=1, restart_steps=[30, 60]))
    # No plateau ends a cycle (patience 1, constant scores), max_cycles / max_tries do not stop the replay.
    assert run(s, [1.0, 0.9, 0.9, 0.95, 0.95, 0.95]) == ["continue", "continue", "grow", "continue", "continue", "retry"]
    assert (s.cycle, s.attempt, s.accepted_best, s.done) == (1, 2, 0.9, False)
    assert s.step(0.8, 70).action is Action.CONTINUE
    final = s.step(0.85, 80, final=True)  # the end of training judges the last cycle
    assert final.action is Action.COMPLETE and final.cycle_accepted and s.done and s.accepted_best == 0.8
    assert [(h.cycle, h.attempt, h.accepted, h.end_step) for h in s.history] == [(0, 1, True, 30), (1, 1, False, 60), (1, 2, True, 80)]
    # a final step without improvement completes with the model accepted before
    t = DendriteSchedule(ScheduleSettings(restart_steps=[10]))
    assert [t.step(v, k).action.value for k, v in ((10, 1.0), (20, 2.0))] == ["grow", "continue"]
    assert t.step(2.0, 30, final=True).cycle_accepted is False and t.done and t.accepted_best == 1.0


def test_lr_search_probes_every_candidate_then_keeps_the_best():
    s = DendriteSchedule(ScheduleSettings(patience=1, max_cycles=2, lr_search=[1.0, 0.1, 0.01]))
    assert run(s, [1.0, 1.0]) == ["continue", "grow"] and s.lr_factor == 1.0
    # candidate 0 best 0.7, candidate 1 best 0.6 (the best), candidate 2 best 0.65
    d0 = [s.step(v, k) for k, v in ((30, 0.7), (40, 0.7))]
    assert [d.action for d in d0] == [Action.CONTINUE, Action.NEXT_LR] and d0[1].lr_best_so_far
    assert s.lr_index == 1 and s.lr_factor == 0.1 and s.cycle_best is None and s.cycle == 1 and s.attempt == 1
    d1 = [s.step(v, k) for k, v in ((50, 0.6), (60, 0.6))]
    assert d1[1].action is Action.NEXT_LR and d1[1].lr_best_so_far and s.lr_factor == 0.01
    d2 = [s.step(v, k) for k, v in ((70, 0.65), (80, 0.65))]
    assert d2[1].action is Action.GROW and d2[1].lr_pick == 1 and d2[1].cycle_accepted
    assert "keeping 0.1" in d2[1].message and s.accepted_best == 0.6 and s.accepted_best_step == 50
    record = s.history[1]
    assert (record.start_step, record.end_step, record.best_score, record.best_step, record.lr_pick) == (20, 80, 0.6, 50, 1)
    assert [c["factor"] for c in record.lr_candidates] == [1.0, 0.1, 0.01]
    assert (s.cycle, s.lr_index, s.lr_factor, s.lr_results) == (2, 0, 1.0, [])
    # cycle 0 never searches; a JSON round trip mid-search takes the same decisions
    s.step(0.5, 90)
    s.step(0.5, 100)
    copy = DendriteSchedule.from_dict(json.loads(json.dumps(s.to_dict())))
    assert copy == s and copy.lr_index == 1 and copy.lr_results == s.lr_results
    assert copy.step(0.55, 110).to_dict() == s.step(0.55, 110).to_dict()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"restart_steps": [0]}, "restart_steps"),
        ({"restart_steps": [10, 10]}, "distinct"),
        ({"lr_search": [1.0, 0.0]}, "lr_search"),
        ({"lr_search": [1.0], "restart_steps": [10]}, "cannot be combined"),
    ],
)
def test_invalid_recipe_settings_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ScheduleSettings(**kwargs)
