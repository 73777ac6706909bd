"""TRL's SFT and DPO trainers made dendritic (hf_dendrites/trl.py), and the mixin recipe on a custom Trainer, on a tiny
Llama loaded by TRL from a model folder (as from a Hub id), through real training loops and checkpoints on disk."""

import json
import os
from dataclasses import dataclass

import pytest
import torch
import transformers
from dendritic_task import ScriptedMetric, all_linear, make_args, state_of, task_data, tiny_bert
from transformers import Trainer, TrainingArguments

from hf_dendrites import (
    DendriteConfig,
    DendriteScheduleArguments,
    DendriteScheduleCallback,
    DendriticModel,
    DendriticTrainer,
    DendriticTrainerMixin,
    DendriticTrainingArguments,
)
from hf_dendrites.constants import DENDRITE_CONFIG_NAME, DENDRITE_CURVE_NAME, DENDRITE_EVAL_CSV_NAME

if os.environ.get("CI"):  # CI installs the `test` extra, which holds trl: missing there is a failure, not a skip
    import trl
else:
    trl = pytest.importorskip("trl")

from test_hub import TOKEN, hub, hub_env  # noqa: E402, F401  (the local Hub server's fixtures)
from test_trainer import _CrashAfterFirstGrowth, _Interrupted  # noqa: E402
from trl_task import dpo_data, sft_data, tiny_llama, tiny_llama_folder, trl_args  # noqa: E402

from hf_dendrites import DendriticDPOConfig, DendriticDPOTrainer, DendriticSFTConfig, DendriticSFTTrainer  # noqa: E402

KINDS = ("sft", "dpo")
# Cycle 0 plateaus at 1.0 -> grow; cycle 1 try 1 does not beat it -> discard and retry; try 2 beats it -> complete
# (max_dendrite_cycles=1, patience 2, evaluations every 4 steps).
SCORES = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.9, 0.9, 0.9]
DECISIONS = [(4, "continue"), (8, "continue"), (12, "grow"), (16, "continue"), (20, "continue"), (24, "retry"),
             (28, "continue"), (32, "continue"), (36, "complete")]


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    return tiny_llama_folder(tmp_path_factory.mktemp("tiny-llama"))


def make_trl_trainer(kind, folder, output_dir, model=None, scores=SCORES, callbacks=None, **overrides):
    """A DendriticSFTTrainer / DendriticDPOTrainer whose schedule sees `scores`. `model=None`: TRL loads the model
    from the folder's path (and, for DPO, the reference model too)."""
    kwargs = {"metric_for_best_model": "scripted", "greater_is_better": False}
    kwargs.update(overrides)
    args = trl_args(kind, str(output_dir), **kwargs)
    common = {"args": args, "compute_metrics": ScriptedMetric(scores), "callbacks": callbacks,
              "dendrite_config": DendriteConfig(target_modules="all-linear", dendrite_seed=0)}
    if model is not None:
        common["processing_class"] = transformers.AutoTokenizer.from_pretrained(folder)
    if kind == "sft":
        return DendriticSFTTrainer(model=model or folder, train_dataset=sft_data(64, 1), eval_dataset=sft_data(16, 2), **common)
    if model is not None:  # TRL loads the reference model from the policy's path, which a fresh object has not
        common["ref_model"] = transformers.AutoModelForCausalLM.from_pretrained(folder)
    return DendriticDPOTrainer(model=model or folder, train_dataset=dpo_data(64, 1), eval_dataset=dpo_data(16, 2), **common)


def decisions(trainer):
    return [(r["step"], r["decision"]) for r in trainer.dendrite_history]


