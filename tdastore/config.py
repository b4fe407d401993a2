"""One typed config drives the CLI, YAML files and the Python API alike.

Every section is a dataclass; `load_config` validates a YAML/dict strictly (unknown keys and wrong types
are errors naming the key and the fix), and `config_to_dict` writes the resolved config into every
output so a run can be replayed.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from tdastore.errors import ConfigError

IndexKind = Literal["flat", "ivf", "hnsw", "sq8", "pq"]  # FAISS index kinds (tdastore/index/faiss_index.py)
INDEX_KINDS: tuple[str, ...] = typing.get_args(IndexKind)


@dataclass
class TaskConfig:
    """Which data set and which kind of prediction problem."""

    # a task of your own, "my_module:MyTask" (a tdastore.tasks.Task subclass, built as MyTask(task, model)), or a
    # registered task name (tdastore.tasks.TASKS); None: the built-in tabular or text task, from kind and model
    cls: str | None = field(default=None, metadata={"key": "class"})  # YAML key `class`: module:Class or a name
    # a scikit-learn bundled name, a .csv / .parquet file; text: .jsonl/.json/.parquet/.txt or a hub name
    dataset: str = "diabetes"
    kind: Literal["regression", "classification", "causal_lm", "sequence_classification"] | None = (
        None  # None: inferred for bundled sets
    )
    target: str | None = None  # target column for a file data set
    features: list[str] | None = None  # feature columns for a file data set (None: all but target)
    id_column: str | None = None  # column holding example ids (None: row numbers)
    test_fraction: float = 0.2  # share of the rows held out as the test split (when no test_dataset is given)
    split_seed: int = 0  # seeds the train / test split
    standardize_target: bool = True  # regression targets are z-scored with training statistics
    # text tasks (kind causal_lm / sequence_classification, with model.name_or_path)
    test_dataset: str | None = None  # a separate test file (None: test_fraction of `dataset`)
    text_column: str = "text"  # text tasks: the column holding each document
    prompt_column: str | None = None  # causal_lm: a prompt before the text (masked with completion_only)
    label_column: str = "label"  # sequence_classification: the class column
    max_length: int = 128  # tokens per example
    truncation: bool = True  # cut longer documents at max_length (false: longer documents are an error)
    packing: bool = False  # causal_lm: concatenate documents (EOS between) and cut into max_length blocks
    completion_only: bool = False  # causal_lm: loss on the text after the prompt only
    # causal_lm: a document's loss is the mean over its target tokens (every document weighs the same, as a
    # training loss over documents of similar length; the paper's), or their sum (bergson's default: a long
    # document weighs by its length, as in token-level pretraining losses)
    loss_reduction: Literal["mean", "sum"] = "mean"


@dataclass
class ModelConfig:
    """The MLP of PAPER.md (d-128-128-out with ReLU), or a Hugging Face model for text tasks."""

    hidden: list[int] = field(default_factory=lambda: [128, 128])  # the MLP's hidden widths (tabular tasks)
    seed: int = 0  # seeds the model's initialisation
    name_or_path: str | None = None  # text tasks: a transformers model (hub name or local directory)
    tokenizer: str | None = None  # None: the model's own (an adapter folder's, when it holds one)
    # a PEFT adapter (e.g. LoRA) folder on top of name_or_path; or name_or_path itself names the adapter folder
    # (its adapter_config.json names the base). modules: auto then takes the adapter's LoRA layers only
    adapter: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # text models' weights (projections sum in float32)
    attention: Literal["eager", "sdpa"] = "eager"  # text models: sdpa for the hook path (eager works under vmap)


@dataclass
class TrainConfig:
    """How the final model is trained (plain minibatch SGD, as in the paper's tabular setups)."""

    lr: float = 0.03  # SGD learning rate of the final model's training
    batch_size: int = 128  # training minibatch size
    epochs: int = 200  # training epochs
    momentum: float = 0.0  # SGD momentum
    weight_decay: float = 0.0  # SGD weight decay (coupled, torch.optim.SGD's)
    seed: int = 0  # seeds the batch order
    output_dir: str = "runs/model"  # model.safetensors and config.yaml are written here


@dataclass
class GradientConfig:
    """Which parameters' per-example gradients are taken, and in what batches."""

    params: list[str] = field(default_factory=lambda: ["*"])  # fnmatch patterns on parameter names
    # or: fnmatch patterns on Linear / Conv1D / Embedding module names (weights + biases); "auto": every Linear /
    # Conv1D inside the transformer blocks (not embeddings, not the LM head or pooler / classifier); "all": every
    # Linear / Conv1D / Embedding, the LM head included (tied to the input embedding: one block); not norm layers
    modules: list[str] | Literal["auto", "all"] | None = None
    batch_size: int = 256  # examples per per-example-gradient batch (see max_tokens for token budgets)
    max_tokens: int | None = None  # token sequences: batches of at most this many padded tokens (length-sorted)
    full_norms: bool = True  # factored: record the full gradient's norm (false: the stored row's; faster, long docs)
    # scale every row by Adam's second moment before projecting it (adam_dot / adam_cos on the projected path):
    # adam, the full diagonal (dense, sparse, none); adafactor, its rank-one form (keeps factored projections
    # factored). v: attribution.optimizer_state, else the further training's batches (tdastore/grads/normaliser.py)
    normalizer: Literal["none", "adam", "adafactor"] = "none"


@dataclass
class ProjectionConfig:
    """Random projection of gradients to `dim` columns, deterministic from (seed, parameter name)."""

    # none | gaussian | rademacher (dense) | sparse (Kane-Nelson JL) | factored (per layer)
    kind: Literal["none", "gaussian", "rademacher", "sparse", "factored"] = "none"
    dim: int = 1024  # output columns of gaussian / rademacher / sparse
    factors: list[int] = field(default_factory=lambda: [16, 16])  # factored: [k_out, k_in] per Linear layer
    module_factors: dict[str, list[int]] = field(default_factory=dict)  # factored: {module pattern: [k_out, k_in]}
    seed: int = 0  # seeds every projection matrix (rows are a function of the spec: same seed, same rows)
    nonzeros: int = 1  # sparse JL: non-zeros per input coordinate (must divide dim)
    block_rows: int = 4096  # rows of the matrix generated per seeded block (part of the spec)
    # factored: each side's matrix. random: Gaussian from the seed. pca: the top eigenvectors of the training
    # gradients' own second moments per side (LoGra's PCA initialisation; fitted at build time, kept in the
    # store): a biased but noise-free inner product, 1.5-2.3x the cosine of random sides at 16 x 16 on the text demo
    basis: Literal["random", "pca"] = "random"
    basis_examples: int = 1024  # pca: training examples (the first ones) whose per-example gradients it is fitted on
    basis_max_dim: int = 8192  # pca: a block with a side wider than this keeps random sides (a vocabulary's embedding)
    cache_mb: int = 512  # generated blocks kept per process while they fit in this budget


@dataclass
class StoreConfig:
    """Layout of the gradient store on disk."""

    dtype: Literal["float16", "float32"] = "float32"  # row dtype on disk (rows are computed and scored in float32)
    chunk_rows: int = 256  # Zarr chunk height; shards are whole chunks so writers never share one
    shard_rows: int = 1024  # rows per unit of work (a multiple of chunk_rows)
    # projected gradient rows are high-entropy floats: zstd saved 5% of a float16 store and halved its streamed
    # read rate (1,338 -> 599 MB/s decoded, benchmarks/scale.py), so rows are stored as they are (each chunk
    # still carries its crc32c); zstd pays where rows hold many zeros (unprojected ReLU nets)
    compressor: Literal["zstd", "lz4", "none"] = "none"
    path: str | None = None  # where the store lives (jobs read it; `tdastore build --output` overrides)
    # readers never write into the store: fitted operators and indexes not saved there are kept in memory
    # (a served store on a read-only mount or bucket; `tdastore index` prepares them beforehand)
    read_only: bool = False


@dataclass
class BuildConfig:
    """How the store is built on Ray."""

    workers: int = 2  # Ray actors computing shards
    cpus_per_worker: float = 1.0  # CPUs (and torch threads) each worker asks Ray for
    gpus_per_worker: float = 1.0  # with a CUDA device: GPUs each worker asks Ray for (fractions share a GPU)
    max_retries: int = 2  # a shard whose worker died is retried on a fresh worker this many times
    address: str | None = None  # None: RAY_ADDRESS, else a local Ray cluster


@dataclass
class AttributionConfig:
    """How methods of the unified view are computed (see tdastore/methods.py)."""

    path: Literal["projected", "exact"] = "projected"  # store's projected space (indexable) or full space on the model
    # lambda = factor x lambda_0 (lambda_0 = mean squared gradient entry), or auto: the smallest lambda giving the
    # damped curvature a condition number <= 1e4 (tdastore/precond/damping.py)
    damping_factor: float | Literal["auto"] = 10.0
    hessian_auto_damping: bool = True  # if_h / if_gen: raise lambda to 1.5 x |lowest Hessian eigenvalue| if larger
    lissa_depth: int = 1000  # LiSSA recursion steps
    lissa_scale: float | None = None  # None: 1.1 x the largest eigenvalue of the damped matrix (converges)
    lissa_batch_size: int | None = None  # exact path: None = full-batch products (deterministic)
    cg_tol: float = 1e-8  # relative residual
    cg_max_iter: int = 1000  # conjugate-gradient iterations at most
    max_exact_params: int = 200_000  # the exact path is refused above this many parameters
    max_dense_dim: int = 8192  # projected preconditioners are k x k: refused above this k
    kfac_examples: int | None = None  # projected kfac / ekfac: training examples for the factors (None: all)
    batch_size: int = 256  # train examples per block when scoring
    # adam_dot / adam_cos: Adam's eps in diag(1 / (sqrt(v) + eps)), and where v comes from: a saved torch optimizer
    # state_dict (e.g. a Hugging Face Trainer's optimizer.pt; exp_avg_sq by parameter name), or None: estimated at
    # the final model from the further training's batches (tdastore/precond/exact/diagonal.py)
    adam_eps: float = 1e-8
    # adam_dot / adam_cos: a saved optimizer state_dict with exp_avg_sq (see adam_eps)
    optimizer_state: str | None = None
    # adam_replay: steps of the further training replayed (None: all of the groundtruth section's; `evaluate`
    # replays to each evaluation point) (tdastore/precond/exact/replay.py)
    replay_steps: int | None = None
    replay_seeds: int = 8  # adam_replay: batch orders of the further training averaged
    # methods `tdastore index` and `tdastore evaluate` take when none is named
    methods: list[str] = field(default_factory=lambda: ["grad_dot", "grad_cos", "if_gn", "lissa", "datainf"])
    # paper: scores carry the paper's 1/n (the first-order change of g when one of n rows is left out); raw: the
    # inner products themselves (bergson's and most LLM tools' numbers). Rankings are the same
    scale: Literal["paper", "raw"] = "paper"
    # what a query attributes (the test side only; the store is the same): loss | completion | logprob | margin |
    # module:function (tdastore/tasks/measurements.py); recorded in the results' metadata
    measurement: str = "loss"
    # unit-normalise the gradients of any method before its operator, as grad_cos does for grad_dot: train (the
    # stored rows; changes rankings), test (the query's gradient; changes magnitudes, e.g. across aggregated
    # queries), both. In the space the path scores in (projected rows, or full gradients on the exact path)
    normalize: Literal["none", "train", "test", "both"] = "none"


@dataclass
class IndexConfig:
    """FAISS index over preconditioner-transformed rows."""

    kind: IndexKind = "flat"  # flat (exact) | ivf | hnsw | sq8 | pq: see the indexes guide
    shard_rows: int = 262_144  # rows per index shard (whole store shards); searched with a top-k merge
    nlist: int | None = None  # ivf / pq: None = 4 x sqrt(rows)
    nprobe: int = 64  # ivf / pq: lists searched per query
    hnsw_m: int = 32  # hnsw: neighbours per node
    ef_search: int = 256  # hnsw: candidates kept while searching
    pq_m: int | None = None  # pq: sub-quantizers (None: dim / 4, a divisor of dim)
    refine: int = 4  # pq: re-rank refine x top_k candidates exactly
    # ivf / pq / sq8: train one quantiser on this many rows spread over the store and share it with every index
    # shard (None: each shard trains on all its own rows: at 10^7 rows, the index build's largest cost)
    train_rows: int | None = None


@dataclass
class QueryConfig:
    """What the query job attributes (jobs/query.py; the CLI takes the same as flags)."""

    method: str = "grad_dot"  # a method of `tdastore methods`
    inputs: str | None = None  # .csv / .parquet with the task's columns; None: the task's split
    split: Literal["test", "train"] = "test"  # the task's split queried when no inputs are given
    top_k: int = 10  # training rows per test input
    kind: IndexKind | None = None  # a FAISS index kind (None: exact streamed scoring)
    out: str | None = None  # write the table as Parquet (None: print only)
    workers: int = 0  # Ray actors scoring input blocks x store row ranges (0: in process)
    ray_min_inputs: int = 256  # fewer test inputs than this are scored in process even with workers set
    threads_per_worker: int = 1  # torch threads (and Ray CPUs) of each scoring actor


@dataclass
class GroundTruthConfig:
    """Further training from the final model (PAPER.md's gold standard)."""

    coupling: Literal["delete", "subtract"] = "delete"  # delete: i removed from the seed's permutation
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"  # further training's optimizer
    lr: float = 0.003  # about 10x below the original training rate
    batch_size: int = 128  # further training's minibatch size
    weight_decay: float = 0.0  # further training's weight decay (adamw: decoupled; sgd / adam: coupled)
    clip_norm: float | None = None  # clip each step's gradient to this global norm (None: no clipping)
    epochs: int | None = 50  # amount of further training in epochs ...
    steps: int | None = None  # ... or in optimizer steps (then epochs must be null)
    eval_every: int = 1  # evaluation schedule, in epochs (or in steps when `steps` is set)
    left_out_indices: list[int] | None = None  # training rows to leave out, or:
    left_out_every: int | None = None  # every m-th training row, or:
    left_out_count: int | None = 50  # this many random rows (seeded by left_out_seed)
    left_out_seed: int = 0  # seeds left_out_count's random rows
    test_points: int | None = None  # the first n test rows (None: all)
    seeds: int = 20  # seeds 0 .. seeds-1 (batch orders)
    seed_block: int = 10  # a unit of work: seed_block seeds x left_out_block rows
    left_out_block: int = 50  # a unit of work's left-out rows (see seed_block)
    max_replicas: int = 4096  # replicas trained together in one vmapped group (1: one at a time)
    # vectorised: replicas stacked and trained together (torch.func); sequential: one at a time with torch.optim;
    # auto: vectorised for feature-vector models up to 10M parameters; token sequences sequential, vectorised
    # when `compile` is on
    execution: Literal["auto", "vectorised", "sequential"] = "auto"
    # vectorised: each replica step (gradients and the update rule, one graph) through torch.compile: fuses the
    # element-wise work between the batched products; the first step of each shape compiles (seconds). An MLP's
    # products are written out already (groundtruth/stacked.py): only its update rule is compiled (AdamW 1.4x)
    compile: bool = False
    workers: int = 2  # Ray workers of the job pool
    threads_per_worker: int = 1  # CPUs (and torch threads) per unit task
    output: str = "runs/groundtruth"  # the gold standard's job store (a directory or fsspec URI)


@dataclass
class MetagradConfig:
    """The metagradient method (tdastore/groundtruth/metagrad.py): differentiate the ground truth's further
    training with respect to per-row weights."""

    mode: Literal["auto", "forward", "reverse"] = "auto"  # auto: fewer vectors (rows vs evals x test points)
    coupling: Literal["delete", "subtract"] | None = None  # None: the ground truth's coupling
    rows: Literal["left_out", "all"] = "left_out"  # which training rows get scores
    # the first n of the ground truth's seeds (at most as many as it has); None: the first min(5, all); all: every one
    seeds: int | Literal["all"] | None = None
    seed_block: int = 1  # a unit of work: seed_block seeds x test_block test points
    test_block: int | None = None  # None: all test points in one block (forward mode's cost ignores them)
    checkpoint_every: int | None = None  # reverse mode's trajectory checkpoints; None: from memory_mb
    memory_mb: float = 512.0  # budget for the stored trajectory states (reverse mode)
    workers: int = 2  # Ray workers of the job pool


@dataclass
class LdsConfig:
    """The linear datamodeling score (tdastore/groundtruth/lds.py): further training with random subsets left
    out, in the ground truth's setting (optimizer, schedule, coupling, test points), beside the ground truth."""

    subsets: int = 50  # M random subsets S_j of the training rows
    fraction: float = 0.5  # alpha: each subset holds this fraction of the training rows
    seeds: int = 5  # batch-order seeds 0..seeds-1, averaged per subset
    subset_seed: int = 0  # draws the subsets
    subset_block: int = 10  # a unit of work: groundtruth.seed_block seeds x subset_block subsets
    workers: int = 2  # Ray workers of the job pool
    # None: the ground truth's coupling; delete: each subset's rows dropped from every permutation, as TRAK and
    # datamodels train on subsets (in subtract coupling every step adds the subset's alpha x N rows)
    coupling: Literal["delete", "subtract"] | None = None


@dataclass
class Config:
    """Every setting of a run, one section per step (task, model, train, gradients, projection, store, build,
    attribution, index, groundtruth, query, metagrad, lds): from YAML, a dict, `--section.field` flags or
    defaults, validated as a whole by `load_config` and written into every output so a run can be replayed."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps: where every step computes (build, queries, fits, replicas)
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    gradients: GradientConfig = field(default_factory=GradientConfig)
    projection: ProjectionConfig = field(default_factory=ProjectionConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    build: BuildConfig = field(default_factory=BuildConfig)
    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    groundtruth: GroundTruthConfig = field(default_factory=GroundTruthConfig)
    query: QueryConfig = field(default_factory=QueryConfig)
    metagrad: MetagradConfig = field(default_factory=MetagradConfig)
    lds: LdsConfig = field(default_factory=LdsConfig)

    def validate(self) -> Config:
        """Cross-field checks that a type alone cannot express."""
        _require(0.0 < self.task.test_fraction < 1.0, "task.test_fraction", "must lie in (0, 1)")
        _require(all(h > 0 for h in self.model.hidden), "model.hidden", "sizes must be positive")
        _require(self.train.lr > 0, "train.lr", "must be positive")
        _require(self.train.batch_size > 0, "train.batch_size", "must be positive")
        _require(0 < self.train.epochs <= MAX_EPOCHS, "train.epochs",
                 f"must lie in 1..{MAX_EPOCHS:,} (0 would save an untrained model)")  # fmt: skip
        _require(0.0 <= self.train.momentum < 1.0, "train.momentum", "must lie in [0, 1)")
        _require(self.train.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _require(self.task.max_length > 0, "task.max_length", "must be positive (tokens per example)")
        _require(self.gradients.batch_size > 0, "gradients.batch_size", "must be positive")
        _require(self.gradients.max_tokens is None or self.gradients.max_tokens > 0, "gradients.max_tokens",
                 "must be positive (or null: batches of gradients.batch_size)")  # fmt: skip
        _require(len(self.gradients.params) > 0, "gradients.params", "needs at least one pattern")
        _require(0 < self.projection.dim <= MAX_PROJECTION_DIM, "projection.dim",
                 f"must lie in 1..{MAX_PROJECTION_DIM:,} (stored rows are this wide; projection.kind none keeps "
                 "the exact gradients)")  # fmt: skip
        _require(self.projection.cache_mb >= 0, "projection.cache_mb", "must be >= 0")
        _require(
            all(len(f) == 2 and min(f) > 0 for f in self.projection.module_factors.values()),
            "projection.module_factors",
            "values must be two positive sizes [k_out, k_in]",
        )
        _require(self.projection.nonzeros > 0, "projection.nonzeros", "must be positive")
        if self.projection.kind == "sparse":
            _require(
                self.projection.dim % self.projection.nonzeros == 0,
                "projection.nonzeros",
                f"must divide projection.dim={self.projection.dim}",
            )
        _require(
            len(self.projection.factors) == 2 and min(self.projection.factors) > 0,
            "projection.factors",
            "must be two positive sizes [k_out, k_in]",
        )
        _require(self.projection.block_rows > 0, "projection.block_rows", "must be positive")
        _require(self.projection.basis == "random" or self.projection.kind == "factored", "projection.basis",
                 "pca fits the sides of a factored projection: use it with projection.kind factored (dense and sparse "
                 "projections are random)")  # fmt: skip
        _require(self.projection.basis_examples > 0, "projection.basis_examples", "must be positive")
        _require(self.projection.basis_max_dim > 0, "projection.basis_max_dim", "must be positive")
        _require(self.store.chunk_rows > 0, "store.chunk_rows", "must be positive")
        _require(
            self.store.shard_rows > 0 and self.store.shard_rows % self.store.chunk_rows == 0,
            "store.shard_rows",
            f"must be a positive multiple of store.chunk_rows={self.store.chunk_rows}",
        )
        _require(self.build.workers > 0, "build.workers", "must be positive")
        _require(self.query.workers >= 0, "query.workers", "must be 0 (in process) or a number of Ray actors")
        _require(self.query.threads_per_worker > 0, "query.threads_per_worker", "must be positive")
        _require(self.build.gpus_per_worker > 0, "build.gpus_per_worker", "must be positive")
        _require(self.build.cpus_per_worker > 0, "build.cpus_per_worker", "must be positive (Ray CPUs per worker)")
        _require(self.query.top_k > 0, "query.top_k", "must be positive")
        _require(self.query.ray_min_inputs >= 0, "query.ray_min_inputs", "must be >= 0")
        _require(self.device.partition(":")[0] in ("auto", "cpu", "cuda", "mps"), "device",
                 "must be auto, cpu, cuda, cuda:N or mps")  # fmt: skip
        _require(self.metagrad.seeds in (None, "all") or self.metagrad.seeds > 0, "metagrad.seeds",
                 "must be positive, all, or null (the first five)")  # fmt: skip
        _require(self.metagrad.seed_block > 0, "metagrad.seed_block", "must be positive")
        _require(
            self.metagrad.checkpoint_every is None or self.metagrad.checkpoint_every > 0,
            "metagrad.checkpoint_every",
            "must be positive (or null: from metagrad.memory_mb)",
        )
        _require(
            self.metagrad.test_block is None or self.metagrad.test_block > 0, "metagrad.test_block", "must be positive"
        )
        _require(self.metagrad.memory_mb > 0, "metagrad.memory_mb", "must be positive")
        _require(self.metagrad.workers > 0, "metagrad.workers", "must be positive")
        lds = self.lds
        _require(lds.subsets >= 2, "lds.subsets", "must be at least 2 (a rank correlation over subsets)")
        _require(0.0 < lds.fraction < 1.0, "lds.fraction", "must lie in (0, 1)")
        _require(lds.seeds > 0 and lds.subset_block > 0 and lds.workers > 0, "lds.seeds",
                 "subset_block and workers must be positive")  # fmt: skip
        _require(self.build.max_retries >= 0, "build.max_retries", "must be >= 0")
        a = self.attribution
        _require(
            a.damping_factor == "auto" or a.damping_factor >= 0, "attribution.damping_factor", "must be >= 0 or auto"
        )
        _require(a.lissa_depth > 0, "attribution.lissa_depth", "must be positive")
        _require(a.lissa_scale is None or a.lissa_scale > 0, "attribution.lissa_scale", "must be positive")
        _require(a.cg_max_iter > 0 and a.cg_tol > 0, "attribution.cg_max_iter", "and cg_tol must be positive")
        _require(a.batch_size > 0, "attribution.batch_size", "must be positive")
        _require(a.lissa_batch_size is None or a.lissa_batch_size > 0, "attribution.lissa_batch_size",
                 "must be positive (or null: full-batch products)")  # fmt: skip
        _require(a.kfac_examples is None or a.kfac_examples > 0, "attribution.kfac_examples",
                 "must be positive (or null: all training examples)")  # fmt: skip
        _require(a.max_exact_params > 0, "attribution.max_exact_params", "must be positive")
        _require(a.adam_eps > 0, "attribution.adam_eps", "must be positive (Adam's eps, 1e-8 by default)")
        _require(a.replay_steps is None or a.replay_steps > 0, "attribution.replay_steps",
                 "must be positive (or null: the whole further training)")  # fmt: skip
        _require(a.replay_seeds > 0, "attribution.replay_seeds", "must be positive (batch orders averaged)")
        _require(a.max_dense_dim > 0, "attribution.max_dense_dim", "must be positive")
        _require(len(a.methods) > 0, "attribution.methods", "needs at least one method")
        _require(self.index.shard_rows > 0, "index.shard_rows", "must be positive")
        index = self.index
        _require(index.nlist is None or index.nlist > 0, "index.nlist", "must be positive (or null: 4 x sqrt(rows))")
        _require(index.pq_m is None or index.pq_m > 0, "index.pq_m",
                 "must be positive and divide the store's dim (or null: dim / 4)")  # fmt: skip
        _require(2 <= index.hnsw_m <= 256, "index.hnsw_m", "must lie in 2..256 (neighbours per HNSW node)")
        _require(index.refine > 0, "index.refine", "must be positive (1: no re-ranking beyond top_k)")
        _require(index.train_rows is None or index.train_rows > 0, "index.train_rows", "must be positive (or null)")
        gt = self.groundtruth
        _require(
            (gt.epochs is None) != (gt.steps is None),
            "groundtruth.epochs",
            "or groundtruth.steps must be set, not both (set the other to null)",
        )
        amount = gt.epochs if gt.epochs is not None else gt.steps
        _require(amount > 0, "groundtruth.epochs/steps", "must be positive")
        _require(
            0 < gt.eval_every <= amount,
            "groundtruth.eval_every",
            f"must lie in 1..{amount} (the amount of further training): the schedule would pass its end",
        )
        chosen = [gt.left_out_indices is not None, gt.left_out_every is not None, gt.left_out_count is not None]
        _require(
            sum(chosen) == 1,
            "groundtruth.left_out_indices",
            "/ left_out_every / left_out_count: set exactly one (the others null)",
        )
        _require(gt.seeds > 0, "groundtruth.seeds", "must be positive (zero seeds give no gold standard)")
        _require(gt.lr > 0 and gt.batch_size > 0, "groundtruth.lr", "and batch_size must be positive")
        _require(
            gt.seed_block > 0 and gt.left_out_block > 0 and gt.max_replicas > 0 and gt.workers > 0,
            "groundtruth.seed_block",
            "left_out_block, max_replicas and workers must be positive",
        )
        _require(gt.clip_norm is None or gt.clip_norm > 0, "groundtruth.clip_norm", "must be positive")
        _require(gt.weight_decay >= 0, "groundtruth.weight_decay", "must be >= 0")
        _require(gt.threads_per_worker > 0, "groundtruth.threads_per_worker", "must be positive")
        _require(gt.test_points is None or gt.test_points > 0, "groundtruth.test_points",
                 "must be positive (or null: every test row)")  # fmt: skip
        _require(gt.left_out_count is None or gt.left_out_count > 0, "groundtruth.left_out_count",
                 "must be positive (rows left out, one replica each)")  # fmt: skip
        _require(self.index.nprobe > 0 and self.index.ef_search > 0, "index.nprobe", "and ef_search must be positive")
        return self


MAX_EPOCHS = 1_000_000
MAX_PROJECTION_DIM = 1 << 20  # a million stored columns per row; beyond it no store fits a disk
MAX_INT = (1 << 63) - 1  # every integer of a config fits torch's and numpy's int64


def _require(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' {problem}")


def load_config(source: str | Path | dict | None = None, overrides: dict | None = None) -> Config:
    """Build a validated Config from a YAML path, a dict, or nothing (all defaults)."""
    if source is None:
        raw: dict = {}
    elif isinstance(source, dict):
        raw = source
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist: pass --config with a YAML file (see configs/)")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"config file '{path}' is not valid YAML{where}: {getattr(err, 'problem', err)}") from err
        if not isinstance(raw, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of sections, got {type(raw).__name__}")
    if overrides:
        raw = _deep_merge(raw, overrides)
    return _build(Config, raw, "").validate()


def config_to_dict(config: Config) -> dict:
    """The config as plain data, with each field under its YAML key (task.class, not task.cls)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {yaml_key(f): plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(config)


def yaml_key(field: dataclasses.Field) -> str:
    """A field's name in YAML files and flags (its metadata "key" where the name is a Python keyword)."""
    return field.metadata.get("key", field.name)


LOCAL_PATH_FIELDS = (
    ("task", "dataset"),
    ("task", "test_dataset"),
    ("model", "name_or_path"),
    ("model", "tokenizer"),
    ("model", "adapter"),
    ("train", "output_dir"),
    ("attribution", "optimizer_state"),
)  # settings that may name a local file or folder a store's queries read again


def with_absolute_paths(settings: dict) -> dict:
    """A config dict whose path settings that name an existing local file or folder are made absolute, so the
    store that records it answers from any working directory (hub names and URIs stay as they are)."""
    settings = {section: dict(values) if isinstance(values, dict) else values for section, values in settings.items()}
    for section, key in LOCAL_PATH_FIELDS:
        value = settings.get(section, {}).get(key)
        if isinstance(value, str) and "://" not in value and Path(value).exists():
            settings[section][key] = str(Path(value).resolve())
    model = settings.get("model", {})
    adapter_file = Path(str(model.get("name_or_path"))) / "adapter_config.json"
    if isinstance(model, dict) and not model.get("adapter") and adapter_file.is_file():
        # a PEFT adapter records its base as it was loaded, often a path relative to that run's folder: made
        # absolute here (base in name_or_path, the adapter in model.adapter), workers elsewhere find it
        base = json.loads(adapter_file.read_text()).get("base_model_name_or_path")
        if isinstance(base, str) and "://" not in base and not Path(base).is_absolute() and Path(base).exists():
            model["adapter"], model["name_or_path"] = model["name_or_path"], str(Path(base).resolve())
    return settings


def absolute_location(location: str | Path) -> str:
    """A local path made absolute (URIs stay as they are)."""
    text = str(location)
    return text if "://" in text else str(Path(text).resolve())


def for_workers(config: Config) -> Config:
    """The config with its local paths absolute: Ray workers run in the working directory Ray started in (a
    notebook may have changed directory since) or on another node."""
    settings = with_absolute_paths(config_to_dict(config))
    settings["groundtruth"]["output"] = absolute_location(settings["groundtruth"]["output"])
    return load_config(settings)


def relocated_paths(settings: dict, built_at: str | None, root: Path) -> dict:
    """A recorded config dict read from a store now at `root`: a path that no longer exists but lies beside a
    store that was at `built_at` is looked up at the same place beside `root` (a store copied with its model)."""
    if built_at is None:
        return settings
    settings = {section: dict(values) if isinstance(values, dict) else values for section, values in settings.items()}
    for section, key in LOCAL_PATH_FIELDS:
        value = settings.get(section, {}).get(key)
        if not (isinstance(value, str) and Path(value).is_absolute()) or Path(value).exists():
            continue
        moved = (Path(root).resolve() / os.path.relpath(value, built_at)).resolve()
        if moved.exists():
            settings[section][key] = str(moved)
    return settings


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))


