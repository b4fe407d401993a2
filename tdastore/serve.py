"""`tdastore serve`: an HTTP JSON API over a store, its replicas Ray actors that hold the FAISS indexes.

POST /query   {"method": "if_gn", "inputs": [[...features...], ...], "targets": [...], "top_k": 10}
              text stores: {"inputs": ["a prompt", ...]} (+ "targets": labels for sequence classification)
              -> {"method", "path", "operator", "index", "results": [{"top": [{"train_id", "train_row", "score"}]}]}
GET  /methods, /health, /openapi.json

Requests are validated before they reach a replica (size limits, feature counts, method names, top-k),
and every problem is a 4xx with a message; a replica's own refusal (a TdaStoreError) is a 400 too.
Replicas are round-robin; each opens the model, the operator and the index of a method once.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading

import numpy as np
import ray
from aiohttp import web

from tdastore.errors import TdaStoreError
from tdastore.methods import METHODS

MAX_BATCH = 256  # test inputs per request
MAX_BODY = 2 * 2**20  # bytes
MAX_TOP_K = 1000


@ray.remote
class QueryReplica:
    """Holds one store's model, operators and FAISS indexes (one Attributor per method); answers batches of
    raw test inputs (feature rows, or texts for text stores)."""

    def __init__(self, store_path: str, kind: str | None, overrides: dict | None):
        from tdastore.attribution import Attributor
        from tdastore.store.gradient_store import open_store

        self.store = open_store(store_path)
        self.kind, self.overrides = kind, overrides or {}
        projected = {**self.overrides.get("attribution", {}), "path": "projected"}
        self.overrides = {**self.overrides, "attribution": projected}
        self.base = Attributor(self.store, "grad_dot", self.overrides)  # task and model, loaded once
        self.attributors: dict = {}

    def describe(self) -> dict:
        return {
            **self.base.task.describe_inputs(),
            "rows": self.store.n_rows,
            "methods": [m.name for m in METHODS.values() if m.projected is not None],
        }

    def query(self, method: str, inputs: list, targets: list | None, top_k: int) -> dict:
        from tdastore.attribution import Attributor

        if method not in self.attributors:
            self.attributors[method] = Attributor(self.store, method, self.overrides, kind=self.kind, share=self.base)
        attributor = self.attributors[method]
        table = attributor.top_k(attributor.task.encode_request(inputs, targets), top_k)
        columns = ["train_id", "train_row", "score"] + (["train_text"] if "train_text" in table.column_names else [])
        hits = table.select(columns).to_pylist()
        return {
            **{k: v for k, v in attributor.info.items()},
            "results": [{"top": hits[i * top_k : (i + 1) * top_k]} for i in range(len(inputs))],
        }


class RequestError(ValueError):
    """A malformed request: answered with 400 and this message."""


MAX_DEPTH = 8  # a /query body nests at most [ [ value ] ] inside an object
MAX_NUMBER_CHARS = 40  # longer numbers are not features of anything (and big-integer parsing is slow)


def parse_body(raw: bytes):
    """JSON with bounded nesting and number sizes, checked on the raw text before the parser recurses."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:  # brackets inside strings do not count
            if escaped:
                escaped = False
            elif byte == 0x5C:
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_DEPTH:
                raise RequestError(f'the body nests deeper than {MAX_DEPTH} levels: send {{"inputs": [[...]]}}')
        elif byte in (0x5D, 0x7D):
            depth -= 1

    def number(text: str):
        if len(text) > MAX_NUMBER_CHARS:
            raise RequestError(f"a number of {len(text)} characters: features are ordinary floats")
        return float(text) if any(c in text for c in ".eE") else int(text)

    def constant(name: str):
        raise RequestError(f"{name} is not a finite number")

    return json.loads(raw, parse_int=number, parse_float=number, parse_constant=constant)


