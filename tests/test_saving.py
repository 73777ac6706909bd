"""Dendritic checkpoints on disk: format, bit-identical round trips, model card, safety and bad input."""

import contextlib
import json
import logging
import os
import pickle

import pytest
import torch
import transformers
from conftest import TINY_MODELS, make_tiny, minilm_dir, tiny_inputs
from huggingface_hub import ModelCard
from packaging import version
from safetensors import safe_open

import hf_dendrites.saving as saving
from hf_dendrites import CheckpointError, DendriteConfig, DendriticModel, get_dendritic_model, load_dendritic_state
from hf_dendrites.constants import CHECKPOINT_FORMAT_VERSION, PLAIN_LOAD_NOTICE_KEY
from hf_dendrites.layers import DendriticLayerMixin

# A valid 1x1 PNG (the training curve a DendriticTrainer would have drawn).
PNG_1X1 = bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
)


def dendritic(name="bert", config=None, grow=(2,), seed=0):
    """A tiny model with grown dendrites whose output weights are non-zero (so dendrites change the outputs)."""
    dm = get_dendritic_model(make_tiny(name, seed), config or DendriteConfig(target_modules="all-linear", dendrite_seed=seed))
    for n in grow:
        dm.add_dendrites(n)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, layer in dm.dendritic_layers():
            for p in layer.dendrite_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return dm.eval()


def outputs(model, name="bert"):
    with torch.no_grad():
        out = model(**tiny_inputs(name))
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def training_summary(curve_png=None, dendrites_only_phase=False):
    """A `DendriticModel.training_summary` as DendriticTrainer sets it: one kept, one discarded, one cut-short try."""
    def row(cycle, try_, k, params, score, step, status):
        return {"cycle": cycle, "try": try_, "num_dendrites": k, "params": params, "best_score": score,
                "best_step": step, "status": status}

    return {
        "metric": "eval_accuracy",
        "greater_is_better": True,
        "completed": False,
        "stopped_by_cap": True,
        "cycles": [
            row(0, 0, 0, 20044, 0.71, 20, "kept"),
            row(1, 0, 13, 34848, 0.7525, 40, "kept"),
            row(2, 0, 26, 49652, 0.74, 60, "discarded"),
            row(2, 1, 26, 49652, 0.745, 80, "cut short"),
        ],
        "schedule": {
            "patience": 2, "improvement_threshold": 0.0, "epsilon": 1e-4, "max_cycles": 5, "max_tries": 2,
            "dendrites_only_phase": dendrites_only_phase, "learning_rule": "gd", "dendrites_per_cycle": 1,
            "dendrite_lr_schedule": None,
        },
        "hyperparameters": {
            "learning_rate": 5e-05, "train_batch_size": 8, "eval_batch_size": 16, "seed": 42,
            "optimizer": "adamw_torch", "lr_scheduler_type": "linear", "num_epochs": 10,
        },
        "curve_png": curve_png,
        # the saved model: load_best_model_at_end loaded the checkpoint of cycle 1's best evaluation
        "saved_model": {
            "evaluated": True, "step": 40, "cycle": 1, "try": 0, "status": "kept", "origin": "best checkpoint",
            "checkpoint": "checkpoint-40", "end_step": 90, "last_evaluation_step": 90, "note": None,
            "metrics": {"eval_accuracy": 0.7525, "eval_loss": 0.51},
        },
        "eval_results": {"eval_accuracy": 0.7525, "eval_loss": 0.51},
    }


# ---------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize(
    "name,config",
    [
        ("bert", DendriteConfig(target_modules="all-linear", dendrite_seed=0)),
        ("gpt2", DendriteConfig(rank=2, cascade=True, activation="gelu", dendrite_seed=1)),  # Conv1D, tied embeddings
        ("llama", DendriteConfig(dendrite_seed=2)),
    ],
)
def test_round_trip_is_bit_identical(tmp_path, name, config):
    dm = dendritic(name, config, grow=(1, 2))
    expected = outputs(dm, name)
    counts = dm.dendrite_counts()
    dm.save_pretrained(tmp_path)

    loaded = DendriticModel.from_pretrained(tmp_path)
    assert type(loaded.model) is type(dm.model)
    assert torch.equal(outputs(loaded, name), expected)
    assert loaded.dendrite_counts() == counts and all(k == 3 for k in counts.values())
    assert loaded.dendrite_config == dm.dendrite_config
    assert loaded.growth_count == dm.growth_count == 2
    assert not loaded.training  # like transformers' from_pretrained
    # The user's model is untouched by saving.
    assert torch.equal(outputs(dm, name), expected) and dm.dendrite_counts() == counts


def test_checkpoint_layout(tmp_path):
    dm = dendritic("bert")
    dm.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [
        "README.md",
        "config.json",
        "dendrite_config.json",
        "dendrite_model.safetensors",
        "model.safetensors",
    ]

    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        base_keys = set(f.keys())
    with safe_open(tmp_path / "dendrite_model.safetensors", "pt") as f:
        dendrite_keys = set(f.keys())
    assert not any("dendrite" in k for k in base_keys - {PLAIN_LOAD_NOTICE_KEY})
    assert dendrite_keys == set(dm.dendrite_state_dict())
    # The base weights, and the notice a plain transformers load reports (test_plain_transformers_...).
    assert base_keys == set(dm.model.state_dict()) - dendrite_keys | {PLAIN_LOAD_NOTICE_KEY}

    meta = json.loads((tmp_path / "dendrite_config.json").read_text())
    assert meta["layers"] == dm.dendrite_counts()
    assert meta["library_version"] == "0.1.0" and meta["format_version"] == CHECKPOINT_FORMAT_VERSION == 2
    assert meta["base_model"] == {
        "architecture": "BertForSequenceClassification",
        "model_type": "bert",
        "name_or_path": None,
    }
    assert DendriteConfig.from_pretrained(tmp_path) == dm.dendrite_config


