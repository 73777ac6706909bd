"""Adapter-only checkpoints (a frozen base): only what trains is written, the base is referenced and fingerprinted."""

import json
import os

import pytest
import torch
import transformers
from conftest import make_tiny, tiny_inputs
from dendritic_task import all_linear, make_args, state_of, task_data, tiny_bert
from safetensors import safe_open
from test_trainer import _CrashAfterFirstGrowth, _Interrupted, decisions

from hf_dendrites import CheckpointError, DendriteConfig, DendriticModel, DendriticTrainer, get_dendritic_model
from hf_dendrites.constants import (
    ADAPTER_ONLY_FORMAT_VERSION,
    DENDRITE_CONFIG_NAME,
    DENDRITE_SCHEDULE_NAME,
    DENDRITE_TRAINED_BASE_NAME,
)

HEADS = {"bert": "classifier.", "gpt2": None}  # gpt2: everything but the dendrites frozen (tied lm_head)


def frozen_base_model(folder, name="bert", seed=0):
    """A tiny base saved to `folder` and loaded back from it (so its config names the folder), base frozen (but the
    head), dendrites grown with non-zero weights, the head changed as training would."""
    make_tiny(name, seed).save_pretrained(folder)
    model = getattr(transformers, type(make_tiny(name)).__name__).from_pretrained(folder)
    dm = get_dendritic_model(model, DendriteConfig(target_modules="all-linear", dendrite_seed=0, rank=4))
    head = HEADS[name]
    for pname, param in dm.model.named_parameters():
        param.requires_grad_(head is not None and pname.startswith(head))
    dm.add_dendrites(2)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in dm.dendrite_parameters():
            param.copy_(torch.randn(param.shape, generator=g) * 0.3)
        for pname, param in dm.model.named_parameters():
            if param.requires_grad and not any(param is p for p in dm.dendrite_parameters()):
                param.add_(torch.randn(param.shape, generator=g))
    return dm.eval()


def logits(model, name="bert"):
    with torch.no_grad():
        return model(**tiny_inputs(name)).logits


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_adapter_only_save_holds_what_trains_and_reloads_bit_identically(tmp_path, name):
    dm = frozen_base_model(str(tmp_path / "base"), name)
    expected = logits(dm, name)
    folder = tmp_path / "adapter"
    dm.save_pretrained(str(folder), adapter_only=True)

    assert not any(f.startswith("model") for f in os.listdir(folder))  # no base weights
    with pytest.raises(OSError):  # plain transformers finds nothing to load, rather than loading half a model
        getattr(transformers, type(dm.model).__name__).from_pretrained(str(folder))
    card = (folder / "README.md").read_text()
    assert "adapter-only" in card and str(tmp_path / "base") in card and "model.safetensors` (the base" not in card
    meta = json.loads((folder / DENDRITE_CONFIG_NAME).read_text())
    assert meta["format_version"] == ADAPTER_ONLY_FORMAT_VERSION
    base = meta["base_model"]
    assert base["reference"] == {"name_or_path": str(tmp_path / "base"), "revision": None, "dtype": "float32"}
    with safe_open(str(folder / DENDRITE_TRAINED_BASE_NAME), "pt") as handle:
        trained = set(handle.keys())
    frozen = set(base["fingerprint"]["tensors"])
    params = {n for n, _ in dm.model.named_parameters(remove_duplicate=False)}
    dendrite = set(dm.dendrite_state_dict())
    # every frozen parameter is fingerprinted, never stored; what trains is stored
    assert frozen == {n for n, p in dm.model.named_parameters() if not p.requires_grad}
    assert not trained & params - {n for n, p in dm.model.named_parameters() if p.requires_grad}
    if name == "bert":
        assert {"classifier.weight", "classifier.bias"} <= trained
    else:  # the tied output embedding is fingerprinted once, under its first name
        assert base["aliases"] == {"lm_head.weight": "transformer.wte.weight"} and not trained & params
    assert frozen | trained | set(base["aliases"]) | dendrite == set(dm.model.state_dict())

    loaded = DendriticModel.from_pretrained(str(folder))
    assert torch.equal(logits(loaded, name), expected)
    assert loaded.dendrite_counts() == dm.dendrite_counts() and loaded.growth_count == dm.growth_count
    # saved again adapter-only, it references the same base (not the adapter folder it was loaded from)
    loaded.save_pretrained(str(tmp_path / "again"), adapter_only=True)
    again = json.loads((tmp_path / "again" / DENDRITE_CONFIG_NAME).read_text())["base_model"]
    assert again["reference"] == base["reference"] and again["fingerprint"] == base["fingerprint"]

    # in place into a model converted from the same base (what a Trainer resume does)
    fresh = get_dendritic_model(
        getattr(transformers, type(dm.model).__name__).from_pretrained(str(tmp_path / "base")),
        DendriteConfig(target_modules="all-linear", rank=4),
    )
    fresh.load_dendritic_state(str(folder))
    assert torch.equal(logits(fresh.eval(), name), expected)
    # the base passed as a model, used in place
    model = getattr(transformers, type(dm.model).__name__).from_pretrained(str(tmp_path / "base"))
    given = DendriticModel.from_pretrained(str(folder), base_model=model)
    assert given.model is model and torch.equal(logits(given, name), expected)


