"""Test-only views of production objects (kept out of the classes themselves)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from tdastore.errors import StoreError
from tdastore.store.manifest import identity_mismatches


def projection_matrix(projector, name: str) -> torch.Tensor:
    """The full [p_name, k] matrix of one parameter of a block projector (small models only)."""
    eye = torch.eye(projector.numel[name])  # [p_name, p_name]
    zeros = {n: torch.zeros(eye.shape[0], projector.numel[n]) for n in projector.names if n != name}
    return projector.project({**zeros, name: eye})


def flatten(per_example, grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """{name: [B, *shape]} -> [B, p] in the order of the computer's parameter names."""
    return torch.cat([grads[n].reshape(grads[n].shape[0], -1) for n in per_example.names], dim=1)


def check_store_matches(store, identity: dict) -> None:
    """Raise if the model, task, gradients or projection asked for differ from the store's."""
    problems = identity_mismatches(store.manifest, {**store.manifest, **identity})
    if problems:
        raise StoreError(f"store '{store.root}' does not match:\n  - " + "\n  - ".join(problems))


def metagrad_scores(meta, seeds, mode: str = "auto") -> torch.Tensor:
    """Leave-one-out estimates a_i ~ -dg/dw_i of a MetaGradient, averaged over seeds: [E, T, R]."""
    return -torch.stack([meta.gradients(s, mode) for s in seeds]).mean(0)


# The tolerance rule for float32 results of one computation taken along different paths (Ray actors vs in
# process, one vs two threads, chunked vs whole, float32 vs a float64 reference, FAISS vs brute force): the
# summands are the same, only their order and the kernel differ, so the results may differ by the rounding
# of sums of `depth` terms of size `scale`: about eps32 * sqrt(depth) * scale (errors in another order add like
# a random walk), times K for the few roundings of each term. `scale` is the size of the summed terms, not of
# the result: for a product A @ B it is |A| @ |B| (elementwise) or its maximum, since a score of 1e-6 summed
# from terms of 1e-3 carries the terms' rounding. Exact equality stays where the bits are the same by design
# (resume, byte-identical stores, one process at fixed threads).
EPS32 = float(np.finfo(np.float32).eps)
K = 8.0


def float32_atol(scale, depth: int) -> np.ndarray:
    """The rule's absolute tolerance: K * eps32 * sqrt(depth) * scale (scale elementwise or a number)."""
    return K * EPS32 * np.sqrt(max(int(depth), 1)) * np.asarray(scale, dtype=np.float64)


def assert_float32_close(actual, desired, depth: int, scale=None) -> None:
    """actual equals desired within the rule; scale defaults to max |desired| (no cancellation expected)."""
    desired = np.asarray(desired, dtype=np.float64)
    scale = np.abs(desired).max(initial=0.0) if scale is None else scale
    assert_within(actual, desired, float32_atol(scale, depth))


def assert_within(actual, desired, atol) -> None:
    """|actual - desired| <= atol entrywise (atol a number or an array of desired's shape), named on failure."""
    actual, desired = np.asarray(actual, dtype=np.float64), np.asarray(desired, dtype=np.float64)
    assert actual.shape == desired.shape, f"shapes differ: {actual.shape} vs {desired.shape}"
    atol = np.broadcast_to(np.asarray(atol, dtype=np.float64), desired.shape)
    off = ~(np.abs(actual - desired) <= atol)  # NaN counts as off
    if off.any():
        where = tuple(int(i) for i in np.argwhere(off)[0])
        raise AssertionError(
            f"{int(off.sum())} of {off.size} entries differ by more than the tolerance; first at {where}: "
            f"{actual[where]!r} vs {desired[where]!r} (tolerance {atol[where]:.3g})"
        )


def product_scale(a, b) -> np.ndarray:
    """|a| @ |b|.T in float64: the size of the terms each entry of a @ b.T sums ([m, p] x [n, p] -> [m, n])."""
    return np.abs(np.asarray(a, dtype=np.float64)) @ np.abs(np.asarray(b, dtype=np.float64)).T


def assert_same_ranking(rows, reference, atol) -> None:
    """rows [m, k] are a top-k of reference scores [m, n] up to swaps of entries closer than atol: the
    reference score at each returned rank equals the k-th best reference score within atol (for a bottom-k,
    pass -reference)."""
    rows, reference = np.asarray(rows), np.asarray(reference, dtype=np.float64)
    chosen = np.take_along_axis(reference, rows, axis=1)  # [m, k]
    best = -np.sort(-reference, axis=1)[:, : rows.shape[1]]  # [m, k]
    atol = np.asarray(atol, dtype=np.float64)
    if np.ndim(atol) == 2 and atol.shape == reference.shape:
        atol = atol.max(axis=1, keepdims=True)  # one tolerance per query: swaps happen between entries
    off = np.abs(chosen - best) > atol
    assert not off.any(), f"ranks differ beyond the tolerance at {np.argwhere(off)[:5].tolist()}"
    assert all(len(set(r)) == len(r) for r in rows.tolist()), "a row is returned twice"


