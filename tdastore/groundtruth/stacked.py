"""Every replica's gradient of a Linear/activation stack by hand: batched products in their fastest layouts, no vmap.

Why by hand: vmap(grad(.)) of an MLP spends about 40% of a replica step outside the matrix products on one CPU
thread (batching rules leave strided tensors that make the element-wise kernels several times slower, bias adds
run apart from their products, and autograd picks the slow layout for the first layer's weight gradient:
16 vs 50 GFLOP/s). Written out, the backward pass is three products per layer on contiguous tensors and one
in-place activation kernel; products are then 84% of a step (benchmarks/groundtruth_throughput.py: 0.64 of a
raw torch.mm's FLOP rate, against 0.35-0.42 through vmap).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import grad

# activation -> (forward in place on a fresh tensor, autograd's backward kernel (gradient at the output, output,
# *extra) -> gradient at the input, extra arguments); Identity is no activation at all
_ACTIVATIONS: dict[type, tuple[Callable, Any, tuple] | None] = {
    nn.ReLU: (torch.relu_, torch.ops.aten.threshold_backward, (0,)),
    nn.Tanh: (torch.tanh_, torch.ops.aten.tanh_backward, ()),
    nn.Sigmoid: (torch.sigmoid_, torch.ops.aten.sigmoid_backward, ()),
    nn.Identity: None,
}


class StackedMLP:
    """The gradients of sum_r sum_j weights[r, j] L(f_{theta_r}(x[r, j]), y[r, j]) with respect to each replica's
    parameters theta_r [R, ...], for an nn.Sequential of nn.Linear layers and elementwise activations."""

    def __init__(self, model: nn.Module, per_example_loss: Callable, chunk_bytes: int = 1 << 22):
        self.per_example_loss = per_example_loss
        # Every step's activations, deltas and gradients are written into the same tensors: fresh [R, b, width]
        # tensors are large enough that the C allocator maps and unmaps them each step, and their page faults
        # cost as much as the products did (0.38 -> 0.55 of mm's FLOP rate).
        self.chunk_bytes = chunk_bytes  # one layer's activations of a chunk of replicas (4 MiB: 0.60 -> 0.64)
        self._buffers: dict[tuple, torch.Tensor] = {}
        self.layers: list[tuple[str, bool, tuple | None]] = []  # (name, has bias, activation after it)
        for name, module in model.named_children():
            if isinstance(module, nn.Linear):
                self.layers.append((name, module.bias is not None, None))
            elif _ACTIVATIONS[type(module)] is not None:
                self.layers[-1] = (*self.layers[-1][:2], _ACTIVATIONS[type(module)])  # supports(): one per Linear

    @staticmethod
    def supports(model: nn.Module) -> bool:
        """An nn.Sequential of Linear layers, each followed by at most one supported activation, no buffers,
        every parameter trained."""
        children = list(model.children())
        if not isinstance(model, nn.Sequential) or not children or any(True for _ in model.buffers()):
            return False
        if not all(p.requires_grad for p in model.parameters()):
            return False  # a frozen layer: the general engine trains only what requires grad
        previous_linear = False
        for module in children:
            if isinstance(module, nn.Linear):
                previous_linear = True
            elif type(module) in _ACTIVATIONS and previous_linear:
                previous_linear = False
            else:
                return False
        return isinstance(children[0], nn.Linear)

    def forward(self, params: dict, x: torch.Tensor, keep: bool = False):
        """x [R, b, d] -> outputs [R, b, C]; keep: also every layer's input (for the backward pass)."""
        inputs = []
        h = x
        for index, (name, has_bias, activation) in enumerate(self.layers):
            inputs.append(h)
            weight = params[f"{name}.weight"]  # [R, out, in]
            into = self._buffer(("out", index), (*h.shape[:2], weight.shape[1]), h) if keep else None
            if has_bias:
                h = torch.baddbmm(params[f"{name}.bias"].unsqueeze(1), h, weight.transpose(1, 2), out=into)
            else:
                h = torch.bmm(h, weight.transpose(1, 2), out=into)  # [R, b, out]
            if activation is not None:
                h = activation[0](h)
        return (h, inputs) if keep else h

    def __call__(self, params: dict, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor) -> dict:
        """x [R, b, d], y [R, b, ...], weights [R, b] -> {name: gradient [R, ...]} like params.

        On the CPU replicas go through in chunks whose activations stay in cache: the chunks reuse the same
        buffers, and only the gradients leave each chunk (into slices of [R, ...] tensors)."""
        r, b = weights.shape
        width = max(params[f"{name}.weight"].shape[1] for name, _, _ in self.layers)
        chunk = max(1, min(r, self.chunk_bytes // (b * width * x.element_size())))
        if x.device.type != "cpu":  # a GPU wants few large launches; its caches are not what bounds it
            chunk = r
        grads = {}
        for name, has_bias, _ in self.layers:
            weight = params[f"{name}.weight"]  # [R, out, in]; narrow inputs get their gradient transposed
            shape = weight.shape[:1] + weight.shape[2:0:-1] if _narrow(weight) else weight.shape
            grads[f"{name}.weight"] = self._buffer(("weight", name), shape, weight)
            if has_bias:
                grads[f"{name}.bias"] = self._buffer(("bias", name), params[f"{name}.bias"].shape, weight)
        for start in range(0, r, chunk):
            part = slice(start, start + chunk)
            self._chunk_grads(
                {n: p[part] for n, p in params.items()},
                x[part],
                y[part],
                weights[part],
                {n: g[part] for n, g in grads.items()},
            )
        transposed = {f"{name}.weight" for name, _, _ in self.layers if _narrow(params[f"{name}.weight"])}
        return {n: g.transpose(1, 2) if n in transposed else g for n, g in grads.items()}  # like params

    def _chunk_grads(self, params: dict, x, y, weights, grads: dict) -> None:
        """One chunk's forward and backward passes; its gradients are written into `grads`."""
        out, inputs = self.forward(params, x, keep=True)  # out [r, b, C]
        delta = grad(self._weighted_loss)(out, y, weights)  # [r, b, C] d loss / d output
        for index in range(len(self.layers) - 1, -1, -1):
            name, has_bias, activation = self.layers[index]
            if activation is not None:  # through this layer's activation, from its output
                _, backward, extra = activation
                output = inputs[index + 1] if index + 1 < len(inputs) else out
                delta = backward.grad_input(delta, output, *extra, grad_input=delta)
            h = inputs[index]  # [r, b, in]
            weight = params[f"{name}.weight"]  # [r, out, in]
            if _narrow(weight):  # h^T delta runs ~3x faster than delta^T h here
                torch.bmm(h.transpose(1, 2), delta, out=grads[f"{name}.weight"])  # [r, in, out]
            else:
                torch.bmm(delta.transpose(1, 2), h, out=grads[f"{name}.weight"])  # [r, out, in]
            if has_bias:
                torch.sum(delta, 1, out=grads[f"{name}.bias"])  # [r, out]
            if index > 0:  # the gradient at the previous layer's output [r, b, in]
                delta = torch.bmm(delta, weight, out=self._buffer(("delta", index), h.shape, h))

    def _buffer(self, key: tuple, shape, like: torch.Tensor) -> torch.Tensor:
        """The tensor `key` is written into: the same one for every chunk and step of that shape."""
        key = (*key, tuple(shape), like.dtype, like.device)
        if key not in self._buffers:
            self._buffers[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return self._buffers[key]

    def _weighted_loss(self, out: torch.Tensor, y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        r, b = weights.shape
        losses = self.per_example_loss(out.reshape(r * b, *out.shape[2:]), y.reshape(r * b, *y.shape[2:]))
        return (losses.reshape(r, b) * weights).sum()


def _narrow(weight: torch.Tensor) -> bool:
    """[R, out, in] with fewer inputs than outputs: its gradient is computed as h^T delta, transposed."""
    return weight.shape[2] < weight.shape[1]