# ---------------------------------------------------------------------------------------------- the schedule
@pytest.mark.parametrize("kind", KINDS)
def test_grows_discards_retries_and_completes(kind, llama_folder, tmp_path):
    trainer = make_trl_trainer(kind, llama_folder, tmp_path)
    # TRL loaded the model from its path and prepared it; the mixin converted what TRL built.
    assert isinstance(trainer.model, DendriticModel) and type(trainer.model.model) is transformers.LlamaForCausalLM
    assert trainer.model_wrapped is trainer.model and trainer.callback_handler.model is trainer.model
    assert len(trainer.model.dendrite_counts()) == 14
    if kind == "dpo":  # the reference model stays plain
        assert type(trainer.ref_model) is transformers.LlamaForCausalLM
    trainer.train()

    assert decisions(trainer) == DECISIONS
    tries = [(h.cycle, h.attempt, h.accepted) for h in trainer.dendrite_schedule.history]
    assert tries == [(0, 1, True), (1, 1, False), (1, 2, True)]
    assert trainer.dendrite_schedule.done and trainer.state.global_step == 36
    assert set(trainer.model.dendrite_counts().values()) == {1}
    # Each growth rebuilt the optimizer over the new parameters, which trained: the dendrites moved off zero.
    assert {id(p) for g in trainer.optimizer.param_groups for p in g["params"]} == {id(p) for p in trainer.model.parameters()}
    assert all(float(p.abs().sum()) > 0 for p in trainer.model.dendrite_parameters())
    # TRL's own logging still works, and its evaluation metrics of the ablation evaluation (the kept cycle's model
    # without its dendrites) leak into no log entry.
    evals = [e for e in trainer.state.log_history if "eval_scripted" in e]
    assert len(evals) == 9 and all("eval_loss" in e and "eval_mean_token_accuracy" in e for e in evals)
    events = [e for e in trainer.state.log_history if "dendrite_event" in e]
    assert [e["dendrite_event"] for e in events] == [1, 2, 4] and not any(k.startswith("eval_") for e in events for k in e)
    assert (tmp_path / DENDRITE_EVAL_CSV_NAME).is_file() and (tmp_path / DENDRITE_CURVE_NAME).is_file()
    # The metrics TRL adds while it logs an evaluation reach `evaluate()`'s result and the schedule's records, as in TRL.
    trl_metric = "eval_mean_token_accuracy" if kind == "sft" else "eval_rewards/accuracies"
    assert trl_metric in trainer.dendrite_callback.training_summary()["eval_results"]

    # The saved model and its card are dendritic, with TRL's tags.
    trainer.save_model(str(tmp_path / "final"))
    card = (tmp_path / "final" / "README.md").read_text()
    assert "artificial dendrites" in card and "| 1 | 2 | kept |" in card and "| 1 | 1 | discarded |" in card
    assert "- trl" in card and f"- {kind}" in card
    reloaded = DendriticModel.from_pretrained(str(tmp_path / "final"))
    assert reloaded.dendrite_counts() == trainer.model.dendrite_counts()
    if kind == "sft":
        # A dendritic checkpoint trains on (docs/continuing_training.md): the trainer keeps the DendriticModel given.
        again = make_trl_trainer(kind, llama_folder, tmp_path / "again", model=reloaded)
        assert again.model is reloaded
        assert again.evaluate()["eval_loss"] == pytest.approx(trainer.evaluate()["eval_loss"], abs=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_resume_from_a_checkpoint_written_after_a_growth_is_exact(kind, llama_folder, tmp_path):
    common = {"save_strategy": "steps", "save_steps": 4}
    reference = make_trl_trainer(kind, llama_folder, tmp_path / "uninterrupted", **common)
    reference.train()

    crash = _CrashAfterFirstGrowth()
    crashing = make_trl_trainer(kind, llama_folder, tmp_path / "run", callbacks=[crash], **common)
    crash.trainer = crashing
    with pytest.raises(_Interrupted):
        crashing.train()
    assert crash.crashed_at == 12
    checkpoint = tmp_path / "run" / "checkpoint-12"
    assert set(json.loads((checkpoint / DENDRITE_CONFIG_NAME).read_text())["layers"].values()) == {1}
    # TRL writes a card into output_dir at every checkpoint: it is the dendritic one.
    assert "artificial dendrites" in (tmp_path / "run" / "README.md").read_text()

    # A new process: a model object of another initialisation resumes; the scores go on where the run stopped.
    resumed = make_trl_trainer(kind, llama_folder, tmp_path / "run", model=tiny_llama(seed=5), scores=SCORES[3:], **common)
    resumed.train(resume_from_checkpoint=True)
    assert decisions(resumed) == decisions(reference) == DECISIONS
    losses = {e["step"]: e["eval_loss"] for e in reference.state.log_history if "eval_loss" in e}
    after = {e["step"]: e["eval_loss"] for e in resumed.state.log_history if "eval_loss" in e and e["step"] > 12}
    assert after and after == pytest.approx({s: losses[s] for s in after}, abs=1e-5)
    assert resumed.model.dendrite_counts() == reference.model.dendrite_counts()
    expected, got = state_of(reference.model), state_of(resumed.model)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)


