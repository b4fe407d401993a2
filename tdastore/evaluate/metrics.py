"""The gold vector and the paper's agreement metrics (PAPER.md, "Metric").

loo [E, T, L, S] and full [E, T, S] hold g(z_t) after further training at each evaluation point e,
without left-out row l (or on all rows), with batch-order seed s. The gold vector per (e, t):
    d = loo - full                       adjustment 1 (same theta_f, same seed)
    d = d - mean_l d                     adjustment 2: mean-centred over the left-out set
    gold = mean_s d                      seed averaging
Agreement: cosine (and Spearman) between gold[e, t, :] and a method's scores[t, :] over the same rows,
averaged over test points with a standard error.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

SEED_GROUPS = (1, 2, 5, 10, 20, 50, 100)


def seed_differences(loo: np.ndarray, full: np.ndarray, seeds: slice = slice(None)) -> np.ndarray:
    """[E, T, L, S], [E, T, S] -> [E, T, L, S]: each seed's adjusted, mean-centred differences."""
    diff = loo[..., seeds].astype(np.float64) - full[:, :, None, seeds]
    diff -= diff.mean(axis=2, keepdims=True)
    return diff


def gold_vectors(loo: np.ndarray, full: np.ndarray, seeds: slice = slice(None)) -> np.ndarray:
    """[E, T, L, S], [E, T, S] -> [E, T, L]: adjusted, mean-centred, seed-averaged gold vectors."""
    return seed_differences(loo, full, seeds).mean(axis=3)


def gold_ceiling(loo: np.ndarray, full: np.ndarray) -> np.ndarray | None:
    """[E]: the cosine with this gold vector that a perfect method would reach (one predicting the expectation
    over batch orders exactly), None with a single seed. The gold vector is that expectation plus the mean of
    the seeds' noise; only the noise across the gold vector's direction turns it (noise along it, such as one
    seed's larger response overall, changes its length), so cos ~ sqrt(1 - |noise across|^2 / |gold|^2), that
    noise estimated from the seeds' residuals, averaged over test points as the methods' cosines are (0 where
    the gold vector is zero, as theirs). A method near it is as good as this ground truth can tell."""
    n_seeds = loo.shape[-1]
    if n_seeds < 2:
        return None
    diff = seed_differences(loo, full)  # [E, T, L, S]
    gold = diff.mean(axis=3)  # [E, T, L], as gold_vectors
    total = (gold**2).sum(axis=2)  # [E, T]
    unit = gold / np.sqrt(np.where(total > 0, total, 1.0))[..., None]
    residual = diff - gold[..., None]  # [E, T, L, S]
    across = residual - np.einsum("etls,etl->ets", residual, unit)[:, :, None, :] * unit[..., None]
    noise = (across**2).sum(axis=(2, 3)) / ((n_seeds - 1) * n_seeds)  # [E, T]: of the seed mean
    ratio = np.where(total > 0, np.maximum(total - noise, 0.0) / np.where(total > 0, total, 1.0), 0.0)
    return np.sqrt(ratio).mean(axis=1)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine along the last axis (0 where either vector is zero)."""
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation along the last axis."""
    ra = rankdata(a, axis=-1)
    rb = np.broadcast_to(rankdata(b, axis=-1), ra.shape)
    return cosine_rows(ra - ra.mean(-1, keepdims=True), rb - rb.mean(-1, keepdims=True))


def agreement(gold: np.ndarray, scores: np.ndarray) -> dict:
    """gold [E, T, L], scores [T, L] (or [E, T, L]: one per evaluation point, as metagradients give) ->
    per evaluation point: mean cosine, its stderr, mean Spearman."""
    scores = scores if scores.ndim == 3 else scores[None]
    cos = cosine_rows(gold, scores)  # [E, T]
    spear = spearman_rows(gold, scores)
    t = cos.shape[1]
    return {
        "cosine": cos.mean(1),
        "stderr": cos.std(1, ddof=1) / np.sqrt(t) if t > 1 else np.zeros(cos.shape[0]),
        "spearman": spear.mean(1),
    }


def seed_curve(loo: np.ndarray, full: np.ndarray, scores: np.ndarray) -> dict[int, dict]:
    """PAPER.md's seed curves: for k seeds per group, the cosine of each group's gold vector averaged over
    the groups and the test points at every amount of further training, *then* the best amount. (Taking each
    group's best first and averaging after overstates the curve: every group picks its own luckiest point.)"""
    n_seeds = loo.shape[-1]
    scores = scores if scores.ndim == 3 else scores[None]
    curve = {}
    for k in SEED_GROUPS:
        if k > n_seeds:
            break
        groups = np.stack(
            [
                cosine_rows(gold_vectors(loo, full, slice(start, start + k)), scores).mean(1)  # [E]
                for start in range(0, n_seeds - k + 1, k)
            ]
        )  # [groups, E]
        best = int(groups.mean(0).argmax())
        at_best = groups[:, best]
        curve[k] = {
            "cosine": float(at_best.mean()),
            "eval": best,  # the evaluation point (index) where the group mean peaks
            "groups": len(at_best),
            "stderr": float(np.std(at_best, ddof=1) / np.sqrt(len(at_best))) if len(at_best) > 1 else 0.0,
        }
    return curve


def linear_datamodeling_score(actual: np.ndarray, scores: np.ndarray, subsets: list[list[int]]) -> dict:
    """LDS per evaluation point: actual [E, T, M] (seed-averaged change of g with subset j left out), scores
    [T, N] over every training row -> the mean over test points of Spearman over j between the predicted
    sum_{i in S_j} score_i and the actual change, its stderr, and the predictions [T, M]."""
    members = np.zeros((len(subsets), scores.shape[1]))  # [M, N]
    for j, rows in enumerate(subsets):
        members[j, rows] = 1.0
    predicted = scores @ members.T  # [T, M]
    per_test = spearman_rows(actual, predicted[None])  # [E, T]
    t = per_test.shape[1]
    return {
        "lds": per_test.mean(1),
        "stderr": per_test.std(1, ddof=1) / np.sqrt(t) if t > 1 else np.zeros(per_test.shape[0]),
        "predicted": predicted,
    }
