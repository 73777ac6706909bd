"""DendriticTrainer under DDP: two real CPU processes (gloo) launched with torch.distributed.run or accelerate launch,
and the CPU launches that cannot train together, refused while the trainer is built."""

import csv
import os

import pytest
from conftest import cue_word_csv, launch_two_processes, run_two_processes, tiny_bert_folder

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts", "ddp_train.py")
DROPIN = os.path.join(os.path.dirname(SCRIPT), "run_classification_dropin.py")


def test_two_processes_decide_together_and_stay_identical(tmp_path):
    results = run_two_processes(SCRIPT, tmp_path, "--use_cpu", "--ddp_backend", "gloo")

    for res in results:
        assert res["world_size"] == 2 and res["distributed_type"].endswith("MULTI_CPU")
        assert res["done"]
        # Grown dendrites were identical on both ranks before DDP broadcast anything (growth, growth, retry).
        assert res["growth_checks"] == [True, True, True]
        # After every event and at the end, every parameter is identical on both ranks, and so is the log.
        events = res["events"]
        assert [e["event"] for e in events] == [1, 3, 1, 3, 2, 3, 4]  # grow, switch, grow, switch, retry, switch, complete
        assert all(e["params_identical"] for e in events) and res["final_params_identical"]
        assert res["history_identical"] and res["schedule_identical"]
        # A new DDP wrapper around the same DendriticModel after every rebuild; no stale optimizer or wrapper left.
        assert all(e["wrapper"] == "DistributedDataParallel" and e["wraps_model"] for e in events)
        assert all(e["new_wrapper"] for e in events)
        # Growths fell mid-epoch: the rest of such an epoch ran on the new wrapper, in place of the loop's stale one.
        assert res["stale_wrapper_steps"] > 0
        assert all(e["optimizer_matches"] and e["prepared_optimizers"] == 1 and e["prepared_models"] == 1 for e in events)
        # Dendrites-only phases trained the dendrite parameters alone.
        assert events[0]["trainable"] < events[1]["trainable"]
        assert res["dendrite_counts"] == [2]
    assert results[0]["history"] == results[1]["history"]
    assert [r["decision"] for r in results[0]["history"]].count("continue") == 7
    # Both kept cycles with dendrites were evaluated once more without them, by both ranks together (issue 23).
    assert [r["decision"] for r in results[0]["history"] if "ablation_score" in r] == ["grow", "complete"]


def test_correlation_rule_on_two_processes_installs_identical_candidates(tmp_path):
    # Launched as docs/distributed.md says for CPU with accelerate: `accelerate launch --multi_gpu ... --use_cpu`.
    results = run_two_processes(
        os.path.join(os.path.dirname(SCRIPT), "ddp_correlation.py"), tmp_path, "--use_cpu", launcher="accelerate"
    )
    for res in results:
        assert res["world_size"] == 2 and res["distributed_type"].endswith("MULTI_CPU")
        assert "install" in res["decisions"]  # at least one candidate phase ran to installation
        # candidates stayed identical on both ranks after every candidate step (all-reduced statistics)
        assert res["candidate_steps"] > 0 and all(res["candidates_identical"])
        # parameters identical after every event (growth starts, installation, completion) and at the end
        assert res["events"] and all(e["params_identical"] for e in res["events"]) and res["final_params_identical"]
        assert res["history_identical"]
        # the candidate phase runs on the bare model, the neuron phases under DDP again
        assert {"DistributedDataParallel"} <= {e["wrapper"] for e in res["events"]}
    assert results[0]["dendrite_counts"] == results[1]["dendrite_counts"]
    assert results[0]["decisions"] == results[1]["decisions"]