def test_sft_with_peft_config_grows_dendrites_under_lora_and_checkpoints_only_what_trains(llama_folder, tmp_path):
    """TRL wraps the model with `peft_config`; the mixin converts the PeftModel: dendrites on the base layers (not on
    LoRA's), the frozen base stays unchanged, Trainer checkpoints are adapter-only, and the saved model reloads with
    its adapter exactly."""
    peft = pytest.importorskip("peft")
    trainer = DendriticSFTTrainer(
        model=llama_folder,
        args=trl_args("sft", str(tmp_path), metric_for_best_model="scripted", greater_is_better=False,
                      save_strategy="steps", save_steps=12),
        train_dataset=sft_data(64, 1),
        eval_dataset=sft_data(16, 2),
        compute_metrics=ScriptedMetric(SCORES),
        peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        dendrite_config=DendriteConfig(target_modules=["q_proj", "down_proj"], rank=2, dendrite_seed=0),
    )
    dm = trainer.model
    assert isinstance(dm.model, peft.PeftModel)
    layers = set(dm.dendrite_counts())
    assert layers and all(name.endswith(("q_proj.base_layer", "down_proj")) for name in layers), layers
    base_before = {n: p.detach().clone() for n, p in dm.named_parameters() if "base_layer" in n or "down_proj.weight" in n}
    trainer.train()
    assert decisions(trainer) == DECISIONS
    assert all(count >= 1 for count in dm.dendrite_counts().values())
    for name, param in dm.named_parameters():
        if name in base_before:
            assert not param.requires_grad and torch.equal(param, base_before[name]), name
        if "lora_" in name or ".dendrite" in name:
            assert param.requires_grad, name
    checkpoint = tmp_path / "checkpoint-12"
    assert not (checkpoint / "model.safetensors").exists()  # adapter-only: the frozen base is fingerprinted
    assert (checkpoint / "peft_adapter" / "adapter_config.json").is_file()
    trainer.save_model(str(tmp_path / "final"))
    card = (tmp_path / "final" / "README.md").read_text()
    assert "Trained with `DendriticSFTTrainer`" in card and "The model carries PEFT adapters (`default` (LORA, r=4))" in card
    reloaded = DendriticModel.from_pretrained(str(tmp_path / "final"))
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    dm.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, dm(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.usefixtures("hub_env")
def test_push_to_hub_pushes_the_dendritic_card(llama_folder, tmp_path):
    from huggingface_hub import HfApi

    repo = "tester/tiny-llama-sft-dendrites"
    trainer = make_trl_trainer("sft", llama_folder, tmp_path, hub_model_id=repo, hub_token=TOKEN)
    trainer.train()
    trainer.push_to_hub(token=TOKEN)
    api = HfApi(token=TOKEN)
    files = set(api.list_repo_files(repo))
    assert {"README.md", DENDRITE_CONFIG_NAME, "training_curve.png"} <= files
    card = open(api.hf_hub_download(repo, "README.md", local_dir=str(tmp_path / "download"))).read()
    assert "artificial dendrites" in card and "14 dendrites in" in card and "| 1 | 1 | discarded |" in card
    assert "- trl" in card and "- sft" in card and "![Training curve](training_curve.png)" in card


# ---------------------------------------------------------------------------------------------- the recipe
class CountingTrainer(Trainer):
    """A user's Trainer subclass with its own loss (scaled by an argument of its own arguments class)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_calls = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.loss_calls += 1
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if return_outputs:
            return out[0] * self.args.loss_scale, out[1]
        return out * self.args.loss_scale


@dataclass
class CountingArguments(TrainingArguments):
    loss_scale: float = 1.0


# The documented recipe (docs/trl.md): three lines per class.
@dataclass
class DendriticCountingArguments(DendriteScheduleArguments, CountingArguments):
    pass


class DendriticCountingTrainer(DendriticTrainerMixin, CountingTrainer):
    dendrite_args_class = DendriticCountingArguments


def test_a_custom_trainer_made_dendritic_with_the_recipe(tmp_path):
    (args,) = transformers.HfArgumentParser(DendriticCountingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--eval_strategy", "steps", "--eval_steps", "4", "--loss_scale", "0.5",
         "--dendrite_patience", "2", "--max_dendrite_cycles", "1", "--metric_for_best_model", "scripted",
         "--greater_is_better", "False", "--use_cpu", "--report_to", "none", "--learning_rate", "3e-3",
         "--lr_scheduler_type", "constant", "--per_device_train_batch_size", "16", "--save_strategy", "steps",
         "--save_steps", "12", "--disable_tqdm", "True", "--num_train_epochs", "100"]
    )
    assert args.loss_scale == 0.5 and args.dendrite_patience == [2] and args.max_dendrite_cycles == 1
    trainer = DendriticCountingTrainer(
        tiny_bert(), args, train_dataset=task_data(128, 1), eval_dataset=task_data(64, 2),
        compute_metrics=ScriptedMetric(SCORES), dendrite_config=all_linear(),
    )
    assert isinstance(trainer.model, DendriticModel) and isinstance(trainer.dendrite_callback, DendriteScheduleCallback)
    trainer.train()
    assert decisions(trainer) == DECISIONS and trainer.loss_calls >= 36
    # The user's loss ran on the dendritic model: the losses are half the model's own (about ln(2) for this task).
    assert 0.2 < trainer.state.log_history[-1]["train_loss"] < 0.45
    trainer.args.loss_scale = 1.0
    assert trainer.evaluate()["eval_loss"] > 0.6
    assert set(json.loads((tmp_path / "checkpoint-12" / DENDRITE_CONFIG_NAME).read_text())["layers"].values()) == {1}
    assert "| 1 | 2 | kept |" in (tmp_path / "checkpoint-36" / "README.md").read_text()


# ---------------------------------------------------------------------------------------------- wrong mixes
def test_wrong_mixes_of_trainer_and_arguments_name_the_class_to_use(llama_folder, tmp_path):
    out = str(tmp_path)
    data = {"train_dataset": sft_data(8, 1), "eval_dataset": sft_data(8, 2)}
    sft_config = trl.SFTConfig(output_dir=out, use_cpu=True, bf16=False, report_to=[])
    with pytest.raises(TypeError, match=r"needs its training arguments as DendriticSFTConfig \(.*\), got SFTConfig\. For DendriticSFTTrainer, pass"):
        DendriticSFTTrainer(model=llama_folder, args=sft_config, **data)
    with pytest.raises(TypeError, match="got DendriticTrainingArguments. DendriticTrainingArguments goes with DendriticTrainer\\."):
        DendriticSFTTrainer(model=llama_folder, args=make_args(out), **data)
    with pytest.raises(TypeError, match=r"as DendriticSFTConfig \(.*\), got TrainingArguments\."):
        DendriticSFTTrainer(model=llama_folder, args=TrainingArguments(output_dir=out, use_cpu=True), **data)
    with pytest.raises(TypeError, match="got DendriticSFTConfig. DendriticSFTConfig goes with DendriticSFTTrainer\\."):
        DendriticDPOTrainer(model=llama_folder, args=trl_args("sft", out), train_dataset=dpo_data(8, 1))
    with pytest.raises(ValueError, match=r"DendriticSFTTrainer needs `args`: e.g. DendriticSFTConfig\("):
        DendriticSFTTrainer(model=llama_folder, **data)
    bert = {"train_dataset": task_data(16, 1), "eval_dataset": task_data(16, 2), "dendrite_config": all_linear()}
    with pytest.raises(TypeError, match="SFTConfig goes with DendriticSFTTrainer with DendriticSFTConfig"):
        DendriticTrainer(tiny_bert(), sft_config, **bert)
    with pytest.raises(TypeError, match="got DendriticDPOConfig. DendriticDPOConfig goes with DendriticDPOTrainer\\."):
        DendriticTrainer(tiny_bert(), trl_args("dpo", out), **bert)
    # The recipe's trainer names the arguments class it needs; a plain one is told how to make it dendritic.
    with pytest.raises(TypeError, match=r"as DendriticCountingArguments \(.*\), got CountingArguments\."):
        DendriticCountingTrainer(tiny_bert(), CountingArguments(output_dir=out, use_cpu=True), **bert)

    class AnyArgumentsTrainer(DendriticTrainerMixin, CountingTrainer):
        pass

    with pytest.raises(TypeError, match=r"@dataclass class DendriticCountingArguments\(DendriteScheduleArguments, CountingArguments\)"):
        AnyArgumentsTrainer(tiny_bert(), CountingArguments(output_dir=out, use_cpu=True), **bert)
    # DendriticTrainer is the mixin + Trainer: combined with another trainer, in either order, it is refused at once.
    for bases in ((DendriticTrainer, trl.SFTTrainer), (trl.SFTTrainer, DendriticTrainer)):
        with pytest.raises(TypeError, match=r"(combines DendriticTrainer with|lists DendriticTrainerMixin after) SFTTrainer.*`class Mixed\(DendriticTrainerMixin, "):
            type("Mixed", bases, {})
    with pytest.raises(TypeError, match=r"lists DendriticTrainerMixin after SFTTrainer.*`class Late\(DendriticTrainerMixin, SFTTrainer\)`"):
        type("Late", (trl.SFTTrainer, DendriticTrainerMixin), {})
    # The mixin must come first in an arguments class, or its validation would never run.
    with pytest.raises(TypeError, match=r"List the mixin first: `class WrongOrder\(DendriteScheduleArguments, SFTConfig\)`"):

        @dataclass
        class WrongOrder(trl.SFTConfig, DendriteScheduleArguments):
            pass

    # The schedule's arguments are validated in the merged class too.
    with pytest.raises(ValueError, match="dendrite_lr_schedule"):
        DendriticSFTConfig(output_dir=out, use_cpu=True, bf16=False, dendrite_lr_schedule="cosine")


def test_the_callback_cannot_drive_a_trainer_without_the_mixin(tmp_path):
    plain = Trainer(tiny_bert(), TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]))
    with pytest.raises(TypeError, match="cannot drive Trainer. Use one of those trainers"):
        DendriteScheduleCallback(plain)
    with pytest.raises(TypeError, match="cannot drive NoneType"):
        Trainer(tiny_bert(), make_args(str(tmp_path)), train_dataset=task_data(8, 1), eval_dataset=task_data(8, 2),
                callbacks=[DendriteScheduleCallback])


def test_dendritic_arguments_and_the_trl_configs_share_one_set_of_fields():
    schedule_fields = {f for f in DendriteScheduleArguments.__dataclass_fields__}
    assert "dendrite_patience" in schedule_fields and "max_dendrite_cycles" in schedule_fields
    for cls in (DendriticTrainingArguments, DendriticSFTConfig, DendriticDPOConfig):
        fields = list(cls.__dataclass_fields__)
        assert schedule_fields <= set(fields)
        # The schedule's fields come after the arguments class's own (all have defaults).
        assert fields[-len(schedule_fields):] == list(DendriteScheduleArguments.__dataclass_fields__)
        assert "--dendrite_patience" in transformers.HfArgumentParser(cls).format_help()  # --help renders
    assert {"max_length", "packing"} <= set(DendriticSFTConfig.__dataclass_fields__)
    assert {"beta", "loss_type"} <= set(DendriticDPOConfig.__dataclass_fields__)


# ---------------------------------------------------------------------------------------------- torchrun
@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_two_processes_with_the_sft_trainer_stay_identical(llama_folder, tmp_path, engine):
    """DendriticSFTTrainer under DDP and under FSDP version 2 (the mixin's engines, docs/distributed.md)."""
    from conftest import run_two_processes

    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts", "ddp_sft.py")
    results = run_two_processes(script, tmp_path, llama_folder, "--use_cpu", *(["--fsdp2"] if engine == "fsdp2" else []))
    for res in results:
        assert res["world_size"] == 2 and res["done"]
        assert res["distributed_type"].endswith("MULTI_CPU" if engine == "ddp" else "FSDP")  # FSDP2 really ran
        assert [e["event"] for e in res["events"]] == [1, 2, 4]  # grow, retry, complete
        assert all(e["params_identical"] for e in res["events"]) and res["final_params_identical"]
        if engine == "ddp":
            assert all(e["wrapper"] == "DistributedDataParallel" and e["wraps_model"] and e["new_wrapper"] for e in res["events"])
            assert all(e["prepared_optimizers"] == 1 for e in res["events"])
        else:  # every parameter, the new dendrites included, sharded after every event
            assert all(e["fsdp_module"] and e["all_dtensor"] and e["dendrites_dtensor"] for e in res["events"])
        assert all(e["optimizer_matches"] for e in res["events"])
        assert res["history_identical"] and res["schedule_identical"] and res["dendrite_counts"] == [1]
    assert results[0]["history"] == results[1]["history"]
    assert [(r["step"], r["decision"]) for r in results[0]["history"]] == DECISIONS
