"""The one façade for attribution: made once from (store, method, overrides), it holds the task, the final
model, the fitted operator and the index, and answers top-k, bottom-k and full score rows for test inputs.

The test side goes through exactly what the training rows went through (same model, projection spec and
seed), then the method's operator; the train side is either a FAISS index over transformed rows (`kind`) or a
streamed pass over the store (projected path), or the model's full parameter space (exact path). Memory is
bounded by [m, block] at any time. The CLI, jobs, the query service and `evaluate` all call this class.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from tdastore.attribution.results import create_scores_array, result_table, stream_top_k
from tdastore.config import Config, config_to_dict, load_config, relocated_paths
from tdastore.devices import model_device, on_device
from tdastore.errors import ConfigError, StoreError
from tdastore.grads.computer import make_gradient_computer
from tdastore.grads.per_example import check_finite
from tdastore.index.faiss_index import build_index, load_index, normalise_rows, transform_block
from tdastore.methods import Method, get_method, with_normalize
from tdastore.precond.exact.scorer import ExactScorer
from tdastore.precond.projected.cache import fit_or_load, operator_key
from tdastore.precond.registry import FitInputs
from tdastore.store.fitted import store_basis, store_normaliser
from tdastore.store.location import is_local
from tdastore.tasks import resolve_task
from tdastore.tasks.base import Examples, Task, model_fingerprint
from tdastore.tasks.measurements import measurement_function
from tdastore.tasks.objects import ModelTask
from tdastore.training import load_model

QUERY_SECTIONS = ("attribution", "index")


def store_config(store, overrides: None | dict | Config = None) -> Config:
    """The store's own config (it built the rows), with query-time sections (attribution, index) overridden."""
    recorded, built_at = store.manifest["config"], store.manifest.get("location")
    config = load_config(relocated_paths(recorded, built_at, store.root) if is_local(store.root) else recorded)
    if isinstance(overrides, Config):
        read_only = {"store": {"read_only": True}} if overrides.store.read_only else {}
        overrides = {section: getattr(overrides, section).__dict__ for section in QUERY_SECTIONS} | read_only
    for section, values in (overrides or {}).items():
        reader_setting = section == "store" and set(values) <= {"read_only"}  # the store's one reader setting
        if section not in QUERY_SECTIONS and not reader_setting:
            raise ConfigError(
                f"a query may override the attribution and index sections (and store.read_only) only, not '{section}'"
            )
        config = load_config({**config_to_dict(config), section: {**getattr(config, section).__dict__, **values}})
    return config


def handed_over_task(store, task: Task | None, model, loss, data) -> Task | None:
    """The task of a query: the one handed over, one made of model= / loss= / data=, or the one the store was
    built with in this process (`tdastore.build` returns the store with it)."""
    if model is not None or loss is not None:
        if task is not None or model is None or loss is None:
            raise ConfigError("pass either task= or model= with loss= (and data=), not both")
        return ModelTask(model, loss, data)
    return task if task is not None else getattr(store, "task", None)


def check_task_is_the_stores(store, task: Task, given: bool) -> None:
    """A store built from a task handed over in Python cannot rebuild it from its config: say what to pass."""
    built = store.manifest["task"]
    if given or built.get("name") == task.name:
        return
    how = (
        "model=net, loss=per_example_loss (and data=train_data)"
        if built.get("kind") == "objects"
        else f"task=<the {built.get('name')} task object>"
    )
    raise ConfigError(
        f"store '{store.root}' was built from a task handed over in Python ('{built.get('name')}'), which its "
        f"config cannot rebuild: pass it again, Attributor(store, method, {how}), or use the store object "
        "tdastore.build returned"
    )


