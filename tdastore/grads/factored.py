"""Per-example gradients of Linear layers from forward/backward hooks, exact or projected (LoGra-style).

For a Linear layer with input a_t and output gradient d_t at position t, the per-example gradient of
[W | b] is G = sum_t d_t [a_t; 1]^T  ([out, in+1]). Projecting it with a Kronecker-factored matrix
P_out (x) P_in gives P_out^T G P_in = sum_t (P_out^T d_t)(P_in^T [a_t; 1])^T, so each side is projected
first (cheap) and only the small [k_out, k_in] product is formed per example. The cost is one forward
and one backward pass that computes activation gradients only (no weight gradients).

An embedding table E [num, dim] looked up at ids i_t with output gradient d_t has the gradient
G = sum_t e_(i_t) d_t^T ([num, dim], the weight's own orientation): its projected out side is the row
P_out[i_t] (a gather, never a one-hot product), its in side P_in^T d_t. A weight tied to an LM head
(GPT-2's lm_head.weight is transformer.wte.weight, [vocab, dim] in both) gets one block: the two uses' terms
are in the same orientation and add, so the block is the projection of the parameter's whole gradient.
"""

from __future__ import annotations

import fnmatch
import functools
import math

import numpy as np
import torch
from torch import nn

from tdastore.config import ProjectionConfig
from tdastore.errors import GradientError, StoreError
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
    """A layer whose per-example gradient is a sum of outer products the hooks can see: Linear, Conv1D,
    Embedding."""
    return isinstance(module, (nn.Linear, nn.Embedding)) or is_conv1d(module)


def module_dims(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a Linear or Conv1D layer; (dim, num) of an Embedding (its weight [num, dim] is [out, in])."""
    if is_conv1d(module):
        return int(module.weight.shape[0]), int(module.nf)
    if isinstance(module, nn.Embedding):
        return module.embedding_dim, module.num_embeddings
    return module.in_features, module.out_features


def all_modules(model: nn.Module) -> list[str]:
    """`modules: all`: every Linear / Conv1D / Embedding of the model, LM head included (a head tied to the
    input embedding is that embedding's parameter, covered once). Norm layers' gains and biases are vectors,
    not matrices: a factored projection has no place for them and they are left out."""
    return trained_only(model, [name for name, m in model.named_modules() if is_hookable(m)])


def trained_only(model: nn.Module, names: list[str]) -> list[str]:
    """Of these modules, the ones whose weight trains, where some do and some do not: a PEFT model's LoRA
    layers (its base frozen), so `auto` / `all` attribute the adapter a fine-tuning changed."""
    modules = dict(model.named_modules())
    trained = [name for name in names if modules[name].weight.requires_grad]
    return trained if trained else names


def block_modules(model: nn.Module) -> list[str]:
    """`modules: auto`: every Linear / Conv1D inside the model's stack of transformer blocks (its longest
    ModuleList: GPT-2 transformer.h, GPT-NeoX gpt_neox.layers, Llama / Mistral model.layers, BERT
    encoder.layer), so embeddings, the LM head and pooler / classifier heads are left out; of a PEFT model, the
    LoRA layers (lora_A, lora_B) only."""
    stacks = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not stacks:
        raise GradientError("gradients.modules: auto needs a model with a stack of blocks (an nn.ModuleList); name "
                            "the modules with patterns instead")  # fmt: skip
    prefix = max(stacks, key=lambda item: len(item[1]))[0] + "."
    return trained_only(
        model,
        [
            name
            for name, m in model.named_modules()
            if is_hookable(m) and not isinstance(m, nn.Embedding) and name.startswith(prefix)
        ],
    )


def select_parameters(
    model: nn.Module, patterns: list[str], module_patterns: list[str] | str | None = None
) -> list[str]:
    """Parameter names chosen by gradients.params, or by gradients.modules (every weight and bias of the
    Linear / Conv1D / Embedding modules whose names match, "auto": the transformer blocks' Linear / Conv1D, "all":
    every one), with an error naming what exists when nothing matches. A weight tied to another module's (an LM
    head's) is named once, by its first owner, as named_parameters names it."""
    if module_patterns == "auto":
        module_patterns = block_modules(model)
    elif module_patterns == "all":
        module_patterns = all_modules(model)
    if module_patterns:
        chosen = [
            name
            for name, m in model.named_modules()
            if is_hookable(m) and any(fnmatch.fnmatchcase(name, pat) for pat in module_patterns)
        ]
        if not chosen:
            names = [name for name, m in model.named_modules() if is_hookable(m)]
            raise GradientError(
                f"gradients.modules {module_patterns} match no Linear / Conv1D / Embedding module; the model's are: "
                f"{names[:12]}{' ...' if len(names) > 12 else ''}"
            )
        canonical = parameter_names(model)
        modules = dict(model.named_modules())
        owned = set()
        for name in chosen:
            for kind in ("weight", "bias"):
                param = getattr(modules[name], kind, None)
                if isinstance(param, nn.Parameter):
                    owned.add(canonical[id(param)])
        return [n for n, _ in model.named_parameters() if n in owned]
    selected = [n for n, _ in model.named_parameters() if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)]
    if not selected:
        names = [n for n, _ in model.named_parameters()]
        raise GradientError(
            f"gradients.params {patterns} match no parameter of the model; its parameters are: {names[:12]}"
            f"{' ...' if len(names) > 12 else ''}"
        )
    return selected


