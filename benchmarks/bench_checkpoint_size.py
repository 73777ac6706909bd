"""Checkpoint size with a frozen base and rank-4 dendrites: full saves against adapter-only ones (issue 18, part 3).

For each real model (MiniLM, and SmolLM2-135M unless `--models minilm`), the base is frozen (MiniLM keeps its new
classification head trainable; SmolLM2 trains its dendrites only), one rank-4 dendrite is added to every default
target layer, and then:

- `save_pretrained` is timed and measured both ways (full; `adapter_only=True`), and `from_pretrained` of each;
- the fingerprint (SHA-256 of every frozen tensor) is timed on its own;
- a real `DendriticTrainer` run of 2 steps writes `checkpoint-2`, once as the library does for a frozen base
  (adapter-only) and once with the full model files, and every file of both is measured. The target for the
  adapter-only checkpoint: the trainable weights + the optimizer state + under 1 MB of everything else.

`minilm-lora` is MiniLM as a PEFT model: LoRA (r=8 on the attention's query and value, `task_type="SEQ_CLS"`, so
PEFT trains a copy of the new head), then the same rank-4 dendrites on the model's own layers; PEFT freezes the base.

Writes `benchmarks/results/checkpoint_size.json` (a run for some models replaces their rows and keeps the others,
each row with the command, date and machine that measured it) and prints a markdown table (quoted in
`benchmarks/RESULTS.md`).

    python benchmarks/bench_checkpoint_size.py [--models minilm smollm2 minilm-lora] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from unittest import mock

import torch
import transformers

from hf_dendrites import (
    DendriteConfig,
    DendriticModel,
    DendriticTrainer,
    DendriticTrainingArguments,
    get_dendritic_model,
)
from hf_dendrites.example_data import minilm_path, smollm2_path
from hf_dendrites.saving import base_fingerprint

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "checkpoint_size.json")
MB = 1e6


def folder_files(folder: str) -> dict[str, int]:
    """{relative path: bytes} of every file under `folder`."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = os.path.getsize(path)
    return out


MODELS = ("minilm", "smollm2", "minilm-lora")


def load_base(name: str):
    if name in ("minilm", "minilm-lora"):
        path = minilm_path()
        model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        head = "classifier."
    else:
        path = smollm2_path()
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        head = None  # lm_head is tied to the input embedding: frozen with the base
    return path, model, head


def frozen_dendritic(name: str):
    path, model, head = load_base(name)
    if name == "minilm-lora":  # PEFT freezes the base and trains LoRA and its own copy of the head
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, target_modules=["query", "value"], task_type="SEQ_CLS"))
    else:
        for pname, param in model.named_parameters():
            param.requires_grad_(head is not None and pname.startswith(head))
    dm = get_dendritic_model(model, DendriteConfig(rank=4, dendrite_seed=0))
    dm.add_dendrites(1)
    return path, dm


def train_data(name: str, n: int = 8, length: int = 32) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    classifier = name.startswith("minilm")
    vocab = 30000 if classifier else 49000
    rows = []
    for _ in range(n):
        ids = torch.randint(100, vocab, (length,), generator=g).tolist()
        row = {"input_ids": ids, "attention_mask": [1] * length}
        row["labels"] = int(ids[0] % 2) if classifier else ids
        rows.append(row)
    return rows


def trainer_checkpoint(name: str, output_dir: str, adapter_only: bool) -> dict[str, int]:
    """Train 2 steps (evaluation and checkpoint at step 2); the files of `checkpoint-2`."""
    _, dm = frozen_dendritic(name)
    args = DendriticTrainingArguments(
        output_dir=output_dir, max_steps=2, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
        per_device_train_batch_size=4, per_device_eval_batch_size=4, learning_rate=1e-3, use_cpu=True, report_to=[],
        disable_tqdm=True, seed=0,
    )
    data = train_data(name)
    trainer = DendriticTrainer(dm, args, train_dataset=data, eval_dataset=data[:4])
    if adapter_only:
        trainer.train()
    else:  # the full model files, as every checkpoint had before adapter-only checkpoints
        with mock.patch("hf_dendrites.callback.checkpoint_save_options", lambda requires_grad: {}):
            trainer.train()
    return folder_files(os.path.join(output_dir, "checkpoint-2"))


