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
        seeds = study.PARTIAL.get(regime, list(range(settings.get("seeds", study.COMMON["seeds"]))))
        runs = {(r["arm"], r["seed"]) for r in results["runs"] if r.get("test_score") is not None}
        assert runs == {(a, k) for a in arms for k in seeds}, regime
        grid = settings.get("lr_grid")
        if grid:  # every LR of the grid trained every arm and seed; the table reports the LR chosen on validation
            every = {(r["arm"], r["seed"], r["learning_rate"]) for r in results["runs"] + results["lr_grid_runs"]}
            assert every == {(a, k, lr) for a in arms for k in seeds for lr in grid}, regime
        folders = [f"lr-{lr:g}" for lr in grid] if grid else [""]
        for arm in arms:  # every finished run is also kept on its own (what a resumed study reads)
            for seed in seeds:
                for sub in folders:
                    assert (RESULTS / regime / "runs" / arm / sub / f"seed-{seed}.json").is_file(), (regime, arm, sub, seed)


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


def test_scales_tiny_runs_end_to_end_resumes_and_gpu_is_the_gpu_sized_study(tmp_path, monkeypatch):
    import pytest
    import torch

    study = _study()
    monkeypatch.setitem(study.DATA_BY_SCALE, "tiny", str(tmp_path / "data"))
    out = tmp_path / "out"
    argv = ["--scale", "tiny", "--regimes", "dsn,lm-width-0.25", "--results-dir", str(out), "--jobs", "1"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert study.main(argv) == 0
    tiny = study.scaled_regimes("tiny")
    for regime in ("dsn", "lm-width-0.25"):
        results = json.loads((out / regime / "compare.json").read_text(encoding="utf-8"))
        arms = tiny[regime]["arms"].split(",")
        assert {(r["arm"], r["seed"]) for r in results["runs"]} == {(a, k) for a in arms for k in (0, 1)}
        assert f"### {regime}" in printed.getvalue() and (out / regime / "compare.md").is_file()
    # resumable: a second call trains nothing (every run file stays as it was)
    files = {p: p.stat().st_mtime_ns for p in out.glob("*/runs/*/seed-*.json")}
    assert len(files) == 14  # dsn: 3 arms, lm-width-0.25: 4 arms; 2 seeds each
    with contextlib.redirect_stdout(io.StringIO()):
        assert study.main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/runs/*/seed-*.json")} == files
    # the GPU-sized study: 10+ seeds everywhere, the full 6-layer MiniLM, all of Fashion-MNIST, a larger LM
    gpu = study.scaled_regimes("gpu")
    assert set(gpu) == {name.replace("1layer", "6layer") for name in study.REGIMES}
    assert all(s["seeds"] >= 10 for s in gpu.values())
    assert gpu["pretrained-6layer"]["layers"] is None and gpu["frozen-lora"]["layers"] is None
    assert sum(study.SIZES["gpu"]["fashion-mnist"][:2]) == 60000
    assert study.GPU_LM_CONFIG["hidden_size"] > study.LM_CONFIG["hidden_size"]
    hours = study.expected_gpu_hours()
    assert set(hours) == set(gpu) and all(0 < h["expected"] <= h["at_most"] for h in hours.values())
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
            study.main(["--scale", "gpu", "--regimes", "dsn"])


def test_expected_gpu_hours_are_quoted_in_results_md():
    quoted = (ROOT / "benchmarks" / "RESULTS.md").read_text(encoding="utf-8")
    assert _study().gpu_hours_table() in quoted


def test_committed_runs_are_finished_runs_of_their_settings():
    """A rerun of a committed regime resumes: every run's fingerprint is that of the settings recorded beside it, as
    the current `CompareSettings` computes it (every field counts, at its default too)."""
    from hf_dendrites.compare import CompareSettings

    for path in sorted(RESULTS.glob("*/compare_settings.json")):
        settings = CompareSettings(**json.loads(path.read_text(encoding="utf-8"))["settings"])
        assert settings.run_defining() == json.loads(path.read_text(encoding="utf-8"))["settings"], path.parent.name
        runs = list(path.parent.glob("runs/**/seed-*.json"))
        assert runs and all(json.loads(r.read_text(encoding="utf-8"))["settings_fingerprint"] == settings.fingerprint()
                            for r in runs), path.parent.name
