"""Learning rules for new dendrites.

``gd``: new dendrites are ordinary parameters trained by backpropagation (nothing in this module).

``correlation``: a Cascade-Correlation rule (Fahlman & Lebiere, 1990), written from the paper and
docs/learning_rules.md. While the neurons are frozen, every dendritic layer trains a pool of candidate
dendrites to maximise, per candidate p,

    S_p = sum_n | sum_t (a_t[p, n] - mean a[p, n]) * (e_t[n] - mean e[n]) |

where t runs over samples and token positions, a is the candidate's activation and e = dLoss/dy is the error
at the layer's output, captured during the ordinary backward pass. With ``normalize=True`` each term is the
Pearson correlation instead of the covariance. The best candidates are then installed as dendrites with zero
output weights, so the model's function is unchanged at insertion.

Exact statistics. S is a non-linear function of sums over all samples, so it cannot be accumulated by adding
per-micro-batch gradients of a per-micro-batch S. We accumulate the sums instead (count, sum a, sum e,
sum a*e, and for the normalised form sum a^2, sum e^2) and, for the gradient, the parameter-shaped sums
G_ae = d(sum a*e)/d theta, G_a = d(sum a)/d theta (and G_aa). Every parameter of a full-shape candidate belongs
to exactly one (candidate, neuron) pair (a weight row, a bias entry, a cascade weight), so the exact gradient is
recovered row by row at the optimizer step:

    dS/d theta_row(p,n) = sign(C[p,n]) * (G_ae - mean_e[n] * G_a)[row(p,n)],   C = sum a*e - sum a * sum e / T

All sums are all-reduced across processes before they are used, so every rank takes the same step and installs
the same candidates. Low-rank dendrites share their factor A between neurons, which breaks the row-by-row
recovery, so the correlation rule requires full-shape dendrites (``rank=None``).
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn

from .layers import ACTIVATION_FUNCTIONS, DendriticLayerMixin

logger = logging.getLogger(__name__)


def _tokens_first(layer: DendriticLayerMixin, t: torch.Tensor, split: bool) -> torch.Tensor:
    """Flatten samples and positions: [..., (P,) N] or [B, (P,) N, *spatial] -> [T, (P,) N]."""
    if layer.spatial_dims == 0:
        return t.reshape(-1, *t.shape[-2:]) if split else t.reshape(-1, t.shape[-1])
    lead = 3 if split else 2  # B, (P,) N
    t = t.flatten(lead)  # [B, (P,) N, S]
    t = t.movedim(-1, 1)  # [B, S, (P,) N]
    return t.reshape(-1, *t.shape[2:])


class CandidatePool(nn.Module):
    """`pool_size` candidate dendrites for one dendritic layer, stacked like the layer's own dendrites.

    Parameters: ``weight`` (the layer kind's layout with P*N outputs), ``bias`` [P*N], and with cascade and
    existing dendrites ``cascade`` [P, K, N] (inputs from the layer's installed dendrites' activations).
    """

    def __init__(self, layer: DendriticLayerMixin, pool_size: int, generator: torch.Generator | None):
        super().__init__()
        if not layer.supports_correlation:
            raise NotImplementedError(
                f"learning_rule='correlation' does not support {layer.kind_name} layers (a {type(layer).__name__}); use "
                "learning_rule='gd', or exclude these layers with `exclude_modules`."
            )
        if layer.dendrite_rank is not None:
            raise NotImplementedError(
                "learning_rule='correlation' needs full-shape dendrites: set DendriteConfig(rank=None), or use "
                "learning_rule='gd' with low-rank dendrites."
            )
        self.pool_size, N = pool_size, layer.num_neurons
        std = layer.dendrite_init_scale / (layer.fan_in**0.5)
        self.weight = nn.Parameter(layer._random(layer._weight_shape(pool_size * N), std, generator))
        self.bias = nn.Parameter(layer._zeros((pool_size * N,)))
        k = layer.num_dendrites
        self.cascade = nn.Parameter(layer._zeros((pool_size, k, N))) if layer.dendrite_cascade_enabled and k else None

    def row_scale(self, name: str, layer: DendriticLayerMixin, scale: torch.Tensor) -> torch.Tensor:
        """Broadcast a per-(candidate, neuron) [P, N] tensor onto parameter `name`'s rows."""
        flat = scale.reshape(-1)
        if name == "bias":
            return flat
        if name == "cascade":
            return scale[:, None, :]
        shape = [1] * self.weight.dim()  # one value per row on the weight's neuron axis ([in, P*N] for Conv1D)
        shape[layer.weight_neuron_axis] = -1
        return flat.view(shape)

    def activations(self, layer: DendriticLayerMixin, x: torch.Tensor) -> torch.Tensor:
        """Candidate activations [..., P, N] (or [B, P, N, ...]) for layer input x (detached by the caller)."""
        z = layer._split_neurons(layer._apply_kind(x, self.weight, self.bias), self.pool_size)
        if self.cascade is not None:
            with torch.no_grad():
                earlier = layer.dendrite_activations(layer.dendrite_preactivations(x))
            pattern = "...kn,pkn->...pn" if layer.spatial_dims == 0 else "bkn...,pkn->bpn..."
            z = z + torch.einsum(pattern, earlier, self.cascade)
        return ACTIVATION_FUNCTIONS[layer.dendrite_activation](z)


class _LayerStats:
    """Sums over samples for one layer, plus the parameter-shaped gradient sums (see module docstring)."""

    def __init__(self, pool: CandidatePool, normalize: bool):
        self.normalize = normalize
        self.names = [n for n, p in pool.named_parameters()]
        self.reset(pool)

    def reset(self, pool: CandidatePool) -> None:
        P = pool.pool_size
        N = pool.bias.numel() // P
        dev, dt = pool.bias.device, torch.float32
        self.count = torch.zeros((), device=dev, dtype=torch.float64)
        self.sums = {k: torch.zeros(P, N, device=dev, dtype=dt) for k in ("a", "ae") + (("aa",) if self.normalize else ())}
        self.sums.update({k: torch.zeros(N, device=dev, dtype=dt) for k in ("e",) + (("ee",) if self.normalize else ())})
        kinds = ("ae", "a") + (("aa",) if self.normalize else ())
        self.grads = {(k, n): torch.zeros_like(p, dtype=dt) for k in kinds for n, p in pool.named_parameters()}

    def tensors(self) -> list[torch.Tensor]:
        return [self.count] + list(self.sums.values()) + list(self.grads.values())


class CorrelationRule:
    """Trains candidate dendrites of every dendritic layer of `model` by the correlation rule.

    Life cycle (driven by `DendriticTrainer`, usable by hand):

    1. ``start()``: freeze the model's parameters, build one `CandidatePool` per layer, attach hooks that
       capture each layer's input and output error during the normal forward / backward pass.
    2. After every ``loss.backward()``: ``accumulate()`` folds the captured micro-batch into the sums.
    3. At every optimizer step: ``step()`` all-reduces the sums, forms the exact gradient of S, and takes an Adam
       step on the candidates (``optimizer()`` returns a torch optimizer whose ``step`` does all of this).
    4. ``install(n)``: the n best candidates of each layer become dendrites (output weights zero), their input
       weights frozen and their input detached (perforated backward); hooks are removed.

    Example:
        >>> rule = CorrelationRule(dm, pool_size=4)
        >>> rule.start()
        >>> for batch in loader:
        ...     dm(**batch).loss.backward(); rule.accumulate(); rule.step()
        >>> rule.install(1)
    """

    def __init__(
        self,
        model,
        pool_size: int = 4,
        normalize: bool = False,
        learning_rate: float = 1e-2,
        generator: torch.Generator | None = None,
    ):
        if pool_size < 1:
            raise ValueError(f"candidate_pool_size must be >= 1, got {pool_size}.")
        self.model = model
        self.pool_size = pool_size
        self.normalize = normalize
        self.learning_rate = learning_rate
        self.generator = generator
        self.layers: dict[str, DendriticLayerMixin] = dict(model.dendritic_layers())
        self.pools: dict[str, CandidatePool] = {}
        self.stats: dict[str, _LayerStats] = {}
        self._pending: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._handles: list = []
        self._optimizer: torch.optim.Optimizer | None = None
        self.last_scores: dict[str, torch.Tensor] = {}  # layer -> S per candidate at the last step
        # One entry per step: S of each layer's best candidate, summed over layers, divided by the number of
        # neurons (the mean |covariance| (or |correlation|) per neuron that installation would get).
        self.history: list[float] = []
        self._frozen: list[nn.Parameter] = []

    # ------------------------------------------------------------------ set-up
    def start(self) -> None:
        """Freeze the network, create candidate pools and attach the capture hooks."""
        for p in self.model.parameters():
            if p.requires_grad:
                p.requires_grad_(False)
                self._frozen.append(p)
        for name, layer in self.layers.items():
            pool = CandidatePool(layer, self.pool_size, self.generator)
            self.pools[name] = pool
            self.stats[name] = _LayerStats(pool, self.normalize)
            self._pending[name] = []
            self._handles.append(layer.register_forward_hook(self._make_hook(name)))

    def parameters(self) -> list[nn.Parameter]:
        return [p for pool in self.pools.values() for p in pool.parameters()]

    def _make_hook(self, name: str):
        def hook(module, inputs, output):
            if not torch.is_grad_enabled():
                return  # evaluation: nothing to learn from
            x = inputs[0].detach()
            if not output.requires_grad:
                # All parameters are frozen: make the graph start here so the backward pass reaches this layer.
                output.requires_grad_()
            output.register_hook(lambda grad: self._pending[name].append((x, grad.detach())))
            return

        return hook

    # ------------------------------------------------------------------ statistics
    def accumulate(self) -> None:
        """Fold the micro-batches captured since the last call into the sums (call after each backward)."""
        for name, layer in self.layers.items():
            pending, self._pending[name] = self._pending[name], []
            pool, st = self.pools[name], self.stats[name]
            for x, e in pending:
                with torch.enable_grad():
                    a = _tokens_first(layer, pool.activations(layer, x), split=True).float()  # [T, P, N]
                e = _tokens_first(layer, e, split=False).float()  # [T, N]
                with torch.no_grad():
                    st.count += a.shape[0]
                    st.sums["a"] += a.detach().sum(0)
                    st.sums["ae"] += (a.detach() * e[:, None, :]).sum(0)
                    st.sums["e"] += e.sum(0)
                    if self.normalize:
                        st.sums["aa"] += a.detach().pow(2).sum(0)
                        st.sums["ee"] += e.pow(2).sum(0)
                targets = [("ae", (a * e[:, None, :]).sum()), ("a", a.sum())]
                if self.normalize:
                    targets.append(("aa", a.pow(2).sum()))
                params = list(pool.parameters())
                for i, (kind, value) in enumerate(targets):
                    grads = torch.autograd.grad(value, params, retain_graph=i < len(targets) - 1)
                    for pname, g in zip(st.names, grads):
                        st.grads[(kind, pname)] += g.float()

    def _all_reduce(self) -> None:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        tensors = [t for name in sorted(self.stats) for t in self.stats[name].tensors()]
        flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
        dist.all_reduce(flat)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    def _scores_and_scales(self, st: _LayerStats) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """S per (candidate, neuron) and the per-row factors of each gradient sum."""
        T = st.count.float().clamp_min(1.0)
        mean_e = st.sums["e"] / T
        cov = st.sums["ae"] - st.sums["a"] * mean_e  # C[p, n] (not divided by T)
        if not self.normalize:
            sign = torch.sign(cov)
            return cov.abs() / T, {"ae": sign / T, "a": -sign * mean_e / T}
        var_a = (st.sums["aa"] - st.sums["a"].pow(2) / T).clamp_min(1e-12)
        var_e = (st.sums["ee"] - st.sums["e"].pow(2) / T).clamp_min(1e-12)
        denom = (var_a * var_e).sqrt()
        r = cov / denom
        sign = torch.sign(r)
        # dr = dC / sqrt(Va Ve) - r dVa / (2 Va);  dC = G_ae - mean_e G_a;  dVa = G_aa - 2 mean_a G_a
        mean_a = st.sums["a"] / T
        c1 = sign / denom
        c2 = -sign * r / (2 * var_a)
        return r.abs(), {"ae": c1, "a": -c1 * mean_e - 2 * c2 * mean_a, "aa": c2}

    def compute_gradients(self) -> float:
        """All-reduce the sums gathered since the last call, set every candidate's `.grad` to the exact gradient
        of -S (so a minimising optimizer ascends S) and reset the sums; returns the mean S (see `history`)."""
        self._all_reduce()
        total, count = 0.0, 0
        for name, layer in self.layers.items():
            pool, st = self.pools[name], self.stats[name]
            if float(st.count) == 0:
                continue
            scores, scales = self._scores_and_scales(st)
            self.last_scores[name] = scores.sum(1)  # S per candidate
            total += float(self.last_scores[name].max())
            count += scores.shape[1]
            for pname, p in pool.named_parameters():
                grad = torch.zeros_like(p, dtype=torch.float32)
                for kind, scale in scales.items():
                    grad += pool.row_scale(pname, layer, scale) * st.grads[(kind, pname)]
                p.grad = (-grad).to(p.dtype)  # ascent on S
            st.reset(pool)
        mean_s = total / max(count, 1)
        self.history.append(mean_s)
        return mean_s

    def optimizer(self, lr: float | None = None) -> CandidateOptimizer:
        """A torch optimizer over the candidates whose `step()` runs `compute_gradients()` then an Adam step.

        This is what `DendriticTrainer` hands to the Trainer's loop during a candidate phase, so the loop's
        gradient accumulation, LR scheduler and checkpointing (optimizer state) work unchanged.
        """
        self._optimizer = CandidateOptimizer(self, lr=self.learning_rate if lr is None else lr)
        return self._optimizer

    def step(self) -> float:
        """One ascent step on every pool from the sums gathered since the last step; returns mean S."""
        if self._optimizer is None:
            self.optimizer()
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)
        return self.history[-1]

    # ------------------------------------------------------------------ installation
    @torch.no_grad()
    def install(self, n: int = 1) -> dict[str, list[int]]:
        """Install the `n` best candidates of every layer as dendrites; returns the chosen indices per layer.

        Output weights of the new dendrites are zero (identity at insertion). All dendrite input weights
        (weights, biases, cascade weights) are frozen and the dendrites' input is detached, so in the following
        neuron phase error flows between neurons only; the output weights train with the neurons.
        """
        if n > self.pool_size:
            raise ValueError(f"Cannot install {n} dendrites per layer from a pool of {self.pool_size} candidates.")
        chosen: dict[str, list[int]] = {}
        for name, layer in self.layers.items():
            pool = self.pools[name]
            scores = self.last_scores.get(name)
            order = list(range(self.pool_size)) if scores is None else torch.argsort(scores, descending=True).tolist()
            picks = order[:n]
            chosen[name] = picks
            k_old, N = layer.num_dendrites, layer.num_neurons
            layer.add_dendrites(n)
            rows = torch.cat([torch.arange(p * N, (p + 1) * N) for p in picks]).to(pool.bias.device)
            axis = layer.weight_neuron_axis
            layer.dendrite_weight.narrow(axis, k_old * N, n * N).copy_(pool.weight.index_select(axis, rows))
            layer.dendrite_bias[k_old * N :] = pool.bias[rows]
            if pool.cascade is not None:
                for i, p in enumerate(picks):
                    k = k_old + i
                    first = k * (k - 1) // 2
                    layer.dendrite_cascade[first : first + k_old] = pool.cascade[p]
        self.finish()
        for layer in self.layers.values():
            perforate(layer)
        return chosen

    def finish(self) -> None:
        """Remove the hooks, drop the candidates and unfreeze what `start()` froze."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.pools.clear()
        self.stats.clear()
        self._optimizer = None
        for p in self._frozen:
            p.requires_grad_(True)
        self._frozen.clear()

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        """Candidate parameters, Adam state and score history (sums are empty at optimizer-step boundaries)."""
        return {
            "pools": {name: {k: v.detach().cpu() for k, v in pool.state_dict().items()} for name, pool in self.pools.items()},
            "optimizer": None if self._optimizer is None else self._optimizer.state_dict(),
            "history": list(self.history),
            "last_scores": {k: v.cpu() for k, v in self.last_scores.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore candidates after `start()` (e.g. when resuming in the middle of a dendrite phase)."""
        missing = sorted(set(self.pools) ^ set(state["pools"]))
        if missing:
            raise ValueError(f"Candidate state does not match the model's dendritic layers: {missing[:5]}.")
        for name, pool in self.pools.items():
            pool.load_state_dict(state["pools"][name])
        self.history = list(state["history"])
        self.last_scores = {k: v.to(self.pools[k].bias.device) for k, v in state["last_scores"].items()}
        if state["optimizer"] is not None:
            self.optimizer().load_state_dict(state["optimizer"])


def perforate(layer: DendriticLayerMixin) -> None:
    """Freeze a layer's dendrite input weights and cut the dendrites out of the backward pass.

    The output weights (``dendrite_out``) keep training with the neurons.
    """
    for name in ("dendrite_weight", "dendrite_lora_A", "dendrite_lora_B", "dendrite_bias", "dendrite_cascade"):
        p = getattr(layer, name)
        if p is not None:
            p.requires_grad_(False)
    layer.dendrite_detach_input = True


class CandidateOptimizer(torch.optim.Adam):
    """Adam over a `CorrelationRule`'s candidates; `step()` first forms the exact gradient of S.

    The gradient is not left by `backward()` (the loss's gradient is not what candidates climb): it is computed
    from the statistics that `CorrelationRule.accumulate()` gathered since the previous step.
    """

    def __init__(self, rule: CorrelationRule, lr: float):
        super().__init__(rule.parameters(), lr=lr)
        self.rule = rule

    @torch.no_grad()
    def step(self, closure=None):
        with torch.enable_grad():
            self.rule.compute_gradients()
        return super().step(closure)