@contextlib.contextmanager
def transformers_records():
    """The records transformers logs at its default verbosity (WARNING; the test session runs at ERROR)."""
    records = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    root = logging.getLogger("transformers")  # transformers' loggers do not propagate to the root logger
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_warning()
    root.addHandler(handler)
    try:
        yield records
    finally:
        root.removeHandler(handler)
        transformers.logging.set_verbosity(verbosity)


@pytest.mark.parametrize(
    "name,auto,shard",
    [
        ("bert", transformers.AutoModelForSequenceClassification, None),
        ("gpt2", transformers.AutoModelForCausalLM, "20KB"),
        ("llama", transformers.AutoModelForCausalLM, None),
        ("vit", transformers.AutoModelForImageClassification, "20KB"),
    ],
)
def test_plain_transformers_loads_the_base_model_and_says_the_dendrites_were_not_loaded(tmp_path, name, auto, shard):
    dm = dendritic(name)
    dm.save_pretrained(tmp_path, max_shard_size=shard)
    with transformers_records() as records:
        base, info = auto.from_pretrained(tmp_path, output_loading_info=True)
    # Every base weight loads: nothing missing or mismatched, and the one unexpected key is the notice ...
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert info["unexpected_keys"] == {PLAIN_LOAD_NOTICE_KEY}
    dendrite_keys = set(dm.dendrite_state_dict())
    expected = {k: v for k, v in dm.model.state_dict().items() if k not in dendrite_keys}
    assert set(base.state_dict()) == set(expected)
    assert all(torch.equal(base.state_dict()[k], v) for k, v in expected.items())
    # ... which transformers' load report shows at its default verbosity, naming the way to load the dendrites.
    notices = [r for r in records if PLAIN_LOAD_NOTICE_KEY in r.getMessage()]
    assert [r.levelno for r in notices] == [logging.WARNING], [r.getMessage() for r in records]
    assert "DendriticModel.from_pretrained" in PLAIN_LOAD_NOTICE_KEY and "DENDRITES_NOT_LOADED" in PLAIN_LOAD_NOTICE_KEY
    assert PLAIN_LOAD_NOTICE_KEY in (tmp_path / "README.md").read_text()  # the model card explains it

    # hf_dendrites' own loaders expect the notice: no report, the dendrites loaded, the outputs the saved model's.
    with transformers_records() as records:
        reloaded = DendriticModel.from_pretrained(tmp_path)
        dm.load_dendritic_state(tmp_path)
    assert not [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    assert torch.equal(outputs(reloaded.eval(), name), outputs(dm, name))


def test_a_load_report_with_other_keys_is_still_shown(tmp_path):
    """DendriticModel.from_pretrained hides only a report that lists nothing but the notice."""
    dm = dendritic("bert")
    dm.save_pretrained(tmp_path)
    with transformers_records() as records, pytest.raises(CheckpointError, match="classifier"):
        DendriticModel.from_pretrained(tmp_path, model_class=transformers.BertModel)
    assert any("classifier.weight" in r.getMessage() and r.levelno == logging.WARNING for r in records)


def test_sharded_checkpoint(tmp_path):
    dm = dendritic("gpt2")
    expected = outputs(dm, "gpt2")
    dm.save_pretrained(tmp_path, max_shard_size="20KB")
    assert not (tmp_path / "model.safetensors").exists()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((tmp_path / s).exists() for s in shards)
    assert index["metadata"]["total_parameters"] == dm.dendrite_summary().base_params
    assert torch.equal(outputs(DendriticModel.from_pretrained(tmp_path), "gpt2"), expected)

    # Saving again unsharded into the same folder removes the shards (transformers would prefer the stale file).
    dm.save_pretrained(tmp_path)
    assert not (tmp_path / "model.safetensors.index.json").exists() and not any((tmp_path / s).exists() for s in shards)
    assert torch.equal(outputs(DendriticModel.from_pretrained(tmp_path), "gpt2"), expected)


@pytest.mark.parametrize(
    "name", ["bert", "gpt2", "llama"]
)  # gpt2: tied embeddings; llama: keys that start with "model."
def test_state_dict_argument_as_the_trainer_passes_it(tmp_path, name):
    dm = dendritic(name)
    dm.save_pretrained(tmp_path / "a")
    dm.save_pretrained(tmp_path / "b", state_dict=dm.state_dict(), safe_serialization=True)  # keys prefixed "model."
    dm.save_pretrained(tmp_path / "c", state_dict=dm.model.state_dict())
    for sub in ("b", "c"):
        for file in ("model.safetensors", "dendrite_model.safetensors"):
            with safe_open(tmp_path / sub / file, "pt") as got, safe_open(tmp_path / "a" / file, "pt") as want:
                assert set(got.keys()) == set(want.keys())
                assert all(torch.equal(got.get_tensor(k), want.get_tensor(k)) for k in want.keys())
    with pytest.raises(ValueError, match="lacks dendrite parameters"):
        dm.save_pretrained(
            tmp_path / "d", state_dict={k: v for k, v in dm.model.state_dict().items() if "dendrite" not in k}
        )
    with pytest.raises(ValueError, match="safetensors only"):
        dm.save_pretrained(tmp_path / "e", safe_serialization=False)


def test_dtype_and_device_map_pass_through(tmp_path):
    dm = dendritic("llama", DendriteConfig(dendrite_seed=0))
    dm.save_pretrained(tmp_path)
    loaded = DendriticModel.from_pretrained(tmp_path, dtype=torch.bfloat16, device_map="cpu")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert all(p.dtype == torch.bfloat16 for p in loaded.dendrite_parameters())
    # Every parameter is the saved one cast to bf16 (buffers such as rotary frequencies stay as transformers makes them).
    saved = dict(dm.model.named_parameters())
    assert all(torch.equal(p, saved[k].to(torch.bfloat16)) for k, p in loaded.model.named_parameters())
    torch.testing.assert_close(outputs(loaded, "llama").float(), outputs(dm, "llama"), atol=0.05, rtol=0.05)


def test_model_class_argument(tmp_path):
    dm = dendritic("bert")
    dm.save_pretrained(tmp_path)
    loaded = DendriticModel.from_pretrained(tmp_path, model_class=transformers.AutoModelForSequenceClassification)
    assert torch.equal(outputs(loaded), outputs(dm))


def test_processing_class_is_saved(tmp_path):
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir())
    dendritic("bert").save_pretrained(tmp_path, processing_class=tokenizer)
    assert (tmp_path / "tokenizer.json").exists() and (tmp_path / "tokenizer_config.json").exists()
    assert transformers.AutoTokenizer.from_pretrained(tmp_path)("a test").input_ids == tokenizer("a test").input_ids