def assert_same_top_k(got, want, atol) -> None:
    """Two ranked answers (result tables: test_id, rank, train_row, score) of one query taken along different
    paths agree up to swaps of near ties: rank by rank their scores lie within atol (a number, or [m, 1] per
    query), and wherever the rows differ the score there ties (within 2 atol) with a neighbouring rank's, so
    that a swap of near-equal entries explains the difference."""
    k = int(np.asarray(want.column("rank")).max())
    rows, want_rows = (np.asarray(t.column("train_row")).reshape(-1, k) for t in (got, want))
    scores, want_scores = (np.asarray(t.column("score"), dtype=np.float64).reshape(-1, k) for t in (got, want))
    np.testing.assert_array_equal(np.asarray(got.column("test_id")), np.asarray(want.column("test_id")))
    atol = np.broadcast_to(np.asarray(atol, dtype=np.float64), want_scores.shape)
    assert_within(scores, want_scores, atol)
    gaps = np.abs(np.diff(want_scores, axis=1))  # [m, k - 1]
    tied = np.zeros(want_scores.shape, dtype=bool)
    tied[:, 1:] |= gaps <= 2 * atol[:, 1:]
    tied[:, :-1] |= gaps <= 2 * atol[:, :-1]
    tied[:, -1] = True  # the last rank may meet a near tie just outside the list
    differ = rows != want_rows
    assert not (differ & ~tied).any(), f"rows differ where no tie explains it: {np.argwhere(differ & ~tied)[:5]}"


def ranked_atol(table, depth: int) -> np.ndarray:
    """The rule for a ranked answer whose operands the test does not hold: per query [m, 1], scale = the
    largest |score| of its list (top and bottom lists hold a query's largest scores, so little cancels)."""
    k = int(np.asarray(table.column("rank")).max())
    scores = np.abs(np.asarray(table.column("score"), dtype=np.float64)).reshape(-1, k)
    return float32_atol(scores.max(1, keepdims=True), depth)


def served_table(expected, hits: list[dict]):
    """The service's hits (dicts, rank order) as a result table shaped like `expected`: each column the hits
    carry (score, train_row, train_id, train_text) replaced by theirs, for assert_same_top_k."""
    for name in expected.column_names:
        if name in hits[0]:
            values = pa.array([hit[name] for hit in hits])
            expected = expected.set_column(expected.schema.get_field_index(name), name, values)
    return expected


def job_damage_is_refused_and_repaired(root, array: str, read, rerun) -> None:
    """A same-size byte flip in one chunk of a job store's `array`: `read()` refuses it (the chunk's crc32c),
    `rerun()` recomputes exactly the unit that wrote it to the same bytes; then again found by `verify --deep`
    (which marks the unit and makes the job incomplete) instead of the rerun's own check."""
    import json
    import zlib
    from pathlib import Path

    import pytest

    from tdastore.cli import main

    def chunk_bytes() -> dict:
        files = sorted(p for p in Path(root, array, "c").rglob("*") if p.is_file())
        return {str(p.relative_to(root)): p.read_bytes() for p in files}

    def markers() -> dict:
        return {p.name: p.read_text() for p in Path(root, "units").glob("*.done")}

    clean, before = chunk_bytes(), markers()
    key = next(iter(clean))
    owners = [n for n, m in before.items() if key in json.loads(m).get("chunks", {})]
    assert len(owners) == 1, owners  # each chunk is one unit's, recorded in its marker
    for found_by_verify in (False, True):
        data = bytearray(clean[key])
        data[len(data) // 2] ^= 0x01
        Path(root, key).write_bytes(bytes(data))
        assert zlib.crc32(bytes(data)) != zlib.crc32(clean[key])
        if found_by_verify:
            assert main(["verify", str(root)]) == 0  # the cheap check sees sizes only
            assert main(["verify", str(root), "--deep"]) == 2
            with pytest.raises(StoreError, match="incomplete"):
                read()
        else:
            with pytest.raises(StoreError, match=r"corrupt \(its crc32c does not match"):
                read()
        rerun()
        assert chunk_bytes() == clean
        after = markers()
        assert [n for n in before if after[n] != before[n]] == owners  # exactly the damaged unit recomputed
        before = after
        read()
