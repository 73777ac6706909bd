"""Cost of the two learning rules (issue 6): a gd cycle's training step against the correlation rule's steps.

On all-MiniLM-L6-v2 with `target_modules="all-linear"` (36 layers) and a classification head, one training step
(forward, loss, backward, optimizer step) of:

- `plain`: the model without dendrites (reference);
- `gd cycle`: one dendrite per layer, everything training with AdamW (what a gd cycle runs);
- `correlation candidates`: the candidate phase of the correlation rule (network frozen, a pool of
  `--pool` candidates per layer trained against the captured errors: error capture, exact statistics, Adam step);
- `correlation neuron phase`: one installed, perforated dendrite per layer (input weights frozen, input detached),
  everything else training with AdamW.

Time: medians over interleaved rounds, ratio to `plain` per round. Memory: static bytes (parameters, optimizer
state, and for the candidate phase the candidates and their statistics) and the exact peak of tensor storage
created during a step (the dispatch-mode tracker of bench_model.py).

Usage:
    python benchmarks/bench_rules.py            # results/rules_cost.json + its RESULTS.md section
    python benchmarks/bench_rules.py --quick    # seconds, a tiny random BERT; writes results/quick/ only
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys
from pathlib import Path
from typing import Optional

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_layers import RESULTS_DIR, RESULTS_MD, describe_environment, environment, summarise, time_rounds  # noqa: E402
from bench_model import LiveStorageTracker, load_minilm, make_batch, tensor_bytes  # noqa: E402

from hf_dendrites import DendriteConfig, get_dendritic_model  # noqa: E402
from hf_dendrites.learning_rules import CorrelationRule, perforate  # noqa: E402

SECTION = "## Learning-rule cost (issue 6)"
MARKER = "issue6-rules"


class Variant:
    """A model and its training step; `static` lists the long-lived tensors (parameters, optimizer state, ...)."""

    def __init__(self, model, batch, optimizer, rule: Optional[CorrelationRule] = None):
        self.model, self.batch, self.optimizer, self.rule = model, batch, optimizer, rule
        model.train()

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.model(**self.batch).loss.backward()
        if self.rule is not None:
            self.rule.accumulate()
        self.optimizer.step()

    def static_tensors(self) -> list[torch.Tensor]:
        tensors = list(self.model.parameters())
        tensors += [t for s in self.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor) and t.dim() > 0]
        if self.rule is not None:
            tensors += self.rule.parameters()
            for st in self.rule.stats.values():
                tensors += [t for t in st.tensors() if t.dim() > 0]
        return tensors


def dendritic(base, rule: str, pool: int):
    config = DendriteConfig(target_modules="all-linear", dendrite_seed=0, learning_rule=rule, candidate_pool_size=pool)
    return get_dendritic_model(copy.deepcopy(base), config)


def build_variants(base, batch, pool: int) -> dict[str, Variant]:
    adamw = lambda m: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)  # noqa: E731
    variants = {}
    plain = copy.deepcopy(base)
    variants["plain"] = Variant(plain, batch, adamw(plain))

    gd = dendritic(base, "gd", pool)
    gd.add_dendrites(1)
    with torch.no_grad():  # as after some training: the dendrites contribute and get gradients
        for _, layer in gd.dendritic_layers():
            layer.dendrite_out.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    variants["gd cycle"] = Variant(gd, batch, adamw(gd))

    cand = dendritic(base, "correlation", pool)
    rule = CorrelationRule(cand, pool_size=pool, generator=torch.Generator().manual_seed(0))
    rule.start()
    variants["correlation candidates"] = Variant(cand, batch, rule.optimizer(lr=1e-2), rule)

    neuron = dendritic(base, "correlation", pool)
    neuron.add_dendrites(1)
    with torch.no_grad():
        for _, layer in neuron.dendritic_layers():
            layer.dendrite_out.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
            perforate(layer)
    variants["correlation neuron phase"] = Variant(neuron, batch, adamw(neuron))
    return variants


def measure(variants: dict[str, Variant], reps: int) -> dict:
    for v in variants.values():  # optimizer state and first-step allocations before anything is measured
        v.step()
    times = summarise(time_rounds({n: v.step for n, v in variants.items()}, reps), "plain")
    out = {}
    for name, v in variants.items():
        static = v.static_tensors()
        v.optimizer.zero_grad(set_to_none=True)
        tracker = LiveStorageTracker(static + list(v.batch.values()))
        with tracker:
            v.step()
        out[name] = {
            **times[name],
            "static_bytes": tensor_bytes(static),
            "step_peak_bytes": tracker.peak,
            "trainable_params": sum(p.numel() for p in v.model.parameters() if p.requires_grad)
            + (sum(p.numel() for p in v.rule.parameters()) if v.rule is not None else 0),
        }
    return out


def markdown(result: dict) -> str:
    mib = 1024 * 1024
    rows = result["variants"]
    lines = [
        f"Generated by `python benchmarks/bench_rules.py` on {describe_environment(result['environment'])}",
        "",
        f"Model: {result['model']}, `all-linear` targets ({result['layers']} layers), batch {result['batch']} x "
        f"{result['seq']} tokens, candidate pool {result['pool']}, {result['reps']} interleaved rounds. "
        "Time ratio: per-round paired ratio to `plain`, median. Memory: static = parameters + optimizer state "
        "(+ candidates and their statistics); step peak = the largest total of tensor storage created during a step.",
        "",
        "| step | median ms | time / plain | time / gd cycle | trainable params | static MiB | step peak MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    gd = rows["gd cycle"]["median_ms"]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['median_ms']:.0f} | {r['ratio']:.2f} | {r['median_ms'] / gd:.2f} | {r['trainable_params']:,} | "
            f"{r['static_bytes'] / mib:.1f} | {r['step_peak_bytes'] / mib:.1f} |"
        )
    cand, gdr = rows["correlation candidates"], rows["gd cycle"]
    lines += [
        "",
        f"A candidate-phase step took {cand['median_ms'] / gd:.2f}x the time of a gd-cycle step, with "
        f"{(cand['static_bytes'] - gdr['static_bytes']) / mib:+.1f} MiB static and "
        f"{(cand['step_peak_bytes'] - gdr['step_peak_bytes']) / mib:+.1f} MiB step peak against it. The candidate "
        "phase needs no weight gradients of the network, but runs its full backward pass to capture the errors, "
        "and the candidates' own matmul, statistics and two vector-Jacobian products per layer (three when normalised).",
    ]
    return "\n".join(lines)


def write_section(body: str, path: Path = RESULTS_MD, marker: str = MARKER, section: Optional[str] = None) -> None:
    """Put `body` between `marker`'s start / end comments in RESULTS.md; the section (`section` title, default this
    benchmark's) is appended with them when they are missing."""
    section = SECTION if section is None else section
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    if start in text and end in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + f"\n\n{section}\n\n{block}\n"
    path.write_text(text, encoding="utf-8")


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny random BERT, few rounds (smoke test)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--pool", type=int, default=4, help="correlation candidates per layer")
    parser.add_argument("--reps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.batch, args.seq, args.reps = 4, 8, 3
    env = environment(args.threads)
    base = load_minilm(args.quick)
    batch = make_batch(base, args.batch, args.seq)
    variants = build_variants(base, batch, args.pool)
    result = {
        "model": "tiny random BERT" if args.quick else "all-MiniLM-L6-v2 + classification head",
        "layers": sum(1 for _ in variants["gd cycle"].model.dendritic_layers()),
        "batch": args.batch,
        "seq": args.seq,
        "pool": args.pool,
        "reps": args.reps,
        "variants": measure(variants, args.reps),
    }
    result["environment"] = {**env, "loadavg_after": os.getloadavg()}
    out = RESULTS_DIR / "quick" / "rules_cost.json" if args.quick else RESULTS_DIR / "rules_cost.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(markdown(result))
    if not args.quick:
        write_section(markdown(result))
    return result


if __name__ == "__main__":
    main()