def _deep_merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"config section '{prefix or 'top level'}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    by_key = {yaml_key(f): f.name for f in dataclasses.fields(cls)}
    names = set(by_key)
    unknown = sorted(set(raw) - names)
    if unknown:
        where = f"section '{prefix}'" if prefix else "the top level"
        hints_text = "".join(
            f"; '{k}': did you mean '{close[0]}'?"
            for k in unknown
            if (close := difflib.get_close_matches(str(k), sorted(names), n=1, cutoff=0.6))
        )
        raise ConfigError(f"unknown config key(s) {unknown} in {where}{hints_text}; allowed keys: {sorted(names)}")
    values = {}
    for name in names & set(raw):
        key = f"{prefix}.{name}" if prefix else name
        values[by_key[name]] = _coerce(hints[by_key[name]], raw[name], key)
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    """Check `value` against a type hint; ints are accepted where floats are expected."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"config key '{key}' must be one of {list(allowed)}, got {value!r}")
        return value
    if origin is dict:
        key_hint, item = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return {_coerce(key_hint, k, f"{key} (a key)"): _coerce(item, v, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is float:
        value = _number_text(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        try:
            number = float(value)
        except OverflowError:  # an integer beyond float's range
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"config key '{key}' must be a finite number, got {value!r}")
        return number
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        if abs(value) > MAX_INT:
            raise ConfigError(f"config key '{key}' is out of range ({value}): integers must fit in 64 bits")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint} for '{key}'")


def _number_text(value: Any) -> Any:
    """PyYAML (YAML 1.1) reads 1e-6 as a string: a string that is a finite number is that number."""
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        return number if math.isfinite(number) else value
    return value
