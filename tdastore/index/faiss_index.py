"""FAISS inner-product indexes over operator-transformed store rows, one per row shard, merged top-k.

An index lives in STORE/indexes/<method>-<kind>/ (shard files + index.json) and is named in the
manifest. index.json records what the rows mean (method, operator key, projection, model, rows, kind
settings): an index that matches is reused, never rebuilt; one that does not is refused at query time.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

from tdastore.config import IndexConfig
from tdastore.errors import ConfigError, StoreError
from tdastore.store.checksums import sha256_of
from tdastore.store.location import writable
from tdastore.store.manifest import write_bytes_atomic, write_json_atomic

INDEX_DIR = "indexes"


def normalise_rows(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return (rows / np.maximum(norms, 1e-30)).astype(np.float32)


def _nlist(config: IndexConfig, rows: int) -> int:
    wanted = config.nlist or int(4 * math.sqrt(rows))
    return max(1, min(wanted, rows // 39 or 1))  # FAISS wants ~39 training points per list


def _pq_m(config: IndexConfig, dim: int) -> int:
    divisors = [m for m in range(1, dim + 1) if dim % m == 0]
    if config.pq_m is not None and config.pq_m not in divisors:
        raise ConfigError(
            f"index.pq_m {config.pq_m} does not divide the pq index's width {dim} (every sub-quantizer takes "
            f"an equal slice): use one of {divisors[:12]}, or null for the largest divisor <= {max(1, dim // 4)}"
        )
    wanted = config.pq_m or max(1, dim // 4)
    return max(m for m in divisors if m <= wanted)


# Clustering (IVF) assigns vectors by distance, which fails for maximum inner product: the top scores
# belong to long vectors spread over every cluster (measured: recall@10 0.29 at nprobe 32 on 100k
# gradients). These kinds index x~ = [x, sqrt(M^2 - |x|^2), 0...] under L2 instead (Bachrach et al.
# 2014): |q~ - x~|^2 = |q|^2 + M^2 - 2 q.x, so the nearest x~ has the largest inner product.
L2_REDUCED = ("ivf", "pq")
TRAINED_KINDS = ("ivf", "pq", "sq8")  # kinds whose quantiser is fitted to rows


def augment_rows(rows: np.ndarray, max_norm: float, width: int) -> np.ndarray:
    """[n, k] -> [n, width] with the norm-completing column, zero padded."""
    out = np.zeros((rows.shape[0], width), dtype=np.float32)
    out[:, : rows.shape[1]] = rows
    out[:, rows.shape[1]] = np.sqrt(np.maximum(max_norm**2 - (rows.astype(np.float64) ** 2).sum(1), 0.0))
    return out


def reduced_width(dim: int) -> int:
    return -(-(dim + 1) // 4) * 4  # room for the extra column, a multiple of 4 for product quantisation


def make_faiss_index(kind: str, dim: int, rows: int, config: IndexConfig) -> faiss.Index:
    """An empty index of `kind` for `rows` vectors of `dim` columns (already widened for L2-reduced kinds)."""
    ip = faiss.METRIC_INNER_PRODUCT
    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind == "ivf":
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, _nlist(config, rows), faiss.METRIC_L2)
        index.nprobe = config.nprobe
        return index
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, config.hnsw_m, ip)
        index.hnsw.efConstruction = max(40, config.hnsw_m * 2)
        index.hnsw.efSearch = config.ef_search
        return index
    if kind == "sq8":
        return faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit, ip)
    if kind == "pq":
        base = faiss.IndexIVFPQ(
            faiss.IndexFlatL2(dim), dim, _nlist(config, rows), _pq_m(config, dim), 8, faiss.METRIC_L2
        )
        base.nprobe = config.nprobe
        index = faiss.IndexRefineFlat(base)
        index.k_factor = float(config.refine)
        return index
    raise ConfigError(f"unknown index kind '{kind}': use flat, ivf, hnsw, sq8 or pq")


@dataclass
class IndexHandle:
    directory: Path
    description: dict
    shards: list[tuple[int, int, str, float]]  # (first row, stop row, file, largest row norm)
    loaded: dict = field(default_factory=dict)  # file -> faiss.Index, read on first search
    device: str = "cpu"  # the config's device: GPU FAISS for cuda / auto when the installed faiss has GPUs
    digests: dict = field(default_factory=dict)  # file -> sha256 of its bytes (indexes on object storage)
    repair: object = None  # () -> IndexHandle rebuilt, when a shard fails its sha256 on load (writable stores)

    def search(self, queries: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k inner products over all shards: (scores [m, K], rows [m, K]), best first."""
        all_scores, all_rows = [], []
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        reduced = self.description["kind"] in L2_REDUCED
        for start, stop, name, max_norm in self.shards:
            if name not in self.loaded:
                try:
                    shard = read_shard(self.directory / name, self.description, self.digests.get(name))
                except StoreError:
                    if self.repair is None:
                        raise
                    print(f"index shard {self.directory / name} is damaged (sha256): rebuilding", file=sys.stderr)
                    fresh, self.repair = self.repair(), None
                    self.shards, self.loaded, self.digests = fresh.shards, fresh.loaded, fresh.digests
                    return self.search(queries, top_k)
                self.loaded[name] = on_search_device(shard, self.device)
            index = self.loaded[name]
            k = min(top_k, stop - start)
            if reduced:
                # rescale each query to norm M so |q|^2, M^2 and 2 q.x share one magnitude in float32
                q_norm = np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-30)
                widened = np.zeros((queries.shape[0], index.d), dtype=np.float32)
                widened[:, : queries.shape[1]] = queries * (max_norm / q_norm)
                distances, rows = index.search(widened, k)
                scores = ((2 * max_norm**2 - distances) / 2 * (q_norm / max_norm)).astype(np.float32)
                scores[rows < 0] = -np.inf
            else:
                scores, rows = index.search(queries, k)
            all_scores.append(scores)
            all_rows.append(np.where(rows >= 0, rows + start, -1))
        return merge_top_k(np.concatenate(all_scores, 1), np.concatenate(all_rows, 1), top_k)


