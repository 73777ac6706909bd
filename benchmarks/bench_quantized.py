"""A dendritic 4-bit Linear against the same 4-bit Linear with a plain LoRA of the same trainable size (issue 19, 4a).

The base is a bitsandbytes `Linear4bit` (nf4, compute dtype float32, frozen), quantized on the CPU. Timed: forward +
backward (gradients for the input and every trainable parameter) of

- ``lora``: PEFT's LoRA layer for bitsandbytes 4-bit (`peft.tuners.lora.bnb.Linear4bit`, dropout 0) of rank r + 1;
- ``dendritic``: the library's layer on the same base with one low-rank dendrite of rank r (`DendriteConfig(rank=r)`,
  tanh): r*in + N*r + 2*N trainable values, exactly LoRA's (r+1)*(in+N) for a square layer;
- ``base``: the quantized layer alone (no adapter), for scale.

The goal is dendritic / lora <= 1.2. Variants are timed in interleaved rounds with a rotating order; a ratio is the
median over rounds of the two variants' times measured in the same round (`bench_layers.summarise`), which cancels
most of the drift caused by other processes on a shared CPU.

Usage:
    python benchmarks/bench_quantized.py --threads 1    # 2048 x 2048, 512 tokens (about a minute): writes
                                                        # results/quantized_cost.json and its RESULTS.md table
    python benchmarks/bench_quantized.py --quick        # seconds: tiny shapes, RESULTS.md left alone
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing
sys.path.insert(0, str(HERE))

from bench_layers import describe_environment, environment, optional_version, summarise, time_rounds, train_step  # noqa: E402
from bench_rules import write_section  # noqa: E402

from hf_dendrites import DendriteConfig, get_dendritic_model  # noqa: E402

RESULTS_DIR = HERE / "results"
RESULTS_MD = HERE / "RESULTS.md"
SECTION_TITLE = "## Quantized bases (issue 19)"
MARKER = "issue19-quantized"
TARGET_RATIO = 1.2
FULL = {"n_in": 2048, "n_out": 2048, "tokens": 512, "rank": 8, "reps": 15}
QUICK = {"n_in": 64, "n_out": 64, "tokens": 32, "rank": 2, "reps": 3}


def quantized_linear(n_in: int, n_out: int, seed: int = 0) -> nn.Module:
    """A frozen nf4 `Linear4bit` quantized on the CPU from a random weight (bitsandbytes quantizes on `.to`)."""
    import bitsandbytes as bnb

    torch.manual_seed(seed)
    layer = bnb.nn.Linear4bit(n_in, n_out, bias=False, quant_type="nf4", compute_dtype=torch.float32)
    layer = layer.to("cpu")
    layer.support_avx512bf16_for_cpu = False  # bitsandbytes' standard kernel, as in training (docs/quantization.md)
    return layer.train()


def lora_layer(n_in: int, n_out: int, r: int) -> nn.Module:
    from peft import LoraConfig
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    config = LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=["bench"])
    layer = LoraLinear4bit(quantized_linear(n_in, n_out), "default", config=config, r=r, lora_alpha=r)
    with torch.no_grad():  # a trained adapter: B away from its zero start
        nn.init.normal_(layer.lora_B["default"].weight, 0, 0.1)
    return layer.train()


def dendritic_layer(n_in: int, n_out: int, r: int) -> nn.Module:
    holder = nn.Sequential(quantized_linear(n_in, n_out))
    dm = get_dendritic_model(holder, DendriteConfig(target_modules=["0"], rank=r, dendrite_seed=0))
    dm.add_dendrites(1)
    layer = dm.model[0]
    with torch.no_grad():  # non-zero dendrite-to-neuron weights, as after some training
        layer.dendrite_out.normal_(0, 0.1)
    return layer.train()


def trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def run(shape: dict, log) -> dict:
    n_in, n_out, tokens, r = shape["n_in"], shape["n_out"], shape["tokens"], shape["rank"]
    lora_rank = r + 1 if n_in == n_out else r
    layers = {"base": quantized_linear(n_in, n_out), "lora": lora_layer(n_in, n_out, lora_rank), "dendritic": dendritic_layer(n_in, n_out, r)}
    x = torch.randn(tokens, n_in, generator=torch.Generator().manual_seed(1)).requires_grad_()
    grad = torch.randn(tokens, n_out, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(layers["base"](x), layers["dendritic"].to_base_layer()(x)), "not the same quantized base"
    times = time_rounds({name: train_step(layer, x, grad) for name, layer in layers.items()}, shape["reps"])
    stats = summarise(times, "lora")
    result = {
        **shape,
        "lora_rank": lora_rank,
        "trainable": {name: trainable(layer) for name, layer in layers.items()},
        "times": stats,
        "dendritic_over_lora": stats["dendritic"]["ratio"],
        "target": TARGET_RATIO,
    }
    log(f"{n_in}x{n_out}, {tokens} tokens: base {stats['base']['median_ms']:.1f} ms, LoRA r={lora_rank} "
        f"{stats['lora']['median_ms']:.1f} ms, dendritic r={r} {stats['dendritic']['median_ms']:.1f} ms; "
        f"dendritic / LoRA {result['dendritic_over_lora']:.3f} (trainable {result['trainable']['dendritic']:,} vs "
        f"{result['trainable']['lora']:,})")
    return result


def markdown(result: dict, command: str) -> str:
    env, row = result["environment"], result["result"]
    t = row["times"]
    miss = "" if row["dendritic_over_lora"] <= TARGET_RATIO else " **(miss)**"
    return "\n".join([
        "### A dendritic 4-bit Linear vs the same 4-bit Linear with LoRA (forward + backward)",
        "",
        f"Generated by `{command}` on {describe_environment(env)} bitsandbytes {result['versions']['bitsandbytes']}, "
        f"peft {result['versions']['peft']}. Base: bitsandbytes `Linear4bit` nf4 (compute dtype float32, frozen, "
        "bitsandbytes' standard CPU kernel); gradients for the input and the trainable parameters. Ratios are the "
        f"median over {row['reps']} interleaved rounds of per-round paired ratios (goal dendritic / LoRA <= {TARGET_RATIO}).",
        "",
        "| layer | tokens | variant | trainable | median ms | / LoRA |",
        "|---|---|---|---|---|---|",
        f"| {row['n_in']} -> {row['n_out']} | {row['tokens']} | 4-bit base alone | 0 | {t['base']['median_ms']:.1f} | {t['base']['ratio']:.3f} |",
        f"| {row['n_in']} -> {row['n_out']} | {row['tokens']} | + PEFT LoRA r={row['lora_rank']} | {row['trainable']['lora']:,} | {t['lora']['median_ms']:.1f} | 1 |",
        f"| {row['n_in']} -> {row['n_out']} | {row['tokens']} | + 1 dendrite, rank {row['rank']} | {row['trainable']['dendritic']:,} | {t['dendritic']['median_ms']:.1f} | {row['dendritic_over_lora']:.3f}{miss} |",
    ])


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, a few seconds; RESULTS.md is left alone")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--results-dir", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python benchmarks/bench_quantized.py" + (" --quick" if args.quick else "") + (f" --threads {args.threads}" if args.threads else "")
    env = environment(torch.get_num_threads())
    row = run(QUICK if args.quick else FULL, print)
    env["loadavg_after"] = os.getloadavg()
    result = {
        "command": command,
        "quick": args.quick,
        "environment": env,
        "versions": {"bitsandbytes": optional_version("bitsandbytes"), "peft": optional_version("peft")},
        "result": row,
    }
    os.makedirs(args.results_dir, exist_ok=True)
    out = Path(args.results_dir) / ("quantized_cost_quick.json" if args.quick else "quantized_cost.json")
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    if not args.quick:
        write_section(markdown(result, command), RESULTS_MD, MARKER, SECTION_TITLE)
        print(f"updated {RESULTS_MD}")
    return result


if __name__ == "__main__":
    main()
