"""Cost of dendritic MoE experts against the plain experts module doing the same routed work (issue 19, part 4b).

An experts module whose E experts have K full-shape dendrites on both projections does the matrix work of the plain
experts module with (1 + K) times the intermediate size (gate-up: (1+K)*2I outputs, down: (1+K)*I inputs), for the
same routed (token, expert) pairs. This measures forward + backward (gradients for the input and every parameter) of:

- ``plain_wide``: transformers' `MixtralExperts` with intermediate size (1+K)*I (the limit; goal <= 1.3x of it);
- ``dendritic``: `MixtralExperts` of intermediate size I with K dendrites per expert (hf_dendrites.moe), output
  weights nonzero;
- ``plain``: the base `MixtralExperts` of size I without dendrites (for scale);
- ``dendritic_rank``: low-rank dendrites (rank r), against ``plain`` (what they add to the base).

Both plain modules run transformers' default `grouped_mm` experts implementation. The routing (top-k of E experts per
token, random but fixed) and the upstream gradient are the same for every variant. Variants are timed in
interleaved rounds and summarised by medians of per-round ratios (`bench_layers.time_rounds` / `summarise`).

Usage:
    python benchmarks/bench_moe.py            # about a minute on 2 CPU cores: writes results/moe_cost.json + RESULTS.md
    python benchmarks/bench_moe.py --quick    # seconds: tiny shapes, for the smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing
sys.path.insert(0, str(HERE))

from bench_layers import environment, summarise, time_rounds  # noqa: E402
from transformers import MixtralConfig  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import MixtralExperts  # noqa: E402

from hf_dendrites.moe import DendriticExperts  # noqa: E402

RESULTS_DIR = HERE / "results"
RESULTS_MD = HERE / "RESULTS.md"
MARKERS = ("<!-- issue19-moe:start -->", "<!-- issue19-moe:end -->")
TARGET_RATIO = 1.3
# (name, hidden, intermediate, experts, top_k, tokens): a small Mixtral / Qwen-MoE-like layer, CPU-sized.
FULL_SHAPES = [("small", 512, 384, 8, 2, 1024)]
QUICK_SHAPES = [("tiny", 32, 16, 4, 2, 64)]


def experts(hidden: int, intermediate: int, num: int) -> nn.Module:
    config = MixtralConfig(hidden_size=hidden, intermediate_size=intermediate, num_local_experts=num)
    config._experts_implementation = "grouped_mm"
    module = MixtralExperts(config)
    with torch.no_grad():
        module.gate_up_proj.normal_(0, hidden**-0.5)
        module.down_proj.normal_(0, intermediate**-0.5)
    return module


def train_step(module: nn.Module, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    params = [p for p in module.parameters() if p.requires_grad]

    def step() -> None:
        module(x, index, weights).backward(grad)
        x.grad = None
        for p in params:
            p.grad = None

    return step


def run(shapes: list, ks: list[int], rank: int, reps: int, log: Callable[[str], None]) -> list[dict]:
    rows = []
    for name, hidden, inter, num, top_k, tokens in shapes:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(tokens, hidden, generator=g, requires_grad=True)
        index = torch.stack([torch.randperm(num, generator=g)[:top_k] for _ in range(tokens)])
        weights = torch.rand(tokens, top_k, generator=g)
        grad = torch.randn(tokens, hidden, generator=g)
        for k in ks:
            torch.manual_seed(0)
            dendritic = DendriticExperts.from_base_layer(experts(hidden, inter, num))
            dendritic.add_dendrites(k)
            low = DendriticExperts.from_base_layer(experts(hidden, inter, num), rank=rank)
            low.add_dendrites(k)
            with torch.no_grad():  # nonzero output weights (new dendrites start at zero)
                for layer in (dendritic, low):
                    for proj in layer.projections:
                        getattr(layer, f"{proj}_dendrite_out").normal_(0, 0.1)
            variants = {
                "plain_wide": train_step(experts(hidden, (1 + k) * inter, num), x, index, weights, grad),
                "dendritic": train_step(dendritic, x, index, weights, grad),
                "plain": train_step(experts(hidden, inter, num), x, index, weights, grad),
                "dendritic_rank": train_step(low, x, index, weights, grad),
            }
            stats = summarise(time_rounds(variants, reps), "plain_wide")
            over_plain = summarise(time_rounds({"plain": variants["plain"], "dendritic_rank": variants["dendritic_rank"]}, reps), "plain")
            row = {
                "shape": name, "hidden": hidden, "intermediate": inter, "experts": num, "top_k": top_k, "tokens": tokens,
                "K": k, "rank": rank, "variants": stats, "rank_over_plain": over_plain["dendritic_rank"]["ratio"],
            }
            rows.append(row)
            log(
                f"{name} K={k}: plain_wide {stats['plain_wide']['median_ms']:.1f} ms, dendritic "
                f"{stats['dendritic']['median_ms']:.1f} ms ({stats['dendritic']['ratio']:.2f}x), plain "
                f"{stats['plain']['median_ms']:.1f} ms, rank-{rank} {stats['dendritic_rank']['median_ms']:.1f} ms "
                f"({row['rank_over_plain']:.2f}x plain)"
            )
    return rows


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        f"`{result['command']}` on {env['date']} ({env['cpu']}, {env['cpu_count']} CPU cores shared with other jobs, "
        f"load {env['loadavg_before'][0]:.1f} before / {env['loadavg_after'][0]:.1f} after, {env['threads']} torch "
        f"threads, torch {env['torch']}); forward + backward of `MixtralExperts` (transformers' grouped_mm "
        f"implementation), medians of {result['reps']} interleaved rounds; raw numbers in "
        "`benchmarks/results/moe_cost.json`.",
        "",
        "| shape (H, I, E, top-k, tokens) | K | plain (1+K)*I | dendritic K | ratio (goal <= 1.3) | plain I | "
        f"rank-{result['rank']} dendrites | rank / plain I |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        v = row["variants"]
        lines.append(
            f"| {row['shape']} ({row['hidden']}, {row['intermediate']}, {row['experts']}, {row['top_k']}, {row['tokens']}) "
            f"| {row['K']} | {v['plain_wide']['median_ms']:.1f} ms | {v['dendritic']['median_ms']:.1f} ms | "
            f"{v['dendritic']['ratio']:.2f}x | {v['plain']['median_ms']:.1f} ms | {v['dendritic_rank']['median_ms']:.1f} ms "
            f"| {row['rank_over_plain']:.2f}x |"
        )
    met = [str(r["K"]) for r in result["rows"] if r["variants"]["dendritic"]["ratio"] <= TARGET_RATIO]
    missed = [str(r["K"]) for r in result["rows"] if r["variants"]["dendritic"]["ratio"] > TARGET_RATIO]
    lines += [
        "",
        f"- Goal (dendritic K at most {TARGET_RATIO}x the plain experts of (1+K)*I, the same matrix work): "
        f"met for K = {', '.join(met) or 'none'}" + (f"; missed for K = {', '.join(missed)}." if missed else "."),
        "- The difference is the dendrites' elementwise work (activation, per-expert output weights gathered per "
        "routed row, the sum over K) and a second grouped product per projection. Low-rank dendrites run two small "
        "grouped products per projection (A, then B over expert x dendrite groups) plus the same elementwise work, "
        "which is why rank 16 costs more than its share of the matrix work here; timings on a shared CPU vary by "
        "about 10 %.",
    ]
    return "\n".join(lines)


def write_markdown(body: str, path: Path = RESULTS_MD) -> None:
    """Replace this benchmark's block in RESULTS.md (between its markers), or append it as a section at the end."""
    start, end = MARKERS
    block = f"{start}\n{body.rstrip()}\n{end}"
    text = path.read_text(encoding="utf-8")
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n## MoE experts cost (issue 19)\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few rounds (seconds), for the smoke test")
    parser.add_argument("--reps", type=int, default=None, help="timed rounds (default 7, quick 2)")
    parser.add_argument("--ks", default=None, help="comma-separated dendrite counts (default 1,2; quick 1)")
    parser.add_argument("--rank", type=int, default=None, help="rank of the low-rank variant (default 16, quick 4)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's default)")
    parser.add_argument("--output", default=None, help="JSON path (default results/moe_cost.json; quick: results/quick/moe_cost.json)")
    args = parser.parse_args(argv)
    command = " ".join(["python", f"benchmarks/{Path(__file__).name}"] + list(sys.argv[1:] if argv is None else argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = args.reps or (2 if args.quick else 7)
    ks = [int(k) for k in (args.ks or ("1" if args.quick else "1,2")).split(",")]
    rank = args.rank or (4 if args.quick else 16)
    env = environment(torch.get_num_threads())
    result = {"command": command, "quick": args.quick, "reps": reps, "rank": rank, "target_ratio": TARGET_RATIO, "environment": env}
    result["rows"] = run(QUICK_SHAPES if args.quick else FULL_SHAPES, ks, rank, reps, lambda m: print(m, flush=True))
    env["loadavg_after"] = os.getloadavg()
    out = Path(args.output) if args.output else RESULTS_DIR / ("quick" if args.quick else "") / "moe_cost.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    if not args.quick:
        write_markdown(markdown(result))
    return result


if __name__ == "__main__":
    main()
