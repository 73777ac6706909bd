"""Measure one configuration for the suite's `cost` experiment and print one JSON line.

Runs in a fresh process (started by `run_suite.py`) so that the peak resident memory belongs to this
configuration alone: MiniLM's first N layers with mean pooling, K dendrites on every MLP Linear, AdamW steps on a
random token batch, then inference batches.

    python benchmarks/cost_probe.py --dendrites 2 --layers 2 --batch 32 --seq 32 --steps 10
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness as H  # noqa: E402

from hf_dendrites.example_data import minilm_path  # noqa: E402


def rss_mb() -> float:
    """Current resident memory of this process (Linux /proc), in MB."""
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dendrites", type=int, default=0)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import torch

    from hf_dendrites import DendriteConfig, get_dendritic_model

    H.quiet()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    model = H.BertForMeanPooledClassification.from_pretrained(minilm_path(), num_labels=2)
    H.keep_first_layers(model, args.layers)
    dm = get_dendritic_model(model, DendriteConfig(target_modules=H.MLP_TARGETS, dendrite_seed=args.seed))
    if args.dendrites:
        dm.add_dendrites(args.dendrites)
        with torch.no_grad():  # non-zero output weights, so the dendrites' compute is not trivially skipped
            for p_ in dm.dendrite_parameters():
                p_.normal_(0, 0.01)
    ids = torch.randint(1000, 20000, (args.batch, args.seq))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (args.batch,))}
    opt = torch.optim.AdamW([p_ for p_ in dm.parameters() if p_.requires_grad], lr=1e-4)
    dm.train()

    peak = [0.0]

    def step():
        loss = dm(**batch).loss
        peak[0] = max(peak[0], rss_mb())  # activations of the whole forward pass are alive here
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    steady = rss_mb()  # weights, Adam moments, allocator caches; activations freed
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    train_ms = 1000 * (time.perf_counter() - start) / args.steps
    dm.eval()
    with torch.no_grad():
        dm(**batch)
        start = time.perf_counter()
        for _ in range(args.steps):
            dm(**batch)
        infer_ms = 1000 * (time.perf_counter() - start) / args.steps
    print(json.dumps({"dendrites": args.dendrites, "params": dm.dendrite_summary().total_params, "train_step_ms": train_ms,
                      "inference_ms": infer_ms, "peak_rss_mb": peak[0], "steady_rss_mb": steady, "seed": args.seed}))


if __name__ == "__main__":
    main()
