"""PEFT models with dendrites (docs/peft.md): which layers get dendrites, training, saving and reloading in both
orders of wrapping, merging, and the paths that would lose dendrites."""

import inspect
import json
import os
import shutil

import pytest
import torch
from conftest import make_tiny, tiny_inputs
from test_hub import TOKEN, hub, hub_env  # noqa: F401 (the local Hub server's fixtures)

peft = pytest.importorskip("peft")
from peft import IA3Config, LoraConfig, get_peft_model  # noqa: E402

from hf_dendrites import (  # noqa: E402
    DendriteConfig,
    DendriticModel,
    DendriticTrainer,
    DendriticTrainingArguments,
    get_dendritic_model,
)
from hf_dendrites.layers import DendriticLayerMixin  # noqa: E402
from hf_dendrites.saving import CheckpointError  # noqa: E402

# peft's get_peft_model asks transformers for `is_gradient_checkpointing`, which transformers deprecates: not ours.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

LORA = dict(r=2, target_modules=["q_proj", "v_proj"])
PREFIX = "base_model.model."


def lora_llama(seed=0, **lora):
    return get_peft_model(make_tiny("llama", seed), LoraConfig(**{**LORA, **lora}))


def perturb(model, seed=1):
    """Move every parameter (base, adapter, dendrites) so that a lost or mixed-up tensor shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))


def perturb_trainable(model, seed=1):
    """Move what trains (adapter, dendrites, a head), as training would; the frozen base stays as loaded."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g))


def logits(model, seed=0):
    model.eval()
    with torch.no_grad():
        return model(**tiny_inputs("llama", seed=seed)).logits


def dendritic_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, DendriticLayerMixin)]


# ---------------------------------------------------------------------------------------------- which layers
@pytest.mark.parametrize("targets", [None, ["q_proj", "o_proj"], "all-linear", r".*self_attn\.(q|o)_proj"])
def test_targets_name_the_models_own_layers_never_the_adapters(targets):
    """Defaults, names and "all-linear" failed (`lora.Linear is not a supported layer kind`) or put dendrites on
    lora_A / lora_B; `q_proj` is the layer LoRA wraps."""
    dm = get_dendritic_model(lora_llama(), DendriteConfig(target_modules=targets))
    names = dendritic_names(dm.model)
    assert names and not any("lora_" in n for n in names)
    assert PREFIX + "model.layers.0.self_attn.q_proj.base_layer" in names
    assert PREFIX + "model.layers.0.self_attn.o_proj" in names  # a layer without LoRA: converted as it is
    assert not any(n.endswith(("self_attn.q_proj", "self_attn.v_proj")) for n in names)  # never the LoRA layer itself
    dm.add_dendrites()
    perturb(dm)
    assert torch.isfinite(logits(dm)).all()


def test_exclude_modules_uses_the_same_names():
    dm = get_dendritic_model(lora_llama(), DendriteConfig(target_modules="all-linear", exclude_modules=["q_proj", "mlp.up_proj"]))
    names = dendritic_names(dm.model)
    assert not any("q_proj" in n or "up_proj" in n for n in names) and PREFIX + "model.layers.0.self_attn.v_proj.base_layer" in names


@pytest.mark.parametrize("targets", [None, ["k_proj", "down_proj"], "all-linear"])
def test_other_adapter_kinds_that_wrap_a_layer_convert_the_same_way(targets):
    pm = get_peft_model(make_tiny("llama"), IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    dm = get_dendritic_model(pm, DendriteConfig(target_modules=targets))
    names = dendritic_names(dm.model)
    assert PREFIX + "model.layers.0.self_attn.k_proj.base_layer" in names
    assert PREFIX + "model.layers.0.mlp.down_proj.base_layer" in names
    assert not any("ia3" in n for n in names)
    before = logits(dm)
    dm.add_dendrites()
    torch.testing.assert_close(logits(dm), before, rtol=0, atol=0)  # new dendrites change nothing


def test_dendrites_on_the_adapters_own_layers_are_an_explicit_choice():
    """Perforated AI's recipe for PEFT: only LoRA's layers get dendrites, by naming them."""
    dm = get_dendritic_model(lora_llama(), DendriteConfig(target_modules=["lora_A", "lora_B"]))
    names = dendritic_names(dm.model)
    assert len(names) == 8 and all(n.endswith(("lora_A.default", "lora_B.default")) for n in names)
    only_q = get_dendritic_model(lora_llama(), DendriteConfig(target_modules=["q_proj.lora_A"]))
    assert [n.split("layers.")[1] for n in dendritic_names(only_q.model)] == ["0.self_attn.q_proj.lora_A.default", "1.self_attn.q_proj.lora_A.default"]
    dm.add_dendrites()
    before = logits(dm)
    perturb(dm)
    assert not torch.equal(logits(dm), before)
    with pytest.raises(ValueError, match="adapter's own layers are selected by naming them"):
        get_dendritic_model(lora_llama(), DendriteConfig(target_modules=["nothing_here"]))


# ---------------------------------------------------------------------------------------------- training
def _lm_dataset(n, seed):
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(1, 99, (8,), generator=g).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * 8, "labels": ids, "text": "unused column"})
    return Dataset.from_list(rows)


