"""Metagradients through further training against central finite differences of the weighted runs."""

import pytest
import torch
from helpers import metagrad_scores

from tdastore.config import GroundTruthConfig, ModelConfig, TaskConfig
from tdastore.groundtruth.engine import ReplicaTrainer
from tdastore.groundtruth.metagrad import MetaGradient, checkpoint_interval
from tdastore.tasks import TabularTask


def setup(optimizer: str, steps: int = 6, checkpoint_every=None, coupling="subtract", rows=None, **spec):
    task = TabularTask(TaskConfig(dataset="diabetes"), ModelConfig(hidden=[8, 8]))
    model = task.make_model().double()
    train, test = task.examples("train").slice(0, 60), task.examples("test").slice(0, 3)
    for data in (train, test):
        data.inputs, data.targets = data.inputs.double(), data.targets.double()
    lr = 0.05 if optimizer == "sgd" else 0.01
    cfg = GroundTruthConfig(
        coupling=coupling, optimizer=optimizer, lr=lr, batch_size=16, epochs=None, steps=steps, eval_every=3, **spec
    )
    return MetaGradient(model, task, cfg, train, test, rows=rows, checkpoint_every=checkpoint_every)


def central_difference(meta, i: int, eps: float) -> torch.Tensor:
    ones = torch.ones(len(meta.rows), dtype=torch.float64)
    e = torch.zeros(len(meta.rows), dtype=torch.float64)
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


@pytest.mark.parametrize(
    "optimizer,coupling,spec",
    [
        ("sgd", "delete", {"clip_norm": 0.5}),
        ("sgd", "subtract", {"weight_decay": 0.01}),
        ("adamw", "subtract", {"weight_decay": 0.1}),
        ("adam", "delete", {"weight_decay": 0.01}),
    ],
)
def test_every_optimizer_and_coupling_equals_central_differences(optimizer, coupling, spec):
    """The derivative the steps use (batch Hessian + a weight Jacobian at w = 1) against differences of the
    weighted runs themselves (any w), for clipping, weight decay, AdamW and the delete weighting."""
    meta = setup(optimizer, coupling=coupling, **spec)
    steps = (1e-5,) if optimizer == "sgd" else (1e-6, 1e-8, 1e-9, 1e-10)
    for mode in ("forward", "reverse"):
        dw = meta.gradients(seed=4, mode=mode)
        for i in (2, 31):
            errors = [relative_error(dw[:, :, i], central_difference(meta, i, eps)) for eps in steps]
            assert min(errors) <= 1e-3, (mode, i, errors)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_forward_mode_equals_reverse_mode(optimizer):
    meta = setup(optimizer, steps=9, rows=[4, 11, 40])
    forward, reverse = meta.gradients(2, "forward"), meta.gradients(2, "reverse")
    assert forward.shape == reverse.shape == (3, 3, 3)
    torch.testing.assert_close(forward, reverse, rtol=1e-9, atol=1e-14)
    assert meta.choose_mode() == "forward"  # 3 rows < 3 evaluation points x 3 test points
    assert setup("sgd").choose_mode() == "reverse"  # 60 rows > 2 x 3


def test_weight_zero_is_the_gold_standards_subtract_replica():
    """The weighted run at w_i = 0 is the ground-truth engine's subtract-coupling leave-one-out run."""
    meta = setup("adam", steps=12, rows=[5, 20])
    trainer = ReplicaTrainer(meta.model, meta.task, meta.cfg, meta.train, meta.test)
    values = trainer.run([7], [5, 20])  # [E, T, 1, 3]
    for k in range(2):
        w = torch.ones(2, dtype=torch.float64)
        w[k] = 0.0
        torch.testing.assert_close(meta.test_values(w, 7), values[:, :, 0, 1 + k], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(
        meta.test_values(torch.ones(2, dtype=torch.float64), 7), values[:, :, 0, 0], rtol=1e-9, atol=1e-12
    )


def test_checkpoint_interval_from_memory_budget():
    assert checkpoint_interval(100, state_bytes=1, budget_bytes=1000) == 1  # everything fits: no recomputation
    assert checkpoint_interval(100, state_bytes=1, budget_bytes=30) == 4  # 25 + 4 + 1 states <= 30 (c = 3: 35)
    assert checkpoint_interval(100, state_bytes=1, budget_bytes=10) == 10  # nothing fits: sqrt(T)
    meta = MetaGradient(*setup_parts(), memory_budget_mb=1e-3)
    assert 1 < meta.checkpoint_every <= meta.schedule.total_steps


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
    torch.testing.assert_close(metagrad_scores(meta, [0, 1]), expected)


def setup_parts():
    meta = setup("sgd", steps=40)
    return meta.model, meta.task, meta.cfg, meta.train, meta.test