def parameter_names(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> its name in named_parameters (a tied parameter's first owner)."""
    return {id(p): n for n, p in model.named_parameters()}


def linear_modules(
    model: nn.Module,
    patterns: list[str],
    what: str,
    module_patterns: list[str] | None = None,
    embeddings=False,
    convolutions=False,
) -> list[tuple[str, nn.Module, bool]]:
    """(module name, module, bias selected) for every Linear / Conv1D (and, with embeddings, Embedding; with
    convolutions, Conv2d) layer whose weight is selected, a layer sharing a tied weight included; an error when a
    selected parameter belongs to anything else, since hooks only see those layers."""
    selected = set(select_parameters(model, patterns, module_patterns))
    canonical = parameter_names(model)
    modules, covered = [], set()
    for name, module in model.named_modules():
        conv2d = convolutions and isinstance(module, nn.Conv2d)
        if not (is_hookable(module) or conv2d) or isinstance(module, nn.Embedding) and not embeddings:
            continue
        weight = canonical.get(id(module.weight))
        if weight in selected:
            bias = canonical.get(id(module.bias)) if getattr(module, "bias", None) is not None else None
            with_bias = bias in selected
            modules.append((name, module, with_bias))
            covered |= {weight} | ({bias} if with_bias else set())
    if selected - covered:
        kinds = "Linear / Conv1D" + (" / Embedding" if embeddings else "") + (" / Conv2d" if convolutions else "")
        raise GradientError(
            f"{what} handles the weights (and biases) of {kinds} layers only; these selected parameters are not: "
            f"{sorted(selected - covered)[:8]}. Narrow "
            "gradients.params (or use gradients.modules), or use projection.kind sparse/gaussian"
        )
    return modules


class LinearHookGradients:
    """Shared machinery: capture each selected layer's inputs and output gradients in one pass."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn,
        patterns: list[str],
        what: str,
        module_patterns=None,
        embeddings=False,
        convolutions=False,
    ):
        self.model, self.loss_fn = model, loss_fn
        self.modules = linear_modules(model, patterns, what, module_patterns, embeddings, convolutions)
        self.statistics: KroneckerStatistics | None = None
        canonical = parameter_names(model)
        self.param_shapes: dict[str, list[int]] = {}  # every selected parameter once, a tied weight too
        for _, module, with_bias in self.modules:
            self.param_shapes.setdefault(canonical[id(module.weight)], list(module.weight.shape))
            if with_bias:
                self.param_shapes.setdefault(canonical[id(module.bias)], list(module.bias.shape))
        self.numel = sum(math.prod(shape) for shape in self.param_shapes.values())

    def param_spec(self) -> dict:
        return {"params": dict(self.param_shapes), "numel": self.numel}

    def capture(self, inputs: torch.Tensor, targets: torch.Tensor):
        """-> (losses [B], [(inputs [B, (T,) in] (an Embedding's: ids [B, T]), output grads [B, (T,) out]) per
        module, in self.modules' order])."""
        batch = inputs.shape[0]
        captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def hook(index, module, args, output):
            ids_or_inputs = args[0].detach()
            if isinstance(module, nn.Embedding) and output.shape[0] == 1 and batch > 1:
                # a table looked up once for the whole batch (GPT-2's positions): each example's own copy, so its
                # output gradient is per example; the values downstream are unchanged
                output = output.expand(batch, *output.shape[1:])
                ids_or_inputs = ids_or_inputs.expand(batch, *ids_or_inputs.shape[1:])
            if index in captured:
                raise GradientError(f"module '{self.modules[index][0]}' is called more than once per forward pass (a "
                                    "shared layer): hooks cannot separate its uses; leave it out of gradients.modules "
                                    "or use projection.kind gaussian / sparse")  # fmt: skip
            captured[index] = (ids_or_inputs, output)
            return output

        handles = [
            module.register_forward_hook(functools.partial(hook, index))
            for index, (_, module, _) in enumerate(self.modules)
        ]
        try:
            with torch.enable_grad():
                losses = self.loss_fn(self.model(inputs), targets)  # [B]
                missing = [self.modules[i][0] for i in range(len(self.modules)) if i not in captured]
                if missing:
                    raise GradientError(f"the selected modules {missing[:4]} were not called by the model's forward "
                                        "pass: leave them out of gradients.modules")  # fmt: skip
                outputs = [captured[i][1] for i in range(len(self.modules))]
                # examples are independent, so d(sum of losses)/d(output_b) = d(loss_b)/d(output_b);
                # only activation gradients are computed, never the weight gradients
                out_grads = torch.autograd.grad(losses.sum(), outputs)
        finally:
            for handle in handles:
                handle.remove()
        return losses.detach(), [(captured[i][0], g) for i, g in enumerate(out_grads)]

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
    """(projected rows [B, K], losses [B], squared full-gradient norms [B]) for the selected Linear / Conv1D /
    Embedding layers: one [k_out, k_in] block per weight (a tied weight's uses add into one)."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn,
        patterns: list[str],
        config: ProjectionConfig,
        module_patterns=None,
        full_norms: bool = True,
        normaliser=None,
        basis=None,
    ):
        super().__init__(model, loss_fn, patterns, "projection.kind 'factored'", module_patterns, embeddings=True)
        self.config = config
        self.normaliser = normaliser
        self.basis = basis  # fitted sides (tdastore/grads/basis.py) or None: every side random
        self.full_norms = full_norms  # |full per-example gradient|^2 per row: B T^2 (d_in + d_out) extra work
        canonical = parameter_names(model)
        self.blocks: list[tuple[str, int, int]] = []  # (owner module, d_out, d_in (+1 with a bias)) per weight
        self.block_of: list[int] = []  # per module: its block
        self.tied: dict[str, str] = {}  # module -> the owner of the weight it shares
        index_of: dict[str, int] = {}
        for name, module, with_bias in self.modules:
            d_in, d_out = module_dims(module)
            weight = canonical[id(module.weight)]
            if weight in index_of:
                block = index_of[weight]
                if self.blocks[block][1:] != (d_out, d_in + int(with_bias)):
                    raise GradientError(f"module '{name}' shares the weight '{weight}' in another orientation or with "
                                        "a bias: a factored block cannot hold both uses; leave one out of "
                                        "gradients.modules")  # fmt: skip
                self.block_of.append(block)
                self.tied[name] = self.blocks[block][0]
                continue
            index_of[weight] = len(self.blocks)
            self.block_of.append(len(self.blocks))
            self.blocks.append((weight.rsplit(".", 1)[0], d_out, d_in + int(with_bias)))
        device = next(model.parameters()).device  # the projections live where the activations are
        # adafactor: (s_out [out], s_in [in (+1)]) per block, applied to each side before the projection
        self.layer_scales = (
            [tuple(s.to(device) for s in normaliser.layer_scales(name)) for name, _, _ in self.blocks]
            if normaliser is not None
            else None
        )
        self.p_out, self.p_in, self.dims, self.offsets = [], [], [], []
        col = 0
        for name, d_out, d_in in self.blocks:
            k_out, k_in = module_factors(config, name)
            p_out = self._side(f"{name}.out", d_out, k_out)
            p_in = self._side(f"{name}.in", d_in, k_in)
            self.p_out.append(None if p_out is None else p_out.to(device))
            self.p_in.append(None if p_in is None else p_in.to(device))
            self.dims.append((min(d_out, k_out), min(d_in, k_in)))
            self.offsets.append(col)
            col += self.dims[-1][0] * self.dims[-1][1]
        self.out_dim = col

    def _side(self, name: str, dim: int, k: int) -> torch.Tensor | None:
        """[dim, k]: the basis's fitted side where it has one, else the seed's Gaussian (generated on the CPU: the
        same bits everywhere); None where the side is no wider than k."""
        fitted = self.basis.matrices.get(name) if self.basis is not None else None
        if fitted is not None and dim > k:
            if tuple(fitted.shape) != (dim, k):
                raise StoreError(
                    f"the store's projection basis holds {name} as {tuple(fitted.shape)}, this model's side is "
                    f"({dim}, {k}): the model or projection.factors changed; rebuild the store"
                )
            return fitted
        return _side_matrix(self.config.seed, name, dim, k)

    def spec(self) -> dict:
        spec = {
            "kind": "factored",
            "in_dim": self.numel,
            "out_dim": self.out_dim,
            "seed": self.config.seed,
            "factors": list(self.config.factors),
            "modules": {name: list(dims) for (name, _, _), dims in zip(self.blocks, self.dims)},
        }
        if self.tied:
            spec["tied"] = dict(self.tied)
        if self.basis is not None:
            spec["basis"] = self.basis.spec()
        return with_normaliser(spec, self.normaliser)

    def __call__(self, inputs, targets, out=None):
        losses, captured = self.capture(inputs, targets)
        if self.statistics is not None:  # K-FAC factors gathered in the same pass (the build)
            self.statistics.add(captured, inputs)
        batch = inputs.shape[0]
        rows = torch.empty(batch, self.out_dim, device=inputs.device) if out is None else out  # [B, K]
        sq_norms = torch.zeros(batch, device=inputs.device)  # [B]
        uses: dict[int, list] = {}  # per block, its modules' scaled sides so far (a tied weight has two)
        for index, (acts, grads) in enumerate(captured):
            block = self.block_of[index]
            k_out, k_in = self.dims[block]
            target = rows[:, self.offsets[block] : self.offsets[block] + k_out * k_in].view(batch, k_out, k_in)
            u, w = self._scaled_sides(index, acts, grads)
            earlier = uses.setdefault(block, [])
            if self.full_norms:  # |sum of the uses|^2 = each one's + twice every pair's inner product
                sq_norms += _squared_norm_of_sum_of_outer_products(u, w)
                for u_other, w_other in earlier:
                    sq_norms += 2 * (_gram(u, u_other) * _gram(w, w_other)).sum((1, 2))
            left, right = self.projected_sides(block, u, w)
            product = torch.bmm(left.transpose(1, 2), right)  # [B, k_out, k_in]
            target.add_(product) if earlier else target.copy_(product)
            earlier.append((u, w) if self.full_norms and self.tied else None)
        if not self.full_norms:  # the stored row's own norm (gradients.full_norms: false)
            sq_norms = rows.pow(2).sum(1)
        return rows, losses, sq_norms

    def token_rows(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """[B, T, K]: position t's terms of each row, P_out^T u_t (x) P_in^T w_t block by block; their sum over t
        is the row (token-level attribution of training documents)."""
        _, captured = self.capture(inputs, targets)
        batch = inputs.shape[0]
        out = None
        for index, (acts, grads) in enumerate(captured):
            block = self.block_of[index]
            k_out, k_in = self.dims[block]
            left, right = self.projected_sides(block, *self._scaled_sides(index, acts, grads))  # [B, T, k]
            if out is None:
                out = torch.zeros(batch, left.shape[1], self.out_dim, device=left.device)
            terms = (left.unsqueeze(3) * right.unsqueeze(2)).reshape(batch, left.shape[1], k_out * k_in)
            out[:, :, self.offsets[block] : self.offsets[block] + k_out * k_in] += terms
        return out

    def _scaled_sides(self, index, acts, grads):
        """One module's unprojected sides in its weight's orientation, scaled by the block's normaliser: (out
        side, in side), each [B, T, d] (T = 1 for feature vectors), the out side of an embedding as (ids [B, T],
        per-id scale [num] or None) since its one-hot vectors are never formed."""
        module, with_bias = self.modules[index][1], self.modules[index][2]
        block = self.block_of[index]
        batch = grads.shape[0]
        s_out, s_in = self.layer_scales[block] if self.layer_scales is not None else (None, None)
        if isinstance(module, nn.Embedding):
            ids = acts.reshape(batch, -1).long()  # [B, T]
            w = grads.reshape(batch, ids.shape[1], -1).float()  # [B, T, dim]
            return (ids, s_out), (w if s_in is None else w * s_in)
        acts = acts.reshape(batch, -1, acts.shape[-1]).float()  # [B, T, in]; half-precision models sum in float32
        u = grads.reshape(batch, -1, grads.shape[-1]).float()  # [B, T, out]
        if with_bias:
            acts = torch.cat([acts, acts.new_ones(*acts.shape[:2], 1)], dim=2)  # [B, T, in+1]
        if s_out is not None:  # rank-one S: d_t (x) s_out and [a_t; 1] (x) s_in
            u, acts = u * s_out, acts * s_in
        return u, acts

    def projected_sides(self, block: int, u, w):
        """(P_out^T u_t [B, T, k_out], P_in^T w_t [B, T, k_in]) of a module's scaled sides: the per-token terms
        whose outer products sum to its part of the block."""
        p_out, p_in = self.p_out[block], self.p_in[block]
        if isinstance(u, tuple):
            ids, scale = u
            left = p_out[ids] if p_out is not None else nn.functional.one_hot(ids, self.blocks[block][1]).float()
            if scale is not None:
                left = left * scale[ids].unsqueeze(-1)
        else:
            left = u if p_out is None else u @ p_out
        return left, (w if p_in is None else w @ p_in)


def module_factors(config: ProjectionConfig, name: str) -> tuple[int, int]:
    """[k_out, k_in] of a module: the first projection.module_factors pattern it matches, else factors."""
    for pattern, dims in config.module_factors.items():
        if fnmatch.fnmatchcase(name, pattern):
            if len(dims) != 2 or min(dims) <= 0:
                raise GradientError(f"projection.module_factors['{pattern}'] must be two positive sizes [k_out, k_in]")
            return int(dims[0]), int(dims[1])
    return int(config.factors[0]), int(config.factors[1])


def _gram(x, y) -> torch.Tensor:
    """[B, T, S] inner products x_t . y_s of two sides, either dense [B, T, d] or an embedding's (ids [B, T],
    per-id scale [num] or None), one-hot vectors never formed."""
    if isinstance(x, tuple) and isinstance(y, tuple):
        (ids_x, scale), (ids_y, _) = x, y  # the same table: the same scale
        same = (ids_x.unsqueeze(2) == ids_y.unsqueeze(1)).float()  # [B, T, S]
        return same if scale is None else same * scale[ids_x].pow(2).unsqueeze(2)
    if isinstance(x, tuple):
        return _gram(y, x).transpose(1, 2)
    if isinstance(y, tuple):  # x_t [d = num] at the ids: x_t[id_s] scale[id_s]
        ids, scale = y
        picked = torch.gather(x, 2, ids.unsqueeze(1).expand(-1, x.shape[1], -1))  # [B, T, S]
        return picked if scale is None else picked * scale[ids].unsqueeze(1)
    return torch.bmm(x, y.transpose(1, 2))


def _squared_norm_of_sum_of_outer_products(u, w) -> torch.Tensor:
    """|| sum_t u_t w_t^T ||_F^2 per example = sum_{t,s} (u_t . u_s)(w_t . w_s); -> [B]."""
    if not isinstance(u, tuple) and u.shape[1] == 1:
        return u.pow(2).sum((1, 2)) * w.pow(2).sum((1, 2))
    return (_gram(u, u) * _gram(w, w)).sum((1, 2))


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
            _, module, with_bias = computer.modules[index]
            block = computer.block_of[index]  # a tied weight's uses add into its block's factors
            p_out, p_in = computer.p_out[block], computer.p_in[block]
            if isinstance(module, nn.Embedding):  # the weight's orientation: out side one-hot ids, in side d_t
                ids = acts.reshape(batch, -1).long()  # [B, T]
                acts = grads.reshape(batch, ids.shape[1], -1).double()  # [B, T, dim]
                d = p_out.double()[ids] if p_out is not None else nn.functional.one_hot(ids, module.num_embeddings)
                d = d.double()  # [B, T, k_out]
            else:
                acts = acts.reshape(batch, -1, acts.shape[-1]).double()  # [B, T, in]
                grads = grads.reshape(batch, -1, grads.shape[-1]).double()  # [B, T, out]
                if with_bias:
                    acts = torch.cat([acts, acts.new_ones(*acts.shape[:2], 1)], dim=2)
                d = grads if p_out is None else grads @ p_out.double()  # [B, T, k_out]
            a = acts if p_in is None else acts @ p_in.double()  # [B, T, k_in]
            weight = a.new_ones(*a.shape[:2], 1) if mask is None else mask.double()[:, : a.shape[1], None]
            self.a[block] += torch.einsum("bti,btj->ij", a * weight, a).cpu().numpy()
            self.s[block] += torch.einsum("bto,btp->op", d, d).cpu().numpy()
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
