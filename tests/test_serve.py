"""The Ray Serve query service: answers equal the façade's (top-k and bottom-k, by position or by name, one
replica or scatter-gather over index shards); malformed requests get a 4xx with a message; a schema fuzz finds
no 5xx; 2,000 mixed requests from 32 clients."""

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import small_config
from helpers import assert_same_top_k, ranked_atol, served_table
from sklearn.datasets import load_diabetes

import tdastore
from tdastore.attribution import Attributor
from tdastore.distributed.build import build_store


def deploy(serve_url, app, name: str) -> str:
    from ray import serve

    serve.run(app, name=name, route_prefix=f"/{name}")
    return f"{serve_url}/{name}"


@pytest.fixture(scope="module")
def service(serve_url, tmp_path_factory):
    from tdastore.serve import application

    tmp = tmp_path_factory.mktemp("serve")
    config = small_config(tmp, projection={"kind": "gaussian", "dim": 64}, index={"shard_rows": 128})
    tdastore.train(config, progress=False)
    store = build_store(config, tmp / "store", progress=False)
    methods = ["grad_dot", "grad_cos", "if_gn", "kfac"]  # kfac needs a factored store: not answerable here
    url = deploy(serve_url, application(str(store.root), methods=methods, replicas=2, max_batch=16), "tab")
    yield url, store


def post(url, body, raw=False, path="/query"):
    data = body if raw else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def get(url, path):
    with urllib.request.urlopen(url + path, timeout=60) as response:
        body = response.read()
        return json.loads(body) if response.headers.get_content_type() == "application/json" else body.decode()


def raw_test_rows(store, count=5):
    task = Attributor(store, "grad_dot").task
    ids = task.examples("test").ids[:count]
    bunch = load_diabetes()
    return bunch.data[ids].tolist(), bunch.target[ids].tolist(), ids


def assert_same_answers(body, store, method, top_k, bottom_k, count):
    test = Attributor(store, method).task.examples("test").slice(0, count)
    for key, k, ranked in (("top", top_k, "top_k"), ("bottom", bottom_k, "bottom_k")):
        expected = getattr(Attributor(store, method, kind="flat"), ranked)(test, k)
        hits = [hit for result in body["results"] for hit in result[key]]
        assert_same_top_k(served_table(expected, hits), expected, ranked_atol(expected, store.dim))  # its threads
        ids = store.meta.column("example_id").to_numpy()
        assert [h["train_id"] for h in hits] == ids[[h["train_row"] for h in hits]].tolist()


def test_answers_equal_the_python_api(service):
    url, store = service
    inputs, targets, _ = raw_test_rows(store)
    features = get(url, "/methods")["features"]
    named = [dict(zip(features, row)) for row in inputs]
    for method in ("grad_dot", "if_gn", "grad_cos"):
        body = {"method": method, "inputs": inputs, "targets": targets, "top_k": 4, "bottom_k": 3}
        status, answer = post(url, body)
        assert status == 200, answer
        assert answer["method"] == method and answer["index"] == "flat"
        assert_same_answers(answer, store, method, 4, 3, 5)
        status, by_name = post(url, {**body, "inputs": named[::-1], "targets": targets[::-1]})
        assert status == 200
        for one, other in zip(by_name["results"], answer["results"][::-1]):
            for key in ("top", "bottom"):
                assert [h["train_id"] for h in one[key]] == [h["train_id"] for h in other[key]]
                np.testing.assert_allclose([h["score"] for h in one[key]], [h["score"] for h in other[key]], 1e-5)
                assert all("train_text" not in h for h in one[key])  # tabular stores hold no text


def test_index_shards_scatter_gather_equal_one_index(service, serve_url):
    from tdastore.index.faiss_index import load_index
    from tdastore.serve import application

    url, store = service
    assert len(load_index(store, "if_gn", "flat").shards) == 3  # 353 rows in shards of 128
    sharded = deploy(serve_url, application(str(store.root), methods=["if_gn"], index_shards=2), "sharded")
    inputs, targets, _ = raw_test_rows(store)
    body = {"method": "if_gn", "inputs": inputs, "targets": targets, "top_k": 6, "bottom_k": 2}
    status, answer = post(sharded, body)
    assert status == 200, answer
    assert_same_answers(answer, store, "if_gn", 6, 2, 5)
    from ray import serve

    serve.delete("sharded")