# ---------------------------------------------------------------------------------------------- model card
def test_model_card_with_training_summary(tmp_path):
    curve = tmp_path / "curve.png"
    curve.write_bytes(PNG_1X1)
    dm = dendritic("bert")
    dm.model.config._name_or_path = "sentence-transformers/all-MiniLM-L6-v2"  # as if loaded from the Hub
    dm.training_summary = training_summary(str(curve))
    dm.save_pretrained(tmp_path / "ckpt", tags=["rotten-tomatoes"])

    text = (tmp_path / "ckpt" / "README.md").read_text()
    assert (tmp_path / "ckpt" / "training_curve.png").read_bytes() == PNG_1X1
    assert "![Training curve](training_curve.png)" in text
    summary = dm.dendrite_summary()
    assert f"| dendrites | {summary.dendrite_params:,} " in text and f"| base model | {summary.base_params:,} |" in text
    assert "DendriticModel.from_pretrained(" in text and "`activation` | `tanh`" in text

    card = ModelCard.load(tmp_path / "ckpt" / "README.md")
    assert card.data.library_name == "hf_dendrites"
    assert card.data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert "(https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2)" in text
    meta = json.loads((tmp_path / "ckpt" / "dendrite_config.json").read_text())
    assert meta["base_model"]["name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert {"hf_dendrites", "dendrites", "bert", "rotten-tomatoes"} <= set(card.data.tags)
    assert card.data.pipeline_tag == "text-classification"
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results == {"accuracy": 0.7525, "loss": 0.51}

    # The summary travels with the checkpoint, its curve pointing into the folder.
    loaded = DendriticModel.from_pretrained(tmp_path / "ckpt")
    assert loaded.training_summary["cycles"] == dm.training_summary["cycles"]
    assert loaded.training_summary["curve_png"] == str(tmp_path / "ckpt" / "training_curve.png")

    # Saved again without a training curve: the old curve goes, and the card no longer shows one. The base model's
    # Hub id, recorded in the checkpoint, survives the trip through a local folder.
    loaded.training_summary = None
    loaded.save_pretrained(tmp_path / "ckpt")
    assert ModelCard.load(tmp_path / "ckpt" / "README.md").data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert not (tmp_path / "ckpt" / "training_curve.png").exists()
    assert "Training curve" not in (tmp_path / "ckpt" / "README.md").read_text()
    assert "training_summary" not in json.loads((tmp_path / "ckpt" / "dendrite_config.json").read_text())


def test_resaving_a_loaded_model_keeps_its_curve(tmp_path):
    curve = tmp_path / "curve.png"
    curve.write_bytes(PNG_1X1)
    dm = dendritic("bert")
    dm.training_summary = training_summary(str(curve))
    dm.save_pretrained(tmp_path / "ckpt")
    loaded = DendriticModel.from_pretrained(tmp_path / "ckpt")  # its curve_png points into the folder itself
    loaded.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "training_curve.png").read_bytes() == PNG_1X1
    assert "![Training curve](training_curve.png)" in (tmp_path / "ckpt" / "README.md").read_text()