def test_the_forward_signature_is_the_transformers_models():
    """The Trainer drops dataset columns by it: a PeftModel's (*args, **kwargs) dropped every column."""
    dm = get_dendritic_model(lora_llama(), DendriteConfig(target_modules="all-linear"))
    assert {"input_ids", "attention_mask", "labels"} <= set(inspect.signature(dm.forward).parameters)


def _peft_trainer(output_dir, model=None, save_steps=2, **overrides):
    args = DendriticTrainingArguments(
        output_dir=str(output_dir), eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=save_steps,
        max_steps=7, per_device_train_batch_size=4, learning_rate=1e-2, dendrite_patience=[1],
        dendrite_improvement_threshold=[10.0], max_dendrite_cycles=1, report_to=[], disable_tqdm=True, use_cpu=True,
        seed=0, **overrides,
    )
    return DendriticTrainer(
        lora_llama() if model is None else model, args, train_dataset=_lm_dataset(32, 1), eval_dataset=_lm_dataset(8, 2),
        dendrite_config=None if isinstance(model, DendriticModel) else DendriteConfig(target_modules=["q_proj", "o_proj"]),
    )


def _peft_model_on(base, order):
    """LoRA and dendrites (in `order`) on the tiny Llama saved in `base`, as a trainer takes them."""
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(base)
    if order == "lora first":
        return get_peft_model(model, LoraConfig(**LORA))
    dm = get_dendritic_model(model, DendriteConfig(target_modules=["q_proj", "o_proj"], dendrite_seed=0))
    dm.add_dendrites()
    get_peft_model(dm.model, LoraConfig(**LORA))
    return dm


