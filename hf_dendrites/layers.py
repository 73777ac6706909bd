"""Dendritic layer kinds.

A dendritic layer is the original layer L (same class, same parameter objects, same parameter names) plus K
dendrites. Dendrite k is a layer of L's kind and shape fed L's input; its activation is added to L's output
through one per-neuron weight w_k:

    z_k = D_k(x) [+ sum_{j<k} c_kj * a_j]      a_k = phi(z_k)      y = L(x) + sum_k w_k * a_k

All K dendrites of a layer live in one stacked weight, so they cost one matmul / one convolution.

Parameters added to the layer (all absent while K == 0, so a converted model keeps the plain state dict):

- ``dendrite_weight``: the stacked dendrite weights, in the layer kind's own layout: ``[K*N, in]`` for
  ``nn.Linear``, ``[in, K*N]`` for transformers' ``Conv1D``, ``[K*N, C_in, *kernel]`` for convolutions.
  With ``rank=r`` it is replaced by ``dendrite_lora_A`` (the same layout with ``K*r`` outputs) and
  ``dendrite_lora_B`` (``[K, N, r]``): dendrite k's weight is ``B_k @ A_k``.
- ``dendrite_bias``: ``[K*N]``, starts at zero.
- ``dendrite_out``: ``[K, N]``, the dendrite-to-neuron weights w_k; start at zero (identity at insertion).
- ``dendrite_cascade``: ``[K*(K-1)/2, N]`` (only with ``cascade=True``), the weights c_kj for j < k, stored
  row ``k*(k-1)/2 + j``; start at zero. Growth only appends rows, so existing values keep their places.

The layer classes subclass the layer they wrap (``DendriticLinear`` is an ``nn.Linear``), so code that checks
``isinstance(module, nn.Linear)`` or reads ``module.weight`` keeps working.

Speed. ``DendriticLinear`` and ``DendriticConv1D`` run forward and backward through a hand-written autograd
function (`hf_dendrites.kernels`) that makes as few passes over the dendrites' [tokens, K, N] output as eager
PyTorch allows; convolutions, ``torch.compile`` (where inductor fuses the elementwise work) and layers with
``dendrite_fast_path = False`` use the reference formulation `dendrite_output`. Both compute the same function;
the fast backward reuses the saved activations' memory, so it runs once per forward pass (``retain_graph=True``
needs ``dendrite_fast_path = False``).

Inference fusion. ``layer.fuse()`` keeps a concatenated copy of the base and dendrite input weights (``[W; D]``,
or ``[W; A]`` for low-rank dendrites) so that, under ``torch.no_grad()``, base and dendrites run as one matmul /
convolution. The copy is not a parameter or buffer, so names and ``state_dict`` are unchanged and saving works
while fused; it is rebuilt whenever a parameter changed (optimizer step, ``load_state_dict``, ``.to()``).
A fused layer refuses to compute gradients (train after ``unfuse()``); growth and truncation unfuse it.

Switching dendrites off. ``layer.disable_dendrites(indices)`` makes the layer compute what it would compute without
those dendrites: their output weights w_k and the cascade weights c_kj that feed their activations to later
dendrites count as zero in every forward path (fast kernel, reference, no-grad, fused), through a masked copy of
``dendrite_out`` / ``dendrite_cascade``; the parameters themselves are never written, so the state dict, saving
and the optimizer see the real weights, and ``enable_dendrites()`` gives back the exact previous outputs. It is a
runtime switch for ablations (`DendriticModel.dendrites_disabled`), not part of the saved model.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .kernels import MatmulSpec, activate_, add_weighted_, dendritic_matmul

DENDRITE_PARAM_NAMES = ("dendrite_weight", "dendrite_lora_A", "dendrite_lora_B", "dendrite_bias", "dendrite_out", "dendrite_cascade")

# The dendrite nonlinearities phi, by `DendriteConfig.activation` name.
ACTIVATION_FUNCTIONS = {
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
}

# Attributes that the dendritic layer adds to the wrapped layer's __dict__ (removed again by `unload`).
_LAYER_ATTRS = (
    "num_dendrites",
    "dendrite_activation",
    "dendrite_cascade_enabled",
    "dendrite_rank",
    "dendrite_init_scale",
    "dendrite_detach_input",
    "dendrite_fast_path",
    "_dendrite_fused",
    "_dendrite_device",
    "_dendrites_off",
)


class DendriticLayerMixin:
    """Logic shared by every dendritic layer kind. Subclasses set `base_class` and the three kind hooks."""

    base_class: type[nn.Module]
    # Axis of the output that indexes neurons: -1 for Linear / Conv1D, 1 (channels) for convolutions.
    neuron_dim: int = -1
    # Axis of the dendrite index once the neuron axis is split into (K, N); spatial axes after the neurons.
    dendrite_axis: int = -2
    spatial_dims: int = 0
    # Which kind of single-matmul fast kernel the layer kind has: None (no kernel: the convolutions), False
    # (weights stored (out, in): nn.Linear) or True (stored (in, out): transformers Conv1D).
    _matmul_transposed: Optional[bool] = None
    # Per-layer switch: False forces the reference autograd formulation (e.g. to hook into z or a).
    dendrite_fast_path: bool = True
    # Inference fusion cache (see `fuse`): None while unfused.
    _dendrite_fused: Optional[dict] = None
    # Where new dendrite parameters live when not on the base weight's device: set for layers whose base weights
    # an accelerate hook offloads (they sit on "meta" between forward passes), see model._move_accelerate_hook.
    _dendrite_device: Optional[torch.device] = None
    # Indices of the dendrites switched off (see `disable_dendrites`); None: all on.
    _dendrites_off: Optional[frozenset] = None

    # ------------------------------------------------------------------ kind hooks
    def _apply_kind(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """Compute this layer kind's operation with another weight (e.g. the stacked dendrite weight)."""
        raise NotImplementedError

    def _weight_shape(self, n_out: int) -> tuple[int, ...]:
        """Shape of a weight of this layer kind with `n_out` output neurons."""
        raise NotImplementedError

    @property
    def num_neurons(self) -> int:
        raise NotImplementedError

    @property
    def fan_in(self) -> int:
        raise NotImplementedError

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_base_layer(
        cls,
        base: nn.Module,
        activation: str = "tanh",
        cascade: bool = False,
        rank: Optional[int] = None,
        init_scale: float = 1.0,
    ):
        """Wrap `base` without copying its parameters: the new layer holds the same Parameter objects.

        `base` itself is left untouched; replace it in its parent with the returned layer.
        """
        if type(base) is not cls.base_class:
            raise TypeError(f"{cls.__name__} wraps {cls.base_class.__name__}, got {type(base).__name__}.")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        for key, value in base.__dict__.items():
            # An instance-level `forward` (e.g. an accelerate hook) would bypass the dendrites; hooks are
            # re-attached by the caller.
            if key in ("forward", "_old_forward", "_hf_hook"):
                continue
            layer.__dict__[key] = copy.copy(value) if isinstance(value, (dict, set, list)) else value
        layer.num_dendrites = 0
        layer.dendrite_activation = activation
        layer.dendrite_cascade_enabled = bool(cascade)
        layer.dendrite_rank = rank
        layer.dendrite_init_scale = float(init_scale)
        # Perforated backward (correlation rule): dendrites read a detached input, so no error flows through
        # them into earlier layers.
        layer.dendrite_detach_input = False
        for name in DENDRITE_PARAM_NAMES:
            layer.register_parameter(name, None)
        return layer

    def to_base_layer(self) -> nn.Module:
        """The plain layer (same class and Parameter objects as before conversion), without dendrites."""
        base = self.base_class.__new__(self.base_class)
        nn.Module.__init__(base)
        for key, value in self.__dict__.items():
            if key in _LAYER_ATTRS or key in ("forward", "_old_forward", "_hf_hook"):
                continue
            base.__dict__[key] = copy.copy(value) if isinstance(value, (dict, set, list)) else value
        for name in DENDRITE_PARAM_NAMES:
            base._parameters.pop(name, None)
        return base

    # ------------------------------------------------------------------ growth
    def _reference(self) -> torch.Tensor:
        return self.weight

    def _new_param(self, old: Optional[torch.Tensor], new: torch.Tensor, dim: int) -> nn.Parameter:
        data = new if old is None else torch.cat([old.detach(), new], dim=dim)
        requires_grad = True if old is None else old.requires_grad
        return nn.Parameter(data, requires_grad=requires_grad)

    def _random(
        self, shape: tuple[int, ...], std: float, generator: Optional[torch.Generator], initialize: bool = True
    ) -> torch.Tensor:
        ref = self._reference()
        device = self._dendrite_device or ref.device
        if device.type == "meta" or not initialize:
            return torch.empty(shape, dtype=ref.dtype, device=device)
        bound = std * math.sqrt(3.0)
        # Drawn in float32 on the CPU so that a seeded growth gives the same values on every device and rank.
        values = torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
        return values.to(dtype=ref.dtype, device=device)

    def _zeros(self, shape: tuple[int, ...]) -> torch.Tensor:
        ref = self._reference()
        return torch.zeros(shape, dtype=ref.dtype, device=self._dendrite_device or ref.device)

    @torch.no_grad()
    def add_dendrites(self, n: int = 1, generator: Optional[torch.Generator] = None, *, initialize: bool = True) -> None:
        """Append `n` dendrites. Their output weights start at zero, so the layer's output is unchanged.

        `initialize=False` leaves the new input weights uninitialised (no random draw, `generator` unused): for
        loading, which overwrites every dendrite parameter right after. Biases and output weights are still zero.
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}.")
        self.unfuse()  # growth means training goes on; a fused weight would be stale
        k_old, N = self.num_dendrites, self.num_neurons
        std = self.dendrite_init_scale / math.sqrt(self.fan_in)
        cat_dim = 1 if isinstance(self, DendriticConv1D) else 0
        if self.dendrite_rank is None:
            new_w = self._random(self._weight_shape(n * N), std, generator, initialize)
            self.dendrite_weight = self._new_param(self.dendrite_weight, new_w, cat_dim)
        else:
            r = self.dendrite_rank
            new_a = self._random(self._weight_shape(n * r), std, generator, initialize)
            new_b = self._random((n, N, r), 1.0 / math.sqrt(r), generator, initialize)
            self.dendrite_lora_A = self._new_param(self.dendrite_lora_A, new_a, cat_dim)
            self.dendrite_lora_B = self._new_param(self.dendrite_lora_B, new_b, 0)
        self.dendrite_bias = self._new_param(self.dendrite_bias, self._zeros((n * N,)), 0)
        self.dendrite_out = self._new_param(self.dendrite_out, self._zeros((n, N)), 0)
        if self.dendrite_cascade_enabled:
            k_new = k_old + n
            rows = k_new * (k_new - 1) // 2 - k_old * (k_old - 1) // 2
            if rows:
                self.dendrite_cascade = self._new_param(self.dendrite_cascade, self._zeros((rows, N)), 0)
        self.num_dendrites = k_old + n

    @torch.no_grad()
    def truncate_dendrites(self, k: int) -> None:
        """Keep only the first `k` dendrites (used to discard a cycle that did not help)."""
        if not 0 <= k <= self.num_dendrites:
            raise ValueError(f"Cannot keep {k} dendrites of a layer that has {self.num_dendrites}.")
        if k == self.num_dendrites:
            return
        self.unfuse()
        N = self.num_neurons
        if k == 0:
            for name in DENDRITE_PARAM_NAMES:
                setattr(self, name, None)
            self.num_dendrites = 0
            return

        def cut(name: str, size: int, dim: int) -> None:
            old = getattr(self, name)
            if old is not None:
                setattr(self, name, nn.Parameter(old.detach().narrow(dim, 0, size).clone(), requires_grad=old.requires_grad))

        conv1d_layout = isinstance(self, DendriticConv1D)
        if self.dendrite_rank is None:
            cut("dendrite_weight", k * N, 1 if conv1d_layout else 0)
        else:
            cut("dendrite_lora_A", k * self.dendrite_rank, 1 if conv1d_layout else 0)
            cut("dendrite_lora_B", k, 0)
        cut("dendrite_bias", k * N, 0)
        cut("dendrite_out", k, 0)
        if self.dendrite_cascade_enabled:
            rows = k * (k - 1) // 2
            if rows:
                cut("dendrite_cascade", rows, 0)
            else:
                self.dendrite_cascade = None
        self.num_dendrites = k

    def expected_dendrite_shapes(self, k: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the dendrite parameters of this layer with `k` dendrites (for checking checkpoints)."""
        if k == 0:
            return {}
        N = self.num_neurons
        shapes: dict[str, tuple[int, ...]] = {}
        if self.dendrite_rank is None:
            shapes["dendrite_weight"] = tuple(self._weight_shape(k * N))
        else:
            shapes["dendrite_lora_A"] = tuple(self._weight_shape(k * self.dendrite_rank))
            shapes["dendrite_lora_B"] = (k, N, self.dendrite_rank)
        shapes["dendrite_bias"] = (k * N,)
        shapes["dendrite_out"] = (k, N)
        if self.dendrite_cascade_enabled and k > 1:
            shapes["dendrite_cascade"] = (k * (k - 1) // 2, N)
        return shapes

    def dendrite_parameters(self) -> list[nn.Parameter]:
        return [p for name in DENDRITE_PARAM_NAMES if (p := getattr(self, name)) is not None]

    def base_parameters(self) -> list[nn.Parameter]:
        names = set(DENDRITE_PARAM_NAMES)
        return [p for name, p in self._parameters.items() if p is not None and name not in names]

    # ------------------------------------------------------------------ switching dendrites off
    def disable_dendrites(self, indices: Optional[Iterable[int]] = None) -> None:
        """Switch dendrites off (all, or those at `indices`, 0-based; added to those already off) until
        `enable_dendrites`. The layer then computes what it would without them: their output weights and the cascade
        weights that feed their activations to later dendrites count as zero (see the module docstring). Indices
        past the current count are ignored; growth keeps the switched-off ones off and adds new dendrites on."""
        chosen = set(range(self.num_dendrites)) if indices is None else {int(i) for i in indices}
        if any(i < 0 for i in chosen):
            raise ValueError(f"Dendrite indices must be >= 0, got {sorted(chosen)}.")
        off = (self._dendrites_off or frozenset()) | chosen
        self._dendrites_off = frozenset(off) if off else None

    def enable_dendrites(self) -> None:
        """Switch every dendrite back on: the outputs are exactly those before `disable_dendrites`."""
        self._dendrites_off = None

    @property
    def disabled_dendrites(self) -> tuple[int, ...]:
        """Indices of the dendrites switched off now (empty when all are on)."""
        return tuple(sorted(i for i in (self._dendrites_off or ()) if i < self.num_dendrites))

    def _active_out(self) -> torch.Tensor:
        """`dendrite_out` with the rows of switched-off dendrites zeroed (the parameter itself when all are on)."""
        off = () if self._dendrites_off is None else self.disabled_dendrites  # all on: no work in the forward pass
        if not off:
            return self.dendrite_out
        return self.dendrite_out.index_fill(0, torch.tensor(off, device=self.dendrite_out.device), 0.0)

    def _active_cascade(self) -> Optional[torch.Tensor]:
        """`dendrite_cascade` with the rows c_kj of switched-off dendrites j zeroed (their input to later ones)."""
        cascade = self.dendrite_cascade
        off = () if self._dendrites_off is None or cascade is None else self.disabled_dendrites
        if not off:
            return cascade
        rows = [k * (k - 1) // 2 + j for k in range(self.num_dendrites) for j in off if j < k]
        if not rows:
            return cascade
        return cascade.index_fill(0, torch.tensor(rows, device=cascade.device), 0.0)

    # ------------------------------------------------------------------ forward
    def _split_neurons(self, z: torch.Tensor, k: int) -> torch.Tensor:
        """[..., k*N] -> [..., k, N] (Linear) or [B, k*N, ...] -> [B, k, N, ...] (conv)."""
        dim = self.neuron_dim % z.dim()
        return z.unflatten(dim, (k, z.shape[dim] // k))

    def _per_neuron(self, v: torch.Tensor) -> torch.Tensor:
        """Give a [..., N] parameter trailing singleton axes so it broadcasts on the neuron axis of an output."""
        return v.reshape(v.shape + (1,) * self.spatial_dims)

    def _lowrank_preactivations(self, h: torch.Tensor) -> torch.Tensor:
        """z from the low-rank factor's output h (K*r values on the neuron axis): z_k = B_k h_k + b_k."""
        K = self.num_dendrites
        if self.spatial_dims == 0:
            # One batched matmul over the dendrites, bias added by the same kernel: [K, tokens, N].
            r = self.dendrite_rank
            flat = h.reshape(-1, K, r).transpose(0, 1)
            z = torch.baddbmm(self.dendrite_bias.view(K, 1, -1), flat, self.dendrite_lora_B.transpose(1, 2))
            return z.transpose(0, 1).reshape(*h.shape[:-1], K, -1)  # [..., K, N] (a view of the [K, M, N] result)
        z = torch.einsum("bkr...,knr->bkn...", self._split_neurons(h, K), self.dendrite_lora_B)
        return z + self._per_neuron(self.dendrite_bias.view(K, -1))

    def dendrite_preactivations(self, x: torch.Tensor) -> torch.Tensor:
        """z_k = D_k(x) for all dendrites, split on the dendrite axis ([..., K, N] or [B, K, N, ...])."""
        K = self.num_dendrites
        if self.dendrite_rank is None:
            return self._split_neurons(self._apply_kind(x, self.dendrite_weight, self.dendrite_bias), K)
        return self._lowrank_preactivations(self._apply_kind(x, self.dendrite_lora_A, None))

    def dendrite_activations(self, z: torch.Tensor) -> torch.Tensor:
        """a_k = phi(z_k + sum_{j<k} c_kj a_j) for split pre-activations z."""
        phi = ACTIVATION_FUNCTIONS[self.dendrite_activation]
        if not self.dendrite_cascade_enabled or self.num_dendrites == 1:
            return phi(z)
        cascade = self._per_neuron(self._active_cascade())  # [rows, N, 1...]
        acts: list[torch.Tensor] = []
        for k, z_k in enumerate(z.unbind(self.dendrite_axis)):
            first = k * (k - 1) // 2
            for j in range(k):
                z_k = z_k + cascade[first + j] * acts[j]
            acts.append(phi(z_k))
        return torch.stack(acts, self.dendrite_axis)

    def dendrite_output(self, x: torch.Tensor) -> torch.Tensor:
        """sum_k w_k * a_k: what the dendrites add to the layer's output (reference autograd formulation)."""
        a = self.dendrite_activations(self.dendrite_preactivations(x))
        return (a * self._per_neuron(self._active_out())).sum(self.dendrite_axis)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.num_dendrites == 0:
            return self.base_class.forward(self, x)
        if torch.compiler.is_compiling() or not self.dendrite_fast_path:
            # Plain autograd ops: dynamo traces them without graph breaks and inductor fuses the elementwise work.
            return self._reference_forward(x)
        if self._dendrite_fused is not None:
            return self._fused_forward(x)
        if self._matmul_transposed is not None:
            return dendritic_matmul(
                x,
                self.weight,
                self.bias,
                self.dendrite_weight if self.dendrite_rank is None else self.dendrite_lora_A,
                self.dendrite_bias,
                self.dendrite_lora_B,
                self._active_out(),
                self._active_cascade() if self.num_dendrites > 1 else None,
                MatmulSpec(self.dendrite_activation, self._matmul_transposed, self.dendrite_detach_input),
            )
        if not self._needs_grad(x):
            return self._inference_forward(x)
        return self._reference_forward(x)

    def _reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_class.forward(self, x)
        out = y + self.dendrite_output(x.detach() if self.dendrite_detach_input else x)
        # Under autocast y is low precision while w (float32) promotes the sum: keep the base layer's dtype.
        return out if out.dtype == y.dtype else out.to(y.dtype)

    def _needs_grad(self, x: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self._parameters.values() if p is not None))

    def _cascade_rows(self) -> Optional[torch.Tensor]:
        if not self.dendrite_cascade_enabled or self.num_dendrites < 2:
            return None
        return self._per_neuron(self._active_cascade())

    def _combine_(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """y + sum_k w_k phi(z_k) without gradients: activation and weighting in place, on z and y."""
        kdim = self.dendrite_axis % z.dim()
        a, _ = activate_(z, self.dendrite_activation, kdim, self._cascade_rows())
        return add_weighted_(y, a, self._per_neuron(self._active_out()), kdim)

    def _inference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Forward without autograd for the kinds without a matmul kernel: same values, fewer passes."""
        return self._combine_(self.base_class.forward(self, x), self.dendrite_preactivations(x))

    # ------------------------------------------------------------------ inference fusion
    @property
    def is_fused(self) -> bool:
        """True while the layer is fused for inference (see `fuse`)."""
        return self._dendrite_fused is not None

    def _fusion_key(self) -> tuple:
        # Identity, storage and version counter of every parameter: an optimizer step, load_state_dict (in-place
        # updates bump the version), `.to()` or growth (new storage / objects) all change the key.
        return tuple(
            None if p is None else (id(p), p.data_ptr(), p._version, p.dtype, p.device)
            for p in self._parameters.values()
        )

    @torch.no_grad()
    def _build_fused(self) -> dict:
        cat_dim = 1 if self._matmul_transposed else 0
        d_weight = self.dendrite_weight if self.dendrite_rank is None else self.dendrite_lora_A
        weight = torch.cat([self.weight, d_weight], dim=cat_dim)
        n_extra = d_weight.shape[cat_dim]
        bias = self.bias if self.bias is not None else self._zeros((self.num_neurons,))
        # Full-shape dendrites carry their bias in the fused matmul; low-rank ones add it after B (zeros here).
        extra_bias = self.dendrite_bias if self.dendrite_rank is None else self._zeros((n_extra,))
        fused = {"weight": weight, "bias": torch.cat([bias, extra_bias.to(bias.dtype)]), "key": self._fusion_key()}
        self._dendrite_fused = fused
        return fused

    def fuse(self) -> None:
        """Fuse base and dendrites for inference: one matmul / convolution computes both.

        Keeps a concatenated copy of the base and dendrite input weights (extra memory: the layer's weights
        once more) outside the parameters, so parameter names and the state dict do not change. The fused
        layer computes the same outputs as the unfused one within float rounding (the concatenated matmul may
        sum in another order). It works under `torch.no_grad()` / `torch.inference_mode()` only: a forward pass
        that needs gradients raises, since gradients would not reach the parameters. `unfuse()` frees the copy;
        `add_dendrites` and `truncate_dendrites` unfuse the layer. A layer without dendrites has nothing to
        fuse and stays unfused.
        """
        if self.num_dendrites == 0:
            return
        if any(p.device.type == "meta" for p in self._parameters.values() if p is not None):
            # Weights offloaded by an accelerate hook: built at the first forward pass, when they are loaded.
            self._dendrite_fused = {"key": None}
            return
        self._build_fused()

    def unfuse(self) -> None:
        """Drop the fused weight copy (no-op when the layer is not fused)."""
        self._dendrite_fused = None

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._needs_grad(x):
            raise RuntimeError(
                f"This {type(self).__name__} is fused for inference and cannot compute gradients. Run it under "
                "torch.no_grad() / torch.inference_mode(), or call `unfuse()` (DendriticModel.unfuse()) before "
                "training."
            )
        fused = self._dendrite_fused
        if fused["key"] != self._fusion_key():
            fused = self._build_fused()
        o = self._apply_kind(x, fused["weight"], fused["bias"])
        nd = self.neuron_dim % o.dim()
        N, K = self.num_neurons, self.num_dendrites
        y = o.narrow(nd, 0, N)
        rest = o.narrow(nd, N, o.shape[nd] - N)
        z = self._split_neurons(rest, K) if self.dendrite_rank is None else self._lowrank_preactivations(rest)
        kdim = self.dendrite_axis % z.dim()
        a, _ = activate_(z, self.dendrite_activation, kdim, self._cascade_rows())
        w = self._per_neuron(self._active_out())
        # The first term writes a fresh, contiguous output (y is a strided view of the fused result); under
        # autocast it is cast back to the matmul's dtype, which float32 w would otherwise promote.
        out = torch.addcmul(y, a.select(kdim, 0), w[0]).to(y.dtype).contiguous()
        for k in range(1, K):
            out.addcmul_(a.select(kdim, k), w[k])
        return out

    def extra_repr(self) -> str:
        base = self.base_class.extra_repr(self)
        rank = "" if self.dendrite_rank is None else f", rank={self.dendrite_rank}"
        cascade = ", cascade=True" if self.dendrite_cascade_enabled else ""
        return f"{base}, dendrites={self.num_dendrites}, activation={self.dendrite_activation}{rank}{cascade}"


class DendriticLinear(DendriticLayerMixin, nn.Linear):
    """`nn.Linear` with dendrites. Neurons are the last dimension."""

    base_class = nn.Linear
    _matmul_transposed = False

    def _apply_kind(self, x, weight, bias):
        return F.linear(x, weight, bias)

    def _weight_shape(self, n_out):
        return (n_out, self.in_features)

    @property
    def num_neurons(self):
        return self.out_features

    @property
    def fan_in(self):
        return self.in_features


class DendriticConv1D(DendriticLayerMixin, Conv1D):
    """transformers' GPT-2 style `Conv1D` (a Linear whose weight is stored (in, out)) with dendrites."""

    base_class = Conv1D
    _matmul_transposed = True

    def _apply_kind(self, x, weight, bias):
        flat = x.reshape(-1, x.size(-1))
        out = torch.mm(flat, weight) if bias is None else torch.addmm(bias, flat, weight)
        return out.view(*x.shape[:-1], weight.shape[1])

    def _weight_shape(self, n_out):
        return (self.nx, n_out)

    @property
    def num_neurons(self):
        return self.nf

    @property
    def fan_in(self):
        return self.nx

    def __repr__(self) -> str:  # Conv1D overrides __repr__, which would hide the dendrite count
        return f"DendriticConv1D(nf={self.nf}, nx={self.nx}, dendrites={self.num_dendrites}, activation={self.dendrite_activation})"


class _DendriticConvNd(DendriticLayerMixin):
    neuron_dim = 1
    dendrite_axis = 1

    def _apply_kind(self, x, weight, bias):
        return self._conv_forward(x, weight, bias)

    def _weight_shape(self, n_out):
        return (n_out, self.in_channels // self.groups, *self.kernel_size)

    @property
    def num_neurons(self):
        return self.out_channels

    @property
    def fan_in(self):
        return (self.in_channels // self.groups) * math.prod(self.kernel_size)


class DendriticConv1d(_DendriticConvNd, nn.Conv1d):
    """`nn.Conv1d` with dendrites. Neurons are the output channels (dim 1)."""

    base_class = nn.Conv1d
    spatial_dims = 1


class DendriticConv2d(_DendriticConvNd, nn.Conv2d):
    """`nn.Conv2d` with dendrites. Neurons are the output channels (dim 1)."""

    base_class = nn.Conv2d
    spatial_dims = 2


DENDRITIC_LAYER_CLASSES: dict[type[nn.Module], type[DendriticLayerMixin]] = {
    nn.Linear: DendriticLinear,
    Conv1D: DendriticConv1D,
    nn.Conv1d: DendriticConv1d,
    nn.Conv2d: DendriticConv2d,
}


def dendritic_class_for(module: nn.Module) -> Optional[type[DendriticLayerMixin]]:
    """The dendritic class that wraps `module`, or None when its kind is not supported.

    Only the exact supported classes qualify: a subclass (e.g. a quantized Linear, or the out-projection of
    `nn.MultiheadAttention`, whose weight is used without calling `forward`) could bypass the dendrites.
    """
    return DENDRITIC_LAYER_CLASSES.get(type(module))


def unsupported_reason(module: nn.Module) -> Optional[str]:
    """Why `module` cannot become dendritic (None when it can)."""
    if isinstance(module, DendriticLayerMixin):
        return "it is already a dendritic layer"
    cls = dendritic_class_for(module)
    if cls is None:
        kinds = ", ".join(c.__module__.split(".")[0] + "." + c.__name__ for c in DENDRITIC_LAYER_CLASSES)
        return f"its type {type(module).__module__}.{type(module).__name__} is not a supported layer kind ({kinds})"
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups != 1:
        return f"grouped convolutions (groups={module.groups}) are not supported"
    return None
