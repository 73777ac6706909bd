"""Layer kinds as an extension point: a kind registered for a user's own module (docs/dendritic_layer.md)."""

import pytest
import torch
import torch.nn.functional as F
import transformers
from dendritic_task import ScriptedMetric, make_args, state_of, task_data
from test_trainer import decisions
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from hf_dendrites import (
    DendriteConfig,
    DendriticLayerMixin,
    DendriticModel,
    DendriticTrainer,
    get_dendritic_model,
    layer_kinds,
    register_layer_kind,
)
from hf_dendrites.layers import DendriticLinear, dendritic_class_for, unsupported_reason


class ScaledLinear(nn.Module):
    """y = scale * x W^T: a linear map with a fixed output scale, not an nn.Linear."""

    def __init__(self, in_features: int, out_features: int, scale: float = 0.5):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / in_features**0.5)
        self.scale = scale

    def forward(self, x):
        return self.scale * F.linear(x, self.weight)


class DendriticScaledLinear(DendriticLayerMixin):
    """The kind of `ScaledLinear`: each dendrite is a plain linear map (with a bias) of the layer's input."""

    def _apply_kind(self, x, weight, bias):
        return F.linear(x, weight, bias)

    def _weight_shape(self, n_out):
        return (n_out, self.weight.shape[1])

    @property
    def num_neurons(self):
        return self.weight.shape[0]

    @property
    def fan_in(self):
        return self.weight.shape[1]


register_layer_kind(ScaledLinear, DendriticScaledLinear)


class ScaledConfig(transformers.PretrainedConfig):
    model_type = "scaled_mlp_test"

    def __init__(self, vocab_size=24, hidden_size=16, num_labels=2, **kwargs):
        super().__init__(num_labels=num_labels, **kwargs)
        self.vocab_size, self.hidden_size = vocab_size, hidden_size


class ScaledMLP(transformers.PreTrainedModel):
    """A tiny classifier (tokens of dendritic_task.task_data) whose MLP is made of `ScaledLinear` layers."""

    config_class = ScaledConfig

    def __init__(self, config):
        super().__init__(config)
        h = config.hidden_size
        self.embed = nn.Embedding(config.vocab_size, h)
        self.up = ScaledLinear(h, 2 * h)
        self.down = ScaledLinear(2 * h, h)
        self.classifier = nn.Linear(h, config.num_labels)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, labels=None):
        h = self.embed(input_ids).mean(1)
        h = h + self.down(torch.tanh(self.up(h)))
        logits = self.classifier(h)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def scaled_mlp(seed=0):
    torch.manual_seed(seed)
    return ScaledMLP(ScaledConfig()).eval()


IDS = torch.randint(0, 24, (4, 8), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_a_registered_kind_converts_grows_and_reloads_exactly(tmp_path):
    assert any(kind.module_class is ScaledLinear for kind in layer_kinds())
    model = scaled_mlp()
    expected = logits(model)
    weight = model.up.weight
    dm = get_dendritic_model(model, DendriteConfig(target_modules=["up", "down"], dendrite_seed=0))
    assert isinstance(dm.model.up, ScaledLinear) and isinstance(dm.model.up, DendriticLayerMixin)
    assert dm.model.up.weight is weight and type(dm.model.up).__name__ == "DendriticScaledLinear"
    dm.add_dendrites(2)
    assert torch.equal(logits(dm), expected)  # identity at insertion, bit for bit
    assert dm.model.up.dendrite_weight.shape == (2 * 32, 16) and dm.model.down.dendrite_out.shape == (2, 16)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in dm.dendrite_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    # what the layer computes: scale * x W^T plus sum_k w_k tanh(D_k x + b_k)
    x = torch.randn(3, 16)
    up = dm.model.up
    z = F.linear(x, up.dendrite_weight, up.dendrite_bias).view(3, 2, 32)
    manual = 0.5 * F.linear(x, up.weight) + (torch.tanh(z) * up.dendrite_out).sum(1)
    with torch.no_grad():
        assert torch.allclose(up(x), manual, atol=1e-6)
    grown = logits(dm)
    assert not torch.equal(grown, expected)
    dm.model(input_ids=IDS, labels=torch.zeros(4, dtype=torch.long)).loss.backward()
    assert all(p.grad is not None for p in dm.dendrite_parameters())
    summary = dm.dendrite_summary()
    assert {layer.kind for layer in summary.layers} == {"ScaledLinear"}
    assert summary.dendrite_params == 2 * (32 * 16 + 2 * 32) + 2 * (16 * 32 + 2 * 16)
    assert set(dm.dendrite_weight_ratios()) == {"up", "down"}

    # fusion does not apply to a kind that does not say its forward is `_apply_kind(x, weight, bias)`
    dm.fuse_for_inference()
    assert not dm.is_fused and torch.equal(logits(dm), grown)

    dm.save_pretrained(str(tmp_path / "saved"))
    loaded = DendriticModel.from_pretrained(str(tmp_path / "saved"), model_class=ScaledMLP)
    assert torch.equal(logits(loaded.eval()), grown)
    assert loaded.dendrite_counts() == {"up": 2, "down": 2}
    loaded.set_dendrite_counts(1)
    assert loaded.model.up.dendrite_weight.shape == (32, 16)
    assert loaded.unload().up.__class__ is ScaledLinear


def test_kind_matching_rules():
    class SameLinear(nn.Linear):  # computes what nn.Linear computes: matched, still a SameLinear once converted
        pass

    class OtherLinear(nn.Linear):  # overrides forward: may compute another function, so not matched
        def forward(self, x):
            return super().forward(x) * 2

    same = dendritic_class_for(SameLinear(3, 4))
    assert issubclass(same, DendriticLinear) and issubclass(same, SameLinear) and same.base_class is SameLinear
    layer = same.from_base_layer(SameLinear(3, 4))
    layer.add_dendrites(1)
    x = torch.randn(2, 3)
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    assert type(layer.to_base_layer()) is SameLinear
    assert dendritic_class_for(OtherLinear(3, 4)) is None
    assert "overrides `forward`" in unsupported_reason(OtherLinear(3, 4)) and "register_layer_kind" in unsupported_reason(OtherLinear(3, 4))
    with pytest.raises(TypeError, match="must subclass hf_dendrites.DendriticLayerMixin"):
        register_layer_kind(OtherLinear, nn.Linear)
    with pytest.raises(TypeError, match="nn.Module subclass"):
        register_layer_kind(int, DendriticScaledLinear)


def test_a_registered_kind_grows_under_dendritic_trainer(tmp_path):
    trainer = DendriticTrainer(
        scaled_mlp(),
        make_args(str(tmp_path), metric_for_best_model="scripted", greater_is_better=False, max_dendrite_cycles=1),
        train_dataset=task_data(128, 1),
        eval_dataset=task_data(64, 2),
        dendrite_config=DendriteConfig(target_modules=["up", "down"], dendrite_seed=0),
        compute_metrics=ScriptedMetric([1.0, 1.0, 1.0, 0.9, 0.9, 0.9]),
    )
    before = state_of(trainer.model)
    trainer.train()
    assert [a for _, a in decisions(trainer) if a != "continue"] == ["grow", "complete"]
    assert trainer.model.dendrite_counts() == {"up": 1, "down": 1}
    after = state_of(trainer.model)
    assert not torch.equal(after["model.up.dendrite_out"], torch.zeros_like(after["model.up.dendrite_out"]))
    assert not torch.equal(after["model.up.weight"], before["model.up.weight"])
