"""Projections: deterministic across processes, JL-accurate, and block-wise equal to the dense product."""

import math
import subprocess
import sys

import pytest
import torch
from helpers import projection_matrix

from tdastore.config import ProjectionConfig
from tdastore.grads.projection import DenseProjector, derive_seed, make_projector

SHAPES = {"layer.weight": (70, 30), "layer.bias": (70,), "head.weight": (3, 70)}
KINDS = ["gaussian", "rademacher", "sparse"]

PROJECT_SCRIPT = """
import sys, torch
from tdastore.config import ProjectionConfig
from tdastore.grads.projection import make_projector
shapes = {"layer.weight": (70, 30), "layer.bias": (70,), "head.weight": (3, 70)}
gen = torch.Generator().manual_seed(123)
grads = {n: torch.randn(9, *s, generator=gen) for n, s in shapes.items()}
proj = make_projector(ProjectionConfig(kind=sys.argv[1], dim=64, seed=7, nonzeros=4, block_rows=500), shapes)
sys.stdout.buffer.write(proj.project(grads).numpy().tobytes())
"""


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_is_bitwise_equal_across_processes(kind):
    outputs = [
        subprocess.run([sys.executable, "-c", PROJECT_SCRIPT, kind], capture_output=True, check=True).stdout
        for _ in range(2)
    ]
    assert len(outputs[0]) == 9 * 64 * 4
    assert outputs[0] == outputs[1]
    # and the same bytes in this process, with a different cache budget
    gen = torch.Generator().manual_seed(123)
    grads = {n: torch.randn(9, *s, generator=gen) for n, s in SHAPES.items()}
    here = make_projector(ProjectionConfig(kind=kind, dim=64, seed=7, nonzeros=4, block_rows=500, cache_mb=0), SHAPES)
    assert here.project(grads).numpy().tobytes() == outputs[0]
    other_seed = make_projector(ProjectionConfig(kind=kind, dim=64, seed=8, nonzeros=4, block_rows=500), SHAPES)
    assert not torch.equal(other_seed.project(grads), here.project(grads))


@pytest.mark.parametrize("kind", KINDS)
def test_blockwise_equals_dense_matrix_product(kind):
    """block_rows=100 cuts layer.weight (2,100 rows) into 22 seeded blocks; the product must equal g @ P."""
    config = ProjectionConfig(kind=kind, dim=48, seed=3, nonzeros=4, block_rows=100)
    proj = make_projector(config, SHAPES)
    gen = torch.Generator().manual_seed(0)
    grads = {n: torch.randn(5, *s, generator=gen) for n, s in SHAPES.items()}
    dense = sum(grads[n].reshape(5, -1) @ projection_matrix(proj, n) for n in SHAPES)  # [5, 48]
    torch.testing.assert_close(proj.project(grads), dense, atol=1e-5, rtol=1e-5)
    # each block of rows is the one generated from its own seed
    if kind != "sparse":
        full = projection_matrix(proj, "layer.weight")  # [2100, 48]
        gen = torch.Generator().manual_seed(derive_seed(3, "layer.weight", 4))
        block = (
            torch.randn(100, 48, generator=gen)
            if kind == "gaussian"
            else torch.randint(0, 2, (100, 48), generator=gen).float() * 2 - 1
        )
        torch.testing.assert_close(full[400:500], block / math.sqrt(48))
    else:
        full = projection_matrix(proj, "layer.weight")
        assert ((full != 0).sum(dim=1) == 4).all()  # one non-zero per column block of width 12
        assert torch.allclose(full.abs()[full != 0], torch.tensor(0.5))


@pytest.mark.parametrize("kind", KINDS)
def test_johnson_lindenstrauss_inner_products(kind):
    """k = 1024: the error of <Pu, Pv> over many unit-vector pairs has mean ~0 and std ~ sqrt((1 + c^2) / k)."""
    p, k, pairs = 3000, 1024, 400
    shapes = {"w": (p,)}
    proj = make_projector(ProjectionConfig(kind=kind, dim=k, seed=11, nonzeros=8), shapes)
    gen = torch.Generator().manual_seed(5)
    u = torch.randn(pairs, p, generator=gen)
    v = 0.6 * u + 0.8 * torch.randn(pairs, p, generator=gen)  # correlated pairs: c ~ 0.6
    u, v = u / u.norm(dim=1, keepdim=True), v / v.norm(dim=1, keepdim=True)
    exact = (u * v).sum(1)  # [pairs]
    approx = (proj.project({"w": u}) * proj.project({"w": v})).sum(1)
    err = (approx - exact).numpy()
    expected_std = math.sqrt((1 + float(exact.pow(2).mean())) / k)
    assert abs(err.mean()) < 4 * expected_std / math.sqrt(pairs) + 2e-3
    assert 0.6 * expected_std < err.std() < 1.4 * expected_std
    norms = proj.project({"w": u}).norm(dim=1)
    assert abs(float(norms.pow(2).mean()) - 1) < 0.02  # squared norms preserved on average


def test_identity_projector_concatenates():
    proj = make_projector(ProjectionConfig(kind="none"), SHAPES)
    grads = {n: torch.randn(2, *s) for n, s in SHAPES.items()}
    out = proj.project(grads)
    assert proj.out_dim == 70 * 30 + 70 + 210 == out.shape[1]
    torch.testing.assert_close(out[:, 2100:2170], grads["layer.bias"])


def test_spec_names_what_must_match():
    a = make_projector(ProjectionConfig(kind="gaussian", dim=32, seed=1), SHAPES).spec()
    b = make_projector(ProjectionConfig(kind="gaussian", dim=32, seed=2), SHAPES).spec()
    assert a != b and a["seed"] == 1 and a["out_dim"] == 32 and a["in_dim"] == 2380


def test_cache_is_bounded():
    proj = DenseProjector(ProjectionConfig(kind="gaussian", dim=256, block_rows=1000, cache_mb=1), {"w": (5000,)})
    proj.project({"w": torch.randn(2, 5000)})
    assert proj._cache_bytes <= 2**20 and len(proj._cache) == 1  # one 1000x256 fp32 block (~1 MB) fits