def validate(body, meta: dict) -> tuple[str, list, list, int]:
    """Check a /query body against the store's task; returns (method, inputs, targets, top_k)."""
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object with method, inputs, targets and top_k")
    unknown = sorted(set(body) - {"method", "inputs", "targets", "top_k"})
    if unknown:
        raise RequestError(f"unknown field(s) {unknown}: allowed are method, inputs, targets, top_k")
    method = body.get("method", "grad_dot")
    if method not in meta["methods"]:
        raise RequestError(f"unknown method {method!r}: this service answers {meta['methods']}")
    inputs, targets = body.get("inputs"), body.get("targets")
    if not isinstance(inputs, list) or not inputs:
        raise RequestError("inputs must be a non-empty list of rows (one list of feature values per test input)")
    if len(inputs) > MAX_BATCH:
        raise RequestError(f"{len(inputs)} inputs in one request: at most {MAX_BATCH}")
    if meta.get("text"):
        _check_texts(inputs, targets, meta)
    else:
        _check_rows(inputs, targets, meta)
    top_k = body.get("top_k", 10)
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= min(MAX_TOP_K, meta["rows"]):
        raise RequestError(f"top_k must be an integer in 1..{min(MAX_TOP_K, meta['rows'])}")
    return method, inputs, targets, top_k


def _check_texts(inputs: list, targets, meta: dict) -> None:
    for i, text in enumerate(inputs):
        if not isinstance(text, str) or not text.strip():
            raise RequestError(f"inputs[{i}] must be a non-empty text (this store holds documents)")
    if meta["kind"] == "sequence_classification":
        if not isinstance(targets, list) or len(targets) != len(inputs):
            raise RequestError(f"targets must be a list with one label per input ({len(inputs)})")
        bad = [t for t in targets if t not in meta["classes"]]
        if bad:
            raise RequestError(f"targets {bad[:5]} are not classes of this task {meta['classes'][:20]}")
    elif targets is not None:
        raise RequestError("a causal LM scores the texts themselves: send no targets")


def _check_rows(inputs: list, targets, meta: dict) -> None:
    width = len(meta["features"])
    for i, row in enumerate(inputs):
        if not isinstance(row, list) or len(row) != width:
            raise RequestError(f"inputs[{i}] must be a list of {width} numbers (features {meta['features']})")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in row):
            raise RequestError(f"inputs[{i}] holds a value that is not a finite number")
    if not isinstance(targets, list) or len(targets) != len(inputs):
        raise RequestError(f"targets must be a list with one value per input ({len(inputs)})")
    if meta["kind"] == "classification":
        bad = [t for t in targets if t not in meta["classes"]]
        if bad:
            raise RequestError(f"targets {bad[:5]} are not classes of this task {meta['classes']}")
    elif not all(isinstance(t, (int, float)) and not isinstance(t, bool) and np.isfinite(t) for t in targets):
        raise RequestError("targets must be finite numbers (the regression target)")


def openapi(meta: dict) -> dict:
    if meta.get("text"):
        row = {"type": "string", "minLength": 1}
    else:
        row = {
            "type": "array",
            "items": {"type": "number"},
            "minItems": len(meta["features"]),
            "maxItems": len(meta["features"]),
        }
    hit = {
        "type": "object",
        "properties": {"train_id": {"type": "integer"}, "train_row": {"type": "integer"}, "score": {"type": "number"}},
    }
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "tdastore query service",
            "version": "1",
            "description": "Top-k training examples by attribution score for new test inputs.",
        },
        "paths": {
            "/query": {
                "post": {
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["inputs"] if meta["kind"] == "causal_lm" else ["inputs", "targets"],
                                    "additionalProperties": False,
                                    "properties": {
                                        "method": {"type": "string", "enum": meta["methods"], "default": "grad_dot"},
                                        "inputs": {"type": "array", "items": row, "minItems": 1, "maxItems": MAX_BATCH},
                                        "targets": {
                                            "type": "array",
                                            "items": {} if meta.get("classes") else {"type": "number"},
                                        },
                                        "top_k": {
                                            "type": "integer",
                                            "minimum": 1,
                                            "maximum": min(MAX_TOP_K, meta["rows"]),
                                            "default": 10,
                                        },
                                    },
                                }
                            }
                        },
                    },
                    "responses": {
                        "200": {
                            "description": "one top-k list per input",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "type": "object",
                                        "properties": {
                                            "results": {
                                                "type": "array",
                                                "items": {
                                                    "type": "object",
                                                    "properties": {"top": {"type": "array", "items": hit}},
                                                },
                                            }
                                        },
                                    }
                                }
                            },
                        },
                        "400": {"description": "malformed request, with a message"},
                        "413": {"description": "request body too large"},
                    },
                }
            },
            "/methods": {"get": {"responses": {"200": {"description": "the methods and the task's features"}}}},
            "/health": {"get": {"responses": {"200": {"description": "ok"}}}},
            "/openapi.json": {"get": {"responses": {"200": {"description": "this document"}}}},
        },
    }