def test_methods_lists_only_what_this_store_answers(service):
    url, _ = service
    meta = get(url, "/methods")
    assert meta["methods"] == ["grad_dot", "grad_cos", "if_gn"]
    assert "kfac" in meta["unavailable"] and meta["unavailable"]["kfac"]  # with the reason
    inputs, targets, _ = raw_test_rows(store=service[1], count=1)
    for method in meta["methods"]:
        assert post(url, {"method": method, "inputs": inputs, "targets": targets})[0] == 200
    code, answer = post(url, {"method": "kfac", "inputs": inputs, "targets": targets})
    assert code == 422 and "method" in answer["error"]


ROW = [0.0] * 10


@pytest.mark.parametrize(
    "body, status, words",
    [
        (b"{not json", 422, "JSON"),
        ([1, 2], 422, "body"),
        ({"method": "influence", "inputs": [ROW], "targets": [1.0]}, 422, "method"),
        ({"method": "if_h", "inputs": [ROW], "targets": [1.0]}, 422, "method"),
        ({"inputs": [[0.0] * 9], "targets": [1.0]}, 422, "inputs.0"),
        ({"inputs": [ROW, "x"], "targets": [1.0, 2.0]}, 422, "inputs.1"),
        ({"inputs": [{"age": 1.0}], "targets": [1.0]}, 422, "inputs.0"),
        ({"inputs": [{**{f"s{i}": 0.0 for i in range(1, 7)}, "age": 0, "sex": 0, "bmi": 0, "bp": 0, "x": 1}]}, 422, ""),
        ({"inputs": [ROW], "targets": [1.0, 2.0]}, 422, "one value per input"),
        ({"inputs": [ROW]}, 422, "targets"),
        (json.dumps({"inputs": [[float("nan")] + ROW[1:]], "targets": [1.0]}).encode(), 422, "inputs.0"),
        ({"inputs": [], "targets": []}, 422, "inputs"),
        ({"inputs": [ROW] * 300, "targets": [1.0] * 300}, 422, "inputs"),
        ({"inputs": [ROW], "targets": [1.0], "top_k": 0}, 422, "top_k >= 1 or bottom_k >= 1"),
        ({"inputs": [ROW], "targets": [1.0], "top_k": 10_000}, 422, "top_k"),
        ({"inputs": [ROW], "targets": [1.0], "bottom_k": -1}, 422, "bottom_k"),
        ({"inputs": [ROW], "targets": [1.0], "k": 3}, 422, "k: Extra inputs"),
        (b"[" * 100_000 + b"]" * 100_000, 400, "nests deeper"),
        (b'{"inputs": [[' + b"9" * 400 + b"]], " + b'"targets": [1.0]}', 400, "a number of more than"),
        (b'{"inputs": [[' + b"9" * 5000 + b"]], " + b'"targets": [1.0]}', 400, "a number of more than"),
        (b'{"inputs": [["' + b"9" * 500 + b'"]], "targets": [1.0]}', 422, "inputs.0"),
        (b'{"inputs": [[Infinity' + b", 0.0" * 9 + b']], "targets": [1.0]}', 422, "inputs.0"),
        ({"inputs": [ROW], "targets": ["a"]}, 422, "targets.0"),
        ({"inputs": [[True] + ROW[1:]], "targets": [1.0]}, 422, "inputs.0"),
        ({"inputs": [ROW], "targets": [1.0], "method": 3}, 422, "method"),
        ({"inputs": [ROW], "targets": [1.0], "top_k": "5"}, 422, "top_k"),
        ({"inputs": "0,1", "targets": [1.0]}, 422, "inputs"),
        (b'{"inputs": "' + b"x" * (3 * 2**20) + b'"}', 413, "bytes"),
    ],
)
def test_malformed_requests_get_4xx(service, body, status, words):
    url, _ = service
    code, answer = post(url, body, raw=isinstance(body, bytes))
    assert code == status and words in answer["error"], answer


