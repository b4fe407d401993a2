"""Per-example gradients against a plain loop: autograd on one example at a time."""

import pytest
import torch
from helpers import flatten
from torch import nn
from torch.nn import functional as F

from tdastore.config import ModelConfig, TaskConfig
from tdastore.errors import GradientError
from tdastore.grads.per_example import PerExampleGradients, check_finite, select_parameters
from tdastore.tasks import TabularTask


def loop_gradients(model, loss_fn, inputs, targets, names):
    """The reference: one backward per example, [B, p]."""
    params = dict(model.named_parameters())
    rows = []
    for i in range(inputs.shape[0]):
        loss = loss_fn(model(inputs[i : i + 1]), targets[i : i + 1]).sum()
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


@pytest.mark.parametrize("dataset", ["diabetes", "wine"])
def test_mlp_matches_loop(dataset):
    task = TabularTask(TaskConfig(dataset=dataset), ModelConfig(hidden=[64, 32]))
    model = task.make_model()
    data = task.examples("train").slice(0, 40)
    pe = PerExampleGradients(model, task.per_example_loss)
    grads, losses = pe(data.inputs, data.targets)
    fast = flatten(pe, grads)
    slow = loop_gradients(model, task.per_example_loss, data.inputs, data.targets, pe.names)
    assert fast.shape == (40, pe.numel) == slow.shape
    assert (fast - slow).abs().max() <= 1e-5 * max(1.0, slow.abs().max())
    torch.testing.assert_close(losses, task.per_example_loss(model(data.inputs), data.targets).detach())


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3)
        self.norm = nn.BatchNorm2d(8)
        self.head = nn.Linear(8 * 3 * 3, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # [B, 6, 4, 4]
        x = F.relu(self.norm(self.conv2(x)))  # [B, 8, 2, 2] -> pad-free
        x = F.adaptive_avg_pool2d(x, 3)
        return self.head(x.flatten(1))


def test_cnn_matches_loop():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    inputs, targets = torch.randn(12, 1, 8, 8), torch.randint(0, 10, (12,))
    loss_fn = lambda out, y: F.cross_entropy(out, y, reduction="none")  # noqa: E731
    pe = PerExampleGradients(model, loss_fn)
    fast = flatten(pe, pe(inputs, targets)[0])
    slow = loop_gradients(model, loss_fn, inputs, targets, pe.names)
    assert (fast - slow).abs().max() <= 1e-5 * max(1.0, slow.abs().max())


def test_parameter_selection_by_pattern():
    task = TabularTask(TaskConfig(dataset="diabetes"), ModelConfig(hidden=[16, 16]))
    model = task.make_model()
    assert select_parameters(model, ["4.*"]) == ["4.weight", "4.bias"]
    assert select_parameters(model, ["*.bias"]) == ["0.bias", "2.bias", "4.bias"]
    data = task.examples("train").slice(0, 10)
    pe = PerExampleGradients(model, task.per_example_loss, ["4.*", "0.weight"])
    assert pe.names == ["0.weight", "4.weight", "4.bias"] and pe.numel == 16 * 10 + 16 + 1
    fast = flatten(pe, pe(data.inputs, data.targets)[0])
    slow = loop_gradients(model, task.per_example_loss, data.inputs, data.targets, pe.names)
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=1e-5)
    with pytest.raises(GradientError, match="match no parameter"):
        select_parameters(model, ["encoder.*"])


def test_test_function_gradient():
    """The test side may differentiate another function g (here: the model output itself)."""
    task = TabularTask(TaskConfig(dataset="diabetes"), ModelConfig(hidden=[8]))
    model = task.make_model()
    data = task.examples("test").slice(0, 5)
    output_fn = lambda out, y: out.squeeze(-1)  # noqa: E731
    pe = PerExampleGradients(model, output_fn, ["2.bias"])
    torch.testing.assert_close(flatten(pe, pe(data.inputs, data.targets)[0]), torch.ones(5, 1))


def test_non_finite_gradients_are_refused():
    values = torch.ones(4, 3)
    values[2, 1] = float("nan")
    with pytest.raises(GradientError, match="example id 12 is NaN/Inf"):
        check_finite(values, [10, 11, 12, 13], "the gradient")
