"""`tdastore serve`: a Ray Serve application that answers attribution queries over a store.

POST /query   {"method": "if_gn", "inputs": [[...] | {"feature": value, ...} | "a prompt", ...],
               "targets": [...], "top_k": 10, "bottom_k": 0}
              -> {"method", "path", "operator", "index", "results": [{"top": [hit], "bottom": [hit]}]},
                 hit = {"train_id", "train_row", "score", "train_text" (text stores)}
GET  /methods (what this store answers, and why the others not), /health, /docs, /openapi.json

Every replica holds the model, the fitted operators and the FAISS indexes of the served methods (prepared
once, before the replicas start, and saved with the store). Concurrent requests for one method are batched
(`max_batch`, `batch_wait_ms`): one gradient pass and one index search serve them all. With `index_shards` G > 1
each index is split over G shard deployments instead (an index above a replica's memory): the front computes the
queries, every shard searches its rows, the front merges the top-k (scatter-gather).
The request schema is built for the store (its methods, feature names and count, classes), so /docs shows
what a request must hold and every malformed request is a 4xx that names the field.
"""

import asyncio
import contextlib
import hashlib
import hmac
import inspect
import os
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, create_model, model_validator
from ray import serve

from tdastore.errors import ConfigError, TdaStoreError
from tdastore.methods import METHODS

MAX_BATCH = 256  # test inputs per request
MAX_BODY = 2 * 2**20  # bytes
MAX_TOP_K = 1000
MAX_TEXT = 20_000  # characters of one prompt
MAX_DEPTH = 8  # a /query body nests at most {"inputs": [[value]]} (or [{name: value}])
MAX_NUMBER_CHARS = 40  # longer numbers are not features of anything (and big-integer parsing is slow)


# -- preparing a store for serving (the driver, once) ---------------------------------------------------------
def served_methods(store_path: str, methods: list[str] | None, kind: str | None, overrides: dict | None) -> dict:
    """Fit (or load) every candidate method's operator and build (or open) its index, once, in this process, so
    replicas only load them. Returns {"methods": answerable, "unavailable": {method: why}, "index_names": each
    answerable method's index name (attribution.normalize: train indexes rows of its own)}."""
    from tdastore.attribution import Attributor
    from tdastore.store.gradient_store import open_store

    candidates = [m.name for m in METHODS.values() if m.projected is not None]
    unknown = sorted(set(methods or []) - set(candidates))
    if unknown:
        raise ConfigError(f"--methods {unknown}: the service answers methods with a projected path, {candidates}")
    store = open_store(store_path)
    overrides = projected_overrides(overrides)
    base = Attributor(store, "grad_dot", overrides)  # task and model, loaded once
    answerable, unavailable, index_names = [], {}, []
    for name in methods or candidates:
        try:
            attributor = Attributor(store, name, overrides, kind=kind, share=base)
            answerable.append(name)
            index_names.append(attributor.method.index_name)  # attribution.normalize: train rows of their own
        except TdaStoreError as err:  # e.g. kfac on a store built without factored gradients
            unavailable[name] = str(err)
    if not answerable:
        raise ConfigError(f"no method can be served from '{store_path}': {unavailable}")
    return {"methods": answerable, "unavailable": unavailable, "index_names": index_names}


def projected_overrides(overrides: dict | None) -> dict:
    overrides = overrides or {}
    return {**overrides, "attribution": {**overrides.get("attribution", {}), "path": "projected"}}


# -- request and response schemas, built for one store ------------------------------------------------------------
Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]  # a JSON number (not a string, bool, NaN)


class TokenShare(BaseModel):
    side: Literal["train", "test"] = Field(description="a token of the training document, or a target of the query")
    position: int
    token: str
    score: float = Field(description="its share of the hit's score (each side's shares sum to the score)")


class Hit(BaseModel):
    train_id: int
    train_row: int
    score: float
    train_text: str | None = None
    tokens: list[TokenShare] | None = None


