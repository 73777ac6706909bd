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

Layer kinds. Which modules can become dendritic is a registry of kinds (`register_layer_kind`, end of this module):
a kind matches a module class and its subclasses that compute the same function, and names the dendritic class
(a `DendriticLayerMixin` subclass) that wraps them. The four kinds above are registered here; optional packages'
kinds (bitsandbytes, `hf_dendrites.quantized`) are registered once the package is imported. Users register kinds
for their own modules (docs/dendritic_layer.md, "Adding a layer kind").
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Callable, Optional

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


def _rms(t: torch.Tensor) -> float:
    return float(t.detach().float().pow(2).mean().sqrt()) if t.numel() else 0.0


def parameter_count(p: torch.Tensor) -> int:
    """Number of values `p` stands for: its element count, or for a packed quantized weight (bitsandbytes 4-bit)
    the element count of the real weight it encodes."""
    shape = getattr(getattr(p, "quant_state", None), "shape", None)
    if type(p).__name__ == "Params4bit":
        return math.prod(shape) if shape is not None else p.numel() * p.element_size() * 2
    return p.numel()


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
    "_dendrite_dtype",
)


def cascade_rows(k: int) -> int:
    """Rows of `dendrite_cascade` for `k` dendrites: one per pair (j < i), the input of dendrite j to dendrite i."""
    return k * (k - 1) // 2


