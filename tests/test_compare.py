"""`hf-dendrites compare` (issue 12): arm construction and parameter matching, statistics against scipy, the CLI
end to end on local CSV files with a tiny BERT made here, resume of an interrupted compare, and each bad input."""

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import compare_data, cue_word_csv, tiny_bert_folder

from hf_dendrites.compare import CompareSettings, compare, report
from hf_dendrites.compare import models as M
from hf_dendrites.compare.runner import (
    arm_model,
    build_context,
    training_arguments,
)

ROOT = Path(__file__).resolve().parent.parent
FAST = dict(eval_steps=4, patience=[1], max_steps=60, learning_rate=3e-3, batch_size=16, max_cycles=1, threads=1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    return compare_data(root)


def _settings(data, **kw) -> CompareSettings:
    base = dict(model=str(data["model"]), train_file=str(data["train"]), validation_file=str(data["validation"]),
                test_file=str(data["test"]), output_dir=str(data["root"] / "unused"), **FAST)
    base.update(kw)
    return CompareSettings(**base)


def _params(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _trainable(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())


# ---------------------------------------------------------------------------------------------- arms
@pytest.mark.parametrize("from_scratch", [False, True])
def test_wider_matches_the_dendrite_parameter_count_within_one_neuron(data, from_scratch):
    s = _settings(data, max_cycles=2, from_scratch=from_scratch)
    ctx = build_context(s)
    dendritic, _, _ = arm_model(ctx, "dendrites", 0)
    for _ in range(s.max_cycles):
        dendritic.add_dendrites()
    wider, _, extra = arm_model(ctx, "wider", 0)
    plain = M.build_model(s, 2)
    layout = M.find_mlp(plain)
    assert extra["wider_units"] > 0 and wider.model.config.intermediate_size == 37 + extra["wider_units"]
    # one extra unit in every block costs layout.params_per_unit; the match is the closest whole number of units
    assert abs(_params(wider) - _params(dendritic)) <= layout.params_per_unit / 2
    assert _params(wider) - _params(plain) == extra["wider_units"] * layout.params_per_unit
    if not from_scratch:
        # new units have zero output weights: the widened pretrained model computes what the original computes
        ids = torch.randint(4, 18, (3, 7), generator=torch.Generator().manual_seed(0))
        plain.eval(), wider.eval()
        with torch.no_grad():
            torch.testing.assert_close(wider(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-5, atol=1e-6)


def test_lora_trainable_parameters_match_frozen_low_rank_dendrites(data):
    s = _settings(data, max_cycles=2, frozen_rank=2)
    ctx = build_context(s)
    dendritic, _, _ = arm_model(ctx, "frozen-dendrites", 0)
    head = M.head_module_names(dendritic.model)
    assert head == ["classifier"]
    head_params = _trainable(dendritic)
    assert head_params == _params(dendritic.model.classifier)  # only the head trains before growth
    for _ in range(s.max_cycles):
        dendritic.add_dendrites()
    assert all(layer.dendrite_rank == 2 for _, layer in dendritic.dendritic_layers())
    lora, _, extra = arm_model(ctx, "lora", 0)
    lora_params = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert lora_params and all("lora_" in n or "classifier" in n for n in lora_params)
    modules = dict(M.build_model(s, 2).named_modules())
    per_rank = sum(modules[n].in_features + modules[n].out_features for n in ctx.budgets["lora_targets"])
    assert abs(_trainable(lora) - _trainable(dendritic)) <= per_rank / 2
    assert extra["lora_rank"] == ctx.budgets["lora_rank"] >= 1


def test_each_arm_gets_its_recipe(data):
    s = _settings(data, arms=["baseline", "dendrites", "dendrites-only-phase", "correlation"])
    ctx = build_context(s)
    seen = {}
    for arm in ctx.arms:
        dm, overrides, _ = arm_model(ctx, arm, 3)
        args = training_arguments(s, str(data["root"] / "args"), 3, **overrides)
        seen[arm] = (dm.dendrite_config, args)
        assert dm.dendrite_config.dendrite_seed == 3 and args.seed == 3 and args.eval_steps == s.eval_steps
        assert sum(dm.dendrite_counts().values()) == 0  # every arm starts without dendrites
    assert seen["baseline"][1].max_dendrite_cycles == 0
    assert seen["dendrites"][1].max_dendrite_cycles == 1 and not seen["dendrites"][1].dendrites_only_phase
    assert seen["dendrites-only-phase"][1].dendrites_only_phase
    assert seen["correlation"][0].learning_rule == "correlation"
    # every arm starts from the same weights for the same seed
    states = [{k: v for k, v in arm_model(ctx, a, 3)[0].model.state_dict().items()} for a in ("baseline", "dendrites")]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_width_scale_keeps_head_counts_valid_and_layers_zero_is_the_dsn_shape(data, tmp_path):
    model_dir = tiny_bert_folder(tmp_path / "bert4", heads=4)
    s = _settings(data, model=str(model_dir), from_scratch=True, width_scale=0.3)  # hidden 32 -> 10: 4 heads -> 2
    model = M.build_model(s, 2)
    assert (model.config.hidden_size, model.config.num_attention_heads, model.config.intermediate_size) == (10, 2, 11)
    ids = torch.randint(4, 18, (2, 6))
    assert model(input_ids=ids).logits.shape == (2, 2)

    dsn = M.build_model(_settings(data, layers=0), 2)
    assert isinstance(dsn, M.MeanPooledClassifier) and len(dsn.base.encoder.layer) == 0 and dsn.base.pooler is None
    # pretrained embeddings kept
    pretrained = transformers.BertModel.from_pretrained(data["model"])
    assert torch.equal(dsn.base.embeddings.word_embeddings.weight, pretrained.embeddings.word_embeddings.weight)
    ctx = build_context(_settings(data, layers=0))
    assert "wider" not in ctx.arms and "does not apply" in ctx.skipped["wider"]
    dm, _, _ = arm_model(ctx, "dendrites", 0)
    assert list(dm.dendrite_counts()) == ["classifier"]  # the DSN's dendrites go on the head
    out = dm(input_ids=torch.tensor([[2, 4, 5, 3], [2, 7, 8, 3]]), attention_mask=torch.ones(2, 4, dtype=torch.long))
    assert not torch.allclose(out.logits[0], out.logits[1])  # mean pooling sees the tokens, not a constant [CLS]


def test_dataset_folder_with_a_stratified_validation_split_and_the_default_arms(data, tmp_path):
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    cue_word_csv(folder / "train.csv", 90, 0, labels=("pos", "pos", "neg"))  # 60 pos, 30 neg
    cue_word_csv(folder / "test.csv", 12, 1)
    ctx = build_context(_settings(data, train_file=None, validation_file=None, test_file=None, dataset=str(folder),
                                  validation_size=0.2))
    assert ctx.splits.validation_source == "stratified split of train" and ctx.splits.label_names == ["neg", "pos"]
    assert sorted(ctx.splits.validation["labels"]) == [0] * 6 + [1] * 12  # the 2:1 class balance is kept
    assert len(ctx.splits.train) == 72 and len(ctx.test) == 12
    assert not set(ctx.splits.validation["text"]) & set(ctx.splits.train["text"]) or len(set(ctx.splits.train["text"])) < 72
    # the lora-* arms only when asked for (--lora-rank or --arms): each adds a run per seed
    assert ctx.arms == ["baseline", "baseline-restarts", "wider", "dendrites", "dendrites-only-phase", "correlation",
                        "frozen-dendrites", "lora"]
    assert "pass --lora-rank" in ctx.skipped["lora-dendrites"]


def test_the_frozen_base_and_other_dendritic_arms_train(data, tmp_path):
    results = compare(_settings(data, output_dir=str(tmp_path / "out"), seeds=1, max_steps=24, metric="loss",
                                arms=["dendrites-only-phase", "correlation", "frozen-dendrites", "lora"]))
    by = {r["arm"]: r for r in results["runs"]}
    assert sorted(by) == ["correlation", "dendrites-only-phase", "frozen-dendrites", "lora"]
    assert all(r["steps"] > 0 and r["test_score"] is not None for r in by.values())
    assert by["lora"]["dendrites_kept"] == 0 and by["lora"]["lora_rank"] == results["budgets"]["lora_rank"]
    assert by["lora"]["trainable_params"] < by["lora"]["params"]  # the base stayed frozen
    assert results["reference"] is None and "rel. error vs baseline (not run)" in results["table"]


def test_help_documents_every_option():
    done = subprocess.run([sys.executable, "-m", "hf_dendrites", "compare", "--help"], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}, check=False)
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    for f in dataclasses.fields(CompareSettings):
        flag = "--" + f.name.replace("_", "-")
        help_start = " ".join(f.metadata["help"].split())[:40]
        assert f"{flag} " in text and help_start in text, f.name
    assert all(arm in text for arm in ("baseline-restarts", "frozen-dendrites", "lora"))


# ---------------------------------------------------------------------------------------------- statistics
def test_statistics_against_scipy():
    from scipy import stats

    values = [0.81, 0.79, 0.84, 0.80]
    got = report.mean_std_ci(values)
    mean, sd = np.mean(values), np.std(values, ddof=1)
    half = stats.t.ppf(0.975, 3) * sd / math.sqrt(4)
    assert got["mean"] == pytest.approx(mean) and got["std"] == pytest.approx(sd)
    assert (got["ci_low"], got["ci_high"]) == pytest.approx((mean - half, mean + half))
    assert stats.t.ppf(0.975, 3) == pytest.approx(3.182, abs=1e-3)  # the table value
    ref = {0: 0.80, 1: 0.76, 2: 0.83, 3: 0.80}
    paired = report.paired_comparison(dict(enumerate(values)), ref)
    assert paired["p_value"] == pytest.approx(stats.ttest_rel(values, [ref[k] for k in range(4)]).pvalue)
    expected = np.mean([((1 - v) - (1 - ref[k])) / (1 - ref[k]) for k, v in enumerate(values)])
    assert paired["rel_error_change"] == pytest.approx(expected) and paired["rel_error_change"] < 0
    assert math.isnan(report.mean_std_ci([0.5])["std"])


# ---------------------------------------------------------------------------------------------- CLI end to end
def _cli(*args, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "hf_dendrites.compare", *args], capture_output=True, text=True,
                          timeout=600, env=env, stdin=subprocess.DEVNULL, cwd=cwd)


def _cli_args(data, out: Path, *extra: str) -> list[str]:
    return ["--model", str(data["model"]), "--layers", "1", "--train-file", str(data["train"]),
            "--validation-file", str(data["validation"]), "--test-file", str(data["test"]), "--text-column", "text",
            "--label-column", "label", "--arms", "baseline,wider,dendrites", "--seeds", "2", "--output-dir", str(out),
            "--eval-steps", "4", "--patience", "1", "--max-steps", "60", "--learning-rate", "3e-3",
            "--batch-size", "16", "--max-cycles", "1", "--threads", "1", *extra]


@pytest.fixture(scope="module")
def finished(data):
    out = data["root"] / "out"
    done = _cli(*_cli_args(data, out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done


def test_cli_prints_the_table_and_writes_compare_json(finished):
    out, done = finished
    for arm in ("baseline", "wider", "dendrites"):
        assert f"| {arm} | 2 |" in done.stdout
    assert "rel. error vs baseline" in done.stdout and (out / "compare.md").read_text().strip() in done.stdout
    results = json.loads((out / "compare.json").read_text())
    runs = results["runs"]
    assert sorted((r["arm"], r["seed"]) for r in runs) == sorted((a, k) for a in ("baseline", "wider", "dendrites") for k in (0, 1))
    for r in runs:
        for key in ("arm", "seed", "test_score", "validation_score", "params", "steps", "dendrites_kept", "curve", "growth_steps"):
            assert key in r, key
        assert 0.0 <= r["test_score"] <= 1.0 and r["steps"] > 0 and r["curve"]
    by = {(r["arm"], r["seed"]): r for r in runs}
    for seed in (0, 1):
        # shared evaluation points: every run evaluates at multiples of eval_steps
        assert all(c["step"] % 4 == 0 for a in ("baseline", "wider", "dendrites") for c in by[(a, seed)]["curve"])
        assert by[("baseline", seed)]["dendrites_kept"] == 0 and by[("wider", seed)]["dendrites_kept"] == 0
        # the dendritic run shares cycle 0 with the baseline (same seed, data order and start)
        n = len(by[("baseline", seed)]["curve"])
        assert [c["score"] for c in by[("dendrites", seed)]["curve"][:n]] == [c["score"] for c in by[("baseline", seed)]["curve"]]
    assert results["reference"] == "baseline" and results["summary"][0]["arm"] == "baseline"
    assert (out / "compare.png").stat().st_size > 5000
    assert "[6/6]" in done.stderr  # progress: runs done / total


def test_resume_trains_only_the_missing_runs_and_refuses_other_settings(finished, tmp_path, data):
    out, _ = finished
    import shutil

    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    missing = [copy / "runs" / "dendrites" / "seed-1.json", copy / "runs" / "wider" / "seed-0.json"]
    for path in missing:
        path.unlink()
    kept = {p: p.stat().st_mtime_ns for p in (copy / "runs").glob("*/seed-*.json")}
    done = _cli(*_cli_args(data, copy, "--jobs", "2"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "4 already finished" in done.stderr and "2 to train" in done.stderr
    assert all(p.is_file() for p in missing)
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # finished runs were not retrained
    before = {(r["arm"], r["seed"]): r for r in json.loads((out / "compare.json").read_text())["runs"]}
    after = {(r["arm"], r["seed"]): r for r in json.loads((copy / "compare.json").read_text())["runs"]}
    # a retrained run (in a worker process) reproduces the interrupted compare's run
    for key in (("dendrites", 1), ("wider", 0)):
        assert after[key]["test_score"] == before[key]["test_score"] and after[key]["steps"] == before[key]["steps"]

    with pytest.raises(ValueError, match="holds runs made with different settings.*learning_rate"):
        compare(_settings(data, output_dir=str(copy), learning_rate=1e-3, layers=1, arms=["baseline"]))


def _children(pid: int) -> set[int]:
    """Live child processes of `pid` (from /proc; zombies do not count)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(stat.parent.name))
    return found


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads child processes from /proc")
def test_sigterm_stops_the_worker_processes_too(data, tmp_path):
    import signal
    import time

    args = _cli_args(data, tmp_path / "out", "--jobs", "2")
    args[args.index("--max-steps") + 1] = "100000"  # runs far longer than the test waits
    args[args.index("--patience") + 1] = "1000"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "hf_dendrites.compare", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, stdin=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while len(workers := _children(proc.pid)) < 3 and time.time() < deadline:  # 2 workers + resource tracker
            time.sleep(0.5)
        assert len(workers) >= 3, f"the worker pool did not start: {proc.poll()=}"
        time.sleep(3)  # workers are inside their first run
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        deadline = time.time() + 30
        while (alive := [w for w in workers if _running(w)]) and time.time() < deadline:
            time.sleep(0.5)
        assert proc.returncode == 128 + signal.SIGTERM and "Stopped by SIGTERM" in err, err[-2000:]
        assert not alive, f"worker processes {alive} outlived the compare they belong to"
        assert not list((tmp_path / "out" / "runs").glob("*/seed-*.json"))  # no run finished, none half-written
    finally:
        for pid in [*_children(proc.pid), proc.pid]:  # nothing outlives a failed test
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        proc.wait()


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_input_fails_before_any_training(data, tmp_path):
    out = tmp_path / "out"
    one_class = cue_word_csv(tmp_path / "one.csv", 40, 0, labels=("pos",))
    tiny = cue_word_csv(tmp_path / "tiny.csv", 3, 0)
    cases = [
        (dict(text_column="review"), r"no column 'review'; its columns are \['text', 'label'\]"),
        (dict(label_column="sentiment"), "no column 'sentiment'"),
        (dict(train_file=str(one_class), validation_file=None), "single class"),
        (dict(train_file=str(tiny), validation_file=None, batch_size=1), "Not enough rows for the splits"),
        (dict(validation_file=None, validation_size=0.99), "Not enough rows for the splits"),
        (dict(layers=0, arms=["wider"]), "do not apply.*wider"),
        (dict(rank=4, arms=["correlation"]), "do not apply.*correlation.*full-shape"),
        (dict(from_scratch=True, arms=["lora"]), "do not apply.*lora.*pretrained"),
        (dict(arms=["dendrites", "bigger"]), r"Unknown arm\(s\) \['bigger'\]"),
        (dict(width_scale=0.5), "needs --from-scratch"),
    ]
    for kw, message in cases:
        with pytest.raises(ValueError, match=message):
            compare(_settings(data, output_dir=str(out), **kw))
        assert not out.exists(), kw  # nothing written, nothing trained
    done = _cli(*_cli_args(data, out)[:-2], "--arms", "baseline,nope")
    assert done.returncode == 2 and "Unknown arm(s) ['nope']" in done.stderr and not out.exists()


def test_baseline_restarts_restarts_where_the_dendritic_run_grows(data, tmp_path):
    # one growth, no retry: both runs are identical up to it (same seed, data order, start)
    results = compare(_settings(data, output_dir=str(tmp_path / "out"), arms=["dendrites", "baseline-restarts"], seeds=1,
                                layers=1, max_tries=1))
    by = {r["arm"]: r for r in results["runs"]}
    assert by["dendrites"]["growth_steps"], "the dendritic run never grew; the comparison would be vacuous"
    assert by["baseline-restarts"]["growth_steps"] == by["dendrites"]["growth_steps"]
    assert by["baseline-restarts"]["steps"] == by["dendrites"]["steps"]  # the same training budget
    assert by["baseline-restarts"]["dendrites_kept"] == 0 and results["reference"] == "baseline-restarts"
    # per cycle try: a kept cycle with dendrites records its ablation (the control has no dendrites to switch off)
    assert all({"dendrite_weight", "ablation_score", "ablation_delta"} <= set(c) for c in by["dendrites"]["cycles"])
    kept = [c for c in by["dendrites"]["cycles"] if c["status"] == "accepted" and c["cycle"] >= 1]
    assert all(isinstance(c["ablation_score"], float) and isinstance(c["ablation_delta"], float) for c in kept)
    assert len(by["dendrites"]["cycles"]) == len(by["dendrites"]["growth_steps"]) + 1
    assert all(c["ablation_score"] is None for c in by["baseline-restarts"]["cycles"])
    # the control needs the run it replays
    with pytest.raises(ValueError, match="replays the growth and retry steps of the dendritic run.*add dendrites or "
                       "frozen-dendrites"):
        build_context(_settings(data, arms=["baseline-restarts"]))


def test_baseline_restarts_of_frozen_dendrites_is_the_head_alone_with_the_same_restarts(data, tmp_path):
    results = compare(_settings(data, output_dir=str(tmp_path / "out"), arms=["frozen-dendrites", "baseline-restarts"],
                                seeds=1, layers=1, max_tries=1, learning_rate=1e-2))
    by = {r["arm"]: r for r in results["runs"]}
    assert by["frozen-dendrites"]["growth_steps"], "the dendritic run never grew; the comparison would be vacuous"
    control = by["baseline-restarts"]
    assert control["replayed_arm"] == "frozen-dendrites" and control["dendrites_kept"] == 0
    assert control["growth_steps"] == by["frozen-dendrites"]["growth_steps"]
    assert control["steps"] == by["frozen-dendrites"]["steps"]
    head = M.build_model(_settings(data, layers=1), 2).classifier
    assert control["trainable_params"] == head.weight.numel() + head.bias.numel()  # the base stayed frozen
    # the curves agree until the first growth: the same model, head and data order
    first = control["growth_steps"][0]
    same = [c["score"] for c in control["curve"] if c["step"] <= first]
    assert same == [c["score"] for c in by["frozen-dendrites"]["curve"] if c["step"] <= first]


def test_freeze_base_trains_only_the_head_and_what_the_arm_adds(data):
    s = _settings(data, freeze_base=True, max_cycles=1)
    ctx = build_context(s)
    assert "wider" not in ctx.arms  # frozen MLP units would never train
    baseline, _, _ = arm_model(ctx, "baseline", 0)
    assert _trainable(baseline) == _params(baseline.model.classifier)
    dendritic, _, _ = arm_model(ctx, "dendrites", 0)
    dendritic.add_dendrites()
    dendrite_params = dendritic.dendrite_summary().dendrite_params
    assert dendrite_params > 0 and _trainable(dendritic) == _params(dendritic.model.classifier) + dendrite_params
    with pytest.raises(ValueError, match="--freeze-base.*pretrained"):
        dataclasses.replace(s, from_scratch=True)
    # every field that changes what a run computes counts, at its default too
    assert dataclasses.replace(s, freeze_base=False).run_defining()["freeze_base"] is False


def test_recipe_options_reach_every_arm_and_the_control_searches_the_same_restart_lrs(data):
    s = _settings(data, layers=1, lr_search="1,0.1", cycle_steps=20, lr_scheduler_type="linear",
                  arms=["baseline-restarts", "wider", "baseline"])
    assert s.lr_search == [1.0, 0.1]
    ctx = build_context(s)  # with --lr-search the control replays nothing, so it needs no dendrites arm
    args, extras = {}, {}
    for arm in ctx.arms:
        _, overrides, extras[arm] = arm_model(ctx, arm, 0)
        args[arm] = training_arguments(s, str(data["root"] / "args"), 0, **overrides)
        assert args[arm].dendrite_lr_search == [1.0, 0.1] and args[arm].dendrite_cycle_steps == 20
    assert args["baseline-restarts"].dendrite_restarts_only and args["baseline-restarts"].dendrite_restart_steps is None
    assert args["baseline-restarts"].max_steps == s.max_steps and "same restart-LR search" in extras["baseline-restarts"]["recipe"]
    assert args["wider"].dendrite_restarts_only and args["baseline"].max_dendrite_cycles == 0
    # without the options nothing changes
    plain = _settings(data, layers=1)
    assert training_arguments(plain, str(data["root"] / "args"), 0).dendrite_lr_search is None
    for kw, message in [(dict(lr_search="1,0"), "--lr-search must be"), (dict(cycle_steps=0), "--cycle-steps must be")]:
        with pytest.raises(ValueError, match=message):
            _settings(data, **kw)
    done = _cli("--help")
    assert "--lr-search" in done.stdout and "--cycle-steps" in done.stdout


def test_mean_pooling_with_layers_keeps_the_default_targets_and_matches_lora(data):
    s = _settings(data, layers=1, pooling="mean", freeze_base=True, max_cycles=2, frozen_rank=2)
    model = M.build_model(s, 2)
    assert isinstance(model, M.MeanPooledClassifier) and len(model.base.encoder.layer) == 1
    pretrained = transformers.BertModel.from_pretrained(data["model"])
    assert torch.equal(model.base.encoder.layer[0].intermediate.dense.weight, pretrained.encoder.layer[0].intermediate.dense.weight)
    ctx = build_context(s)
    # the library's BERT defaults inside the pooled model (not only its head), so LoRA has layers to match
    assert ctx.budgets["lora_targets"] and all(n.startswith("base.encoder.layer.0.") for n in ctx.budgets["lora_targets"])
    frozen, _, _ = arm_model(ctx, "frozen-dendrites", 0)
    lora, _, _ = arm_model(ctx, "lora", 0)
    frozen.add_dendrites()
    frozen.add_dendrites()  # the two cycles of max_cycles=2 that lora's rank is matched to
    modules = dict(M.build_model(s, 2).named_modules())
    per_rank = sum(modules[n].in_features + modules[n].out_features for n in ctx.budgets["lora_targets"])
    assert abs(_trainable(lora) - _trainable(frozen)) <= per_rank / 2
    with pytest.raises(ValueError, match="--pooling must be"):
        _settings(data, pooling="cls")


# ---------------------------------------------------------------------------------------------- causal-lm
def _speech_csv(path: Path, n: int, seed: int) -> Path:
    """Documents of filler words whose every other word is predictable (a pattern a tiny LM learns quickly)."""
    import csv
    import random

    rng = random.Random(seed)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text"])
        for _ in range(n):
            pairs = [rng.choice([("the", "movie"), ("a", "plot"), ("very", "good"), ("was", "bad")]) for _ in range(12)]
            writer.writerow([" ".join(w for pair in pairs for w in pair)])
    return path


@pytest.fixture(scope="module")
def lm_data(tmp_path_factory):
    from hf_dendrites.example_data import small_lm_folder

    root = tmp_path_factory.mktemp("compare_lm")
    train = _speech_csv(root / "train.csv", 60, 0)
    texts = [row.split(",")[0] for row in train.read_text().splitlines()[1:]]
    folder = small_lm_folder(root / "lm", texts, vocab_size=280, hidden_size=16, intermediate_size=40,
                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    return {"root": root, "model": folder, "train": train, "validation": _speech_csv(root / "validation.csv", 16, 1),
            "test": _speech_csv(root / "test.csv", 16, 2)}


def _lm_settings(lm_data, **kw) -> CompareSettings:
    base = dict(model=str(lm_data["model"]), task="causal-lm", from_scratch=True, max_length=16,
                train_file=str(lm_data["train"]), validation_file=str(lm_data["validation"]),
                test_file=str(lm_data["test"]), output_dir=str(lm_data["root"] / "unused"), **FAST)
    base.update(kw)
    return CompareSettings(**base)


def test_small_lm_folder_holds_a_fitted_tokenizer_and_a_llama_config(lm_data):
    tokenizer = transformers.AutoTokenizer.from_pretrained(lm_data["model"])
    config = transformers.AutoConfig.from_pretrained(lm_data["model"])
    assert config.model_type == "llama" and config.vocab_size == len(tokenizer) == 280
    assert tokenizer.eos_token == "<|endoftext|>" and config.eos_token_id == tokenizer.eos_token_id
    text = "the movie was bad"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text and len(ids) < len(text)  # merges were learnt from the text


def test_causal_lm_blocks_and_next_token_accuracy(lm_data):
    s = _lm_settings(lm_data)
    ctx = build_context(s)
    assert ctx.splits.label_names == [] and ctx.num_labels == 0
    tokenizer = ctx.processing_class
    # every split is the concatenation of its documents (each ended by EOS) cut into full blocks of max_length
    docs = [t for t in ctx.splits.validation["text"]]
    stream = [i for d in docs for i in [*tokenizer(d, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]]
    blocks = ctx.validation["input_ids"]
    assert len(blocks) == len(stream) // 16 and all(len(b) == 16 for b in blocks)
    assert [i for b in blocks for i in b] == stream[: 16 * len(blocks)] and ctx.validation["labels"] == blocks
    # the Trainer's next-token accuracy and loss equal a direct forward pass over the same blocks
    dm, overrides, _ = arm_model(ctx, "baseline", 0)
    assert isinstance(dm.model, transformers.LlamaForCausalLM) and dm.model.config.hidden_size == 16
    from hf_dendrites.compare.runner import metric_functions
    from hf_dendrites.trainer import DendriticTrainer

    args = training_arguments(s, str(lm_data["root"] / "eval"), 0, **overrides)
    trainer = DendriticTrainer(dm, args, eval_dataset=ctx.validation, processing_class=tokenizer,
                               data_collator=ctx.collator, **metric_functions("causal-lm"))
    metrics = trainer.evaluate()
    ids = torch.tensor(blocks)
    dm.eval()
    with torch.no_grad():
        logits = dm(input_ids=ids).logits
    correct = (logits[:, :-1].argmax(-1) == ids[:, 1:]).float().mean().item()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()
    assert metrics["eval_accuracy"] == pytest.approx(correct, abs=1e-6)
    assert metrics["eval_loss"] == pytest.approx(loss, rel=1e-4)


def test_causal_lm_compare_trains_every_arm_and_reports_perplexity(lm_data, tmp_path):
    s = _lm_settings(lm_data, output_dir=str(tmp_path / "out"), seeds=1, metric="loss", width_scale=0.5,
                     targets="mlp", arms=["baseline", "dendrites", "baseline-restarts", "wider"])
    results = compare(s)
    by = {r["arm"]: r for r in results["runs"]}
    assert sorted(by) == ["baseline", "baseline-restarts", "dendrites", "wider"]
    for r in by.values():
        assert 0 <= r["test_score"] <= 1 and r["test_perplexity"] == pytest.approx(math.exp(r["test_loss"]))
    # learnt: far above a uniform guess over 280 tokens (accuracy 0.004, perplexity 280)
    assert by["baseline"]["test_score"] > 0.1 and by["baseline"]["test_perplexity"] < 70
    assert "| arm | runs | test next-token accuracy mean ± std |" in results["table"]
    # --width-scale halves the from-scratch LM; wider adds MLP units to match the dendrites' parameters
    plain = M.build_model(s, 0)
    assert plain.config.hidden_size == 8 and plain.config.intermediate_size == 20
    layout = M.find_mlp(plain)
    assert len(layout.blocks) == 1 and len(layout.blocks[0][0]) == 2  # Llama's gated MLP: gate and up projections
    assert abs(by["wider"]["params"] - _params(plain) - results["budgets"]["dendrite_params"]) <= layout.params_per_unit / 2


def test_causal_lm_bad_input_fails_before_any_training(lm_data, tmp_path):
    out = tmp_path / "out"
    short = tmp_path / "short.csv"
    short.write_text("text\nthe movie\n")
    cases = [
        (dict(text_column="speech"), r"no column 'speech'; its columns are \['text'\]"),
        (dict(pooling="mean"), "a causal LM keeps its LM head"),
        (dict(from_scratch=False, freeze_base=True), "Drop --freeze-base"),
        (dict(arms=["lora"]), "do not apply.*lora.*causal-lm has none"),
        (dict(test_file=str(short)), "the test text gives .* tokens, less than one block"),
        (dict(batch_size=4096), "fewer than one batch of --batch-size 4096"),
        (dict(validation_file=None, validation_size=60), "Not enough rows for the splits: 60 training documents"),
    ]
    for kw, message in cases:
        with pytest.raises(ValueError, match=message):
            compare(_lm_settings(lm_data, output_dir=str(out), **kw))
        assert not out.exists(), kw
    ctx = build_context(_lm_settings(lm_data, validation_file=None, validation_size=0.25))
    assert ctx.splits.validation_source == "random split of train by document"
    assert (len(ctx.splits.train), len(ctx.splits.validation)) == (45, 15)
    assert not set(ctx.splits.validation["text"]) & set(ctx.splits.train["text"])
