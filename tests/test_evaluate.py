"""The gold vector and the agreement metrics against hand computations."""

import numpy as np
from scipy.stats import spearmanr

from tdastore.evaluate.metrics import agreement, cosine_rows, gold_ceiling, gold_vectors, seed_curve


def test_gold_vector_by_hand():
    # E=1 evaluation point, T=1 test point, L=3 left-out rows, S=2 seeds
    full = np.array([[[1.0, 2.0]]])  # [E, T, S]
    loo = np.array([[[[1.5, 2.0], [0.5, 2.6], [1.0, 2.1]]]])  # [E, T, L, S]
    # seed 0: loo - full = [0.5, -0.5, 0.0] -> centred [0.5, -0.5, 0.0]
    # seed 1: loo - full = [0.0, 0.6, 0.1]  -> mean 0.2333 -> centred [-0.2333, 0.3667, -0.1333]
    expected = (np.array([0.5, -0.5, 0.0]) + np.array([-0.7 / 3, 1.1 / 3, -0.4 / 3])) / 2
    np.testing.assert_allclose(gold_vectors(loo, full)[0, 0], expected, atol=1e-12)
    np.testing.assert_allclose(gold_vectors(loo, full, slice(0, 1))[0, 0], [0.5, -0.5, 0.0])


def test_adjustment_one_does_not_matter_after_centring():
    rng = np.random.default_rng(0)
    loo, full = rng.normal(size=(4, 3, 6, 5)), rng.normal(size=(4, 3, 5))
    np.testing.assert_allclose(gold_vectors(loo, full), gold_vectors(loo, np.zeros_like(full)), atol=1e-12)


def test_agreement_against_scipy_and_numpy():
    rng = np.random.default_rng(1)
    gold, scores = rng.normal(size=(5, 7, 12)), rng.normal(size=(7, 12))
    stats = agreement(gold, scores)
    cos = np.array([[g @ s / np.linalg.norm(g) / np.linalg.norm(s) for g, s in zip(ge, scores)] for ge in gold])
    np.testing.assert_allclose(stats["cosine"], cos.mean(1))
    np.testing.assert_allclose(stats["stderr"], cos.std(1, ddof=1) / np.sqrt(7))
    rho = np.array([[spearmanr(g, s)[0] for g, s in zip(ge, scores)] for ge in gold])
    np.testing.assert_allclose(stats["spearman"], rho.mean(1), atol=1e-12)
    assert cosine_rows(np.zeros(3), np.ones(3)) == 0.0


def test_seed_curve_by_hand():
    rng = np.random.default_rng(2)
    loo, full, scores = rng.normal(size=(3, 2, 4, 4)), rng.normal(size=(3, 2, 4)), rng.normal(size=(2, 4))
    curve = seed_curve(loo, full, scores)
    assert sorted(curve) == [1, 2]
    for k in (1, 2):
        per_eval = []  # the mean over groups and test points at each evaluation point, then the best point
        for e in range(3):
            groups = []
            for start in range(0, 4, k):
                gold = gold_vectors(loo, full, slice(start, start + k))
                groups.append(np.mean([cosine_rows(gold[e, t], scores[t]) for t in range(2)]))
            per_eval.append(np.mean(groups))
        assert curve[k]["groups"] == 4 // k and curve[k]["eval"] == int(np.argmax(per_eval))
        np.testing.assert_allclose(curve[k]["cosine"], max(per_eval))
        each_group_best = np.mean(  # the old definition: never below the paper's
            [
                max(
                    np.mean([cosine_rows(gold_vectors(loo, full, slice(s, s + k))[e, t], scores[t]) for t in range(2)])
                    for e in range(3)
                )
                for s in range(0, 4, k)
            ]
        )
        assert curve[k]["cosine"] <= each_group_best + 1e-12


def test_gold_ceiling_is_the_cosine_of_the_true_expectation():
    """Seeds drawn as a known expectation plus noise: the ceiling estimated from the seeds alone equals the
    cosine of that expectation with the seed-averaged gold vector, at two noise levels."""
    rng = np.random.default_rng(0)
    e, t, left, seeds = 2, 200, 60, 8
    mean = rng.normal(size=(e, t, left))
    mean -= mean.mean(axis=2, keepdims=True)
    for noise, expected_range in ((0.5, (0.97, 0.995)), (2.0, (0.78, 0.85))):  # 1/sqrt(1 + noise^2/8): .985, .816
        full = rng.normal(size=(e, t, seeds))
        loo = full[:, :, None, :] + mean[..., None] + noise * rng.normal(size=(e, t, left, seeds))
        true = cosine_rows(mean, gold_vectors(loo, full)).mean(axis=1)  # [E]: needs the expectation itself
        estimate = gold_ceiling(loo, full)
        np.testing.assert_allclose(estimate, true, atol=0.01)
        assert expected_range[0] < true.min() and true.max() < expected_range[1]
    # noise along the expectation (each seed's response scaled by 1 +- 0.5) does not turn the gold vector
    scale = 1 + 0.5 * rng.standard_normal(size=(1, 1, 1, seeds))
    loo = full[:, :, None, :] + mean[..., None] * scale + 0.1 * rng.normal(size=(e, t, left, seeds))
    true = cosine_rows(mean, gold_vectors(loo, full)).mean(axis=1)
    np.testing.assert_allclose(gold_ceiling(loo, full), true, atol=0.01)
    assert true.min() > 0.99
    assert gold_ceiling(loo[..., :1], full[..., :1]) is None