class DendriticLayerMixin:
    """Logic shared by every dendritic layer kind (see "Adding a layer kind" in docs/dendritic_layer.md).

    A single-weight kind sets the class attributes below and implements the four kind hooks (`_apply_kind`,
    `_weight_shape`, `num_neurons`, `fan_in`). A kind whose module holds several weights (or whose dendrites are not
    laid out like one weight of the module) overrides the layer protocol that `DendriticModel`, the schedule and
    checkpoints use instead: `from_base_layer`, `to_base_layer`, `add_dendrites`, `truncate_dendrites`,
    `expected_dendrite_shapes`, `dendrite_param_names`, `dendrite_parameters`, `base_parameters`,
    `base_parameter_count`, `dendrite_weight_ratio`, `forward`, the switches (`disable_dendrites`,
    `enable_dendrites`, `disabled_dendrites`) and `fuse` / `unfuse` / `is_fused`.
    """

    base_class: type[nn.Module]
    # Axis of the output that indexes neurons: -1 for Linear / Conv1D, 1 (channels) for convolutions.
    neuron_dim: int = -1
    # Axis of the kind's weight that indexes output neurons (where dendrites are stacked): 0 for weights stored
    # (out, in, ...) as nn.Linear and convolutions, 1 for transformers' Conv1D (stored (in, out)).
    weight_neuron_axis: int = 0
    # Whether `fuse()` may concatenate the base and dendrite input weights (False: the layer stays unfused). Only for
    # kinds whose forward pass is exactly `_apply_kind(x, self.weight, self.bias)` (the built-in kinds).
    supports_fusion: bool = False
    # Whether the correlation learning rule (hf_dendrites.learning_rules) can train candidates for this kind.
    supports_correlation: bool = True
    # Names of the parameters this kind adds (absent while there are no dendrites).
    dendrite_param_names: tuple[str, ...] = DENDRITE_PARAM_NAMES
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
    # dtype of the dendrite parameters when it is not the base weight's (set at conversion for quantized bases).
    _dendrite_dtype: Optional[torch.dtype] = None

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
        dtype: Optional[torch.dtype] = None,
    ):
        """Wrap `base` without copying its parameters: the new layer holds the same Parameter objects.

        `base` itself is left untouched; replace it in its parent with the returned layer. `dtype`: the dendrites'
        dtype, for kinds whose weight is not a floating-point tensor (quantized bases); other kinds keep their
        dendrites in the weight's dtype and ignore it.
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
        layer._dendrite_dtype = dtype if cls.uses_dendrite_dtype else None
        for name in cls.dendrite_param_names:
            layer.register_parameter(name, None)
        return layer

    # Whether `from_base_layer(dtype=...)` sets the dendrites' dtype (quantized kinds); other kinds follow the weight.
    uses_dendrite_dtype: bool = False

    @classmethod
    def default_dendrite_dtype(cls, base: nn.Module) -> Optional[torch.dtype]:
        """For kinds with `uses_dendrite_dtype`: the dtype `base`'s dendrites take unless the config sets one (None:
        the model's dtype)."""
        return None

    def to_base_layer(self) -> nn.Module:
        """The plain layer (same class and Parameter objects as before conversion), without dendrites."""
        base = self.base_class.__new__(self.base_class)
        nn.Module.__init__(base)
        for key, value in self.__dict__.items():
            if key in _LAYER_ATTRS or key in ("forward", "_old_forward", "_hf_hook"):
                continue
            base.__dict__[key] = copy.copy(value) if isinstance(value, (dict, set, list)) else value
        for name in self.dendrite_param_names:
            base._parameters.pop(name, None)
        return base

    # ------------------------------------------------------------------ growth
    def _reference(self) -> torch.Tensor:
        """A tensor of the base layer whose device (and, unless `_dendrite_dtype` is set, dtype) dendrites take."""
        return self.weight

    @property
    def dendrite_dtype(self) -> torch.dtype:
        """The dtype of this layer's dendrite parameters."""
        return self._dendrite_dtype or self._reference().dtype

    @property
    def kind_name(self) -> str:
        """The layer kind's name in summaries and the model card (the wrapped class's name)."""
        return self.base_class.__name__

    def _new_param(self, old: Optional[torch.Tensor], new: torch.Tensor, dim: int) -> nn.Parameter:
        data = new if old is None else torch.cat([old.detach(), new], dim=dim)
        requires_grad = True if old is None else old.requires_grad
        return nn.Parameter(data, requires_grad=requires_grad)

    def _random(
        self, shape: tuple[int, ...], std: float, generator: Optional[torch.Generator], initialize: bool = True
    ) -> torch.Tensor:
        device, dtype = self._dendrite_device or self._reference().device, self.dendrite_dtype
        if device.type == "meta" or not initialize:
            return torch.empty(shape, dtype=dtype, device=device)
        bound = std * math.sqrt(3.0)
        # Drawn in float32 on the CPU so that a seeded growth gives the same values on every device and rank.
        values = torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
        return values.to(dtype=dtype, device=device)

    def _zeros(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.zeros(shape, dtype=self.dendrite_dtype, device=self._dendrite_device or self._reference().device)

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
        cat_dim = self.weight_neuron_axis
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
            rows = cascade_rows(k_new) - cascade_rows(k_old)
            if rows:
                self.dendrite_cascade = self._new_param(self.dendrite_cascade, self._zeros((rows, N)), 0)
        self.num_dendrites = k_old + n

    def _truncation_needed(self, k: int) -> bool:
        """Check `k` for `truncate_dendrites`: False when the layer already has `k` dendrites."""
        if not 0 <= k <= self.num_dendrites:
            raise ValueError(f"Cannot keep {k} dendrites of a layer that has {self.num_dendrites}.")
        return k != self.num_dendrites

    @torch.no_grad()
    def truncate_dendrites(self, k: int) -> None:
        """Keep only the first `k` dendrites (used to discard a cycle that did not help)."""
        if not self._truncation_needed(k):
            return
        self.unfuse()
        N = self.num_neurons
        if k == 0:
            for name in self.dendrite_param_names:
                setattr(self, name, None)
            self.num_dendrites = 0
            return

        def cut(name: str, size: int, dim: int) -> None:
            old = getattr(self, name)
            if old is not None:
                setattr(self, name, nn.Parameter(old.detach().narrow(dim, 0, size).clone(), requires_grad=old.requires_grad))

        if self.dendrite_rank is None:
            cut("dendrite_weight", k * N, self.weight_neuron_axis)
        else:
            cut("dendrite_lora_A", k * self.dendrite_rank, self.weight_neuron_axis)
            cut("dendrite_lora_B", k, 0)
        cut("dendrite_bias", k * N, 0)
        cut("dendrite_out", k, 0)
        if self.dendrite_cascade_enabled:
            rows = cascade_rows(k)
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
            shapes["dendrite_cascade"] = (cascade_rows(k), N)
        return shapes

    def dendrite_parameters(self) -> list[nn.Parameter]:
        return [p for name in self.dendrite_param_names if (p := getattr(self, name)) is not None]

    def base_parameters(self) -> list[nn.Parameter]:
        names = set(self.dendrite_param_names)
        return [p for name, p in self._parameters.items() if p is not None and name not in names]

    def base_parameter_count(self) -> int:
        """Number of values of the base layer's own parameters (of the real weight, for packed quantized storage)."""
        return sum(parameter_count(p) for p in self.base_parameters())

    def base_weight(self, stored: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The base layer's weight as real values in the kind's layout (dequantized for quantized kinds); `stored`:
        the weight as a state dict of this layer holds it (default: the layer's own)."""
        return self.weight if stored is None else stored

    def dendrite_weight_ratio(self, get: Callable[[str], Optional[torch.Tensor]], start: int, k_all: int) -> float:
        """`RMS(w) * RMS(D) / RMS(W)` of dendrites `start .. k_all-1` (see `DendriticModel.dendrite_weight_ratios`).

        `get(name)` returns this layer's dendrite parameter `name` as a state dict holds it (with `k_all` dendrites).
        """
        n, axis = self.num_neurons, self.weight_neuron_axis
        w = get("dendrite_out")[start:k_all]
        if self.dendrite_rank is None:
            d = get("dendrite_weight").narrow(axis, start * n, (k_all - start) * n)
        else:
            r, a, b = self.dendrite_rank, get("dendrite_lora_A"), get("dendrite_lora_B")
            parts = []
            for k in range(start, k_all):
                a_k = a.narrow(axis, k * r, r).movedim(axis, 0).reshape(r, -1)
                parts.append(b[k].float() @ a_k.float())
            d = torch.cat(parts)
        scale = _rms(self.base_weight(get("weight")))
        return _rms(w) * _rms(d) / scale if scale > 0 else float("inf")

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

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The wrapped layer's own forward pass."""
        return self.base_class.forward(self, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.num_dendrites == 0:
            return self._base_forward(x)
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
        y = self._base_forward(x)
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
        return self._combine_(self._base_forward(x), self.dendrite_preactivations(x))

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
        cat_dim = self.weight_neuron_axis
        d_weight = self.dendrite_weight if self.dendrite_rank is None else self.dendrite_lora_A
        weight = torch.cat([self.weight, d_weight], dim=cat_dim)
        n_extra = d_weight.shape[cat_dim]
        bias = getattr(self, "bias", None)
        bias = bias if bias is not None else self._zeros((self.num_neurons,))
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
        `add_dendrites` and `truncate_dendrites` unfuse the layer. A layer without dendrites, or of a kind that does
        not fuse (`supports_fusion = False`: a quantized base), stays unfused.
        """
        if self.num_dendrites == 0 or not self.supports_fusion:
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


class LinearFeaturesKind(DendriticLayerMixin):
    """The kind hooks of a Linear-like module: `in_features` inputs, `out_features` neurons (the last output axis),
    weights stored (out, in). Shared by `DendriticLinear` and the quantized Linear kinds (hf_dendrites.quantized)."""

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


class DendriticLinear(LinearFeaturesKind, nn.Linear):
    """`nn.Linear` with dendrites. Neurons are the last dimension."""

    base_class = nn.Linear
    _matmul_transposed = False
    supports_fusion = True


class DendriticConv1D(DendriticLayerMixin, Conv1D):
    """transformers' GPT-2 style `Conv1D` (a Linear whose weight is stored (in, out)) with dendrites."""

    base_class = Conv1D
    _matmul_transposed = True
    weight_neuron_axis = 1
    supports_fusion = True

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
    supports_fusion = True

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


# ---------------------------------------------------------------------------------------------- layer kinds
@dataclass(frozen=True)
class LayerKind:
    """A registered layer kind: which modules it matches and the dendritic class that wraps them.

    See `register_layer_kind` for the fields.
    """

    module_class: type[nn.Module]
    dendritic_class: type[DendriticLayerMixin]
    name: str
    all_linear: bool = False
    check: Optional[Callable[[nn.Module], Optional[str]]] = None
    exclude: tuple[type, ...] = ()
    same_function: tuple[str, ...] = ("forward",)


# Registered kinds, by the module class they match (later registrations of the same class replace earlier ones).
_KINDS: dict[type[nn.Module], LayerKind] = {}
# The exact module class -> dendritic class of every kind whose dendritic class subclasses the module class (the
# built-in kinds: nn.Linear -> DendriticLinear, ...); kept for code that looks a class up directly.
DENDRITIC_LAYER_CLASSES: dict[type[nn.Module], type[DendriticLayerMixin]] = {}
# Dendritic classes built for a matched subclass (see `dendritic_class_for`), by (dendritic class, module class).
_DERIVED: dict[tuple[type, type], type] = {}
# Loaders of optional kinds (bitsandbytes): run once the package they need has been imported by someone else.
_LAZY_KINDS: dict[str, Callable[[], None]] = {}
# Why a loader could not register its kinds (e.g. a too old package), by package: said when such a module is refused.
_LAZY_ERRORS: dict[str, str] = {}


def register_layer_kind(
    module_class: type[nn.Module],
    dendritic_class: type[DendriticLayerMixin],
    *,
    name: Optional[str] = None,
    all_linear: bool = False,
    check: Optional[Callable[[nn.Module], Optional[str]]] = None,
    exclude: Iterable[type] = (),
    same_function: Iterable[str] = ("forward",),
) -> LayerKind:
    """Let `get_dendritic_model` give dendrites to modules of `module_class` (and of its subclasses).

    Args:
        module_class: the module class the kind matches. A subclass matches too unless it overrides one of the
            methods in `same_function` (then it may compute another function: it is reported as unsupported) or is
            in `exclude`; a subclass with its own registered kind uses that one (the most derived registered class
            in the module's MRO wins).
        dendritic_class: a subclass of `DendriticLayerMixin` implementing the kind (see "Adding a layer kind" in
            docs/dendritic_layer.md). It may subclass `module_class` itself (as `DendriticLinear` does) or not: then
            the class that wraps a module of type T is built once as `(dendritic_class, T)`.
        name: the kind's name in messages (default: `module_class`'s qualified name).
        all_linear: whether `target_modules="all-linear"` selects these modules.
        check: optional `check(module) -> None or a reason` for modules of the class that cannot get dendrites
            (e.g. grouped convolutions).
        exclude: subclasses of `module_class` that never match (their weight is used without calling `forward`).
        same_function: methods a subclass must not override to match.

    Returns the registered `LayerKind`. Registering a class again replaces its kind.
    """
    if not (isinstance(module_class, type) and issubclass(module_class, nn.Module)):
        raise TypeError(f"register_layer_kind: module_class must be an nn.Module subclass, got {module_class!r}.")
    if not (isinstance(dendritic_class, type) and issubclass(dendritic_class, DendriticLayerMixin)):
        raise TypeError(
            f"register_layer_kind: dendritic_class must subclass hf_dendrites.DendriticLayerMixin, got {dendritic_class!r}."
        )
    if issubclass(module_class, DendriticLayerMixin):
        raise TypeError(f"register_layer_kind: {module_class.__name__} is already a dendritic class.")
    own = getattr(dendritic_class, "base_class", None)
    if issubclass(dendritic_class, nn.Module) and not (own is not None and issubclass(module_class, own)):
        raise TypeError(
            f"register_layer_kind: {dendritic_class.__name__} is an nn.Module for {getattr(own, '__name__', own)}; pass a "
            f"class that subclasses {module_class.__name__}, or a DendriticLayerMixin subclass that is no nn.Module."
        )
    kind = LayerKind(
        module_class=module_class,
        dendritic_class=dendritic_class,
        name=name or f"{module_class.__module__.split('.')[0]}.{module_class.__name__}",
        all_linear=bool(all_linear),
        check=check,
        exclude=tuple(exclude),
        same_function=tuple(same_function),
    )
    _KINDS[module_class] = kind
    DENDRITIC_LAYER_CLASSES.pop(module_class, None)
    if own is module_class:
        DENDRITIC_LAYER_CLASSES[module_class] = dendritic_class
    for key in [k for k in _DERIVED if k[1] is module_class or k[0] is dendritic_class]:
        del _DERIVED[key]
    return kind


def register_lazy_layer_kind(package: str, loader: Callable[[], None]) -> None:
    """Run `loader` (which calls `register_layer_kind`) the first time kinds are looked up after `package` has been
    imported: kinds for an optional package's modules, without importing the package for models that lack them."""
    _LAZY_KINDS[package] = loader


def _load_lazy_kinds() -> None:
    import sys

    for package in [p for p in _LAZY_KINDS if sys.modules.get(p) is not None]:
        try:
            _LAZY_KINDS.pop(package)()
        except ImportError as err:  # e.g. too old: its modules are refused with this reason, the rest converts
            _LAZY_ERRORS[package] = str(err)


def layer_kinds() -> list[LayerKind]:
    """The registered layer kinds (those of optional packages once the package is imported)."""
    _load_lazy_kinds()
    return list(_KINDS.values())


def _overrides(cls: type, base: type, names: tuple[str, ...]) -> Optional[str]:
    """The first of `names` that `cls` (a subclass of `base`) defines differently from `base`."""
    return next((n for n in names if getattr(cls, n, None) is not getattr(base, n, None)), None)


def _match(module: nn.Module) -> tuple[Optional[LayerKind], Optional[str]]:
    """(the kind of `module`, None) or (None or the nearest kind, why it does not apply)."""
    _load_lazy_kinds()
    cls = type(module)
    for klass in cls.__mro__:
        kind = _KINDS.get(klass)
        if kind is None:
            continue
        if cls is not klass:
            if any(issubclass(cls, e) for e in kind.exclude):
                return kind, f"its type {cls.__module__}.{cls.__name__} is not a supported layer kind (its weight is used without calling its forward)"
            method = _overrides(cls, klass, kind.same_function)
            if method is not None:
                return kind, (
                    f"its type {cls.__module__}.{cls.__name__} is not a supported layer kind: it subclasses {kind.name} "
                    f"but overrides `{method}`, so it may compute another function (register a kind for it with "
                    "hf_dendrites.register_layer_kind)"
                )
        return kind, None
    return None, None


def layer_kind_for(module: nn.Module) -> Optional[LayerKind]:
    """The registered kind that matches `module`, or None."""
    kind, reason = _match(module)
    return kind if reason is None else None


def dendritic_class_for(module: nn.Module) -> Optional[type[DendriticLayerMixin]]:
    """The dendritic class that wraps `module`, or None when no registered kind matches it.

    A module of the kind's exact class gets the kind's class (`nn.Linear` -> `DendriticLinear`); a matching subclass
    T gets a class built once from (kind's dendritic class, T), so the converted layer is still a T.
    """
    if isinstance(module, DendriticLayerMixin):
        return None
    kind = layer_kind_for(module)
    if kind is None:
        return None
    cls, dendritic = type(module), kind.dendritic_class
    if getattr(dendritic, "base_class", None) is cls:
        return dendritic
    key = (dendritic, cls)
    if key not in _DERIVED:
        name = "Dendritic" + cls.__name__
        derived = type(name, (dendritic, cls), {"base_class": cls, "__module__": __name__, "__qualname__": name})
        if globals().get(name) is None:  # importable by name, so that a pickled model loads
            globals()[name] = derived
        _DERIVED[key] = derived
    return _DERIVED[key]


# Class names of quantized linear layers hf_dendrites recognises but has no kind for (their packed weight cannot be
# read as a floating-point matrix), and of their packed parameter classes.
QUANTIZED_LINEAR_CLASS_NAMES = frozenset({
    "Linear4bit", "LinearNF4", "LinearFP4", "Linear8bitLt", "Int8Params", "Params4bit",
    "QuantLinear", "QLinear", "WQLinear_GEMM", "WQLinear_GEMV", "WQLinear_Exllama", "WQLinear_ExllamaV2",
    "WQLinear_IPEX", "WQLinear_Marlin", "HQQLinear", "HQQLinearLoRA", "FP8Linear", "Int8Linear", "QuantizedLinear",
    "Linear8bitLtOrig", "BitLinear", "MarlinQuantLinear", "ExllamaQuantLinear", "TorchaoLinear", "EetqLinear",
    "FbgemmFp8Linear", "HiggsLinear", "SpQRLinear", "VptqLinear", "QuantoLinear",
})
# Module prefixes of quantization packages: a linear-like module from one of them is quantized.
QUANTIZATION_PACKAGES = ("bitsandbytes", "optimum", "hqq", "awq", "auto_gptq", "gptqmodel", "quanto", "torchao",
                         "eetq", "fbgemm_gpu", "aqlm", "vptq", "compressed_tensors")


def quantized_description(module: nn.Module) -> Optional[str]:
    """`package.Class` when `module` is a quantized linear layer (by its class, its package or its weight's class)."""
    cls = type(module)
    weight = module.__dict__.get("_parameters", {}).get("weight")
    package = cls.__module__.split(".")[0]
    quantized = (
        cls.__name__ in QUANTIZED_LINEAR_CLASS_NAMES
        or (package in QUANTIZATION_PACKAGES and "linear" in cls.__name__.lower())
        or (weight is not None and type(weight).__name__ in QUANTIZED_LINEAR_CLASS_NAMES)
    )
    return f"{cls.__module__}.{cls.__name__}" if quantized else None


def unsupported_reason(module: nn.Module) -> Optional[str]:
    """Why `module` cannot become dendritic (None when it can)."""
    if isinstance(module, DendriticLayerMixin):
        return "it is already a dendritic layer"
    kind, reason = _match(module)
    if kind is None or reason is not None:
        quantized = quantized_description(module)
        kinds = ", ".join(k.name for k in _KINDS.values())
        if quantized is not None and quantized.split(".")[0] in _LAZY_ERRORS:
            return f"its type {quantized} is a quantized linear layer, but {_LAZY_ERRORS[quantized.split('.')[0]]}"
        if quantized is not None:
            return (
                f"its type {quantized} is a quantized linear layer that hf_dendrites does not support (its packed "
                f"weight is no floating-point matrix); supported layer kinds: {kinds}. Load the model with "
                "bitsandbytes 4-bit / 8-bit quantization (docs/quantization.md), or not quantized"
            )
        if reason is not None:
            return reason
        cls = type(module)
        return f"its type {cls.__module__}.{cls.__name__} is not a supported layer kind ({kinds})"
    return kind.check(module) if kind.check is not None else None


def _grouped_conv(module: nn.Module) -> Optional[str]:
    return f"grouped convolutions (groups={module.groups}) are not supported" if module.groups != 1 else None


register_layer_kind(
    nn.Linear,
    DendriticLinear,
    name="torch.nn.Linear",
    all_linear=True,
    # nn.MultiheadAttention reads its out_proj's weight without calling forward: dendrites there would do nothing.
    exclude=(nn.modules.linear.NonDynamicallyQuantizableLinear,),
)
register_layer_kind(Conv1D, DendriticConv1D, name="transformers.Conv1D", all_linear=True)
register_layer_kind(nn.Conv1d, DendriticConv1d, name="torch.nn.Conv1d", check=_grouped_conv, same_function=("forward", "_conv_forward"))
register_layer_kind(nn.Conv2d, DendriticConv2d, name="torch.nn.Conv2d", check=_grouped_conv, same_function=("forward", "_conv_forward"))
