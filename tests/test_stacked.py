"""The written-out MLP gradients of the replica engine against vmap(grad(.)) of the same model."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

from tdastore.groundtruth.stacked import StackedMLP


def vmap_gradients(model, loss, params, x, y, weights):
    def replica_loss(p, x, y, w):
        return (loss(functional_call(model, p, (x,)), y) * w).sum()

    return vmap(grad(replica_loss))(params, x, y, weights)


def stacked_params(model, replicas: int, generator) -> dict:
    """Each replica's parameters: the model's, perturbed differently per replica."""
    return {
        n: p.detach().unsqueeze(0) + 0.3 * torch.randn(replicas, *p.shape, generator=generator, dtype=p.dtype)
        for n, p in model.named_parameters()
    }


def mse(out, y):
    return (out.squeeze(-1) - y) ** 2


@pytest.mark.parametrize(
    "layers, loss, chunk_bytes",
    [
        # the tabular MLP: narrow first layer (h^T delta, transposed), several chunks of replicas
        (lambda: [nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 1)], mse, 1),
        # every supported activation, a layer without bias, an activation on the output, cross-entropy
        (
            lambda: [nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 9, bias=False), nn.Sigmoid(), nn.Linear(9, 3),
                     nn.Identity(), nn.Linear(3, 3), nn.Tanh()],
            lambda out, y: F.cross_entropy(out, y, reduction="none"),
            1 << 20,
        ),
    ],
    ids=["relu-mse-chunked", "tanh-sigmoid-nobias-ce"],
)  # fmt: skip
def test_written_out_gradients_equal_vmap_of_autograd(layers, loss, chunk_bytes):
    torch.manual_seed(0)
    model = nn.Sequential(*layers()).double()
    generator = torch.Generator().manual_seed(1)
    replicas, batch = 7, 10
    params = stacked_params(model, replicas, generator)
    n_in = model[0].in_features
    x = torch.randn(replicas, batch, n_in, generator=generator, dtype=torch.float64)
    classes = model[-1].out_features if isinstance(model[-1], nn.Linear) else model[-2].out_features
    y = (
        torch.randn(replicas, batch, generator=generator, dtype=torch.float64)
        if loss is mse
        else torch.randint(classes, (replicas, batch), generator=generator)
    )
    weights = torch.rand(replicas, batch, generator=generator, dtype=torch.float64)
    weights[:, -2:] = 0  # padding rows
    weights[2, 0] = -0.1  # subtract coupling's negative weight
    assert StackedMLP.supports(model)
    stacked = StackedMLP(model, loss, chunk_bytes=chunk_bytes)
    expected = vmap_gradients(model, loss, params, x, y, weights)
    for _ in range(2):  # the second call reuses the first one's buffers
        got = stacked(params, x, y, weights)
        assert got.keys() == expected.keys()
        for name in expected:
            assert got[name].shape == params[name].shape
            torch.testing.assert_close(got[name], expected[name], rtol=1e-10, atol=1e-12)
    outputs = stacked.forward(params, x)  # [R, b, C]
    torch.testing.assert_close(outputs, vmap(lambda p, x: functional_call(model, p, (x,)))(params, x))


@pytest.mark.parametrize(
    "model",
    [
        nn.Sequential(nn.ReLU(), nn.Linear(3, 3)),  # starts with an activation
        nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.ReLU()),  # two activations in a row
        nn.Sequential(nn.Linear(3, 3), nn.GELU()),  # an activation without a written-out derivative
        nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)),  # buffers
        nn.Linear(3, 3),  # not a Sequential
        nn.Sequential(nn.Linear(3, 3), nn.Sequential(nn.Linear(3, 3))),  # nested
    ],
    ids=["activation-first", "two-activations", "gelu", "batchnorm", "plain-linear", "nested"],
)
def test_other_models_take_the_vmap_path(model):
    assert not StackedMLP.supports(model)