@pytest.mark.parametrize("order, save_steps", [("lora first", 2), ("lora first", 3), ("dendrites first", 2)])
def test_trainer_takes_a_peft_model_and_its_growth_trains_dendrites_not_the_frozen_base(tmp_path, order, save_steps):
    """Failed with `No columns in the dataset match the model's forward method signature`. Its Trainer checkpoints
    are adapter-only (they were written in full); save_steps=3: the best-weight snapshot is stored as tensors."""
    from safetensors import safe_open

    from hf_dendrites.constants import DENDRITE_CONFIG_NAME, DENDRITE_SCHEDULE_NAME

    base = str(tmp_path / "base")
    make_tiny("llama").save_pretrained(base)
    trainer = _peft_trainer(tmp_path / "run", _peft_model_on(base, order), save_steps)
    dendrite_ids = {id(p) for p in trainer.model.dendrite_parameters()}  # (with dendrites first, LoRA froze them)
    base_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad and id(p) not in dendrite_ids}
    assert trainer.label_names == ["labels"]
    trainer.train()
    dm = trainer.model
    assert set(dm.dendrite_counts().values()) == {1 if order == "lora first" else 2}  # grew once
    assert all(p.requires_grad for p in dm.dendrite_parameters())
    for name, p in dm.named_parameters():
        if name in base_before:  # LoRA froze the base: it stays frozen and unchanged
            assert not p.requires_grad and torch.equal(p, base_before[name]), name
    run = tmp_path / "run"
    steps = sorted(int(d.split("-")[1]) for d in os.listdir(run) if d.startswith("checkpoint-"))
    # Every checkpoint is adapter-only (the base referenced and fingerprinted under the plain model's names) and
    # holds no more than the trainable weights plus the files' headers.
    trainable_bytes = sum(p.numel() * p.element_size() for p in dm.parameters() if p.requires_grad)
    frozen_bytes = sum(p.numel() * p.element_size() for n, p in dm.named_parameters() if n in base_before)
    kinds = set()
    for step in steps:
        folder = run / f"checkpoint-{step}"
        meta = json.loads((folder / DENDRITE_CONFIG_NAME).read_text())
        assert meta["base_model"]["reference"]["name_or_path"] == base and "peft" in meta["base_model"]
        assert "model.layers.0.self_attn.q_proj.weight" in meta["base_model"]["fingerprint"]["tensors"]
        assert not any(f.startswith("model") for f in os.listdir(folder))
        weights = sum(os.path.getsize(folder / f) for f in meta["files"])
        assert weights < trainable_bytes + 20_000 < frozen_bytes
        snapshots = json.loads((folder / DENDRITE_SCHEDULE_NAME).read_text())["snapshots"]
        for store in [s["stored"] for s in snapshots.values() if s and "stored" in s]:  # without the frozen base
            kinds.add(store["kind"])
            if store["kind"] == "model":
                assert not any(f.startswith("model") for f in os.listdir(folder / store["path"]))
            else:
                with safe_open(str(folder / store["path"]), "pt") as handle:
                    assert not any(k.endswith("base_layer.weight") or "embed_tokens" in k for k in handle.keys())
    assert ("tensors" if save_steps == 3 else "model") in kinds
    reloaded = DendriticModel.from_pretrained(run / f"checkpoint-{steps[-1]}")  # its base from the reference
    torch.testing.assert_close(logits(reloaded), logits(dm), rtol=0, atol=0)
    # Resuming from the checkpoint written after the growth ends with the same weights.
    grown = next(s for s in steps if sum(DendriticModel.from_pretrained(run / f"checkpoint-{s}").dendrite_counts().values()) > (0 if order == "lora first" else 4))
    assert grown < steps[-1]  # training went on after it
    resumed = _peft_trainer(tmp_path / "resumed", _peft_model_on(base, order), save_steps)
    resumed.train(resume_from_checkpoint=str(run / f"checkpoint-{grown}"))
    assert [r["score"] for r in resumed.dendrite_history] == [r["score"] for r in trainer.dendrite_history]
    expected, got = dm.state_dict(), resumed.model.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    # onto another base: refused
    make_tiny("llama", seed=3).save_pretrained(tmp_path / "other")
    wrong = _peft_trainer(tmp_path / "wrong", _peft_model_on(str(tmp_path / "other"), order), save_steps)
    with pytest.raises(CheckpointError, match="fingerprint mismatch"):
        wrong.train(resume_from_checkpoint=str(run / f"checkpoint-{grown}"))


def test_load_best_model_at_end_loads_an_adapter_only_peft_checkpoint_in_place(tmp_path):
    """The best checkpoint (made the first one: highest loss) has no dendrites yet; the model is shrunk back to it."""
    make_tiny("llama").save_pretrained(tmp_path / "base")
    trainer = _peft_trainer(
        tmp_path / "run", _peft_model_on(str(tmp_path / "base"), "lora first"), load_best_model_at_end=True,
        metric_for_best_model="eval_loss", greater_is_better=True,
    )
    trainer.train()
    assert not os.path.exists(tmp_path / "run" / "checkpoint-2" / "model.safetensors")  # adapter-only
    assert trainer.dendrite_callback.loaded_checkpoint == "checkpoint-2" and sum(trainer.model.dendrite_counts().values()) == 0
    best = DendriticModel.from_pretrained(tmp_path / "run" / "checkpoint-2")
    torch.testing.assert_close(logits(trainer.model), logits(best), rtol=0, atol=0)


def test_trainer_takes_a_dendritic_model_that_got_lora_afterwards(tmp_path):
    dm = get_dendritic_model(make_tiny("llama"), DendriteConfig(target_modules=["q_proj", "o_proj"], dendrite_seed=0))
    dm.add_dendrites()
    get_peft_model(dm.model, LoraConfig(**LORA))
    trainer = _peft_trainer(tmp_path, model=dm)
    trainer.train()
    assert set(dm.dendrite_counts().values()) == {2} and all(p.requires_grad for p in dm.dendrite_parameters())
    trainer.save_model(str(tmp_path / "final"))
    torch.testing.assert_close(logits(DendriticModel.from_pretrained(tmp_path / "final")), logits(dm), rtol=0, atol=0)


