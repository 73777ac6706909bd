"""DendriticTrainer under DeepSpeed ZeRO-1 / ZeRO-2 (hf_dendrites/deepspeed_support.py): two real CPU processes
(gloo) launched with torch.distributed.run, compared with the DDP run of the same seed; and the setups refused while
the trainer is built (ZeRO-3, optimizer / scheduler sections, the correlation rule, a missing DeepSpeed package)."""

import os
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import run_two_processes
from dendritic_task import make_args, task_data, tiny_bert

from hf_dendrites import DendriticModel, DendriticTrainer
from hf_dendrites.deepspeed_support import check_deepspeed_setup, load_layout_before_engine

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts", "deepspeed_train.py")


def _needs_deepspeed():
    pytest.importorskip("deepspeed", reason='DeepSpeed is an optional extra: pip install "hf_dendrites[deepspeed]"')


def _check_engine_run(results: list[dict]) -> None:
    """What every DeepSpeed run must show on both ranks."""
    for res in results:
        assert res["world_size"] == 2 and res["distributed_type"].endswith("DEEPSPEED")
        events = res["events"]
        assert events and all(e["params_identical"] for e in events) and res["final_params_identical"]
        assert res["history_identical"] and res["schedule_identical"]
        # A new engine around the same DendriticModel after every change of the parameter set ...
        assert all(e["wrapper"] == "DeepSpeedEngine" and e["wraps_model"] and e["new_wrapper"] for e in events)
        # ... whose ZeRO optimizer holds exactly the trainable parameters; the accelerator lists it alone, and the
        # replaced engines' forward hooks left the model (one engine's two remain).
        assert all(e["optimizer_matches"] and e["prepared_optimizers"] == 1 and e["prepared_models"] == 1 for e in events)
        assert all(e["forward_hooks"] == 2 for e in events)
        # The replaced engine's optimizer state is freed, although the Trainer's training loop holds the first engine
        # to the end.
        assert all(e["old_optimizer_freed"] for e in events)
    assert results[0]["history"] == results[1]["history"]


def _assert_same_final_model_as_ddp(ds_dir, ddp_dir, atol=1e-4) -> dict:
    """The final weights (and logits of fixed inputs) of the DeepSpeed run equal the DDP run's within float tolerance,
    where training moved the weights far more than the tolerance. Returns the DeepSpeed run's saved final state."""
    ds, ddp = torch.load(ds_dir / "final_logits.pt"), torch.load(ddp_dir / "final_logits.pt")
    assert set(ds["state"]) == set(ddp["state"])
    for name, value in ddp["state"].items():
        torch.testing.assert_close(ds["state"][name], value, atol=atol, rtol=1e-4, msg=name)
    torch.testing.assert_close(ds["logits"], ddp["logits"], atol=atol, rtol=1e-4)
    initial = tiny_bert().state_dict()
    moved = max((ds["state"][f"model.{k}"] - v).abs().max().item() for k, v in initial.items() if v.is_floating_point())
    assert moved > 100 * atol
    # the same single-process save_pretrained files
    assert sorted(os.listdir(ds_dir / "final")) == sorted(os.listdir(ddp_dir / "final"))
    return ds


def _logits(folder) -> torch.Tensor:
    rows = task_data(8, 5)
    inputs = {k: torch.tensor([r[k] for r in rows]) for k in ("input_ids", "attention_mask")}
    model = DendriticModel.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        return model(**inputs).logits