def _card_rows(text):
    """The per-cycle table of a card: {(cycle, try): [status, dendrites, parameters, best score, best step]}."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[0].isdigit() and cells[1].isdigit():
            rows[(int(cells[0]), int(cells[1]))] = cells[2:]
    return rows


def test_model_card_tells_the_truth_about_the_run(tmp_path):
    dm = dendritic("bert", grow=(1,))  # the saved model: the kept cycles' dendrites only
    dm.model.config._name_or_path = "sentence-transformers/all-MiniLM-L6-v2"
    dm.training_summary = training_summary()
    dm.save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    text = card.text

    assert _card_rows(text) == {
        (0, 0): ["kept", "0", "20,044", "0.7100", "20"],
        (1, 0): ["kept", "13", "34,848", "0.7525", "40"],
        (2, 0): ["discarded", "26", "49,652", "0.7400", "60"],
        (2, 1): ["cut short", "26", "49,652", "0.7450", "80"],
    }
    summary = dm.dendrite_summary()
    flat = " ".join(text.split())
    # Which model was saved and why (issue 22), not a claim that it is the best one or that cut-short tries are not in it
    assert (
        "**Saved model.** The saved model is the best checkpoint, `checkpoint-40`, that `load_best_model_at_end` loaded "
        "when training ended at step 90: the weights evaluated at step 40 (cycle 1, try 0, kept). "
        f"It holds {summary.num_dendrites} dendrites" in flat
    )
    assert "best one found" not in flat and "are not in the saved model" not in flat
    assert "Of the saved model: its evaluation at step 40 (during training" in flat
    assert f"{summary.num_dendrites} dendrites in\n{len(summary.layers)} layers" in text
    assert "before the schedule completed" in text
    # dendrites_only_phase=False: no claim of alternating phases
    assert "alternates" not in text and "no dendrite-only phase" in text
    assert "- learning_rate: 5e-05" in text and "- lr_scheduler_type: linear" in text
    assert "| `dendrites_only_phase` | `False` |" in text and "| `patience` | `2` |" in text
    assert card.data.base_model == "sentence-transformers/all-MiniLM-L6-v2"

    dm.training_summary = dict(training_summary(dendrites_only_phase=True), completed=True, stopped_by_cap=False)
    dm.save_pretrained(tmp_path)
    text = ModelCard.load(tmp_path / "README.md").text
    assert "alternates neuron phases with dendrite phases" in text
    assert "The schedule completed" in text and "before the schedule completed" not in text


def test_model_card_reads_older_training_summaries(tmp_path):
    """Summaries written before per-try statuses: kept cycles under "cycles", every try under "tries"."""
    dm = dendritic("bert")
    dm.training_summary = {
        "metric": "eval_loss",
        "greater_is_better": False,
        "cycles": [{"cycle": 0, "try": 0, "num_dendrites": 0, "params": 100, "best_score": 0.5, "status": "accepted"}],
        "tries": [
            {"cycle": 0, "try": 0, "num_dendrites": 0, "params": 100, "best_score": 0.5, "best_step": 4, "status": "accepted"},
            {"cycle": 1, "try": 0, "num_dendrites": 13, "params": 200, "best_score": 0.6, "best_step": 8, "status": "discarded"},
            {"cycle": 1, "try": 1, "num_dendrites": 13, "params": 200, "best_score": None, "best_step": None, "status": "stopped"},
        ],
        "completed": False,
    }
    dm.save_pretrained(tmp_path)
    text = ModelCard.load(tmp_path / "README.md").text
    assert _card_rows(text) == {
        (0, 0): ["kept", "0", "100", "0.5000", "4"],
        (1, 0): ["discarded", "13", "200", "0.6000", "8"],
        (1, 1): ["cut short", "13", "200", "", ""],
    }
    assert "alternates" not in text
    # no record of where the saved model came from: the card claims nothing about it beyond its dendrites
    assert f"The saved model holds {dm.dendrite_summary().num_dendrites} dendrites" in text and "**Saved model.**" not in text


def test_model_card_without_training_summary(tmp_path):
    dendritic("gpt2", DendriteConfig(dendrite_seed=0)).save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "hf_dendrites" and card.data.pipeline_tag == "text-generation"
    assert card.data.eval_results is None and "## Training" not in card.text
    assert "GPT2LMHeadModel" in card.text


def test_real_minilm_round_trip(tmp_path):
    base = transformers.AutoModel.from_pretrained(minilm_dir()).eval()
    dm = get_dendritic_model(base, DendriteConfig(target_modules=["intermediate.dense", "output.dense"], dendrite_seed=0))
    dm.add_dendrites(1)
    with torch.no_grad():
        for _, layer in dm.dendritic_layers():
            layer.dendrite_out.normal_(0, 0.1)
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir())
    batch = tokenizer(["dendrites for transformers", "a second sentence"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = dm(**batch).last_hidden_state
    dm.save_pretrained(tmp_path, processing_class=tokenizer)

    loaded = DendriticModel.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).last_hidden_state, expected)
    # A local path is not recorded as the base model (it means nothing elsewhere).
    assert json.loads((tmp_path / "dendrite_config.json").read_text())["base_model"]["name_or_path"] is None
    assert ModelCard.load(tmp_path / "README.md").data.base_model is None
    assert loaded.dendrite_summary().dendrite_params == dm.dendrite_summary().dendrite_params > 0
    # The pretrained weights are stored unchanged under their standard names.
    with (
        safe_open(os.path.join(minilm_dir(), "model.safetensors"), "pt") as original,
        safe_open(tmp_path / "model.safetensors", "pt") as saved,
    ):
        for key in ("encoder.layer.0.intermediate.dense.weight", "embeddings.word_embeddings.weight"):
            assert torch.equal(original.get_tensor(key), saved.get_tensor(key))


# ---------------------------------------------------------------------------------------------- deployment
def test_loaded_model_exports_with_torch_export(tmp_path):
    dm = dendritic("bert")
    dm.save_pretrained(tmp_path)
    loaded = DendriticModel.from_pretrained(tmp_path)
    inputs = tiny_inputs("bert")
    inputs.update(
        attention_mask=torch.ones_like(inputs["input_ids"]), token_type_ids=torch.zeros_like(inputs["input_ids"])
    )
    program = torch.export.export(loaded, args=(), kwargs=inputs)
    with torch.no_grad():
        exported = program.module()(**inputs).logits
        eager = loaded(**inputs).logits
    # The exported graph holds the reference formulation of the dendrites; eager mode may use the fused kernels,
    # which compute the same function with another rounding order.
    torch.testing.assert_close(exported, eager)
    torch.testing.assert_close(exported, outputs(dm))
    assert not torch.equal(exported, outputs(make_tiny("bert")))  # the dendrites are in the exported graph


# ---------------------------------------------------------------------------------------------- in-place loading
def test_load_dendritic_state_resizes_and_loads_in_place(tmp_path):
    saved = dendritic("gpt2", DendriteConfig(rank=2, dendrite_seed=0), grow=(1, 1))
    saved.training_summary = training_summary()
    saved.save_pretrained(tmp_path)

    fresh = dendritic("gpt2", DendriteConfig(rank=2, dendrite_seed=5), grow=(3,), seed=5)  # other weights, more dendrites
    load_dendritic_state(fresh, tmp_path)
    assert fresh.dendrite_counts() == saved.dendrite_counts()
    assert torch.equal(outputs(fresh, "gpt2"), outputs(saved, "gpt2"))
    assert fresh.growth_count == 2 and fresh.training_summary["metric"] == "eval_accuracy"
    # tied output embedding follows the loaded input embedding
    assert fresh.model.lm_head.weight is fresh.model.transformer.wte.weight


def _tiny_gpt_neox(seed):
    torch.manual_seed(seed)
    config = transformers.GPTNeoXConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40
    )
    return transformers.GPTNeoXForCausalLM(config).eval()


@pytest.mark.parametrize("name", [*TINY_MODELS, "gpt_neox"])
def test_load_dendritic_state_round_trip(tmp_path, name):
    """Every tiny architecture, including those transformers saves under other names than it has in memory (ViT's
    original `vit.encoder.layer.*.attention.attention.query` for `vit.layers.*.attention.q_proj`, GPT-NeoX's
    `embed_out` for `lm_head`): the in-place loader maps the files' keys as transformers' own loading does."""
    build = _tiny_gpt_neox if name == "gpt_neox" else lambda seed: make_tiny(name, seed)
    config = DendriteConfig(target_modules="all-linear", dendrite_seed=0)
    saved = get_dendritic_model(build(0), config)
    saved.add_dendrites(1)
    saved.add_dendrites(1)
    with torch.no_grad():
        for p in saved.dendrite_parameters():
            p.normal_(0, 0.3)
    saved.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as handle:
        renamed = set(handle.keys()) - {PLAIN_LOAD_NOTICE_KEY} - set(saved.model.state_dict())
    # What the loader must map: transformers 5.25 saves ViT and GPT-NeoX under other names (transformers
    # 5.4, the lowest supported release, does not); no other architecture here is renamed.
    if name not in ("vit", "gpt_neox"):
        assert not renamed, sorted(renamed)[:3]
    elif version.parse(transformers.__version__) >= version.parse("5.25"):
        assert renamed

    fresh = get_dendritic_model(build(1), DendriteConfig(target_modules="all-linear", dendrite_seed=1))
    fresh.add_dendrites(3)  # other weights, other counts
    before = outputs(fresh, name)
    rng = torch.random.get_rng_state()
    with transformers_records() as records:
        fresh.load_dendritic_state(tmp_path)
    assert not [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert fresh.dendrite_counts() == saved.dendrite_counts() and fresh.growth_count == 2
    expected = saved.model.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in fresh.model.state_dict().items())
    after = outputs(fresh.eval(), name)
    assert torch.equal(after, outputs(saved.eval(), name)) and not torch.equal(after, before)


def test_load_dendritic_state_keeps_the_files_values_whatever_the_config_says(tmp_path):
    """The base weights are read in the model's own dtype, not the one its config names (a model loaded in bfloat16,
    then trained in float32, keeps `config.dtype` bfloat16), and with an attention kernel the CPU read can build
    (a model trained with flash attention reloads in place)."""
    saved = dendritic("bert")
    saved.save_pretrained(tmp_path)
    fresh = dendritic("bert", seed=1)
    fresh.model.config.dtype = torch.bfloat16
    fresh.model.config._attn_implementation = "flash_attention_2"  # not installed here: a copy with it cannot be built
    fresh.load_dendritic_state(tmp_path)
    expected = saved.model.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in fresh.model.state_dict().items())
    assert fresh.model.config._attn_implementation == "flash_attention_2"  # the model's own config is not changed


def test_load_dendritic_state_needs_a_transformers_model(tmp_path):
    """A plain torch module with the same names cannot be rebuilt by transformers (nor saved): a clear error."""
    dendritic("bert").save_pretrained(tmp_path)
    bert = make_tiny("bert")

    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert, self.dropout, self.classifier = bert.bert, bert.dropout, bert.classifier

    plain = get_dendritic_model(Plain(), DendriteConfig(target_modules="all-linear", dendrite_seed=0))
    with pytest.raises(TypeError, match="needs a DendriticModel of a transformers PreTrainedModel, got Plain"):
        plain.load_dendritic_state(tmp_path)
    assert set(plain.dendrite_counts().values()) == {0}


def test_load_dendritic_state_checks_before_modifying(tmp_path):
    dendritic("gpt2", DendriteConfig(rank=2, dendrite_seed=0)).save_pretrained(tmp_path)
    other = dendritic("gpt2", DendriteConfig(rank=3, dendrite_seed=0), grow=(1,))
    before = outputs(other, "gpt2")
    with pytest.raises(CheckpointError, match="rank=2"):
        load_dendritic_state(other, tmp_path)

    wider = get_dendritic_model(
        transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=99, n_embd=48, n_layer=2, n_head=2)),
        DendriteConfig(rank=2),
    )
    with pytest.raises(CheckpointError, match="does not match"):
        load_dendritic_state(wider, tmp_path)
    assert wider.dendrite_counts() == {k: 0 for k in wider.dendrite_counts()}
    assert torch.equal(outputs(other, "gpt2"), before)


# ---------------------------------------------------------------------------------------------- bad input
@pytest.fixture
def checkpoint(tmp_path):
    dm = dendritic("bert")
    path = tmp_path / "ckpt"
    dm.save_pretrained(path)
    return path


def _edit_meta(path, fn):
    meta = json.loads((path / "dendrite_config.json").read_text())
    fn(meta)
    (path / "dendrite_config.json").write_text(json.dumps(meta))


def test_missing_dendrite_file(checkpoint):
    os.remove(checkpoint / "dendrite_model.safetensors")
    with pytest.raises(CheckpointError, match=r"dendrite_model\.safetensors is missing"):
        DendriticModel.from_pretrained(checkpoint)


def test_truncated_dendrite_file(checkpoint):
    data = (checkpoint / "dendrite_model.safetensors").read_bytes()
    (checkpoint / "dendrite_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"dendrite_model\.safetensors is \d+ bytes .* truncated"):
        DendriticModel.from_pretrained(checkpoint)


def test_corrupt_dendrite_file(checkpoint):
    data = bytearray((checkpoint / "dendrite_model.safetensors").read_bytes())
    data[-10] ^= 0xFF  # a flipped bit in the tensor data: same size, still parses
    (checkpoint / "dendrite_model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"dendrite_model\.safetensors is corrupt"):
        DendriticModel.from_pretrained(checkpoint)


def test_corrupt_dendrite_header_without_checksum(checkpoint):
    data = bytearray((checkpoint / "dendrite_model.safetensors").read_bytes())
    data[8:20] = b"not json!!!!"
    (checkpoint / "dendrite_model.safetensors").write_bytes(bytes(data))
    _edit_meta(checkpoint, lambda m: m["files"]["dendrite_model.safetensors"].pop("sha256"))
    with pytest.raises(CheckpointError, match=r"dendrite_model\.safetensors is not a readable safetensors file"):
        DendriticModel.from_pretrained(checkpoint)


def test_counts_that_do_not_match_the_shapes(checkpoint):
    layer = "bert.encoder.layer.1.intermediate.dense"
    _edit_meta(checkpoint, lambda m: m["layers"].__setitem__(layer, 3))
    with pytest.raises(CheckpointError, match=rf"dendrite_model\.safetensors.*{layer}.*3 dendrites"):
        DendriticModel.from_pretrained(checkpoint)
    _edit_meta(checkpoint, lambda m: m["layers"].__setitem__(layer, 1))
    with pytest.raises(CheckpointError, match=rf"{layer}.*1 dendrites"):
        DendriticModel.from_pretrained(checkpoint)


def test_config_from_an_incompatible_library_version(checkpoint):
    _edit_meta(checkpoint, lambda m: m.update(format_version=99, library_version="9.0.0"))
    with pytest.raises(CheckpointError, match=r"dendrite_config\.json uses checkpoint format 99 .*upgrade"):
        DendriticModel.from_pretrained(checkpoint)
    _edit_meta(checkpoint, lambda m: m.update(format_version=1) or m["dendrite_config"].update(new_option=True))
    with pytest.raises(CheckpointError, match="newer hf_dendrites"):
        DendriticModel.from_pretrained(checkpoint)


def test_corrupt_dendrite_config(checkpoint):
    text = (checkpoint / "dendrite_config.json").read_text()
    (checkpoint / "dendrite_config.json").write_text(text[: len(text) // 2])
    with pytest.raises(CheckpointError, match=r"dendrite_config\.json is not valid JSON"):
        DendriticModel.from_pretrained(checkpoint)


def test_base_checkpoint_that_does_not_match(checkpoint, tmp_path):
    # Another model's base files copied over this checkpoint's: the recorded sizes catch it.
    other = transformers.BertForSequenceClassification(
        transformers.BertConfig(
            vocab_size=99, hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37
        )
    )
    other.save_pretrained(tmp_path / "other")
    for name in ("config.json", "model.safetensors"):
        (checkpoint / name).write_bytes((tmp_path / "other" / name).read_bytes())
    with pytest.raises(CheckpointError, match=r"model\.safetensors is \d+ bytes .* does not belong to this checkpoint"):
        DendriticModel.from_pretrained(checkpoint)
    # Even with a consistent manifest, the dendrite shapes do not fit the other base: the error names the layer.
    _edit_meta(
        checkpoint,
        lambda m: m["files"]["model.safetensors"].update(size=os.path.getsize(checkpoint / "model.safetensors")),
    )
    with pytest.raises(
        CheckpointError,
        match=r"dendrite_model\.safetensors: bert\.encoder\.layer\.0\.\S+ has shape \(64,\), but layer .* needs \(96,\)",
    ):
        DendriticModel.from_pretrained(checkpoint)


def test_base_architecture_that_does_not_match(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    config["architectures"] = ["BertForMaskedLM"]
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError, match=r"config\.json describes a BertForMaskedLM.*BertForSequenceClassification"
    ):
        DendriticModel.from_pretrained(checkpoint)
    # Forcing another class: transformers reports the keys that do not fit, and so do we.
    with pytest.raises(CheckpointError, match="do not match BertForMaskedLM"):
        DendriticModel.from_pretrained(checkpoint, model_class=transformers.BertForMaskedLM)


def test_plain_transformers_folder_is_not_a_dendritic_checkpoint(tmp_path):
    make_tiny("bert").save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="not a complete hf_dendrites checkpoint"):
        DendriticModel.from_pretrained(tmp_path)
    DendriteConfig(target_modules=["query"]).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="holds a DendriteConfig only"):
        DendriticModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("stage", ["dendrites", "model_card"])
def test_interrupted_save_never_loads(tmp_path, monkeypatch, stage):
    dm = dendritic("bert")
    dm.save_pretrained(tmp_path)  # a complete checkpoint, then an interrupted save over it
    DendriticModel.from_pretrained(tmp_path)

    class Crash(Exception):
        pass

    if stage == "dendrites":

        def crash(tensors, path, metadata=None):
            with open(path, "wb") as handle:
                handle.write(b"\0" * 100)  # half a file
            raise Crash

        monkeypatch.setattr(saving, "save_file", crash)
    else:
        import hf_dendrites.hub as hub

        monkeypatch.setattr(hub, "build_model_card", lambda *a, **k: (_ for _ in ()).throw(Crash()))
    with pytest.raises(Crash):
        dm.save_pretrained(tmp_path)
    assert not (tmp_path / "dendrite_config.json").exists()
    with pytest.raises(CheckpointError, match="not a complete hf_dendrites checkpoint"):
        DendriticModel.from_pretrained(tmp_path)
    monkeypatch.undo()
    dm.save_pretrained(tmp_path)  # a new save repairs the folder
    assert torch.equal(outputs(DendriticModel.from_pretrained(tmp_path)), outputs(dm))


class _Exploit:
    """Unpickling this object writes a file: proof that a pickle was loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_loading_never_unpickles(checkpoint, tmp_path, monkeypatch):
    marker = tmp_path / "unpickled"
    for name in ("pytorch_model.bin", "training_args.bin", "dendrite_model.pt", "optimizer.pt"):
        with open(checkpoint / name, "wb") as handle:
            pickle.dump(_Exploit(str(marker)), handle)

    def refuse(*args, **kwargs):
        raise AssertionError("a pickle was loaded")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    DendriticModel.from_pretrained(checkpoint)
    load_dendritic_state(dendritic("bert", grow=()), checkpoint)

    # Base weights available only as a pickle: refused, not read.
    os.remove(checkpoint / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors is missing"):
        DendriticModel.from_pretrained(checkpoint)
    _edit_meta(checkpoint, lambda m: m["files"].pop("model.safetensors"))
    with pytest.raises(OSError, match=r"model\.safetensors"):
        DendriticModel.from_pretrained(checkpoint)
    with pytest.raises(ValueError, match="safetensors only"):
        DendriticModel.from_pretrained(checkpoint, use_safetensors=False)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- other entry points
def test_get_dendritic_model_restores_a_checkpoint_loaded_with_transformers(tmp_path, caplog):
    """What an unmodified fine-tuning script does with `--model_name_or_path <dendritic checkpoint>`."""
    dm = dendritic("bert", grow=(1, 1))
    dm.save_pretrained(tmp_path)
    auto = transformers.AutoModelForSequenceClassification

    with caplog.at_level("INFO", logger="hf_dendrites"):
        restored = get_dendritic_model(auto.from_pretrained(tmp_path).eval())
    assert restored.dendrite_counts() == dm.dendrite_counts() and all(k == 2 for k in dm.dendrite_counts().values())
    assert restored.dendrite_config == dm.dendrite_config and restored.growth_count == 2
    assert torch.equal(outputs(restored), outputs(dm))
    assert any("is a dendritic checkpoint: restored its" in r.getMessage() for r in caplog.records)

    # An explicit config that selects the same layers with the same dendrites: restored, its growth settings used.
    same = DendriteConfig(target_modules="all-linear", dendrites_per_cycle=2, dendrite_seed=0)
    restored = get_dendritic_model(auto.from_pretrained(tmp_path).eval(), same)
    assert torch.equal(outputs(restored), outputs(dm)) and restored.dendrite_config.dendrites_per_cycle == 2

    # A config that leaves the layer selection and dendrite kind at their defaults (what a script that always
    # parses a DendriteConfig from its command line passes when no dendrite flag is set) takes the checkpoint's.
    parsed = DendriteConfig(dendrites_per_cycle=3)
    restored = get_dendritic_model(auto.from_pretrained(tmp_path).eval(), parsed)
    assert torch.equal(outputs(restored), outputs(dm)) and restored.dendrite_counts() == dm.dendrite_counts()
    assert restored.dendrite_config.target_modules == "all-linear" and restored.dendrite_config.dendrites_per_cycle == 3
    assert parsed.target_modules is None  # the caller's object is left alone

    # A conflicting config is an error that says how to proceed; the model is left unconverted.
    plain = auto.from_pretrained(tmp_path).eval()
    with pytest.raises(ValueError, match=r"activation='tanh'.*activation='relu'.*restore_dendrites=False"):
        get_dendritic_model(plain, DendriteConfig(target_modules="all-linear", activation="relu"))
    with pytest.raises(ValueError, match=r"other layers.*DendriteConfig.from_pretrained"):
        get_dendritic_model(plain, DendriteConfig(target_modules=["query"]))
    assert not any(isinstance(m, DendriticLayerMixin) for m in plain.modules())
    fresh = get_dendritic_model(plain, DendriteConfig(target_modules=["query"]), restore_dendrites=False)
    assert set(fresh.dendrite_counts().values()) == {0}

    # Loaded as another class (the bare encoder): its layer names differ, and the error says what to load it with.
    with pytest.raises(CheckpointError, match=r"saved on a BertForSequenceClassification.*loaded as a BertModel"):
        get_dendritic_model(transformers.AutoModel.from_pretrained(tmp_path))


def test_get_dendritic_model_refuses_a_damaged_checkpoint(checkpoint):
    model = transformers.AutoModelForSequenceClassification.from_pretrained(checkpoint)
    os.remove(checkpoint / "dendrite_model.safetensors")
    with pytest.raises(CheckpointError, match=r"dendrite_model\.safetensors is missing"):
        get_dendritic_model(model)
    assert not any(isinstance(m, DendriticLayerMixin) for m in model.modules())  # left as it was


def test_get_dendritic_model_ignores_plain_and_config_only_folders(tmp_path):
    make_tiny("bert").save_pretrained(tmp_path)
    DendriteConfig(target_modules=["query"]).save_pretrained(tmp_path)  # a config alone: nothing to restore
    dm = get_dendritic_model(transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path))
    assert set(dm.dendrite_counts().values()) == {0} and dm.dendrite_config == DendriteConfig()


