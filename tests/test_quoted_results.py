"""Every number that README's "When do dendrites help?" table and the suite summary quote, recomputed from the
committed JSON (`benchmarks/results/`) with `hf_dendrites.compare.report`, the statistics `compare` itself uses.

A row that quotes a number the committed runs do not give (e.g. a paired change of +1.3 % where they give +1.5 %)
fails here. RESULTS.md's regime tables are checked against `regime_study.py --tables` in test_regime_study.py; its
suite block against `run_suite.py`'s report in test_suite_report_is_rebuilt_from_the_committed_json below.
"""

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np

from hf_dendrites.compare import report

ROOT = Path(__file__).resolve().parent.parent
REGIMES = ROOT / "benchmarks" / "results" / "regimes"


def _runs(regime: str, arm: str) -> dict[int, dict]:
    results = json.loads((REGIMES / regime / "compare.json").read_text(encoding="utf-8"))
    runs = {r["seed"]: r for r in results["runs"] if r["arm"] == arm}
    assert runs, (regime, arm)
    return runs


def acc(regime: str, arm: str) -> str:
    """Test accuracy in %, mean ± std over seeds (2 decimals)."""
    s = report.mean_std_ci([report.score_of(r) for r in _runs(regime, arm).values()])
    return f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f} %"


def ppl(regime: str, arm: str) -> str:
    values = [r["test_perplexity"] for r in _runs(regime, arm).values()]
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"


def _p(p: float) -> str:
    return f"{p:#.2g}" if p >= 0.001 else f"{p:.1g}"


def rel(regime: str, arm: str, ref: str) -> str:
    """Relative test-error change of `arm` against `ref` ("regime:arm" for another regime), paired by seed, with the
    paired t-test's p: "+1.5 % (0.45)"."""
    theirs = _runs(*ref.split(":")) if ":" in ref else _runs(regime, ref)
    c = report.paired_comparison({k: report.score_of(r) for k, r in _runs(regime, arm).items()},
                                 {k: report.score_of(r) for k, r in theirs.items()})
    if math.isnan(c["p_value"]):
        return f"{100 * c['rel_error_change']:+.1f} % (identical in every seed)"
    return f"{100 * c['rel_error_change']:+.1f} % ({_p(c['p_value'])})"


def nats(regime: str, arm: str, ref: str, digits: int) -> str:
    """Paired test-loss difference (nats per token) of `arm` against `ref`, with the paired t-test's p."""
    d = report.paired_difference({k: r["test_loss"] for k, r in _runs(regime, arm).items()},
                                 {k: r["test_loss"] for k, r in _runs(regime, ref).items()})
    p = "identical in every seed" if math.isnan(d["p_value"]) else _p(d["p_value"])
    return f"{d['mean_difference']:+.{digits}f} nats{'/token' if digits == 4 else ''} ({p})"


# README "When do dendrites help?": the start of each row -> what it quotes, recomputed from the committed runs.
README_ROWS = {
    "| DSN shape:": lambda: [acc("dsn", "dendrites"), acc("dsn", "baseline-restarts") + " (same restarts)",
                             rel("dsn", "dendrites", "baseline-restarts")],
    "| the same with frozen embeddings": lambda: [
        acc("dsn-frozen", "dendrites"), acc("dsn-frozen", "baseline-restarts"),
        rel("dsn-frozen", "dendrites", "baseline-restarts")],
    "| the trained-embedding DSN with Perforated AI's recipe": lambda: [
        acc("dsn-recipe", "dendrites"), acc("dsn-recipe", "baseline-restarts"), acc("dsn-recipe", "baseline"),
        rel("dsn-recipe", "dendrites", "baseline-restarts"), "vs that baseline " + rel("dsn-recipe", "dendrites", "baseline")],
    "| MiniLM cut to 1 layer, fine-tuned": lambda: [
        acc("pretrained-1layer", "dendrites"), acc("pretrained-1layer", "baseline-restarts") + " (same restarts)",
        acc("pretrained-1layer", "wider") + " (wider MLP)", rel("pretrained-1layer", "dendrites", "baseline-restarts"),
        "vs wider " + rel("pretrained-1layer", "dendrites", "wider")],
    "| MiniLM cut to 1 layer and frozen": lambda: [
        acc("frozen-lora-lr1e-3", "frozen-dendrites"), acc("frozen-lora-lr1e-3", "lora") + " (LoRA)",
        acc("frozen-lora", "baseline-restarts") + " (head only, same restarts)", acc("frozen-lora", "lora") + " (LoRA, overfit)",
        "vs LoRA " + rel("frozen-lora-lr1e-3", "frozen-dendrites", "lora"),
        "vs head only " + rel("frozen-lora", "frozen-dendrites", "baseline-restarts")],
    **{f"| {label}": (lambda r=regime: [
        acc(r, "dendrites"), acc(r, "baseline-restarts") + " (same restarts)", acc(r, "wider") + " (wider MLP)",
        rel(r, "dendrites", "baseline-restarts"), "vs wider " + rel(r, "dendrites", "wider")])
       for label, regime in (("ViT from scratch", "vit-width-0.25"), ("the same ViT narrowed", "vit-width-0.125"),
                             ("the same ViT at hidden 4", "vit-width-0.0625"))},
    **{f"| {label}": (lambda r=regime: [
        ppl(r, "dendrites"), ppl(r, "baseline-restarts") + " (same restarts)", ppl(r, "wider") + " (wider MLP)",
        nats(r, "dendrites", "baseline-restarts", 4), "vs wider " + nats(r, "dendrites", "wider", 3)])
       for label, regime in (("causal LM (2-layer Llama)", "lm-width-0.25"), ("the same LM at hidden 8", "lm-width-0.125"))},
}