def read_shard(path, description: dict, digest: str | None = None) -> faiss.Index:
    """An index shard: read in place locally; from object storage, downloaded once per node into a local cache
    keyed by its content hash (recorded at build; a download that does not match it is refused), or, for
    indexes built before hashes were recorded, by the index's description and the shard's name."""
    if isinstance(path, Path):
        if digest is None:  # indexes built before local shards had hashes
            return faiss.read_index(str(path))
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            raise StoreError(index_damage(path))
        return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    key = digest or hashlib.sha256(json.dumps([description, str(path)], sort_keys=True).encode()).hexdigest()[:24]
    cache = Path(os.environ.get("TDASTORE_CACHE", Path.home() / ".cache" / "tdastore")) / "indexes" / f"{key}.faiss"
    if not cache.is_file():
        data = path.read_bytes()
        if digest is not None and hashlib.sha256(data).hexdigest() != digest:
            raise StoreError(index_damage(path))
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(cache, data)
    return faiss.read_index(str(cache))


def index_damage(path) -> str:
    return (
        f"index shard {path} does not match the hash its index.json records (overwritten, truncated or corrupt): "
        "rebuild the index with `tdastore index STORE --method M --kind K` (the store's rows are intact)"
    )


def index_problems(handle: IndexHandle, hashes: bool = True) -> list[str]:
    """What is wrong with an index's files: a shard missing, or (`hashes`) not matching the sha256 recorded at
    build. Opening an index checks presence only: hashing every shard read a 10 GB index once more at open."""
    problems = []
    for _, _, name, _ in handle.shards:
        path = handle.directory / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif hashes and name in handle.digests and sha256_of(path) != handle.digests[name]:
            problems.append(f"{name} does not match its sha256 (corrupt)")
    return problems


def faiss_gpus() -> int:
    """GPUs the installed faiss can use (0 for faiss-cpu builds)."""
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def on_search_device(index: faiss.Index, device: str) -> faiss.Index:
    """The index searched on all GPUs when the device is cuda (or auto) and faiss has GPU support, else as is.
    Kinds without a GPU implementation (HNSW, refined IVF-PQ) stay on the CPU."""
    if not (device == "auto" or device.startswith("cuda")) or faiss_gpus() == 0:
        return index
    try:
        return faiss.index_cpu_to_all_gpus(index)
    except (RuntimeError, AttributeError):
        return index