def test_zero2_growth_discard_retry_match_ddp_and_resume_exactly(tmp_path):
    _needs_deepspeed()
    ds = run_two_processes(SCRIPT, tmp_path / "zero2", "--zero", "2", "--resume_step", "6")
    ddp = run_two_processes(SCRIPT, tmp_path / "ddp")
    _check_engine_run(ds)
    for res in ds:
        assert res["done"] and res["dendrite_counts"] == [2]
        # grow, switch, grow, switch, retry (cycle 2 discarded), switch, complete
        assert [e["event"] for e in res["events"]] == [1, 3, 1, 3, 2, 3, 4]
        assert res["events"][0]["trainable"] < res["events"][1]["trainable"]  # a dendrites-only phase first
        # Resumed from checkpoint-6 (after the growth at step 4, with two steps of ZeRO optimizer state): the same
        # final parameters, history and schedule as the uninterrupted run, bit for bit.
        assert res["resumed_step"] == 28 and res["resumed_identical_on_ranks"]
        assert res["resumed_params_equal"] and res["resumed_history_equal"] and res["resumed_schedule_equal"]
    # the same decisions as the DDP run of the same seed, and the same final model within float tolerance
    assert [(r["step"], r["decision"]) for r in ds[0]["history"]] == [(r["step"], r["decision"]) for r in ddp[0]["history"]]
    final = _assert_same_final_model_as_ddp(tmp_path / "zero2", tmp_path / "ddp")
    # DeepSpeed wrote its own checkpoint beside the dendritic one, which loads in one process as it is
    assert list((tmp_path / "zero2" / "checkpoint-6").glob("global_step*/*optim_states.pt"))
    torch.testing.assert_close(_logits(tmp_path / "zero2" / "final"), final["logits"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(_logits(tmp_path / "zero2" / "checkpoint-28"), final["logits"], atol=1e-6, rtol=1e-6)
    after_growth = DendriticModel.from_pretrained(str(tmp_path / "zero2" / "checkpoint-6"))
    assert set(after_growth.dendrite_counts().values()) == {1}


def test_zero1_lr_search_and_load_best_model_at_end_match_ddp(tmp_path):
    _needs_deepspeed()
    flags = ["--lr_search", "1.0", "0.5", "--max_steps", "30", "--load_best"]
    ds = run_two_processes(SCRIPT, tmp_path / "zero1", "--zero", "1", *flags)
    ddp = run_two_processes(SCRIPT, tmp_path / "ddp", *flags)
    _check_engine_run(ds)
    history = ds[0]["history"]
    assert [(r["step"], r["decision"], r["lr_factor"]) for r in history] == [
        (r["step"], r["decision"], r["lr_factor"]) for r in ddp[0]["history"]
    ]
    decisions = [r["decision"] for r in history]
    assert decisions.count("grow") == 2 and decisions.count("next_lr") == 2 and 0.5 in {r["lr_factor"] for r in history}
    # The run stopped at max_steps before the schedule completed: load_best_model_at_end loaded the best checkpoint.
    for res in ds:
        assert not res["done"] and res["global_step"] == 30
        assert os.path.basename(res["best_model_checkpoint"]) == "checkpoint-26"
        assert res["origin"]["origin"] == "best checkpoint" and res["origin"]["step"] == 26
    final = _assert_same_final_model_as_ddp(tmp_path / "zero1", tmp_path / "ddp")
    torch.testing.assert_close(_logits(tmp_path / "zero1" / "checkpoint-26"), final["logits"], atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------- refused setups
@pytest.mark.parametrize(
    "config, error, match",
    [
        ({"zero_optimization": {"stage": 3}}, NotImplementedError, r"not stage 3 .*Use ZeRO-2"),
        (
            {"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW", "params": {"lr": "auto"}},
             "scheduler": {"type": "WarmupLR"}},
            ValueError,
            r"cannot have 'optimizer' / 'scheduler' section\(s\)\. Remove them",
        ),
    ],
    ids=["zero3", "optimizer-section"],
)
def test_unsupported_deepspeed_configs_are_refused_before_anything_is_built(tmp_path, config, error, match):
    _needs_deepspeed()
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    model = tiny_bert()  # before the arguments: a ZeRO-3 config makes transformers partition new models
    try:
        args = make_args(str(tmp_path), deepspeed=config)
        with pytest.raises(error, match=match):
            DendriticTrainer(model, args)
    finally:
        unset_hf_deepspeed_config()
    assert not torch.distributed.is_initialized()  # refused before any process group was set up


def _fake_trainer(config: dict, learning_rule: str = "gd", model_init=None) -> SimpleNamespace:
    """What the DeepSpeed checks read of a trainer: the accelerator's DeepSpeed config (as an accelerate config with
    --use_deepspeed gives it, without `deepspeed=`) and the model's learning rule."""
    plugin = SimpleNamespace(deepspeed_config=config)
    return SimpleNamespace(
        _dendritic_class_name=lambda: "DendriticTrainer",
        accelerator=SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin)),
        model=SimpleNamespace(dendrite_config=SimpleNamespace(learning_rule=learning_rule)),
        model_init=model_init,
    )


def test_accelerate_deepspeed_config_and_correlation_rule_are_checked_after_init():
    _needs_deepspeed()
    check_deepspeed_setup(_fake_trainer({"zero_optimization": {"stage": 2}}))  # supported: no error
    with pytest.raises(NotImplementedError, match=r"not stage 3"):
        check_deepspeed_setup(_fake_trainer({"zero_optimization": {"stage": 3}}))
    with pytest.raises(NotImplementedError, match=r"correlation learning rule under DeepSpeed.*Use DDP"):
        check_deepspeed_setup(_fake_trainer({"zero_optimization": {"stage": 2}}, learning_rule="correlation"))
    with pytest.raises(NotImplementedError, match=r"cannot resume a DeepSpeed run with `model_init`"):
        load_layout_before_engine(_fake_trainer({}, model_init=tiny_bert), "checkpoint-4")


def test_missing_deepspeed_package_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # `import deepspeed` raises ImportError
    with pytest.raises(ImportError, match=r'pip install "hf_dendrites\[deepspeed\]"'):
        make_args(str(tmp_path), deepspeed={"zero_optimization": {"stage": 2}})


def test_hyperparameter_search_is_refused_under_deepspeed():
    from hf_dendrites.hp_search import DendriteHPSearchMixin

    trainer = SimpleNamespace(is_deepspeed_enabled=True, model_init=tiny_bert)
    with pytest.raises(NotImplementedError, match=r"does not run under DeepSpeed.*Run the search with DDP"):
        DendriteHPSearchMixin.hyperparameter_search(trainer, n_trials=1)