class Ranked(BaseModel):
    top: list[Hit] = Field(description="the top_k most positive training rows (removing them raises the loss)")
    bottom: list[Hit] = Field(description="the bottom_k most negative rows (opponents), most negative first")


class QueryResponse(BaseModel):
    method: str
    measurement: str = "loss"
    path: str
    operator: str
    index: str | None = None
    results: list[Ranked] = Field(description="one entry per input, in order")


def request_model(meta: dict) -> type[BaseModel]:
    """The /query body for this store: its methods, its inputs (feature rows by position or name, or texts),
    its targets (classes, numbers, or none for a causal LM) and k within the store's rows."""
    methods, rows = meta["methods"], meta["rows"]
    classes = meta.get("classes") or None
    k_max = min(MAX_TOP_K, rows)
    if meta.get("text"):
        item = Annotated[str, StringConstraints(min_length=1, max_length=MAX_TEXT, pattern=r"\S")]
        inputs_help = "texts (prompts or documents), scored like the store's documents"
    else:
        features = meta["features"]
        named = create_model(
            "NamedFeatures",
            __config__=ConfigDict(extra="forbid", populate_by_name=False),
            **{f"f{i}": (Number, Field(alias=name)) for i, name in enumerate(features)},
        )
        positional = Annotated[list[Number], Field(min_length=len(features), max_length=len(features))]
        item = positional | named
        inputs_help = f"rows of the {len(features)} features {features}, as a list in that order or by name"
    if meta["kind"] == "causal_lm":
        target = (None, Field(None, description="a causal LM scores the texts themselves: send no targets"))
    else:
        value = Literal[tuple(classes)] if classes else Number
        what = f"a class of {classes}" if classes else f"the regression target {meta.get('target', '')}"
        target = (list[value], Field(description=f"one per input: {what}"))

    def check(self):
        if self.targets is not None and len(self.targets) != len(self.inputs):
            raise ValueError(f"targets must hold one value per input ({len(self.inputs)}), got {len(self.targets)}")
        if self.top_k + self.bottom_k < 1:
            raise ValueError("ask for top_k >= 1 or bottom_k >= 1 rows")
        return self

    return create_model(
        "QueryRequest",
        __config__=ConfigDict(extra="forbid"),
        __validators__={"lengths": model_validator(mode="after")(check)},
        method=(Literal[tuple(methods)], Field(methods[0], description="a method of /methods")),
        inputs=(list[item], Field(min_length=1, max_length=MAX_BATCH, description=inputs_help)),
        targets=target,
        top_k=(int, Field(10, ge=0, le=k_max, strict=True, description="most positive rows per input")),
        bottom_k=(int, Field(0, ge=0, le=k_max, strict=True, description="most negative rows per input")),
        **(
            {
                "tokens": (
                    bool,
                    Field(False, strict=True, description="each top hit's token-level shares (factored store)"),
                )
            }
            if meta["kind"] == "causal_lm"
            else {}
        ),
        **({"measurement": measurement_field(meta["measurement"])} if meta.get("text") or classes else {}),
    )


def measurement_field(default: str) -> tuple:
    """What a request may attribute on a text or classification store: the built-in measurements over its
    outputs (a module:function of the caller's is not imported from a request; the service's own default is)."""
    choices = tuple(dict.fromkeys([default, "loss", "logprob", "margin"]))
    return (Literal[choices], Field(default, description="loss | logprob | margin: what is attributed (see README)"))


def positional(inputs: list) -> list:
    """Inputs as the task encodes them: named feature rows in the store's feature order, texts as they are."""
    out = []
    for row in inputs:
        if isinstance(row, BaseModel):
            out.append([getattr(row, f"f{i}") for i in range(len(type(row).model_fields))])
        else:
            out.append(row)
    return out


class RequestError(ValueError):
    """A malformed body caught before the parser: answered with 400 and this message."""


