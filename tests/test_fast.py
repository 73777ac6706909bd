"""Fast kernels, inference fusion and compatibility (issue 7): bf16, autocast, torch.compile, gradient
checkpointing, device_map / accelerate offload."""

import copy
import itertools

import pytest
import torch
from conftest import make_tiny, tiny_inputs
from torch import nn
from transformers import AutoModel, BertConfig, BertForSequenceClassification, BertModel
from transformers.pytorch_utils import Conv1D

from hf_dendrites import DendriteConfig, get_dendritic_model
from hf_dendrites.layers import DENDRITIC_LAYER_CLASSES

ACTIVATIONS = ["tanh", "sigmoid", "relu", "gelu", "silu"]


def make_base(kind: str):
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(6, 5), torch.randn(3, 4, 6)
    if kind == "linear_nobias":
        return nn.Linear(6, 5, bias=False), torch.randn(3, 4, 6)
    if kind == "conv1D":
        return Conv1D(5, 6), torch.randn(3, 4, 6)
    if kind == "conv1d":
        return nn.Conv1d(3, 5, 3, padding=1), torch.randn(2, 3, 7)
    if kind == "conv2d":
        return nn.Conv2d(3, 5, 3, padding=1), torch.randn(2, 3, 5, 5)
    raise ValueError(kind)


def dendritic(kind: str, k: int = 3, randomize: bool = True, **config):
    base, x = make_base(kind)
    layer = DENDRITIC_LAYER_CLASSES[type(base)].from_base_layer(base, **config)
    layer.add_dendrites(k, generator=torch.Generator().manual_seed(1))
    if randomize:  # as after training: every dendrite term contributes
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for name in ("dendrite_out", "dendrite_cascade", "dendrite_bias"):
                p = getattr(layer, name)
                if p is not None:
                    p.copy_(torch.randn(p.shape, generator=g))
    return layer, x


def forward_backward(layer, x, fast: bool):
    layer.dendrite_fast_path = fast
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = layer(x)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(3)))
    grads = {n: p.grad for n, p in layer.named_parameters()}
    return out.detach(), x.grad, grads


# ---------------------------------------------------------------------------------------------- identity
@pytest.mark.parametrize(
    "kind,rank,cascade", list(itertools.product(["linear", "linear_nobias", "conv1D", "conv1d", "conv2d"], [None, 2], [False, True]))
)
def test_identity_at_insertion_bit_exact(kind, rank, cascade):
    base, x = make_base(kind)
    base.eval()
    with torch.no_grad():
        expected = base(x)
    layer = DENDRITIC_LAYER_CLASSES[type(base)].from_base_layer(base, rank=rank, cascade=cascade).eval()
    layer.add_dendrites(3)
    with torch.no_grad():
        assert torch.equal(layer(x), expected)  # no-grad path
    assert torch.equal(layer(x).detach(), expected)  # autograd (fast kernel) path
    assert torch.equal(layer(x.clone().requires_grad_()).detach(), expected)
    layer.dendrite_fast_path = False
    assert torch.equal(layer(x).detach(), expected)


# ---------------------------------------------------------------------------------------------- fast == reference
@pytest.mark.parametrize(
    "kind,rank,cascade,activation",
    [(k, r, c, "tanh") for k in ("linear", "conv1D", "conv1d", "conv2d") for r in (None, 2) for c in (False, True)]
    + [("linear", r, c, a) for a in ACTIVATIONS[1:] for r in (None, 2) for c in (False, True)],
)
def test_fast_path_matches_reference(kind, rank, cascade, activation):
    layer, x = dendritic(kind, rank=rank, cascade=cascade, activation=activation)
    out_f, gx_f, g_f = forward_backward(layer, x, fast=True)
    out_r, gx_r, g_r = forward_backward(layer, x, fast=False)
    torch.testing.assert_close(out_f, out_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_f, gx_r, rtol=1e-5, atol=1e-5)
    for name in g_r:
        torch.testing.assert_close(g_f[name], g_r[name], rtol=1e-4, atol=1e-4, msg=name)
    with torch.no_grad():  # the no-grad path as well
        torch.testing.assert_close(layer(x), out_r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv1D"])
@pytest.mark.parametrize(
    "frozen", [(), ("weight", "bias"), ("dendrite_weight", "dendrite_lora_A", "dendrite_lora_B", "dendrite_bias"), ("dendrite_out",)]
)
@pytest.mark.parametrize("detach_input", [False, True])
def test_fast_path_partial_gradients(kind, frozen, detach_input):
    for rank, cascade in [(None, True), (2, False)]:
        layer, x = dendritic(kind, rank=rank, cascade=cascade)
        layer.dendrite_detach_input = detach_input
        for name, p in layer.named_parameters():
            p.requires_grad_(name not in frozen)
        out_f, gx_f, g_f = forward_backward(layer, x, fast=True)
        out_r, gx_r, g_r = forward_backward(layer, x, fast=False)
        torch.testing.assert_close(out_f, out_r)
        torch.testing.assert_close(gx_f, gx_r, rtol=1e-5, atol=1e-5)
        for name in g_r:
            assert (g_f[name] is None) == (g_r[name] is None), name
            if g_r[name] is not None:
                torch.testing.assert_close(g_f[name], g_r[name], rtol=1e-4, atol=1e-4, msg=name)


def test_retain_graph_needs_reference_path():
    layer, x = dendritic("linear")
    out = layer(x.requires_grad_())
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="dendrite_fast_path = False"):
        out.sum().backward()
    layer.dendrite_fast_path = False
    out = layer(x)
    out.sum().backward(retain_graph=True)
    out.sum().backward()


