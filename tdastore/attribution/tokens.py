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

On the exact path (full parameter space) the score is x . r_i with x = eps K g (the method's test vector) and r_i
the document's gradient (divided by its norm for cosine methods); token t's share is x . G_t, G_t the part of
the gradient that flows through position t (FullSpace.position_products), and a target token's share is
x_j . r_i with x_j the same test vector of that token's gradient alone (K is linear; a CG solve to its
tolerance).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from tdastore.errors import ConfigError
from tdastore.tasks.base import Examples
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
    columns: dict[str, list] = {k: [] for k in TOKEN_COLUMNS}
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
        append_hit(columns, (test_id, rank, train_id, train_row), score, sides, decode)
    return pa.table(columns)


TOKEN_COLUMNS = ("test_id", "rank", "train_id", "train_row", "side", "position", "token_id", "token", "score",
                 "document_score")  # fmt: skip


def append_hit(columns: dict, hit: tuple, score: float, sides: list, decode) -> None:
    """One hit's token shares into the table's columns: sides [(side, positions, token ids, shares)]."""
    for side, positions, token_ids, scores in sides:
        columns["side"] += [side] * len(positions)
        columns["position"] += [int(p) for p in positions]
        columns["token_id"] += [int(t) for t in token_ids]
        columns["token"] += decode(token_ids)
        columns["score"] += [float(s) for s in scores]
        for key, value in zip(("test_id", "rank", "train_id", "train_row", "document_score"), (*hit, score)):
            columns[key] += [value] * len(positions)


def exact_token_table(attributor, test, hits: pa.Table, decode) -> pa.Table:
    """`token_table` on the exact path: shares in full parameter space (see the module's docstring)."""
    scorer, method, task = attributor.exact, attributor.method, attributor.task
    space = scorer.space
    x = scorer.test_vectors(method, test).double()  # [m, p] eps K g, normalised as the method says
    summed = bool(sums_over_tokens(task, attributor.measurement))
    inputs, targets, owner, position, weight = query_token_copies(test, summed)
    copies = Examples(inputs, targets, np.arange(len(owner)), np.zeros(len(owner)), padded=True)
    token_g = torch.cat([b for _, b in space.example_grads(copies, scorer.measure)]).double()  # [n, p]
    token_x = scorer.operator(method).apply(scorer, token_g.float()).double()
    token_x *= torch.from_numpy(weight).to(token_x.device)[:, None]
    for j in range(len(x)):  # x_j is a multiple of K (sum of its tokens' gradients): the same multiple for each
        mine = torch.from_numpy(np.flatnonzero(owner == j))
        whole = token_x[mine].sum(0)
        token_x[mine] *= float(x[j] @ whole) / max(float(whole @ whole), 1e-300)
    test_index = {int(t): j for j, t in enumerate(test.ids)}
    train = task.examples("train")
    columns: dict[str, list] = {k: [] for k in TOKEN_COLUMNS}
    hit_columns = [hits.column(c).to_pylist() for c in ("test_id", "rank", "train_id", "train_row")]
    for row in sorted({int(r) for r in hit_columns[3]}):
        one = train.take(np.asarray([row]))
        length = int(one.inputs[0, 1].sum())
        g = next(iter(space.example_grads(one)))[1].double()  # [1, p]
        r = scorer.train_side(method, g.float()).double()[0]  # [p] the document's train-side row
        shrink = float(r @ g[0]) / max(float(g[0] @ g[0]), 1e-300)  # r = shrink * g
        mine = [k for k, train_row in enumerate(hit_columns[3]) if int(train_row) == row]
        queries = [test_index[int(hit_columns[0][k])] for k in mine]
        per_position = space.position_products(x[queries].float(), one).cpu().numpy() * shrink  # [q, T]
        for q, k in enumerate(mine):
            j = queries[q]
            tokens_of_j = np.flatnonzero(owner == j)
            sides = [
                ("train", np.arange(length), one.inputs[0, 0, :length].numpy(), per_position[q, :length]),
                ("test", position[tokens_of_j], test.inputs[j, 0, position[tokens_of_j]].numpy(),
                 (token_x[torch.from_numpy(tokens_of_j)] @ r).cpu().numpy()),
            ]  # fmt: skip
            append_hit(columns, tuple(c[k] for c in hit_columns), float(x[j] @ r), sides, decode)
    order = np.lexsort((columns["position"], [s == "test" for s in columns["side"]], columns["rank"],
                        [test_index[int(t)] for t in columns["test_id"]]))  # fmt: skip
    return pa.table({key: [values[i] for i in order] for key, values in columns.items()})


def require_tokens(attributor) -> None:
    """Token shares need a causal-LM store: on the projected path one whose rows are factored (per-position
    terms), on the exact path a method whose train side is the gradient (not if_gen's)."""
    if attributor.path == "exact":
        if attributor.method.operator("exact") == "generalised":
            raise ConfigError(
                "if_gen's train side adds Hess L_i dTheta(D) to each gradient: its token shares are not done; use "
                "another method or attribution.path: projected"
            )
    elif attributor.store.manifest["projection"]["kind"] != "factored":
        raise ConfigError(
            f"token-level scores of training documents need a factored store (per-position terms P_out^T d_t (x) "
            f"P_in^T x_t); store '{attributor.store.root}' is projected with "
            f"'{attributor.store.manifest['projection']['kind']}': rebuild it with projection.kind: factored, or use "
            "attribution.path: exact on a small model"
        )
    if not getattr(attributor.task, "tokenizer", None) or attributor.task.describe_inputs().get("kind") != "causal_lm":
        raise ConfigError("token-level scores apply to causal language-model stores (task.kind: causal_lm)")
    if sums_over_tokens(attributor.task, attributor.measurement) is None:
        raise ConfigError(
            f"measurement '{attributor.measurement}' is a function of yours: token shares need a sum or mean over "
            "target tokens (loss, completion, logprob, margin)"
        )
