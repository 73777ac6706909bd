"""Conversion of whole models: matching rules, identity, pass-through, accounting, unload."""

import inspect

import pytest
import torch
import transformers
from conftest import TinyConvNet, make_tiny, minilm_dir, tiny_inputs
from torch import nn

from hf_dendrites import DendriteConfig, DendriticModel, get_dendritic_model, resolve_target_modules
from hf_dendrites.layers import DendriticLayerMixin

ARCHS = ["bert", "gpt2", "llama", "t5", "vit"]

# What the per-architecture defaults must target in each tiny model (attention projections + MLP layers).
EXPECTED_DEFAULT_SUFFIXES = {
    "bert": {"query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"},
    "gpt2": {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"},
    "llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "t5": {"q", "k", "v", "o", "wi", "wo"},
    # transformers >= 5.9 names ViT layers q_proj/k_proj/v_proj/o_proj/fc1/fc2; older 5.x releases query/key/value/
    # attention.output.dense/intermediate.dense/output.dense (the lowest-versions CI job runs those).
    "vit": {"q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2", "query", "key", "value", "attention.output.dense",
            "intermediate.dense", "output.dense"},
}
LAYERS_PER_BLOCK = {"bert": 6, "gpt2": 4, "llama": 7, "t5": None, "vit": 6}


def output_tensor(out):
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("arch", ARCHS)
def test_default_targets_and_whole_model_identity(arch):
    model = make_tiny(arch)
    inputs = tiny_inputs(arch)
    with torch.no_grad():
        expected = output_tensor(model(**inputs))
    dm = get_dendritic_model(model, DendriteConfig())
    names = [n for n, _ in dm.dendritic_layers()]
    assert names, arch
    for n in names:
        assert any(n == s or n.endswith("." + s) for s in EXPECTED_DEFAULT_SUFFIXES[arch]), n
    if LAYERS_PER_BLOCK[arch]:
        assert len(names) == 2 * LAYERS_PER_BLOCK[arch]
    else:  # t5: 2 encoder blocks x 6 + 2 decoder blocks x 10 (self-attn, cross-attn, MLP)
        assert len(names) == 32
    dm.eval()
    with torch.no_grad():
        assert torch.equal(output_tensor(dm(**inputs)), expected)
        dm.add_dendrites(2)
        dm.add_dendrites()
        assert torch.equal(output_tensor(dm(**inputs)), expected)
    assert set(dm.dendrite_counts().values()) == {3}


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama", "vit"])
def test_all_linear_skips_heads_and_output_embedding(arch):
    model = make_tiny(arch)
    dm = get_dendritic_model(model, DendriteConfig(target_modules="all-linear"))
    names = [n for n, _ in dm.dendritic_layers()]
    head_words = ("classifier", "lm_head", "score")
    assert names and not any(w in n for n in names for w in head_words)
    linear_like = [n for n, m in model.named_modules() if type(m).__name__ in ("Linear", "Conv1D", "DendriticLinear", "DendriticConv1D")]
    skipped = set(linear_like) - set(names)
    assert skipped and all(any(w in n for w in head_words) for n in skipped), skipped


def test_all_linear_on_t5_skips_lm_head():
    dm = get_dendritic_model(make_tiny("t5"), DendriteConfig(target_modules="all-linear"))
    names = [n for n, _ in dm.dendritic_layers()]
    assert "lm_head" not in names and len(names) == 32


def test_list_suffix_regex_and_exclude():
    model = make_tiny("bert")
    cfg = DendriteConfig(target_modules=["query", "layer.1.intermediate.dense"])
    names = resolve_target_modules(model, cfg)
    assert names == [
        "bert.encoder.layer.0.attention.self.query",
        "bert.encoder.layer.1.attention.self.query",
        "bert.encoder.layer.1.intermediate.dense",
    ]
    # a list entry must match a whole dotted component, not a substring
    with pytest.raises(ValueError, match="matched no layer"):
        resolve_target_modules(model, DendriteConfig(target_modules=["uery"]))
    regex = DendriteConfig(target_modules=r".*layer\.0\..*(query|value)")
    assert resolve_target_modules(model, regex) == ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.value"]
    excl = DendriteConfig(target_modules="all-linear", exclude_modules=["pooler.dense", "query"])
    names = resolve_target_modules(model, excl)
    assert "bert.pooler.dense" not in names and not any(n.endswith("query") for n in names) and len(names) == 10


def test_no_match_error_lists_candidates():
    with pytest.raises(ValueError, match=r"matched no layer.*bert\.encoder\.layer\.0\.attention\.self\.query"):
        get_dendritic_model(make_tiny("bert"), DendriteConfig(target_modules=["does_not_exist"]))


def tiny_resnet():
    """A real transformers model whose only nn.Linear is its classification head (`classifier.1`)."""
    torch.manual_seed(0)
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1], num_labels=3)
    return transformers.ResNetForImageClassification(config).eval()


