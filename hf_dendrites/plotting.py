"""The training report `DendriticTrainer` leaves in `output_dir`: a CSV of every evaluation and a PNG plot.

matplotlib is imported lazily and used through its object-oriented API with the Agg canvas, so the library never
changes matplotlib's global backend and works on machines without a display.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable
from typing import Any

# Columns of the evaluation CSV, in order.
EVAL_CSV_FIELDS = (
    "step",
    "epoch",
    "score",
    "phase",
    "cycle",
    "try",
    "num_dendrites",
    "params",
    "dendrite_params",
    "trainable_params",
    "correlation",
    "lr_factor",
    "dendrite_weight_max",
    "dendrite_weight_median",
    "ablation_score",
    "ablation_delta",
    "decision",
)


def write_eval_csv(records: Iterable[dict[str, Any]], path: str) -> str:
    """Write one row per evaluation (columns `EVAL_CSV_FIELDS`) to `path`; returns the path."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=EVAL_CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for record in records:
            writer.writerow({k: record.get(k, "") for k in EVAL_CSV_FIELDS})
    os.replace(tmp, path)
    return path


def cycle_table(records: list[dict[str, Any]], history: list[dict[str, Any]], greater_is_better: bool) -> list[dict[str, Any]]:
    """One row per cycle try: cycle, try, num_dendrites, params, best_score, best_step, status, and where known
    correlation (candidate S), dendrite_weight (a kept cycle's `{"max", "median"}` weight ratio), ablation_score
    and ablation_delta (a kept cycle's score with its new dendrites switched off, and the kept score's lead over it:
    positive = the dendrites help; see `callback.py`), lr_candidates and lr_pick (LR search).

    `history` holds the schedule's finished cycles (`CycleRecord` dicts); a try that was still running when
    training stopped is listed with status "stopped".
    """
    finished = {(h["cycle"], h["attempt"]): h for h in history}
    rows: list[dict[str, Any]] = []
    seen: dict[tuple[int, int], dict[str, Any]] = {}
    for r in records:
        key = (r["cycle"], r["try"])
        row = seen.get(key)
        if row is None:
            row = {"cycle": r["cycle"], "try": r["try"], "num_dendrites": r["num_dendrites"], "params": r["params"],
                   "best_score": None, "best_step": None, "status": "stopped", "correlation": None,
                   "dendrite_weight": None, "ablation_score": None, "ablation_delta": None, "lr_candidates": None,
                   "lr_pick": None}
            seen[key] = row
            rows.append(row)
        if r.get("correlation") is not None:  # correlation rule: S of the candidates when they were installed
            row["correlation"] = r["correlation"]
        if r.get("dendrite_weight_max") is not None:  # measured when the cycle was kept
            row["dendrite_weight"] = {"max": r["dendrite_weight_max"], "median": r.get("dendrite_weight_median")}
        if r.get("ablation_score") is not None:  # measured when the cycle was kept
            row["ablation_score"], row["ablation_delta"] = r["ablation_score"], r.get("ablation_delta")
        if r.get("decision") in ("candidates", "install"):
            continue  # the network did not change during a candidate phase: its scores are not the cycle's
        # the dendrite count of a correlation cycle is known once its candidates are installed
        row["num_dendrites"], row["params"] = r["num_dendrites"], r["params"]
        score = r["score"]
        if score is not None and (
            row["best_score"] is None or (score > row["best_score"] if greater_is_better else score < row["best_score"])
        ):
            row["best_score"], row["best_step"] = score, r["step"]
    for key, row in seen.items():
        if key in finished:
            row["status"] = "accepted" if finished[key]["accepted"] else "discarded"
            row["lr_candidates"], row["lr_pick"] = finished[key].get("lr_candidates"), finished[key].get("lr_pick")
    return rows


def plot_training_curve(
    records: list[dict[str, Any]],
    history: list[dict[str, Any]],
    path: str,
    metric: str,
    greater_is_better: bool,
    title: str | None = None,
) -> str:
    """Plot the evaluation score over training steps with growth points marked and a per-cycle table.

    Vertical lines mark where the dendrites changed (solid: growth, dashed: a discarded cycle retried, dotted:
    neurons unfrozen after a dendrites-only phase, dash-dot: correlation candidates installed, loosely dotted: the next
    candidate of an LR search); stars mark the best score of every accepted cycle. Returns
    `path`.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - matplotlib is a test/examples dependency
        raise ImportError("Plotting the dendrite training curve needs matplotlib: `pip install matplotlib`.") from err

    rows = cycle_table(records, history, greater_is_better)
    fig = Figure(figsize=(8.0, 4.8 + 0.28 * len(rows)))
    FigureCanvasAgg(fig)
    height_ratios = [3.0, 0.5 + 0.28 * len(rows)]
    ax, table_ax = fig.subplots(2, 1, gridspec_kw={"height_ratios": height_ratios})

    colors = ["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C7", "C8", "C9"]
    by_try: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for r in records:
        by_try.setdefault((r["cycle"], r["try"]), []).append(r)
    for (cycle, attempt), points in by_try.items():
        xs = [p["step"] for p in points if p["score"] is not None]
        ys = [p["score"] for p in points if p["score"] is not None]
        label = f"cycle {cycle}" + (f" try {attempt}" if attempt > 1 else "")
        ax.plot(xs, ys, marker="o", markersize=3, color=colors[cycle % len(colors)], alpha=1.0 if attempt == 1 else 0.6,
                linestyle="-" if attempt == 1 else "--", label=label)
    accepted = [h for h in history if h.get("accepted") and h.get("best_score") is not None]
    if accepted:
        ax.scatter([h["best_step"] for h in accepted], [h["best_score"] for h in accepted], marker="*", s=120,
                   color="black", zorder=3, label="accepted best")
    styles = {"grow": "-", "retry": "--", "switch": ":", "install": "-.", "next_lr": (0, (1, 3))}
    for r in records:
        style = styles.get(r.get("decision"))
        if style is not None:
            ax.axvline(r["step"], color="grey", linestyle=style, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} over training ({'higher' if greater_is_better else 'lower'} is better)")
    ax.grid(alpha=0.3)
    if by_try:
        ax.legend(fontsize="small", loc="best")

    table_ax.axis("off")
    if rows:
        with_s = any(r.get("correlation") is not None for r in rows)
        with_w = any(r.get("dendrite_weight") is not None for r in rows)
        with_a = any(r.get("ablation_delta") is not None for r in rows)
        cells = [
            [str(r["cycle"]), str(r["try"]), str(r["num_dendrites"]), f"{r['params']:,}",
             "n/a" if r["best_score"] is None else f"{r['best_score']:.5g}", r["status"]]
            + (["" if r.get("correlation") is None else f"{r['correlation']:.3g}"] if with_s else [])
            + (["" if r.get("dendrite_weight") is None else f"{r['dendrite_weight']['max']:.3g}"] if with_w else [])
            + (["" if r.get("ablation_delta") is None else f"{r['ablation_delta']:+.3g}"] if with_a else [])
            for r in rows
        ]
        labels = (["cycle", "try", "dendrites", "params", f"best {metric}", "status"] + (["candidate S"] if with_s else [])
                  + (["dendrite weight (max)"] if with_w else []) + (["gain over without"] if with_a else []))
        table = table_ax.table(cellText=cells, colLabels=labels, loc="center")
        table.auto_set_font_size(False)
        table.set_fontsize(8)
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)
    return path