def test_a_wrong_base_is_refused_with_the_fix(tmp_path):
    dm = frozen_base_model(str(tmp_path / "base"))
    folder = str(tmp_path / "adapter")
    dm.save_pretrained(folder, adapter_only=True)

    make_tiny("bert", seed=3).save_pretrained(str(tmp_path / "other"))
    with pytest.raises(CheckpointError, match=r"fingerprint mismatch.*bert\.embeddings.*base_model="):
        DendriticModel.from_pretrained(folder, base_model=str(tmp_path / "other"))
    with pytest.raises(CheckpointError, match=r"in bfloat16.*dtype=torch\.float32"):
        DendriticModel.from_pretrained(folder, dtype=torch.bfloat16)

    # one frozen weight changed by a hair: refused, and the model passed in is left unconverted
    model = transformers.BertForSequenceClassification.from_pretrained(str(tmp_path / "base"))
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.self.query.weight[0, 0] += 1e-6
    with pytest.raises(CheckpointError, match=r"1 of its \d+ frozen tensors.*attention\.self\.query\.weight"):
        DendriticModel.from_pretrained(folder, base_model=model)
    assert type(model.bert.encoder.layer[0].attention.self.query) is torch.nn.Linear

    # in place: a model on another base is refused before anything is copied
    other = get_dendritic_model(make_tiny("bert", seed=3), DendriteConfig(target_modules="all-linear", rank=4))
    before = state_of(other)
    with pytest.raises(CheckpointError, match="fingerprint mismatch"):
        other.load_dendritic_state(folder)
    assert other.dendrite_counts() == dict.fromkeys(other.dendrite_counts(), 0)
    assert all(torch.equal(v, before[k]) for k, v in state_of(other).items())

    # the base folder is gone
    os.rename(tmp_path / "base", tmp_path / "moved")
    with pytest.raises(CheckpointError, match="does not exist here; pass base_model="):
        DendriticModel.from_pretrained(folder)
    assert torch.equal(logits(DendriticModel.from_pretrained(folder, base_model=str(tmp_path / "moved"))), logits(dm))

    # a damaged trained-base file is detected
    path = os.path.join(folder, DENDRITE_TRAINED_BASE_NAME)
    data = bytearray(open(path, "rb").read())
    data[-1] ^= 1
    open(path, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        DendriticModel.from_pretrained(folder, base_model=str(tmp_path / "moved"))


def test_adapter_only_needs_a_frozen_base_and_a_hub_base_to_push(tmp_path):
    dm = get_dendritic_model(make_tiny("bert"), DendriteConfig(target_modules="all-linear"))
    dm.add_dendrites(1)
    with pytest.raises(ValueError, match="every parameter of the base model trains"):
        dm.save_pretrained(str(tmp_path / "a"), adapter_only=True)
    assert not (tmp_path / "a").exists()
    with pytest.raises(TypeError, match="adapter_only=True saves only"):
        dm.save_pretrained(str(tmp_path / "a"), base_model_name_or_path="x/y")
    frozen = frozen_base_model(str(tmp_path / "base"))
    with pytest.raises(ValueError, match="must reference its base by Hub id.*base_model_name_or_path="):
        frozen.push_to_hub("tester/adapter", adapter_only=True)

    # a full save over an adapter-only one (and back) leaves no file of the other kind
    folder = str(tmp_path / "both")
    frozen.save_pretrained(folder, adapter_only=True)
    frozen.save_pretrained(folder)
    assert DENDRITE_TRAINED_BASE_NAME not in os.listdir(folder) and "model.safetensors" in os.listdir(folder)
    assert torch.equal(logits(DendriticModel.from_pretrained(folder)), logits(frozen))
    frozen.save_pretrained(folder, adapter_only=True)
    assert "model.safetensors" not in os.listdir(folder)
    assert torch.equal(logits(DendriticModel.from_pretrained(folder)), logits(frozen))


def frozen_tiny_bert(seed=0):
    model = tiny_bert(seed)
    for pname, param in model.named_parameters():
        param.requires_grad_(pname.startswith("classifier."))
    return model


def frozen_trainer(output_dir, model=None, callbacks=None, **overrides):
    return DendriticTrainer(
        frozen_tiny_bert() if model is None else model,
        make_args(str(output_dir), learning_rate=1e-2, **overrides),
        train_dataset=task_data(128, 1),
        eval_dataset=task_data(64, 2),
        dendrite_config=all_linear(),
        callbacks=callbacks,
    )


@pytest.mark.parametrize("save_steps", [4, 12])
def test_trainer_checkpoints_of_a_frozen_base_run_are_adapter_only_and_resume_exactly(tmp_path, save_steps):
    """save_steps=4: the best-weight snapshot is an earlier checkpoint's model files (linked); 12: the best came at
    an evaluation that saved nothing, so the checkpoint stores the snapshot's tensors."""
    common = {"save_strategy": "steps", "save_steps": save_steps}
    reference = frozen_trainer(tmp_path / "uninterrupted", **common)
    reference.train()
    assert sum(a in ("grow", "retry") for _, a in decisions(reference)) >= 2

    crash = _CrashAfterFirstGrowth()
    crashing = frozen_trainer(tmp_path / "run", callbacks=[crash], **common)
    crash.trainer = crashing
    with pytest.raises(_Interrupted):
        crashing.train()
    checkpoint = tmp_path / "run" / f"checkpoint-{crash.crashed_at}"
    files = os.listdir(checkpoint)
    assert DENDRITE_TRAINED_BASE_NAME in files and not any(f.startswith("model") for f in files)
    meta = json.loads((checkpoint / DENDRITE_CONFIG_NAME).read_text())
    frozen = set(meta["base_model"]["fingerprint"]["tensors"])
    assert frozen == {n for n, p in frozen_tiny_bert().named_parameters() if not n.startswith("classifier.")}
    # the best-weight snapshots leave the frozen base out too
    snapshots = json.loads((checkpoint / DENDRITE_SCHEDULE_NAME).read_text())["snapshots"]
    stored = [s["stored"] for s in snapshots.values() if s and "stored" in s]
    assert {s["kind"] for s in stored} == ({"model"} if save_steps == 4 else {"tensors"})
    for store in stored:
        if store["kind"] == "model":
            assert not any(f.startswith("model") for f in os.listdir(checkpoint / store["path"]))
            continue
        with safe_open(str(checkpoint / store["path"]), "pt") as handle:
            keys = set(handle.keys())
        assert keys and not keys & {f"model.{n}" for n in frozen}

    resumed = frozen_trainer(tmp_path / "run", **common)
    resumed.train(resume_from_checkpoint=True)
    assert decisions(resumed) == decisions(reference)
    assert [r["score"] for r in resumed.dendrite_history] == [r["score"] for r in reference.dendrite_history]
    expected, got = state_of(reference.model), state_of(resumed.model)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)

    # the final save is full (self-contained); a resume onto another base is refused
    reference.save_model(str(tmp_path / "final"))
    assert "model.safetensors" in os.listdir(tmp_path / "final")
    wrong = frozen_trainer(tmp_path / "run", model=frozen_tiny_bert(seed=5), **common)
    with pytest.raises(CheckpointError, match="fingerprint mismatch"):
        wrong.train(resume_from_checkpoint=str(checkpoint))
