"""Per-example gradients of Linear layers from forward/backward hooks, exact or projected (LoGra-style).

For a Linear layer with input a_t and output gradient d_t at position t, the per-example gradient of
[W | b] is G = sum_t d_t [a_t; 1]^T  ([out, in+1]). Projecting it with a Kronecker-factored matrix
P_out (x) P_in gives P_out^T G P_in = sum_t (P_out^T d_t)(P_in^T [a_t; 1])^T, so each side is projected
first (cheap) and only the small [k_out, k_in] product is formed per example. The cost is one forward
and one backward pass that computes activation gradients only (no weight gradients).
"""

from __future__ import annotations

import fnmatch
import math

import numpy as np
import torch
from torch import nn

from tdastore.config import ProjectionConfig
from tdastore.errors import GradientError
from tdastore.grads.projection import derive_seed


def _side_matrix(seed: int, name: str, dim: int, k: int) -> torch.Tensor | None:
    """[dim, k] Gaussian N(0, 1/k), or None (identity) when the side is already no wider than k."""
    if dim <= k:
        return None
    generator = torch.Generator().manual_seed(derive_seed(seed, name, 0))
    return torch.randn(dim, k, generator=generator).mul_(1.0 / math.sqrt(k))


def with_normaliser(spec: dict, normaliser) -> dict:
    """A gradient computer's spec, naming the normaliser (tdastore/grads/normaliser.py) its rows were scaled by
    (none: the spec as before)."""
    return spec if normaliser is None else {**spec, "normaliser": normaliser.spec()}


def only_linear_parameters(model: nn.Module, patterns: list[str]) -> bool:
    """Whether every selected parameter is a weight or bias of an nn.Linear (hooks can then replace vmap)."""
    owners = {
        f"{name}.{p}" for name, m in model.named_modules() if isinstance(m, nn.Linear) for p in ("weight", "bias")
    }
    selected = [n for n, _ in model.named_parameters() if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)]
    weights = {n for n in selected if n.endswith(".weight")}
    return bool(selected) and all(n in owners and n.rsplit(".", 1)[0] + ".weight" in weights for n in selected)


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D (transformers.pytorch_utils): y = x W + b with W [in, out], a Linear layer transposed."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def is_hookable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def module_dims(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a Linear or Conv1D layer."""
    if is_conv1d(module):
        return int(module.weight.shape[0]), int(module.nf)
    return module.in_features, module.out_features


def block_modules(model: nn.Module) -> list[str]:
    """`modules: auto`: every Linear / Conv1D inside the model's stack of transformer blocks (its longest
    ModuleList: GPT-2 transformer.h, GPT-NeoX gpt_neox.layers, Llama / Mistral model.layers, BERT
    encoder.layer), so embeddings, the LM head and pooler / classifier heads are left out."""
    stacks = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not stacks:
        raise GradientError("gradients.modules: auto needs a model with a stack of blocks (an nn.ModuleList); name "
                            "the modules with patterns instead")  # fmt: skip
    prefix = max(stacks, key=lambda item: len(item[1]))[0] + "."
    return [name for name, m in model.named_modules() if is_hookable(m) and name.startswith(prefix)]


def select_parameters(
    model: nn.Module, patterns: list[str], module_patterns: list[str] | str | None = None
) -> list[str]:
    """Parameter names chosen by gradients.params, or by gradients.modules (every weight and bias of the
    Linear / Conv1D modules whose names match, or "auto": those of the transformer blocks), with an error
    naming what exists when nothing matches."""
    if module_patterns == "auto":
        module_patterns = block_modules(model)
    if module_patterns:
        chosen = [
            name
            for name, m in model.named_modules()
            if is_hookable(m) and any(fnmatch.fnmatchcase(name, pat) for pat in module_patterns)
        ]
        if not chosen:
            names = [name for name, m in model.named_modules() if is_hookable(m)]
            raise GradientError(
                f"gradients.modules {module_patterns} match no Linear / Conv1D module; the model's are: {names[:12]}"
                f"{' ...' if len(names) > 12 else ''}"
            )
        owned = {f"{name}.weight" for name in chosen} | {f"{name}.bias" for name in chosen}
        return [n for n, _ in model.named_parameters() if n in owned]
    selected = [n for n, _ in model.named_parameters() if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)]
    if not selected:
        names = [n for n, _ in model.named_parameters()]
        raise GradientError(
            f"gradients.params {patterns} match no parameter of the model; its parameters are: {names[:12]}"
            f"{' ...' if len(names) > 12 else ''}"
        )
    return selected


