"""Fast forward and backward of dendritic layers.

The reference formulation of a dendritic layer (`DendriticLayerMixin.dendrite_output`) is a handful of
autograd ops: ``z = D(x)``, ``a = phi(z)``, ``a * w``, ``.sum(K)``, ``y + ...``. Each allocates and walks a
tensor of the size of the dendrites' output ([tokens, K, N]), and so does each of their backward functions.
On a CPU (and for large K on a GPU) that memory traffic, not the matmuls, is what separates a dendritic layer
from a dense layer of width (1+K)*N. This module computes the same thing with as few passes and allocations as
eager PyTorch allows:

- the activation runs in place on the matmul's output (tanh, sigmoid and relu take their derivative from the
  output, so z need not be kept); ``y += w_k * a_k`` is one in-place ``addcmul_`` per dendrite on the base
  output;
- backward writes ``dL/dz`` over the saved activations (each a_k is dead once it has served ``dL/dw_k`` and
  the derivative), so it allocates no [tokens, K, N] buffer, feeds it to the matmuls, and accumulates ``dL/dx``
  of the base and the dendrites with one in-place ``addmm_``;
- autograd keeps exactly what it would keep anyway: the layer input and the dendrite activations (plus the
  pre-activations for gelu / silu, whose derivative needs them).

One consequence of reusing the saved activations: backward can run once per forward pass. Backpropagating twice
through the same graph (``retain_graph=True``) raises a clear error; layers with ``dendrite_fast_path = False``
support it.

`dendritic_matmul` serves `nn.Linear` and transformers' `Conv1D` (the kinds that are one matmul). The base
output is computed by the very call the plain layer makes, so adding dendrites with zero output weights keeps
the output bit for bit. Convolutions, `torch.compile` and ``dendrite_fast_path = False`` use the reference
autograd formulation (under `torch.compile`, inductor fuses those elementwise ops itself).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

# Activations whose derivative is a function of their output: they can overwrite their input in place.
_INPLACE_ACTIVATIONS = {
    "tanh": torch.Tensor.tanh_,
    "sigmoid": torch.Tensor.sigmoid_,
    "relu": torch.Tensor.relu_,
}


def activate_(z: torch.Tensor, activation: str, kdim: int, cascade: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """a_k = phi(z_k + sum_{j<k} c_kj a_j) for pre-activations `z` stacked on axis `kdim`.

    `z` must be a tensor nobody else needs (it is overwritten). `cascade` is None or holds the rows c_kj
    (row k*(k-1)/2 + j) shaped to broadcast against ``z.select(kdim, k)``. Returns ``(a, z_or_None)``: the
    activations, and the (cascade-updated) pre-activations when the derivative needs them (gelu, silu).
    """
    inplace = _INPLACE_ACTIVATIONS.get(activation)
    K = z.shape[kdim]
    if inplace is not None:
        a, saved_z = z, None
    else:
        a, saved_z = torch.empty_like(z), z
    if cascade is None or K == 1:
        if inplace is not None:
            inplace(z)
        else:
            _activation_into(activation, z, a)
        return a, saved_z
    # Cascade: dendrite k needs the activations of dendrites j < k, so go in order.
    for k in range(K):
        z_k = z.select(kdim, k)
        first = k * (k - 1) // 2
        for j in range(k):
            z_k.addcmul_(a.select(kdim, j), cascade[first + j])
        if inplace is not None:
            inplace(z_k)
        else:
            _activation_into(activation, z_k, a.select(kdim, k))
    return a, saved_z


def _activation_into(activation: str, z: torch.Tensor, out: torch.Tensor) -> None:
    if activation == "gelu":
        torch.ops.aten.gelu.out(z, out=out)
    elif activation == "silu":
        torch.ops.aten.silu.out(z, out=out)
    else:
        raise ValueError(f"Unknown dendrite activation {activation!r}.")


def activation_backward(activation: str, grad: torch.Tensor, a: torch.Tensor, z: Optional[torch.Tensor], out: torch.Tensor) -> None:
    """out <- grad * phi'(z), from the saved output `a` (tanh, sigmoid, relu) or input `z`; `out` may be `a`."""
    if activation == "tanh":
        torch.ops.aten.tanh_backward.grad_input(grad, a, grad_input=out)
    elif activation == "sigmoid":
        torch.ops.aten.sigmoid_backward.grad_input(grad, a, grad_input=out)
    elif activation == "relu":
        # relu(z) <= 0 exactly where z <= 0, so the output gives the same mask as the input.
        torch.ops.aten.threshold_backward.grad_input(grad, a, 0, grad_input=out)
    elif activation == "gelu":
        torch.ops.aten.gelu_backward.grad_input(grad, z, grad_input=out)
    elif activation == "silu":
        torch.ops.aten.silu_backward.grad_input(grad, z, grad_input=out)
    else:
        raise ValueError(f"Unknown dendrite activation {activation!r}.")