class Attributor:
    """Attribution of test inputs to a store's training rows by one method of the unified view.

    store: an open GradientStore. method: a row of `tdastore methods`. overrides: {"attribution": {...},
    "index": {...}} on top of the store's config. kind: answer top-k from a FAISS index of this kind (built on
    first use); None scores exactly by streaming the store. share: another Attributor of the same store whose
    task, model and (same settings) exact-path scorer are reused, so many methods cost one model load. task: the
    task object a store was built from with the Python API (else the one the store's config names); or the
    objects it was built from, model= and loss= (and data=, the training data, where an operator or the exact
    path reads it); a store returned by `tdastore.build` remembers its own.
    workers >= 1: top-k / bottom-k of at least `ray_min_inputs` inputs (and their full score matrix) are computed
    by that many Ray actors over input blocks x store row ranges (`address`: the cluster, else a local one);
    fewer inputs stay in process.
    """

    def __init__(
        self,
        store,
        method: str = "grad_dot",
        overrides: None | dict | Config = None,
        *,
        kind: str | None = None,
        progress: bool = False,
        share: Attributor | None = None,
        task: Task | None = None,
        workers: int = 0,
        ray_min_inputs: int = 256,
        threads: int = 1,
        address: str | None = None,
        model=None,
        loss=None,
        data=None,
    ):
        self.store, self.kind, self.progress = store, kind, progress
        task = handed_over_task(store, task, model, loss, data)
        if workers < 0 or threads < 1:
            raise ConfigError(f"query workers ({workers}) must be >= 0 (0: in process), threads ({threads}) >= 1")
        self.workers, self.ray_min_inputs, self.threads, self.address = workers, ray_min_inputs, threads, address
        self._scoring_actors: list = []  # Ray actors kept between calls while the caller's Ray session lives
        self.score_chunks = (256, 8192)  # score-matrix chunks (test inputs, train rows): a Ray unit's input block
        self.read_ahead = True  # decode the next store block in a thread (Ray actors of one CPU turn it off)
        self.method: Method = get_method(method)
        if self.method.further_training:
            raise ConfigError(
                f"method '{method}' differentiates the ground truth's further training, not a single query: run "
                "`tdastore ground-truth --config CFG`, then `tdastore metagrad --config CFG` (or `tdastore evaluate`)"
            )
        self.config = store_config(store, overrides)
        self.method = with_normalize(self.method, self.config.attribution.normalize)
        self.path = self.config.attribution.path
        if kind is not None and self.path == "exact":
            raise ConfigError(
                "the exact path scores in full parameter space: FAISS indexes belong to attribution.path: projected"
            )
        self._given_task = share._given_task if share is not None and task is None else task
        if share is not None and share.store is store:
            self.task, self.model, self._computer = share.task, share.model, share._computer
        else:
            self.task = resolve_task(self.config.task, self.config.model, task)
            check_task_is_the_stores(store, self.task, given=task is not None)
            self.model = load_model(self.config, self.task)
            self._computer = None
            if model_fingerprint(self.model) != store.manifest["model"]["fingerprint"]:
                raise StoreError(
                    f"the weights at {self.config.train.output_dir} are not the model store '{store.root}' was built "
                    "from (fingerprints differ): restore them or rebuild the store"
                )
            self.model = on_device(self.model, self.config.device)  # test gradients and fitting passes run there
        per_row = 1.0 / store.n_rows if self.config.attribution.scale == "paper" else 1.0  # attribution.scale
        self.scale = per_row * (self.config.train.lr if self.method.learning_rate else 1.0)
        self.measurement = self.config.attribution.measurement
        self.measure = measurement_function(self.task, self.measurement)  # the test side's g (query time)
        if share is not None and share.measurement != self.measurement:
            self._computer = None  # a shared computer differentiates the other measurement: build this one's own
        self.info: dict = {"method": self.method.name, "path": self.path, "measurement": self.measurement}
        if self.method.unit_sides:
            self.info["normalize"] = self.config.attribution.normalize
        self.operator = self.index = self.exact = None
        if self.path == "exact":
            same = share is not None and share.exact is not None and share.config.attribution == self.config.attribution
            self.exact = share.exact if same else ExactScorer(self.model, self.task, self.config)
        else:
            self._prepare_projected()

    def __repr__(self) -> str:
        where = f", index {self.kind}" if self.kind else ""
        return (
            f"Attributor({self.method.name} on the {self.path} path of '{self.store.root}' "
            f"({self.store.n_rows:,} rows){where}, task {self.task.name})"
        )

    def _prepare_projected(self) -> None:
        """Fit (or load) the operator once and open (or build) the index once."""
        name = self.method.operator("projected")
        normaliser = self.store.manifest["projection"].get("normaliser")
        if self.method.normalised_store and normaliser is None:
            raise ConfigError(
                f"method '{self.method.name}' on the projected path needs a store whose rows were scaled by Adam's "
                f"second moment: rebuild with gradients.normalizer: adam (adafactor for a factored projection), "
                "or use attribution.path: exact"
            )
        if normaliser is not None and not self.method.normalised_store:
            raise ConfigError(
                f"store '{self.store.root}' holds rows scaled by Adam's second moment ({normaliser['kind']} "
                f"normaliser): its projected methods are adam_dot and adam_cos; '{self.method.name}' needs a store "
                "built with gradients.normalizer: none (or attribution.path: exact)"
            )
        inputs = FitInputs(self.store, self.config, self.model, self.task, self.progress, self._block_map())
        self.operator = fit_or_load(name, inputs)
        key = operator_key(name, self.config.attribution)
        self.info.update(operator=key, **({"index": self.kind} if self.kind else {}))
        if self.kind is not None:
            self.index = self._open_index(key)

    def _block_map(self):
        """With Ray workers, fitting passes over the store's rows (EK-FAC's correction) run as Ray tasks."""
        if self.workers < 1:
            return None
        from tdastore.distributed.blocks import ray_block_map

        return ray_block_map(self.store, self.workers, self.threads, self.address)

    def _open_index(self, key: str):
        store, name, kind = self.store, self.method.index_name, self.kind
        handle = load_index(store, name, kind)
        if handle is not None and handle.description.get("operator") != key:
            raise StoreError(
                f"the {name}/{kind} index of '{store.root}' was built for operator "
                f"{handle.description.get('operator')}, this query uses {key} (other damping or LiSSA settings): "
                f"rebuild it with `tdastore index {store.root} --method {name} --kind {kind}`"
            )
        if handle is not None and handle.description.get("projection") != store.manifest["projection"]:
            raise StoreError(
                f"the {name}/{kind} index was built for another projection: rebuild it with `tdastore index`"
            )
        handle = build_index(
            store,
            self.method,
            self.operator,
            key,
            kind,
            self.config.index,
            progress=self.progress,
            read_only=self.config.store.read_only,
        )
        handle.device = self.config.device  # GPU FAISS where the installed faiss has it and the device is CUDA
        return handle

    # -- the test side ---------------------------------------------------------------------------------
    def examples(self, inputs=None, split: str | None = None) -> Examples:
        """Test inputs as the task's examples: None (the task's `split`, default test), the task's own
        examples, or anything the task's `encode` reads (a file path, a table, texts)."""
        if inputs is None:
            examples = self.task.examples(split or "test")
        elif self.task.is_examples(inputs):
            self.task.check_examples(inputs)
            examples = inputs
        else:
            examples = self.task.encode(inputs)
        if self.measurement == "completion":  # the prompt's tokens leave the loss
            if not hasattr(self.task, "completion_view"):
                raise ConfigError("measurement completion applies to causal_lm stores (prompt and completion)")
            examples = self.task.completion_view(examples)
        return examples

    def _gradient_computer(self, loss_fn):
        """The store's gradient computer (projection, seed, normaliser) over `loss_fn`, checked against its spec."""
        normaliser = store_normaliser(self.store.root)  # test rows scaled as the store's rows were
        computer = make_gradient_computer(
            self.model,
            loss_fn,
            self.config.gradients,
            self.config.projection,
            normaliser.bind(self.model) if normaliser is not None else None,
            store_basis(self.store.root),  # test rows projected with the store's fitted sides
        )
        if computer.spec() != self.store.manifest["projection"]:
            raise StoreError("this query's projection differs from the store's; the store's config was edited")
        return computer

    def test_rows(self, test: Examples) -> np.ndarray:
        """Test-function gradients [m, k] in the store's space (same gradient computer, projection, seed)."""
        return self.test_rows_of(test.inputs, test.targets, test.ids)

    def test_rows_of(self, inputs: torch.Tensor, targets: torch.Tensor, ids=None) -> np.ndarray:
        """Test-function gradients [m, k] of input and target tensors, in batches of gradients.batch_size."""
        if self._computer is None:  # built once: a projector caches its generated matrix blocks
            self._computer = self._gradient_computer(self.measure)
        rows = []
        batch, device = self.config.gradients.batch_size, model_device(self.model)
        ids = np.arange(len(inputs)) if ids is None else ids
        for start in range(0, len(inputs), batch):
            stop = min(start + batch, len(inputs))
            part_inputs, part_targets = inputs[start:stop], targets[start:stop]
            projected, values, sq_norms = self._computer(part_inputs.to(device), part_targets.to(device))
            check_finite(values, ids[start:stop], "the test function")
            check_finite(sq_norms, ids[start:stop], "the test gradient")
            rows.append(projected.float().cpu().numpy())  # [b, k]
        return np.concatenate(rows)

    # -- token-level attribution (tdastore/attribution/tokens.py) -------------------------------------------
    def train_token_rows(self, rows: list[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """{store row: (token ids [T], per-position terms [T, K] summing to the row)} of training documents,
        recomputed on demand (never stored)."""
        computer = self._gradient_computer(self.task.per_example_loss)
        train, device = self.task.examples("train"), model_device(self.model)
        found = {}
        for row in rows:
            one = train.take(np.asarray([row]))
            length = int(one.inputs[0, 1].sum())
            terms = computer.token_rows(one.inputs.to(device), one.targets.to(device))[0, :length]  # [T, K]
            found[row] = (one.inputs[0, 0, :length].numpy(), terms.double().cpu().numpy())
        return found

    def token_scores(self, inputs=None, k: int = 3, *, split: str | None = None, train_rows=None) -> pa.Table:
        """Each token's share of the scores of the top-k training documents per test input (or of the store rows
        `train_rows` for every input): a table test_id, rank, train_id, train_row, side ("train": a token of
        the training document, "test": a target token of the query), position, token_id, token (its text),
        score (shares sum to document_score over each side), document_score."""
        test = self.examples(inputs, split)
        if train_rows is None:
            hits = self.top_k(test, k)
        else:
            rows = np.asarray([int(r) for r in train_rows], dtype=np.int64)
            if len(rows) == 0 or rows.min() < 0 or rows.max() >= self.store.n_rows:
                raise ConfigError(f"train_rows must be store rows in [0, {self.store.n_rows}): got {rows.tolist()[:8]}")
            train_ids = self.store.train_ids
            hits = pa.table({
                "test_id": np.repeat(test.ids, len(rows)), "rank": np.tile(np.arange(1, len(rows) + 1), len(test)),
                "train_id": np.tile(train_ids[rows], len(test)), "train_row": np.tile(rows, len(test)),
            })  # fmt: skip
        return self.token_scores_of(test, hits)

    def token_scores_of(self, test: Examples, hits: pa.Table) -> pa.Table:
        """Token shares (see `token_scores`) of given hits: a table with test_id, rank, train_id, train_row, as
        `top_k` returns it."""
        from tdastore.attribution.tokens import exact_token_table, require_tokens, token_table

        require_tokens(self)
        tokenizer = self.task.tokenizer
        table = exact_token_table if self.exact is not None else token_table
        return table(self, test, hits, lambda ids: [tokenizer.decode([int(t)]) for t in ids])

    def queries(self, test: Examples) -> np.ndarray:
        """Projected path: eps * K^(1/2) grad g(z) for each test input, [m, k]."""
        rows = self.test_rows(test)
        if self.method.unit_projected("test"):
            rows = normalise_rows(rows)
        return self.operator.transform(rows) * np.float32(self.scale)

    # -- answers -----------------------------------------------------------------------------------------
    def test_side(self, test: Examples):
        """What scoring needs of the test inputs: eps K^(1/2) grad g [m, k] (projected, numpy) or eps K grad g
        [m, p] (exact, a tensor on the model's device)."""
        if self.exact is not None:
            self.exact.info = {"path": "exact", "params": self.exact.space.p}  # this method's facts only
            return self.exact.test_vectors(self.method, test)
        return self.queries(test)

    def range_blocks(self, side, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, scores [m, b]) over store rows [start, stop) in order (the exact path: all rows).
        Projected blocks are views of one reused buffer: use each before taking the next."""
        if self.exact is not None:
            for first, rows in self.exact.train_rows(self.method):
                yield first, (side @ rows.T).cpu()  # [m, b]
            self.info.update({k: v for k, v in self.exact.info.items() if isinstance(v, (int, float, str))})
        else:
            yield from projected_score_blocks(
                self.store, self.operator, self.method, side, start=start, stop=stop, read_ahead=self.read_ahead
            )

    def score_blocks(self, test: Examples) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, scores [m, b]) over the whole store in order (see `range_blocks`)."""
        yield from self.range_blocks(self.test_side(test))

    def scores(self, inputs=None, split: str | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Full score rows, streamed: (first train row, scores [m, b] float32) blocks in store order."""
        for start, block in self.score_blocks(self.examples(inputs, split)):
            yield start, torch.as_tensor(block).float().numpy().copy()

    def score_matrix(self, inputs=None, split: str | None = None) -> np.ndarray:
        """The whole [m, N] score matrix in memory (use `scores` to stream it)."""
        return np.concatenate([block for _, block in self.scores(inputs, split)], axis=1)

    def aggregate_top_k(self, inputs=None, k: int = 10, how: str = "mean", *, split: str | None = None) -> pa.Table:
        """The k training rows with the highest score aggregated over a set of test inputs (the mean, sum or
        max of each row's scores, as bergson's query aggregation): rank, train_id, score, train_row (+
        train_text). Streams the store; memory [m, block] + k."""
        reducers = {"mean": np.mean, "sum": np.sum, "max": np.max}
        if how not in reducers:
            raise ConfigError(f"aggregate '{how}': use one of {sorted(reducers)}")
        if not 1 <= k <= self.store.n_rows:
            raise ConfigError(f"top-k {k} must lie in 1..{self.store.n_rows} (the store's row count)")
        test = self.examples(inputs, split)
        best_scores, best_rows = np.empty(0, np.float64), np.empty(0, np.int64)
        for start, block in self.score_blocks(test):
            values = reducers[how](torch.as_tensor(block).double().numpy(), axis=0)  # [b]
            scores = np.concatenate([best_scores, values])
            rows = np.concatenate([best_rows, np.arange(start, start + len(values))])
            keep = np.lexsort((rows, -scores))[:k]  # highest first, ties by row
            best_scores, best_rows = scores[keep], rows[keep]
        single = SimpleNamespace(ids=np.asarray([-1]), texts=None)  # the aggregate stands for one test input
        table = result_table(self.store, single, best_scores[None, :], best_rows[None, :], {
            **self.info, "aggregate": how, "test_inputs": len(test)})  # fmt: skip
        return table.drop_columns([c for c in ("test_id", "test_text") if c in table.column_names])

    def top_k(self, inputs=None, k: int = 10, *, split: str | None = None, out=None, scores_out=None) -> pa.Table:
        """The k most positive training rows per test input (removing them raises the test loss the most):
        a table test_id, rank, train_id, score, train_row (+ train_text, test_text for text stores).
        out: also write the table as Parquet; scores_out: also write the full [m, N] matrix (Zarr)."""
        return self._ranked(inputs, k, split, out, scores_out, sign=1.0)

    def bottom_k(self, inputs=None, k: int = 10, *, split: str | None = None, out=None, scores_out=None) -> pa.Table:
        """The k most negative training rows per test input ("opponents": removing them lowers the test
        loss), most negative first, in the table of `top_k`."""
        return self._ranked(inputs, k, split, out, scores_out, sign=-1.0)

    def _ranked(self, inputs, k: int, split, out, scores_out, sign: float) -> pa.Table:
        store = self.store
        if not 1 <= k <= store.n_rows:
            raise ConfigError(f"top-k {k} must lie in 1..{store.n_rows} (the store's row count)")
        if out is not None and not Path(out).parent.is_dir():
            raise ConfigError(f"--out '{out}': its directory does not exist; create it or choose another path")
        test = self.examples(inputs, split)
        train_ids = store.train_ids
        chunks = (min(len(test), self.score_chunks[0]), min(store.n_rows, self.score_chunks[1]))
        matrix = None if scores_out is None else create_scores_array(scores_out, test.ids, train_ids, chunks)
        info = self.info
        if self.index is None and self.workers >= 1 and len(test) >= self.ray_min_inputs:
            scores, rows = self._ranked_on_ray(test, k, sign, matrix, scores_out)
            info = {**self.info, "workers": self.workers}  # this answer's fact, not the attributor's
        elif self.index is not None:
            queries = self.queries(test)
            scores, rows = self.ranked_queries(queries, k, sign)
            if matrix is not None:
                blocks = projected_score_blocks(store, self.operator, self.method, queries)
                stream_top_k(blocks, len(test), k, store.n_rows, matrix, sign, self.progress)
        else:
            scores, rows = stream_top_k(
                self.score_blocks(test), len(test), k, store.n_rows, matrix, sign, self.progress
            )
        table = result_table(store, test, scores, rows, info)
        if out is not None:
            pq.write_table(table, out)
        return table

    def ranked_queries(self, queries: np.ndarray, k: int, sign: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """Projected path: the k highest (sign 1) or lowest (sign -1) scores and their rows, both [m, k], of
        ready queries (`queries`): from the index when there is one, else by streaming the store."""
        if self.index is None:
            blocks = projected_score_blocks(self.store, self.operator, self.method, queries)
            return stream_top_k(blocks, len(queries), k, self.store.n_rows, None, sign, False)
        found, rows = self.index.search(self.index_queries(queries, sign), k)
        return self.index_scores(found, sign), rows

    def index_queries(self, queries: np.ndarray, sign: float = 1.0) -> np.ndarray:
        """What an index (or an index shard) searches with: the signed queries without the score scale, which
        would crowd float32's range in the inner products; index_scores puts it back."""
        return sign * queries / np.float32(self.scale)

    def index_scores(self, found: np.ndarray, sign: float = 1.0) -> np.ndarray:
        """An index search's inner products of index_queries(queries, sign), as the scores of `queries`."""
        return sign * found * np.float32(self.scale)

    def _ranked_on_ray(self, test: Examples, k: int, sign: float, matrix, scores_out):
        import ray

        from tdastore.attribution.on_ray import score_on_ray
        from tdastore.distributed.ray_session import ray_session
        from tdastore.distributed.shipping import share_task

        outlives = ray.is_initialized()  # a session of the caller's: keep the actors warm for the next call
        with ray_session(self.address, num_cpus=max(2, self.workers * self.threads)):
            task_ref = share_task(self.config, self._given_task)
            path = None if scores_out is None else str(scores_out)
            keep = self._scoring_actors if outlives else None
            return score_on_ray(self, test, k, sign, matrix, path, task_ref, keep)


def projected_score_blocks(
    store,
    operator,
    method: Method,
    queries: np.ndarray,
    block_rows: int = 8192,
    start: int = 0,
    stop=None,
    read_ahead: bool = True,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Score blocks [m, b] = queries . transformed store rows, streamed over rows [start, stop). Each block is a
    view of one reused buffer (fresh 30 MB results would page-fault on every block): use it before the next."""
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    stop = store.n_rows if stop is None else stop
    if (start, stop) == (0, store.n_rows):
        blocks = store.iter_blocks(block_rows, prefetch=read_ahead)
    else:
        blocks = ((s, store.read_rows(s, min(s + block_rows, stop))) for s in range(start, stop, block_rows))
    buffer = None
    for start, block in blocks:
        rows = torch.from_numpy(transform_block(block, operator, method))  # [b, k]
        if buffer is None or buffer.shape[1] < rows.shape[0]:
            buffer = torch.empty(q.shape[0], rows.shape[0])
        out = buffer[:, : rows.shape[0]]
        torch.mm(q, rows.T, out=out)
        yield start, out  # [m, b]