def make_app(replicas: list, meta: dict) -> web.Application:
    turn = itertools.cycle(replicas)

    def error(status: int, message: str) -> web.Response:
        return web.json_response({"error": message}, status=status)

    async def query(request: web.Request) -> web.Response:
        try:
            body = parse_body(await request.read())
        except web.HTTPRequestEntityTooLarge:
            return error(413, f"request body above {MAX_BODY} bytes: send fewer inputs per request")
        except RequestError as err:
            return error(400, str(err))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return error(400, f"the body is not valid JSON ({err})")
        try:
            method, inputs, targets, top_k = validate(body, meta)
        except RequestError as err:
            return error(400, str(err))
        try:
            result = await next(turn).query.remote(method, inputs, targets, top_k)
        except ray.exceptions.RayTaskError as err:
            cause = getattr(err, "cause", None)
            if isinstance(cause, TdaStoreError):
                return error(400, str(cause))
            return error(500, f"the replica failed: {type(cause).__name__ if cause else err}")
        return web.json_response(result)

    async def methods(request):
        return web.json_response(meta)

    async def health(request):
        return web.json_response({"status": "ok", "replicas": len(replicas)})

    async def spec(request):
        return web.json_response(openapi(meta))

    app = web.Application(client_max_size=MAX_BODY)
    app.add_routes(
        [
            web.post("/query", query),
            web.get("/methods", methods),
            web.get("/health", health),
            web.get("/openapi.json", spec),
        ]
    )
    return app


def start_replicas(store_path: str, replicas: int = 1, kind: str | None = "flat", overrides=None) -> tuple[list, dict]:
    actors = [QueryReplica.options(num_cpus=0).remote(store_path, kind, overrides) for _ in range(replicas)]
    return actors, ray.get(actors[0].describe.remote())


class BackgroundServer:
    """The app on its own event loop in a thread (tests, benchmarks, notebooks)."""

    def __init__(self, app: web.Application, host: str = "127.0.0.1", port: int = 0):
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(app)
        ready = threading.Event()

        def run():
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.runner.setup())
            site = web.TCPSite(self.runner, host, port)
            self.loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        ready.wait(30)
        self.url = f"http://{host}:{self.port}"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


def serve(
    store_path: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    replicas: int = 1,
    kind: str = "flat",
    address: str | None = None,
) -> None:
    """Run the service until interrupted (the CLI's `tdastore serve`). The store and the port are checked
    before Ray starts, so a mistake costs no start-up time."""
    import socket

    from tdastore.distributed.ray_session import ray_session
    from tdastore.errors import ConfigError
    from tdastore.store.gradient_store import open_store

    open_store(store_path)  # missing, incomplete or corrupt: a clear error now
    if replicas < 1:
        raise ConfigError(f"--replicas {replicas}: at least one replica answers queries")
    listener = socket.socket()
    try:
        listener.bind((host, port))
    except OSError as err:
        raise ConfigError(f"cannot listen on {host}:{port} ({err.strerror}): choose another --port") from err
    with ray_session(address, num_cpus=2):
        actors, meta = start_replicas(store_path, replicas, kind)
        print(
            f"serving {store_path} on http://{host}:{port} ({replicas} replica(s), {kind} index); "
            f"OpenAPI at /openapi.json"
        )
        listener.listen()
        web.run_app(make_app(actors, meta), sock=listener, print=None)