def add_weighted_(y: torch.Tensor, a: torch.Tensor, w: torch.Tensor, kdim: int) -> torch.Tensor:
    """y += sum_k w[k] * a_k in place (one pass over y per dendrite, no [.., K, N] temporary)."""
    for k in range(a.shape[kdim]):
        y.addcmul_(a.select(kdim, k), w[k])
    return y


class MatmulSpec(NamedTuple):
    """The non-tensor arguments of `DendriticMatmulFunction`."""

    activation: str
    # transformers Conv1D keeps its weights (in, out); nn.Linear keeps them (out, in).
    transposed: bool
    # Perforated backward (correlation rule): no error flows from the dendrites into x.
    detach_input: bool


def _base_output(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], transposed: bool) -> torch.Tensor:
    """The base layer's output as [tokens, N], computed by the same call the plain layer makes."""
    if transposed:  # Conv1D.forward: torch.addmm(bias, x.view(-1, nx), weight)
        flat = x.reshape(-1, x.shape[-1])
        return torch.mm(flat, weight) if bias is None else torch.addmm(bias, flat, weight)
    return F.linear(x, weight, bias).reshape(-1, weight.shape[0])


def _dendrite_preactivations(
    x2: torch.Tensor,
    d_weight: torch.Tensor,
    d_bias: torch.Tensor,
    lora_b: Optional[torch.Tensor],
    K: int,
    N: int,
    transposed: bool,
) -> tuple[torch.Tensor, Optional[torch.Tensor], int]:
    """z for all dendrites: ([tokens, K, N] full-shape / [K, tokens, N] low-rank, h or None, dendrite axis)."""
    M = x2.shape[0]
    if lora_b is None:
        z = torch.addmm(d_bias, x2, d_weight) if transposed else F.linear(x2, d_weight, d_bias)
        return z.view(M, K, N), None, 1
    r = lora_b.shape[-1]
    h = torch.mm(x2, d_weight) if transposed else F.linear(x2, d_weight)  # [M, K*r]
    # One batched matmul over dendrites; bias added by the same kernel.
    z = torch.baddbmm(d_bias.view(K, 1, N), h.view(M, K, r).transpose(0, 1), lora_b.transpose(1, 2))
    return z, h, 0


def _matmul_forward(x, weight, bias, d_weight, d_bias, lora_b, d_out, cascade, spec: MatmulSpec):
    """Shared by the autograd Function and the no-grad path: (y [tokens, N], x2, a, z_saved, h, kdim)."""
    K, N = d_out.shape
    x2 = x.reshape(-1, x.shape[-1])
    y = _base_output(x, weight, bias, spec.transposed)
    z, h, kdim = _dendrite_preactivations(x2, d_weight, d_bias, lora_b, K, N, spec.transposed)
    a, z_saved = activate_(z, spec.activation, kdim, cascade)
    add_weighted_(y, a, d_out, kdim)
    return y, x2, a, z_saved, h, kdim


