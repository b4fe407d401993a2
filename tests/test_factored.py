"""The hook-based factored projection equals the dense per-example gradient projected with the same matrices."""

import math

import pytest
import torch
from helpers import flatten
from torch import nn

from tdastore.config import ModelConfig, ProjectionConfig, TaskConfig
from tdastore.errors import GradientError
from tdastore.grads.factored import FactoredLinearGradients
from tdastore.grads.per_example import PerExampleGradients
from tdastore.tasks import TabularTask


def reference_rows(model, loss_fn, inputs, targets, fac):
    """vmap per-example gradients of [W | b], then P_out^T G P_in with the computer's own side matrices."""
    pe = PerExampleGradients(model, loss_fn)
    grads, _ = pe(inputs, targets)
    blocks, norms = [], torch.zeros(inputs.shape[0])
    for (name, _module, with_bias), p_out, p_in in zip(fac.modules, fac.p_out, fac.p_in):
        g = grads[f"{name}.weight"]  # [B, out, in]
        if with_bias:
            g = torch.cat([g, grads[f"{name}.bias"].unsqueeze(2)], dim=2)  # [B, out, in+1]
        norms += g.pow(2).sum((1, 2))
        left = torch.eye(g.shape[1]) if p_out is None else p_out
        right = torch.eye(g.shape[2]) if p_in is None else p_in
        blocks.append((left.T @ g @ right).reshape(g.shape[0], -1))
    return torch.cat(blocks, dim=1), norms


@pytest.mark.parametrize("dataset, factors", [("diabetes", [16, 8]), ("wine", [4, 32]), ("digits", [32, 32])])
def test_factored_equals_projected_dense_gradient(dataset, factors):
    task = TabularTask(TaskConfig(dataset=dataset), ModelConfig(hidden=[64, 48]))
    model = task.make_model()
    data = task.examples("train").slice(0, 30)
    fac = FactoredLinearGradients(
        model, task.per_example_loss, ["*"], ProjectionConfig(kind="factored", factors=factors, seed=4)
    )
    rows, losses, sq_norms = fac(data.inputs, data.targets)
    expected, norms = reference_rows(model, task.per_example_loss, data.inputs, data.targets, fac)
    assert rows.shape == expected.shape == (30, fac.out_dim)
    assert (rows - expected).abs().max() <= 1e-4 * expected.abs().max()
    torch.testing.assert_close(sq_norms, norms, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(losses, task.per_example_loss(model(data.inputs), data.targets).detach())


def test_factored_sequence_inputs_sum_over_positions():
    """[B, T, d] inputs: the gradient sums outer products over positions; norms use the Gram identity."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 40), nn.Tanh(), nn.Linear(40, 5)).eval()
    inputs, targets = torch.randn(6, 7, 12), torch.randn(6, 7, 5)
    loss_fn = lambda out, y: (out - y).pow(2).mean((1, 2))  # noqa: E731
    fac = FactoredLinearGradients(model, loss_fn, ["*"], ProjectionConfig(kind="factored", factors=[8, 8]))
    rows, _, sq_norms = fac(inputs, targets)
    expected, norms = reference_rows(model, loss_fn, inputs, targets, fac)
    assert (rows - expected).abs().max() <= 1e-4 * expected.abs().max()
    torch.testing.assert_close(sq_norms, norms, rtol=1e-4, atol=1e-7)


def test_factored_inner_products_are_unbiased():
    """Kronecker Gaussian factors preserve inner products in expectation: average over seeds."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(60, 80)).eval()
    x, y = torch.randn(2, 60), torch.randn(2, 80)
    loss_fn = lambda out, t: (out - t).pow(2).sum(1)  # noqa: E731
    pe = PerExampleGradients(model, loss_fn)
    full = flatten(pe, pe(x, y)[0])
    exact = float(full[0] @ full[1])
    estimates = []
    for seed in range(200):
        rows, _, _ = FactoredLinearGradients(
            model, loss_fn, ["*"], ProjectionConfig(kind="factored", factors=[16, 16], seed=seed)
        )(x, y)
        estimates.append(float(rows[0] @ rows[1]))
    estimates = torch.tensor(estimates)
    assert abs(float(estimates.mean()) - exact) < 4 * float(estimates.std()) / math.sqrt(200)


def test_factored_refuses_non_linear_parameters():
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 4, 2))
    loss_fn = lambda out, y: out.sum(1)  # noqa: E731
    with pytest.raises(GradientError, match="Linear / Conv1D / Embedding layers only.*0.weight"):
        FactoredLinearGradients(model, loss_fn, ["*"], ProjectionConfig(kind="factored"))
    fac = FactoredLinearGradients(model, loss_fn, ["2.*"], ProjectionConfig(kind="factored", factors=[2, 4]))
    assert fac.out_dim == 2 * 4 and fac.numel == 2 * 12 + 2
    with pytest.raises(GradientError, match="match no parameter"):
        FactoredLinearGradients(model, loss_fn, ["head.*"], ProjectionConfig(kind="factored"))


