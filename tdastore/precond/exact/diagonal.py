"""Diagonal operators in full parameter space: the optimizer-aware rows (adam_dot, adam_cos) and the damped
diagonal empirical Fisher (if_diag).

adam            K = diag(1 / (sqrt(v) + eps)): the first-order effect of dropping a row when the further training
                is Adam's, which rescales each coordinate by its second moment v. v is read from the user's saved
                optimizer state (attribution.optimizer_state: a torch optimizer state_dict, e.g. the optimizer.pt
                of a Hugging Face Trainer; exp_avg_sq, bias-corrected, matched by parameter name), else estimated
                at the final model as the mean of the further training's squared minibatch gradients over one
                epoch (its batch size, batch order of seed 0, weight decay coupling and clipping). The mean, not
                Adam's EMA: at a fixed model an EMA with beta2 = 0.999 over a few hundred steps is, after bias
                correction, close to a plain mean of the same squares, and the mean does not depend on where the
                epoch is cut.
diagonal        K = diag(1 / (F + lambda)), F the mean squared per-example gradient (the empirical Fisher's
                diagonal), lambda = damping_factor x lambda_0 (lambda_0 = mean F): the projected path's if_diag in
                full space, for SGD further training.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tdastore.errors import ConfigError
from tdastore.precond.exact.operators import ExactOperator
from tdastore.precond.registry import register

CLIP_EPS = 1e-6  # as torch.nn.utils.clip_grad_norm_


class DiagonalOperator(ExactOperator):
    """K = diag(d): applied coordinate-wise; d [p] is computed once per scorer and kept."""

    def diagonal(self, scorer) -> torch.Tensor:
        raise NotImplementedError

    def apply(self, scorer, vectors):
        key = (self.name, *(repr(v) for v in self.params(scorer.config.attribution).values()))
        if key not in scorer.cache:
            scorer.cache[key] = self.diagonal(scorer)
        return vectors * scorer.cache[key]  # [m, p] * [p]


@register
class AdamSecondMoment(DiagonalOperator):
    name = "adam"
    settings = ("adam_eps", "optimizer_state")

    def diagonal(self, scorer):
        cfg = scorer.config.attribution
        space = scorer.space
        if cfg.optimizer_state:
            v, source = state_second_moment(cfg.optimizer_state, space.names, space.shapes), cfg.optimizer_state
        else:
            v, source = schedule_second_moment(space, scorer.config.groundtruth), "further-training schedule"
        v = v.to(space.theta)
        scorer.info.update(adam_eps=cfg.adam_eps, second_moment=source, second_moment_mean=float(v.mean()))
        return 1.0 / (v.sqrt() + cfg.adam_eps)


@register
class DiagonalFisher(DiagonalOperator):
    name = "diagonal"
    settings = ("damping_factor",)

    def diagonal(self, scorer):
        space = scorer.space
        fisher = torch.zeros(space.p, dtype=torch.float64, device=space.device)
        for _, block in space.example_grads(space.train):
            fisher += block.double().pow(2).sum(0)
        fisher = (fisher / space.n).to(space.theta.dtype)  # [p]
        damping, lambda_0 = space.damping("gauss_newton")
        scorer.info.update(damping=damping, lambda_0=lambda_0)
        return 1.0 / (fisher + damping)


def schedule_second_moment(space, gt, seed: int = 0) -> torch.Tensor:
    """v [p]: the mean over one epoch of the further training's squared minibatch gradients at the final model
    (batch size, seed-0 batch order, Adam's coupled weight decay and gradient clipping as the gold standard)."""
    order = torch.randperm(space.n, generator=torch.Generator().manual_seed(seed))
    total = torch.zeros(space.p, dtype=torch.float64, device=space.device)
    batches = 0
    for start in range(0, space.n, gt.batch_size):
        part = space.train.take(order[start : start + gt.batch_size])
        g = torch.cat([block for _, block in space.example_grads(part)]).mean(0)  # [p]: the batch's mean gradient
        if gt.weight_decay and gt.optimizer == "adam":  # Adam adds decay to the gradient; AdamW decays weights
            g = g + gt.weight_decay * space.theta
        if gt.clip_norm is not None:
            g = g * (gt.clip_norm / (g.norm() + CLIP_EPS)).clamp(max=1.0)
        total += g.double().pow(2)
        batches += 1
    return (total / batches).float()


def state_second_moment(path: str | Path, names: list[str], shapes: list[tuple]) -> torch.Tensor:
    """v [p] from a saved torch optimizer state_dict: each group's `param_names` (optimizers built over
    model.named_parameters(), as recent Hugging Face Trainers do) matched to the model's parameter names (a
    prefix such as 'module.' or 'base_model.model.' is allowed on either side), exp_avg_sq divided by Adam's
    bias correction 1 - beta2^step. A plain {name: tensor} file of second moments is taken as it is."""
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
