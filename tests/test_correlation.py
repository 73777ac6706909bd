"""The correlation (Cascade-Correlation) learning rule on tasks whose remaining error is known."""

import pytest
import torch
from torch import nn

from hf_dendrites import DendriteConfig, get_dendritic_model
from hf_dendrites.learning_rules import CorrelationRule, perforate

IN, OUT = 8, 4


def make_task(n=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN, generator=g)
    A = torch.randn(OUT, IN, generator=g) * 0.5
    B = torch.randn(OUT, IN, generator=g)
    # the part a linear layer cannot fit: a known nonlinear function of the input
    t = x @ A.T + torch.tanh(2.0 * x @ B.T)
    return x, t


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(IN, OUT)

    def forward(self, x):
        return self.fc(x)


def train(params, step_fn, steps, lr=0.05):
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = step_fn()
        loss.backward()
        opt.step()
    return loss.item()


def mean_abs_corr(a, e):
    """Mean over neurons of |Pearson correlation| between a [T, N] and e [T, N]."""
    a = a - a.mean(0)
    e = e - e.mean(0)
    return ((a * e).sum(0) / (a.norm(dim=0) * e.norm(dim=0) + 1e-12)).abs().mean().item()


def fitted_model(activation="tanh", cascade=False, seed=0):
    torch.manual_seed(seed)
    x, t = make_task()
    dm = get_dendritic_model(Net(), DendriteConfig(target_modules=["fc"], activation=activation, cascade=cascade, dendrite_seed=seed))
    neuron_loss = train(dm.parameters(), lambda: (dm(x) - t).pow(2).mean(), 400)
    dm.zero_grad(set_to_none=True)
    return dm, x, t, neuron_loss


def errors(dm, x, t):
    """e = dLoss/dy at the layer output."""
    y = dm(x).detach().requires_grad_()
    ((y - t).pow(2).mean()).backward()
    return y.grad


@pytest.mark.parametrize("normalize", [False, True])
def test_trained_candidates_correlate_with_the_error_and_installing_them_lowers_the_loss(normalize):
    dm, x, t, neuron_loss = fitted_model()
    rule = CorrelationRule(dm, pool_size=4, normalize=normalize, learning_rate=0.05, generator=torch.Generator().manual_seed(0))
    rule.start()
    layer = dm.model.fc
    pool = rule.pools["fc"]
    e = errors(dm, x, t)  # neurons are frozen now: only the candidates learn
    with torch.no_grad():
        before = max(mean_abs_corr(pool.activations(layer, x)[:, p], e) for p in range(4))
    for _ in range(200):
        (dm(x) - t).pow(2).mean().backward()
        rule.accumulate()
        rule.step()
    assert all(p.grad is None for p in dm.parameters())  # the network itself did not train
    with torch.no_grad():
        after = max(mean_abs_corr(pool.activations(layer, x)[:, p], e) for p in range(4))
    assert after > 0.3 and after > 5 * before, (before, after)
    assert rule.history[-1] > rule.history[0]

    with torch.no_grad():
        reference = dm(x)
    rule.install(1)
    with torch.no_grad():
        assert torch.equal(dm(x), reference)  # identity at insertion
    assert layer.num_dendrites == 1 and not layer.dendrite_weight.requires_grad and layer.dendrite_out.requires_grad
    trainable = [p for p in dm.parameters() if p.requires_grad]
    final = train(trainable, lambda: (dm(x) - t).pow(2).mean(), 300)
    assert final < 0.6 * neuron_loss, (neuron_loss, final)


def test_statistics_are_exact_under_gradient_accumulation():
    """Four micro-batches accumulated give the same step as the whole batch at once."""
    results = []
    for chunks in (1, 4):
        dm, x, t, _ = fitted_model()
        rule = CorrelationRule(dm, pool_size=3, generator=torch.Generator().manual_seed(1))
        rule.start()
        for part_x, part_t in zip(x.chunk(chunks), t.chunk(chunks)):
            # scale as an accumulating trainer does: mean loss per micro-batch / chunks
            ((dm(part_x) - part_t).pow(2).mean() / chunks).backward()
            rule.accumulate()
        s = rule.step()
        results.append((s, {k: v.detach().clone() for k, v in rule.pools["fc"].state_dict().items()}))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    for k in results[0][1]:
        torch.testing.assert_close(results[0][1][k], results[1][1][k], rtol=1e-5, atol=1e-6)


