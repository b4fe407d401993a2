"""The query service: answers equal tdastore.query; malformed requests get 4xx; 2,000 requests from 32 clients."""

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import small_config
from sklearn.datasets import load_diabetes

import tdastore
from tdastore.attribution import Attributor
from tdastore.distributed.build import build_store
from tdastore.serve import BackgroundServer, make_app, start_replicas


@pytest.fixture(scope="module")
def service(ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    config = small_config(tmp, projection={"kind": "gaussian", "dim": 64})
    tdastore.train(config, progress=False)
    store = build_store(config, tmp / "store", progress=False)
    actors, meta = start_replicas(str(store.root), replicas=2, kind="flat")
    server = BackgroundServer(make_app(actors, meta))
    yield server.url, store
    server.stop()


def post(url, body, raw=False):
    data = body if raw else json.dumps(body).encode()
    request = urllib.request.Request(url + "/query", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def raw_test_rows(store, count=5):
    task = Attributor(store, "grad_dot").task
    ids = task.examples("test").ids[:count]
    bunch = load_diabetes()
    return bunch.data[ids].tolist(), bunch.target[ids].tolist(), ids


def test_answers_equal_the_python_api(service):
    url, store = service
    inputs, targets, ids = raw_test_rows(store)
    for method in ("grad_dot", "if_gn", "grad_cos"):
        status, body = post(url, {"method": method, "inputs": inputs, "targets": targets, "top_k": 4})
        assert status == 200, body
        test = Attributor(store, method).task.examples("test").slice(0, 5)
        expected = tdastore.query(store, method, inputs=test, top_k=4, kind="flat")
        got_ids = [hit["train_id"] for result in body["results"] for hit in result["top"]]
        got_scores = [hit["score"] for result in body["results"] for hit in result["top"]]
        np.testing.assert_array_equal(got_ids, expected.column("train_id").to_numpy())
        np.testing.assert_allclose(got_scores, expected.column("score").to_numpy(), rtol=1e-4)


@pytest.mark.parametrize(
    "body, status, words",
    [
        (b"{not json", 400, "not valid JSON"),
        ([1, 2], 400, "JSON object"),
        ({"method": "influence", "inputs": [[0.0] * 10], "targets": [1.0]}, 400, "unknown method 'influence'"),
        ({"method": "if_h", "inputs": [[0.0] * 10], "targets": [1.0]}, 400, "unknown method 'if_h'"),
        ({"inputs": [[0.0] * 9], "targets": [1.0]}, 400, "inputs[0] must be a list of 10 numbers"),
        ({"inputs": [[0.0] * 10, "x"], "targets": [1.0, 2.0]}, 400, "inputs[1]"),
        ({"inputs": [[0.0] * 10], "targets": [1.0, 2.0]}, 400, "one value per input"),
        (json.dumps({"inputs": [[float("nan")] + [0.0] * 9], "targets": [1.0]}).encode(), 400, "not a finite number"),
        ({"inputs": [], "targets": []}, 400, "non-empty"),
        ({"inputs": [[0.0] * 10] * 300, "targets": [1.0] * 300}, 400, "at most 256"),
        ({"inputs": [[0.0] * 10], "targets": [1.0], "top_k": 0}, 400, "top_k"),
        ({"inputs": [[0.0] * 10], "targets": [1.0], "top_k": 10_000}, 400, "top_k"),
        ({"inputs": [[0.0] * 10], "targets": [1.0], "k": 3}, 400, "unknown field"),
        (b"[" * 100_000 + b"]" * 100_000, 400, "nests deeper"),
        (b'{"inputs": [[' + b"9" * 400 + b"]], " + b'"targets": [1.0]}', 400, "a number of 400 characters"),
        (b'{"inputs": [[' + b"9" * 5000 + b"]], " + b'"targets": [1.0]}', 400, "a number of 5000 characters"),
        (b'{"inputs": [[Infinity' + b", 0.0" * 9 + b']], "targets": [1.0]}', 400, "not a finite number"),
        ({"inputs": [[0.0] * 10], "targets": ["a"]}, 400, "finite numbers"),
        ({"inputs": [[True] + [0.0] * 9], "targets": [1.0]}, 400, "not a finite number"),
        ({"inputs": [[0.0] * 10], "targets": [1.0], "method": 3}, 400, "unknown method"),
        ({"inputs": [[0.0] * 10], "targets": [1.0], "top_k": "5"}, 400, "top_k"),
        ({"inputs": "0,1", "targets": [1.0]}, 400, "non-empty list"),
    ],
)
def test_malformed_requests_get_4xx(service, body, status, words):
    url, _ = service
    code, answer = post(url, body, raw=isinstance(body, bytes))
    assert code == status and words in answer["error"], answer


def test_oversize_body_is_413(service):
    url, _ = service
    code, answer = post(url, b'{"inputs": "' + b"x" * (3 * 2**20) + b'"}', raw=True)
    assert code == 413


def test_openapi_and_health(service):
    url, _ = service
    with urllib.request.urlopen(url + "/openapi.json") as response:
        spec = json.loads(response.read())
    assert spec["openapi"].startswith("3.") and "/query" in spec["paths"]
    assert (
        "if_gn"
        in spec["paths"]["/query"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"][
            "method"
        ]["enum"]
    )
    with urllib.request.urlopen(url + "/health") as response:
        assert json.loads(response.read())["status"] == "ok"


def test_load_2000_requests_from_32_clients(service):
    url, store = service
    inputs, targets, _ = raw_test_rows(store, 32)

    def one(i):
        began = time.perf_counter()
        code, body = post(
            url, {"method": "if_gn", "inputs": [inputs[i % 32]], "targets": [targets[i % 32]], "top_k": 5}
        )
        return code, time.perf_counter() - began

    began = time.perf_counter()
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(2000)))
    elapsed = time.perf_counter() - began
    assert [code for code, _ in results].count(200) == 2000
    assert elapsed < 300