def test_growth_after_lora_makes_every_dendrite_trainable():
    """Dendrites first, then LoRA: get_peft_model froze the existing dendrites and growth left them frozen in the
    layers that had some (and trainable in the others)."""
    dm = get_dendritic_model(make_tiny("llama"), DendriteConfig(target_modules=["q_proj", "o_proj"]))
    dm.add_dendrites()
    get_peft_model(dm.model, LoraConfig(**LORA))
    assert not any(p.requires_grad for p in dm.dendrite_parameters())
    dm.add_dendrites()
    assert all(p.requires_grad for p in dm.dendrite_parameters())
    assert all(not p.requires_grad for n, p in dm.named_parameters() if n.endswith("base_layer.weight"))


# ---------------------------------------------------------------------------------------------- saving
def _lora_then_dendrites(rank=None, targets=("q_proj", "o_proj")):
    dm = get_dendritic_model(lora_llama(), DendriteConfig(target_modules=list(targets), rank=rank, dendrite_seed=0))
    dm.add_dendrites(2)
    perturb(dm)
    return dm


def _dendrites_then_lora():
    dm = get_dendritic_model(make_tiny("llama"), DendriteConfig(target_modules=["q_proj", "o_proj"], dendrite_seed=0))
    dm.add_dendrites()
    pm = get_peft_model(dm.model, LoraConfig(**LORA))
    dm.add_dendrites()
    perturb(dm)
    return dm, pm


@pytest.mark.parametrize("rank", [None, 2])
def test_lora_then_dendrites_saves_and_reloads_exactly(tmp_path, rank):
    """Raised `transformers' save_pretrained wrote no model.safetensors`."""
    dm = _lora_then_dendrites(rank)
    dm.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path / "peft_adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
    reloaded = DendriticModel.from_pretrained(tmp_path)
    assert isinstance(reloaded.model, peft.PeftModel)
    assert reloaded.dendrite_counts() == dm.dendrite_counts()
    torch.testing.assert_close(logits(reloaded), logits(dm), rtol=0, atol=0)
    # the base files hold the plain model's names: transformers loads them without PEFT's keys
    from safetensors import safe_open

    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.self_attn.q_proj.weight" in keys and not any("lora" in k or "base_layer" in k for k in keys)
    with safe_open(tmp_path / "peft_adapter" / "adapter_model.safetensors", "pt") as f:
        assert not any("dendrite" in k for k in f.keys())  # PEFT's own filter would keep `dendrite_lora_A`


def test_dendrites_then_lora_saves_and_reloads_exactly(tmp_path):
    """Wrote PEFT's key names, and from_pretrained then failed with `CheckpointError: base weights ... do not
    match`."""
    dm, pm = _dendrites_then_lora()
    dm.save_pretrained(tmp_path)
    reloaded = DendriticModel.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(reloaded), logits(pm), rtol=0, atol=0)
    assert sorted(reloaded._checkpoint_layers()) == sorted(dm._checkpoint_layers())


def test_adapter_layer_dendrites_save_and_reload_exactly_and_refuse_merging(tmp_path):
    dm = _lora_then_dendrites(targets=("lora_A", "lora_B"))
    dm.save_pretrained(tmp_path)
    reloaded = DendriticModel.from_pretrained(tmp_path, is_trainable=True)
    torch.testing.assert_close(logits(reloaded), logits(dm), rtol=0, atol=0)
    assert all(p.requires_grad for n, p in reloaded.named_parameters() if "lora_A.default.weight" in n)
    with pytest.raises(ValueError, match="merging the adapter into the base weights would drop"):
        dm.merge_and_unload()
    # adapter-only: the adapter layers' dendrites go to the dendrite file, the adapter to peft_adapter/
    dm.save_pretrained(tmp_path / "adapter", adapter_only=True)
    reloaded = DendriticModel.from_pretrained(tmp_path / "adapter", base_model=str(tmp_path))  # the full save's base
    torch.testing.assert_close(logits(reloaded), logits(dm), rtol=0, atol=0)


