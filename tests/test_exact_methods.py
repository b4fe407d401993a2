"""Every method on the exact path equals an independent float64 computation with explicit matrices."""

import copy

import numpy as np
import pytest
import torch
from conftest import small_config

import tdastore
from tdastore.methods import METHODS, get_method
from tdastore.precond.exact.scorer import ExactScorer
from tdastore.tasks import TabularTask
from tdastore.training import load_model

REL = 1e-4


def rel_err(got, ref):
    return float(np.abs(np.asarray(got, dtype=np.float64) - ref).max() / np.abs(ref).max())


class Reference:
    """Float64 model copy: flat parameters, per-example gradients by a loop, explicit H and GN."""

    def __init__(self, model, task):
        self.model = copy.deepcopy(model).double()
        self.task = task
        self.params = list(self.model.parameters())
        self.train, self.test = task.examples("train"), task.examples("test").slice(0, 6)
        self.n = len(self.train)

    def set_flat(self, theta):
        torch.nn.utils.vector_to_parameters(theta, self.params)

    def flat(self):
        return torch.nn.utils.parameters_to_vector(self.params).detach().clone()

    def loss(self, data, reduction="mean"):
        losses = self.task.per_example_loss(
            self.model(data.inputs.double()),
            data.targets if data.targets.dtype == torch.int64 else data.targets.double(),
        )
        return losses.mean() if reduction == "mean" else losses

    def grads(self, data):
        rows = []
        for i in range(len(data)):
            losses = self.loss(data.slice(i, i + 1), "none")
            rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses.sum(), self.params)]))
        return torch.stack(rows).numpy()

    def call(self, theta, inputs):
        """The model at flat parameters theta (differentiable in theta)."""
        names = [n for n, _ in self.model.named_parameters()]
        sizes = [p.numel() for p in self.params]
        views = {n: t.view(p.shape) for n, t, p in zip(names, torch.split(theta, sizes), self.params)}
        return torch.func.functional_call(self.model, views, (inputs,))

    def hessian(self):
        targets = self.train.targets if self.task.kind != "regression" else self.train.targets.double()
        f = lambda theta: self.task.per_example_loss(self.call(theta, self.train.inputs.double()), targets).mean()  # noqa: E731
        return torch.autograd.functional.hessian(f, self.flat()).numpy()  # double backward, explicit [p, p]

    def gauss_newton(self):
        f = lambda theta: self.call(theta, self.train.inputs.double())  # noqa: E731
        jac = torch.autograd.functional.jacobian(f, self.flat()).numpy()  # [n, out, p]
        out = self.model(self.train.inputs.double()).detach()
        if self.task.kind == "regression":
            h_out = np.full((self.n, 1, 1), 2.0)
        else:
            p = torch.softmax(out, 1).numpy()
            h_out = np.stack([np.diag(pi) - np.outer(pi, pi) for pi in p])
        return np.einsum("nop,noq,nqr->pr", jac, h_out, jac) / self.n

    def per_example_hvp(self, v, h=1e-4):
        theta0 = self.flat()
        self.set_flat(theta0 + h * v)
        plus = self.grads(self.train)
        self.set_flat(theta0 - h * v)
        minus = self.grads(self.train)
        self.set_flat(theta0)
        return (plus - minus) / (2 * h)


