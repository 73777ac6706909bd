"""DendriticTrainer under FSDP2 (hf_dendrites/fsdp.py): two real CPU processes (torchrun, gloo, `--use_cpu`) that grow,
switch to the neuron phase, discard and retry a cycle and complete, compared with the same run under DDP; exact
resume from a checkpoint written at a growth; the checkpoint loaded in one process; and the refused setups."""

import json
import os

import pytest
import torch
from conftest import run_two_processes
from dendritic_task import all_linear, make_args, task_data, tiny_bert
from safetensors.torch import load_file

from hf_dendrites import DendriticModel, DendriticTrainer, fsdp

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts", "fsdp_train.py")
EVENTS = [1, 3, 1, 3, 2, 3, 4]  # grow, switch, grow, switch, retry, switch, complete


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """The FSDP2 run of tests/scripts/fsdp_train.py (checkpoints every 2 steps), shared by the tests below."""
    out = tmp_path_factory.mktemp("fsdp")
    return out, run_two_processes(SCRIPT, out, "fsdp")


def _final_state(folder) -> dict:
    return load_file(os.path.join(folder, "final_state.safetensors"))


def test_fsdp2_growth_discard_retry_shards_everything_and_matches_ddp(fsdp_run, tmp_path):
    out, results = fsdp_run
    for res in results:
        assert res["world_size"] == 2 and res["distributed_type"].endswith("FSDP")  # really FSDP, not DDP, on CPU
        assert res["done"] and [e["event"] for e in res["events"]] == EVENTS
        for event in res["events"] + [res["final"]]:
            # After every growth, retry and phase switch the model is sharded again, every parameter (the new
            # dendrites too) a DTensor whose gradients FSDP reduce-scatters: no parameter left out of the shards.
            assert event["fsdp_module"] and event["all_dtensor"] and event["dendrites_dtensor"], event
        # The whole parameters (gathered) are identical on both ranks after every event, after the training steps
        # that followed each growth, and at the end. (A dendrite added to a sharded layer as a plain parameter
        # trains on each rank's own gradients: its values differ between ranks and this fails.)
        assert all(e["params_identical"] for e in res["events"]) and res["final_params_identical"]
        assert all(e["optimizer_matches"] and e["prepared_models"] == 1 for e in res["events"])
        assert res["events"][0]["trainable"] < res["events"][1]["trainable"]  # the dendrites-only phase froze the base
        assert res["history_identical"] and res["dendrite_counts"] == [2]
    assert results[0]["history"] == results[1]["history"]

    ddp = run_two_processes(SCRIPT, tmp_path, "ddp")
    assert ddp[0]["distributed_type"].endswith("MULTI_CPU")
    # The same decisions at the same steps, the same scores, and the same final weights as DDP with the same seed.
    assert [(r["step"], r["decision"], r["score"]) for r in results[0]["history"]] == [
        (r["step"], r["decision"], r["score"]) for r in ddp[0]["history"]
    ]
    assert [e["trainable"] for e in results[0]["events"]] == [e["trainable"] for e in ddp[0]["events"]]
    sharded, replicated = _final_state(out), _final_state(tmp_path)
    assert sharded.keys() == replicated.keys()
    for name in sharded:
        torch.testing.assert_close(sharded[name], replicated[name], rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(torch.tensor(results[0]["logits"]), torch.tensor(ddp[0]["logits"]), rtol=1e-5, atol=1e-6)


def test_accelerate_launch_use_fsdp_on_cpu_runs_fsdp2_not_ddp(fsdp_run, tmp_path):
    # `accelerate launch --use_fsdp --fsdp_version 2 ...` on a machine without a GPU, training arguments without `fsdp`:
    # accelerate alone trains with DDP there; the trainer runs FSDP2, as the same run with `fsdp=True` does.
    out, results = fsdp_run
    launched = run_two_processes(SCRIPT, tmp_path, "ddp", launcher="accelerate-fsdp2")
    assert launched[0]["distributed_type"].endswith("FSDP") and all(launched[0]["final"].values())
    assert all(e["all_dtensor"] for e in launched[0]["events"]) and launched[0]["history"] == results[0]["history"]
    a, b = _final_state(out), _final_state(tmp_path)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_fsdp2_lr_search_and_load_best_model_at_end_match_ddp(tmp_path):
    (tmp_path / "fsdp").mkdir(), (tmp_path / "ddp").mkdir()
    sharded = run_two_processes(SCRIPT, tmp_path / "fsdp", "fsdp", "--variant", "search")
    replicated = run_two_processes(SCRIPT, tmp_path / "ddp", "ddp", "--variant", "search")
    history = sharded[0]["history"]
    assert [r["decision"] for r in history].count("next_lr") == 2 and not sharded[0]["done"]
    assert history == sharded[1]["history"] and sharded[0]["final_params_identical"]
    assert [(r["step"], r["decision"], r["lr_factor"]) for r in history] == [
        (r["step"], r["decision"], r["lr_factor"]) for r in replicated[0]["history"]
    ]
    # load_best_model_at_end loaded checkpoint-10 (one dendrite per layer; the last model had two), sharded again
    assert sharded[0]["dendrite_counts"] == replicated[0]["dendrite_counts"] == [1]
    assert all(sharded[0]["final"].values())
    a, b = _final_state(tmp_path / "fsdp"), _final_state(tmp_path / "ddp")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_fsdp2_restarts_only_control(tmp_path):
    results = run_two_processes(SCRIPT, tmp_path, "fsdp", "--variant", "restarts")
    res = results[0]
    assert res["distributed_type"].endswith("FSDP") and res["done"] and res["dendrite_counts"] == [0]
    # every growth event happened (restore, fresh optimizer, sharded again), without a dendrite
    assert [e["event"] for e in res["events"]].count(1) >= 1 and all(e["fsdp_module"] and e["all_dtensor"] for e in res["events"])
    assert all(e["params_identical"] for e in res["events"]) and res["final_params_identical"]
    assert results[1]["history"] == res["history"]


def test_fsdp2_resume_from_a_checkpoint_written_at_a_growth_is_exact(fsdp_run, tmp_path):
    out, results = fsdp_run
    checkpoint = out / "checkpoint-4"  # written right after the first growth (a new, still empty optimizer)
    assert json.loads((checkpoint / "dendrite_schedule.json").read_text())["history"][-1]["decision"] == "grow"
    assert (checkpoint / fsdp.FRESH_OPTIMIZER_NAME).exists() and (checkpoint / "optimizer.bin").exists()
    resumed = run_two_processes(SCRIPT, tmp_path, "fsdp", "--resume", str(checkpoint))
    assert resumed[0]["history"] == results[0]["history"]
    assert resumed[0]["logits"] == results[0]["logits"]
    uninterrupted, continued = _final_state(out), _final_state(tmp_path)
    assert all(torch.equal(uninterrupted[k], continued[k]) for k in uninterrupted)


def test_fsdp2_resume_from_sharded_state_dict_checkpoints_is_exact(tmp_path):
    # fsdp_config state_dict_type SHARDED_STATE_DICT: the Trainer saves each process's optimizer shards (DCP); the
    # dendritic model files are the single-process ones all the same. Resumed in the dendrites-only phase after a growth.
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    first.mkdir(), resumed.mkdir()
    flags = ("fsdp", "--sharded-state-dict", "--max-steps", "10")
    original = run_two_processes(SCRIPT, first, *flags)
    checkpoint = first / "checkpoint-6"
    assert (checkpoint / "optimizer_0").is_dir() and (checkpoint / "model.safetensors").exists()
    assert [r["decision"] for r in original[0]["history"]][:3] == ["continue", "grow", "continue"]
    continued = run_two_processes(SCRIPT, resumed, *flags, "--resume", str(checkpoint))
    assert continued[0]["history"] == original[0]["history"] and continued[0]["logits"] == original[0]["logits"]
    a, b = _final_state(first), _final_state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fsdp2_saves_the_single_process_format_and_it_loads_in_one_process(fsdp_run):
    out, results = fsdp_run
    final = out / "final"  # trainer.save_model() after training, on both ranks; rank 0 wrote
    names = {p.name for p in final.iterdir()}
    assert {"model.safetensors", "dendrite_model.safetensors", "dendrite_config.json", "config.json"} <= names
    assert not any(n.startswith("pytorch_model_fsdp") for n in names)  # the dendritic format, not FSDP's own
    # save_pretrained on the sharded model itself is refused on every rank (it would write each rank's shards)
    assert all("save_pretrained was called on a model sharded by FSDP2" in r["direct_save"] for r in results)
    assert not (out / "direct").exists()
    model = DendriticModel.from_pretrained(str(final)).eval()
    assert sorted(set(model.dendrite_counts().values())) == [2]
    with torch.no_grad():
        logits = model(**{k: torch.tensor(v) for k, v in results[0]["inputs"].items()}).logits
    # The sharded model's outputs on the two ranks, computed by the one-process model loaded from its save.
    torch.testing.assert_close(logits, torch.tensor(results[0]["logits"]), rtol=1e-5, atol=1e-6)
    state = _final_state(out)
    assert all(torch.equal(v, state[f"model.{k}"]) for k, v in model.model.state_dict().items())


# ---------------------------------------------------------------------------------------------- refused setups
@pytest.fixture(autouse=True)
def _fsdp_environment():
    """accelerate exports ACCELERATE_USE_FSDP (and FSDP_*) when an accelerator is given an FSDP plugin: keep them out
    of the other tests."""
    saved = {k: v for k, v in os.environ.items() if k.startswith(("ACCELERATE_", "FSDP_"))}
    yield
    for key in [k for k in os.environ if k.startswith(("ACCELERATE_", "FSDP_"))]:
        del os.environ[key]
    os.environ.update(saved)


def _build(tmp_path, **overrides):
    args = make_args(str(tmp_path), **overrides)
    return DendriticTrainer(tiny_bert(), args, eval_dataset=task_data(8, 2), dendrite_config=all_linear())


def test_fsdp_version_1_is_refused_naming_version_2(tmp_path, monkeypatch):
    with pytest.raises(NotImplementedError, match=r"FSDP version 2 only.*version 1.*fsdp_config=\{'version': 2\}"):
        _build(tmp_path, fsdp=True, fsdp_config={"version": 1})
    # `accelerate launch --use_fsdp` without --fsdp_version: accelerate's default is FSDP 1
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.delenv("FSDP_VERSION", raising=False)
    with pytest.raises(NotImplementedError, match=r"FSDP version 2 only.*version 1.*--fsdp_version 2"):
        _build(tmp_path)
    assert not any(tmp_path.iterdir())


def test_fsdp_outside_a_distributed_job_stops_instead_of_training_unsharded(tmp_path, monkeypatch):
    with pytest.raises(RuntimeError, match=r"FSDP is requested, but accelerate runs this process with distributed type NO"):
        _build(tmp_path, fsdp=True, fsdp_config={"version": 2})
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(RuntimeError, match=r"--use_cpu"):
        _build(tmp_path)


def test_a_training_step_refuses_an_unsharded_model_when_fsdp_is_requested(tmp_path, monkeypatch):
    trainer = _build(tmp_path)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # FSDP asked for, but the model is not sharded
    batch = trainer.data_collator(task_data(4, 3))
    with pytest.raises(RuntimeError, match=r"FSDP is requested, but the model being trained is a DendriticModel, not sharded"):
        trainer.training_step(trainer.model, batch)


def test_the_correlation_rule_is_refused_under_fsdp():
    from hf_dendrites import DendriteConfig, get_dendritic_model

    dm = get_dendritic_model(tiny_bert(), DendriteConfig(target_modules="all-linear", learning_rule="correlation"))
    with pytest.raises(NotImplementedError, match=r"`correlation` learning rule under FSDP.*learning_rule='gd'"):
        fsdp.check_model_supported(dm, "DendriticTrainer")
    fsdp.check_model_supported(get_dendritic_model(tiny_bert(), all_linear()), "DendriticTrainer")  # gd: supported
