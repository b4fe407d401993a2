"""Queries: test inputs -> the store's gradient, projection and operator -> top-k or the full score matrix.

The test side goes through exactly what the training rows went through (same model, projection spec
and seed), then the method's operator; the train side is either a FAISS index over transformed rows
(`kind`) or a streamed pass over the store. Memory is bounded by [m, block] at any time.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from tdastore.config import Config, config_to_dict, load_config
from tdastore.errors import ConfigError, DataError, StoreError
from tdastore.grads.computer import make_gradient_computer
from tdastore.grads.per_example import check_finite
from tdastore.index.faiss_index import build_index, load_index, merge_top_k, normalise_rows, transform_block
from tdastore.methods import Method, get_method
from tdastore.precond.exact_methods import ExactScorer
from tdastore.precond.projected import fit_or_load, operator_key
from tdastore.tasks.base import Examples, model_fingerprint
from tdastore.tasks.tabular import make_task
from tdastore.tasks.text import TokenExamples
from tdastore.training import load_model


def store_config(store, overrides: None | dict | Config = None) -> Config:
    """The store's own config (it built the rows), with query-time sections (attribution, index) overridden."""
    config = load_config(store.manifest["config"])
    if isinstance(overrides, Config):
        overrides = {"attribution": overrides.attribution.__dict__, "index": overrides.index.__dict__}
    for section, values in (overrides or {}).items():
        if section not in ("attribution", "index"):
            raise ConfigError(f"a query may override the attribution and index sections only, not '{section}'")
        config = load_config({**config_to_dict(config), section: {**getattr(config, section).__dict__, **values}})
    return config


class QueryContext:
    """The store, its task and final model (checked against the store's fingerprint), and a method."""

    def __init__(self, store, method: str, overrides=None):
        self.store = store
        self.method: Method = get_method(method)
        if self.method.further_training:
            raise ConfigError(
                f"method '{method}' differentiates the ground truth's further training, not a single query: run "
                "`tdastore ground-truth --config CFG`, then `tdastore metagrad --config CFG` (or `tdastore evaluate`)"
            )
        self.config = store_config(store, overrides)
        self.path = self.config.attribution.path
        self.task = make_task(self.config.task, self.config.model)
        self.model = load_model(self.config, self.task)
        if model_fingerprint(self.model) != store.manifest["model"]["fingerprint"]:
            raise StoreError(
                f"the weights at {self.config.train.output_dir} are not the model store '{store.root}' was built "
                "from (fingerprints differ): restore them or rebuild the store"
            )
        self.scale = 1.0 / store.n_rows * (self.config.train.lr if self.method.learning_rate else 1.0)
        self._computer = None

    def test_examples(self, split: str | None, inputs) -> Examples:
        if inputs is None:
            return self.task.examples(split or "test")
        if isinstance(inputs, (Examples, TokenExamples)):
            if hasattr(self.task, "n_features") and tuple(inputs.inputs.shape[1:]) != (self.task.n_features,):
                raise DataError(
                    f"test inputs have {tuple(inputs.inputs.shape[1:])} features per row, the task has {self.task.n_features}"
                )
            return inputs
        return self.task.encode(inputs)

    def test_rows(self, test: Examples) -> np.ndarray:
        """Test-function gradients [m, k] in the store's space (same gradient computer, projection, seed)."""
        if self._computer is None:  # built once: a projector caches its generated matrix blocks
            self._computer = make_gradient_computer(
                self.model, self.task.test_function, self.config.gradients, self.config.projection
            )
            if self._computer.spec() != self.store.manifest["projection"]:
                raise StoreError("this query's projection differs from the store's; the store's config was edited")
        computer = self._computer
        rows = []
        batch = self.config.gradients.batch_size
        for start in range(0, len(test), batch):
            part = test.slice(start, min(start + batch, len(test)))
            projected, values, sq_norms = computer(part.inputs, part.targets)
            check_finite(values, part.ids, "the test function")
            check_finite(sq_norms, part.ids, "the test gradient")
            rows.append(projected.numpy())
        return np.concatenate(rows)