def measure(name: str, work: str) -> dict:
    t0 = time.perf_counter()
    path, dm = frozen_dendritic(name)
    load_s = time.perf_counter() - t0
    summary = dm.dendrite_summary()
    model_state = dm.model.state_dict()
    dendrite_keys = set(dm.dendrite_state_dict())
    names = dm.checkpoint_names()  # a PEFT model's own tensors under the plain names; its adapter is the rest
    base_state = {names[k]: v for k, v in model_state.items() if k in names and k not in dendrite_keys}
    trained, frozen, aliases = dm._split_adapter_only(base_state)  # as save_pretrained(adapter_only=True) splits
    trained_bytes = sum(t.numel() * t.element_size() for t in trained.values())
    adapter_bytes = sum(t.numel() * t.element_size() for k, t in model_state.items() if k not in names)
    dendrite_bytes = sum(t.numel() * t.element_size() for t in dm.dendrite_state_dict().values())
    frozen_bytes = sum(t.numel() * t.element_size() for t in frozen.values())

    hash_times = []
    for _ in range(3):
        t0 = time.perf_counter()
        base_fingerprint(frozen)
        hash_times.append(time.perf_counter() - t0)

    out = {}
    for kind, kwargs in (("full", {}), ("adapter_only", {"adapter_only": True})):
        folder = os.path.join(work, f"{name}-{kind}")
        t0 = time.perf_counter()
        dm.save_pretrained(folder, **kwargs)
        save_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        loaded = DendriticModel.from_pretrained(folder)
        from_s = time.perf_counter() - t0
        got, want = loaded.state_dict(), dm.state_dict()
        same = got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        files = folder_files(folder)
        out[kind] = {"files": files, "bytes": sum(files.values()), "save_s": round(save_s, 3),
                     "from_pretrained_s": round(from_s, 3), "state_identical": same}
        del loaded

    checkpoints = {}
    for kind, adapter in (("full", False), ("adapter_only", True)):
        files = trainer_checkpoint(name, os.path.join(work, f"{name}-trainer-{kind}"), adapter)
        checkpoints[kind] = {"files": files, "bytes": sum(files.values())}
    ckpt = checkpoints["adapter_only"]
    weights = sum(v for k, v in ckpt["files"].items() if k.endswith(".safetensors"))
    optimizer = ckpt["files"].get("optimizer.pt", 0)
    other = ckpt["bytes"] - weights - optimizer
    return {
        "model": name,
        "base": path,
        "load_and_convert_s": round(load_s, 2),
        "params": {"base": summary.base_params, "dendrite": summary.dendrite_params, "trainable": summary.trainable_params},
        "bytes": {"frozen": frozen_bytes, "trained_base": trained_bytes, "dendrites": dendrite_bytes, "adapter": adapter_bytes},
        "frozen_tensors": len(frozen),
        "tied_aliases": aliases,
        "fingerprint_s": [round(t, 3) for t in hash_times],
        "fingerprint_GB_per_s": round(frozen_bytes / 1e9 / min(hash_times), 2),
        "save_pretrained": out,
        "trainer_checkpoint": checkpoints,
        "adapter_checkpoint_breakdown": {
            "weight_files": weights, "optimizer_pt": optimizer, "everything_else": other,
            "trainable_bytes": trained_bytes + dendrite_bytes + adapter_bytes,
        },
    }


def table(results: list[dict]) -> str:
    lines = [
        "| model | frozen base | trainable (dendrites + head + adapter) | save_pretrained full | adapter-only | Trainer checkpoint full "
        "| adapter-only | of which weights / optimizer / rest | fingerprint |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        b, sp, tc, br = r["bytes"], r["save_pretrained"], r["trainer_checkpoint"], r["adapter_checkpoint_breakdown"]
        lines.append(
            f"| {r['model']} | {b['frozen'] / MB:.1f} MB ({r['frozen_tensors']} tensors) "
            f"| {(b['dendrites'] + b['trained_base'] + b.get('adapter', 0)) / MB:.2f} MB | {sp['full']['bytes'] / MB:.1f} MB "
            f"| {sp['adapter_only']['bytes'] / MB:.2f} MB | {tc['full']['bytes'] / MB:.1f} MB "
            f"| {tc['adapter_only']['bytes'] / MB:.2f} MB | {br['weight_files'] / MB:.2f} / {br['optimizer_pt'] / MB:.2f} / "
            f"{br['everything_else'] / MB:.3f} MB | {min(r['fingerprint_s']):.2f} s ({r['fingerprint_GB_per_s']} GB/s) |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    run = {
        "command": "python benchmarks/bench_checkpoint_size.py " + " ".join(sys.argv[1:]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
                   f"transformers {transformers.__version__}, {args.threads} thread(s)",
    }
    rows = {}
    if os.path.isfile(RESULTS):  # the other models' rows stay, with the run that measured them
        with open(RESULTS) as handle:
            old = json.load(handle)
        earlier = {k: old[k] for k in ("command", "date", "machine") if k in old}  # (one run for all rows before)
        rows = {r["model"]: {**r, "run": r.get("run", earlier)} for r in old.get("results", [])}
    with tempfile.TemporaryDirectory(prefix="bench_checkpoint_size_") as work:
        for name in args.models:
            rows[name] = {**measure(name, work), "run": run}
            print(json.dumps({k: rows[name][k] for k in ("model", "bytes", "fingerprint_s")}), flush=True)
    results = [rows[name] for name in MODELS if name in rows]
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as handle:
        json.dump({"results": results}, handle, indent=1)
    print(table(results))


if __name__ == "__main__":
    main()