@pytest.fixture(scope="module", params=["diabetes", "wine"])
def setup(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    config = small_config(
        tmp,
        dataset=request.param,
        model={"hidden": [24, 16]},
        train={"epochs": 40},
        attribution={"path": "exact", "cg_tol": 1e-12, "cg_max_iter": 3000, "batch_size": 128},
    )
    tdastore.train(config, progress=False)
    task = TabularTask(config.task, config.model)
    model = load_model(config, task)
    ref = Reference(model, task)
    g_train, g_test = ref.grads(ref.train), ref.grads(ref.test)
    lambda_0 = float((g_train**2).mean())
    return config, task, model, ref, g_train, g_test, lambda_0


def scorer_for(setup, **attribution):
    config, task, model = setup[:3]
    config = copy.deepcopy(config)
    for key, value in attribution.items():
        setattr(config.attribution, key, value)
    return ExactScorer(model, task, config)


def test_first_order_methods(setup):
    config, task, model, ref, g_train, g_test, _ = setup
    scorer = scorer_for(setup)
    dot = g_test @ g_train.T / ref.n
    assert rel_err(scorer.scores(get_method("grad_dot"), ref.test), dot) <= REL
    assert rel_err(scorer.scores(get_method("tracin_final"), ref.test), config.train.lr * dot) <= REL
    cos = (g_test / np.linalg.norm(g_test, axis=1, keepdims=True)) @ (
        g_train / np.linalg.norm(g_train, axis=1, keepdims=True)
    ).T
    assert rel_err(scorer.scores(get_method("grad_cos"), ref.test), cos / ref.n) <= REL


def test_gauss_newton_influence(setup):
    config, task, model, ref, g_train, g_test, lambda_0 = setup
    lam = 10 * lambda_0
    scorer = scorer_for(setup, damping_factor=10.0)
    gn = ref.gauss_newton()
    expected = np.linalg.solve(gn + lam * np.eye(len(gn)), g_test.T).T @ g_train.T / ref.n
    assert rel_err(scorer.scores(get_method("if_gn"), ref.test), expected) <= REL
    assert scorer.info["lambda_0"] == pytest.approx(lambda_0, rel=1e-4)


def positive_definite_factor(hessian, lambda_0):
    """A damping factor that makes H + lambda I comfortably positive definite."""
    lowest = float(np.linalg.eigvalsh(hessian)[0])
    return max(10.0, (2 * max(0.0, -lowest) + lambda_0) / lambda_0)


def test_hessian_influence(setup):
    config, task, model, ref, g_train, g_test, lambda_0 = setup
    hessian = ref.hessian()
    factor = positive_definite_factor(hessian, lambda_0)
    scorer = scorer_for(setup, damping_factor=factor)
    expected = np.linalg.solve(hessian + factor * lambda_0 * np.eye(len(hessian)), g_test.T).T @ g_train.T / ref.n
    assert rel_err(scorer.scores(get_method("if_h"), ref.test), expected) <= REL


def test_generalised_influence(setup):
    config, task, model, ref, g_train, g_test, lambda_0 = setup
    hessian = ref.hessian()
    factor = positive_definite_factor(hessian, lambda_0)
    damped = hessian + factor * lambda_0 * np.eye(len(hessian))
    shift = -np.linalg.solve(damped, g_train.mean(0))  # dTheta(D)
    train_side = g_train + ref.per_example_hvp(torch.tensor(shift))  # grad L_i + Hess L_i dTheta(D)
    expected = np.linalg.solve(damped, g_test.T).T @ train_side.T / ref.n
    scorer = scorer_for(setup, damping_factor=factor)
    assert rel_err(scorer.scores(get_method("if_gen"), ref.test), expected) <= 1e-3  # finite-difference reference
    plain = np.linalg.solve(damped, g_test.T).T @ g_train.T / ref.n
    assert rel_err(expected, plain) > 1e-3  # the correction term is not negligible here


def test_lissa_converges_to_the_exact_solve(setup):
    config, task, model, ref, g_train, g_test, lambda_0 = setup
    gn = ref.gauss_newton()
    lam = 10 * lambda_0
    exact = np.linalg.solve(gn + lam * np.eye(len(gn)), g_test.T).T @ g_train.T / ref.n
    errors = [
        rel_err(scorer_for(setup, lissa_depth=depth).scores(get_method("lissa"), ref.test), exact)
        for depth in (10, 100, 300)
    ]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] <= 1e-3


def test_datainf(setup):
    config, task, model, ref, g_train, g_test, _ = setup
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    expected_test = np.zeros_like(g_test)
    col = 0
    for module in dict.fromkeys(n.rsplit(".", 1)[0] for n in names):
        width = sum(s for n, s in zip(names, sizes) if n.rsplit(".", 1)[0] == module)
        g = g_train[:, col : col + width]
        lam = (g**2).mean() / 10
        matrix = (np.eye(width) - sum(np.outer(r, r) / (lam + r @ r) for r in g) / ref.n) / lam
        expected_test[:, col : col + width] = g_test[:, col : col + width] @ matrix
        col += width
    expected = expected_test @ g_train.T / ref.n
    assert rel_err(scorer_for(setup).scores(get_method("datainf"), ref.test), expected) <= REL


def layer_io(ref, data):
    """Independent per-example inputs and output gradients of every Linear layer (float64)."""
    acts, outs = [], []
    x = data.inputs.double()
    for module in ref.model:
        if isinstance(module, torch.nn.Linear):
            acts.append(x.detach())
            x = module(x)
            x.retain_grad()
            outs.append(x)
        else:
            x = module(x)
    targets = data.targets if data.targets.dtype == torch.int64 else data.targets.double()
    ref.task.per_example_loss(x, targets).sum().backward()
    return acts, [o.grad.detach() for o in outs]