def test_all_linear_error_names_the_rule_that_excluded_the_head():
    model = tiny_resnet()
    assert [n for n, m in model.named_modules() if isinstance(m, nn.Linear)] == ["classifier.1"]
    with pytest.raises(ValueError) as err:
        get_dendritic_model(model, DendriteConfig(target_modules="all-linear"))
    message = str(err.value)
    assert "`classifier.1` is a task head" in message and "'all-linear' never targets" in message
    assert "pass target_modules=['classifier.1'] to target it" in message
    assert "Supported layers" not in message  # the head is not offered as a candidate 'all-linear' could match
    # Following the advice works.
    dm = get_dendritic_model(model, DendriteConfig(target_modules=["classifier.1"]))
    assert dm.dendrite_counts() == {"classifier.1": 0}


def test_all_linear_error_names_the_output_embedding():
    """A causal LM whose only Linear outside its blocks is the output embedding, blocks excluded by the user."""
    model = make_tiny("llama")
    cfg = DendriteConfig(target_modules=["lm_head", "down_proj"], exclude_modules=["down_proj", "lm_head"])
    with pytest.raises(ValueError, match=r"once exclude_modules=\['down_proj', 'lm_head'\] is applied.*`lm_head`"):
        resolve_target_modules(model, cfg)
    mlp_only = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(vocab_size=99, hidden_size=8, intermediate_size=8, num_hidden_layers=0, num_attention_heads=2)
    )
    with pytest.raises(ValueError, match=r"`lm_head` is the output embedding.*target_modules=\['lm_head'\] to target it"):
        resolve_target_modules(mlp_only, DendriteConfig(target_modules="all-linear"))


def test_unsupported_target_kind_is_an_error():
    with pytest.raises(TypeError, match="word_embeddings.*not a supported layer kind"):
        get_dendritic_model(make_tiny("bert"), DendriteConfig(target_modules=["word_embeddings"]))


def test_unknown_architecture_needs_explicit_targets():
    with pytest.raises(ValueError, match="No default dendrite targets.*target_modules"):
        get_dendritic_model(TinyConvNet(), DendriteConfig())
    cfg = transformers.OPTConfig(vocab_size=99, hidden_size=16, num_hidden_layers=1, ffn_dim=20, num_attention_heads=2, word_embed_proj_dim=16)
    with pytest.raises(ValueError, match="model_type 'opt'"):
        get_dendritic_model(transformers.OPTModel(cfg), DendriteConfig())


def test_converting_twice_is_an_error():
    dm = get_dendritic_model(make_tiny("gpt2"))
    with pytest.raises(ValueError, match="already a DendriticModel"):
        get_dendritic_model(dm)
    with pytest.raises(ValueError, match="already contains dendritic layers"):
        get_dendritic_model(dm.model)


def test_plain_pytorch_conv_model():
    model = TinyConvNet().eval()
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        expected = model(x)
    dm = get_dendritic_model(model, DendriteConfig(target_modules=["conv1", "conv2", "conv3", "fc"], cascade=True))
    dm.add_dendrites(2)
    with torch.no_grad():
        assert torch.equal(dm(x), expected)
    kinds = {layer.kind for layer in dm.dendrite_summary().layers}
    assert kinds == {"Conv2d", "Conv1d", "Linear"}
    dm(x).sum().backward()
    assert all(p.grad is not None for p in dm.parameters())


def test_passthrough_config_generate_and_signature():
    model = make_tiny("gpt2")
    dm = get_dendritic_model(model)
    assert dm.config is model.config
    assert isinstance(dm, nn.Module) and dm.get_base_model() is model
    assert inspect.signature(dm.forward) == inspect.signature(model.forward)
    dm.add_dendrites()
    ids = tiny_inputs("gpt2")["input_ids"][:, :3]
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=4, do_sample=False)
        assert torch.equal(dm.generate(ids, max_new_tokens=4, do_sample=False), expected)
    out = dm(input_ids=ids, labels=ids)
    assert out.loss is not None


def test_trainer_keeps_dataset_columns(tmp_path):
    """transformers.Trainer drops dataset columns that the forward signature does not name."""
    dm = get_dendritic_model(make_tiny("bert"))
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "unused"), report_to=[], use_cpu=True)
    trainer = transformers.Trainer(model=dm, args=args)
    trainer._set_signature_columns_if_needed()
    assert {"input_ids", "attention_mask", "labels"} <= set(trainer._signature_columns)


