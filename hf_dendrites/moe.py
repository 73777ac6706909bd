"""Dendrites on the fused experts of transformers' mixture-of-experts (MoE) models.

transformers 5 stores the experts of an MoE layer as one module with 3-D parameters: `gate_up_proj` (`[E, 2I, H]`, or
`up_proj` for experts without a gate) and `down_proj` (`[E, H, I]`), transposed (`[E, in, out]`) in some models
(GPT-OSS), with per-expert biases in some (`gate_up_proj_bias`, `down_proj_bias`). Every such class is decorated with
`transformers.integrations.moe.use_experts_implementation`, which records the layout on each instance (`has_gate`,
`has_bias`, `is_transposed`, `is_concatenated`, `has_post_expert_norm`) and gives them one calling convention:
`experts(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])`. `DendriticExperts` is the dendritic kind of
any module built that way.

Every expert e gets its own K dendrites on both projections. For a projection P (neurons: its output features, N of
them) and a token x routed to expert e:

    z_k = D_{e,k} x + b_{e,k} [+ sum_{j<k} c_{e,kj} a_j]      a_k = phi(z_k)      P'(x) = P_e x [+ bias_e] + sum_k w_{e,k} a_k

so the gate-up projection's output (before the gate / activation) and the down projection's output (before the routing
weight) carry the dendrites, as a `DendriticLinear` in place of each expert's projection would. Dendrites are computed
only for the (token, expert) pairs the router selected: the forward pass sorts the pairs by expert, as transformers'
`grouped_mm` experts implementation does, and runs the base projections and the dendrites as grouped matrix
products over all experts at once (`torch.nn.functional.grouped_mm`; no Python loop over experts where the sizes let
the kernel run, see `_grouped`). An expert that no token reaches computes nothing and its dendrites get zero gradient.

Parameters (per projection `gate_up_proj` / `up_proj` / `down_proj`, named `<projection>_<name>`; all absent while
K == 0):

- `<p>_dendrite_weight`: `[E, K*N, in]` (`[E, in, K*N]` for transposed experts), the layout of the projection itself;
  with `rank=r`, `<p>_dendrite_lora_A` (`[E, K*r, in]` / `[E, in, K*r]`) and `<p>_dendrite_lora_B` (`[E, K, N, r]`).
- `<p>_dendrite_bias`: `[E, K*N]`; `<p>_dendrite_out` (the w): `[E, K, N]`; `<p>_dendrite_cascade`:
  `[E, K*(K-1)/2, N]` with `cascade=True`. Biases, output and cascade weights start at zero, so adding dendrites
  changes nothing (bit for bit, see below).

Exactness. With zero dendrites the module runs the model's own forward (whatever `experts_implementation` the model
uses). With dendrites it computes the projections with transformers' own grouped helper
(`transformers.integrations.moe._grouped_linear`, through `hf_dendrites/trainer_internals.py`) in the order of the
`grouped_mm` implementation, the default of transformers 5: for a model that runs `grouped_mm`, new dendrites change
the outputs by exactly nothing. A model loaded with `experts_implementation="eager"` or `"batched_mm"` gets the same
function from its dendritic experts, equal within float rounding (conversion says so in a warning).

What does not apply: the correlation learning rule (its candidate pools are built for single-weight layers):
conversion with `learning_rule="correlation"` raises an error that says so; inference fusion: `fuse()` leaves the
experts unfused and logs a warning (the model's other layers still fuse). Expert parallelism (experts sharded over
processes) is refused.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any, Optional

import torch
from torch import nn

from .layers import ACTIVATION_FUNCTIONS, DendriticLayerMixin, cascade_rows
from .trainer_internals import grouped_linear

logger = logging.getLogger(__name__)

# Attributes that `use_experts_implementation` sets on every experts instance: the layout the kind reads.
_LAYOUT_ATTRS = ("has_gate", "has_bias", "is_transposed", "is_concatenated", "has_post_expert_norm")
# Per-projection dendrite parameter names (prefixed with the projection's name).
_PROJ_PARAM_NAMES = ("dendrite_weight", "dendrite_lora_A", "dendrite_lora_B", "dendrite_bias", "dendrite_out", "dendrite_cascade")


def is_fused_experts(module: nn.Module) -> bool:
    """True for a transformers experts module with the fused 3-D layout that `DendriticExperts` supports."""
    if isinstance(module, DendriticLayerMixin) or not all(hasattr(module, a) for a in _LAYOUT_ATTRS):
        return False
    first = "gate_up_proj" if module.has_gate else "up_proj"
    params = module._parameters
    e = getattr(module, "num_experts", None)
    return (
        isinstance(e, int)
        and all(isinstance(params.get(n), torch.Tensor) and params[n].dim() == 3 and params[n].shape[0] == e for n in (first, "down_proj"))
        and callable(getattr(module, "_apply_gate", None))
    )


def looks_like_experts(module: nn.Module) -> bool:
    """A module that holds experts in its own parameters (not as submodules): a fused layout, supported or not.

    Used to warn about MoE layers left without dendrites: class names with "Expert" that own a parameter of two or
    more dimensions (DBRX's `DbrxExpertGLU`, JetMoE's `JetMoeParallelExperts`, Llama 4's `Llama4TextExperts`).
    """
    if "expert" not in type(module).__name__.lower():
        return False
    return any(p is not None and p.dim() >= 2 for p in module._parameters.values())


class DendriticExperts(DendriticLayerMixin):
    """Dendrites for every expert of a fused transformers experts module (see the module docstring).

    A layer kind (`hf_dendrites.register_layer_kind`, registered by `register_experts_kinds` for each fused experts
    class a converted model uses): the converted module is an instance of a class built from this one and the
    experts' own class (`DendriticMixtralExperts` is a `MixtralExperts`) and holds the same parameter objects.
    """

    supports_fusion = False
    supports_correlation = False
    dendrite_fast_path = False
    # Every name the kind may use (experts with a gate have `gate_up_proj_*`, without one `up_proj_*`); the mixin
    # registers them all, unused ones stay None (absent from the state dict).
    dendrite_param_names = tuple(f"{p}_{n}" for p in ("gate_up_proj", "up_proj", "down_proj") for n in _PROJ_PARAM_NAMES)

    @classmethod
    def from_base_layer(cls, base: nn.Module, *args: Any, **kwargs: Any) -> "DendriticExperts":
        """Wrap a fused experts module (same parameter objects). Called on `DendriticExperts` itself, it registers
        the kind for the module's class and builds the class that wraps it (`DendriticMixtralExperts`)."""
        reason = experts_check(base)
        if reason is not None:
            raise TypeError(f"Cannot give dendrites to {type(base).__name__}: {reason}.")
        if cls is DendriticExperts:
            from .layers import dendritic_class_for

            register_experts_kinds(base)
            return dendritic_class_for(base).from_base_layer(base, *args, **kwargs)
        return super().from_base_layer(base, *args, **kwargs)

    # ------------------------------------------------------------------ layout
    @property
    def projections(self) -> tuple[str, str]:
        """The names of the two projections: (`gate_up_proj` or `up_proj`, `down_proj`)."""
        return ("gate_up_proj" if self.has_gate else "up_proj", "down_proj")

    def _dims(self, proj: str) -> tuple[int, int]:
        """(in, out) features of one expert's projection."""
        w = self._parameters[proj]
        return (w.shape[1], w.shape[2]) if self.is_transposed else (w.shape[2], w.shape[1])

    @property
    def num_neurons(self) -> int:
        """Neurons of the first projection (gate-up outputs); see `_dims` for both."""
        return self._dims(self.projections[0])[1]

    @property
    def fan_in(self) -> int:
        return self._dims(self.projections[0])[0]

    def _weight_shape(self, proj: str, n_out: int) -> tuple[int, ...]:
        n_in, _ = self._dims(proj)
        return (self.num_experts, n_in, n_out) if self.is_transposed else (self.num_experts, n_out, n_in)

    def _reference(self) -> torch.Tensor:
        return self._parameters["down_proj"]

    def _p(self, proj: str, name: str) -> Optional[torch.Tensor]:
        return getattr(self, f"{proj}_{name}")

    # ------------------------------------------------------------------ growth
    @torch.no_grad()
    def add_dendrites(self, n: int = 1, generator: Optional[torch.Generator] = None, *, initialize: bool = True) -> None:
        """Append `n` dendrites to every expert's projections; output weights start at zero (identity)."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}.")
        k_old, E = self.num_dendrites, self.num_experts
        out_dim = 2 if self.is_transposed else 1
        for proj in self.projections:
            n_in, N = self._dims(proj)
            std = self.dendrite_init_scale / math.sqrt(n_in)

            def put(name: str, new: torch.Tensor, dim: int, proj: str = proj) -> None:
                setattr(self, f"{proj}_{name}", self._new_param(self._p(proj, name), new, dim))

            if self.dendrite_rank is None:
                put("dendrite_weight", self._random(self._weight_shape(proj, n * N), std, generator, initialize), out_dim)
            else:
                r = self.dendrite_rank
                put("dendrite_lora_A", self._random(self._weight_shape(proj, n * r), std, generator, initialize), out_dim)
                put("dendrite_lora_B", self._random((E, n, N, r), 1.0 / math.sqrt(r), generator, initialize), 1)
            put("dendrite_bias", self._zeros((E, n * N)), 1)
            put("dendrite_out", self._zeros((E, n, N)), 1)
            if self.dendrite_cascade_enabled:
                k_new = k_old + n
                rows = cascade_rows(k_new) - cascade_rows(k_old)
                if rows:
                    put("dendrite_cascade", self._zeros((E, rows, N)), 1)
        self.num_dendrites = k_old + n

    @torch.no_grad()
    def truncate_dendrites(self, k: int) -> None:
        """Keep only the first `k` dendrites of every expert."""
        if not self._truncation_needed(k):
            return
        if k == 0:
            for name in self.dendrite_param_names:
                if getattr(self, name) is not None:
                    setattr(self, name, None)
            self.num_dendrites = 0
            return
        out_dim = 2 if self.is_transposed else 1
        for proj in self.projections:
            N = self._dims(proj)[1]

            def cut(name: str, size: int, dim: int, proj: str = proj) -> None:
                old = self._p(proj, name)
                if old is not None:
                    kept = old.detach().narrow(dim, 0, size).clone()
                    setattr(self, f"{proj}_{name}", nn.Parameter(kept, requires_grad=old.requires_grad))

            if self.dendrite_rank is None:
                cut("dendrite_weight", k * N, out_dim)
            else:
                cut("dendrite_lora_A", k * self.dendrite_rank, out_dim)
                cut("dendrite_lora_B", k, 1)
            cut("dendrite_bias", k * N, 1)
            cut("dendrite_out", k, 1)
            if self.dendrite_cascade_enabled:
                rows = cascade_rows(k)
                if rows:
                    cut("dendrite_cascade", rows, 1)
                else:
                    setattr(self, f"{proj}_dendrite_cascade", None)
        self.num_dendrites = k

    def expected_dendrite_shapes(self, k: int) -> dict[str, tuple[int, ...]]:
        if k == 0:
            return {}
        E, shapes = self.num_experts, {}
        for proj in self.projections:
            N = self._dims(proj)[1]
            if self.dendrite_rank is None:
                shapes[f"{proj}_dendrite_weight"] = self._weight_shape(proj, k * N)
            else:
                r = self.dendrite_rank
                shapes[f"{proj}_dendrite_lora_A"] = self._weight_shape(proj, k * r)
                shapes[f"{proj}_dendrite_lora_B"] = (E, k, N, r)
            shapes[f"{proj}_dendrite_bias"] = (E, k * N)
            shapes[f"{proj}_dendrite_out"] = (E, k, N)
            if self.dendrite_cascade_enabled and k > 1:
                shapes[f"{proj}_dendrite_cascade"] = (E, cascade_rows(k), N)
        return shapes

    def dendrite_parameters(self) -> list[nn.Parameter]:
        return [p for name in self.dendrite_param_names if (p := getattr(self, name)) is not None]

    def base_parameters(self) -> list[nn.Parameter]:
        names = set(self.dendrite_param_names)
        return [p for name, p in self._parameters.items() if p is not None and name not in names]

    @torch.no_grad()
    def dendrite_weight_ratio(self, get: Any, start: int, k_all: int) -> float:
        """`DendriticModel.dendrite_weight_ratios` for experts: RMS(w) * RMS(D) / RMS(P) over both projections'
        dendrites `start .. k_all-1` (`get(name)` reads a parameter by name from the layer or a state dict)."""

        def ms(t: torch.Tensor) -> float:
            return float(t.detach().float().pow(2).mean()) if t.numel() else 0.0

        out_dim = 2 if self.is_transposed else 1
        w2 = d2 = p2 = 0.0
        for proj in self.projections:
            N = self._dims(proj)[1]
            w2 += ms(get(f"{proj}_dendrite_out")[:, start:k_all])
            if self.dendrite_rank is None:
                d2 += ms(get(f"{proj}_dendrite_weight").narrow(out_dim, start * N, (k_all - start) * N))
            else:
                r = self.dendrite_rank
                a = get(f"{proj}_dendrite_lora_A").narrow(out_dim, start * r, (k_all - start) * r).float()
                a = a if self.is_transposed else a.transpose(1, 2)  # [E, in, k*r]
                a = a.unflatten(2, (k_all - start, r))  # [E, in, k, r]
                b = get(f"{proj}_dendrite_lora_B")[:, start:k_all].float()  # [E, k, N, r]
                d2 += ms(torch.einsum("eikr,eknr->ekni", a, b))
            p2 += ms(get(proj))
        return math.sqrt(w2 / 2) * math.sqrt(d2 / 2) / math.sqrt(p2 / 2) if p2 > 0 else float("inf")

    # ------------------------------------------------------------------ what does not apply
    def fuse(self) -> None:
        """Inference fusion does not apply (`supports_fusion = False`): the layer stays unfused, with a warning, so
        that `DendriticModel.fuse_for_inference()` still fuses a MoE model's other layers."""
        if self.num_dendrites:
            logger.warning(
                "Inference fusion does not apply to dendritic experts (%s): they stay unfused and compute as in "
                "training (one grouped product per projection for the base, one for the dendrites).",
                type(self).__name__,
            )

    def _active(self, proj: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """`<proj>_dendrite_out` and `_cascade` with switched-off dendrites zeroed (see `disable_dendrites`)."""
        out, cascade = self._p(proj, "dendrite_out"), self._p(proj, "dendrite_cascade")
        off = () if self._dendrites_off is None else self.disabled_dendrites
        if not off:
            return out, cascade
        out = out.index_fill(1, torch.tensor(off, device=out.device), 0.0)
        if cascade is not None:
            rows = [k * (k - 1) // 2 + j for k in range(self.num_dendrites) for j in off if j < k]
            if rows:
                cascade = cascade.index_fill(1, torch.tensor(rows, device=cascade.device), 0.0)
        return out, cascade

    # ------------------------------------------------------------------ forward
    def _dendrites(self, proj: str, x: torch.Tensor, experts: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """sum_k w_{e,k} * a_k for the rows `x` ([S, in], sorted by expert `experts`, grouped by `offsets`)."""
        K, (_, N) = self.num_dendrites, self._dims(proj)
        if self.dendrite_detach_input:
            x = x.detach()
        bias = self._p(proj, "dendrite_bias")[experts]  # [S, K*N]
        if self.dendrite_rank is None:
            z = _grouped(x, self._p(proj, "dendrite_weight"), offsets, self.is_transposed, bias)
        else:
            r, S = self.dendrite_rank, x.shape[0]
            h = _grouped(x, self._p(proj, "dendrite_lora_A"), offsets, self.is_transposed)  # [S, K*r]
            # Dendrite k of expert e is one group: rows k-major, each block sorted by expert as x is.
            hk = h.view(S, K, r).transpose(0, 1).reshape(K * S, r)
            b = self._p(proj, "dendrite_lora_B").transpose(0, 1).reshape(K * self.num_experts, N, r)
            shift = torch.arange(K, device=offsets.device, dtype=offsets.dtype).unsqueeze(1) * S
            z = _grouped(hk, b, (offsets.unsqueeze(0) + shift).reshape(-1), False)  # [K*S, N]
            z = z.view(K, S, N).transpose(0, 1).reshape(S, K * N) + bias
        z = z.view(-1, K, N)
        out, cascade = self._active(proj)
        phi = ACTIVATION_FUNCTIONS[self.dendrite_activation]
        if cascade is None or K == 1:
            a = phi(z)
        else:
            c = cascade[experts]  # [S, rows, N]
            acts: list[torch.Tensor] = []
            for k in range(K):
                z_k, first = z[:, k], k * (k - 1) // 2
                for j in range(k):
                    z_k = z_k + c[:, first + j] * acts[j]
                acts.append(phi(z_k))
            a = torch.stack(acts, 1)
        if K == 1:
            return a.squeeze(1) * out[experts].squeeze(1)
        return (a * out[experts]).sum(1)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.num_dendrites == 0:
            return self.base_class.forward(self, hidden_states, *args, **kwargs)
        if getattr(self, "_is_expert_parallel", False):
            raise ValueError("Dendritic experts do not support expert parallelism (experts sharded over processes).")
        routing = list(args) + [kwargs.pop(n) for n in ("top_k_index", "router_indices", "top_k_weights", "routing_weights") if n in kwargs]
        if len(routing) != 2 or kwargs:
            raise TypeError(
                f"{type(self).__name__}.forward takes (hidden_states, top_k_index, top_k_weights), got "
                f"{len(args)} positional and the keywords {sorted(kwargs)}."
            )
        top_k_index, top_k_weights = routing
        grouped = grouped_linear()
        num_top_k, num_tokens, hidden_dim = top_k_index.size(-1), hidden_states.size(0), hidden_states.size(-1)
        # The (token, expert) pairs sorted by expert, as transformers' grouped_mm experts implementation orders them.
        sample_weights, expert_ids = top_k_weights.reshape(-1), top_k_index.reshape(-1)
        expert_ids_g, perm = torch.sort(expert_ids)
        x = hidden_states[perm // num_top_k]
        sample_weights_g = sample_weights[perm]
        device = hidden_states.device
        counts_in = expert_ids_g.float() if device.type in ("cpu", "mps") else expert_ids_g.int()
        counts = torch.histc(counts_in, bins=self.num_experts, min=0, max=self.num_experts - 1)
        offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)

        first, down = self.projections
        bias = getattr(self, f"{first}_bias")[expert_ids_g] if self.has_bias else None
        h = grouped(x, getattr(self, first), offsets, bias=bias, is_transposed=self.is_transposed)
        h = h + self._dendrites(first, x, expert_ids_g, offsets)
        h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
        bias = self.down_proj_bias[expert_ids_g] if self.has_bias else None
        y = grouped(h, self.down_proj, offsets, bias=bias, is_transposed=self.is_transposed)
        y = y + self._dendrites(down, h, expert_ids_g, offsets)
        if self.has_post_expert_norm:
            y = self.post_expert_norm(y)
        weighted = y * sample_weights_g.unsqueeze(-1)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.size(0), device=device)
        out = weighted[inverse].view(num_tokens, num_top_k, hidden_dim).sum(dim=1)
        return out.to(hidden_states.dtype)

    def extra_repr(self) -> str:
        rank = "" if self.dendrite_rank is None else f", rank={self.dendrite_rank}"
        cascade = ", cascade=True" if self.dendrite_cascade_enabled else ""
        return (
            f"experts={self.num_experts}, dendrites={self.num_dendrites} per expert and projection, "
            f"activation={self.dendrite_activation}{rank}{cascade}"
        )


def _aligned(*sizes: int, dtype: torch.dtype) -> bool:
    """grouped_mm on the CPU needs every row stride to be a multiple of 16 bytes (its backward raises otherwise)."""
    per = max(1, 16 // torch.empty((), dtype=dtype).element_size())
    return all(s % per == 0 for s in sizes)


def _grouped(
    x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, transposed: bool, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """x @ weight[e] (transposed: [E, in, out]) or x @ weight[e].T ([E, out, in]) for the rows of group e, plus the
    per-row `bias` ([rows, out]) if given.

    One grouped product (transformers' `_grouped_linear`) when the sizes suit the kernel; otherwise, e.g. a rank that
    is not a multiple of 4 in float32 on the CPU, a loop over the groups (the only Python loop over experts).
    """
    n_in, n_out = (weight.shape[1], weight.shape[2]) if transposed else (weight.shape[2], weight.shape[1])
    if x.device.type != "cpu" or _aligned(n_in, n_out, dtype=weight.dtype):
        return grouped_linear()(x, weight, offsets, bias=bias, is_transposed=transposed)
    parts, start = [], 0
    for e, end in enumerate(offsets.tolist()):
        w = weight[e] if transposed else weight[e].t()
        parts.append(x[start:end].to(w.dtype) @ w)
        start = end
    out = torch.cat(parts) if parts else x.new_zeros((0, n_out))
    return out if bias is None else out + bias


# ---------------------------------------------------------------------------------------------- the kind
def experts_check(module: nn.Module) -> Optional[str]:
    """Why a module of a registered experts class cannot get dendrites (None when it can)."""
    if not is_fused_experts(module):
        return f"{type(module).__name__} does not have the fused experts layout (see hf_dendrites.moe)"
    if getattr(module, "_is_expert_parallel", False):
        return "its experts are sharded over processes (expert parallelism), which dendritic experts do not support"
    return None


def register_experts_kinds(model: nn.Module) -> None:
    """Register `DendriticExperts` as the layer kind of every fused experts class in `model` (idempotent).

    transformers has one experts class per MoE architecture (about 70 in 5.25), all built by
    `use_experts_implementation`; registering those a model uses, when it is converted, avoids importing every
    modeling module. "all-linear" selects them (they are the experts' linear projections).
    """
    from .layers import layer_kind_for, register_layer_kind

    for module in model.modules():
        if is_fused_experts(module) and layer_kind_for(module) is None:
            register_layer_kind(type(module), DendriticExperts, all_linear=True, check=experts_check, same_function=())


# ---------------------------------------------------------------------------------------------- targets
# Last name components of the routers and gates of MoE layers: "all-linear" and the defaults never target them.
ROUTER_NAME_PARTS = ("router", "gate")


def is_router(name: str, module: nn.Module, parent: Optional[nn.Module]) -> bool:
    """A routing or gating Linear of an MoE layer (never a dendrite target of "all-linear" or the defaults).

    A Linear whose own name or its parent's contains "router" (`router`, `router_gate`, `modality_router`, JetMoE's
    `router.layer`), or whose name is `gate` or ends in `_gate` (`shared_expert_gate`) and that has one output or sits
    beside an experts module.
    """
    if not isinstance(module, nn.Linear):
        return False
    parts = name.split(".")
    last = parts[-1]
    if any("router" in part for part in parts[-2:]):
        return True
    if last == "gate" or last.endswith("_gate"):
        if module.out_features == 1:
            return True
        if parent is None:
            return False
        return any(
            "expert" in n or is_fused_experts(m) or looks_like_experts(m) for n, m in parent.named_children() if m is not module
        )
    return False


def routers(model: nn.Module) -> set[str]:
    """Names of the router / gate Linears of `model` (see `is_router`)."""
    modules = dict(model.named_modules())
    found = set()
    for name, module in modules.items():
        parent = modules.get(name.rpartition(".")[0]) if name else None
        if is_router(name, module, parent):
            found.add(name)
    return found


def parameter_pattern_error(model: nn.Module, targets: Any, matches: Any) -> Optional[str]:
    """A message when a target pattern names parameters rather than modules (`gate_up_proj` of fused experts).

    `targets` is the config's list or regex, `matches(name, pattern)` the library's matching rule. For a list, each
    entry that matches no module but matches parameter names; for a regex, one that matches no module at all.
    """
    module_names = [n for n, _ in model.named_modules() if n]
    param_names = [n for n, _ in model.named_parameters()]
    entries = [targets] if isinstance(targets, str) else list(targets)
    for entry in entries:
        pattern = entry if isinstance(targets, str) else [entry]
        if any(matches(n, pattern) for n in module_names):
            continue
        hits = [n for n in param_names if matches(n, pattern)]
        if not hits:
            continue
        owner_name = hits[0].rpartition(".")[0]
        owner = model.get_submodule(owner_name)
        short = owner_name.rpartition(".")[2]
        what = "a fused experts module" if is_fused_experts(owner) else "a module"
        return (
            f"target_modules entry {entry!r} names a parameter, not a module: it matches {hits[0]!r} (and "
            f"{len(hits) - 1} more), a parameter of {type(owner).__name__} `{owner_name}`, {what}. Dendrites go on "
            f"modules: target the module that owns it, e.g. target_modules=[{short!r}]"
            + (" (every expert then gets dendrites on its gate_up_proj and down_proj)." if is_fused_experts(owner) else ".")
        )
    return None


def unsupported_experts_share(model: nn.Module, covered: Iterable[str]) -> tuple[float, list[str]]:
    """(share of the model's parameters held by experts modules that get no dendrites, their names).

    Looks for modules that hold experts in their own parameters (`looks_like_experts`) that are neither selected
    (`covered`) nor supported fused experts: their experts stay plain.
    """
    covered = set(covered)
    total = sum(p.numel() for p in model.parameters())
    names, count, seen = [], 0, set()
    for name, module in model.named_modules():
        if name in covered or is_fused_experts(module) or not looks_like_experts(module):
            continue
        names.append(name)
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                count += p.numel()
    return (count / total if total else 0.0), names


def experts_implementation_note(model: nn.Module) -> Optional[str]:
    """A warning when the model's experts run an implementation other than grouped_mm (exactness within rounding)."""
    impl = getattr(getattr(model, "config", None), "_experts_implementation", None)
    if impl in (None, "grouped_mm"):
        return None
    return (
        f"This model runs its experts with experts_implementation={impl!r}; dendritic experts compute the same function "
        "grouped by expert (as 'grouped_mm' does), so once they have dendrites the outputs agree with the plain "
        "model's within float rounding rather than bit for bit. Load the model with experts_implementation="
        "'grouped_mm' (the default) for exact identity at insertion."
    )