@pytest.mark.parametrize("sequence", [False, True])
def test_exact_hook_gradients_equal_vmap_layout(sequence):
    """kind none on a Linear-only model uses hooks; rows must equal PerExampleGradients.flatten exactly."""
    from tdastore.config import GradientConfig
    from tdastore.grads.computer import ExactLinearGradients, VmapProjectedGradients, make_gradient_computer

    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Linear(9, 20), nn.ReLU(), nn.Linear(20, 20, bias=False), nn.ReLU(), nn.Linear(20, 3)
    ).eval()
    inputs = torch.randn(7, 5, 9) if sequence else torch.randn(7, 9)
    targets = torch.randn(7, 5, 3) if sequence else torch.randn(7, 3)
    loss_fn = lambda out, y: (out - y).pow(2).reshape(out.shape[0], -1).mean(1)  # noqa: E731
    for patterns in (["*"], ["2.weight", "4.*"]):
        hooks = make_gradient_computer(model, loss_fn, GradientConfig(params=patterns), ProjectionConfig(kind="none"))
        vmapped = VmapProjectedGradients(model, loss_fn, patterns, ProjectionConfig(kind="none"))
        assert isinstance(hooks, ExactLinearGradients) and hooks.spec() == vmapped.spec()
        rows, losses, norms = hooks(inputs, targets)
        expected, expected_losses, expected_norms = vmapped(inputs, targets)
        assert (rows - expected).abs().max() <= 1e-5 * expected.abs().max()
        torch.testing.assert_close(norms, expected_norms, rtol=1e-4, atol=1e-7)
        half = torch.empty(7, hooks.out_dim, dtype=torch.float16)
        hooks(inputs, targets, out=half)
        torch.testing.assert_close(half.float(), expected, rtol=2e-3, atol=1e-4)
    # a bias selected without its weight, or a non-Linear parameter: vmap handles it
    only_bias = make_gradient_computer(model, loss_fn, GradientConfig(params=["0.bias"]), ProjectionConfig(kind="none"))
    assert isinstance(only_bias, VmapProjectedGradients)


def test_modules_auto_selects_exactly_the_blocks_linears():
    """`gradients.modules: auto` on tiny GPT-2, GPT-NeoX, Llama and BERT configs built offline."""
    import re

    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    from tdastore.config import GradientConfig, ProjectionConfig
    from tdastore.grads.computer import make_gradient_computer
    from tdastore.grads.factored import is_conv1d

    small = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=100)
    models = {
        r"transformer\.h": GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32)),
        r"gpt_neox\.layers": GPTNeoXForCausalLM(GPTNeoXConfig(**small)),
        r"model\.layers": LlamaForCausalLM(LlamaConfig(**small, num_key_value_heads=1)),
        r"bert\.encoder\.layer": BertForSequenceClassification(BertConfig(**small)),
    }
    for blocks, model in models.items():
        expected = [  # every Linear / Conv1D under "<blocks>.<i>." and nothing else (no embeddings, heads, pooler)
            name
            for name, m in model.named_modules()
            if (isinstance(m, nn.Linear) or is_conv1d(m)) and re.match(rf"{blocks}\.\d+\.", name)
        ]
        assert len(expected) >= 8
        computer = make_gradient_computer(
            model,
            lambda outputs, targets: outputs,  # selection only: no forward pass here
            GradientConfig(modules="auto"),
            ProjectionConfig(kind="factored", factors=[4, 4]),
        )
        assert [name for name, _, _ in computer.modules] == expected
