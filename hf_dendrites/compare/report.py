"""Statistics, the markdown table, compare.json and the figure of `compare`."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

# The arm every other is compared with, paired by seed: the first of these that a compare trained.
REFERENCE_ARMS = ("baseline-restarts", "baseline", "lora-restarts")


def score_of(record: dict[str, Any]) -> float | None:
    """The reported score of a run: test accuracy, or validation accuracy when there is no test data."""
    return record["test_score"] if record.get("test_score") is not None else record.get("validation_score")


def mean_std_ci(values: list[float], confidence: float = 0.95) -> dict[str, float]:
    """Mean, sample standard deviation (ddof=1) and the two-sided Student-t interval for the mean."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    n = len(x)
    mean = float(x.mean()) if n else math.nan
    if n < 2:
        return {"n": n, "mean": mean, "std": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    std = float(x.std(ddof=1))
    if std == 0.0:
        return {"n": n, "mean": mean, "std": 0.0, "ci_low": mean, "ci_high": mean}
    low, high = stats.t.interval(confidence, n - 1, loc=mean, scale=std / math.sqrt(n))
    return {"n": n, "mean": mean, "std": std, "ci_low": float(low), "ci_high": float(high)}


def paired_comparison(scores: dict[int, float], reference: dict[int, float]) -> dict[str, Any]:
    """Relative error change against `reference`, paired by seed, with a paired t-test.

    Error = 1 - accuracy. Per seed: (error - reference error) / reference error; reported as the mean of those
    (negative = fewer errors). `p_value` is scipy.stats.ttest_rel on the paired scores (two-sided); NaN with
    fewer than two pairs or when the differences have no spread.
    """
    from scipy import stats

    seeds = sorted(set(scores) & set(reference))
    changes = []
    for seed in seeds:
        ref_err = 1.0 - reference[seed]
        changes.append((1.0 - scores[seed] - ref_err) / ref_err if ref_err > 0 else math.nan)
    p = math.nan
    if len(seeds) >= 2:
        a = np.array([scores[k] for k in seeds])
        b = np.array([reference[k] for k in seeds])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # identical differences: scipy warns and returns NaN (no spread)
            p = float(stats.ttest_rel(a, b).pvalue)
    finite = [c for c in changes if not math.isnan(c)]
    return {"pairs": len(seeds), "rel_error_change": float(np.mean(finite)) if finite else math.nan,
            "per_seed": dict(zip(seeds, changes)), "p_value": p}


def paired_difference(values: dict[int, float], reference: dict[int, float]) -> dict[str, Any]:
    """Mean of `values - reference` over the seeds both have (e.g. test loss in nats per token), with the paired
    t-test's two-sided p (NaN with fewer than two pairs or no spread)."""
    from scipy import stats

    seeds = sorted(set(values) & set(reference))
    a, b = np.array([values[k] for k in seeds], dtype=float), np.array([reference[k] for k in seeds], dtype=float)
    p = math.nan
    if len(seeds) >= 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p = float(stats.ttest_rel(a, b).pvalue)
    return {"pairs": len(seeds), "mean_difference": float(np.mean(a - b)) if seeds else math.nan, "p_value": p}


def summarise(records: list[dict[str, Any]], arms: list[str]) -> tuple[list[dict[str, Any]], str | None]:
    """Per-arm rows (in `arms` order) and the reference arm (baseline-restarts if present, else baseline, else
    lora-restarts: the control with the same restarts and no dendrites)."""
    by_arm: dict[str, dict[int, dict]] = {a: {} for a in arms}
    for r in records:
        if r["arm"] in by_arm:
            by_arm[r["arm"]][r["seed"]] = r
    reference = next((a for a in REFERENCE_ARMS if by_arm.get(a)), None)
    ref_scores = {k: score_of(r) for k, r in by_arm[reference].items()} if reference else {}
    rows = []
    for arm in arms:
        runs = by_arm[arm]
        scores = {k: score_of(r) for k, r in runs.items()}
        row: dict[str, Any] = {"arm": arm, **mean_std_ci(list(scores.values()))}
        if reference and arm != reference:
            row.update(paired_comparison(scores, ref_scores))
        for key in ("params", "trainable_params", "steps", "dendrites_kept"):
            values = [r[key] for r in runs.values()]
            row[key] = float(np.mean(values)) if values else math.nan
        row["recipe"] = next((r.get("recipe") for r in runs.values() if r.get("recipe")), None)
        rows.append(row)
    return rows, reference


def _num(value: float, fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def markdown_table(rows: list[dict[str, Any]], reference: str | None, score_name: str) -> str:
    """One markdown table: a row per arm."""
    ref = reference or "baseline (not run)"
    head = (f"| arm | runs | {score_name} mean ± std | 95 % CI | rel. error vs {ref} | p (paired t) | params | "
            "trainable | steps | dendrites kept |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        rel = "reference" if r["arm"] == reference else (
            _num(100 * r["rel_error_change"], "+.1f") + " %" if "rel_error_change" in r and not math.isnan(r["rel_error_change"]) else "-")
        lines.append(
            f"| {r['arm']} | {r['n']} | {_num(r['mean'], '.4f')} ± {_num(r['std'], '.4f')} | "
            f"[{_num(r['ci_low'], '.4f')}, {_num(r['ci_high'], '.4f')}] | {rel} | {_num(r.get('p_value', math.nan), '.3g')} | "
            f"{_num(r['params'], ',.0f')} | {_num(r['trainable_params'], ',.0f')} | {_num(r['steps'], '.0f')} | "
            f"{_num(r['dendrites_kept'], '.1f')} |"
        )
    return "\n".join(lines)


def lr_choice_line(choice: dict[str, dict[str, Any]], metric: str) -> str:
    """One line per arm: the LR chosen on validation and each grid LR's mean validation `metric`."""
    parts = []
    for arm, c in choice.items():
        # (the LRs are strings once read back from compare.json)
        means = ", ".join(f"{lr:g}: {v:.4f}" for lr, v in sorted((float(k), v) for k, v in c["validation"].items()))
        parts.append(f"{arm} {c['chosen']:g} ({means})")
    return f"LR chosen per arm on mean validation {metric} over the seeds: " + "; ".join(parts)


def plot(records: list[dict[str, Any]], arms: list[str], path: str, score_name: str, metric: str) -> str:
    """Left: each arm's scores (a dot per seed, a bar at the mean). Right: validation curves, one colour per arm,
    growth events marked with triangles. Matplotlib's object API on an Agg canvas (no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.4]})
    colors = {a: f"C{i % 10}" for i, a in enumerate(arms)}
    for i, arm in enumerate(arms):
        runs = [r for r in records if r["arm"] == arm]
        scores = [score_of(r) for r in runs]
        if not scores:
            continue
        jitter = np.linspace(-0.12, 0.12, len(scores)) if len(scores) > 1 else [0.0]
        left.scatter([i + j for j in jitter], scores, color=colors[arm], zorder=3, s=18)
        left.hlines(np.mean(scores), i - 0.3, i + 0.3, color=colors[arm], lw=2)
        for r in runs:
            curve = r.get("curve") or []
            steps, values = [c["step"] for c in curve], [c["score"] for c in curve]
            right.plot(steps, values, color=colors[arm], lw=0.9, alpha=0.8, label=arm if r is runs[0] else None)
            grows = [(c["step"], c["score"]) for c in curve if c.get("decision") in ("grow", "retry")]
            if grows:
                right.scatter(*zip(*grows), marker="v", color=colors[arm], edgecolor="black", zorder=4, s=30)
    left.set_xticks(range(len(arms)))
    left.set_xticklabels(arms, rotation=30, ha="right", fontsize=8)
    left.set_ylabel(score_name)
    left.set_title("score per arm (dots: seeds, bar: mean)", fontsize=9)
    left.grid(alpha=0.3, axis="y")
    right.set_xlabel("training step")
    right.set_ylabel(f"validation {metric}")
    right.set_title("validation curves (triangles: growth / retry)", fontsize=9)
    right.grid(alpha=0.3)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
