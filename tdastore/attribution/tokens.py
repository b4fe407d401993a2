"""Token-level attribution: which tokens of a training document, and which target tokens of a query, make a score.

A projected score is s(q, i) = q . T(r_i) with q = eps T(g) (g the query's test gradient) and T the method's
linear map (K^(1/2), after unit normalisation for cosine methods). Both gradients are sums over tokens, so the
score splits exactly:

- training-document tokens: a factored row is r_i = sum_t R_it, R_it the block-wise P_out^T d_t (x) P_in^T x_t
  of position t (FactoredLinearGradients.token_rows); token t's share is q . T(R_it), computed on demand for the
  documents asked about, never stored;
- query tokens: the test function is the mean loss over the query's n target tokens, so g = (1/n) sum_j G_j with
  G_j the gradient of target token j's loss alone (a copy of the query whose other targets are masked); token
  j's share is eps T(G_j / n) . T(r_i).

A cosine method divides by the whole row's norm (the document's, the query's), not each token's, so the shares
still sum to the score.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from tdastore.errors import ConfigError
from tdastore.tasks.measurements import sums_over_tokens

IGNORE = -100  # a target token without a loss


def query_token_copies(
    test, summed: bool = False
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray, np.ndarray]:
    """One copy of each query per target token, every other target masked: (inputs [n, 2, L], targets [n, L],
    owner [n] (the query's row), position [n] (the target token's position), weight [n] (1 / the query's
    target count for a mean over tokens, 1 for a sum, so the copies' gradients times it sum to the query's))."""
    inputs, targets = test.inputs, test.targets  # [m, 2, L], [m, L]
    owner, position, weight = [], [], []
    for row in range(targets.shape[0]):
        counted = torch.nonzero(targets[row, 1:] != IGNORE).flatten() + 1  # position t predicts token t (t >= 1)
        owner += [row] * len(counted)
        position += counted.tolist()
        weight += [1.0 if summed else 1.0 / max(1, len(counted))] * len(counted)
    owner_t, position_t = torch.tensor(owner, dtype=torch.long), torch.tensor(position, dtype=torch.long)
    copies = torch.full((len(owner), targets.shape[1]), IGNORE, dtype=targets.dtype)
    copies[torch.arange(len(owner)), position_t] = targets[owner_t, position_t]
    return inputs[owner_t], copies, np.asarray(owner), np.asarray(position), np.asarray(weight, dtype=np.float64)


def transformed(rows: np.ndarray, operator, norm: float | None) -> np.ndarray:
    """T(rows / norm): the method's linear map applied to terms of one row whose whole norm is `norm`."""
    rows = np.asarray(rows, dtype=np.float64)
    if norm is not None:
        rows = rows / max(norm, 1e-30)
    return np.asarray(operator.transform(rows.astype(np.float32)), dtype=np.float64)


def token_table(attributor, test, hits: pa.Table, decode) -> pa.Table:
    """Per hit (test_id, rank, train_id, train_row) of `hits`: every training-document token's and every query
    target token's share of the score, with the token's text; decode(ids) -> token strings."""
    method, operator = attributor.method, attributor.operator
    unit_train, unit_test = method.unit_projected("train"), method.unit_projected("test")
    scale = np.float64(attributor.scale)
    # the query side: whole test gradients and per-target-token ones, in the store's space
    g = attributor.test_rows(test).astype(np.float64)  # [m, K]
    summed = bool(sums_over_tokens(attributor.task, attributor.measurement))
    inputs, targets, owner, position, weight = query_token_copies(test, summed)
    token_g = attributor.test_rows_of(inputs, targets).astype(np.float64) * weight[:, None]  # [n, K]
    q_norm = np.linalg.norm(g, axis=1) if unit_test else [None] * len(g)
    queries = [transformed(g[j : j + 1], operator, q_norm[j])[0] * scale for j in range(len(g))]  # [K] each
    # the training side: the hit documents' per-position terms
    test_index = {int(t): j for j, t in enumerate(test.ids)}
    rows = sorted({int(r) for r in hits.column("train_row").to_pylist()})
    docs = attributor.train_token_rows(rows)  # {row: (token ids [T], terms [T, K])}
    columns = {k: [] for k in ("test_id", "rank", "train_id", "train_row", "side", "position", "token_id", "token",
                               "score", "document_score")}  # fmt: skip
    for test_id, rank, train_id, train_row in zip(
        *(hits.column(c).to_pylist() for c in ("test_id", "rank", "train_id", "train_row"))
    ):
        j = test_index[int(test_id)]
        ids, terms = docs[int(train_row)]
        whole = terms.sum(0, keepdims=True)  # [1, K] the document's row
        t_norm = float(np.linalg.norm(whole)) if unit_train else None
        train_side = transformed(terms, operator, t_norm)  # [T, K]
        document = transformed(whole, operator, t_norm)[0]  # [K]
        score = float(queries[j] @ document)
        mine = np.flatnonzero(owner == j)
        query_side = transformed(token_g[mine], operator, q_norm[j]) * scale  # [n_j, K]
        sides = [
            ("train", np.arange(len(ids)), ids, train_side @ queries[j]),
            ("test", position[mine], test.inputs[j, 0, position[mine]].numpy(), query_side @ document),
        ]
        for side, positions, token_ids, scores in sides:
            columns["side"] += [side] * len(positions)
            columns["position"] += [int(p) for p in positions]
            columns["token_id"] += [int(t) for t in token_ids]
            columns["token"] += decode(token_ids)
            columns["score"] += [float(s) for s in scores]
            for key, value in (("test_id", test_id), ("rank", rank), ("train_id", train_id), ("train_row", train_row),
                               ("document_score", score)):  # fmt: skip
                columns[key] += [value] * len(positions)
    return pa.table(columns)


def require_tokens(attributor) -> None:
    """Token shares need a text store on the projected path whose rows are factored (per-position terms)."""
    if attributor.path != "projected":
        raise ConfigError("token-level scores are computed on the projected path: use attribution.path: projected")
    if attributor.store.manifest["projection"]["kind"] != "factored":
        raise ConfigError(
            f"token-level scores of training documents need a factored store (per-position terms P_out^T d_t (x) "
            f"P_in^T x_t); store '{attributor.store.root}' is projected with "
            f"'{attributor.store.manifest['projection']['kind']}': rebuild it with projection.kind: factored"
        )
    if not getattr(attributor.task, "tokenizer", None) or attributor.task.describe_inputs().get("kind") != "causal_lm":
        raise ConfigError("token-level scores apply to causal language-model stores (task.kind: causal_lm)")
    if sums_over_tokens(attributor.task, attributor.measurement) is None:
        raise ConfigError(
            f"measurement '{attributor.measurement}' is a function of yours: token shares need a sum or mean over "
            "target tokens (loss, completion, logprob, margin)"
        )