def merge_top_k(scores: np.ndarray, rows: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep the top_k largest scores per query row (ties broken by the smaller row id)."""
    order = np.lexsort((rows, -scores), axis=1)[:, :top_k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)


def index_shards(store, shard_rows: int, first_row: int = 0) -> list[tuple[int, int]]:
    """Row ranges made of whole store shards from `first_row` on, each at most `shard_rows` rows (at least one
    shard)."""
    ranges: list[tuple[int, int]] = []
    for entry in (e for e in store.manifest["shards"] if e["start"] >= first_row):
        if ranges and entry["stop"] - ranges[-1][0] <= shard_rows:
            ranges[-1] = (ranges[-1][0], entry["stop"])
        else:
            ranges.append((entry["start"], entry["stop"]))
    return ranges


def build_index(
    store,
    method,
    operator,
    operator_key: str,
    kind: str,
    config: IndexConfig,
    progress: bool = True,
    read_only: bool = False,
    rebuild: bool = False,
) -> IndexHandle:
    """Transform every row with the operator (and normalise for cosine), add them to FAISS, shard by shard (an
    index of the same description is reused; `rebuild`: it was found damaged)."""
    index_name = method.index_name  # a method's name, or with attribution.normalize: train its own rows
    directory = store.root / INDEX_DIR / f"{index_name}-{kind}"
    description = {
        "method": index_name,
        "kind": kind,
        "operator": operator_key,
        # which fit of it (refit after an append): an index of another fit's rows is rebuilt, not grown
        "operator_fit": store.manifest.get("preconditioners", {}).get(operator_key, {}).get("checksum"),
        "projection": store.manifest["projection"],
        "model": store.manifest["model"],
        "n_rows": store.n_rows,
        "dim": store.dim,
        "settings": _kind_settings(kind, config),
        "shard_rows": config.shard_rows,
    }
    if kind == "pq":
        _pq_m(config, reduced_width(store.dim))  # a pq_m that does not divide the width: refused before any work
    existing = load_index(store, index_name, kind)
    persist = writable(store.root) and not read_only  # a read-only store (e.g. one being served): in memory
    if existing is not None and existing.description == description and not rebuild:
        damage = index_problems(existing, hashes=False)  # files present; each shard's sha256 is checked as it loads
        if not damage:
            if persist:  # a shard found damaged on load is rebuilt with the rest (a reader never gets its rows)
                existing.repair = lambda: build_index(store, method, operator, operator_key, kind, config, progress,
                                                      read_only, rebuild=True)  # fmt: skip
            return existing
        if not persist:
            raise StoreError(f"the {index_name}/{kind} index of '{store.root}' is damaged ({damage[0]}): "
                             + index_damage(existing.directory).split(": ", 1)[1])  # fmt: skip
        print(f"the {index_name}/{kind} index is damaged ({'; '.join(damage)}): rebuilding it", file=sys.stderr)
    if persist:
        directory.mkdir(parents=True, exist_ok=True)
    shards, loaded, digests = [], {}, {}
    began = time.perf_counter()
    grown = existing is not None and persist and appended_to(existing, description)
    trained = None  # a grown store's new rows go into new shards with the first shard's trained quantiser
    if grown:
        shards, digests = list(existing.shards), dict(existing.digests)
        description["appended_from_row"] = existing.description["n_rows"]  # rows after it: not trained on
        if kind in TRAINED_KINDS:
            first = read_shard(directory / shards[0][2], existing.description, digests.get(shards[0][2]))
            trained = faiss.clone_index(first)
            trained.reset()
    ranges = index_shards(store, config.shard_rows, first_row=shards[-1][1] if grown else 0)
    if trained is None and config.train_rows and kind in TRAINED_KINDS and store.n_rows > config.train_rows:
        trained = shared_quantiser(store, operator, method, kind, config, max(b - a for a, b in ranges))
    done = shards[-1][1] if grown else 0
    bar = tqdm(total=store.n_rows, initial=done, desc=f"index {index_name}/{kind}", unit="row", disable=not progress)
    for number, (start, stop) in enumerate(ranges, start=len(shards)):
        rows = transformed_rows(store, operator, method, start, stop)  # [n, k] float32
        max_norm = float(np.linalg.norm(rows, axis=1).max())
        if kind in L2_REDUCED:
            rows = augment_rows(rows, max_norm, reduced_width(store.dim))
        if trained is not None:  # the shared (or the grown index's first) quantiser, already trained
            index = faiss.clone_index(trained)
        else:
            index = make_faiss_index(kind, rows.shape[1], stop - start, config)
        if not index.is_trained:
            index.train(rows)
        index.add(rows)
        name = f"shard-{number:04d}.faiss"
        if persist:  # one atomic write (object storage: one put; nodes cache it under its content hash)
            data = faiss.serialize_index(index).tobytes()
            write_bytes_atomic(directory / name, data)
            digests[name] = hashlib.sha256(data).hexdigest()  # checked on every read and by verify
        else:
            loaded[name] = index
        shards.append((start, stop, name, max_norm))
        bar.update(stop - start)
    bar.close()
    description["shards"] = shards
    description["build_seconds"] = time.perf_counter() - began
    if digests:
        description["shard_sha256"] = digests
    if not persist:
        return IndexHandle(directory, _without_build_facts(description), shards, loaded)
    write_json_atomic(directory / "index.json", description)
    store.register(
        "indexes",
        f"{index_name}-{kind}",
        {"directory": f"{INDEX_DIR}/{index_name}-{kind}", "operator": operator_key},
    )
    return IndexHandle(directory, _without_build_facts(description), shards, digests=digests)


def shared_quantiser(store, operator, method, kind: str, config: IndexConfig, shard_rows: int) -> faiss.Index:
    """An empty index of `kind` whose quantiser is trained once on about `index.train_rows` rows spread evenly over
    the store (whole chunks), for every shard to add its rows to: training reads a sample, not the store. The
    sample's rows are widened with the sample's largest norm (L2-reduced kinds); each shard widens its own rows
    with its own, as without a shared quantiser."""
    chunk = store.grads.chunks[0]
    picks = max(1, -(-config.train_rows // chunk))
    starts = np.unique(np.linspace(0, (store.n_rows - 1) // chunk, picks).astype(np.int64)) * chunk
    blocks = [transformed_rows(store, operator, method, s, min(s + chunk, store.n_rows)) for s in starts]
    sample = np.concatenate(blocks)  # [~train_rows, k]
    if kind in L2_REDUCED:
        sample = augment_rows(sample, float(np.linalg.norm(sample, axis=1).max()), reduced_width(store.dim))
    index = make_faiss_index(kind, sample.shape[1], shard_rows, config)
    index.train(sample)
    return index


def appended_to(existing: IndexHandle, description: dict) -> bool:
    """Whether `existing` indexes a prefix of the rows `description` wants, with everything else equal (the store
    grew by `tdastore build --append`): its shards stand, and only the new rows need adding."""
    old = {k: v for k, v in existing.description.items() if k != "n_rows"}
    new = {k: v for k, v in description.items() if k != "n_rows"}
    ends = existing.shards[-1][1] if existing.shards else 0
    return old == new and 0 < ends == existing.description["n_rows"] < description["n_rows"]


def transformed_rows(store, operator, method, start: int, stop: int) -> np.ndarray:
    return transform_block(store.read_rows(start, stop), operator, method)


def transform_block(rows: np.ndarray, operator, method) -> np.ndarray:
    """Train-side rows as the index holds them: unit-normalised for cosine methods (or attribution.normalize),
    then K^(1/2)."""
    if method.unit_projected("train"):
        rows = normalise_rows(rows)
    return np.ascontiguousarray(operator.transform(rows), dtype=np.float32)


def _kind_settings(kind: str, config: IndexConfig) -> dict:
    return {
        "flat": {},
        "ivf": {"nlist": config.nlist, "nprobe": config.nprobe},
        "hnsw": {"m": config.hnsw_m, "ef_search": config.ef_search},
        "sq8": {},
        "pq": {"nlist": config.nlist, "nprobe": config.nprobe, "pq_m": config.pq_m, "refine": config.refine},
    }[kind] | ({"train_rows": config.train_rows} if config.train_rows and kind in TRAINED_KINDS else {})


def _without_build_facts(description: dict) -> dict:
    facts = ("shards", "build_seconds", "shard_sha256", "appended_from_row")
    return {k: v for k, v in description.items() if k not in facts}


def load_index(store, method_name: str, kind: str) -> IndexHandle | None:
    directory = store.root / INDEX_DIR / f"{method_name}-{kind}"
    path = directory / "index.json"
    if not path.is_file():
        return None
    try:
        description = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise StoreError(f"index description {path} is corrupt ({err}); rebuild it with `tdastore index`") from err
    shards = [tuple(s) for s in description.get("shards", [])]
    digests = description.get("shard_sha256", {})
    return IndexHandle(directory, _without_build_facts(description), shards, digests=digests)