def _lora_rank(regime: str, arm: str) -> int:
    return next(iter(_runs(regime, arm).values()))["lora_rank"]


def _lora_rows(regime: str) -> list[str]:
    """The LoRA regime's row: Perforated AI's recipe against its three controls."""
    return [acc(regime, "lora-dendrites"), acc(regime, "lora-restarts") + " (same restarts)",
            acc(regime, "lora") + " (LoRA at its first plateau", acc(regime, "lora-wider") + f" (LoRA r={_lora_rank(regime, 'lora-wider')}",
            rel(regime, "lora-dendrites", "lora-restarts"), "vs LoRA " + rel(regime, "lora-dendrites", "lora"),
            "vs wider " + rel(regime, "lora-dendrites", "lora-wider")]


def _lora_base_rows(regime: str) -> list[str]:
    return [acc(regime, "lora-base-dendrites"), acc(regime, "lora-restarts") + " (same restarts)",
            rel(regime, "lora-base-dendrites", "lora-restarts"), "vs wider " + rel(regime, "lora-base-dendrites", "lora-wider")]


def _sft_rows(regime: str) -> list[str]:
    """The SmolLM2 LoRA regime's row: test perplexity of Perforated AI's recipe and its three controls, and the
    paired test-loss differences."""
    return [ppl(regime, "lora-dendrites"), ppl(regime, "lora-restarts") + " (same restarts)",
            ppl(regime, "lora") + " (LoRA at its first plateau", ppl(regime, "lora-wider") + f" (LoRA r={_lora_rank(regime, 'lora-wider')}",
            nats(regime, "lora-dendrites", "lora-restarts", 4), "vs LoRA " + nats(regime, "lora-dendrites", "lora", 4),
            "vs wider " + nats(regime, "lora-dendrites", "lora-wider", 4)]


README_ROWS.update({
    "| SmolLM2-135M with LoRA": lambda: _sft_rows("lora-smollm2-speeches"),
    "| MiniLM's first layer frozen with LoRA": lambda: _lora_rows("lora-rotten-tomatoes"),
    "| the same LoRA setting on the convention-party task": lambda: _lora_rows("lora-convention-party"),
    "| the same with dendrites on the base layers LoRA adapts (Rotten Tomatoes)": lambda: _lora_base_rows("lora-rotten-tomatoes"),
    "| the same with dendrites on the base layers LoRA adapts (convention party)": lambda: _lora_base_rows("lora-convention-party"),
})


def _readme_rows() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8").replace("−", "-")
    section = text.split("### When do dendrites help?", 1)[1].split("\n### ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| regime")]