def query_store(
    store,
    method: str = "grad_dot",
    *,
    split: str | None = None,
    inputs=None,
    top_k: int = 10,
    kind: str | None = None,
    out: str | Path | None = None,
    scores_out: str | Path | None = None,
    overrides: None | dict | Config = None,
    progress: bool = False,
) -> pa.Table:
    """Top-k training rows per test input as a table (test_id, rank, train_id, score, train_row).

    inputs: None (the task's `split`, default test), a .csv/.parquet path or pyarrow Table with the task's
    feature and target columns, or Examples. kind: use (building if missing) a FAISS index of that kind;
    None scores exactly by streaming the store. scores_out: also write the full [m, N] matrix (Zarr).
    """
    ctx = QueryContext(store, method, overrides)
    if not 1 <= top_k <= store.n_rows:
        raise ConfigError(f"top-k {top_k} must lie in 1..{store.n_rows} (the store's row count)")
    test = ctx.test_examples(split, inputs)
    info = {"method": ctx.method.name, "path": ctx.path}
    if ctx.path == "exact":
        if kind is not None:
            raise ConfigError(
                "the exact path scores in full parameter space: FAISS indexes belong to attribution.path: projected"
            )
        scorer = ExactScorer(ctx.model, ctx.task, ctx.config)
        blocks = scorer.score_blocks(ctx.method, test)
        scores, rows = stream_top_k(blocks, len(test), top_k, store.n_rows, scores_out, progress)
        info.update({k: v for k, v in scorer.info.items() if isinstance(v, (int, float, str))})
    else:
        searcher = ProjectedSearcher(ctx, kind, progress)
        scores, rows = searcher.top_k(test, top_k, scores_out, progress)
        info.update(searcher.info)
    table = _result_table(store, test, scores, rows, info)
    if out is not None:
        pq.write_table(table, out)
    return table