def test_ekfac(setup):
    config, task, model, ref, g_train, g_test, _ = setup
    acts, grads = layer_io(ref, ref.train)
    layers, factors = [m for m in ref.model if isinstance(m, torch.nn.Linear)], []
    for a, d in zip(acts, grads):
        a = np.concatenate([a.numpy(), np.ones((len(a), 1))], axis=1)
        d = d.numpy()
        q_a = np.linalg.eigh(a.T @ a / ref.n)[1]
        q_s = np.linalg.eigh(d.T @ d / ref.n)[1]
        values = np.mean([(q_s.T @ np.outer(di, ai) @ q_a) ** 2 for di, ai in zip(d, a)], axis=0)
        factors.append((q_a, q_s, values))
    lam = 10 * sum(v.sum() for _, _, v in factors) / g_train.shape[1]
    expected_test, col = np.zeros_like(g_test), 0
    for layer, (q_a, q_s, values) in zip(layers, factors):
        n_out, n_in = layer.out_features, layer.in_features
        w = g_test[:, col : col + n_out * n_in].reshape(-1, n_out, n_in)
        b = g_test[:, col + n_out * n_in : col + n_out * (n_in + 1)]
        g = np.concatenate([w, b[:, :, None]], axis=2)
        pre = q_s @ ((q_s.T @ g @ q_a) / (values + lam)) @ q_a.T
        expected_test[:, col : col + n_out * n_in] = pre[:, :, :n_in].reshape(len(g), -1)
        expected_test[:, col + n_out * n_in : col + n_out * (n_in + 1)] = pre[:, :, n_in]
        col += n_out * (n_in + 1)
    expected = expected_test @ g_train.T / ref.n
    assert rel_err(scorer_for(setup, damping_factor=10.0).scores(get_method("ekfac"), ref.test), expected) <= REL


def test_methods_without_an_exact_path_say_so(setup):
    from tdastore.errors import ConfigError

    with pytest.raises(ConfigError, match="trak1.*no exact path.*attribution.path: projected"):
        scorer_for(setup).scores(get_method("trak1"), setup[3].test)
    with pytest.raises(ConfigError, match="unknown method 'tracin'"):
        get_method("tracin")
    assert {m.name for m in METHODS.values() if m.exact} >= {
        "grad_dot",
        "if_gn",
        "if_h",
        "lissa",
        "if_gen",
        "datainf",
        "ekfac",
    }


def test_exact_path_refuses_large_models(setup):
    from tdastore.errors import ConfigError

    with pytest.raises(ConfigError, match="max_exact_params"):
        scorer_for(setup, max_exact_params=100)


def reference_second_moment(ref, gt) -> np.ndarray:
    """Adam's v by a plain loop: squared minibatch gradients (clip_grad_norm_) of the seed-0 epoch, averaged."""
    order = torch.randperm(ref.n, generator=torch.Generator().manual_seed(0))
    total, batches = 0.0, 0
    for start in range(0, ref.n, gt.batch_size):
        ref.model.zero_grad()
        ref.loss(ref.train.take(order[start : start + gt.batch_size])).backward()
        torch.nn.utils.clip_grad_norm_(ref.params, gt.clip_norm)
        total = total + torch.cat([p.grad.reshape(-1) for p in ref.params]).numpy() ** 2
        batches += 1
    return total / batches


def test_optimizer_aware_and_diagonal_methods(setup):
    """adam_dot = g^T diag(1/(sqrt(v)+eps)) g_i with v from the further training's clipped batches, adam_cos its
    cosine in that metric, if_diag the damped diagonal empirical Fisher: each equals numpy from a loop."""
    config, task, model, ref, g_train, g_test, lambda_0 = setup
    config = copy.deepcopy(config)
    config.groundtruth.batch_size, config.groundtruth.clip_norm = 32, 0.05  # clipping bites on most batches
    scorer = ExactScorer(model, task, config)
    d = 1.0 / (np.sqrt(reference_second_moment(ref, config.groundtruth)) + config.attribution.adam_eps)
    assert rel_err(scorer.scores(get_method("adam_dot"), ref.test), (g_test * d) @ g_train.T / ref.n) <= REL
    norms_test, norms_train = np.sqrt((g_test**2 * d).sum(1)), np.sqrt((g_train**2 * d).sum(1))
    cos = (g_test * d) @ g_train.T / np.outer(norms_test, norms_train)
    assert rel_err(scorer.scores(get_method("adam_cos"), ref.test), cos / ref.n) <= REL
    assert scorer.info["second_moment"] == "further-training schedule"
    fisher = (g_train**2).mean(0)
    expected = (g_test / (fisher + 10 * lambda_0)) @ g_train.T / ref.n
    assert rel_err(scorer_for(setup, damping_factor=10.0).scores(get_method("if_diag"), ref.test), expected) <= REL


