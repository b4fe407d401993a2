# %% [markdown]
# # A query service and its client
#
# `tdastore serve STORE` answers attribution queries over HTTP (Ray Serve + FastAPI): top-k and bottom-k
# training rows for new inputs, batched across concurrent requests, with a schema built for the store (its
# methods, feature names, classes). This example builds a small store, starts the service as you would in a
# terminal, and queries it with nothing but the standard library. The request and response fields:
# the HTTP API reference, or the service's own `/docs`.

# %%
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import tdastore

config = tdastore.load_config(
    {
        "task": {"dataset": "diabetes"},
        "model": {"hidden": [32, 32]},
        "train": {"lr": 0.01, "batch_size": 32, "epochs": 20, "output_dir": "runs/service/model"},
        "attribution": {"methods": ["grad_dot", "if_gn"]},
    }
)
tdastore.train(config, progress=False)
tdastore.build(config, "runs/service/store", progress=False)

# %% [markdown]
# Start the service (in a terminal: `tdastore serve runs/service/store --port 8765`). It prints "serving ...
# on URL" once it answers.

# %%
tdastore_cli = str(Path(sys.executable).with_name("tdastore"))
server = subprocess.Popen(
    [tdastore_cli, "serve", "runs/service/store", "--port", "8765", "--replicas", "1"],
    stdout=subprocess.PIPE,
    text=True,
    start_new_session=True,
    env={**os.environ, "RAY_ADDRESS": ""},  # its own local Ray cluster, as from a terminal
)
for line in server.stdout:
    if line.startswith("serving"):
        break
else:  # it ended without serving: its error is on stderr
    raise SystemExit(f"tdastore serve stopped (exit {server.wait()}) before it served")
URL = "http://127.0.0.1:8765"


def call(path: str, body: dict | None = None) -> dict:
    """GET (no body) or POST JSON; an error status comes back as its JSON body, with the status."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(URL + path, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:
        return {"status": err.code, **json.loads(err.read())}


# %% [markdown]
# What the store answers, then one query by feature name and a batch of two by position.

# %%
methods = call("/methods")
print("methods:", methods["methods"], "| features:", methods["features"])
features = methods["features"]
point = dict(zip(features, [0.04, 0.05, 0.06, 0.02, -0.04, -0.03, -0.04, 0.0, 0.02, -0.02]))
answer = call("/query", {"method": "if_gn", "inputs": [point], "targets": [151.0], "top_k": 3, "bottom_k": 2})
for side in ("top", "bottom"):
    print(side, [(hit["train_id"], round(hit["score"], 5)) for hit in answer["results"][0][side]])
batch = call("/query", {"method": "grad_dot", "inputs": [list(point.values()), [0.0] * 10], "targets": [151.0, 75.0]})
print("batch of 2:", [[hit["train_id"] for hit in result["top"][:3]] for result in batch["results"]])

# %% [markdown]
# A malformed request is a 422 that names the field.

# %%
bad = call("/query", {"method": "if_gn", "inputs": [[0.1, 0.2]], "targets": [1.0]})
print(bad["status"], bad["error"])

# %%
server.send_signal(signal.SIGINT)  # Ctrl-C in the terminal: the service stops, and its local Ray cluster
server.wait(timeout=120)