def check_body(raw: bytes) -> None:
    """Bounded nesting and number sizes, checked on the raw text before a parser recurses or parses a
    5,000-digit integer."""
    if len(raw) > MAX_BODY:
        raise RequestError(f"request body above {MAX_BODY} bytes: send fewer inputs per request")
    depth = deepest = 0
    in_string = escaped = False
    number = 0
    for byte in raw:
        if in_string:  # brackets and digits inside strings do not count
            if escaped:
                escaped = False
            elif byte == 0x5C:
                escaped = True
            elif byte == 0x22:
                in_string = False
            continue
        if byte in b"0123456789+-.eE":
            number += 1
            if number > MAX_NUMBER_CHARS:
                raise RequestError(f"a number of more than {MAX_NUMBER_CHARS} characters: send ordinary floats")
            continue
        number = 0
        if byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_DEPTH:
                raise RequestError(f'the body nests deeper than {MAX_DEPTH} levels: send {{"inputs": [[...]]}}')
        elif byte in (0x5D, 0x7D):
            depth -= 1


class GuardedRoute(APIRoute):
    """Checks the raw body (size, nesting, number length) before FastAPI parses it."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def guarded(request: Request):
            if request.method == "POST":
                declared = request.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > MAX_BODY:
                    return JSONResponse({"error": f"request body above {MAX_BODY} bytes"}, status_code=413)
                try:
                    check_body(await request.body())
                except RequestError as err:
                    return JSONResponse({"error": str(err)}, status_code=413 if "bytes" in str(err) else 400)
            return await handler(request)

        return guarded


def validation_message(errors: list) -> str:
    parts = []
    for error in errors[:5]:
        where = ".".join(str(p) for p in error.get("loc", ())[1:] if not str(p).startswith("function-"))
        parts.append(f"{where or 'body'}: {error.get('msg', 'invalid')}")
    more = f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(parts) + more


# -- the deployments -------------------------------------------------------------------------------------------
@dataclass
class Job:
    method: str
    inputs: list
    targets: list | None
    top_k: int
    bottom_k: int
    tokens: bool = False
    measurement: str | None = None  # None: the service's own (attribution.measurement)


def share_of(handle, share: int, shares: int):
    handle.shards = handle.shards[share::shares]  # this deployment's shards only; read on first search
    return handle


@serve.deployment(ray_actor_options={"num_cpus": 0})
class IndexShard:
    """One share of every served method's index shards (scatter-gather mode): searches its rows only."""

    def __init__(self, store_path: str, methods: list[str], kind: str, share: int, shares: int):
        from tdastore.index.faiss_index import load_index
        from tdastore.store.gradient_store import open_store

        self.load = lambda: {
            name: share_of(load_index(open_store(store_path), name, kind), share, shares) for name in methods
        }
        self.handles = self.load()

    def reload(self) -> int:
        """The store's indexes again (grown by an append): swapped in once read."""
        self.handles = self.load()
        return sum(stop - start for handle in self.handles.values() for start, stop, _, _ in handle.shards)

    def search(self, method: str, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        handle = self.handles[method]
        if not handle.shards:
            return np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64)
        return handle.search(queries, k)


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress()
class QueryService:
    """The HTTP front: validates, batches, computes the test side and answers from its index (or the shards)."""

    def __init__(
        self,
        store_path: str,
        served: dict,
        kind: str | None,
        overrides: dict | None,
        max_batch: int,
        batch_wait_ms: float,
        shards: list | None = None,
    ):
        self.store_path, self.methods = store_path, served["methods"]
        self.overrides, self.kind = projected_overrides(overrides), kind
        self.store, base, self.attributors = self.load()
        self.measured: dict[tuple[str, str], Any] = {}  # (method, another measurement): its attributor, made once
        self.shards = shards or []
        described = base.task.describe_inputs()
        if not described.get("text") and "features" not in described:
            raise ConfigError(
                f"task '{base.task.name}' does not describe its raw inputs: implement Task.describe_inputs and "
                "encode_request (features or text) to serve it"
            )
        self.token_sha256 = served.get("token_sha256")
        self.index_names, self.follow_s = served.get("index_names", []), served.get("follow_s", 10.0)
        self.next_look, self.reloading = time.monotonic() + self.follow_s, False
        hidden = ("token_sha256", "index_names", "follow_s")
        served = {k: v for k, v in served.items() if k not in hidden}  # not for /methods
        self.meta = {**described, "rows": self.store.n_rows, "index": kind, **served, "measurement": base.measurement}
        self.lookup = self.store  # hits' ids ([n] int64, in memory) and documents (read per hit) come from it
        self.texts = "text" in self.store.meta_columns
        self.answer.set_max_batch_size(max_batch)
        self.answer.set_batch_wait_timeout_s(batch_wait_ms / 1000)

    def load(self, writes: bool = True) -> tuple:
        """The store, and every served method's attributor sharing one task and model (index and operator loaded;
        after an append, grown and refit; with `writes` False, nothing is written into the store)."""
        from tdastore.attribution import Attributor
        from tdastore.store.gradient_store import open_store

        overrides = self.overrides
        if not writes:
            overrides = {**overrides, "store": {**overrides.get("store", {}), "read_only": True}}
        store = open_store(self.store_path)
        base = Attributor(store, "grad_dot", overrides)  # task and model, loaded once per replica
        made = {name: Attributor(store, name, overrides, kind=self.kind, share=base) for name in self.methods}
        return store, base, made

    async def reload(self, follow: bool = False) -> dict:
        """Pick up a store grown by `tdastore build --append`: the new state is prepared in a thread while requests
        are still answered from the old one, then swapped in between two batches (no downtime for reads). POST
        /reload grows the indexes, refits stale operators and reloads the index shards; the other replicas
        `follow` (see `look_for_growth`), loading what it wrote."""
        before, self.reloading = self.store.n_rows, True
        try:
            store, _, attributors = await asyncio.to_thread(self.load, not follow)
            self.lookup = store  # first: appends keep every old row, and shards may answer new rows next
            rows = [] if follow else [await shard.reload.remote() for shard in self.shards]
            self.store, self.attributors, self.measured = store, attributors, {}
            self.meta["rows"] = store.n_rows
        finally:
            self.reloading = False
        return {"rows": store.n_rows, "rows_before": before, "index_shards_rows": rows}

    def look_for_growth(self) -> None:
        """At most every `follow_s` seconds (on a request): has another replica's POST /reload grown the store? When
        the manifest says complete with more rows and every served index already holds them, this replica reloads
        too, in the background and writing nothing, so every replica follows one /reload."""
        from tdastore.index.faiss_index import load_index
        from tdastore.store.manifest import read_manifest

        now = time.monotonic()
        if self.reloading or now < self.next_look:
            return
        self.next_look = now + self.follow_s
        try:
            manifest = read_manifest(self.store.root)
            grown = manifest.get("status") == "complete" and manifest["n_rows"] > self.store.n_rows
            handles = [load_index(self.store, name, self.kind) for name in (self.index_names if self.kind else [])]
            ready = grown and all(h is not None and h.description["n_rows"] == manifest["n_rows"] for h in handles)
        except (OSError, ValueError, KeyError, TdaStoreError):  # a manifest or index.json being rewritten: next time
            return
        if ready:
            self.reloading = True
            self.following = asyncio.get_running_loop().create_task(self.reload(follow=True))  # kept: not collected

    def __serve_build_asgi_app__(self):
        return build_api(self)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def answer(self, jobs: list[Job]) -> list[Any]:
        """Requests that arrived together: one gradient pass and one search per method; a group that fails
        is answered request by request, so one request's error is its own."""
        self.look_for_growth()
        answers: list[Any] = [None] * len(jobs)
        groups: dict[tuple[str, str | None], list[int]] = {}
        for position, job in enumerate(jobs):
            groups.setdefault((job.method, job.measurement), []).append(position)
        for method, positions in groups.items():
            try:
                found = await self.answer_group(method, [jobs[p] for p in positions])
            except Exception:  # noqa: BLE001 - isolate the request that caused it
                found = []
                for p in positions:
                    try:
                        found += await self.answer_group(method, [jobs[p]])
                    except Exception as err:  # noqa: BLE001 - returned to its own request
                        found.append(err)
            for p, one in zip(positions, found):
                answers[p] = one
        return answers

    def attributor(self, method: str, measurement: str | None):
        """The method's attributor for a request's measurement: the served one, or one sharing its model, task
        and index with the test side's measurement changed (the store's rows do not depend on it)."""
        served = self.attributors[method]
        if measurement is None or measurement == served.measurement:
            return served
        if (method, measurement) not in self.measured:
            from tdastore.attribution import Attributor

            overrides = {**self.overrides, "attribution": {**self.overrides["attribution"], "measurement": measurement}}
            self.measured[method, measurement] = Attributor(
                self.store, method, overrides, kind=self.kind, share=served
            )  # fmt: skip
        return self.measured[method, measurement]

    async def answer_group(self, key: tuple[str, str | None], jobs: list[Job]) -> list[dict]:
        attributor = self.attributor(*key)
        inputs = [x for job in jobs for x in job.inputs]
        targets = None if jobs[0].targets is None else [t for job in jobs for t in job.targets]

        # computed on the replica's event loop, not in a thread: requests queue there meanwhile and the next batch
        # takes them all (a worker thread fought the loop for the GIL: batches of 3, batching gained 1.5x, not 3.45x)
        test = attributor.task.encode_request(inputs, targets)
        queries = attributor.queries(test)  # [m, k]
        ranked = {}
        for sign, k in ((1.0, max(j.top_k for j in jobs)), (-1.0, max(j.bottom_k for j in jobs))):
            if k > 0:
                ranked[sign] = await self.search(attributor, queries, k, sign)
        info = attributor.info
        out, first = [], 0
        for job in jobs:
            results = []
            for i in range(first, first + len(job.inputs)):
                results.append(
                    {
                        "top": self.hits(ranked, 1.0, i, job.top_k),
                        "bottom": self.hits(ranked, -1.0, i, job.bottom_k),
                    }
                )
            if job.tokens:
                self.add_tokens(attributor, test, range(first, first + len(job.inputs)), results)
            first += len(job.inputs)
            out.append({**{k: v for k, v in info.items() if k in QueryResponse.model_fields}, "results": results})
        return out

    async def search(self, attributor, queries: np.ndarray, k: int, sign: float):
        if not self.shards:
            return attributor.ranked_queries(queries, k, sign)
        from tdastore.index.faiss_index import merge_top_k

        scaled = attributor.index_queries(queries, sign)
        parts = await asyncio.gather(
            *[shard.search.remote(attributor.method.index_name, scaled, k) for shard in self.shards]
        )
        found, rows = merge_top_k(np.concatenate([p[0] for p in parts], 1), np.concatenate([p[1] for p in parts], 1), k)
        return attributor.index_scores(found, sign), rows

    def add_tokens(self, attributor, test, positions, results: list[dict]) -> None:
        """Each top hit's token shares (Attributor.token_scores_of), into the hits of `results`."""
        import pyarrow as pa

        positions = list(positions)
        part = test.take(np.asarray(positions))
        hits = [(i, rank, hit) for i, result in zip(range(len(positions)), results)
                for rank, hit in enumerate(result["top"], 1)]  # fmt: skip
        if not hits:
            return
        table = pa.table({
            "test_id": [int(part.ids[i]) for i, _, _ in hits], "rank": [rank for _, rank, _ in hits],
            "train_id": [h["train_id"] for _, _, h in hits], "train_row": [h["train_row"] for _, _, h in hits],
        })  # fmt: skip
        shares = attributor.token_scores_of(part, table).to_pydict()
        by_hit: dict = {}
        for j in range(len(shares["side"])):
            by_hit.setdefault((shares["test_id"][j], shares["rank"][j]), []).append(
                {k: shares[k][j] for k in ("side", "position", "token", "score")}
            )
        for i, rank, hit in hits:
            hit["tokens"] = by_hit.get((int(part.ids[i]), rank), [])

    def hits(self, ranked: dict, sign: float, i: int, k: int) -> list[dict]:
        if k == 0:
            return []
        scores, rows = ranked[sign]
        if rows[i, :k].max(initial=-1) >= self.lookup.n_rows:
            # index shards reloaded by another replica's POST /reload answer appended rows before this replica
            # follows: their ids and documents come from the grown store (appends keep every old row)
            from tdastore.store.gradient_store import open_store

            self.lookup, self.next_look = open_store(self.store_path), 0.0  # and follow at the next request
        hits = []
        texts = self.lookup.meta_values("text", rows[i, :k]) if self.texts else None  # the hits' row groups only
        for j, (score, row) in enumerate(zip(scores[i, :k].tolist(), rows[i, :k].tolist())):
            hit = {"train_id": int(self.lookup.train_ids[row]), "train_row": row, "score": score}
            if texts is not None:
                hit["train_text"] = str(texts[j])
            hits.append(hit)
        return hits