def test_load_dendritic_state_restores_base_dendrites_and_adapter_in_place(tmp_path):
    """What a Trainer resume and load_best_model_at_end do with a checkpoint of a PEFT model."""
    saved = _lora_then_dendrites()
    saved.save_pretrained(tmp_path)
    other = get_dendritic_model(lora_llama(seed=3), DendriteConfig(target_modules=["q_proj", "o_proj"], dendrite_seed=5))
    other.add_dendrites()
    other.load_dendritic_state(tmp_path)
    assert other.dendrite_counts() == saved.dendrite_counts()
    torch.testing.assert_close(logits(other), logits(saved), rtol=0, atol=0)
    plain = get_dendritic_model(make_tiny("llama"), DendriteConfig(target_modules=["q_proj", "o_proj"]))
    with pytest.raises(CheckpointError, match="with PEFT adapters"):
        plain.load_dendritic_state(tmp_path)
    wider = get_dendritic_model(lora_llama(r=3), DendriteConfig(target_modules=["q_proj", "o_proj"]))
    before = {k: v.clone() for k, v in wider.state_dict().items()}
    with pytest.raises(CheckpointError, match="does not match the model's adapter"):
        wider.load_dendritic_state(tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in wider.state_dict().items())  # checked before anything changed


@pytest.mark.parametrize("order", ["lora first", "dendrites first"])
def test_peft_save_pretrained_refuses_to_drop_the_dendrites(tmp_path, order):
    """PeftModel.save_pretrained silently dropped the dendrites of the base layers (reloaded: no dendrites)."""
    pm = _lora_then_dendrites().model if order == "lora first" else _dendrites_then_lora()[1]
    with pytest.raises(ValueError, match="would drop"):
        pm.save_pretrained(tmp_path)
    assert not os.path.exists(tmp_path / "adapter_model.safetensors")
    get_peft_model(make_tiny("llama"), LoraConfig(**LORA)).save_pretrained(tmp_path)  # without dendrites: PEFT's own
    assert os.path.isfile(tmp_path / "adapter_model.safetensors")


def test_merge_and_unload_gives_a_plain_dendritic_model(tmp_path):
    dm = _lora_then_dendrites()
    expected, counts = logits(dm), {k.removeprefix(PREFIX).removesuffix(".base_layer"): v for k, v in dm.dendrite_counts().items()}
    merged = dm.merge_and_unload()
    assert isinstance(merged, DendriticModel) and not isinstance(merged.model, peft.PeftModel)
    assert merged.dendrite_counts() == counts and merged.growth_count == 1
    torch.testing.assert_close(logits(merged), expected, rtol=1e-5, atol=1e-5)
    merged.save_pretrained(tmp_path)
    torch.testing.assert_close(logits(DendriticModel.from_pretrained(tmp_path)), logits(merged), rtol=0, atol=0)
    dendrites_first, pm = _dendrites_then_lora()
    with pytest.raises(ValueError, match="call merge_and_unload\\(\\) on that PeftModel"):
        dendrites_first.merge_and_unload()


def test_lora_on_a_model_loaded_from_a_dendritic_checkpoint_keeps_its_dendrites(tmp_path):
    """A plain dendritic checkpoint, loaded by transformers, wrapped with LoRA, then converted: the checkpoint's
    dendrites are restored on the layers LoRA wraps."""
    import transformers

    dm = get_dendritic_model(make_tiny("llama"), DendriteConfig(target_modules=["q_proj", "o_proj"], dendrite_seed=0))
    dm.add_dendrites(2)
    perturb(dm)
    dm.save_pretrained(tmp_path)
    pm = get_peft_model(transformers.LlamaForCausalLM.from_pretrained(tmp_path), LoraConfig(**LORA))
    restored = get_dendritic_model(pm)
    assert sorted(restored.dendrite_counts().values()) == [2] * 4
    torch.testing.assert_close(logits(restored), logits(dm), rtol=0, atol=0)  # LoRA starts at zero


def test_the_paths_that_would_leave_the_adapter_or_the_dendrites_behind_say_what_to_do(tmp_path):
    import transformers

    _lora_then_dendrites().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="DendriticModel.from_pretrained"):  # base + dendrites, adapter left out
        get_dendritic_model(transformers.LlamaForCausalLM.from_pretrained(tmp_path))
    _, pm = _dendrites_then_lora()
    with pytest.raises(ValueError, match="keep using the DendriticModel that `get_dendritic_model` returned"):
        DendriticTrainer(pm, DendriticTrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[]))


