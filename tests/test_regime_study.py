"""The regime study's committed results (issue 12): every regime has every arm and seed in its compare.json (a
regime stopped part way: the seeds `PARTIAL` lists), `benchmarks/regime_study.py --tables` rebuilds the tables from
that JSON without training, and `benchmarks/RESULTS.md` quotes exactly those tables."""

import contextlib
import importlib.util
import io
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "regimes"


def _study():
    spec = importlib.util.spec_from_file_location("regime_study", ROOT / "benchmarks" / "regime_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_regime_has_every_arm_and_seed_committed():
    study = _study()
    for regime, settings in study.REGIMES.items():
        results = json.loads((RESULTS / regime / "compare.json").read_text(encoding="utf-8"))
        arms = settings["arms"].split(",")
        # every seed, except for a regime listed (with its finished seeds) as stopped part way
        seeds = study.PARTIAL.get(regime, list(range(study.COMMON["seeds"])))
        runs = {(r["arm"], r["seed"]) for r in results["runs"] if r.get("test_score") is not None}
        assert runs == {(a, k) for a in arms for k in seeds}, regime
        for arm in arms:  # every finished run is also kept on its own (what a resumed study reads)
            for seed in seeds:
                assert (RESULTS / regime / "runs" / arm / f"seed-{seed}.json").is_file(), (regime, arm, seed)


def test_tables_are_rebuilt_from_the_json_and_quoted_in_results_md():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert _study().main(["--tables"]) == 0
    text = out.getvalue()
    assert "not run yet" not in text
    quoted = (ROOT / "benchmarks" / "RESULTS.md").read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| arm")]
    assert len(rows) >= 20
    missing = [line for line in rows if line not in quoted]
    assert not missing, f"RESULTS.md does not quote these rows of `regime_study.py --tables`: {missing[:3]}"
    pairs = [line for line in text.splitlines() if " vs " in line and "relative test-error change" in line]
    assert pairs and all(line in quoted for line in pairs)
    # causal-lm regimes: the perplexity line and the paired test-loss differences
    lm_lines = [line for line in text.splitlines() if line.startswith("test perplexity:") or "nats per token" in line]
    assert lm_lines and all(line in quoted for line in lm_lines), [line for line in lm_lines if line not in quoted][:3]