def build_api(service: QueryService) -> FastAPI:
    """The FastAPI app of one replica, with the store's request schema (so /docs documents it)."""
    meta = service.meta
    Query = request_model(meta)
    api = FastAPI(
        title="tdastore query service",
        version="1",
        description=(
            "Training rows that most raise (top_k) or lower (bottom_k) the loss of new test inputs, by a "
            f"training-data-attribution method, over a store of {meta['rows']} rows ({meta['kind']})."
        ),
    )
    api.router.route_class = GuardedRoute

    if service.token_sha256:

        @api.middleware("http")
        async def bearer_token(request: Request, call_next):
            """Every path but /health (the orchestrator's probe) needs `Authorization: Bearer TOKEN`."""
            if request.url.path.rstrip("/").endswith("/health"):
                return await call_next(request)
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            digest = hashlib.sha256(given.strip().encode()).hexdigest()
            if scheme.lower() != "bearer" or not hmac.compare_digest(digest, service.token_sha256):
                return JSONResponse(
                    {"error": "missing or wrong bearer token: send 'Authorization: Bearer TOKEN'"},
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
            return await call_next(request)

    @api.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        return JSONResponse(
            {
                "error": validation_message(errors),
                "detail": [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in errors],
            },
            status_code=422,
        )

    async def query(body: Query) -> QueryResponse:  # type: ignore[valid-type]
        job = Job(body.method, positional(body.inputs), body.targets, body.top_k, body.bottom_k,
                  getattr(body, "tokens", False), getattr(body, "measurement", None))  # fmt: skip
        answer = await service.answer(job)
        if isinstance(answer, TdaStoreError):
            return JSONResponse({"error": str(answer)}, status_code=400)
        if isinstance(answer, Exception):
            return JSONResponse({"error": f"the replica failed: {type(answer).__name__}: {answer}"}, status_code=500)
        return JSONResponse(answer)  # built by this code to the schema: not validated again per request

    api.add_api_route(
        "/query",
        query,
        methods=["POST"],
        response_model=QueryResponse,
        response_model_exclude_none=True,
        responses={400: {"description": "malformed body"}, 413: {"description": "body too large"}},
        summary="Top-k and bottom-k training rows per input",
    )

    @api.post("/reload", summary="Reopen the store after `tdastore build --append` (reads go on meanwhile)")
    async def reload() -> dict:
        return await service.reload()

    @api.get("/methods", summary="The methods this store answers, its inputs, and why other methods not")
    async def methods() -> dict:
        return meta

    @api.get("/health", summary="This replica is up: its process and memory")
    async def health() -> dict:
        import psutil

        return {"status": "ok", "pid": os.getpid(), "rss_mb": psutil.Process().memory_info().rss / 2**20}

    return api


def application(
    store_path: str,
    *,
    methods: list[str] | None = None,
    kind: str | None = "flat",
    replicas: int = 1,
    max_batch: int = 32,
    batch_wait_ms: float = 5.0,
    index_shards: int = 1,
    overrides: dict | None = None,
    read_only: bool = False,
    token_sha256: str | None = None,
    follow_s: float = 10.0,
):
    """The Serve application for a store (prepares operators and indexes here, once): `serve.run(...)` it.
    read_only: nothing is written into the store (operators and indexes it lacks are fitted in memory, by every
    replica); token_sha256: the SHA-256 (hex) of a bearer token every request but /health must carry; follow_s:
    how often (at most, on requests) a replica looks whether another one's POST /reload grew the store."""
    check_options(kind, replicas, max_batch, batch_wait_ms, index_shards)
    if read_only:
        overrides = {**(overrides or {}), "store": {**(overrides or {}).get("store", {}), "read_only": True}}
    served = served_methods(store_path, methods, kind, overrides)
    served = {**served, "token_sha256": token_sha256, "follow_s": follow_s}
    shards = [
        IndexShard.options(name=f"IndexShard{i}").bind(store_path, served["index_names"], kind, i, index_shards)
        for i in range(index_shards if index_shards > 1 else 0)
    ]
    # a replica queues requests itself (Serve's default of 5 leaves the rest to the router's backoff, which
    # collapses throughput under load) and takes in enough at once to fill a batch
    front = QueryService.options(num_replicas=replicas, max_ongoing_requests=max(64, 2 * max_batch))
    return front.bind(store_path, served, kind, overrides, max_batch, batch_wait_ms, shards)


def check_options(kind: str | None, replicas: int, max_batch: int, batch_wait_ms: float, index_shards: int) -> None:
    """`application`'s numbers, refused with the fix before anything is prepared or started."""
    if replicas < 1 or max_batch < 1 or index_shards < 1 or batch_wait_ms < 0:
        raise ConfigError(
            f"replicas ({replicas}), max_batch ({max_batch}) and index_shards ({index_shards}) must be >= 1 and "
            f"batch_wait_ms ({batch_wait_ms}) >= 0: at least one replica answers queries"
        )
    if index_shards > 1 and kind is None:
        raise ConfigError("index_shards > 1 splits a FAISS index: give an index kind (--kind flat)")


class ServiceArgs(BaseModel):
    """The arguments of a Serve config's application (deploy/kuberay/rayservice.yaml)."""

    model_config = ConfigDict(extra="forbid")
    store: str
    methods: list[str] | None = None
    kind: str | None = "flat"
    replicas: int = 1
    max_batch: int = 32
    batch_wait_ms: float = 5.0
    index_shards: int = 1
    read_only: bool = False  # never write into the store (operators, indexes it lacks: fitted in memory)
    token_file: str | None = None  # a file (e.g. a mounted Kubernetes secret) holding the bearer token
    follow_s: float = 10.0  # how often a replica looks whether another one's POST /reload grew the store


def app_builder(args: dict):
    """`import_path: tdastore.serve:app_builder` in a Serve config (RayService)."""
    given = ServiceArgs.model_validate(args)
    token = token_digest(given.token_file) if given.token_file else None
    return application(given.store, token_sha256=token, **given.model_dump(exclude={"store", "token_file"}))


def token_digest(path: str) -> str:
    """The SHA-256 (hex) of the bearer token in a file: only the digest travels to the replicas."""
    from pathlib import Path

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--token-file '{path}' does not exist: write the token into it (e.g. openssl rand -hex 32)")
    token = file.read_text().strip()
    if len(token) < 16 or any(c.isspace() for c in token):
        raise ConfigError(
            f"the token in '{path}' must be one word of at least 16 characters (e.g. openssl rand -hex 32)"
        )
    return hashlib.sha256(token.encode()).hexdigest()


def start(app, host: str = "127.0.0.1", port: int = 8000, name: str = "tdastore", blocking: bool = False) -> str:
    """Run an application on this Ray session's Serve, listening on host:port (loopback by default)."""
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=name, route_prefix="/", blocking=blocking)
    return f"http://{host}:{port}"