def test_readme_regime_table_quotes_the_committed_runs():
    rows = _readme_rows()
    assert len(rows) >= len(README_ROWS)
    unchecked = [row[:60] for row in rows if not any(row.startswith(k) for k in README_ROWS)]
    assert not unchecked, f"README rows without a check in README_ROWS: {unchecked}"
    wrong = []
    for start, expected in README_ROWS.items():
        row = next((r for r in rows if r.startswith(start)), None)
        assert row is not None, f"README has no row starting {start!r}"
        wrong += [(start, e) for e in expected() if e.replace("−", "-") not in row]
    assert not wrong, "README quotes numbers the committed JSON does not give; expected: " + "; ".join(
        f"{s!r}: {e!r}" for s, e in wrong)


def _suite():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("run_suite", ROOT / "benchmarks" / "run_suite.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pm(stats: dict, scale: float = 100.0, digits: int = 1, unit: str = " %", sign: bool = False, ci: bool = False) -> str:
    """mean ± std[ [low, high]] as README writes it."""
    f = f"{'+' if sign else ''}.{digits}f"
    text = f"{scale * stats['mean']:{f}} ± {scale * stats['std']:.{digits}f}"
    if ci:
        return f"{text}{unit} [{scale * stats['ci_low']:.{digits}f}, {scale * stats['ci_high']:.{digits}f}]"
    return text + unit


def _suite_expectations(results: dict) -> dict[str, list[str]]:
    """README's issue 5 bullets (by their start) -> what they quote, from the suite's JSON as the engine summarises it."""
    same, comp = results["same_arch"]["summary"], results["compression"]["summary"]
    cost, pai = results["cost"]["summary"], results["perforatedai"]["summary"]["perforatedai"]
    seeds = len(results["same_arch"]["seeds"])
    width = results["compression"]["widths"][0]
    wider = results["compression"]["wider_widths"][str(width)]

    def kept(fraction: float) -> str:
        return f"{round(fraction * seeds)} of {seeds} seeds"

    def ratio(k: str, key: str, spread: bool = False) -> str:
        s = cost[k][key]
        return f"{s['mean']:.2f} ± {s['std']:.2f}x" if spread else f"{s['mean']:.2f}x"

    early = [r for r in results["compression"]["runs"]
             if r["name"] == f"reduced{width}" and r["steps"] <= results["compression"]["settings"]["eval_steps"]]
    return {
        "- **Same architecture": [
            "Baseline at its plateau " + _pm(same["baseline_plateau"]["test"], unit=" %"),
            "steps " + _pm(same["baseline_continued"]["test"]), "gd dendrites " + _pm(same["dendrites_gd"]["test"]),
            f"dendrite cycle in {kept(1 - same['dendrites_gd']['dendrites_kept'])}",
            "correlation-rule dendrites " + _pm(same["dendrites_correlation"]["test"]),
            f"(kept in {kept(same['dendrites_correlation']['dendrites_kept'])})",
            "vs the plateau " + _pm(same["dendrites_correlation"]["rel_error_change_vs_baseline_plateau"], ci=True),
            "vs the baseline trained on\n  " + _pm(same["dendrites_correlation"]["rel_error_change_vs_baseline_continued"],
                                                   sign=True, ci=True)],
        "- **Compression": [
            f"from 1536 to {width} units", f"{same['baseline_plateau']['non_embedding_params'] / 1e6:.2f}M -> "
            f"{comp[f'reduced{width}']['non_embedding_params'] / 1e6:.2f}M",
            "reduced + dendrites scored " + _pm(comp[f"reduced{width}_dendrites"]["test"]),
            "the same steps " + _pm(comp[f"reduced{width}_continued"]["test"]),
            f"({wider} units) " + _pm(comp[f"reduced{width}_wider{wider}"]["test"]),
            f"{100 * same['baseline_plateau']['test']['mean']:.1f}-{100 * same['baseline_continued']['test']['mean']:.1f} %",
            f"In {len(early)} of {seeds} seeds", "at plateau\", " + _pm(comp[f"reduced{width}"]["test"])],
        "- **Cost:**": [
            "made a training step " + ratio("1", "train_step_ratio_vs_0", True),
            "inference batch " + ratio("1", "inference_ratio_vs_0", True),
            f"(2 dendrites {ratio('2', 'train_step_ratio_vs_0')} / {ratio('2', 'inference_ratio_vs_0')}, 4 dendrites "
            f"{ratio('4', 'train_step_ratio_vs_0')} / {ratio('4', 'inference_ratio_vs_0')}",
            f"{len(results['cost']['seeds'])} repetitions",
            " -> ".join([f"{cost['0']['peak_rss_mb']['mean']:.0f}",
                         " / ".join(f"{cost[k]['peak_rss_mb']['mean']:.0f}" for k in ("1", "2", "4"))]) + " MB"],
        "- **perforatedai": [
            _pm(pai["test"]) + f" (it kept its dendrites in\n  {sum(1 for d in pai['dendrites_added'] if d)} of {seeds} seeds)",
            "hf_dendrites gd " + _pm(same["dendrites_gd"]["test"])],
    }


def test_readme_suite_summary_quotes_the_committed_runs():
    suite = _suite()
    results = suite.load_results(suite.RESULTS_DIR)
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("### The issue 5 benchmark suite", 1)[1]
    bullets = {b.split("\n", 1)[0][:30]: b for b in ("\n" + section).split("\n- ")[1:]}
    wrong = []
    for start, expected in _suite_expectations(results).items():
        bullet = next(("- " + b for b in ("\n" + section).split("\n- ")[1:] if ("- " + b).startswith(start)), None)
        assert bullet is not None, f"README's suite summary has no bullet starting {start!r} ({list(bullets)})"
        wrong += [(start, e) for e in expected if e not in bullet]
    assert not wrong, "README's suite summary quotes numbers the committed JSON does not give; expected: " + "; ".join(
        f"{s!r}: {e!r}" for s, e in wrong)


def test_suite_report_is_rebuilt_from_the_committed_json():
    suite = _suite()
    block = suite.report_block(suite.load_results(suite.RESULTS_DIR))
    text = suite.RESULTS_MD.read_text(encoding="utf-8")
    assert suite.BEGIN in text and suite.END in text
    quoted = suite.BEGIN + text.split(suite.BEGIN, 1)[1].split(suite.END, 1)[0] + suite.END
    assert quoted == block, "RESULTS.md's suite block differs from `python benchmarks/run_suite.py --report`"


def _relp(regime: str, arm: str, ref: str) -> tuple[str, str]:
    """("+10.1 %", "0.044"): the paired relative test-error change and its p, as the prose quotes them."""
    change, p = rel(regime, arm, ref).rstrip(")").split(" (")
    return change, p


def test_readme_study_findings_quote_the_committed_runs():
    text = (ROOT / "README.md").read_text(encoding="utf-8").replace("−", "-")
    findings = text.split("What the study shows:", 1)[1].split("Not measured here", 1)[0]
    vit = _relp("vit-width-0.25", "baseline", "baseline-restarts")
    head = _relp("frozen-lora", "frozen-dendrites", "baseline-restarts")
    lora = _relp("frozen-lora-lr1e-3", "frozen-dendrites", "lora")
    party_vs_lora = _relp("lora-convention-party", "lora-dendrites", "lora")
    party_vs_restarts = _relp("lora-convention-party", "lora-dendrites", "lora-restarts")
    lm = [np.mean([r["test_perplexity"] for r in _runs("lm-width-0.25", a).values()]) for a in ("wider", "dendrites")]
    sft = [np.mean([r["test_perplexity"] for r in _runs("lora-smollm2-speeches", a).values()]) for a in ("lora-wider", "lora")]
    sft_p = nats("lora-smollm2-speeches", "lora-wider", "lora", 4).split("(")[1][:-1]
    expected = [
        f"(ViT at hidden 16: {vit[0]}, p {vit[1]}",
        f"head alone with the same restarts, {head[0]} error, p {head[1]})",
        f"({lora[0]} error for dendrites, p {lora[1]})",
        f"made {party_vs_lora[0].lstrip('-')} fewer errors on the convention-party\n  task (p {party_vs_lora[1]})",
        f"scored the same ({party_vs_restarts[0]}, p {party_vs_restarts[1]})",
        f"LoRA of rank\n  {_lora_rank('lora-convention-party', 'lora-wider')} with the same parameters",
        f"perplexity {lm[0]:.1f} against {lm[1]:.1f}, p {nats('lm-width-0.25', 'dendrites', 'wider', 3).split('(')[1][:-1]}",
        f"parameters slightly worse ({sft[0]:.2f} against {sft[1]:.2f}, p {sft_p})",
    ]
    missing = [e for e in expected if e not in findings]
    assert not missing, f"README's findings do not quote what the committed runs give: {missing}"
    assert party_vs_lora[0].startswith("-")  # "fewer errors"
    assert sft[0] > sft[1]  # "slightly worse"