def test_exact_gradient_matches_autograd_of_S():
    """The row-wise recombination equals autograd of S computed on the whole batch."""
    for normalize in (False, True):
        dm, x, t, _ = fitted_model(cascade=False)
        rule = CorrelationRule(dm, pool_size=2, normalize=normalize, generator=torch.Generator().manual_seed(2))
        rule.start()
        pool, layer = rule.pools["fc"], dm.model.fc
        e = errors(dm, x, t)
        a = pool.activations(layer, x)  # [T, P, N]
        ac, ec = a - a.mean(0), (e - e.mean(0))[:, None, :]
        cov = (ac * ec).sum(0)
        if normalize:
            S = (cov / (ac.pow(2).sum(0) * ec.pow(2).sum(0)).sqrt()).abs().sum()
        else:
            S = cov.abs().sum() / x.shape[0]
        expected = torch.autograd.grad(S, [pool.weight, pool.bias])
        (dm(x) - t).pow(2).mean().backward()
        rule.accumulate()
        st = rule.stats["fc"]
        _, scales = rule._scores_and_scales(st)
        for p, name, exp in zip((pool.weight, pool.bias), ("weight", "bias"), expected):
            got = sum(pool.row_scale(name, layer, sc) * st.grads[(kind, name)] for kind, sc in scales.items())
            torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-6)


def test_cascade_candidates_install_with_their_cascade_weights():
    dm, x, t, _ = fitted_model(cascade=True)
    dm.add_dendrites(1)
    rule = CorrelationRule(dm, pool_size=2, generator=torch.Generator().manual_seed(3))
    rule.start()
    assert rule.pools["fc"].cascade.shape == (2, 1, OUT)
    for _ in range(5):
        (dm(x) - t).pow(2).mean().backward()
        rule.accumulate()
        rule.step()
    cascade = rule.pools["fc"].cascade.detach().clone()
    picks = rule.install(1)["fc"]
    layer = dm.model.fc
    assert layer.num_dendrites == 2
    torch.testing.assert_close(layer.dendrite_cascade[0], cascade[picks[0], 0])


def test_perforation_stops_gradients_through_dendrites():
    """With a loss linear in the dendritic layer's output (so dLoss/dy is the same with or without dendrites), the
    layers before a perforated dendritic layer get exactly the gradient of the model without dendrites."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    x, c = torch.randn(16, 5), torch.randn(16, 3)

    def first_layer_grad(model):
        model.zero_grad()
        (model(x) * c).sum().backward()
        return model[0].weight.grad.clone()

    plain = first_layer_grad(net)
    dm = get_dendritic_model(net, DendriteConfig(target_modules=["2"], dendrite_seed=0))
    dm.add_dendrites(2)
    layer = dm.model[2]
    with torch.no_grad():
        layer.dendrite_out.normal_()
    assert not torch.allclose(first_layer_grad(dm.model), plain)  # unperforated: error flows through dendrites
    perforate(layer)
    assert not layer.dendrite_weight.requires_grad and not layer.dendrite_bias.requires_grad
    assert layer.dendrite_out.requires_grad
    torch.testing.assert_close(first_layer_grad(dm.model), plain, rtol=1e-6, atol=1e-7)
    dm.zero_grad()
    (dm(x) * c).sum().backward()
    assert layer.dendrite_out.grad.abs().sum() > 0 and layer.dendrite_weight.grad is None


def test_low_rank_is_rejected():
    dm = get_dendritic_model(Net(), DendriteConfig(target_modules=["fc"], rank=2))
    with pytest.raises(NotImplementedError, match="rank=None"):
        CorrelationRule(dm).start()
