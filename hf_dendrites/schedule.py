"""The dendrite phase schedule: a pure-Python state machine fed one evaluation score at a time.

It implements ALGORITHM.md section 2 and knows nothing about torch or the Trainer: `DendriticTrainer` feeds it
every evaluation score and carries out what it decides. Its whole state round-trips through JSON
(`to_dict` / `from_dict`), which is what Trainer checkpoints store so that a resumed run takes the same decisions.

Vocabulary:

- A **cycle** is one stretch of training with a fixed set of dendrites. Cycle 0 trains the network as given;
  cycle k >= 1 starts when every dendritic layer grows `dendrites_per_cycle` new dendrites.
- A cycle has one **phase** (`"neuron"`: everything trains), or, with `dendrites_only_phase=True`, first a
  `"dendrite"` phase (only dendrite parameters train, neurons frozen) and then a `"neuron"` phase.
- **Improvement.** A score improves on the phase's reference (its last improving score) only if it beats it both
  by the relative threshold (`delta > threshold * |reference|`) and by the absolute epsilon (`delta > epsilon`).
  After `patience` evaluations in a row without improvement the phase has **plateaued**. The first evaluation of
  a phase always improves (there is no reference yet).
- **Best scores** are raw: the cycle's best is its best score, however small the margin; those are the weights
  the trainer keeps and restores.
- At the plateau of a cycle's last phase the cycle ends. Cycle 0 is always accepted; cycle k >= 1 is accepted
  only if its best score beats the best accepted score before it by the same improvement rule (dendrites must
  earn their parameters). Then:

  ========================  ==========================================================================
  cycle accepted            `GROW` (new cycle) or, after `max_cycles` cycles, `COMPLETE`
  cycle rejected            `RETRY` (drop its dendrites, grow fresh ones) while tries are left, else
                            `COMPLETE` with the last accepted model
  dendrite phase plateaued  `SWITCH` to the cycle's neuron phase
  ========================  ==========================================================================

Settings that may be lists (`patience`, `improvement_threshold`, `improvement_epsilon`) are indexed by the cycle
number; cycles past the end of a list use its last entry.

Example:
    >>> from hf_dendrites.schedule import DendriteSchedule, ScheduleSettings
    >>> s = DendriteSchedule(ScheduleSettings(patience=1, max_cycles=1, greater_is_better=False))
    >>> [s.step(loss, step).action.value for step, loss in enumerate([1.0, 0.8, 0.8, 0.5, 0.5])]
    ['continue', 'continue', 'grow', 'continue', 'complete']
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from typing import Any, Optional, Union

PHASE_NEURON = "neuron"
PHASE_DENDRITE = "dendrite"
PHASES = (PHASE_NEURON, PHASE_DENDRITE)

# Version of the layout written by `DendriteSchedule.to_dict`; bump it when an older library could misread it.
SCHEDULE_FORMAT_VERSION = 1


class Action(str, Enum):
    """What the trainer must do after an evaluation."""

    CONTINUE = "continue"  # keep training
    GROW = "grow"  # restore the best weights, add dendrites, start the next cycle
    RETRY = "retry"  # discard this cycle (restore the accepted best, drop its dendrites) and grow fresh ones
    SWITCH = "switch"  # the dendrites-only phase plateaued: restore the cycle's best, unfreeze the neurons
    COMPLETE = "complete"  # restore the accepted best model and stop training


@dataclass(frozen=True)
class Decision:
    """The schedule's answer to one evaluation score.

    Attributes:
        action: what to do now.
        new_best: this score is the best of the current cycle (try): keep a copy of the current weights.
        cycle_accepted: set when a cycle ended with this evaluation: whether it was accepted. When True, the
            cycle's best weights become the accepted best model.
        message: one human-readable line for the logs.
    """

    action: Action
    new_best: bool
    cycle_accepted: Optional[bool] = None
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"action": self.action.value, "new_best": self.new_best, "cycle_accepted": self.cycle_accepted, "message": self.message}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Decision":
        return cls(Action(data["action"]), bool(data["new_best"]), data.get("cycle_accepted"), data.get("message", ""))


Number = Union[int, float]


def _as_list(name: str, value: Any, kind: type) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values:
        raise ValueError(f"`{name}` must be a number or a non-empty list of numbers indexed by cycle, got {value!r}.")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and int(v) != v):
            raise ValueError(f"`{name}` entries must be {'integers' if kind is int else 'numbers'}, got {value!r}.")
        out.append(kind(v))
    return out


@dataclass(frozen=True)
class ScheduleSettings:
    """The schedule's settings (`DendriticTrainingArguments` builds them from its `dendrite_*` fields).

    `patience`, `improvement_threshold` and `improvement_epsilon` take one value or a list indexed by cycle (the
    last entry repeats). Lists are stored as tuples so the settings are immutable and hashable.
    """

    patience: Union[int, tuple[int, ...]] = 3
    improvement_threshold: Union[float, tuple[float, ...]] = 1e-3
    improvement_epsilon: Union[float, tuple[float, ...]] = 0.0
    max_cycles: int = 3
    max_tries: int = 2
    dendrites_only_phase: bool = False
    greater_is_better: bool = False

    def __post_init__(self) -> None:
        patience = _as_list("patience", self.patience, int)
        if any(p < 1 for p in patience):
            raise ValueError(f"`patience` must be >= 1 evaluations, got {self.patience!r}.")
        thresholds = _as_list("improvement_threshold", self.improvement_threshold, float)
        epsilons = _as_list("improvement_epsilon", self.improvement_epsilon, float)
        if any(not (t >= 0 and math.isfinite(t)) for t in thresholds + epsilons):
            raise ValueError(
                f"`improvement_threshold` and `improvement_epsilon` must be finite and >= 0, got "
                f"{self.improvement_threshold!r} and {self.improvement_epsilon!r}."
            )
        for name, minimum in (("max_cycles", 0), ("max_tries", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
        object.__setattr__(self, "patience", tuple(patience))
        object.__setattr__(self, "improvement_threshold", tuple(thresholds))
        object.__setattr__(self, "improvement_epsilon", tuple(epsilons))
        object.__setattr__(self, "dendrites_only_phase", bool(self.dendrites_only_phase))
        object.__setattr__(self, "greater_is_better", bool(self.greater_is_better))

    @staticmethod
    def _at(values: tuple, cycle: int):
        return values[min(cycle, len(values) - 1)]

    def patience_for(self, cycle: int) -> int:
        return self._at(self.patience, cycle)

    def threshold_for(self, cycle: int) -> float:
        return self._at(self.improvement_threshold, cycle)

    def epsilon_for(self, cycle: int) -> float:
        return self._at(self.improvement_epsilon, cycle)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ScheduleSettings":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown schedule settings {unknown}: written by a newer hf_dendrites? Upgrade it.")
        return cls(**data)


@dataclass
class CycleRecord:
    """One finished cycle (or try of a cycle)."""

    cycle: int
    attempt: int
    start_step: int
    end_step: int
    best_score: Optional[float]
    best_step: Optional[int]
    accepted: bool


@dataclass
class _State:
    cycle: int = 0
    attempt: int = 1
    phase: str = PHASE_NEURON
    phase_start_step: int = 0
    cycle_start_step: int = 0
    reference: Optional[float] = None
    evals_without_improvement: int = 0
    cycle_best: Optional[float] = None
    cycle_best_step: Optional[int] = None
    accepted_best: Optional[float] = None
    accepted_best_step: Optional[int] = None
    accepted_cycle: Optional[int] = None
    num_evaluations: int = 0
    last_step: Optional[int] = None
    done: bool = False
    history: list = field(default_factory=list)  # CycleRecord dicts


class DendriteSchedule:
    """The phase state machine of ALGORITHM.md section 2 (see the module docstring for the rules).

    Feed it every evaluation score with `step(score, global_step)` and carry out the returned `Decision`.
    """

    def __init__(self, settings: Optional[ScheduleSettings] = None):
        self.settings = settings if settings is not None else ScheduleSettings()
        self._s = _State()

    # ------------------------------------------------------------------ read-only view of the state
    @property
    def cycle(self) -> int:
        """Current cycle: 0 before the first growth, then the number of the cycle being trained."""
        return self._s.cycle

    @property
    def attempt(self) -> int:
        """Try number (1-based) of the current cycle."""
        return self._s.attempt

    @property
    def phase(self) -> str:
        """`"neuron"` (everything trains) or `"dendrite"` (only dendrites train)."""
        return self._s.phase

    @property
    def phase_start_step(self) -> int:
        """Global step at which the current phase began (where the trainer restarts the LR schedule)."""
        return self._s.phase_start_step

    @property
    def done(self) -> bool:
        return self._s.done

    @property
    def cycle_best(self) -> Optional[float]:
        return self._s.cycle_best

    @property
    def accepted_best(self) -> Optional[float]:
        """Best score of the last accepted cycle (the model that `COMPLETE` restores)."""
        return self._s.accepted_best

    @property
    def accepted_best_step(self) -> Optional[int]:
        return self._s.accepted_best_step

    @property
    def accepted_cycle(self) -> Optional[int]:
        return self._s.accepted_cycle

    @property
    def evals_without_improvement(self) -> int:
        return self._s.evals_without_improvement

    @property
    def num_evaluations(self) -> int:
        return self._s.num_evaluations

    @property
    def history(self) -> list[CycleRecord]:
        """Finished cycles (every try), oldest first."""
        return [CycleRecord(**h) for h in self._s.history]

    # ------------------------------------------------------------------ comparisons
    def _delta(self, score: float, reference: float) -> float:
        return score - reference if self.settings.greater_is_better else reference - score

    def is_improvement(self, score: float, reference: Optional[float], cycle: Optional[int] = None) -> bool:
        """Whether `score` beats `reference` by both the relative threshold and the absolute epsilon."""
        if not _finite(score):
            return False
        if reference is None:
            return True
        cycle = self._s.cycle if cycle is None else cycle
        delta = self._delta(score, reference)
        return delta > self.settings.threshold_for(cycle) * abs(reference) and delta > self.settings.epsilon_for(cycle)

    def _is_better(self, score: float, best: Optional[float]) -> bool:
        return _finite(score) and (best is None or self._delta(score, best) > 0)

    # ------------------------------------------------------------------ the state machine
    def step(self, score: float, step: int) -> Decision:
        """Feed one evaluation score (taken at global step `step`) and get the decision.

        Raises `RuntimeError` once the schedule is complete: there is nothing left to decide.
        """
        s = self._s
        if s.done:
            raise RuntimeError("The dendrite schedule is complete; it takes no more evaluation scores.")
        score = float(score)
        s.num_evaluations += 1
        s.last_step = int(step)

        new_best = self._is_better(score, s.cycle_best)
        if new_best:
            s.cycle_best, s.cycle_best_step = score, int(step)
        if self.is_improvement(score, s.reference):
            s.reference = score
            s.evals_without_improvement = 0
        else:
            s.evals_without_improvement += 1
        patience = self.settings.patience_for(s.cycle)
        if s.evals_without_improvement < patience:
            return Decision(Action.CONTINUE, new_best)

        where = f"cycle {s.cycle} (try {s.attempt}, {s.phase} phase)"
        plateau = f"{where} plateaued after {patience} evaluation(s) without improvement"
        if s.phase == PHASE_DENDRITE:
            self._start_phase(PHASE_NEURON, step)
            return Decision(Action.SWITCH, new_best, None, f"{plateau}: unfreezing the neurons")

        accepted = s.cycle == 0 or self.is_improvement(s.cycle_best, s.accepted_best)
        s.history.append(
            asdict(
                CycleRecord(s.cycle, s.attempt, s.cycle_start_step, int(step), s.cycle_best, s.cycle_best_step, accepted)
            )
        )
        best = f"best {_fmt(s.cycle_best)} at step {s.cycle_best_step}"
        if accepted:
            s.accepted_best, s.accepted_best_step, s.accepted_cycle = s.cycle_best, s.cycle_best_step, s.cycle
            if s.cycle >= self.settings.max_cycles:
                s.done = True
                return Decision(
                    Action.COMPLETE, new_best, True,
                    f"{plateau} ({best}); {self.settings.max_cycles} dendrite cycle(s) done: training complete",
                )
            s.cycle += 1
            s.attempt = 1
            self._start_cycle(step)
            return Decision(Action.GROW, new_best, True, f"{plateau} ({best}): growing dendrites for cycle {s.cycle}")

        previous = f"the accepted best {_fmt(s.accepted_best)} of cycle {s.accepted_cycle}"
        if s.attempt < self.settings.max_tries:
            s.attempt += 1
            self._start_cycle(step)
            return Decision(
                Action.RETRY, new_best, False,
                f"{plateau} ({best}) without beating {previous}: discarding it, try {s.attempt} with fresh dendrites",
            )
        s.done = True
        return Decision(
            Action.COMPLETE, new_best, False,
            f"{plateau} ({best}) without beating {previous} after {s.attempt} tries: training complete",
        )

    def _start_cycle(self, step: int) -> None:
        s = self._s
        s.cycle_best = s.cycle_best_step = None
        s.cycle_start_step = int(step)
        self._start_phase(PHASE_DENDRITE if self.settings.dendrites_only_phase else PHASE_NEURON, step)

    def _start_phase(self, phase: str, step: int) -> None:
        s = self._s
        s.phase = phase
        s.phase_start_step = int(step)
        s.reference = None
        s.evals_without_improvement = 0

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """The settings and the whole state as a JSON-compatible dict."""
        return {"format_version": SCHEDULE_FORMAT_VERSION, "settings": self.settings.to_dict(), "state": asdict(self._s)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DendriteSchedule":
        """Rebuild a schedule from `to_dict()` output."""
        version = data.get("format_version")
        if not isinstance(version, int) or version > SCHEDULE_FORMAT_VERSION:
            raise ValueError(
                f"Dendrite schedule format {version!r} is newer than this hf_dendrites reads "
                f"({SCHEDULE_FORMAT_VERSION}); upgrade with `pip install -U hf_dendrites`."
            )
        schedule = cls(ScheduleSettings.from_dict(data["settings"]))
        state = dict(data["state"])
        known = {f.name for f in fields(_State)}
        unknown = sorted(set(state) - known)
        if unknown:
            raise ValueError(f"Unknown dendrite schedule state fields {unknown}; upgrade hf_dendrites.")
        if state.get("phase", PHASE_NEURON) not in PHASES:
            raise ValueError(f"Invalid schedule phase {state.get('phase')!r}; expected one of {list(PHASES)}.")
        schedule._s = _State(**state)
        return schedule

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DendriteSchedule) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        s = self._s
        return (
            f"DendriteSchedule(cycle={s.cycle}, try={s.attempt}, phase={s.phase!r}, "
            f"evals_without_improvement={s.evals_without_improvement}, cycle_best={s.cycle_best}, "
            f"accepted_best={s.accepted_best}, done={s.done})"
        )


def _finite(x: Optional[float]) -> bool:
    return x is not None and math.isfinite(x)


def _fmt(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.6g}"
