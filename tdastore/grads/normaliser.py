"""Optimizer-aware gradient normalisers: Adam's second moment applied to every row before projection.

Adam moves each coordinate by lr m / (sqrt(v) + eps), so the first-order effect of dropping a training row under
Adam's further training is g_test^T D g_i with D = diag(1 / (sqrt(v) + eps)) (adam_dot). A projection cannot
apply D afterwards, so the build scales every per-example gradient by S = D^(1/2) before projecting it, and the
query scales every test gradient the same way: the store's plain inner product is then g_test^T D g_i, and its
cosine is TrackStar's unit-normalised form (adam_cos).

kind adam       S = (sqrt(v) + eps)^(-1/2), the full diagonal: dense and sparse projections, and kind none.
kind adafactor  v of each Linear / Conv1D layer's [W | b] ([out, in+1]) approximated by Adafactor's rank one
                r c^T / sum(r) (r, c its row and column sums), so S = (sum r)^(1/4) r^(-1/4) c^(-1/4) splits into an
                output-side and an input-side vector: the factored projection scales d_t and [a_t; 1] before its
                Kronecker product and stays factored. eps is left out of this form (it would break the rank
                one); r and c are floored at 1e-30. Other parameters (1-D, or not a layer's) take the full
                diagonal.

v comes from `attribution.optimizer_state` (a saved torch optimizer state: exp_avg_sq by parameter name,
bias-corrected) or is estimated at the final model from the further training's batches (`second_moment`).
The store keeps v (normaliser.safetensors) and records its kind, eps, source and sha256 in its projection
spec, so a query recomputes exactly the same S and a store built with another normaliser is refused.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tdastore.errors import ConfigError, StoreError
from tdastore.optim import CLIP_EPS

KINDS = ("adam", "adafactor")
FLOOR = 1e-30


@dataclass
class Normaliser:
    kind: str  # adam | adafactor
    moments: dict[str, torch.Tensor]  # v of every attributed parameter, in the parameter's shape (float32, CPU)
    eps: float
    source: str  # "further-training schedule" or the optimizer state's path
    transposed: set[str] = field(default_factory=set)  # Conv1D weights ([in, out]), bound from the model

    def spec(self) -> dict:
        return {"kind": self.kind, "eps": self.eps, "source": self.source, "sha256": moments_digest(self.moments)}

    def bind(self, model: nn.Module) -> Normaliser:
        """Learn which weights are Conv1D ([in, out]) so the output side is known for every layer."""
        from tdastore.grads.factored import is_conv1d

        self.transposed = {f"{name}.weight" for name, module in model.named_modules() if is_conv1d(module)}
        return self

    # -- the scales ------------------------------------------------------------------------------
    def scale(self, name: str) -> torch.Tensor:
        """S for a parameter, in its shape: what its per-example gradient is multiplied by."""
        if name not in self.moments:
            raise StoreError(f"the store's normaliser has no second moment for parameter '{name}': rebuild the store")
        v = self.moments[name]
        if self.kind == "adam" or v.dim() != 2 and not self._is_layer_bias(name):
            return (v.sqrt() + self.eps).rsqrt()
        module = name.rsplit(".", 1)[0]
        s_out, s_in = self.layer_scales(module)
        if name.endswith(".bias"):
            return s_out * s_in[-1]
        full = s_out[:, None] * s_in[: s_in.shape[0] - int(self._has_bias(module))][None, :]  # [out, in]
        return full.T if name in self.transposed else full

    def layer_scales(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(s_out [out], s_in [in (+1 with a bias)]) of a layer under the rank-one (adafactor) form."""
        weight = self.moments[f"{module}.weight"]
        v = weight.T if f"{module}.weight" in self.transposed else weight  # [out, in]
        if self._has_bias(module):
            v = torch.cat([v, self.moments[f"{module}.bias"].reshape(-1, 1)], dim=1)  # [out, in+1]
        rows, cols = v.sum(1).clamp_min(FLOOR), v.sum(0).clamp_min(FLOOR)  # r [out], c [in(+1)]
        total = rows.sum()
        return (total.sqrt().sqrt() * rows.rsqrt().sqrt()), cols.rsqrt().sqrt()

    def _has_bias(self, module: str) -> bool:
        return f"{module}.bias" in self.moments

    def _is_layer_bias(self, name: str) -> bool:
        return (
            name.endswith(".bias") and self.moments.get(name.rsplit(".", 1)[0] + ".weight", torch.empty(0)).dim() == 2
        )

    # -- bytes (the store keeps them: tdastore/store/fitted.py) ----------------------------------
    def to_bytes(self) -> bytes:
        return tensors_to_bytes(self.moments)

    @classmethod
    def from_bytes(cls, data: bytes, spec: dict, where: str) -> Normaliser:
        """The normaliser a store was built with; its bytes must give the sha256 its spec recorded."""
        moments = checked_tensors(data, spec, f"normaliser {where}")
        return cls(spec["kind"], moments, float(spec["eps"]), spec["source"])


