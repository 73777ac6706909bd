"""Each dendritic layer kind against a plain-loop reference of docs/dendritic_layer.md."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_dendrites.layers import (
    DENDRITE_PARAM_NAMES,
    DendriticConv1D,
    DendriticConv1d,
    DendriticConv2d,
    DendriticLinear,
    dendritic_class_for,
    unsupported_reason,
)

PHI = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": F.relu, "gelu": F.gelu, "silu": F.silu}


def make_layer(kind: str, dtype=torch.float32):
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(6, 5).to(dtype), torch.randn(3, 4, 6).to(dtype)
    if kind == "conv1D":
        return Conv1D(5, 6).to(dtype), torch.randn(3, 4, 6).to(dtype)
    if kind == "conv1d":
        return nn.Conv1d(4, 5, 3, padding=1).to(dtype), torch.randn(2, 4, 7).to(dtype)
    if kind == "conv2d":
        return nn.Conv2d(3, 5, 3, stride=2, padding=1).to(dtype), torch.randn(2, 3, 8, 8).to(dtype)
    raise ValueError(kind)


KINDS = ["linear", "conv1D", "conv1d", "conv2d"]


def convert(base, **kwargs):
    return dendritic_class_for(base).from_base_layer(base, **kwargs)


def dendrite_k_weight(layer, k):
    """The weight of dendrite k as a layer of the same kind would hold it."""
    N = layer.num_neurons
    if layer.dendrite_rank is None:
        w = layer.dendrite_weight
        return w[:, k * N : (k + 1) * N] if isinstance(layer, DendriticConv1D) else w[k * N : (k + 1) * N]
    r = layer.dendrite_rank
    A, B = layer.dendrite_lora_A, layer.dendrite_lora_B[k]
    if isinstance(layer, DendriticConv1D):
        return A[:, k * r : (k + 1) * r] @ B.T
    A_k = A[k * r : (k + 1) * r]
    return (B @ A_k.flatten(1)).view(N, *A_k.shape[1:])


def reference_forward(layer, x):
    """Plain loop over dendrites, one separate op per dendrite (the definition, not the fast path)."""
    base = layer.to_base_layer()
    y = base(x)
    N, ch = layer.num_neurons, (1 if layer.neuron_dim == 1 else -1)
    acts = []
    for k in range(layer.num_dendrites):
        b_k = layer.dendrite_bias[k * N : (k + 1) * N]
        w_k = dendrite_k_weight(layer, k)
        if isinstance(layer, DendriticLinear):
            z = F.linear(x, w_k, b_k)
        elif isinstance(layer, DendriticConv1D):
            z = x @ w_k + b_k
        else:
            z = layer._conv_forward(x, w_k, b_k)
        shape = [1] * z.dim()
        shape[ch] = N
        for j in range(k):
            if layer.dendrite_cascade_enabled:
                z = z + layer.dendrite_cascade[k * (k - 1) // 2 + j].view(shape) * acts[j]
        acts.append(PHI[layer.dendrite_activation](z))
        y = y + layer.dendrite_out[k].view(shape) * acts[k]
    return y


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rank", [None, 2])
@pytest.mark.parametrize("cascade", [False, True])
def test_identity_at_insertion_is_bit_exact(kind, rank, cascade):
    base, x = make_layer(kind)
    with torch.no_grad():
        expected = base(x)
    layer = convert(base, rank=rank, cascade=cascade)
    with torch.no_grad():
        assert torch.equal(layer(x), expected)
        layer.add_dendrites(2)
        assert torch.equal(layer(x), expected)
        layer.add_dendrites(1)
        assert torch.equal(layer(x), expected)


def grown_layer(base, **kwargs):
    """`base` converted with two growths (2 + 1 dendrites) whose output, bias and cascade weights are non-zero, so
    that every term matters."""
    layer = convert(base, **kwargs)
    layer.add_dendrites(2)
    layer.add_dendrites(1)
    with torch.no_grad():
        for p in (layer.dendrite_out, layer.dendrite_bias) + ((layer.dendrite_cascade,) if layer.dendrite_cascade_enabled else ()):
            p.normal_()
    return layer


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rank", [None, 3])
@pytest.mark.parametrize("cascade", [False, True])
@pytest.mark.parametrize("activation", ["tanh", "relu", "sigmoid", "gelu"])
def test_matches_per_dendrite_reference(kind, rank, cascade, activation):
    base, x = make_layer(kind)
    layer = grown_layer(base, rank=rank, cascade=cascade, activation=activation)
    torch.testing.assert_close(layer(x), reference_forward(layer, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_base_parameters_keep_objects_and_names(kind):
    base, _ = make_layer(kind)
    before = dict(base.named_parameters())
    layer = convert(base)
    layer.add_dendrites(3)
    params = dict(layer.named_parameters())
    for name, p in before.items():
        assert params[name] is p
    assert isinstance(layer, type(base))
    assert set(params) - set(before) == {"dendrite_weight", "dendrite_bias", "dendrite_out"}
    # one stacked weight for all dendrites, in the layer kind's own layout
    N = layer.num_neurons
    expected = {
        "linear": (3 * N, 6),
        "conv1D": (6, 3 * N),
        "conv1d": (3 * N, 4, 3),
        "conv2d": (3 * N, 3, 3, 3),
    }[kind]
    assert tuple(layer.dendrite_weight.shape) == expected
    assert layer.expected_dendrite_shapes(3) == {n: tuple(getattr(layer, n).shape) for n in layer.expected_dendrite_shapes(3)}


def test_zero_dendrites_keep_the_plain_state_dict_and_unload_restores_the_class():
    base, x = make_layer("linear")
    keys = set(base.state_dict())
    layer = convert(base)
    assert set(layer.state_dict()) == keys
    layer.add_dendrites(2)
    plain = layer.to_base_layer()
    assert type(plain) is nn.Linear and set(plain.state_dict()) == keys
    assert plain.weight is base.weight
    assert torch.equal(plain(x), base(x))


def test_growth_keeps_existing_dendrites_and_cascade_rows():
    base, x = make_layer("linear")
    layer = convert(base, cascade=True)
    layer.add_dendrites(2)
    with torch.no_grad():
        layer.dendrite_cascade.fill_(0.5)
        layer.dendrite_out.fill_(0.25)
    old = {n: getattr(layer, n).detach().clone() for n in ("dendrite_weight", "dendrite_out", "dendrite_cascade")}
    layer.add_dendrites(2)
    assert layer.dendrite_cascade.shape == (6, 5)  # K=4: 4*3/2 pairs
    assert torch.equal(layer.dendrite_cascade[:1], old["dendrite_cascade"])
    assert torch.equal(layer.dendrite_cascade[1:], torch.zeros(5, 5))
    assert torch.equal(layer.dendrite_weight[:10], old["dendrite_weight"])
    assert torch.equal(layer.dendrite_out[:2], old["dendrite_out"])
    assert torch.equal(layer.dendrite_out[2:], torch.zeros(2, 5))
    layer.truncate_dendrites(2)
    for n, v in old.items():
        assert torch.equal(getattr(layer, n), v)
    layer.truncate_dendrites(0)
    assert layer.num_dendrites == 0 and all(getattr(layer, n) is None for n in DENDRITE_PARAM_NAMES)
    with pytest.raises(ValueError, match="Cannot keep 3"):
        layer.truncate_dendrites(3)


def test_init_scale_sets_the_spread_of_dendrite_weights():
    layer = convert(nn.Linear(400, 50), init_scale=2.0)
    layer.add_dendrites(4)
    std = layer.dendrite_weight.std().item()
    assert abs(std - 2.0 / math.sqrt(400)) < 0.01
    assert torch.count_nonzero(layer.dendrite_bias) == 0 and torch.count_nonzero(layer.dendrite_out) == 0


def test_seeded_growth_is_reproducible():
    a, b = convert(nn.Linear(6, 5)), convert(nn.Linear(6, 5))
    a.add_dendrites(2, generator=torch.Generator().manual_seed(1))
    b.add_dendrites(2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.dendrite_weight, b.dendrite_weight)


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_parameters_follow_the_wrapped_weight(kind):
    base, x = make_layer(kind, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = base(x)
    layer = convert(base, rank=None)
    layer.add_dendrites(2)
    assert all(p.dtype == torch.bfloat16 for p in layer.parameters())
    with torch.no_grad():
        assert torch.equal(layer(x), expected)
    layer(x).float().sum().backward()
    assert layer.dendrite_out.grad.dtype == torch.bfloat16


def test_meta_device_layers_grow_on_meta():
    with torch.device("meta"):
        base = nn.Linear(6, 5)
    layer = convert(base)
    layer.add_dendrites(2)
    assert layer.dendrite_weight.device.type == "meta" and layer.dendrite_weight.shape == (10, 6)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_base_and_dendrites(kind):
    base, x = make_layer(kind)
    layer = convert(base)
    layer.add_dendrites(2)
    layer(x).pow(2).sum().backward()
    # With dendrite-to-neuron weights at zero, the first gradient reaches those weights (dL/dw = a * dL/dy) and
    # the base weights, but not the dendrites' input weights or biases (their path is multiplied by w = 0).
    assert layer.weight.grad.abs().sum() > 0
    assert layer.dendrite_out.grad.abs().sum() > 0
    assert torch.count_nonzero(layer.dendrite_weight.grad) == 0
    assert torch.count_nonzero(layer.dendrite_bias.grad) == 0
    # After one step on w, gradients reach the dendrites' input side too.
    with torch.no_grad():
        layer.dendrite_out -= 0.1 * layer.dendrite_out.grad
    layer.zero_grad()
    layer(x).pow(2).sum().backward()
    assert layer.dendrite_weight.grad.abs().sum() > 0 and layer.dendrite_bias.grad.abs().sum() > 0


def test_unsupported_kinds_are_named():
    assert "not a supported layer kind" in unsupported_reason(nn.Embedding(5, 3))
    assert "not a supported layer kind" in unsupported_reason(nn.MultiheadAttention(8, 2).out_proj)
    assert "grouped" in unsupported_reason(nn.Conv2d(4, 4, 3, groups=2))
    layer = convert(nn.Linear(3, 3))
    assert "already a dendritic layer" in unsupported_reason(layer)
    with pytest.raises(TypeError, match="wraps Linear"):
        DendriticLinear.from_base_layer(nn.Conv1d(2, 2, 1))
    assert {DendriticConv1d, DendriticConv2d} <= {dendritic_class_for(nn.Conv1d(1, 1, 1)), dendritic_class_for(nn.Conv2d(1, 1, 1))}


def test_repr_shows_the_dendrite_count():
    layer = convert(nn.Linear(6, 5), activation="relu", rank=2)
    layer.add_dendrites(3)
    assert "dendrites=3" in repr(layer) and "rank=2" in repr(layer)
    c = convert(Conv1D(5, 6))
    c.add_dendrites(1)
    assert "dendrites=1" in repr(c)


def without_dendrites(layer, off):
    """A copy of `layer` whose dendrites `off` are gone from the output: their output weights and their cascade
    weights into later dendrites are zero (the definition of switching them off)."""
    ref = copy.deepcopy(layer)
    ref.enable_dendrites()
    ref.unfuse()
    with torch.no_grad():
        for j in off:
            ref.dendrite_out[j].zero_()
            for k in range(j + 1, ref.num_dendrites if ref.dendrite_cascade_enabled else 0):
                ref.dendrite_cascade[k * (k - 1) // 2 + j].zero_()
    return ref


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rank", [None, 2])
@pytest.mark.parametrize("cascade", [False, True])
@pytest.mark.parametrize("mode", ["grad", "no_grad", "fused", "reference"])
def test_switched_off_dendrites_leave_the_output_and_switching_on_is_bit_exact(kind, rank, cascade, mode):
    base, x = make_layer(kind)
    with torch.no_grad():
        plain = base(x)
    layer = grown_layer(base, rank=rank, cascade=cascade)
    params = {n: p.detach().clone() for n, p in layer.named_parameters()}
    if mode == "reference":
        layer.dendrite_fast_path = False
    if mode == "fused":
        layer.fuse()

    def run():
        with torch.enable_grad() if mode == "grad" else torch.no_grad():
            return layer(x)

    before = run().detach()
    for off in ([0], [1, 2], [0, 2], [0, 1, 2]):
        layer.disable_dendrites(off)
        assert layer.disabled_dendrites == tuple(off)
        out = run()
        torch.testing.assert_close(out.detach(), reference_forward(without_dendrites(layer, off), x), rtol=1e-5, atol=1e-5)
        if len(off) == 3 and mode != "fused":  # all off: exactly the plain layer (fused: one concatenated matmul)
            assert torch.equal(out.detach(), plain)
        if mode == "grad":
            layer.zero_grad()
            out.square().sum().backward()
            grads = layer.dendrite_out.grad.abs().sum(-1)
            assert all(grads[k] == 0 for k in off) and all(grads[k] > 0 for k in range(3) if k not in off)
        layer.enable_dendrites()
        assert layer.disabled_dendrites == ()
        assert torch.equal(run().detach(), before)
    assert all(torch.equal(p, params[n]) for n, p in layer.named_parameters())  # nothing was written


def test_switched_off_dendrites_stay_off_through_growth_and_truncation():
    base, x = make_layer("linear")
    layer = convert(base)
    layer.add_dendrites(2)
    with torch.no_grad():
        layer.dendrite_out.normal_()
    layer.disable_dendrites([1])
    layer.add_dendrites(1)  # the new dendrite is on
    assert layer.disabled_dendrites == (1,)
    layer.truncate_dendrites(1)
    assert layer.disabled_dendrites == ()
    with pytest.raises(ValueError, match=">= 0"):
        layer.disable_dendrites([-1])
    assert "_dendrites_off" not in layer.to_base_layer().__dict__