def start_within(app, host: str, port: int, timeout_s: float, name: str = "tdastore") -> str:
    """`start`, then wait until GET /health answers 200 through the proxy; a start-up that fails or takes longer
    than timeout_s is a ConfigError naming what was slow (Ray's own fixed waits are not the limit)."""
    import threading
    import time
    import urllib.request

    failure: list = []

    def deploy() -> None:
        try:
            start(app, host, port, name)
        except Exception as err:  # noqa: BLE001 - reported below as one line
            failure.append(err)

    began = time.monotonic()
    thread = threading.Thread(target=deploy, daemon=True, name="tdastore-serve-start")
    thread.start()
    probe = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/health"
    while time.monotonic() - began < timeout_s:
        if failure:
            lines = [line for line in str(failure[0]).splitlines() if line.strip()]
            raise ConfigError(
                f"the service did not start ({type(failure[0]).__name__}: {lines[-1] if lines else ''}); "
                "see the Ray Serve logs under /tmp/ray/session_latest/logs/serve"
            )
        if not thread.is_alive():
            try:
                with urllib.request.urlopen(probe, timeout=5) as answer:
                    if answer.status == 200:
                        return f"http://{host}:{port}"
            except OSError:
                pass
        time.sleep(0.5)
    stage = "a replica or the HTTP proxy" if not thread.is_alive() else "Serve's controller, proxy or a replica"
    raise ConfigError(
        f"the service was not ready within --startup-timeout {timeout_s:.0f} s ({stage} still starting): raise "
        "--startup-timeout on a loaded machine, or give the cluster more CPUs"
    )


