"""Guards for every private transformers / accelerate name listed in hf_dendrites/trainer_internals.py.

Each test checks a signature and the behaviour DendriticTrainer relies on, on a plain `Trainer` (so a failure
points at upstream, not at hf_dendrites), and fails with the supported version range in its message.
"""

import inspect
import os

import accelerate
import pytest
import torch
import transformers
from dendritic_task import task_data, tiny_bert
from transformers import Trainer, TrainingArguments

from hf_dendrites import trainer_internals
from hf_dendrites.trainer_internals import SUPPORTED_RANGE


def _upstream(what: str) -> str:
    return (
        f"{what} (transformers {transformers.__version__}, accelerate {accelerate.__version__}); hf_dendrites relies "
        f"on it and was checked against {SUPPORTED_RANGE}: update hf_dendrites/trainer_internals.py and the trainer."
    )


def _args(output_dir, **overrides):
    kwargs = {
        "output_dir": str(output_dir), "eval_strategy": "steps", "eval_steps": 2, "save_strategy": "steps", "save_steps": 2,
        "max_steps": 6, "per_device_train_batch_size": 16, "learning_rate": 1e-3, "use_cpu": True, "report_to": [],
        "disable_tqdm": True, "seed": 0,
    }
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


class _Recording(Trainer):
    """A plain Trainer recording the order of the calls DendriticTrainer overrides or relies on."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        self.calls.append(("load_from_checkpoint", resume_from_checkpoint, model))
        return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def create_optimizer(self, model=None):
        self.calls.append(("create_optimizer",))
        return super().create_optimizer(model)

    def save_model(self, output_dir=None, _internal_call=False):
        run_dir = os.path.dirname(output_dir)
        self.calls.append(
            ("save_model", output_dir, _internal_call, self.state.global_step,
             os.path.exists(os.path.join(output_dir, "optimizer.pt")), sorted(os.listdir(run_dir)))
        )
        return super().save_model(output_dir, _internal_call)

    def _load_best_model(self):
        self.calls.append(("load_best_model", self.state.best_model_checkpoint))
        return super()._load_best_model()


def test_private_trainer_methods_keep_their_signatures():
    expected = {
        "_load_from_checkpoint": ["self", "resume_from_checkpoint", "model"],
        "_load_best_model": ["self"],
        "_save_checkpoint": ["self", "model", "trial"],
        "save_model": ["self", "output_dir", "_internal_call"],
        "_hp_search_setup": ["self", "trial"],
        "_report_to_hp_search": ["self", "trial", "step", "metrics"],
        "_get_output_dir": ["self", "trial"],
        "create_accelerator_and_postprocess": ["self"],
        "call_model_init": ["self", "trial"],
    }
    assert set(trainer_internals.PRIVATE_TRAINER_METHODS) | set(trainer_internals.CALLED_TRAINER_METHODS) <= set(expected)
    for name, params in expected.items():
        method = getattr(Trainer, name, None)
        assert method is not None, _upstream(f"Trainer.{name} no longer exists")
        assert list(inspect.signature(method).parameters) == params, _upstream(f"Trainer.{name} changed its signature")


def test_resume_loads_the_checkpoint_before_creating_the_optimizer(tmp_path):
    data = {"train_dataset": task_data(64, 1), "eval_dataset": task_data(16, 2)}
    _Recording(tiny_bert(), _args(tmp_path, max_steps=2), **data).train()
    resumed = _Recording(tiny_bert(), _args(tmp_path, max_steps=4), **data)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    names = [c[0] for c in resumed.calls]
    assert "load_from_checkpoint" in names, _upstream("Trainer.train(resume_from_checkpoint=...) no longer calls _load_from_checkpoint")
    load = names.index("load_from_checkpoint")
    assert resumed.calls[load][1:] == (str(tmp_path / "checkpoint-2"), None), _upstream("_load_from_checkpoint is called differently")
    assert load < names.index("create_optimizer"), _upstream("Trainer.train creates the optimizer before _load_from_checkpoint")


def test_checkpoints_save_the_model_first_then_optimizer_then_rotate(tmp_path):
    trainer = _Recording(
        tiny_bert(), _args(tmp_path, save_total_limit=1), train_dataset=task_data(64, 1), eval_dataset=task_data(16, 2)
    )
    trainer.train()
    saves = [c for c in trainer.calls if c[0] == "save_model"]
    assert [c[3] for c in saves] == [2, 4, 6], _upstream("checkpoints are no longer saved through save_model")
    for _, output_dir, internal, step, has_optimizer, existing in saves:
        assert internal and output_dir == os.path.join(str(tmp_path), f"checkpoint-{step}"), _upstream(
            "Trainer._save_checkpoint no longer calls save_model(<run_dir>/checkpoint-<step>, _internal_call=True)"
        )
        assert not has_optimizer, _upstream("Trainer._save_checkpoint writes the optimizer before save_model")
        if step > 2:  # rotation (save_total_limit=1) happens after save_model: the previous checkpoint still exists
            assert f"checkpoint-{step - 2}" in existing, _upstream("Trainer._save_checkpoint rotates before save_model")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-6"]


def test_load_best_model_is_called_at_the_end_with_the_best_checkpoint(tmp_path):
    trainer = _Recording(
        tiny_bert(), _args(tmp_path, load_best_model_at_end=True), train_dataset=task_data(64, 1), eval_dataset=task_data(16, 2)
    )
    trainer.train()
    calls = [c for c in trainer.calls if c[0] == "load_best_model"]
    assert len(calls) == 1 and calls[0][1] == trainer.state.best_model_checkpoint, _upstream(
        "Trainer.train no longer calls _load_best_model() for load_best_model_at_end"
    )
    assert os.path.isdir(calls[0][1])


def test_accelerator_lists_and_prepare_marks():
    acc = accelerate.Accelerator(cpu=True)
    for name in trainer_internals.PRIVATE_ACCELERATOR_LISTS:
        assert isinstance(getattr(acc, name, None), list), _upstream(f"Accelerator.{name} is no longer a list")
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    assert any(o is optimizer for o in acc._optimizers), _upstream("Accelerator._optimizers does not list prepared optimizers")
    assert any(s is scheduler for s in acc._schedulers), _upstream("Accelerator._schedulers does not list prepared schedulers")
    assert any(m is model for m in acc._models), _upstream("Accelerator._models does not list prepared models")
    assert getattr(model, "_is_accelerate_prepared", False), _upstream("prepare() no longer marks _is_accelerate_prepared")

    trainer_internals.forget_prepared(acc, optimizers=[optimizer], schedulers=[scheduler], models=[model])
    assert acc._optimizers == acc._schedulers == acc._models == []
    trainer_internals.unmark_prepared(model)
    for mark in trainer_internals.PRIVATE_MODULE_MARKS:  # everything prepare() left on the module is gone
        assert mark not in model.__dict__, mark


class _RecordingSearch(Trainer):
    """A plain Trainer recording what `hyperparameter_search` calls and sets, in the order DendriticTrainer's search
    (hf_dendrites/hp_search.py) relies on."""

    def __init__(self, *args, **kwargs):
        self.calls = []
        super().__init__(*args, **kwargs)

    def call_model_init(self, trial=None):
        self.calls.append(("call_model_init", trial))
        return super().call_model_init(trial)

    def _hp_search_setup(self, trial):
        self.calls.append(("hp_search_setup", trial))
        super()._hp_search_setup(trial)
        self.calls.append(("after_setup", self._trial, self._train_batch_size, self._get_output_dir(trial)))

    def _report_to_hp_search(self, trial, step, metrics):
        self.calls.append(("report", trial, step, sorted(metrics)))
        super()._report_to_hp_search(trial, step, metrics)
        self.calls.append(("reported", self.objective))


def test_hyperparameter_search_hooks_and_attributes(tmp_path):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trainer = _RecordingSearch(
        model_init=lambda: tiny_bert(), args=_args(tmp_path, max_steps=2, save_strategy="no"),
        train_dataset=task_data(32, 1), eval_dataset=task_data(16, 2),
    )
    trainer.calls.clear()
    hp_name = lambda trial: f"trial-{trial.number}"  # noqa: E731
    trainer.hyperparameter_search(
        hp_space=lambda trial: {"learning_rate": trial.suggest_float("learning_rate", 1e-4, 1e-3)}, n_trials=1,
        backend="optuna", hp_name=hp_name, compute_objective=lambda metrics: metrics["eval_loss"],
    )
    names = [c[0] for c in trainer.calls]
    assert names[:2] == ["call_model_init", "hp_search_setup"], _upstream(
        "Trainer.train no longer calls call_model_init(trial) before _hp_search_setup(trial)"
    )
    trial = trainer.calls[0][1]
    assert isinstance(trial, optuna.trial.Trial) and trainer.calls[1][1] is trial, _upstream("the trial is passed differently")
    _, seen_trial, batch_size, run_dir = trainer.calls[2]
    assert seen_trial is trial, _upstream("Trainer._hp_search_setup no longer sets self._trial")
    assert batch_size == trainer.args.train_batch_size, _upstream("Trainer._train_batch_size is gone")
    assert run_dir == os.path.join(str(tmp_path), "trial-0"), _upstream("Trainer._get_output_dir(trial) no longer uses hp_name")
    report = trainer.calls[names.index("report")]
    assert report[1] is trial and report[2] == 2 and "eval_loss" in report[3], _upstream(
        "Trainer._evaluate no longer calls _report_to_hp_search(trial, step, metrics)"
    )
    assert isinstance(trainer.calls[names.index("reported")][1], float), _upstream("_report_to_hp_search no longer sets objective")
    # The attributes the search sets; hp_search_backend is reset when it ends.
    assert trainer.hp_name is hp_name and callable(trainer.hp_space) and callable(trainer.compute_objective), _upstream(
        "hyperparameter_search no longer sets hp_name / hp_space / compute_objective"
    )
    assert hasattr(trainer, "hp_search_backend") and trainer.hp_search_backend is None, _upstream("hp_search_backend changed")
    for name in trainer_internals.PRIVATE_TRAINER_ATTRIBUTES:
        assert hasattr(trainer, name), _upstream(f"Trainer.{name} is no longer set by a search")


def test_pipeline_model_check_logs_from_check_model_type_with_its_locals():
    """`install_pipeline_type_check` reads the error record of `Pipeline.check_model_type`: logged by the
    `transformers.pipelines.base` logger from inside that function, whose `self` is the pipeline and whose
    `supported_models` is by then the list of supported class names (checked here with a plain, unsupported model)."""
    import logging
    import sys

    from conftest import make_tiny
    from tokenizers import Tokenizer, models
    from transformers.pipelines.base import Pipeline

    params = list(inspect.signature(Pipeline.check_model_type).parameters)
    assert params == ["self", "supported_models"], _upstream(f"Pipeline.check_model_type{params} changed")
    seen = []

    class Probe(logging.Filter):
        def filter(self, record):
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_name != trainer_internals.PIPELINE_CHECK_FUNCTION:
                frame = frame.f_back
            seen.append((record.levelno, record.funcName, frame and frame.f_locals.get("self"),
                         frame and frame.f_locals.get("supported_models")))
            return False

    vocab = {"[PAD]": 0, "[UNK]": 1, "good": 2}
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")), pad_token="[PAD]")
    logger = logging.getLogger(trainer_internals.PIPELINE_LOGGER)
    probe = Probe()
    logger.addFilter(probe)
    try:
        pipe = transformers.pipeline("text-classification", model=make_tiny("vit"), tokenizer=tok, device="cpu")
    finally:
        logger.removeFilter(probe)
    checks = [s for s in seen if s[1] == trainer_internals.PIPELINE_CHECK_FUNCTION]
    assert checks, _upstream(f"Pipeline.check_model_type no longer logs through {trainer_internals.PIPELINE_LOGGER}")
    level, _, owner, supported = checks[0]
    assert level == logging.ERROR and owner is pipe and pipe.task == "text-classification", _upstream("check_model_type's record changed")
    assert isinstance(supported, list) and "BertForSequenceClassification" in supported, _upstream(
        "check_model_type's `supported_models` is no longer the list of class names when it logs"
    )


def test_deepspeed_engine_reference_hooks_and_resume_path():
    # Under DeepSpeed (hf_dendrites/deepspeed_support.py); the behaviour itself is exercised by tests/test_deepspeed.py
    # (two processes), whose runs compare with DDP and count the forward hooks on the model after every new engine.
    deepspeed = pytest.importorskip("deepspeed")
    where = f"deepspeed {deepspeed.__version__}"
    prepare = inspect.getsource(accelerate.Accelerator._prepare_deepspeed)
    assert f"if self.{trainer_internals.DEEPSPEED_ACCELERATOR_ENGINE} is None" in prepare, _upstream(
        f"Accelerator._prepare_deepspeed no longer installs the engine only while {trainer_internals.DEEPSPEED_ACCELERATOR_ENGINE} is None"
    )
    assert f"self.{trainer_internals.DEEPSPEED_ACCELERATOR_ENGINE}.backward" in inspect.getsource(accelerate.Accelerator.backward), _upstream(
        "Accelerator.backward no longer runs the engine it holds"
    )
    init = inspect.getsource(deepspeed.DeepSpeedEngine.__init__)
    for name in trainer_internals.DEEPSPEED_ENGINE_HOOKS:
        assert f"self.{name} = " in init, _upstream(f"DeepSpeedEngine no longer keeps its forward hook as `{name}` ({where})")
    for name in trainer_internals.DEEPSPEED_ENGINE_OPTIMIZERS:
        assert f"self.{name} = " in init, _upstream(f"DeepSpeedEngine no longer sets `{name}` in __init__ ({where})")
    assert callable(getattr(deepspeed.DeepSpeedEngine, "destroy", None)), _upstream(f"DeepSpeedEngine.destroy is gone ({where})")
    # Trainer.train loads a checkpoint into the model itself only without DeepSpeed (the trainer does it then).
    assert "not self.is_deepspeed_enabled" in inspect.getsource(Trainer.train), _upstream(
        "Trainer.train now calls _load_from_checkpoint under DeepSpeed"
    )

    # release_deepspeed_engine on an engine's surface: destroyed, its hooks off the model, the accelerator's reference gone
    model = torch.nn.Linear(2, 2)
    destroyed = []
    engine = type("Engine", (), {"destroy": lambda self: destroyed.append(True)})()
    engine.module_forward_pre_hook = model.register_forward_pre_hook(lambda module, args: None)
    engine.module_forward_post_hook = model.register_forward_hook(lambda module, args, output: None)
    engine.optimizer = engine.basic_optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = type("Acc", (), {})()
    acc.deepspeed_engine_wrapped = object()
    trainer_internals.release_deepspeed_engine(acc, engine)
    assert destroyed and acc.deepspeed_engine_wrapped is None
    assert engine.optimizer is None and engine.basic_optimizer is None
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_trainer_refuses_a_bare_quantized_model_unless_adapters_are_flagged():
    """`DendriticModel` answers `QUANTIZED_ADAPTERS_FLAG` for itself: transformers' Trainer reads it (through
    `validate_quantization_for_training`) to accept a quantized model that has trainable adapters."""
    from transformers.trainer_utils import validate_quantization_for_training

    class Quantizer:
        is_trainable, is_qat_trainable = True, False

    class Bare(torch.nn.Module):
        is_quantized, hf_quantizer = True, Quantizer()

    try:
        validate_quantization_for_training(Bare())
    except ValueError:
        pass
    else:
        raise AssertionError(_upstream("Trainer no longer refuses a bare quantized model"))
    flagged = Bare()
    setattr(flagged, trainer_internals.QUANTIZED_ADAPTERS_FLAG, True)
    validate_quantization_for_training(flagged)  # accepted: adapters are attached


def test_grouped_linear_multiplies_each_expert_group_by_its_weight():
    """hf_dendrites/moe.py computes the experts' base projections with transformers' grouped product."""
    grouped = trainer_internals.grouped_linear()
    params = list(inspect.signature(grouped).parameters)
    assert params[:5] == ["input", "weight", "offs", "bias", "is_transposed"], _upstream(f"_grouped_linear{params}")
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(10, 8, generator=g), torch.randn(3, 12, 8, generator=g), torch.randn(10, 12, generator=g)
    offs = torch.tensor([4, 4, 10], dtype=torch.int32)  # expert 1 gets no row
    want = torch.cat([x[:4] @ w[0].t(), x[4:] @ w[2].t()]) + b
    torch.testing.assert_close(grouped(x, w, offs, bias=b.clone(), is_transposed=False), want, msg=_upstream("_grouped_linear"))
    torch.testing.assert_close(grouped(x, w.transpose(1, 2), offs, is_transposed=True), want - b, msg=_upstream("_grouped_linear"))


# A single-process (world size 1, gloo) job: accelerate switched to FSDP2 (`switch_to_fsdp`) shards with `fully_shard`;
# `fsdp.unshard` (`remove_fsdp2`, `unmark_fsdp_managed`) makes the model plain again, and it can be sharded again.
_FSDP2_PROBE = r"""
import os, sys, torch, torch.distributed as dist
from torch import nn
from accelerate import Accelerator
from accelerate.utils import FullyShardedDataParallelPlugin
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from hf_dendrites import fsdp, trainer_internals