class DendriticMatmulFunction(torch.autograd.Function):
    """y = base(x) + sum_k w_k * phi(D_k x + b_k [+ cascade]) for Linear / Conv1D, with a hand-written backward.

    Inputs: x [..., in], weight, bias (may be None), d_weight (full-shape D or low-rank A, in the layer's
    layout), d_bias [K*N], lora_b ([K, N, r] or None), d_out [K, N], cascade ([K(K-1)/2, N] or None), spec.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, d_weight, d_bias, lora_b, d_out, cascade, spec: MatmulSpec):
        y, x2, a, z_saved, h, kdim = _matmul_forward(x, weight, bias, d_weight, d_bias, lora_b, d_out, cascade, spec)
        ctx.spec, ctx.kdim, ctx.x_shape = spec, kdim, x.shape
        ctx.save_for_backward(x2, weight, d_weight, lora_b, d_out, cascade, a, z_saved, h)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        if getattr(ctx, "consumed", False):
            raise RuntimeError(
                "The fast backward of a dendritic layer reuses the memory of its saved activations, so it runs once "
                "per forward pass. To backpropagate through the same graph twice (retain_graph=True), use the "
                "reference formulation: set `dendrite_fast_path = False` on the dendritic layers."
            )
        x2, weight, d_weight, lora_b, d_out, cascade, a, z_saved, h = ctx.saved_tensors
        spec, kdim = ctx.spec, ctx.kdim
        need_x, need_w, need_b, need_dw, need_db, need_lb, need_out, need_c = ctx.needs_input_grad[:8]
        K, N = d_out.shape
        M = x2.shape[0]
        g = grad.reshape(M, N)
        t = spec.transposed
        need_x_dendrites = need_x and not spec.detach_input
        need_gz = need_x_dendrites or need_dw or need_db or need_lb or need_c

        g_out = torch.empty_like(d_out) if need_out else None
        g_c = torch.zeros_like(cascade) if need_c else None
        scratch = torch.empty_like(g) if (need_out or need_gz) else None
        # dL/dz_k overwrites a_k once a_k has served, so backward allocates no [tokens, K, N] buffer (on a CPU a
        # fresh one costs about as much as a pass over it, in page faults). Reverse order: with a cascade,
        # dL/da_k collects the errors of the later dendrites it feeds, already in their slots.
        if need_gz:
            ctx.consumed = True
        for k in reversed(range(K)):
            a_k = a.select(kdim, k)
            if need_out:  # dL/dw_k = sum over tokens of g * a_k
                torch.sum(torch.mul(g, a_k, out=scratch), 0, out=g_out[k])
            if not need_gz:
                continue
            grad_a = torch.mul(g, d_out[k], out=scratch)
            if cascade is not None:
                for later in range(k + 1, K):
                    grad_a.addcmul_(a.select(kdim, later), cascade[later * (later - 1) // 2 + k])
            activation_backward(spec.activation, grad_a, a_k, None if z_saved is None else z_saved.select(kdim, k), out=a_k)
            if need_c:  # dL/dc_kj = sum over tokens of dL/dz_k * a_j (a_j, j < k, is still intact)
                first = k * (k - 1) // 2
                for j in range(k):
                    torch.sum(torch.mul(a_k, a.select(kdim, j), out=scratch), 0, out=g_c[first + j])
        gz = a if need_gz else None

        g_x = g_w = g_b = g_dw = g_db = g_lb = None
        if need_x:
            g_x = torch.mm(g, weight.t()) if t else torch.mm(g, weight)
        if need_w:
            g_w = torch.mm(x2.t(), g) if t else torch.mm(g.t(), x2)
        if need_b:
            g_b = g.sum(0)
        if need_db:
            g_db = gz.view(M, K * N).sum(0) if kdim == 1 else gz.sum(1).reshape(K * N)
        if lora_b is None:
            gz2 = gz.view(M, K * N) if gz is not None else None
            if need_dw:
                g_dw = torch.mm(x2.t(), gz2) if t else torch.mm(gz2.t(), x2)
            if need_x_dendrites:
                g_x.addmm_(gz2, d_weight.t() if t else d_weight)
        else:
            r = lora_b.shape[-1]
            if need_lb:
                g_lb = torch.bmm(gz.transpose(1, 2), h.view(M, K, r).transpose(0, 1))  # [K, N, r]
            if need_dw or need_x_dendrites:
                gh = torch.bmm(gz, lora_b).transpose(0, 1).reshape(M, K * r)  # dL/dh
                if need_dw:
                    g_dw = torch.mm(x2.t(), gh) if t else torch.mm(gh.t(), x2)
                if need_x_dendrites:
                    g_x.addmm_(gh, d_weight.t() if t else d_weight)
        if g_x is not None:
            g_x = g_x.view(ctx.x_shape)
        return g_x, g_w, g_b, g_dw, g_db, g_lb, g_out, g_c, None


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except (RuntimeError, ValueError):  # a device type autocast does not know (e.g. meta)
        pass
    return None


def dendritic_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    d_weight: torch.Tensor,
    d_bias: torch.Tensor,
    lora_b: Optional[torch.Tensor],
    d_out: torch.Tensor,
    cascade: Optional[torch.Tensor],
    spec: MatmulSpec,
) -> torch.Tensor:
    """Output of a dendritic Linear (``spec.transposed=False``) or Conv1D (True) layer; see the module docstring.

    Under autocast every floating-point input is cast to the autocast dtype first, as autocast would cast the
    inputs of the matmuls, so backward sees one dtype (the output's dtype is the base layer's under autocast).
    """
    tensors = (x, weight, bias, d_weight, d_bias, lora_b, d_out, cascade)
    dtype = _autocast_dtype(x.device.type)
    if dtype is not None:
        tensors = tuple(t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != dtype else t for t in tensors)
        with torch.autocast(x.device.type, enabled=False):
            return _dispatch(tensors, spec)
    return _dispatch(tensors, spec)


def _dispatch(tensors, spec: MatmulSpec) -> torch.Tensor:
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return DendriticMatmulFunction.apply(*tensors, spec)
    x = tensors[0]
    y = _matmul_forward(*tensors, spec)[0]
    return y.view(*x.shape[:-1], y.shape[-1])