def linear_modules(
    model: nn.Module, patterns: list[str], what: str, module_patterns: list[str] | None = None
) -> list[tuple[str, nn.Module, bool]]:
    """(module name, module, bias selected) for every Linear / Conv1D layer whose weight is selected; an
    error when a selected parameter belongs to anything else, since hooks only see those layers."""
    selected = set(select_parameters(model, patterns, module_patterns))
    modules, covered = [], set()
    for name, module in model.named_modules():
        if is_hookable(module) and f"{name}.weight" in selected:
            with_bias = module.bias is not None and f"{name}.bias" in selected
            modules.append((name, module, with_bias))
            covered |= {f"{name}.weight"} | ({f"{name}.bias"} if with_bias else set())
    if selected - covered:
        raise GradientError(
            f"{what} handles the weights (and biases) of Linear / Conv1D layers only; these selected parameters are "
            f"not: {sorted(selected - covered)[:8]}. Narrow gradients.params (or use gradients.modules), or use "
            "projection.kind sparse/gaussian"
        )
    return modules


class LinearHookGradients:
    """Shared machinery: capture each selected Linear layer's inputs and output gradients in one pass."""

    def __init__(self, model: nn.Module, loss_fn, patterns: list[str], what: str, module_patterns=None):
        self.model, self.loss_fn = model, loss_fn
        self.modules = linear_modules(model, patterns, what, module_patterns)
        self.statistics: KroneckerStatistics | None = None
        self.numel = sum(m.weight.numel() + (module_dims(m)[1] if b else 0) for _, m, b in self.modules)

    def param_spec(self) -> dict:
        shapes = {}
        for name, module, with_bias in self.modules:
            shapes[f"{name}.weight"] = list(module.weight.shape)
            if with_bias:
                shapes[f"{name}.bias"] = list(module.bias.shape)
        return {"params": shapes, "numel": self.numel}

    def capture(self, inputs: torch.Tensor, targets: torch.Tensor):
        """-> (losses [B], [(inputs [B, (T,) in], output grads [B, (T,) out]) per module])."""
        captured_inputs: list[torch.Tensor] = []
        captured_outputs: list[torch.Tensor] = []

        def hook(module, args, output):
            captured_inputs.append(args[0].detach())
            captured_outputs.append(output)

        handles = [module.register_forward_hook(hook) for _, module, _ in self.modules]
        try:
            with torch.enable_grad():
                losses = self.loss_fn(self.model(inputs), targets)  # [B]
                # examples are independent, so d(sum of losses)/d(output_b) = d(loss_b)/d(output_b);
                # only activation gradients are computed, never the weight gradients
                out_grads = torch.autograd.grad(losses.sum(), captured_outputs)
        finally:
            for handle in handles:
                handle.remove()
        return losses.detach(), list(zip(captured_inputs, out_grads))

    def __call__(
        self, inputs: torch.Tensor, targets: torch.Tensor, out: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        losses, captured = self.capture(inputs, targets)
        if self.statistics is not None:  # K-FAC factors gathered in the same pass (the build)
            self.statistics.add(captured, inputs)
        batch = inputs.shape[0]
        rows = torch.empty(batch, self.out_dim, device=inputs.device) if out is None else out  # [B, K]
        sq_norms = torch.zeros(batch, device=inputs.device)  # [B]
        col = 0
        for index, (acts, grads) in enumerate(captured):
            col = self._write_module(index, acts, grads, rows, col, sq_norms)
        if not getattr(self, "full_norms", True):  # the stored row's own norm (gradients.full_norms: false)
            sq_norms = rows.pow(2).sum(1)
        return rows, losses, sq_norms


class ExactLinearGradients(LinearHookGradients):
    """Unprojected per-example gradients of Linear layers, written straight into the output rows in the
    layout of PerExampleGradients.flatten (weight [out, in] row-major, then bias): no vmap, one pass."""

    def __init__(self, model: nn.Module, loss_fn, patterns: list[str], config: ProjectionConfig, normaliser=None):
        super().__init__(model, loss_fn, patterns, "the hook-based exact gradient")
        self.out_dim = self.numel
        self.normaliser = normaliser
        self.flat_scale = None  # [numel] S = D^(1/2) in the rows' layout
        if normaliser is not None:
            parts = []
            for name, _, with_bias in self.modules:
                parts.append(normaliser.scale(f"{name}.weight").reshape(-1))
                if with_bias:
                    parts.append(normaliser.scale(f"{name}.bias").reshape(-1))
            self.flat_scale = torch.cat(parts).to(next(model.parameters()).device)

    def spec(self) -> dict:
        spec = {"kind": "none", "in_dim": self.numel, "out_dim": self.numel}
        return with_normaliser(spec, self.normaliser)

    def __call__(self, inputs, targets, out=None):
        rows, losses, sq_norms = super().__call__(inputs, targets, out)
        if self.flat_scale is None:
            return rows, losses, sq_norms
        rows.mul_(self.flat_scale)  # the full gradient, scaled: its norm is the row's
        return rows, losses, rows.pow(2).sum(1)

    def _write_module(self, index, acts, grads, rows, col, sq_norms) -> int:
        _, module, with_bias = self.modules[index]
        batch, n_out, n_in = rows.shape[0], module.out_features, module.in_features
        weight = rows[:, col : col + n_out * n_in].view(batch, n_out, n_in)
        col += n_out * n_in
        if acts.dim() == 2:
            torch.mul(grads.unsqueeze(2), acts.unsqueeze(1), out=weight)  # [B, out, in]
            sq_norms += grads.pow(2).sum(1) * acts.pow(2).sum(1)
            bias = grads  # [B, out]
        else:
            acts = acts.reshape(batch, -1, n_in).float()  # [B, T, in]
            grads = grads.reshape(batch, -1, n_out).float()  # [B, T, out]
            full = torch.bmm(grads.transpose(1, 2), acts)  # [B, out, in]
            weight.copy_(full)
            sq_norms += full.pow(2).sum((1, 2))
            bias = grads.sum(1)  # [B, out]
        if with_bias:
            rows[:, col : col + n_out].copy_(bias)
            sq_norms += bias.pow(2).sum(1)
            col += n_out
        return col


class FactoredLinearGradients(LinearHookGradients):
    """(projected rows [B, K], losses [B], squared full-gradient norms [B]) for the selected Linear layers."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn,
        patterns: list[str],
        config: ProjectionConfig,
        module_patterns=None,
        full_norms: bool = True,
        normaliser=None,
    ):
        super().__init__(model, loss_fn, patterns, "projection.kind 'factored'", module_patterns)
        self.config = config
        self.normaliser = normaliser
        device = next(model.parameters()).device
        # adafactor: (s_out [out], s_in [in (+1)]) per layer, applied to d_t and [a_t; 1] before the projection
        self.layer_scales = (
            [tuple(s.to(device) for s in normaliser.layer_scales(name)) for name, _, _ in self.modules]
            if normaliser is not None
            else None
        )
        self.full_norms = full_norms  # |full per-example gradient|^2 per row: B T^2 (d_in + d_out) extra work
        self.p_out, self.p_in, self.dims = [], [], []
        device = next(model.parameters()).device  # the projections live where the activations are
        for name, module, with_bias in self.modules:
            k_out, k_in = module_factors(config, name)
            d_in, d_out = module_dims(module)
            d_in += int(with_bias)
            p_out = _side_matrix(config.seed, f"{name}.out", d_out, k_out)  # generated on the CPU: same bits
            p_in = _side_matrix(config.seed, f"{name}.in", d_in, k_in)
            self.p_out.append(None if p_out is None else p_out.to(device))
            self.p_in.append(None if p_in is None else p_in.to(device))
            self.dims.append((min(d_out, k_out), min(d_in, k_in)))
        self.out_dim = sum(o * i for o, i in self.dims)

    def spec(self) -> dict:
        spec = {
            "kind": "factored",
            "in_dim": self.numel,
            "out_dim": self.out_dim,
            "seed": self.config.seed,
            "factors": list(self.config.factors),
            "modules": {name: list(dims) for (name, _, _), dims in zip(self.modules, self.dims)},
        }
        return with_normaliser(spec, self.normaliser)

    def _write_module(self, index, acts, grads, rows, col, sq_norms) -> int:
        with_bias, p_out, p_in = self.modules[index][2], self.p_out[index], self.p_in[index]
        k_out, k_in = self.dims[index]
        batch = rows.shape[0]
        target = rows[:, col : col + k_out * k_in].view(batch, k_out, k_in)
        one = 1.0  # the input side's constant for the bias column
        if self.layer_scales is not None:  # rank-one S: d_t (x) s_out and [a_t; 1] (x) s_in
            s_out, s_in = self.layer_scales[index]
            grads, acts = grads.float() * s_out, acts.float() * s_in[: acts.shape[-1]]
            one = s_in[-1] if with_bias else 1.0
        if acts.dim() == 2:  # one position per example: a plain outer product
            acts, grads = acts.float(), grads.float()  # half-precision models: projections sum in float32
            if self.full_norms:
                sq_norms += grads.pow(2).sum(1) * (acts.pow(2).sum(1) + float(with_bias) * one**2)
            left = grads if p_out is None else grads @ p_out  # [B, k_out]
            right = _project_inputs(acts, p_in, with_bias, one)  # [B, k_in]
            torch.mul(left.unsqueeze(2), right.unsqueeze(1), out=target)
            return col + k_out * k_in
        acts = acts.reshape(batch, -1, acts.shape[-1]).float()  # [B, T, in]
        grads = grads.reshape(batch, -1, grads.shape[-1]).float()  # [B, T, out]
        if with_bias:
            acts = torch.cat([acts, acts.new_ones(*acts.shape[:2], 1) * one], dim=2)  # [B, T, in+1]
        if self.full_norms:
            sq_norms += _squared_norm_of_sum_of_outer_products(grads, acts)
        left = grads if p_out is None else grads @ p_out  # [B, T, k_out]
        right = acts if p_in is None else acts @ p_in  # [B, T, k_in]
        target.copy_(torch.bmm(left.transpose(1, 2), right))  # [B, k_out, k_in]
        return col + k_out * k_in


def module_factors(config: ProjectionConfig, name: str) -> tuple[int, int]:
    """[k_out, k_in] of a module: the first projection.module_factors pattern it matches, else factors."""
    for pattern, dims in config.module_factors.items():
        if fnmatch.fnmatchcase(name, pattern):
            if len(dims) != 2 or min(dims) <= 0:
                raise GradientError(f"projection.module_factors['{pattern}'] must be two positive sizes [k_out, k_in]")
            return int(dims[0]), int(dims[1])
    return int(config.factors[0]), int(config.factors[1])


def _project_inputs(acts: torch.Tensor, p_in: torch.Tensor | None, with_bias: bool, one=1.0) -> torch.Tensor:
    """[a; one] @ P_in without concatenating the constant: the bias row of P_in (times one) is added instead."""
    if p_in is None:
        return torch.cat([acts, acts.new_ones(acts.shape[0], 1) * one], dim=1) if with_bias else acts
    if with_bias:
        return torch.addmm(p_in[-1] * one, acts, p_in[:-1])  # [B, k_in]
    return acts @ p_in


def _squared_norm_of_sum_of_outer_products(grads: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
    """|| sum_t d_t a_t^T ||_F^2 per example = sum_{t,s} (d_t . d_s)(a_t . a_s); [B, T, *] -> [B]."""
    if grads.shape[1] == 1:
        return grads.pow(2).sum((1, 2)) * acts.pow(2).sum((1, 2))
    return (torch.bmm(grads, grads.transpose(1, 2)) * torch.bmm(acts, acts.transpose(1, 2))).sum((1, 2))


class KroneckerStatistics:
    """K-FAC factor sums of a factored computer's modules, in float64: per module the projected activation
    second moment A = sum over counted tokens of a~ a~^T ([k_in, k_in]) and the projected output-gradient one
    S = sum over examples and tokens of d~ d~^T ([k_out, k_out]), with the token and example counts. Sums of
    disjoint parts add up, so shards of a build reduce to the factors of the whole data."""

    def __init__(self, computer: FactoredLinearGradients, token_mask=None):
        self.computer, self.token_mask = computer, token_mask  # token_mask(inputs) -> [B, T] or None
        self.a = [np.zeros((k_in, k_in)) for _, k_in in computer.dims]
        self.s = [np.zeros((k_out, k_out)) for k_out, _ in computer.dims]
        self.tokens, self.examples = 0.0, 0

    def add(self, captured, inputs: torch.Tensor) -> None:
        """One batch's captured (activations, output gradients) per module."""
        computer, batch = self.computer, inputs.shape[0]
        mask = self.token_mask(inputs) if self.token_mask is not None else None  # [B, T] or None
        for index, (acts, grads) in enumerate(captured):
            with_bias = computer.modules[index][2]
            p_out, p_in = computer.p_out[index], computer.p_in[index]
            acts = acts.reshape(batch, -1, acts.shape[-1]).double()  # [B, T, in]
            grads = grads.reshape(batch, -1, grads.shape[-1]).double()  # [B, T, out]
            if with_bias:
                acts = torch.cat([acts, acts.new_ones(*acts.shape[:2], 1)], dim=2)
            a = acts if p_in is None else acts @ p_in.double()  # [B, T, k_in]
            d = grads if p_out is None else grads @ p_out.double()  # [B, T, k_out]
            weight = a.new_ones(*a.shape[:2], 1) if mask is None else mask.double()[:, : a.shape[1], None]
            self.a[index] += torch.einsum("bti,btj->ij", a * weight, a).cpu().numpy()
            self.s[index] += torch.einsum("bto,btp->op", d, d).cpu().numpy()
            if index == 0:
                self.tokens += float(weight.sum())
        self.examples += batch

    def arrays(self) -> dict[str, np.ndarray]:
        """For an .npz file: a_<i>, s_<i> per module, and the counts."""
        out = {"tokens": np.array(self.tokens), "examples": np.array(self.examples)}
        for index, (a, s) in enumerate(zip(self.a, self.s)):
            out[f"a_{index}"], out[f"s_{index}"] = a, s
        return out

    @staticmethod
    def reduce(parts: list[dict]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per module (A / tokens, S / examples) from the arrays of disjoint parts."""
        tokens = sum(float(p["tokens"]) for p in parts)
        examples = sum(int(p["examples"]) for p in parts)
        modules = sum(1 for key in parts[0] if key.startswith("a_"))
        return [
            (sum(p[f"a_{i}"] for p in parts) / tokens, sum(p[f"s_{i}"] for p in parts) / examples)
            for i in range(modules)
        ]