dist.init_process_group("gloo", rank=0, world_size=1)
acc = Accelerator(cpu=True)
trainer_internals.switch_to_fsdp(acc, FullyShardedDataParallelPlugin(fsdp_version=2))
assert fsdp.is_fsdp2(acc), "switch_to_fsdp: accelerate does not report FSDP2"
model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
cls = type(model[0])
for round in range(2):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = acc.prepare(model, opt)
    assert isinstance(model, FSDPModule), "Accelerator.prepare did not shard with fully_shard after switch_to_fsdp"
    assert all(isinstance(p, DTensor) for p in model.parameters())
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    before = {k: fsdp.cpu_copy(v) for k, v in model.state_dict().items()}
    assert fsdp.unshard(model), "unshard saw no FSDP module"
    assert type(model) is nn.Sequential and type(model[0]) is cls, "the FSDP classes were not removed"
    assert not any(isinstance(p, DTensor) for p in model.parameters()), "parameters are still DTensors"
    assert not model._forward_pre_hooks and not model._forward_hooks, "FSDP's forward hooks are still there"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "gathered values differ"
    model.load_state_dict(before)  # FSDP's load hooks removed: a plain load works
    model(torch.randn(3, 4))
    trainer_internals.forget_prepared(acc, optimizers=[opt], models=[model])
dist.destroy_process_group()
print("FSDP2 PROBE OK")
"""


def test_fsdp2_switch_and_unshard_rely_on_accelerate_and_torch_as_they_are(tmp_path):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000),
               CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _FSDP2_PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert "FSDP2 PROBE OK" in proc.stdout, _upstream(
        "accelerate's FSDP2 state switch or torch's fully_shard internals changed (trainer_internals.switch_to_fsdp / "
        f"remove_fsdp2): {proc.stderr[-3000:]}"
    )