def test_docs_and_schema(service):
    url, _ = service
    spec = get(url, "/openapi.json")
    schema = spec["paths"]["/query"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    request = spec["components"]["schemas"][schema["$ref"].split("/")[-1]]
    assert request["properties"]["method"]["enum"] == ["grad_dot", "grad_cos", "if_gn"]
    assert "bottom_k" in request["properties"] and request["additionalProperties"] is False
    assert "swagger" in get(url, "/docs").lower()
    assert get(url, "/health")["status"] == "ok"


def test_schema_fuzz_finds_no_server_error(service):
    """schemathesis generates bodies from /openapi.json, valid and invalid: no answer is a 5xx."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    url, _ = service
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    operation = schema["/query"]["POST"]
    for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):

        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy(generation_mode=mode))
        def fuzz(case):
            response = case.call(base_url=url)
            assert response.status_code < 500, (case.body, response.text)

        fuzz()


def test_load_2000_mixed_requests_from_32_clients(service):
    """Good requests all answer 200; every malformed one a 4xx with a message; replica memory stays bounded."""
    url, store = service
    inputs, targets, _ = raw_test_rows(store, 32)
    bad = [
        {"inputs": [inputs[0][:5]], "targets": [1.0]},
        {"method": "nope", "inputs": [inputs[0]], "targets": [1.0]},
        {"inputs": [inputs[0]], "targets": [1.0], "top_k": -2},
        b"{truncated",
    ]

    def rss() -> dict:
        seen = {}
        for _ in range(20):  # both replicas answer /health in turn
            health = get(url, "/health")
            seen[health["pid"]] = health["rss_mb"]
        return seen

    def one(i):
        if i % 4 == 3:
            body = bad[(i // 4) % len(bad)]
            code, answer = post(url, body, raw=isinstance(body, bytes))
            return "bad", code, answer
        method = ("grad_dot", "if_gn", "grad_cos")[i % 3]
        code, answer = post(url, {"method": method, "inputs": [inputs[i % 32]], "targets": [targets[i % 32]]})
        return "good", code, answer

    for i in range(64):  # warm: every replica has read its indexes
        one(i)
    before = rss()
    began = time.perf_counter()
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(2000)))
    elapsed = time.perf_counter() - began
    after = rss()
    good = [code for kind, code, _ in results if kind == "good"]
    bad_answers = [(code, answer) for kind, code, answer in results if kind == "bad"]
    assert good.count(200) == len(good) == 1500
    assert all(400 <= code < 500 and answer["error"] for code, answer in bad_answers)
    growth = max(after.get(pid, 0) - before.get(pid, 0) for pid in after)
    print(f"2000 requests in {elapsed:.1f} s; replica RSS growth {growth:.1f} MiB ({before} -> {after})")
    assert growth < 150


def test_read_only_service_with_a_token(serve_url, tmp_path):
    """--read-only: the store's bytes stay as they were though nothing was fitted beforehand (operators and
    indexes in memory); --token-file: every path but /health needs the bearer token, and the answers are the
    Python API's."""
    import hashlib

    from ray import serve
    from test_build import tree_digest

    from tdastore.serve import application

    config = small_config(tmp_path, projection={"kind": "gaussian", "dim": 32})
    tdastore.train(config, progress=False)
    store = build_store(config, tmp_path / "store", progress=False)
    before = tree_digest(store.root)
    token = "s3cret-token-0123456789"
    app = application(
        str(store.root),
        methods=["grad_dot", "if_gn"],
        read_only=True,
        token_sha256=hashlib.sha256(token.encode()).hexdigest(),
    )
    url = deploy(serve_url, app, "locked")
    try:
        inputs, targets, _ = raw_test_rows(store, 3)
        body = {"method": "if_gn", "inputs": inputs, "targets": targets, "top_k": 4, "bottom_k": 2}
        assert post(url, body)[0] == 401
        for wrong in ("Bearer nope", f"Basic {token}", token):
            request = urllib.request.Request(
                url + "/query", json.dumps(body).encode(), {"Content-Type": "application/json", "Authorization": wrong}
            )
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=60)
            assert refused.value.code == 401
        with pytest.raises(urllib.error.HTTPError):
            get(url, "/docs")
        assert get(url, "/health")["status"] == "ok"  # the orchestrator's probe needs no token
        request = urllib.request.Request(
            url + "/query",
            json.dumps(body).encode(),
            {"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())
        assert tree_digest(store.root) == before  # nothing written: not the operator, not the index
        assert_same_answers(answer, store, "if_gn", 4, 2, 3)
    finally:
        serve.delete("locked")


def test_start_up_is_bounded_by_our_own_timeout(monkeypatch):
    import tdastore.serve as service_module
    from tdastore.errors import ConfigError

    monkeypatch.setattr(service_module, "start", lambda *args: time.sleep(30))
    began = time.monotonic()
    with pytest.raises(ConfigError, match="not ready within --startup-timeout 2 s"):
        service_module.start_within(None, "127.0.0.1", 1, timeout_s=2)
    assert time.monotonic() - began < 5

    def proxy_too_slow(*args):
        raise TimeoutError("Traceback ...\nProxy actor did not become ready within 60 s")

    monkeypatch.setattr(service_module, "start", proxy_too_slow)
    with pytest.raises(ConfigError, match="did not start .TimeoutError: Proxy actor did not become ready"):
        service_module.start_within(None, "127.0.0.1", 1, timeout_s=10)


def test_reload_picks_up_an_appended_store(service, serve_url, tmp_path):
    """Rows appended to a served store (2 replicas, scatter-gather over 2 index shards) are answered after one POST
    /reload by every replica (the other follows), equal to the Python API over the grown store; requests answered
    meanwhile come from the old rows."""
    import shutil

    import pyarrow as pa
    import pyarrow.csv as pacsv
    from ray import serve

    from tdastore.serve import application

    _, served = service
    root = tmp_path / "store"
    shutil.copytree(served.root, root)
    app = application(str(root), methods=["grad_cos"], index_shards=2, replicas=2, follow_s=0.5)
    url = deploy(serve_url, app, "grows")
    inputs, targets, ids = raw_test_rows(served, 3)
    body = {"method": "grad_cos", "inputs": inputs, "targets": targets, "top_k": 3, "bottom_k": 1}
    assert post(url, body)[0] == 200
    task = Attributor(served, "grad_cos").task
    columns = {name: [row[i] for row in inputs] for i, name in enumerate(task.columns)}
    pacsv.write_csv(pa.table({**columns, "target": targets, "id": [9000, 9001, 9002]}), tmp_path / "new.csv")
    config = tdastore.open_store(root).manifest["config"]
    tdastore.build(tdastore.load_config(config, {"task": {"dataset": str(tmp_path / "new.csv")}}), root,
                   append=True, progress=False)  # fmt: skip
    status, stale = post(url, body)
    assert status == 200 and all(h["train_row"] < served.n_rows for r in stale["results"] for h in r["top"])
    status, reloaded = post(url, {}, path="/reload")  # one replica grows the index and reloads the shards
    assert status == 200 and reloaded["rows"] == served.n_rows + 3
    grown, deadline, fresh = tdastore.open_store(root), time.monotonic() + 60, 0
    while fresh < 8:  # the other replica follows within follow_s of a request
        assert time.monotonic() < deadline, "a replica did not follow the reload"
        status, answer = post(url, body)
        assert status == 200, answer
        fresh = fresh + 1 if any(h["train_id"] >= 9000 for r in answer["results"] for h in r["top"]) else 0
        time.sleep(0.1)
    assert_same_answers(answer, grown, "grad_cos", 3, 1, 3)  # copies of the test inputs: cosine 1, on top
    assert {get(url, "/methods")["rows"] for _ in range(6)} == {served.n_rows + 3}
    serve.delete("grows")


def test_port_check_refuses_a_listener_not_a_port_just_freed(service, monkeypatch):
    """`tdastore serve` refuses a port another process listens on, but not one whose last service stopped a
    moment ago (its closed connections in TIME_WAIT): a restart on the same port must not wait a minute."""
    import socket

    import tdastore.distributed.ray_session as sessions
    from tdastore.errors import ConfigError
    from tdastore.serve import run_service

    class PortAccepted(Exception):
        pass

    def no_ray(*args, **kwargs):
        raise PortAccepted

    monkeypatch.setattr(sessions, "ray_session", no_ray)
    store = str(service[1].root)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
            run_service(store, port=port)
        with socket.create_connection(("127.0.0.1", port)) as client:
            accepted, _ = listener.accept()
            accepted.close()  # the server side closes first: its end waits in TIME_WAIT
            client.recv(1)
    with pytest.raises(PortAccepted):
        run_service(store, port=port)