def test_a_classifier_with_lora_and_a_trained_head_saves_and_reloads_exactly(tmp_path):
    """BERT with task_type SEQ_CLS: PEFT wraps the classifier (modules_to_save) next to the LoRA layers."""
    pm = get_peft_model(make_tiny("bert"), LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS"))
    dm = get_dendritic_model(pm, DendriteConfig(dendrite_seed=0))
    assert PREFIX + "bert.encoder.layer.0.attention.self.query.base_layer" in dict(dm.dendritic_layers())
    dm.add_dendrites()
    perturb(dm)
    dm.save_pretrained(tmp_path)
    reloaded = DendriticModel.from_pretrained(tmp_path)
    inputs = tiny_inputs("bert")
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(**inputs).logits, dm.eval()(**inputs).logits, rtol=0, atol=0)


def test_an_adapter_only_checkpoint_of_lora_with_a_new_head_reloads_from_the_headless_base(tmp_path):
    """The usual LoRA classifier: a base without the head, which transformers initialises randomly at every load. The
    frozen original head (PEFT trains a copy) is stored, not fingerprinted: it was refused as a wrong base."""
    import transformers

    make_tiny("bert").bert.save_pretrained(tmp_path / "base")  # the encoder alone
    torch.manual_seed(1)
    model = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "base")
    dm = get_dendritic_model(get_peft_model(model, LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS")))
    dm.add_dendrites()
    perturb_trainable(dm)
    inputs = tiny_inputs("bert")
    folder = tmp_path / "adapter"
    dm.save_pretrained(folder, adapter_only=True)
    entry = json.loads((folder / "dendrite_config.json").read_text())["base_model"]
    assert "classifier.weight" not in entry["fingerprint"]["tensors"] and "bert.pooler.dense.weight" in entry["fingerprint"]["tensors"]
    torch.manual_seed(2)  # another random head
    reloaded = DendriticModel.from_pretrained(folder)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(**inputs).logits, dm.eval()(**inputs).logits, rtol=0, atol=0)
        with reloaded.model.disable_adapter(), dm.model.disable_adapter():  # the original head came back too
            torch.testing.assert_close(reloaded(**inputs).logits, dm(**inputs).logits, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")  # huggingface_hub's LFS upload
def test_push_and_load_a_peft_model_with_dendrites_through_the_hub(hub, hub_env, tmp_path):  # noqa: F811
    """The adapter files are uploaded (both push paths) and downloaded with the weights."""
    dm = _lora_then_dendrites()
    dm.push_to_hub("tester/lora-dendrites", token=TOKEN)
    folder = tmp_path / "lora-dendrites-2"
    dm.save_pretrained(folder, push_to_hub=True, token=TOKEN, repo_id="tester/lora-dendrites-2")
    for repo in ("tester/lora-dendrites", "tester/lora-dendrites-2"):
        assert {"peft_adapter/adapter_config.json", "peft_adapter/adapter_model.safetensors"} <= set(hub.files(repo))
        loaded = DendriticModel.from_pretrained(repo, token=TOKEN, cache_dir=str(tmp_path / "cache"))
        torch.testing.assert_close(logits(loaded), logits(dm), rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")  # huggingface_hub's LFS upload
# PEFT's adapter save asks huggingface.co (not the test server) whether the base's vocabulary changed: not ours
@pytest.mark.filterwarnings("ignore:Unable to fetch remote file:UserWarning", "ignore:Could not find a config file:UserWarning")
def test_an_adapter_only_peft_checkpoint_on_the_hub_loads_its_base_from_the_hub(hub, hub_env, tmp_path):  # noqa: F811
    import transformers
    from huggingface_hub import HfApi

    make_tiny("llama").save_pretrained(tmp_path / "base")
    HfApi(token=TOKEN).create_repo("tester/llama-base")
    HfApi(token=TOKEN).upload_folder(folder_path=tmp_path / "base", repo_id="tester/llama-base")
    model = transformers.LlamaForCausalLM.from_pretrained("tester/llama-base", token=TOKEN)
    dm = get_dendritic_model(get_peft_model(model, LoraConfig(**LORA)), DendriteConfig(target_modules=["q_proj"], dendrite_seed=0))
    dm.add_dendrites()
    perturb_trainable(dm)
    dm.push_to_hub("tester/llama-lora-dendrites", token=TOKEN, adapter_only=True)
    files = set(hub.files("tester/llama-lora-dendrites"))
    assert "peft_adapter/adapter_model.safetensors" in files and "model.safetensors" not in files
    loaded = DendriticModel.from_pretrained("tester/llama-lora-dendrites", token=TOKEN, cache_dir=str(tmp_path / "cache"))
    torch.testing.assert_close(logits(loaded), logits(dm), rtol=0, atol=0)


def test_two_adapters_come_back_with_the_saved_one_active(tmp_path):
    dm = _lora_then_dendrites()
    dm.model.add_adapter("other", LoraConfig(r=3, target_modules=["k_proj"]))
    dm.model.set_adapter("other")
    perturb(dm, seed=4)
    dm.save_pretrained(tmp_path)
    reloaded = DendriticModel.from_pretrained(tmp_path)
    assert sorted(reloaded.model.peft_config) == ["default", "other"] and reloaded.model.active_adapters == ["other"]
    torch.testing.assert_close(logits(reloaded), logits(dm), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- adapter-only checkpoints
def _lora_on_saved_base(folder, order, seed=0):
    """A tiny Llama saved to `folder` and loaded back from it (its config names the folder), with LoRA and dendrites
    in the given order, every trainable tensor moved as training would (the frozen base left as it was)."""
    import transformers

    make_tiny("llama", seed).save_pretrained(folder)
    model = transformers.LlamaForCausalLM.from_pretrained(folder)
    config = DendriteConfig(target_modules=["q_proj", "o_proj"], dendrite_seed=0, rank=2)
    if order == "lora first":
        dm = get_dendritic_model(get_peft_model(model, LoraConfig(**LORA)), config)
        dm.add_dendrites(2)
    else:
        dm = get_dendritic_model(model, config)
        dm.add_dendrites()
        get_peft_model(dm.model, LoraConfig(**LORA))
        dm.add_dendrites()
    perturb_trainable(dm)
    return dm


@pytest.mark.parametrize("order", ["lora first", "dendrites first"])
def test_adapter_only_save_of_a_peft_model_reloads_exactly_from_its_base(tmp_path, order):
    """save_pretrained(adapter_only=True) of a PEFT model raised NotImplementedError."""
    import transformers
    from safetensors import safe_open

    from hf_dendrites.constants import DENDRITE_CONFIG_NAME, DENDRITE_TRAINED_BASE_NAME

    base = str(tmp_path / "base")
    dm = _lora_on_saved_base(base, order)
    expected = logits(dm)
    folder = tmp_path / "adapter"
    dm.save_pretrained(folder, adapter_only=True)

    assert not any(f.startswith("model") for f in os.listdir(folder))  # no base weights
    assert sorted(os.listdir(folder / "peft_adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    meta = json.loads((folder / DENDRITE_CONFIG_NAME).read_text())
    entry = meta["base_model"]
    assert entry["reference"]["name_or_path"] == base and meta["files"]["peft_adapter/adapter_model.safetensors"]
    # the fingerprint covers exactly the plain model's frozen tensors under their plain names: the same base loaded
    # by transformers has them all
    plain = transformers.LlamaForCausalLM.from_pretrained(base).state_dict()
    fingerprinted = set(entry["fingerprint"]["tensors"]) | set(entry["aliases"])
    assert fingerprinted == set(plain) and "model.layers.0.self_attn.q_proj.weight" in fingerprinted
    with safe_open(str(folder / DENDRITE_TRAINED_BASE_NAME), "pt") as handle:
        assert set(handle.keys()) <= {k for k in plain if "rotary" in k}  # persistent buffers only (none here)
    with safe_open(str(folder / "dendrite_model.safetensors"), "pt") as handle:
        assert not any("base_layer" in k or k.startswith(PREFIX) for k in handle.keys())

    reloaded = DendriticModel.from_pretrained(folder)  # the base from its reference, the adapter from peft_adapter/
    assert isinstance(reloaded.model, peft.PeftModel) and set(reloaded.dendrite_counts().values()) == {2}
    assert sorted(reloaded._checkpoint_layers()) == sorted(dm._checkpoint_layers())
    torch.testing.assert_close(logits(reloaded), expected, rtol=0, atol=0)
    dendrite_ids = {id(p) for p in reloaded.dendrite_parameters()}
    assert not any(p.requires_grad for p in reloaded.parameters() if id(p) not in dendrite_ids)  # PEFT's default
    trainable = DendriticModel.from_pretrained(folder, is_trainable=True)
    assert all(p.requires_grad for n, p in trainable.named_parameters() if "lora_" in n)
    assert not any(p.requires_grad for n, p in trainable.named_parameters() if n.endswith("base_layer.weight"))
    # saved again adapter-only, the same base reference and fingerprint
    reloaded.save_pretrained(tmp_path / "again", adapter_only=True)
    again = json.loads((tmp_path / "again" / DENDRITE_CONFIG_NAME).read_text())["base_model"]
    assert again["reference"] == entry["reference"] and again["fingerprint"] == entry["fingerprint"]
    # the base given as a model (plain transformers): used in place
    model = transformers.LlamaForCausalLM.from_pretrained(base)
    given = DendriticModel.from_pretrained(folder, base_model=model)
    assert given.model.get_base_model() is model
    torch.testing.assert_close(logits(given), expected, rtol=0, atol=0)


def test_adapter_only_peft_checkpoint_refuses_a_wrong_base_and_loads_in_place(tmp_path):
    import transformers

    base = str(tmp_path / "base")
    dm = _lora_on_saved_base(base, "lora first")
    folder = tmp_path / "adapter"
    dm.save_pretrained(folder, adapter_only=True)

    make_tiny("llama", seed=3).save_pretrained(tmp_path / "other")
    with pytest.raises(CheckpointError, match=r"fingerprint mismatch.*base_model="):
        DendriticModel.from_pretrained(folder, base_model=str(tmp_path / "other"))
    # a base changed by a hair, passed as a model: refused before PEFT or dendrites touch it
    model = transformers.LlamaForCausalLM.from_pretrained(base)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] += 1e-6
    with pytest.raises(CheckpointError, match=r"1 of its \d+ frozen tensors.*layers\.1\.mlp\.up_proj\.weight"):
        DendriticModel.from_pretrained(folder, base_model=model)
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    # a damaged dendrite file, found once the adapter is on the base given: PEFT's layers are taken out again
    damaged = tmp_path / "damaged"
    shutil.copytree(folder, damaged)
    data = bytearray((damaged / "dendrite_model.safetensors").read_bytes())
    data[-1] ^= 1
    (damaged / "dendrite_model.safetensors").write_bytes(bytes(data))
    model = transformers.LlamaForCausalLM.from_pretrained(base)
    with pytest.raises(CheckpointError, match="SHA-256"):
        DendriticModel.from_pretrained(damaged, base_model=model)
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert not any("lora" in n for n, _ in model.named_parameters())
    with pytest.raises(ValueError, match="is_trainable= applies to checkpoints of PEFT models"):
        DendriticModel.from_pretrained(_saved_frozen_bert(tmp_path), is_trainable=True)

    # in place (what a Trainer resume does): base, dendrites and adapter, into a model on the same base ...
    config = DendriteConfig(target_modules=["q_proj", "o_proj"], rank=2)
    fresh = get_dendritic_model(get_peft_model(transformers.LlamaForCausalLM.from_pretrained(base), LoraConfig(**LORA)), config)
    fresh.load_dendritic_state(folder)
    torch.testing.assert_close(logits(fresh), logits(dm), rtol=0, atol=0)
    # ... but not into one on another base, and nothing changes before the checks passed
    other = get_dendritic_model(lora_llama(seed=3), config)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError, match="fingerprint mismatch"):
        other.load_dendritic_state(folder)
    assert other.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())


def _saved_frozen_bert(tmp_path):
    dm = get_dendritic_model(make_tiny("bert"), DendriteConfig(target_modules="all-linear"))
    for name, p in dm.model.named_parameters():
        p.requires_grad_(name.startswith("classifier."))
    dm.add_dendrites()
    dm.save_pretrained(tmp_path / "bert", adapter_only=True, base_model_name_or_path=str(tmp_path / "nowhere"))
    return tmp_path / "bert"
