"""The suite's `perforatedai` experiment: perforatedai 3.2.9 side by side with hf_dendrites.

perforatedai (the published open-source dendrite library, Apache-2.0) is installed only for this experiment:

    pip install --no-deps perforatedai==3.2.9

`--no-deps` because its requirements pull torch 2.14 with CUDA wheels and torchvision (checked with
`pip install --dry-run perforatedai==3.2.9`); what it imports at run time (matplotlib, pandas, pyyaml, requests,
safetensors, cryptography) is already present. Its modules are compiled (Cython), so it is driven through its
documented API: `perforate_model`, `GPA.pai_tracker.setup_optimizer`, `GPA.pai_tracker.add_validation_score`.

Same model, data, targets and schedule settings as `same_arch`: MiniLM's first layer with mean pooling,
Rotten Tomatoes (same splits, same tokenization), dendrites on the MLP Linears only, AdamW at the same learning
rate and batch size, a validation evaluation every `eval_steps` steps, switch after `patience` evaluations without
improvement (relative threshold 1e-3), at most one dendrite set and one try; the test score is that of the
returned model. perforatedai runs in a plain PyTorch loop as its README prescribes; hf_dendrites' numbers are
those of `same_arch`'s `dendrites_gd` arm (DendriticTrainer), so the two share settings but not the loop code.

What had to be changed to make perforatedai run here (recorded in the JSON as well):

- `perforate_model` asks interactively which modules to convert and refuses without a terminal:
  `GPA.pc.set_configuration_confirmed(True)` and the targets given as module ids
  (`set_module_ids_to_perforate`, names prefixed with "."; `set_modules_to_perforate([])` and
  `set_module_names_to_perforate([])` so that it does not convert every Linear, the classification head included).
- `set_output_dimensions([-1, -1, 0])`: its default output layout is [batch, neurons]; on [batch, tokens, neurons]
  outputs it prints a message and exits the process with status 0.
- `save_name` must be a relative folder name (a path with "/" is refused), so the runs chdir into a scratch folder.
- `set_testing_dendrite_capacity(False)` (otherwise it adds three dendrite sets to test memory, then exits),
  `set_unwrapped_modules_confirmed(True)` (otherwise it stops in `pdb` over the LayerNorms and embeddings it does
  not wrap), `set_find_best_lr(False)` (otherwise each switch sweeps several learning rates: a different budget).
- stdin is closed, so that any `pdb.set_trace()` left in its code ends the run instead of hanging it.

Step time: both libraries' models with one dendrite per target layer are timed in the same plain loop (same
batch, AdamW, one thread).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import harness as H  # noqa: E402

from hf_dendrites.compare.report import mean_std_ci  # noqa: E402

PAI_VERSION = "3.2.9"
CHANGES = [
    "GPA.pc.set_configuration_confirmed(True): perforate_model otherwise asks interactively for targets and raises "
    "RuntimeError without a terminal",
    "targets as module ids ('.bert.encoder.layer.N.intermediate.dense', ...) with set_modules_to_perforate([]) and "
    "set_module_names_to_perforate([]): by default it converts every Linear (attention projections and the "
    "classifier head included)",
    "save_name must be relative (paths with '/' are refused): runs chdir into a scratch folder",
    "set_testing_dendrite_capacity(False), set_unwrapped_modules_confirmed(True), set_find_best_lr(False), "
    "set_silent(True); stdin closed so a leftover pdb.set_trace() cannot hang the run",
    "GPA.pc.set_output_dimensions([-1, -1, 0]): its default expects [batch, neurons] outputs; with [batch, tokens, "
    "neurons] it prints a message and exits the process with status 0",
    "installed with pip --no-deps (its requirements would replace torch 2.13 CPU by torch 2.14 + CUDA wheels and "
    "add torchvision)",
]


def ensure_installed() -> tuple[bool, str]:
    """Import perforatedai, installing the pinned version with --no-deps if it is missing."""
    try:
        import perforatedai  # noqa: F401
    except ImportError:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", f"perforatedai=={PAI_VERSION}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            return False, f"{' '.join(cmd)} failed: {done.stderr.strip()[-500:]}"
    from importlib.metadata import version

    v = version("perforatedai")
    return (v == PAI_VERSION, "" if v == PAI_VERSION else f"perforatedai {v} installed, {PAI_VERSION} expected")


def _one_run(seed: int, quick: bool, work: Path, task) -> dict[str, Any]:
    """One perforatedai run in this process (perforatedai keeps global state: one run per process)."""
    import torch
    from perforatedai import globals_perforatedai as GPA
    from perforatedai import utils_perforatedai as UPA
    from torch.utils.data import DataLoader

    s = task.s
    H.set_seed(seed)
    model = task.make_model()
    names = [n for n, _ in model.named_modules() if re.fullmatch(H.MLP_TARGETS, n)]
    pc = GPA.pc
    pc.set_testing_dendrite_capacity(False)
    pc.set_output_dimensions([-1, -1, 0])  # [batch, tokens, neurons]; its default [-1, 0] fits [batch, neurons] only
    pc.set_modules_to_perforate([])
    pc.set_module_names_to_perforate([])  # its default lists "Linear" by class name: every Linear would be converted
    pc.set_module_ids_to_perforate(["." + n for n in names])
    pc.set_unwrapped_modules_confirmed(True)
    pc.set_configuration_confirmed(True)
    pc.set_n_epochs_to_switch(s["patience"][0])
    pc.set_improvement_threshold(s["threshold"])
    pc.set_max_dendrites(1)
    pc.set_max_dendrite_tries(1)
    pc.set_find_best_lr(False)
    pc.set_silent(True)
    run_dir = work / f"pai_{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    os.chdir(run_dir)
    with contextlib.redirect_stdout(io.StringIO()):
        model = UPA.perforate_model(model, save_name="run", making_graphs=False, maximizing_score=True)
    # Were the head wrapped (it is when Linear is listed by class name), it would need its [batch, classes] layout.
    wrapped = {n: type(m).__name__ for n, m in model.named_modules() if type(m).__module__.startswith("perforatedai")}
    if hasattr(model.classifier, "set_this_output_dimensions"):
        model.classifier.set_this_output_dimensions([-1, 0])

    def make_optimizer(m):
        GPA.pai_tracker.set_optimizer(torch.optim.AdamW)
        opt, _ = GPA.pai_tracker.setup_optimizer(m, {"params": m.parameters(), "lr": s["lr"], "weight_decay": 0.01})
        return opt

    optimizer = make_optimizer(model)
    g = torch.Generator().manual_seed(seed)
    train = DataLoader(task.data["train"].with_format(None), batch_size=s["batch"], shuffle=True, generator=g, collate_fn=task.collator)

    def evaluate(m, split):
        m.eval()
        correct = total = 0
        loader = DataLoader(task.data[split].with_format(None), batch_size=128, collate_fn=task.collator)
        with torch.no_grad():
            for b in loader:
                labels = b.pop("labels")
                pred = m(**b).logits.argmax(-1)
                correct += int((pred == labels).sum())
                total += len(labels)
        m.train()
        return correct / total

    step, best_val, test_at_best, history, step_times = 0, None, None, [], {}
    max_steps = int(s["max_epochs"] * len(train))
    complete = False
    start = time.perf_counter()
    model.train()
    while not complete and step < max_steps:
        for batch in train:
            t0 = time.perf_counter()
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            n_dend = int(GPA.pai_tracker.member_vars.get("num_dendrites_added", 0)) if hasattr(GPA.pai_tracker, "member_vars") else 0
            step_times.setdefault(n_dend, []).append(time.perf_counter() - t0)
            if step % s["eval_steps"] == 0:
                val = evaluate(model, "validation")
                if best_val is None or val > best_val:
                    best_val, test_at_best = val, evaluate(model, "test")
                with contextlib.redirect_stdout(io.StringIO()):
                    model, restructured, complete = GPA.pai_tracker.add_validation_score(val, model)
                history.append({"step": step, "score": val, "restructured": bool(restructured), "complete": bool(complete)})
                if complete:
                    break
                if restructured:
                    optimizer = make_optimizer(model)
                    model.train()
            if step >= max_steps:
                break
    seconds = time.perf_counter() - start
    val, test = evaluate(model, "validation"), evaluate(model, "test")
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    dendrites = int(GPA.pai_tracker.member_vars.get("num_dendrites_added", -1)) if hasattr(GPA.pai_tracker, "member_vars") else -1
    return {
        "name": "perforatedai", "seed": seed, "val_score": val, "test_score": test, "params": params, "steps": step,
        "num_dendrites_added": dendrites, "completed": bool(complete), "train_seconds": round(seconds, 1),
        "history": history, "best_val_during_run": best_val, "test_at_best_val_during_run": test_at_best,
        "perforatedai_modules": wrapped,
        "step_ms_by_dendrites": {str(k): 1000 * sum(v) / len(v) for k, v in step_times.items()},
    }


def _step_time_probe(quick: bool, task, seed: int = 0) -> dict[str, Any]:
    """Time 1-dendrite models of both libraries (and the plain model) in the same plain loop and batch."""
    import torch

    from hf_dendrites import DendriteConfig, get_dendritic_model

    steps = 3 if quick else 10
    batch = task.collator([task.data["train"][i] for i in range(task.s["batch"])])

    def time_model(m):
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
        m.train()

        def one():
            m(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        one()
        one()
        t0 = time.perf_counter()
        for _ in range(steps):
            one()
        return 1000 * (time.perf_counter() - t0) / steps

    H.set_seed(seed)
    plain = time_model(task.make_model())
    H.set_seed(seed)
    dm = get_dendritic_model(task.make_model(), DendriteConfig(target_modules=H.MLP_TARGETS, dendrite_seed=seed))
    dm.add_dendrites(1)
    ours = time_model(dm)
    return {"plain_ms": plain, "hf_dendrites_1_dendrite_ms": ours}


def worker_main(args: list[str]) -> None:
    """Entry point of the per-seed subprocess: prints one JSON line."""
    seed, quick, work = int(args[0]), args[1] == "1", Path(args[2])
    import run_suite

    H.quiet()
    H.set_threads(1)
    task = run_suite.TextTask(run_suite.text_settings(quick))
    result = _one_run(seed, quick, work, task)
    if seed == 0:
        result["probe"] = _step_time_probe(quick, task)
    print("RESULT " + json.dumps(result))


def run(seeds: list[int], quick: bool, work: Path) -> dict[str, Any]:
    ok, note = ensure_installed()
    base = {
        "experiment": "perforatedai",
        "title": f"Side by side with perforatedai {PAI_VERSION}",
        "model": "as same_arch (MiniLM first layer, mean pooling, dendrites on the MLP Linears)",
        "data": "as same_arch (Rotten Tomatoes, same splits and tokenization)",
        "budget": "as same_arch: same lr, batch, eval interval, patience, threshold, one dendrite set, one try; "
                  "perforatedai in a plain PyTorch loop (its documented API), hf_dendrites = same_arch's dendrites_gd arm",
        "seeds": seeds,
        "changes_needed": CHANGES,
        "available": ok,
        "note": note,
        "runs": [],
    }
    if not ok:
        return base
    for seed in seeds:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(seed), "1" if quick else "0", str(work)]
        done = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=str(HERE))
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            err = (done.stderr or done.stdout).strip()[-1500:]
            base["runs"].append({"name": "perforatedai", "seed": seed, "error": err})
            print(f"  [perforatedai seed {seed}] FAILED: {err[-300:]}", flush=True)
            continue
        result = json.loads(lines[-1][len("RESULT "):])
        base["runs"].append(result)
        print(f"  [perforatedai seed {seed}] val {result['val_score']:.4f} test {result['test_score']:.4f} steps "
              f"{result['steps']} dendrites {result['num_dendrites_added']} ({result['train_seconds']:.0f} s)", flush=True)
    base["summary"] = summary(base["runs"])
    good = [r for r in base["runs"] if "error" not in r]
    probe = next((r.get("probe") for r in good if r.get("probe")), None)
    base["step_time_probe"] = probe
    return base


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Test accuracy and steps (mean, std, interval) of the runs that did not fail; params, dendrites added."""
    good = [r for r in runs if "error" not in r]
    return {
        "perforatedai": {
            "test": mean_std_ci([r["test_score"] for r in good]),
            "steps": mean_std_ci([r["steps"] for r in good]),
            "params": good[0]["params"] if good else None,
            "dendrites_added": [r["num_dendrites_added"] for r in good],
            "failed_seeds": [r["seed"] for r in runs if "error" in r],
        }
    }