def tensors_to_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    """safetensors bytes of named tensors (what a store keeps beside its rows)."""
    from safetensors.torch import save

    return save({n: t.contiguous() for n, t in tensors.items()})


def checked_tensors(data: bytes, spec: dict, what: str) -> dict[str, torch.Tensor]:
    """Named tensors from safetensors bytes that must give the sha256 `spec` recorded; a clear StoreError
    naming `what` otherwise."""
    from safetensors.torch import load

    try:
        tensors = load(data)
    except Exception as err:  # noqa: BLE001 - safetensors raises several kinds for damaged bytes
        raise StoreError(f"the store's {what} cannot be read ({err}): rebuild the store") from None
    if moments_digest(tensors) != spec.get("sha256"):
        raise StoreError(f"the store's {what} does not match its recorded sha256: rebuild the store")
    return tensors


def moments_digest(moments: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(moments):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(moments[name].float().numpy()).tobytes())
    return digest.hexdigest()[:16]


def make_normaliser(config, model: nn.Module, task, names: list[str]) -> Normaliser | None:
    """The normaliser of `gradients.normalizer` for the attributed parameters `names` (None: none)."""
    kind = config.gradients.normalizer
    if kind == "none":
        return None
    attribution = config.attribution
    if attribution.optimizer_state:
        shapes = [tuple(dict(model.named_parameters())[n].shape) for n in names]
        flat = state_second_moment(attribution.optimizer_state, names, shapes)  # [p]
        parts = torch.split(flat, [int(np.prod(s)) for s in shapes])
        moments = {n: part.reshape(s) for n, part, s in zip(names, parts, shapes)}
        source = str(attribution.optimizer_state)
    else:
        moments = second_moment(model, task.per_example_loss, task.examples("train"), names, config.groundtruth)
        source = "further-training schedule"
    moments = {n: t.detach().float().cpu().contiguous() for n, t in moments.items()}
    return Normaliser(kind, moments, attribution.adam_eps, source).bind(model)