@pytest.mark.parametrize(
    "launcher",
    # Each was two single-process runs writing the same files. (`torchrun ... --ddp_backend gloo`, where rank 1
    # crashed in the broadcast, is the stock-script test below.)
    ["torchrun", "accelerate", "env"],  # accelerate: `accelerate launch --multi_gpu` without a config file
    ids=["torchrun", "accelerate-multi_gpu", "env-vars"],  # env: RANK / WORLD_SIZE set by hand, no LOCAL_RANK
)
def test_cpu_launch_without_use_cpu_stops_while_building_the_trainer(tmp_path, launcher):
    proc = launch_two_processes(SCRIPT, str(tmp_path), launcher=launcher)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-4000:]
    # Both processes stop in DendriticTrainer.__init__ with the error that names the flag to add ...
    refusal = "RuntimeError: DendriticTrainer cannot train or evaluate this launch: 2 processes were launched (WORLD_SIZE=2)"
    assert output.count(refusal) >= 2, output[-4000:]
    assert "add `--use_cpu`" in output and "in __init__" in output
    # ... before anything trained, evaluated or wrote a file.
    assert "TypeError" not in output and "save_pretrained wrote no" not in output
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_stock_script_on_two_cpu_processes_needs_use_cpu_and_then_trains(tmp_path):
    # Issue 22's launch: a run_glue-style script under `torchrun --nproc_per_node 2 ... --ddp_backend gloo`.
    model_dir = tiny_bert_folder(tmp_path / "tiny-bert")
    data = cue_word_csv(tmp_path / "train.csv", 64, 0)
    common = [
        "--model_name_or_path", str(model_dir), "--train_file", str(data), "--validation_file", str(data), "--do_train",
        "--eval_strategy", "steps", "--eval_steps", "4", "--save_strategy", "no", "--max_steps", "16",
        "--learning_rate", "3e-3", "--per_device_train_batch_size", "8", "--dendrite_patience", "1",
        "--max_dendrite_cycles", "1", "--target_modules", "all-linear", "--dendrite_seed", "0", "--report_to", "none",
        "--ddp_backend", "gloo",
    ]
    refused = launch_two_processes(DROPIN, *common, "--output_dir", str(tmp_path / "refused"))
    output = refused.stdout + refused.stderr
    assert refused.returncode != 0 and "TypeError" not in output, output[-4000:]
    assert output.count("accelerate runs this one as 2 process(es) with distributed type NO") >= 2
    assert output.count("add `--use_cpu`") >= 2
    assert [p for p in (tmp_path / "refused").rglob("*") if p.is_file()] == []  # nothing trained or written

    # The command docs/distributed.md gives: one DDP job (the batch counts both processes), trained and saved once.
    trained = launch_two_processes(DROPIN, *common, "--output_dir", str(tmp_path / "out"), "--use_cpu", "--log_level", "info")
    output = trained.stdout + trained.stderr
    assert trained.returncode == 0, output[-4000:]
    assert "Total train batch size (w. parallel, distributed & accumulation) = 16" in output
    with open(tmp_path / "out" / "dendrite_evaluations.csv", encoding="utf-8") as handle:
        assert [row["step"] for row in csv.DictReader(handle)] == ["4", "8", "12", "16"]
    assert (tmp_path / "out" / "model.safetensors").exists() and (tmp_path / "out" / "dendrite_config.json").exists()


def test_schedule_decision_refuses_processes_outside_one_job(tmp_path, monkeypatch):
    # The state rank 1 had under `torchrun --ddp_backend gloo` without `--use_cpu`: two processes, distributed type
    # NO. The broadcast did nothing there (TypeError on the missing payload); now the decision says why it cannot run.
    from types import SimpleNamespace

    from accelerate.utils import DistributedType
    from dendritic_task import all_linear, make_args, task_data, tiny_bert

    from hf_dendrites import DendriticTrainer

    trainer = DendriticTrainer(tiny_bert(), make_args(str(tmp_path)), eval_dataset=task_data(8, 2), dendrite_config=all_linear())
    schedule = trainer.dendrite_schedule.to_dict()
    monkeypatch.setenv("WORLD_SIZE", "2")
    trainer.accelerator = SimpleNamespace(num_processes=2, distributed_type=DistributedType.NO, is_main_process=False)
    with pytest.raises(RuntimeError, match=r"cannot take one decision for all processes: .*type NO.*add `--use_cpu`"):
        trainer.dendrite_callback._decide(1.0, 4)
    assert trainer.dendrite_schedule.to_dict() == schedule  # no half-taken step
