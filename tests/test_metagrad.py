"""Metagradients through further training against central finite differences of the weighted runs."""

import pytest
import torch

from tdastore.config import GroundTruthConfig, ModelConfig, TaskConfig
from tdastore.groundtruth.metagrad import MetaGradient
from tdastore.tasks import TabularTask


def setup(optimizer: str, steps: int = 6, checkpoint_every=None):
    task = TabularTask(TaskConfig(dataset="diabetes"), ModelConfig(hidden=[8, 8]))
    model = task.make_model().double()
    train, test = task.examples("train").slice(0, 60), task.examples("test").slice(0, 3)
    for data in (train, test):
        data.inputs, data.targets = data.inputs.double(), data.targets.double()
    lr = 0.05 if optimizer == "sgd" else 0.01
    cfg = GroundTruthConfig(coupling="subtract", optimizer=optimizer, lr=lr, batch_size=16, epochs=None,
                            steps=steps, eval_every=3)
    return MetaGradient(model, task, cfg, train, test, checkpoint_every=checkpoint_every)


def central_difference(meta, i: int, eps: float) -> torch.Tensor:
    ones = torch.ones(meta.n, dtype=torch.float64)
    e = torch.zeros(meta.n, dtype=torch.float64)
    e[i] = eps
    return (meta.test_values(ones + e, 4) - meta.test_values(ones - e, 4)) / (2 * eps)  # [evals, n_test]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_metagradient_equals_central_differences(optimizer):
    """SGD: one step size. Adam: m / sqrt(v) makes the derivative of rows feeding near-zero v entries valid
    only in a tiny radius (measured: row 17's difference quotient moves from 0.3 to 37.5 as eps goes 1e-4 ->
    1e-10), so the check takes the best of eps in 1e-6 .. 1e-10, each still a plain central difference."""
    meta = setup(optimizer)
    dw = meta.gradients(seed=4)  # [evals, n_test, N]
    assert dw.shape == (2, 3, 60)
    steps = (1e-5,) if optimizer == "sgd" else (1e-6, 1e-8, 1e-9, 1e-10)
    for i in (0, 17, 59):
        errors = [relative_error(dw[:, :, i], central_difference(meta, i, eps)) for eps in steps]
        assert min(errors) <= 1e-3, (i, errors)


def test_checkpointing_agrees_and_bounds_memory():
    full = setup("sgd", steps=12, checkpoint_every=1)
    segmented = setup("sgd", steps=12, checkpoint_every=4)
    single = setup("sgd", steps=12, checkpoint_every=12)
    reference = full.gradients(seed=1)
    torch.testing.assert_close(segmented.gradients(seed=1), reference, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(single.gradients(seed=1), reference, rtol=1e-6, atol=1e-12)
    assert segmented.stored_states_peak < full.stored_states_peak  # T/c + c states instead of T
    assert full.stored_states_peak >= 12


def test_scores_are_minus_the_gradient_averaged_over_seeds():
    meta = setup("sgd")
    expected = -(meta.gradients(0) + meta.gradients(1)) / 2
    torch.testing.assert_close(meta.scores([0, 1]), expected)
