"""The dendrite phase schedule: a pure-Python state machine fed one evaluation score at a time.

It implements docs/schedule.md and knows nothing about torch or the Trainer: `DendriticTrainer` feeds it
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

Two options change when a cycle ends:

- **Replayed growth steps** (`restart_steps`): a cycle ends exactly at the evaluation of each listed step instead
  of at a plateau, with the same keep/discard rule (`GROW` if it beat the accepted best, else `RETRY`);
  `max_cycles` / `max_tries` do not apply (the list says how many growths happen), and the evaluation marked
  `final=True` (the end of training) ends the last cycle and `COMPLETE`s. This replays another run's growth
  events, e.g. for the restarts-only control.
- **Restart LR search** (`lr_search`, one factor per candidate): every cycle k >= 1 is trained once per candidate
  learning rate, each from the same post-growth weights and each until its plateau (`NEXT_LR` between them:
  restore the post-growth weights, restart with the next learning rate). When the last candidate plateaus, the
  cycle's best score is the best candidate's (`Decision.lr_pick` says which) and the keep/discard rule applies
  as usual.

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
from typing import Any

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
    NEXT_LR = "next_lr"  # LR search: restore the post-growth weights and train the cycle with the next candidate LR
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
        lr_best_so_far: LR search, with `NEXT_LR`: the candidate that just plateaued is the best one so far (keep
            its best weights).
        lr_pick: LR search, when the last candidate of a cycle plateaued: index of the winning candidate. When it
            is not the last one, the cycle's best weights are the winner's (kept at its `lr_best_so_far`).
    """

    action: Action
    new_best: bool
    cycle_accepted: bool | None = None
    message: str = ""
    lr_best_so_far: bool = False
    lr_pick: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"action": self.action.value, "new_best": self.new_best, "cycle_accepted": self.cycle_accepted,
                "message": self.message, "lr_best_so_far": self.lr_best_so_far, "lr_pick": self.lr_pick}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Decision:
        return cls(Action(data["action"]), bool(data["new_best"]), data.get("cycle_accepted"), data.get("message", ""),
                   bool(data.get("lr_best_so_far", False)), data.get("lr_pick"))




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

    `restart_steps` (None: cycles end at plateaus) lists the global steps at which cycles end instead; `lr_search`
    (empty: no search) holds one learning-rate factor per candidate probed in every cycle k >= 1 (see the module
    docstring). They cannot be combined: a candidate ends at its plateau, a replayed cycle at a fixed step.
    """

    patience: int | tuple[int, ...] = 3
    improvement_threshold: float | tuple[float, ...] = 1e-3
    improvement_epsilon: float | tuple[float, ...] = 0.0
    max_cycles: int = 3
    max_tries: int = 2
    dendrites_only_phase: bool = False
    greater_is_better: bool = False
    restart_steps: tuple[int, ...] | None = None
    lr_search: tuple[float, ...] = ()

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
        if self.restart_steps is not None:
            steps = list(self.restart_steps) if isinstance(self.restart_steps, (list, tuple)) else [self.restart_steps]
            if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in steps) or len(set(steps)) != len(steps):
                raise ValueError(f"`restart_steps` must be distinct global steps >= 1, got {self.restart_steps!r}.")
            object.__setattr__(self, "restart_steps", tuple(sorted(steps)))
        factors = list(self.lr_search) if isinstance(self.lr_search, (list, tuple)) else [self.lr_search]
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0) for v in factors):
            raise ValueError(f"`lr_search` must hold finite learning-rate factors > 0, got {self.lr_search!r}.")
        if factors and self.restart_steps is not None:
            raise ValueError(
                "`lr_search` and `restart_steps` cannot be combined: each LR candidate trains until its plateau, "
                "whereas replayed cycles end at fixed steps."
            )
        object.__setattr__(self, "lr_search", tuple(float(v) for v in factors))
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
    def from_dict(cls, data: dict[str, Any]) -> ScheduleSettings:
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
    best_score: float | None
    best_step: int | None
    accepted: bool
    # LR search: one dict per candidate (factor, best_score, best_step, end_step) and the index of the winner.
    lr_candidates: list | None = None
    lr_pick: int | None = None


@dataclass
class _State:
    cycle: int = 0
    attempt: int = 1
    phase: str = PHASE_NEURON
    phase_start_step: int = 0
    cycle_start_step: int = 0
    reference: float | None = None
    evals_without_improvement: int = 0
    cycle_best: float | None = None
    cycle_best_step: int | None = None
    accepted_best: float | None = None
    accepted_best_step: int | None = None
    accepted_cycle: int | None = None
    num_evaluations: int = 0
    last_step: int | None = None
    done: bool = False
    history: list = field(default_factory=list)  # CycleRecord dicts
    lr_index: int = 0  # LR search: the candidate being trained in this cycle
    lr_results: list = field(default_factory=list)  # LR search: the finished candidates of this cycle


class DendriteSchedule:
    """The phase state machine of docs/schedule.md (see the module docstring for the rules).

    Feed it every evaluation score with `step(score, global_step)` and carry out the returned `Decision`.
    """

    def __init__(self, settings: ScheduleSettings | None = None):
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
    def lr_index(self) -> int:
        """LR search: index of the candidate learning rate the current cycle trains with (0 without a search)."""
        return self._s.lr_index

    @property
    def lr_factor(self) -> float:
        """Factor applied to the learning rate now: the current candidate's in a cycle k >= 1 with an LR search,
        else 1."""
        if self.settings.lr_search and self._s.cycle >= 1:
            return self.settings.lr_search[self._s.lr_index]
        return 1.0

    @property
    def lr_results(self) -> list[dict[str, Any]]:
        """LR search: the candidates of the current cycle that already plateaued (factor, best score and step)."""
        return [dict(r) for r in self._s.lr_results]

    @property
    def cycle_best(self) -> float | None:
        return self._s.cycle_best

    @property
    def accepted_best(self) -> float | None:
        """Best score of the last accepted cycle (the model that `COMPLETE` restores)."""
        return self._s.accepted_best

    @property
    def accepted_best_step(self) -> int | None:
        return self._s.accepted_best_step

    @property
    def accepted_cycle(self) -> int | None:
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

    def is_improvement(self, score: float, reference: float | None, cycle: int | None = None) -> bool:
        """Whether `score` beats `reference` by both the relative threshold and the absolute epsilon."""
        if not _finite(score):
            return False
        if reference is None:
            return True
        cycle = self._s.cycle if cycle is None else cycle
        delta = self._delta(score, reference)
        return delta > self.settings.threshold_for(cycle) * abs(reference) and delta > self.settings.epsilon_for(cycle)

    def _is_better(self, score: float, best: float | None) -> bool:
        return _finite(score) and (best is None or self._delta(score, best) > 0)

    # ------------------------------------------------------------------ the state machine
    def step(self, score: float, step: int, final: bool = False) -> Decision:
        """Feed one evaluation score (taken at global step `step`) and get the decision.

        `final=True` marks the last evaluation of a run with `restart_steps` (training reached its step budget):
        the running cycle ends there and the schedule completes. Raises `RuntimeError` once the schedule is
        complete: there is nothing left to decide.
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
        where = f"cycle {s.cycle} (try {s.attempt}, {s.phase} phase)"
        replay = self.settings.restart_steps is not None
        if replay:
            final = bool(final)
            if int(step) not in self.settings.restart_steps and not final:
                if s.phase == PHASE_DENDRITE and s.evals_without_improvement >= patience:
                    self._start_phase(PHASE_NEURON, step)
                    return Decision(Action.SWITCH, new_best, None, f"{where} plateaued after {patience} evaluation(s) without improvement: unfreezing the neurons")
                return Decision(Action.CONTINUE, new_best)
            ended = f"{where} ended at {'the last step of training' if final else f'the replayed growth step {step}'}"
        else:
            if s.evals_without_improvement < patience:
                return Decision(Action.CONTINUE, new_best)
            ended = f"{where} plateaued after {patience} evaluation(s) without improvement"
            if s.phase == PHASE_DENDRITE:
                self._start_phase(PHASE_NEURON, step)
                return Decision(Action.SWITCH, new_best, None, f"{ended}: unfreezing the neurons")

        lr_candidates = lr_pick = None
        if self.settings.lr_search and s.cycle >= 1:
            factors = self.settings.lr_search
            result = {"factor": factors[s.lr_index], "best_score": s.cycle_best, "best_step": s.cycle_best_step, "end_step": int(step)}
            best_before = self._best_candidate(s.lr_results)
            is_best = _finite(s.cycle_best) and (best_before is None or self._is_better(s.cycle_best, s.lr_results[best_before]["best_score"]))
            s.lr_results.append(result)
            if s.lr_index + 1 < len(factors):
                s.lr_index += 1
                start = s.cycle_start_step
                self._start_cycle(step)
                s.cycle_start_step = start  # the cycle goes on, with the next candidate learning rate
                return Decision(
                    Action.NEXT_LR, new_best, None,
                    f"{ended} with LR factor {_fmt(result['factor'])} (best {_fmt(result['best_score'])}): "
                    f"trying LR factor {_fmt(factors[s.lr_index])} from the post-growth weights",
                    lr_best_so_far=is_best,
                )
            lr_candidates = list(s.lr_results)
            lr_pick = self._best_candidate(lr_candidates)
            if lr_pick is not None:
                s.cycle_best, s.cycle_best_step = lr_candidates[lr_pick]["best_score"], lr_candidates[lr_pick]["best_step"]
            tried = ", ".join(f"{_fmt(r['factor'])}: {_fmt(r['best_score'])}" for r in lr_candidates)
            ended += f" (LR factors {tried}; keeping {_fmt(factors[lr_pick]) if lr_pick is not None else 'none'})"
            s.lr_index, s.lr_results = 0, []

        accepted = s.cycle == 0 or self.is_improvement(s.cycle_best, s.accepted_best)
        s.history.append(
            asdict(
                CycleRecord(s.cycle, s.attempt, s.cycle_start_step, int(step), s.cycle_best, s.cycle_best_step, accepted,
                            lr_candidates, lr_pick)
            )
        )
        best = f"best {_fmt(s.cycle_best)} at step {s.cycle_best_step}"
        extra = {"lr_pick": lr_pick}
        if accepted:
            s.accepted_best, s.accepted_best_step, s.accepted_cycle = s.cycle_best, s.cycle_best_step, s.cycle
            if final:
                s.done = True
                return Decision(Action.COMPLETE, new_best, True, f"{ended} ({best}): training complete", **extra)
            if not replay and s.cycle >= self.settings.max_cycles:
                s.done = True
                return Decision(
                    Action.COMPLETE, new_best, True,
                    f"{ended} ({best}); {self.settings.max_cycles} dendrite cycle(s) done: training complete", **extra,
                )
            s.cycle += 1
            s.attempt = 1
            self._start_cycle(step)
            return Decision(Action.GROW, new_best, True, f"{ended} ({best}): growing dendrites for cycle {s.cycle}", **extra)

        previous = f"the accepted best {_fmt(s.accepted_best)} of cycle {s.accepted_cycle}"
        if final:
            s.done = True
            return Decision(Action.COMPLETE, new_best, False, f"{ended} ({best}) without beating {previous}: training complete", **extra)
        if replay or s.attempt < self.settings.max_tries:
            s.attempt += 1
            self._start_cycle(step)
            return Decision(
                Action.RETRY, new_best, False,
                f"{ended} ({best}) without beating {previous}: discarding it, try {s.attempt} with fresh dendrites", **extra,
            )
        s.done = True
        return Decision(
            Action.COMPLETE, new_best, False,
            f"{ended} ({best}) without beating {previous} after {s.attempt} tries: training complete", **extra,
        )

    def _best_candidate(self, results: list[dict[str, Any]]) -> int | None:
        """Index of the LR candidate with the best score (the first one on ties), None when none scored."""
        best = None
        for i, r in enumerate(results):
            if best is None and _finite(r["best_score"]) or best is not None and self._is_better(r["best_score"], results[best]["best_score"]):
                best = i
        return best

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
    def from_dict(cls, data: dict[str, Any]) -> DendriteSchedule:
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


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.6g}"
