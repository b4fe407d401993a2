"""Adam-normalised stores (gradients.normalizer): rows are per-example gradients scaled by S = D^(1/2) before the
projection, so the store's inner product is adam_dot's g^T D g_i."""

import numpy as np
import pytest
import torch
from conftest import small_config
from torch import nn

import tdastore
from tdastore.config import GradientConfig, ModelConfig, ProjectionConfig, TaskConfig
from tdastore.errors import ConfigError, GradientError
from tdastore.grads.computer import make_gradient_computer
from tdastore.grads.factored import FactoredLinearGradients
from tdastore.grads.normaliser import Normaliser
from tdastore.grads.per_example import PerExampleGradients
from tdastore.tasks import TabularTask


def random_moments(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=generator) * 1e-3 + 1e-6 for n, p in model.named_parameters()}


def adafactor_diagonal(v_weight, v_bias):
    """The rank-one v of [W | b] ([out, in+1]) by Adafactor's formula, split back into W's and b's parts."""
    v = torch.cat([v_weight, v_bias[:, None]], dim=1)
    approx = v.sum(1, keepdim=True) * v.sum(0, keepdim=True) / v.sum()
    return approx[:, :-1], approx[:, -1]


@pytest.mark.parametrize("sequence", [False, True])
def test_factored_adafactor_rows_equal_scaled_autograd_gradients_projected(sequence):
    """Factored rows with the adafactor normaliser equal P_out^T (S o G) P_in from vmap gradients, S from
    Adafactor's rank-one v, to 1e-5; the norms are the scaled gradient's."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(10, 24), nn.Tanh(), nn.Linear(24, 3)).eval()
    shape = (5, 6, 10) if sequence else (9, 10)
    inputs, targets = torch.randn(*shape), torch.randn(*shape[:-1], 3)
    dims = (1, 2) if sequence else (1,)
    loss_fn = lambda out, y: (out - y).pow(2).mean(dims)  # noqa: E731
    moments = random_moments(model)
    normaliser = Normaliser("adafactor", moments, 1e-8, "test").bind(model)
    fac = FactoredLinearGradients(
        model, loss_fn, ["*"], ProjectionConfig(kind="factored", factors=[8, 4], seed=3), normaliser=normaliser
    )
    rows, _, sq_norms = fac(inputs, targets)

    grads, _ = PerExampleGradients(model, loss_fn)(inputs, targets)
    blocks, norms = [], torch.zeros(inputs.shape[0])
    for (name, _, _), p_out, p_in in zip(fac.modules, fac.p_out, fac.p_in):
        v_w, v_b = adafactor_diagonal(moments[f"{name}.weight"], moments[f"{name}.bias"])
        g = torch.cat(
            [grads[f"{name}.weight"] * v_w.rsqrt().sqrt(), (grads[f"{name}.bias"] * v_b.rsqrt().sqrt())[:, :, None]], 2
        )
        norms += g.pow(2).sum((1, 2))
        left = torch.eye(g.shape[1]) if p_out is None else p_out
        right = torch.eye(g.shape[2]) if p_in is None else p_in
        blocks.append((left.T @ g @ right).reshape(g.shape[0], -1))
    expected = torch.cat(blocks, 1)
    assert (rows - expected).abs().max() <= 1e-5 * expected.abs().max()
    torch.testing.assert_close(sq_norms, norms, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("kind", ["adam", "adafactor"])
def test_dense_and_exact_rows_are_the_scaled_gradient(kind):
    """kind none (hooks) and gaussian (vmap): rows are S o g, projected; adam's S is (sqrt(v) + eps)^(-1/2)."""
    task = TabularTask(TaskConfig(dataset="diabetes"), ModelConfig(hidden=[16]))
    model = task.make_model()
    data = task.examples("train").slice(0, 12)
    moments = random_moments(model, 2)
    normaliser = Normaliser(kind, moments, 1e-8, "test").bind(model)
    grads, _ = PerExampleGradients(model, task.per_example_loss)(data.inputs, data.targets)
    scaled = []
    for name, _ in model.named_parameters():
        if kind == "adam":
            s = (moments[name].sqrt() + 1e-8).rsqrt()
        else:
            module = name.rsplit(".", 1)[0]
            v_w, v_b = adafactor_diagonal(moments[f"{module}.weight"], moments[f"{module}.bias"])
            s = (v_w if name.endswith("weight") else v_b).rsqrt().sqrt()
        scaled.append((grads[name] * s).reshape(len(data), -1))
    expected = torch.cat(scaled, 1)
    exact = make_gradient_computer(model, task.per_example_loss, GradientConfig(), ProjectionConfig(), normaliser)
    rows, _, sq_norms = exact(data.inputs, data.targets)
    torch.testing.assert_close(rows, expected, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(sq_norms, expected.pow(2).sum(1), rtol=1e-5, atol=1e-12)
    gaussian = ProjectionConfig(kind="gaussian", dim=64, seed=5)
    projected, _, _ = make_gradient_computer(model, task.per_example_loss, GradientConfig(), gaussian, normaliser)(
        data.inputs, data.targets
    )
    plain = make_gradient_computer(model, task.per_example_loss, GradientConfig(), gaussian)
    reference = plain.projector.project(  # the same projector on the scaled gradients
        {n: (expected[:, a:b]).reshape(grads[n].shape) for n, a, b in spans(grads)}
    )
    torch.testing.assert_close(projected, reference, rtol=1e-4, atol=1e-7)
    if kind == "adam":
        with pytest.raises(GradientError, match="adafactor"):
            make_gradient_computer(
                model, task.per_example_loss, GradientConfig(), ProjectionConfig(kind="factored"), normaliser
            )


def spans(grads):
    start = 0
    for name, g in grads.items():
        size = g[0].numel()
        yield name, start, start + size
        start += size


def test_a_normalised_store_scores_adam_dot_on_the_projected_path(ray_cluster, tmp_path):
    """Built with gradients.normalizer: adam and no projection, the store's projected adam_dot and adam_cos equal
    the exact path's (same v from the further training's batches); plain methods are refused on it and adam_dot
    on a plain store; the normaliser is part of the store's identity."""
    from tdastore.distributed.build import build_store

    config = small_config(
        tmp_path,
        gradients={"normalizer": "adam"},
        groundtruth={"batch_size": 32, "clip_norm": 0.5},
        attribution={"path": "projected"},
    )
    tdastore.train(config, progress=False)
    store = build_store(config, tmp_path / "normalised", progress=False)
    assert store.manifest["projection"]["normaliser"]["kind"] == "adam"
    test = tdastore.Attributor(store, "adam_dot").task.examples("test").slice(0, 5)
    for method in ("adam_dot", "adam_cos"):
        projected = tdastore.Attributor(store, method).score_matrix(test)
        exact = tdastore.Attributor(store, method, {"attribution": {"path": "exact"}}).score_matrix(test)
        np.testing.assert_allclose(projected, exact, rtol=2e-4, atol=1e-6 * np.abs(exact).max())
    with pytest.raises(ConfigError, match="its projected methods are adam_dot and adam_cos"):
        tdastore.Attributor(store, "grad_dot")
    from tdastore.cli import main

    assert main(["index", str(store.root), "--quiet"]) == 0  # the default methods of a normalised store
    assert {p.name for p in (store.root / "indexes").iterdir()} == {"adam_dot-flat", "adam_cos-flat"}
    plain = build_store(small_config(tmp_path, attribution={"path": "projected"}), tmp_path / "plain", progress=False)
    with pytest.raises(ConfigError, match="gradients.normalizer: adam"):
        tdastore.Attributor(plain, "adam_dot")
    from tdastore.errors import StoreError

    with pytest.raises(StoreError, match="different setup"):  # the same output, another normaliser
        build_store(small_config(tmp_path), tmp_path / "normalised", progress=False)
