"""The exact path: second-order operators in the model's full parameter space.

The model is a function of one flat parameter vector theta [p]; torch.func gives per-example gradients,
Hessian-vector products (forward-over-reverse) and Gauss-Newton-vector products (J^T H_out J v), all
vmapped over a block of vectors. Linear systems are solved by batched conjugate gradients or LiSSA,
never by forming a p x p matrix, as the paper ran them on 18k-120k-parameter MLPs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from tdastore.config import AttributionConfig
from tdastore.errors import ConfigError, GradientError
from tdastore.grads.per_example import select_parameters
from tdastore.precond.damping import resolve_damping
from tdastore.tasks.base import Examples

MatVec = Callable[[torch.Tensor], torch.Tensor]  # [m, p] -> [m, p]


class FullSpace:
    """theta -> losses of a task's model on its data, with the products second-order methods need."""

    def __init__(
        self, model: nn.Module, loss_fn, test_fn, patterns: list[str], train: Examples, config: AttributionConfig
    ):
        self.model, self.loss_fn, self.test_fn, self.train, self.config = model, loss_fn, test_fn, train, config
        self.names = select_parameters(model, patterns)
        params = dict(model.named_parameters())
        self.shapes = [tuple(params[n].shape) for n in self.names]
        self.sizes = [params[n].numel() for n in self.names]
        self.p = sum(self.sizes)
        if self.p > config.max_exact_params:
            raise ConfigError(
                f"the exact path needs {self.p:,} parameters in full space, above attribution.max_exact_params="
                f"{config.max_exact_params:,}: use attribution.path: projected (a fitted matrix in the store's "
                "space), narrow gradients.params, or raise the limit"
            )
        self.theta = torch.cat([params[n].detach().reshape(-1) for n in self.names])  # [p]
        self.device = self.theta.device  # data batches follow the model (config `device`)
        self.frozen = {n: t.detach() for n, t in params.items() if n not in self.names}
        self.frozen.update(dict(model.named_buffers()))
        self.n = len(train)
        self._lambda_0: float | None = None
        self._extremes: dict[str, tuple[float, float]] = {}  # curvature -> (largest, lowest eigenvalue)

    # -- the model as a function of theta -------------------------------------------------------
    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: t.view(s) for n, t, s in zip(self.names, torch.split(theta, self.sizes), self.shapes)}

    def outputs(self, theta: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, {**self.unflatten(theta), **self.frozen}, (inputs,))

    def batches(self, data: Examples, size: int | None = None) -> Iterator[Examples]:
        size = size or self.config.batch_size
        for start in range(0, len(data), size):
            yield data.slice(start, min(start + size, len(data))).to(self.device)

    # -- gradients ------------------------------------------------------------------------------
    def example_grads(self, data: Examples, fn=None) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, per-example gradients [b, p]) of `fn` (default the loss) over `data`."""
        fn = fn or self.loss_fn

        def one(theta, x, y):
            return fn(self.outputs(theta, x.unsqueeze(0)), y.unsqueeze(0)).squeeze(0)

        per_example = vmap(grad(one), in_dims=(None, 0, 0))
        start = 0
        for part in self.batches(data):
            yield start, per_example(self.theta, part.inputs, part.targets)
            start += len(part)

    def position_products(self, vectors: torch.Tensor, one: Examples, fn=None) -> torch.Tensor:
        """[m, T]: v_j . G_t for one example of T positions, G_t the part of its gradient that flows through
        position t's use of every covered parameter, so the sum over t is v_j . grad (token-level attribution on
        the exact path). Every module holding covered parameters is applied position by position (Linear,
        GPT-2's Conv1D, embeddings, norm layers, the tied head): its term at t is the output gradient at t times
        the module's jvp along v_j with its inputs fixed. Memory: one example's activations and m vectors."""
        fn = fn or self.loss_fn
        one = one.to(self.device)
        length = one.inputs.shape[-1]
        covered = set(self.names)
        name_of = {id(p): n for n, p in self.model.named_parameters() if n in covered}  # a tied weight: one name
        pieces = [self.unflatten(v) for v in vectors]  # [{name: [shape]}] per vector
        calls: list[tuple] = []

        def record(module, args, kwargs, output):
            calls.append((module, args, kwargs, output))

        handles = [
            module.register_forward_hook(record, with_kwargs=True)
            for module in self.model.modules()
            if any(id(p) in name_of for p in module.parameters(recurse=False))
        ]
        try:
            with torch.enable_grad():
                loss = fn(self.model(one.inputs), one.targets).sum()
                deltas = torch.autograd.grad(loss, [c[3] for c in calls], allow_unused=True)
        finally:
            for handle in handles:
                handle.remove()
        out = torch.zeros(len(pieces), length, dtype=torch.float64, device=self.device)
        for (module, args, kwargs, output), delta in zip(calls, deltas):
            if delta is None:
                continue
            if output.dim() < 2 or output.shape[0] != 1 or output.shape[1] != length:
                raise ConfigError(
                    f"token shares on the exact path need every module with covered parameters applied position by "
                    f"position (output [1, T, ...]); {type(module).__name__} gives {tuple(output.shape)}: narrow "
                    "gradients.params or use the projected path"
                )
            mine = [(local, p) for local, p in module.named_parameters(recurse=False) if id(p) in name_of]
            own = {local: p.detach() for local, p in mine}
            names = {local: name_of[id(p)] for local, p in mine}
            fixed_args = tuple(a.detach() if torch.is_tensor(a) else a for a in args)
            fixed_kwargs = {k: v.detach() if torch.is_tensor(v) else v for k, v in kwargs.items()}

            def apply(params, module=module, fixed_args=fixed_args, fixed_kwargs=fixed_kwargs):
                return functional_call(module, params, fixed_args, fixed_kwargs)

            for j, piece in enumerate(pieces):
                tangents = {local: piece[names[local]].to(own[local].dtype) for local in own}
                _, moved = jvp(apply, (own,), (tangents,))  # d output / d eps along v_j, output's shape
                out[j] += (delta.double() * moved.double()).reshape(1, length, -1).sum(2)[0]
        return out

    def mean_loss_grad(self) -> torch.Tensor:
        """grad R(D) [p], R = mean training loss."""
        total = torch.zeros(self.p, device=self.device)
        for _, block in self.example_grads(self.train):
            total += block.sum(0)
        return total / self.n

    def damping(self, curvature: str = "gauss_newton") -> tuple[float, float]:
        """(lambda, lambda_0): lambda_0 is the mean squared entry of the training gradients (one pass, kept);
        with damping_factor auto, lambda comes from `curvature`'s extreme eigenvalues (precond/damping.py)."""
        if self._lambda_0 is None:
            total = sum(float(block.pow(2).sum()) for _, block in self.example_grads(self.train))
            self._lambda_0 = total / (self.n * self.p)
        factor = self.config.damping_factor
        if factor != "auto":
            return resolve_damping(factor, self._lambda_0, 0.0, 0.0), self._lambda_0
        if curvature not in self._extremes:  # power iteration (and Lanczos for the Hessian), once per curvature
            matvec = self.operator(curvature)
            largest = largest_eigenvalue(matvec, self.p, device=self.device)
            # Gauss-Newton is positive semi-definite (convex output losses): its lowest eigenvalue is taken as 0
            lowest = lowest_eigenvalue(matvec, self.p, device=self.device) if curvature == "hessian" else 0.0
            self._extremes[curvature] = (largest, lowest)
        largest, lowest = self._extremes[curvature]
        return resolve_damping(factor, self._lambda_0, largest, lowest), self._lambda_0

    # -- curvature products ---------------------------------------------------------------------
    def hvp(self, vectors: torch.Tensor, data: Examples | None = None) -> torch.Tensor:
        """Hessian of the mean loss over `data` (default: all training rows) times vectors [m, p]."""
        data = data or self.train
        out = torch.zeros_like(vectors)
        for part in self.batches(data):

            def batch_loss(theta, part=part):
                return self.loss_fn(self.outputs(theta, part.inputs), part.targets).sum()

            out += vmap(lambda v: jvp(grad(batch_loss), (self.theta,), (v,))[1])(vectors)
        return out / len(data)

    def gnvp(self, vectors: torch.Tensor, data: Examples | None = None) -> torch.Tensor:
        """Gauss-Newton matrix (1/n) sum_i J_i^T H_out,i J_i times vectors [m, p]."""
        data = data or self.train
        out = torch.zeros_like(vectors)
        for part in self.batches(data):

            def f(theta, part=part):
                return self.outputs(theta, part.inputs)  # [b, out]

            def summed_loss(outputs, part=part):
                return self.loss_fn(outputs, part.targets).sum()

            outputs, pullback = vjp(f, self.theta)

            def one(v):
                jv = jvp(f, (self.theta,), (v,))[1]  # [b, out]
                h_jv = jvp(grad(summed_loss), (outputs,), (jv,))[1]  # [b, out]
                return pullback(h_jv)[0]  # [p]

            out += vmap(one)(vectors)
        return out / len(data)

    def operator(self, curvature: str) -> MatVec:
        return self.gnvp if curvature == "gauss_newton" else self.hvp


def conjugate_gradients(matvec: MatVec, rhs: torch.Tensor, damping: float, tol: float, max_iter: int) -> torch.Tensor:
    """Solve (A + damping I) X = rhs for every row of rhs [m, p] at once (columns independent)."""
    x = torch.zeros_like(rhs, dtype=torch.float64)
    b = rhs.double()
    r = b.clone()
    d = r.clone()
    rs = (r * r).sum(1)  # [m]
    target = (tol * b.norm(dim=1)) ** 2
    for _ in range(max_iter):
        if bool((rs <= target).all()):
            break
        ad = matvec(d.float()).double() + damping * d
        curvature = (d * ad).sum(1)
        if bool((curvature <= 0).any()):
            raise GradientError(
                "conjugate gradients met a direction of non-positive curvature: the damped Hessian is not "
                "positive definite; raise attribution.damping_factor or use if_gn (Gauss-Newton)"
            )
        alpha = torch.where(rs > target, rs / curvature, torch.zeros_like(rs))
        x += alpha[:, None] * d
        r -= alpha[:, None] * ad
        rs_new = (r * r).sum(1)
        d = r + (rs_new / rs.clamp_min(1e-300))[:, None] * d
        rs = rs_new
    return x.float()


def largest_eigenvalue(matvec: MatVec, p: int, iters: int = 30, seed: int = 0, device=None) -> float:
    """Power iteration on a symmetric operator (start drawn on the host: the same on every device)."""
    v = torch.randn(1, p, generator=torch.Generator().manual_seed(seed)).to(device)
    v /= v.norm()
    value = 0.0
    for _ in range(iters):
        w = matvec(v)
        value = float((w * v).sum())
        v = w / w.norm().clamp_min(1e-30)
    return abs(value)


def lowest_eigenvalue(matvec: MatVec, p: int, tol: float = 1e-3, device=None) -> float:
    """The smallest (most negative) eigenvalue of a symmetric operator, by Lanczos (ARPACK)."""
    from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

    def apply(v):
        return matvec(torch.as_tensor(v, dtype=torch.float32, device=device).reshape(1, -1))[0].double().cpu().numpy()

    operator = LinearOperator((p, p), matvec=apply, dtype=np.float64)
    start = np.random.default_rng(0).normal(size=p)
    try:
        return float(eigsh(operator, k=1, which="SA", tol=tol, v0=start, return_eigenvectors=False)[0])
    except ArpackNoConvergence as err:
        if len(err.eigenvalues):
            return float(err.eigenvalues[0])  # the best estimate Lanczos reached
        raise GradientError(
            "the Hessian's lowest eigenvalue did not converge (Lanczos): set attribution.damping_factor to a number "
            "and attribution.hessian_auto_damping: false, or use if_gn (Gauss-Newton, positive semi-definite)"
        ) from None


def lissa(
    matvec: MatVec,
    rhs: torch.Tensor,
    damping: float,
    scale: float,
    depth: int,
    sampled: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Truncated Neumann series: x_{j+1} = b + (I - (A + damping I)/scale) x_j, returned as x_J / scale.

    With `sampled` (vectors, step) -> A-on-a-minibatch times vectors, it is the stochastic LiSSA of the paper.
    """
    x = rhs.clone()
    for step in range(1, depth):
        product = matvec(x) if sampled is None else sampled(x, step)
        x = rhs + x - (product + damping * x) / scale
    return x / scale


def _is_finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def check_solution(x: torch.Tensor, method: str) -> torch.Tensor:
    if not _is_finite(x):
        raise GradientError(
            f"{method}: the solve diverged (NaN/Inf); for LiSSA raise attribution.lissa_scale or lower lissa_depth, "
            "otherwise raise attribution.damping_factor"
        )
    return x