def report(res: dict[str, Any], header, pct) -> list[str]:
    lines = header(res)
    if not res.get("available"):
        return lines + [f"perforatedai could not be run: {res.get('note')}", ""]
    same = None
    path = HERE / "results" / "same_arch.json"
    if path.is_file():
        import run_suite

        same = run_suite.resummarise("same_arch", json.loads(path.read_text()))
    lines += ["| library | params | steps | test accuracy (%) | dendrites kept / added |", "| --- | ---: | ---: | ---: | ---: |"]
    if same and "dendrites_gd" in same["summary"]:
        e = same["summary"]["dendrites_gd"]
        lines.append(f"| hf_dendrites (gd, DendriticTrainer) | {e['params']:,} | {e['steps']['mean']:.0f} | {pct(e['test'])} | "
                     f"{100 * e['dendrites_kept']:.0f} % of seeds |")
    e = res["summary"]["perforatedai"]
    if e["test"]["n"]:
        lines.append(f"| perforatedai {PAI_VERSION} (plain loop) | {e['params'] or 0:,} | {e['steps']['mean']:.0f} | {pct(e['test'])} | "
                     f"{e['dendrites_added']} |")
    if e["failed_seeds"]:
        err = next(r["error"] for r in res["runs"] if "error" in r)
        lines += ["", f"Failed seeds {e['failed_seeds']}; last error: `{err.splitlines()[-1] if err else '?'}`"]
    probe = res.get("step_time_probe")
    if probe:
        pai_ms = next((r["step_ms_by_dendrites"].get("1") for r in res["runs"] if "step_ms_by_dendrites" in r), None)
        lines += ["", "Training step time, batch of the benchmark, plain loop: "
                  f"plain model {probe['plain_ms']:.0f} ms, hf_dendrites with 1 dendrite {probe['hf_dendrites_1_dendrite_ms']:.0f} ms"
                  + (f", perforatedai with 1 dendrite (mean over its dendrite phase) {pai_ms:.0f} ms" if pai_ms else "")
                  + ". Caution: single measurements taken minutes apart in separate runs, not interleaved, so machine load "
                  "can move them; they are not a fair speed comparison. The interleaved per-layer timings in the "
                  "issue 7 section (same K, same function) are: perforatedai's layer about 1.16x the time of ours (median)."]
        lines += ["", "Params: counted on the model each library returned (perforatedai's count includes the dendrite "
                  "modules it keeps allocated)."]
    lines += ["", "What had to be changed to run perforatedai:", ""] + [f"- {c}" for c in res["changes_needed"]] + [""]
    return lines


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--worker":
    worker_main(sys.argv[2:])
