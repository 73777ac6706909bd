"""Ablation attribution (issue 23): switching dendrites off on a `DendriticModel`, and the trainer's evaluation of
every kept cycle without its new dendrites.

The trainer runs are constructed so that the answer is known: a tiny BERT on an easy task (the label is whether the
first token is below 13) with dendrites in the pooler only. In the "carry" run the cycle's two ReLU dendrites take over
the pooler's whole function (relu(z) - relu(-z) = z) while its own weights are held at zero, so the model without them
loses the pooler; in the "nothing" run their output weights are held at zero, so they add exactly nothing.
"""

import copy
import csv
import json
import logging

import pytest
import torch
from conftest import make_tiny, tiny_inputs
from dendritic_task import make_args, task_data, tiny_bert
from transformers import TrainerCallback

from hf_dendrites import DendriteConfig, DendriticTrainer, get_dendritic_model
from hf_dendrites.callback import DendriteScheduleCallback
from hf_dendrites.constants import DENDRITE_EVAL_CSV_NAME, DENDRITE_SCHEDULE_NAME
from hf_dendrites.plotting import EVAL_CSV_FIELDS

POOLER = "bert.pooler.dense"


def logits(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out


# ---------------------------------------------------------------------------------------------- the model's switch
@pytest.mark.parametrize(
    "arch, config",
    [("gpt2", DendriteConfig(cascade=True, dendrites_per_cycle=2, dendrite_seed=0)),
     ("bert", DendriteConfig(rank=2, dendrite_seed=0)),
     ("llama", DendriteConfig(dendrite_seed=0))],
)
def test_switching_growths_off_removes_them_and_switching_on_restores_the_outputs_bit_exactly(arch, config):
    model = make_tiny(arch)
    inputs = tiny_inputs(arch)
    plain = logits(model, inputs)
    dm = get_dendritic_model(model, config)
    dm.add_dendrites()
    dm.add_dendrites()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # every dendrite carries something
        for p in dm.dendrite_parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    state = {k: v.clone() for k, v in dm.state_dict().items()}
    full = logits(dm, inputs)
    per = config.dendrites_per_cycle
    first_growth = copy.deepcopy(dm)
    first_growth.set_dendrite_counts(per)  # the model without growth 2

    with dm.dendrites_disabled(growths=[2]) as same:
        assert same is dm
        assert set(dm.disabled_dendrites().values()) == {tuple(range(per, 2 * per))}
        torch.testing.assert_close(logits(dm, inputs), logits(first_growth, inputs), rtol=1e-5, atol=1e-5)
        with dm.dendrites_disabled():  # nested: all of them; the model is the plain one, bit for bit
            assert torch.equal(logits(dm, inputs), plain)
        torch.testing.assert_close(logits(dm, inputs), logits(first_growth, inputs), rtol=1e-5, atol=1e-5)
    assert dm.disabled_dendrites() == {} and torch.equal(logits(dm, inputs), full)
    # `first=`: the dendrites from the counts before a growth on (what the trainer switches off)
    with dm.dendrites_disabled(first=first_growth.dendrite_counts()):
        torch.testing.assert_close(logits(dm, inputs), logits(first_growth, inputs), rtol=1e-5, atol=1e-5)
    # an error inside the context switches them back on too
    with pytest.raises(RuntimeError, match="inside"), dm.dendrites_disabled(growths=1):
        raise RuntimeError("inside")
    assert torch.equal(logits(dm, inputs), full)
    # persistent switch, also on a fused model
    dm.fuse_for_inference()
    dm.disable_dendrites()
    torch.testing.assert_close(logits(dm, inputs), plain, rtol=1e-5, atol=1e-5)
    dm.enable_dendrites().unfuse()
    assert torch.equal(logits(dm, inputs), full)
    # nothing was ever written into the weights
    assert all(torch.equal(v, state[k]) for k, v in dm.state_dict().items())


def test_switch_arguments_are_checked():
    dm = get_dendritic_model(tiny_bert(), DendriteConfig(target_modules="all-linear", dendrite_seed=0))
    dm.add_dendrites()
    with pytest.raises(ValueError, match=r"1 growth\(s\).*got \[2\]"):
        dm.disable_dendrites(growths=[2])
    with pytest.raises(ValueError, match=r"got \[0\]"):
        dm.disable_dendrites(growths=0)
    with pytest.raises(ValueError, match="not both"):
        dm.disable_dendrites(growths=1, first={})
    with pytest.raises(KeyError, match="nope"):
        with dm.dendrites_disabled(first={"nope": 0}):
            pass
    assert dm.disabled_dendrites() == {}


# ---------------------------------------------------------------------------------------------- the trainer
def easy_data(n, seed):
    return [{**r, "labels": int(r["input_ids"][0] < 13)} for r in task_data(n, seed, noise=0.0)]


class Construct(TrainerCallback):
    """"carry": cycle 1's two ReLU dendrites compute the pooler (its own weights held at zero); "nothing": their
    output weights held at zero."""

    def __init__(self, mode):
        self.mode, self.trainer, self.built = mode, None, False

    def layer(self):
        return dict(self.trainer.model.dendritic_layers())[POOLER]

    @torch.no_grad()
    def on_step_begin(self, args, state, control, **kwargs):
        layer = self.layer()
        if self.mode == "carry" and layer.num_dendrites == 2 and not self.built:
            self.built = True
            n = layer.num_neurons
            layer.dendrite_weight[:n], layer.dendrite_weight[n:] = layer.weight, -layer.weight
            layer.dendrite_bias[:n], layer.dendrite_bias[n:] = layer.bias, -layer.bias
            layer.dendrite_out[0], layer.dendrite_out[1] = 1.0, -1.0
        self.hold(layer)

    @torch.no_grad()
    def on_step_end(self, args, state, control, **kwargs):
        self.hold(self.layer())

    def hold(self, layer):
        if layer.num_dendrites == 0:
            return
        if self.mode == "carry" and self.built:
            layer.weight.zero_()
            layer.bias.zero_()
        elif self.mode == "nothing":
            layer.dendrite_out.zero_()


def constructed_run(tmp_path, mode, dropout=0.0, resume=None, **overrides):
    construct = Construct(mode)
    model = tiny_bert()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = dropout
    kwargs = dict(learning_rate=3e-3, dendrite_restart_steps=[16], max_steps=32, dendrite_improvement_threshold=[0.01],
                  max_dendrite_cycles=1, save_strategy="steps", save_steps=4)
    kwargs.update(overrides)
    trainer = DendriticTrainer(
        model, make_args(str(tmp_path / mode), **kwargs), train_dataset=easy_data(128, 1),
        eval_dataset=easy_data(64, 2), callbacks=[construct],
        dendrite_config=DendriteConfig(target_modules=["pooler.dense"], activation="relu", dendrites_per_cycle=2, dendrite_seed=0),
    )
    construct.trainer = trainer
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def kept_cycle(trainer):
    cycle = trainer.model.training_summary["cycles"][1]
    assert cycle["status"] == "kept" and trainer.dendrite_schedule.done
    return cycle


def test_dendrites_that_carry_the_model_score_worse_when_switched_off(tmp_path, info_logs):
    trainer = constructed_run(tmp_path, "carry")
    cycle = kept_cycle(trainer)
    # Independent check on the kept (final) model: the same evaluation with its two dendrites switched off.
    with trainer.model.dendrites_disabled(growths=1):
        without = trainer.evaluate()["eval_loss"]
    assert cycle["ablation_score"] == without
    assert cycle["ablation_delta"] == without - cycle["best_score"] > 0.1  # loss: positive = lower with them
    assert trainer.evaluate()["eval_loss"] == cycle["best_score"]  # the kept score is the kept model's
    messages = [r for r in info_logs() if "switched off" in r.getMessage() or "switching its dendrites off" in r.getMessage()]
    assert [r.levelno for r in messages] == [logging.INFO], [r.getMessage() for r in messages]

    # The evaluation CSV, the run summary, the card's cycle table and the checkpoints carry it.
    with open(tmp_path / "carry" / DENDRITE_EVAL_CSV_NAME, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == list(EVAL_CSV_FIELDS)
    row = next(r for r in rows if r["ablation_score"])
    assert row["step"] == "32" and float(row["ablation_score"]) == without and float(row["ablation_delta"]) == cycle["ablation_delta"]
    trainer.save_model(str(tmp_path / "final"))
    card = (tmp_path / "final" / "README.md").read_text()
    assert "| without its dendrites |" in card and f"| {without:.4f} ({cycle['ablation_delta']:+.4g}) |" in card
    assert "switched off" in card
    saved = json.loads((tmp_path / "carry" / "checkpoint-32" / DENDRITE_SCHEDULE_NAME).read_text())
    assert any(r.get("ablation_score") == without for r in saved["history"])
    event = next(e for e in trainer.state.log_history if e.get("dendrite_event") == 4)
    assert event["dendrite_ablation_delta"] == cycle["ablation_delta"]


def test_dendrites_that_add_nothing_are_flagged_by_the_schedules_own_rule(tmp_path, info_logs):
    trainer = constructed_run(tmp_path, "nothing")
    cycle = kept_cycle(trainer)  # kept: the restart alone improved the loss
    assert cycle["ablation_score"] == cycle["best_score"] and cycle["ablation_delta"] == 0.0
    warnings = [r.getMessage() for r in info_logs() if r.levelno == logging.WARNING]
    assert any("Cycle 1 was kept at step 32, but switching its dendrites off does not make eval_loss worse" in w
               and "dendrite_restarts_only=True" in w for w in warnings), warnings


def test_the_ablation_evaluation_does_not_change_the_training_trajectory(tmp_path, monkeypatch):
    # With dropout, training draws from the global torch RNG, which an evaluation's data loader also draws from.
    kwargs = dict(dropout=0.1, max_dendrite_cycles=2, dendrite_restart_steps=[8, 16], max_steps=24)
    with_ablation = constructed_run(tmp_path / "a", "carry", **kwargs)
    assert sum("ablation_score" in r for r in with_ablation.dendrite_history) == 2
    monkeypatch.setattr(DendriteScheduleCallback, "_ablate", lambda self, *args: None)
    without = constructed_run(tmp_path / "b", "carry", **kwargs)
    assert [r["score"] for r in without.dendrite_history] == [r["score"] for r in with_ablation.dendrite_history]
    a, b = with_ablation.model.state_dict(), without.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_resumed_run_carries_and_repeats_the_ablation_records(tmp_path):
    kwargs = dict(max_dendrite_cycles=2, dendrite_restart_steps=[8, 16], max_steps=24)
    full = constructed_run(tmp_path / "full", "nothing", **kwargs)
    ablated = [(r["step"], r["ablation_score"]) for r in full.dendrite_history if "ablation_score" in r]
    assert [step for step, _ in ablated] == [16, 24]
    checkpoint = tmp_path / "full" / "nothing" / "checkpoint-20"
    resumed = constructed_run(tmp_path / "resumed", "nothing", resume=str(checkpoint), **kwargs)
    assert resumed.dendrite_history == full.dendrite_history  # the record of step 16 came from the checkpoint
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