def second_moment(model: nn.Module, loss_fn, train, names: list[str], gt, seed: int = 0) -> dict[str, torch.Tensor]:
    """{name: v}: the mean over one epoch of the further training's squared minibatch gradients at the model's
    weights (its batch size, seed-0 batch order, Adam's coupled weight decay, clipping by the norm over every
    trainable parameter, as torch.nn.utils.clip_grad_norm_ in the gold standard). A plain mean, not Adam's
    EMA: at a fixed model the bias-corrected EMA of the same squares is close to their mean, and the mean does
    not depend on where the epoch is cut."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    device = next(iter(params.values())).device
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    totals = {n: torch.zeros_like(params[n], dtype=torch.float64) for n in names}
    batches = 0
    for start in range(0, len(train), gt.batch_size):
        part = train.take(order[start : start + gt.batch_size]).to(device)
        with torch.enable_grad():
            loss = loss_fn(model(part.inputs), part.targets).mean()
            grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)))
        grads = {n: torch.zeros_like(params[n]) if g is None else g for n, g in grads.items()}
        if gt.weight_decay and gt.optimizer == "adam":  # Adam adds decay to the gradient; AdamW decays weights
            grads = {n: g + gt.weight_decay * params[n].detach() for n, g in grads.items()}
        if gt.clip_norm is not None:
            norm = torch.sqrt(sum(g.double().pow(2).sum() for g in grads.values()))
            coefficient = float((gt.clip_norm / (norm + CLIP_EPS)).clamp(max=1.0))
            grads = {n: g * coefficient for n, g in grads.items()}
        for n in names:
            totals[n] += grads[n].double().pow(2)
        batches += 1
    return {n: (t / batches).float() for n, t in totals.items()}


def state_second_moment(path: str | Path, names: list[str], shapes: list[tuple]) -> torch.Tensor:
    """v [p] (concatenated in `names` order) from a saved torch optimizer state_dict: each group's `param_names`
    (optimizers built over model.named_parameters(), as recent Hugging Face Trainers do) matched to the model's
    names (a prefix such as 'module.' or 'base_model.model.' is allowed on either side), exp_avg_sq divided by
    Adam's bias correction 1 - beta2^step. A plain {name: tensor} file of second moments is taken as it is."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"attribution.optimizer_state '{path}' does not exist: point at a saved optimizer state")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle, zip and torch errors alike
        raise ConfigError(f"attribution.optimizer_state '{path}' cannot be read by torch.load ({err})") from None
    moments = _named_moments(state, path)
    v = []
    for name, shape in zip(names, shapes):
        found = [k for k in moments if k == name or k.endswith("." + name) or name.endswith("." + k)]
        if len(found) != 1:
            why = "no entry" if not found else f"several entries {found[:3]}"
            raise ConfigError(
                f"attribution.optimizer_state '{path}' has {why} for parameter '{name}' (it holds "
                f"{sorted(moments)[:6]}...): save the state of an optimizer over this model's parameters"
            )
        tensor = moments[found[0]]
        if tuple(tensor.shape) != tuple(shape):
            raise ConfigError(
                f"attribution.optimizer_state '{path}': '{found[0]}' has shape {tuple(tensor.shape)}, the model's "
                f"'{name}' {tuple(shape)}: it is another model's optimizer state"
            )
        v.append(tensor.float().reshape(-1))
    return torch.cat(v)


def _named_moments(state, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
        return {str(k): v for k, v in state.items()}  # {name: v} as saved by a user
    if not (isinstance(state, dict) and "state" in state and "param_groups" in state):
        raise ConfigError(
            f"attribution.optimizer_state '{path}' is neither a torch optimizer state_dict nor a {{name: tensor}} "
            "file of second moments"
        )
    moments = {}
    for group in state["param_groups"]:
        names = group.get("param_names")
        if names is None:
            raise ConfigError(
                f"attribution.optimizer_state '{path}' does not name its parameters (no param_names): build the "
                "optimizer over model.named_parameters() (torch >= 2.6) or save {name: exp_avg_sq} yourself"
            )
        beta2 = float(group.get("betas", (0.9, 0.999))[1])
        for index, name in zip(group["params"], names):
            entry = state["state"].get(index, {})
            if "exp_avg_sq" not in entry:
                continue  # a parameter the optimizer never stepped
            step = float(entry.get("step", 0))
            correction = 1.0 - beta2**step if step > 0 else 1.0
            moments[name] = entry["exp_avg_sq"] / correction
    if not moments:
        raise ConfigError(f"attribution.optimizer_state '{path}' holds no exp_avg_sq: is it an Adam optimizer's?")
    return moments