def test_fast_path_saves_only_input_and_activations():
    """Autograd keeps the input, the parameters and the dendrite activations a [tokens, K, N]: nothing else."""
    layer, x = dendritic("linear", k=2)
    x = x.requires_grad_()
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    extra = {t.untyped_storage().data_ptr(): t for t in saved if t.untyped_storage().data_ptr() not in params}
    shapes = sorted(tuple(t.shape) for t in extra.values())
    assert shapes == sorted([(12, 6), (12, 2, 5)]), shapes  # x (viewed 2-D) and a
    assert x.untyped_storage().data_ptr() in extra  # a view of x, not a copy


# ---------------------------------------------------------------------------------------------- fusion
@pytest.mark.parametrize("kind,rank,cascade", list(itertools.product(["linear", "conv1D", "conv1d", "conv2d"], [None, 2], [False, True])))
def test_fused_layer_matches_unfused(kind, rank, cascade):
    layer, x = dendritic(kind, rank=rank, cascade=cascade)
    with torch.no_grad():
        expected = layer(x)
        layer.fuse()
        assert layer.is_fused
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        layer.unfuse()
        assert not layer.is_fused
        assert torch.equal(layer(x), expected)


def test_fused_layer_refuses_gradients_and_refreshes():
    layer, x = dendritic("linear")
    layer.fuse()
    with pytest.raises(RuntimeError, match="fused for inference"):
        layer(x)
    with torch.no_grad():
        before = layer(x)
        layer.dendrite_out.mul_(2)  # an in-place update (optimizer step, load_state_dict) refreshes the fused weight
        layer.weight.add_(0.5)
        after = layer(x)
    layer.unfuse()
    with torch.no_grad():
        torch.testing.assert_close(after, layer(x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, after)
    layer.fuse()
    layer.add_dendrites(1)  # growth unfuses
    assert not layer.is_fused
    layer(x).sum().backward()  # and training works again


def test_fused_model_state_dict_and_outputs():
    model = make_tiny("bert")
    inputs = tiny_inputs("bert")
    dm = get_dendritic_model(model, DendriteConfig(target_modules="all-linear", dendrite_seed=0))
    dm.add_dendrites(2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in dm.dendritic_layers():
            layer.dendrite_out.normal_(generator=g)
    keys = list(dm.state_dict())
    with torch.no_grad():
        expected = dm(**inputs).logits
    assert dm.fuse_for_inference() is dm and dm.is_fused
    assert list(dm.state_dict()) == keys  # names and state dict unchanged: saving works while fused
    assert not any("fused" in name for name, _ in dm.named_buffers())
    with torch.inference_mode():
        torch.testing.assert_close(dm(**inputs).logits, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError, match="unfuse"):
        dm(**inputs).logits.sum().backward()
    dm.unfuse()
    assert not dm.is_fused
    dm(**inputs).logits.sum().backward()
    dm.fuse_for_inference()
    dm.add_dendrites(1)  # growth unfuses every layer
    assert not dm.is_fused


# ---------------------------------------------------------------------------------------------- bf16
def test_bf16_model_forward_backward():
    model = make_tiny("bert").to(torch.bfloat16)
    inputs = tiny_inputs("bert")
    with torch.no_grad():
        expected = model(**inputs).logits
    dm = get_dendritic_model(model, DendriteConfig(target_modules="all-linear"))
    dm.add_dendrites(2)
    assert all(p.dtype == torch.bfloat16 for p in dm.dendrite_parameters())
    dm.eval()
    with torch.no_grad():
        assert torch.equal(dm(**inputs).logits, expected)
    dm.train()
    loss = dm(**inputs, labels=torch.tensor([0, 1])).loss
    assert loss.dtype == torch.bfloat16
    loss.backward()
    grads = [p.grad for p in dm.dendrite_parameters()]
    assert all(g is not None and g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("kind,rank", [("linear", None), ("linear", 2), ("conv1D", None), ("conv1D", 2), ("conv1d", None)])
def test_bf16_autocast(kind, rank):
    base, x = make_base(kind)
    plain = copy.deepcopy(base)
    layer = DENDRITIC_LAYER_CLASSES[type(base)].from_base_layer(base, rank=rank)
    layer.add_dendrites(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = plain(x)
        out = layer(x.requires_grad_())
    assert out.dtype == expected.dtype == torch.bfloat16
    assert torch.equal(out, expected)  # identity at insertion holds under autocast too
    with torch.no_grad():
        layer.dendrite_out.normal_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        with torch.no_grad():
            ref = layer.base_class.forward(layer, x) + layer.dendrite_output(x)
    torch.testing.assert_close(out.float(), ref.float(), rtol=0.05, atol=0.05)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        layer.fuse()
        fused = layer(x)
        layer.unfuse()
    assert fused.dtype == torch.bfloat16
    torch.testing.assert_close(fused.float(), ref.float(), rtol=0.05, atol=0.05)
    out.float().sum().backward()
    for p in layer.parameters():  # master weights stay float32, so do their gradients
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()


# ---------------------------------------------------------------------------------------------- torch.compile
def _compile_layer():
    layer, x = dendritic("linear", k=2, cascade=True)
    layer.fuse()  # compile ignores fusion and must not break on it
    return layer, x.requires_grad_()


def test_compile_no_graph_breaks():
    torch._dynamo.reset()
    layer, x = _compile_layer()
    explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    layer, x = _compile_layer()
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    out = compiled(x)
    out.sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.unfuse()
    layer.zero_grad(set_to_none=True)
    ref = layer(x)
    ref.sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for name, p in layer.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------- checkpointing
def _bert_no_dropout():
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(cfg)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_same_grads(use_reentrant):
    inputs = {**tiny_inputs("bert"), "labels": torch.tensor([0, 1])}
    grads = []
    for checkpointing in (False, True):
        dm = get_dendritic_model(_bert_no_dropout(), DendriteConfig(target_modules="all-linear", dendrite_seed=0))
        dm.add_dendrites(2)
        with torch.no_grad():
            for _, layer in dm.dendritic_layers():
                layer.dendrite_out.fill_(0.1)
        if checkpointing:
            dm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
            assert dm.is_gradient_checkpointing
        dm.train()
        dm(**inputs).loss.backward()
        grads.append({n: p.grad for n, p in dm.named_parameters()})
    for name, g in grads[0].items():
        assert g is not None and grads[1][name] is not None, name
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------- device_map / offload
def _tiny_bert_dir(tmp_path):
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24, max_position_embeddings=32)).eval()
    model.save_pretrained(tmp_path / "tiny")
    return str(tmp_path / "tiny"), model


def _check_dendrites_on(model, expected, ids):
    dm = get_dendritic_model(model, DendriteConfig(target_modules="all-linear", dendrite_seed=0))
    with torch.no_grad():
        assert torch.equal(dm(input_ids=ids).last_hidden_state, expected)
        dm.add_dendrites(2)
        assert torch.equal(dm(input_ids=ids).last_hidden_state, expected)
        for _, layer in dm.dendritic_layers():
            assert all(p.device.type == "cpu" for p in layer.dendrite_parameters())
            layer.dendrite_out.fill_(0.1)
        changed = dm(input_ids=ids).last_hidden_state
        assert not torch.allclose(changed, expected)  # the dendrites do take part
        dm.fuse_for_inference()
        torch.testing.assert_close(dm(input_ids=ids).last_hidden_state, changed, rtol=1e-5, atol=1e-5)
        dm.unfuse()
    return dm


@pytest.mark.parametrize("device_map", ["cpu", {"": "cpu"}])
def test_device_map_loaded_model(tmp_path, device_map):
    path, plain = _tiny_bert_dir(tmp_path)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = plain(input_ids=ids).last_hidden_state
    model = AutoModel.from_pretrained(path, device_map=device_map).eval()
    _check_dendrites_on(model, expected, ids)


def test_accelerate_offloaded_model(tmp_path):
    """Layers whose weights accelerate offloads (to CPU RAM or disk, loaded for each forward pass) get dendrites
    that stay on the execution device."""
    path, plain = _tiny_bert_dir(tmp_path)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = plain(input_ids=ids).last_hidden_state
    device_map = {"embeddings": "cpu", "encoder.layer.0": "disk", "encoder.layer.1": "cpu", "pooler": "cpu"}
    model = AutoModel.from_pretrained(path, device_map=device_map, offload_folder=str(tmp_path / "offload")).eval()
    query = model.encoder.layer[0].attention.self.query
    assert query.weight.device.type == "meta" and getattr(query, "_hf_hook").offload
    dm = _check_dendrites_on(model, expected, ids)
    query = dm.model.encoder.layer[0].attention.self.query
    assert query.weight.device.type == "meta"  # still offloaded between forward passes
    assert query.dendrite_weight.device.type == "cpu"


def test_cpu_offload_and_unload():
    """Hooks moved to dendritic layers and back keep the devices accelerate recorded at dispatch."""
    from accelerate import cpu_offload
    from accelerate.hooks import remove_hook_from_module

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24)).eval()
    ids = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids).last_hidden_state
    dm = _check_dendrites_on(cpu_offload(model, execution_device="cpu"), expected, ids)
    plain = dm.unload()
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).last_hidden_state, expected)
    query = plain.encoder.layer[0].attention.self.query
    assert type(query) is nn.Linear and query.weight.device.type == "meta"
    remove_hook_from_module(plain, recurse=True)
    assert all(p.device.type == "cpu" for p in plain.parameters())
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).last_hidden_state, expected)