def test_summary_counts_are_exact():
    model = make_tiny("bert")
    base_total = sum(p.numel() for p in model.parameters())
    dm = get_dendritic_model(model, DendriteConfig(cascade=True))
    summary = dm.dendrite_summary()
    assert (summary.base_params, summary.dendrite_params, summary.num_dendrites) == (base_total, 0, 0)
    dm.add_dendrites(3)
    summary = dm.dendrite_summary()
    expected_dendrite = 0
    for _, layer in dm.dendritic_layers():
        n, i = layer.out_features, layer.in_features
        # K*N*in weights + K*N biases + K*N output weights + K(K-1)/2 * N cascade weights
        expected_dendrite += 3 * n * i + 3 * n + 3 * n + 3 * n
    assert summary.base_params == base_total
    assert summary.dendrite_params == expected_dendrite
    assert summary.total_params == sum(p.numel() for p in dm.parameters())
    assert summary.trainable_params == summary.total_params
    for p in dm.model.bert.embeddings.parameters():
        p.requires_grad_(False)
    frozen = sum(p.numel() for p in dm.model.bert.embeddings.parameters())
    assert dm.dendrite_summary().trainable_params == summary.total_params - frozen
    q = next(layer for layer in summary.layers if layer.name.endswith("layer.0.attention.self.query"))
    assert (q.kind, q.num_dendrites, q.base_params, q.dendrite_params) == ("Linear", 3, 32 * 32 + 32, 3 * 32 * 32 + 9 * 32)
    text = str(summary)
    assert "bert.encoder.layer.0.attention.self.query" in text and f"{summary.total_params:,}" in text
    d = summary.to_dict()
    assert d["dendrite_params"] == expected_dendrite and len(d["layers"]) == 12


def test_summary_counts_tied_weights_once_and_low_rank():
    model = make_tiny("gpt2")  # lm_head is tied to the token embedding
    base_total = sum(p.numel() for p in model.parameters())
    dm = get_dendritic_model(model, DendriteConfig(rank=2))
    dm.add_dendrites(2)
    summary = dm.dendrite_summary()
    assert summary.base_params == base_total
    expected = 0
    for _, layer in dm.dendritic_layers():
        n, i = layer.nf, layer.nx
        expected += 2 * 2 * i + 2 * n * 2 + 2 * n + 2 * n  # A: [in, K*r], B: [K, N, r], bias, out
    assert summary.dendrite_params == expected


def test_set_dendrite_counts_and_seeded_growth():
    def grown(seed):
        dm = get_dendritic_model(make_tiny("llama"), DendriteConfig(dendrite_seed=seed))
        dm.add_dendrites(2)
        return dm

    a, b = grown(7), grown(7)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb)
    name = next(iter(a.dendrite_counts()))
    a.set_dendrite_counts({name: 1})
    assert a.dendrite_counts()[name] == 1
    a.set_dendrite_counts(0)
    assert set(a.dendrite_counts().values()) == {0} and a.dendrite_summary().dendrite_params == 0
    with pytest.raises(KeyError, match="No dendritic layers named"):
        a.set_dendrite_counts({"nope": 1})
    # a retried growth (after truncation) gets fresh dendrites, not the dropped ones again
    layer = next(b.dendritic_layers())[1]
    n = layer.num_neurons
    dropped = layer.dendrite_weight[n:].detach().clone()
    b.set_dendrite_counts(1)
    kept = layer.dendrite_weight.detach().clone()
    b.add_dendrites(1)
    assert torch.equal(layer.dendrite_weight[:n], kept)
    assert not torch.equal(layer.dendrite_weight[n:], dropped)


def test_unload_returns_the_plain_model():
    model = make_tiny("llama")
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        expected = model(**inputs).logits
    params = {n: p for n, p in model.named_parameters()}
    dm = get_dendritic_model(model)
    dm.add_dendrites(2)
    plain = dm.unload()
    assert plain is model
    assert not any(isinstance(m, DendriticLayerMixin) for m in plain.modules())
    assert {n: p for n, p in plain.named_parameters()} == params
    with torch.no_grad():
        assert torch.equal(plain(**inputs).logits, expected)
    # unloaded model can be converted again
    assert isinstance(get_dendritic_model(plain), DendriticModel)


def test_add_dendrites_rejects_bad_counts():
    dm = get_dendritic_model(make_tiny("bert"))
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="n must be an integer >= 1"):
            dm.add_dendrites(bad)


def test_real_minilm_identity_and_exact_summary():
    path = minilm_dir()
    model = transformers.AutoModel.from_pretrained(path).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    batch = tok(["dendrites add capacity", "a plain sentence for the encoder"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**batch).last_hidden_state
    base_total = sum(p.numel() for p in model.parameters())
    assert 22_000_000 < base_total < 23_000_000
    dm = get_dendritic_model(model, DendriteConfig(dendrite_seed=0))
    dm.add_dendrites(1)
    dm.eval()
    with torch.no_grad():
        assert torch.equal(dm(**batch).last_hidden_state, expected)
    summary = dm.dendrite_summary()
    assert len(summary.layers) == 36  # 6 layers x (q, k, v, attention out, intermediate, output)
    per_block = 4 * (384 * 384 + 2 * 384) + (1536 * 384 + 2 * 1536) + (384 * 1536 + 2 * 384)
    assert summary.base_params == base_total
    assert summary.dendrite_params == 6 * per_block


def test_plain_trainer_evaluates_a_dendritic_model_with_label_names(tmp_path):
    dm = get_dendritic_model(make_tiny("bert"))
    dm.add_dendrites()
    data = [{"input_ids": [1, 5, 7, 2], "attention_mask": [1, 1, 1, 1], "labels": i % 2} for i in range(8)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, label_names=["labels"], disable_tqdm=True)
    metrics = transformers.Trainer(model=dm, args=args, eval_dataset=data).evaluate()
    assert metrics["eval_loss"] > 0