def test_second_moment_from_a_saved_optimizer_state_by_name(setup, tmp_path):
    """A Hugging Face Trainer-style AdamW state (no-decay group first, so positions differ from the model's
    order) is matched by parameter name, bias-corrected, and gives the scores of numpy with that v; another
    model's state and a state without names are refused."""
    from tdastore.errors import ConfigError

    config, task, model, ref, g_train, g_test, _ = setup
    trained = copy.deepcopy(model)
    named = list(trained.named_parameters())
    optimizer = torch.optim.AdamW(
        [
            {"params": [(n, p) for n, p in named if "bias" in n], "weight_decay": 0.0},
            {"params": [(n, p) for n, p in named if "bias" not in n]},
        ],  # fmt: skip
        lr=1e-4,
        betas=(0.9, 0.99),
    )
    data = task.examples("train")
    for step in range(3):
        optimizer.zero_grad()
        task.per_example_loss(trained(data.inputs[step::3]), data.targets[step::3]).mean().backward()
        optimizer.step()
    path = tmp_path / "optimizer.pt"
    torch.save(optimizer.state_dict(), path)
    v = {n: optimizer.state[p]["exp_avg_sq"] / (1 - 0.99**3) for n, p in named}
    flat_v = torch.cat([v[n].reshape(-1) for n, _ in model.named_parameters()]).double().numpy()
    d = 1.0 / (np.sqrt(flat_v) + 1e-8)
    scorer = scorer_for(setup, optimizer_state=str(path))
    assert rel_err(scorer.scores(get_method("adam_dot"), ref.test), (g_test * d) @ g_train.T / ref.n) <= REL
    assert scorer.info["second_moment"] == str(path)

    torch.save({"module.0.weight": torch.ones(3, 3)}, tmp_path / "other.pt")  # a prefix is fine, the shape not
    with pytest.raises(ConfigError, match="has no entry for parameter|has shape"):
        scorer_for(setup, optimizer_state=str(tmp_path / "other.pt")).scores(get_method("adam_dot"), ref.test)
    unnamed = torch.optim.Adam(trained.parameters())
    torch.save(unnamed.state_dict(), tmp_path / "unnamed.pt")
    with pytest.raises(ConfigError, match="does not name its parameters"):
        scorer_for(setup, optimizer_state=str(tmp_path / "unnamed.pt")).scores(get_method("adam_dot"), ref.test)


