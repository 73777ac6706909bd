"""Per-process memory and step time of FSDP2 with dendrites, at 2 processes (issue 20, part 4).

Four runs of the same training step on the same model (a 4-layer BERT classifier, hidden 256, intermediate 1024),
each launched as its own 2-process job (`torch.distributed.run`, one process per rank):

- `ddp`: DDP, no dendrites;           - `ddp+dendrites`: DDP, one full-rank dendrite in every linear layer;
- `fsdp2`: FSDP2, no dendrites;        - `fsdp2+dendrites`: FSDP2, the same dendrites.

FSDP2 is set up as `DendriticTrainer` does it on CPU (accelerate's state switched to FSDP with an FSDP2 plugin that
wraps every `BertLayer`; hf_dendrites/fsdp.py), with Adam. Each rank measures, after an optimizer step (before the
gradients are cleared), the bytes it holds of parameters, gradients and optimizer state (for a sharded tensor its
own shard), and times `--steps` training steps (forward, backward, optimizer step) after 3 warm-up steps; the
figures are the median over steps of the slower rank. `fsdp2+dendrites` also times one growth the way the trainer
does it (gather into a plain model, add a dendrite per layer, new optimizer, shard again).

Goals (issue 20): per-rank memory of `fsdp2+dendrites` at most 0.6x `ddp+dendrites`; step time of `fsdp2+dendrites` at
most 1.2x `fsdp2` at equal dendrite work, read here as the step-time cost of the dendrites under FSDP2
(`fsdp2+dendrites` / `fsdp2`) over their cost under DDP (`ddp+dendrites` / `ddp`), which is the same dendrite work.

Writes `benchmarks/results/fsdp.json` and prints a markdown table (quoted in `benchmarks/RESULTS.md`).

    python benchmarks/bench_fsdp.py [--steps 20] [--device cpu|cuda]

`--device cuda` runs the same on 2 GPUs (NCCL); without `--device` the processes run on the CPU with gloo.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

import torch
import transformers

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "fsdp.json")
RUNS = ("ddp", "ddp+dendrites", "fsdp2", "fsdp2+dendrites")
BATCH, SEQ, VOCAB = 8, 64, 2000


def model_config() -> transformers.BertConfig:
    return transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
        max_position_embeddings=SEQ, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )


def local_bytes(tensor: torch.Tensor | None) -> int:
    """Bytes this process holds of `tensor` (its own shard of a DTensor)."""
    if tensor is None:
        return 0
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        tensor = tensor.to_local()
    return tensor.numel() * tensor.element_size()


def memory(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    params = list(model.parameters())
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    out = {
        "params": sum(local_bytes(p) for p in params),
        "grads": sum(local_bytes(p.grad) for p in params),
        "optimizer": sum(local_bytes(v) for v in state),
    }
    out["total"] = sum(out.values())
    return out


def worker(run: str, steps: int, output: str, device: str) -> None:
    import torch.distributed as dist
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin

    from hf_dendrites import DendriteConfig, fsdp, get_dendritic_model, trainer_internals

    transformers.logging.set_verbosity_error()
    accelerator = Accelerator(cpu=device == "cpu")
    if run.startswith("fsdp2"):
        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["BertLayer"]
        )
        trainer_internals.switch_to_fsdp(accelerator, plugin)
    torch.manual_seed(0)
    model = get_dendritic_model(
        transformers.BertForSequenceClassification(model_config()), DendriteConfig(target_modules="all-linear", dendrite_seed=0)
    )
    if run.endswith("dendrites"):
        model.add_dendrites(1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    generator = torch.Generator().manual_seed(1 + dist.get_rank())
    dev = accelerator.device

    def step() -> float:
        ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator).to(dev)
        labels = torch.randint(0, 2, (BATCH,), generator=generator).to(dev)
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=labels).loss
        accelerator.backward(loss)
        optimizer.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(3):
        step()
        optimizer.zero_grad()
    times = []
    for _ in range(steps):
        times.append(step())
        mem = memory(model, optimizer)
        optimizer.zero_grad()
    result = {"run": run, "rank": dist.get_rank(), "distributed_type": str(accelerator.distributed_type),
              "memory": mem, "step_s": statistics.median(times), "steps": steps}
    if run == "fsdp2+dendrites":
        dist.barrier()
        start = time.perf_counter()
        fsdp.unshard(model)  # as DendriticTrainer does at a growth (hf_dendrites/fsdp.py)
        model.add_dendrites(1)
        trainer_internals.forget_prepared(accelerator, optimizers=[optimizer], models=[model])
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        model, optimizer = accelerator.prepare(model, optimizer)
        dist.barrier()
        result["growth_rebuild_s"] = time.perf_counter() - start
        result["sharded_after_growth"] = fsdp.is_sharded(model)
    with open(os.path.join(output, f"{run}-rank{dist.get_rank()}.json"), "w", encoding="utf-8") as handle:
        json.dump(result, handle)
    dist.barrier()
    dist.destroy_process_group()


def launch(run: str, steps: int, output: str, device: str) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), os.path.abspath(__file__), "--worker", run, "--steps", str(steps),
           "--output", output, "--device", device]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{run} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return [json.load(open(os.path.join(output, f"{run}-rank{r}.json"))) for r in range(2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--worker", choices=RUNS, help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.worker:
        return worker(cli.worker, cli.steps, cli.output, cli.device)

    import tempfile

    load_before = os.getloadavg()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run in RUNS:
            ranks = launch(run, cli.steps, tmp, cli.device)
            rows[run] = {
                "distributed_type": ranks[0]["distributed_type"],
                "memory_bytes": max((r["memory"] for r in ranks), key=lambda m: m["total"]),
                "step_ms": 1000 * max(r["step_s"] for r in ranks),
                **({"growth_rebuild_ms": 1000 * max(r["growth_rebuild_s"] for r in ranks),
                    "sharded_after_growth": all(r["sharded_after_growth"] for r in ranks)} if run == "fsdp2+dendrites" else {}),
            }
    mem = {k: v["memory_bytes"]["total"] for k, v in rows.items()}
    t = {k: v["step_ms"] for k, v in rows.items()}
    summary = {
        "memory_fsdp2_dendrites_over_ddp_dendrites": mem["fsdp2+dendrites"] / mem["ddp+dendrites"],
        "step_fsdp2_dendrites_over_fsdp2": t["fsdp2+dendrites"] / t["fsdp2"],
        "step_ddp_dendrites_over_ddp": t["ddp+dendrites"] / t["ddp"],
    }
    summary["dendrite_step_cost_fsdp2_over_ddp"] = summary["step_fsdp2_dendrites_over_fsdp2"] / summary["step_ddp_dendrites_over_ddp"]
    record = {
        "command": "python benchmarks/bench_fsdp.py" + (f" --steps {cli.steps}" if cli.steps != 20 else "")
        + (f" --device {cli.device}" if cli.device != "cpu" else ""),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
        "load_average_before_after": [load_before, os.getloadavg()],
        "model": "BertForSequenceClassification hidden 256, 4 layers, intermediate 1024; all-linear dendrites (full rank, 1 per layer)",
        "batch_per_rank": [BATCH, SEQ],
        "processes": 2,
        "device": cli.device,
        "runs": rows,
        "summary": summary,
    }
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=1)
    print("| run | distributed type | params MB | grads MB | optimizer MB | total MB / rank | step ms |")
    print("|---|---|---|---|---|---|---|")
    for run, row in rows.items():
        m = row["memory_bytes"]
        print(f"| {run} | {row['distributed_type'].split('.')[-1]} | {m['params'] / 1e6:.2f} | {m['grads'] / 1e6:.2f} | "
              f"{m['optimizer'] / 1e6:.2f} | {m['total'] / 1e6:.2f} | {row['step_ms']:.1f} |")
    print(json.dumps(summary, indent=1))
    print(f"growth rebuild (gather, grow, shard again): {rows['fsdp2+dendrites']['growth_rebuild_ms']:.0f} ms")


if __name__ == "__main__":
    main()