def run_service(
    store_path: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    address: str | None = None,
    startup_timeout_s: float = 300.0,
    token_file: str | None = None,
    **options,
) -> None:
    """Run the service until interrupted (the CLI's `tdastore serve`); `options` are `application`'s. The store,
    the port and the token are checked before Ray starts, so a mistake costs no start-up time; "serving on" is
    printed once a request would be answered."""
    import signal
    import socket
    import time

    from tdastore.distributed.ray_session import ray_session
    from tdastore.store.gradient_store import open_store

    if startup_timeout_s <= 0:
        raise ConfigError(f"--startup-timeout must be positive seconds, got {startup_timeout_s}")
    token = token_digest(token_file) if token_file else None
    open_store(store_path)  # missing, incomplete or corrupt: a clear error now
    defaults = {n: p.default for n, p in inspect.signature(application).parameters.items() if p.kind == p.KEYWORD_ONLY}
    given = {**defaults, **options}
    check_options(given["kind"], given["replicas"], given["max_batch"], given["batch_wait_ms"], given["index_shards"])
    with socket.socket() as probe:
        # as the HTTP proxy binds: a port whose last service stopped a moment ago (its connections in
        # TIME_WAIT for a minute) is free to listen on again, not "already in use"
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise ConfigError(f"cannot listen on {host}:{port} ({err.strerror}): choose another --port") from err

    def stop(*_):  # SIGTERM (a pod being stopped) ends it like Ctrl-C
        raise KeyboardInterrupt

    with ray_session(address, num_cpus=2):
        app = application(store_path, token_sha256=token, **options)  # options: those of `application`
        signal.signal(signal.SIGTERM, stop)
        try:
            url = start_within(app, host, port, startup_timeout_s)
            print(
                f"serving {store_path} on {url} ({given['replicas']} replica(s)"
                f"{', bearer token required' if token else ''}{', read-only' if given['read_only'] else ''}); "
                "docs at /docs, Ctrl-C stops",
                flush=True,
            )
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("stopping the service")
        finally:
            stop_serve_within(SHUTDOWN_TIMEOUT_S)


SHUTDOWN_TIMEOUT_S = 30.0


def stop_serve_within(timeout_s: float) -> None:
    """Shut Serve down, waiting at most `timeout_s`: after a Ctrl-C in a terminal the local cluster's own
    processes (same process group) may be gone already, and `serve.shutdown` would then wait a minute for a
    GCS that is not coming back; the cluster is torn down next either way."""
    import threading

    def shutdown():
        with contextlib.suppress(Exception):
            serve.shutdown()

    worker = threading.Thread(target=shutdown, name="serve-shutdown", daemon=True)
    worker.start()
    worker.join(timeout_s)
