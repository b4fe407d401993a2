"""`damping_factor: auto` on a ridge regression, where influence functions are exact: if_h agrees with closed-form
leave-one-out retraining at Pearson >= 0.99, while the fixed default (10 x lambda_0) does not. Nothing here
imports conftest at module level: the Ray workers import this module for the task."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import tdastore
from tdastore.tasks import Examples, Task

ALPHA = 0.01  # the ridge penalty


class RidgeModel(nn.Module):
    """A linear model whose output carries its own squared norm, so each example's loss can include the penalty."""

    def __init__(self, d: int):
        super().__init__()
        self.linear = nn.Linear(d, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.linear.weight.pow(2).sum() + self.linear.bias.pow(2).sum()
        return torch.stack([self.linear(x)[:, 0], norm.expand(x.shape[0])], dim=1)  # [B, 2]


class Ridge(Task):
    """Diabetes, standardised: L_i = (y_i - theta . x~_i)^2 + ALPHA |theta|^2, so the mean loss is ridge's."""

    name = "ridge"

    def __init__(self, task_config=None, model_config=None):
        from sklearn.datasets import load_diabetes

        x, y = load_diabetes(return_X_y=True)
        x = (x - x.mean(0)) / x.std(0)
        y = (y - y.mean()) / y.std()
        x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
        ids = np.arange(len(y), dtype=np.int64)
        n = 300
        self._splits = {
            "train": Examples(x[:n], y[:n], ids[:n], y[:n].numpy()),
            "test": Examples(x[n : n + 20], y[n : n + 20], ids[n : n + 20], y[n : n + 20].numpy()),
        }

    def make_model(self) -> nn.Module:
        return RidgeModel(10)

    def per_example_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (outputs[:, 0] - targets) ** 2 + ALPHA * outputs[:, 1]  # [B]

    def test_function(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (outputs[:, 0] - targets) ** 2  # [B] the test point's squared error

    def examples(self, split: str) -> Examples:
        return self._splits[split]


def ridge_solution(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """argmin (1/m) sum (y - x~ theta)^2 + ALPHA |theta|^2 over theta = [w, b]."""
    xa = np.hstack([x, np.ones((len(x), 1))])
    return np.linalg.solve(xa.T @ xa / len(x) + ALPHA * np.eye(xa.shape[1]), xa.T @ y / len(x))


def test_auto_damping_makes_influence_exact_on_ridge(ray_cluster, tmp_path):
    from safetensors.torch import save_file

    from tdastore.attribution import Attributor
    from tdastore.precond.damping import resolve_damping
    from tdastore.training import WEIGHTS_FILE

    assert resolve_damping(10.0, 0.5, 9.0, 1.0) == 5.0  # a number: factor x lambda_0
    assert resolve_damping("auto", 0.5, 9.0, 1.0) == 0.0  # condition 9: no damping
    assert resolve_damping("auto", 0.5, 2e4, 1.0) == pytest.approx((2e4 - 1e4) / (1e4 - 1))
    assert resolve_damping("auto", 0.5, 1.0, -0.5) > 0.5  # indefinite: past the lowest eigenvalue

    task = Ridge()
    train, test = task.examples("train"), task.examples("test")
    x, y = train.inputs.double().numpy(), train.targets.double().numpy()
    theta = ridge_solution(x, y)
    config = tdastore.load_config(
        {
            "device": "cpu",
            "train": {"output_dir": str(tmp_path / "model")},
            "gradients": {"batch_size": 100},
            "store": {"chunk_rows": 64, "shard_rows": 128},
            "build": {"workers": 1, "max_retries": 0},
        }
    )
    (tmp_path / "model").mkdir()
    state = {"linear.weight": torch.tensor(theta[None, :10]).float(), "linear.bias": torch.tensor(theta[10:]).float()}
    save_file(state, str(tmp_path / "model" / WEIGHTS_FILE))
    store = tdastore.build(config, tmp_path / "store", task=task, progress=False)

    xt, yt = test.inputs.double().numpy(), test.targets.double().numpy()

    def test_losses(th):  # [T]
        return (xt @ th[:10] + th[10] - yt) ** 2

    base = test_losses(theta)
    actual = np.stack(  # exact leave-one-out retraining, in closed form: [T, N]
        [test_losses(ridge_solution(np.delete(x, i, 0), np.delete(y, i))) - base for i in range(len(y))], axis=1
    )
    pearson = {}
    for factor in ("auto", 10.0):
        overrides = {"attribution": {"path": "exact", "damping_factor": factor}}
        attributor = Attributor(store, "if_h", overrides, task=task)
        predicted = attributor.score_matrix(test)  # [T, N]: + = removing the row raises the test loss
        pearson[factor] = np.corrcoef(predicted.ravel(), actual.ravel())[0, 1]
        if factor == "auto":
            assert attributor.info["damping"] == 0.0  # ridge's Hessian is well conditioned
    print(f"if_h vs leave-one-out retraining, Pearson: {pearson}")
    assert pearson["auto"] >= 0.99, pearson
    assert pearson[10.0] < 0.95, pearson  # what the fixed default costs here