def test_ekfac_unfolds_conv2d_layers_as_kronfluence_does():
    """A Conv2d layer (stride 2, padding 1, bias) in exact EK-FAC: the factors from patches cut out by explicit
    loops and output gradients from autograd, G per example equal to autograd's weight gradient, and the
    preconditioned vectors equal numpy's Q_S [(Q_S^T G Q_A) / (Lambda + lambda)] Q_A^T."""
    from torch import nn
    from torch.nn import functional as F

    from tdastore.precond.exact.ekfac import EkfacFactors
    from tdastore.tasks.base import Examples

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(27, 4)).double()
    x, y = torch.randn(10, 2, 5, 5, dtype=torch.float64), torch.randint(0, 4, (10,))

    def loss(outputs, targets):
        return F.cross_entropy(outputs, targets, reduction="none")

    factors = EkfacFactors(model, loss, ["*"], Examples(x, y, np.arange(10), y.numpy()), 4, 10.0)
    conv = model[0]
    out = conv(x)
    out.retain_grad()
    loss(model[1:](out), y).sum().backward()
    d, padded = out.grad.numpy(), np.pad(x.numpy(), ((0, 0), (0, 0), (1, 1), (1, 1)))  # [B, 3, 3, 3], [B, 2, 7, 7]
    a_cov, s_cov, per_example = np.zeros((19, 19)), np.zeros((3, 3)), []
    for b in range(10):
        g = np.zeros((3, 19))
        for i in range(3):
            for j in range(3):
                a = np.append(padded[b, :, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3].reshape(-1), 1.0)  # [2*3*3 + 1]
                a_cov, s_cov, g = (
                    a_cov + np.outer(a, a),
                    s_cov + np.outer(d[b, :, i, j], d[b, :, i, j]),
                    g + np.outer(d[b, :, i, j], a),
                )
        per_example.append(g)
        model.zero_grad()
        loss(model(x[b : b + 1]), y[b : b + 1]).sum().backward()
        np.testing.assert_allclose(g[:, :18], conv.weight.grad.reshape(3, -1).numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(g[:, 18], conv.bias.grad.numpy(), rtol=1e-10, atol=1e-12)
    q_a, q_s = np.linalg.eigh(a_cov / 10)[1], np.linalg.eigh(s_cov / 10)[1]
    values = np.mean([(q_s.T @ g @ q_a) ** 2 for g in per_example], axis=0)
    np.testing.assert_allclose(factors.eigenvalues[0].numpy(), values, rtol=1e-8, atol=1e-14)
    vectors = torch.randn(5, factors.numel, dtype=torch.float64)
    g = np.concatenate([vectors[:, :54].reshape(5, 3, 18).numpy(), vectors[:, 54:57].numpy()[:, :, None]], axis=2)
    expected = q_s @ ((q_s.T @ g @ q_a) / (values + factors.damping)) @ q_a.T  # [5, 3, 19]
    got = factors.apply(vectors).double().numpy()
    np.testing.assert_allclose(
        got[:, :54], expected[:, :, :18].reshape(5, -1), rtol=1e-4, atol=1e-6 * np.abs(expected).max()
    )
    np.testing.assert_allclose(got[:, 54:57], expected[:, :, 18], rtol=1e-4, atol=1e-6 * np.abs(expected).max())


def reference_replay(ref, gt, rows, horizon, seeds):
    """n (theta_i(H) - theta(H)) by torch.optim itself: a float64 parameter vector, its .grad set each step to the
    frozen batch-mean gradient (minus g_i / n for the run without row i), clip_grad_norm_, optimizer.step()."""
    from tdastore.precond.exact.replay import SEED_OFFSET

    g_all = torch.from_numpy(ref.grads(ref.train))  # [N, p]
    per_epoch = -(-ref.n // gt.batch_size)
    out = np.zeros((len(rows), g_all.shape[1]))
    for s in range(seeds):
        generator = torch.Generator().manual_seed(SEED_OFFSET + s)
        batches = []
        for t in range(horizon):
            if t % per_epoch == 0:
                order = torch.randperm(ref.n, generator=generator)
            batches.append(g_all[order[(t % per_epoch) * gt.batch_size : (t % per_epoch + 1) * gt.batch_size]].mean(0))

        def run(minus):
            theta = torch.nn.Parameter(ref.flat().clone())
            optimizer = torch.optim.AdamW([theta], lr=gt.lr, weight_decay=gt.weight_decay)
            for g in batches:
                theta.grad = g - minus
                torch.nn.utils.clip_grad_norm_([theta], gt.clip_norm)
                optimizer.step()
            return theta.detach()

        full = run(torch.zeros_like(g_all[0]))
        for k, i in enumerate(rows):
            out[k] += ref.n * (run(g_all[i] / ref.n) - full).numpy()
    return out / seeds


def test_adam_replay_equals_torch_optim_on_frozen_gradients(setup, monkeypatch):
    """adam_replay's rows are the difference torch.optim.AdamW (decoupled decay, clipping that bites) makes after H
    steps on the final model's frozen batch gradients without row i, the runs stepped a few columns at a time
    (clipping's norms found first); with plain SGD and no clipping the replay is linear: lr H grad_dot."""
    import tdastore.precond.exact.replay as replay_module

    monkeypatch.setattr(replay_module, "CHUNK_ENTRIES", 1000)  # chunks of 1000 // b columns, and a shorter last one
    config, task, model, ref, g_train, g_test, lambda_0 = setup
    config = copy.deepcopy(config)
    gt = config.groundtruth
    gt.optimizer, gt.lr, gt.batch_size, gt.clip_norm, gt.weight_decay = "adamw", 1e-3, 32, 0.05, 0.01
    config.attribution.replay_steps, config.attribution.replay_seeds = 40, 2  # four epochs of batches
    scorer = ExactScorer(model, task, config)
    got = scorer.scores(get_method("adam_replay"), ref.test)  # [T, N]
    rows = [0, 5, 17]
    expected = g_test @ reference_replay(ref, gt, rows, 40, 2).T / ref.n
    assert rel_err(got[:, rows], expected) <= 1e-3  # float32 gradients through Adam's normalisation
    assert scorer.info["replay_steps"] == 40
    gt.optimizer, gt.clip_norm, gt.weight_decay = "sgd", None, 0.0
    sgd = ExactScorer(model, task, config).scores(get_method("adam_replay"), ref.test)
    assert rel_err(sgd, gt.lr * 40 * g_test @ g_train.T / ref.n) <= REL