class ProjectedSearcher:
    """The projected path of one method: the operator is fitted (or loaded) once and the index opened once;
    each call only computes the test side. Used by queries and by the query service's replicas."""

    def __init__(self, ctx: QueryContext, kind: str | None = None, progress: bool = False):
        self.ctx, self.kind = ctx, kind
        op = ctx.method.operator("projected")
        self.operator = fit_or_load(ctx.store, op, ctx.config.attribution, ctx, progress)
        self.key = operator_key(op, ctx.config.attribution)
        self.handle = _index_for(ctx.store, ctx, self.operator, self.key, kind, progress) if kind else None
        self.info = {"operator": self.key, **({"index": kind} if kind else {})}

    def queries(self, test: Examples) -> np.ndarray:
        """eps * K^(1/2) grad g(z) for each test input: [m, k]."""
        rows = self.ctx.test_rows(test)
        if self.ctx.method.normalise:
            rows = normalise_rows(rows)
        return self.operator.transform(rows) * np.float32(self.ctx.scale)

    def top_k(
        self, test: Examples, top_k: int, scores_out=None, progress: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        queries = self.queries(test)
        store, m = self.ctx.store, len(test)
        if self.handle is None:
            blocks = projected_score_blocks(store, self.operator, self.ctx.method, queries)
            return stream_top_k(blocks, m, top_k, store.n_rows, scores_out, progress)
        scale = np.float32(self.ctx.scale)
        scores, rows = self.handle.search(queries / scale, top_k)  # unscaled: float32 headroom
        if scores_out is not None:
            stream_top_k(
                projected_score_blocks(store, self.operator, self.ctx.method, queries),
                m,
                top_k,
                store.n_rows,
                scores_out,
                progress,
            )
        return scores * scale, rows


def _index_for(store, ctx: QueryContext, operator, key: str, kind: str, progress: bool):
    handle = load_index(store, ctx.method.name, kind)
    if handle is not None and handle.description.get("operator") != key:
        raise StoreError(
            f"the {ctx.method.name}/{kind} index of '{store.root}' was built for operator {handle.description.get('operator')}, "
            f"this query uses {key} (other damping or LiSSA settings): rebuild it with "
            f"`tdastore index {store.root} --method {ctx.method.name} --kind {kind}`"
        )
    if handle is not None and handle.description.get("projection") != store.manifest["projection"]:
        raise StoreError(
            f"the {ctx.method.name}/{kind} index was built for another projection: rebuild it with `tdastore index`"
        )
    return build_index(store, ctx.method, operator, key, kind, ctx.config.index, progress=progress)


def projected_score_blocks(
    store, operator, method: Method, queries: np.ndarray, block_rows: int = 8192
) -> Iterator[tuple[int, torch.Tensor]]:
    """Score blocks [m, b] = queries . transformed store rows, streamed over the store. Each block is a view
    of one reused buffer (fresh 30 MB results would page-fault on every block): use it before the next."""
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    buffer = None
    for start, block in store.iter_blocks(block_rows):
        rows = torch.from_numpy(transform_block(block, operator, method))  # [b, k]
        if buffer is None or buffer.shape[1] < rows.shape[0]:
            buffer = torch.empty(q.shape[0], rows.shape[0])
        out = buffer[:, : rows.shape[0]]
        torch.mm(q, rows.T, out=out)
        yield start, out  # [m, b]


def stream_top_k(blocks, m: int, top_k: int, n: int, scores_out, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """Running top-k over score blocks [m, b]; optionally writes every block into a Zarr [m, n] array."""
    best_scores = np.full((m, 0), -np.inf, dtype=np.float32)
    best_rows = np.zeros((m, 0), dtype=np.int64)
    matrix = _create_scores_array(scores_out, m, n) if scores_out is not None else None
    bar = tqdm(total=n, desc="score", unit="row", disable=not progress)
    for start, block in blocks:
        block = torch.as_tensor(block)  # [m, b]
        if matrix is not None:
            matrix[:, start : start + block.shape[1]] = block.numpy()
        values, part = torch.topk(block, min(top_k, block.shape[1]), dim=1)
        best_scores = np.concatenate([best_scores, values.numpy()], 1)
        best_rows = np.concatenate([best_rows, part.numpy() + start], 1)
        best_scores, best_rows = merge_top_k(best_scores, best_rows, top_k)
        bar.update(block.shape[1])
    bar.close()
    return best_scores, best_rows


def _create_scores_array(path, m: int, n: int):
    import zarr

    path = Path(path)
    if path.exists():
        raise StoreError(f"--scores-out '{path}' exists: choose a new path (nothing was overwritten)")
    return zarr.create_array(store=str(path), shape=(m, n), chunks=(min(m, 256), min(n, 8192)), dtype="float32")


def _result_table(store, test: Examples, scores: np.ndarray, rows: np.ndarray, info: dict) -> pa.Table:
    m, k = scores.shape
    train_ids = store.meta.column("example_id").to_numpy()
    table = pa.table(
        {
            "test_id": np.repeat(test.ids, k),
            "rank": np.tile(np.arange(1, k + 1), m),
            "train_id": train_ids[rows.reshape(-1)],
            "score": scores.reshape(-1).astype(np.float32),
            "train_row": rows.reshape(-1),
        }
    )
    if "text" in store.meta.column_names:  # text stores: the documents themselves, beside their scores
        train_text = store.meta.column("text").to_numpy(zero_copy_only=False)
        table = table.append_column("train_text", pa.array(train_text[rows.reshape(-1)], pa.string()))
        if test.texts is not None:
            table = table.append_column("test_text", pa.array(np.repeat(test.texts, k).astype(str), pa.string()))
    return table.replace_schema_metadata({f"tdastore.{key}": str(value) for key, value in info.items()})


def method_scores(store, method: str, test: Examples, overrides=None) -> tuple[np.ndarray, dict]:
    """The full score matrix [m, N] of one method for given test examples, and what computed it."""
    ctx = QueryContext(store, method, overrides)
    if ctx.path == "exact":
        scorer = ExactScorer(ctx.model, ctx.task, ctx.config)
        scores = scorer.scores(ctx.method, test).numpy()
        return scores, {"path": "exact", **{k: v for k, v in scorer.info.items() if isinstance(v, (int, float, str))}}
    searcher = ProjectedSearcher(ctx)
    queries = searcher.queries(test)
    blocks = [block.clone() for _, block in projected_score_blocks(store, searcher.operator, ctx.method, queries)]
    return torch.cat(blocks, dim=1).numpy(), {"path": "projected", **searcher.info}