def test_loading_never_draws_random_dendrite_weights(tmp_path, monkeypatch):
    """from_pretrained / load_dendritic_state create the dendrites they load uninitialised, not randomly."""
    dm = dendritic("gpt2", DendriteConfig(rank=2), grow=(2,))
    dm.save_pretrained(tmp_path)
    draws = []
    real_random = DendriticLayerMixin._random

    def recording(self, shape, std, generator, initialize=True):
        draws.append(initialize)
        return real_random(self, shape, std, generator, initialize)

    monkeypatch.setattr(DendriticLayerMixin, "_random", recording)
    loaded = DendriticModel.from_pretrained(tmp_path)
    assert draws and not any(draws)
    assert torch.equal(outputs(loaded, "gpt2"), outputs(dm, "gpt2"))

    target = get_dendritic_model(make_tiny("gpt2"), DendriteConfig(rank=2))
    draws.clear()
    rng = torch.random.get_rng_state()
    load_dendritic_state(target, tmp_path)
    assert draws and not any(draws) and torch.equal(torch.random.get_rng_state(), rng)
    assert torch.equal(outputs(target, "gpt2"), outputs(dm, "gpt2"))


# ---------------------------------------------------------------------------------------------- custom (auto_map) classes
def test_shipped_custom_head_loads_without_model_class_and_never_runs_folder_code(tmp_path):
    """The mean-pooled head (registered for AutoModelForSequenceClassification) reloads by itself, built from the
    installed package: the copy of its code in the folder is never run without trust_remote_code."""
    from hf_dendrites.modeling_mean_pooled import BertForMeanPooledClassification

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)
    dm = get_dendritic_model(BertForMeanPooledClassification(config).eval(), DendriteConfig(target_modules="all-linear", dendrite_seed=0))
    dm.add_dendrites(1)
    with torch.no_grad():
        for p in dm.dendrite_parameters():
            p.normal_(0, 0.3)
    dm.save_pretrained(tmp_path)
    assert (tmp_path / "modeling_mean_pooled.py").is_file()
    (tmp_path / "modeling_mean_pooled.py").write_text("raise RuntimeError('folder code was run')\n")
    with transformers_records() as records:
        reloaded = DendriticModel.from_pretrained(tmp_path)
    assert type(reloaded.model) is BertForMeanPooledClassification
    assert not [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    assert torch.equal(outputs(reloaded.eval()), outputs(dm))


def test_custom_class_from_folder_code_needs_trust_remote_code(tmp_path, monkeypatch):
    """A class of the user's own, registered for an Auto class: the folder's code runs only with trust_remote_code."""
    package = tmp_path / "code"
    package.mkdir()
    (package / "modeling_my_head.py").write_text(
        "from transformers import BertForSequenceClassification\n\n\n"
        "class MyBertHead(BertForSequenceClassification):\n    pass\n\n\n"
        "MyBertHead.register_for_auto_class('AutoModelForSequenceClassification')\n"
    )
    monkeypatch.syspath_prepend(str(package))
    import modeling_my_head

    torch.manual_seed(0)
    base = modeling_my_head.MyBertHead(make_tiny("bert").config).eval()
    dm = get_dendritic_model(base, DendriteConfig(target_modules="all-linear", dendrite_seed=0))
    dm.add_dendrites(1)
    with torch.no_grad():
        for p in dm.dendrite_parameters():
            p.normal_(0, 0.3)
    folder = tmp_path / "saved"
    dm.save_pretrained(folder)
    with pytest.raises(ValueError, match=r"MyBertHead is not a transformers class.*modeling_my_head\.py.*trust_remote_code=True"):
        DendriticModel.from_pretrained(folder)
    reloaded = DendriticModel.from_pretrained(folder, trust_remote_code=True)
    assert type(reloaded.model).__name__ == "MyBertHead" and type(reloaded.model) is not modeling_my_head.MyBertHead
    assert torch.equal(outputs(reloaded.eval()), outputs(dm))
    assert torch.equal(outputs(DendriticModel.from_pretrained(folder, model_class=modeling_my_head.MyBertHead).eval()), outputs(dm))


def test_format_1_checkpoints_without_the_notice_still_load(tmp_path):
    """Folders written before the plain-load notice (format 1) load as before, in both loaders."""
    from safetensors.torch import load_file, save_file

    dm = dendritic("bert")
    dm.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights[PLAIN_LOAD_NOTICE_KEY]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    meta = json.loads((tmp_path / "dendrite_config.json").read_text())
    meta["format_version"] = 1
    meta["files"]["model.safetensors"]["size"] = os.path.getsize(tmp_path / "model.safetensors")
    (tmp_path / "dendrite_config.json").write_text(json.dumps(meta))
    assert torch.equal(outputs(DendriticModel.from_pretrained(tmp_path).eval()), outputs(dm))
    fresh = dendritic("bert", seed=3)
    fresh.load_dendritic_state(tmp_path)
    assert torch.equal(outputs(fresh), outputs(dm))
