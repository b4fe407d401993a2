"""One pool kernel for every job run unit by unit on Ray: the store build (shards), the gold standard and the
metagradients (seed blocks x row or test blocks).

`workers` actors each hold what a unit needs (model, task, data) once and answer `run(unit)`; the kernel keeps
every actor busy, replaces an actor that died and retries its unit (up to `max_retries` times per unit), turns a
worker's own TdaStoreError into that error, and advances a progress bar. Units are idempotent (each writes its
own region and then its `.done` marker), so a job stopped for any reason resumes by rerunning it.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError, WorkerCrashedError
from tqdm import tqdm

import tdastore.errors as errors
from tdastore.devices import wants_gpu
from tdastore.errors import ConfigError, Interrupted, StoreError, TdaStoreError

POLL_S = 10.0  # a driver waiting on Ray checks at least this often that its cluster still has a live node
PROBE_S = 20.0  # a cluster whose control store (GCS) does not answer within this is gone (Ray itself waits 60 s)


class ClusterGoneError(StoreError):
    """The Ray cluster under a running job died: the job stops (and releases its lease) instead of waiting."""


def cluster_problem(probe_s: float = PROBE_S) -> str | None:
    """Why the connected Ray cluster cannot run anything (no live node, a control store that does not answer),
    or None. Asked in a thread so a dead GCS costs probe_s, never a hang."""
    answer: list = []

    def ask() -> None:
        try:
            answer.append([node for node in ray.nodes() if node.get("Alive")])
        except Exception as err:  # noqa: BLE001 - any failure to reach the GCS means the same thing here
            answer.append(err)

    thread = threading.Thread(target=ask, daemon=True, name="tdastore-cluster-probe")
    thread.start()
    thread.join(probe_s)
    if not answer:
        return f"its control store (GCS) did not answer for {probe_s:.0f} s"
    if isinstance(answer[0], Exception):
        return f"its control store (GCS) cannot be reached ({type(answer[0]).__name__})"
    return None if answer[0] else "no node of it is alive"


def check_cluster(what: str = "finished units are kept") -> None:
    problem = cluster_problem()
    if problem is not None:
        raise ClusterGoneError(f"the Ray cluster went away ({problem}): {what}; rerun the same command to resume")


def wait_alive(refs: list, num_returns: int = 1) -> tuple[list, list]:
    """ray.wait that checks the cluster every POLL_S while nothing is ready, so a job whose cluster died stops
    within POLL_S + PROBE_S (+ Ray's own ~15 s to declare a killed node dead) instead of waiting for ever."""
    while True:
        ready, rest = ray.wait(refs, num_returns=num_returns, timeout=POLL_S)
        if ready:
            return ready, rest
        check_cluster()


def get_alive(refs: list) -> list:
    """ray.get of every ref, checking the cluster while waiting (see wait_alive)."""
    waiting = list(refs)
    while waiting:
        _, waiting = wait_alive(waiting, num_returns=len(waiting))
    return ray.get(refs)


def run_pool(
    pending: Iterable,
    new_actor: Callable[[], Any],
    *,
    workers: int,
    max_retries: int,
    describe: Callable[[Any], str],
    desc: str,
    total: int,
    initial: int = 0,
    size: Callable[[Any], int] = lambda unit: 1,
    on_result: Callable[[Any, Any], None] | None = None,
    progress: bool = True,
    unit_name: str = "unit",
    call: Callable[[Any, Any], Any] = lambda actor, unit: actor.run.remote(unit),
    keep: list | None = None,
) -> list:
    """Run every pending unit on `workers` actors made by `new_actor()`; returns the units' results in the
    order they finished. describe(unit) names a unit in errors; size(unit) is its step on the progress bar;
    call(actor, unit) submits a unit (default `actor.run.remote(unit)`). keep: a list of live actors reused
    first and, after a run without errors, holding the pool's actors for the next run (not killed)."""
    pending = deque(pending)
    actors: list = [] if keep is None else keep
    finished = False

    def start() -> Any:
        actors.append(new_actor())
        return actors[-1]

    attempts: dict[int, int] = {}
    in_flight: dict = {}  # object ref -> (actor, unit)
    results = []
    bar = tqdm(total=total, initial=initial, desc=desc, unit=unit_name, disable=not progress)
    idle = actors[:workers] + [start() for _ in range(min(workers, len(pending)) - len(actors[:workers]))]
    try:
        while pending or in_flight:
            while idle and pending:
                actor, unit = idle.pop(), pending.popleft()
                in_flight[call(actor, unit)] = (actor, unit)
            ready, _ = wait_alive(list(in_flight))
            actor, unit = in_flight.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except (RayActorError, WorkerCrashedError) as err:
                if isinstance(err, RayActorError) and err.actor_init_failed:
                    raise startup_error(err, describe(unit)) from None
                check_cluster()  # a dead node: retry on another one; a dead cluster: stop, never wait
                attempts[id(unit)] = attempts.get(id(unit), 0) + 1
                if attempts[id(unit)] > max_retries:
                    unreachable = ": its node stopped answering" if "Unavailable" in type(err).__name__ else ""
                    raise StoreError(
                        f"{describe(unit)} failed {attempts[id(unit)]} time(s) because its worker died "
                        f"({type(err).__name__}{unreachable}); finished units are kept: rerun the same command "
                        "to resume"
                    ) from err
                pending.appendleft(unit)
                actors.remove(actor)
                idle.append(start())
                continue
            except RayTaskError as err:
                cause = getattr(err, "cause", None)
                if isinstance(cause, TdaStoreError):
                    raise cause from None
                if isinstance(cause, OSError):  # disk full, read-only or vanished storage
                    raise StoreError(
                        f"{describe(unit)} could not write its output ({cause.strerror or cause}"
                        f"{': ' + str(cause.filename) if cause.filename else ''}); finished units are kept: "
                        "make room or fix the storage and rerun the same command to resume"
                    ) from None
                raise
            results.append(result)
            idle.append(actor)
            if on_result is not None:
                on_result(unit, result)
            bar.update(size(unit))
        finished = True
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM through the CLI's handler: name where it stopped
        if isinstance(err, Interrupted):
            raise
        where = f"'{desc}' with {int(bar.n):,}/{total:,} {unit_name}s done"
        raise Interrupted(where, getattr(err, "exit_code", 130)) from None
    finally:
        bar.close()
        if keep is None or not finished:
            for actor in actors:  # also stops units still in flight after an error
                with contextlib.suppress(Exception):  # a dead cluster's actors are gone already
                    ray.kill(actor)
            actors.clear()
    return results


def device_options(device: str, num_cpus: float, gpus: float, cluster_gpus: float | None = None) -> dict:
    """Ray options of a worker: its CPUs, and GPUs (`gpus`, fractions share one: build.gpus_per_worker) when the
    device is CUDA, or auto on a cluster with GPUs, so Ray places one worker per GPU share. cluster_gpus: the
    cluster's GPU count (None: asked of the running Ray session)."""
    if cluster_gpus is None:
        cluster_gpus = ray.cluster_resources().get("GPU", 0.0)
    options = {"num_cpus": num_cpus, "max_restarts": 0}
    if device.startswith("cuda") and cluster_gpus <= 0:
        raise ConfigError(
            f"device '{device}' asks for GPU workers, but the Ray cluster has no GPUs: start it on GPU "
            "nodes (ray start --num-gpus N), or use device: cpu or auto"
        )
    if wants_gpu(device, cluster_gpus):
        options["num_gpus"] = gpus
    return options


def startup_error(err: RayActorError, what: str) -> TdaStoreError:
    """A worker that could not start (its constructor raised) is not retried: its own tdastore error, or a
    StoreError quoting the failure's last line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in reversed(lines):
        match = re.match(r"tdastore\.errors\.(\w+): (.*)", line)
        if match and isinstance(getattr(errors, match.group(1), None), type):
            return getattr(errors, match.group(1))(match.group(2))
    return StoreError(f"the worker for {what} could not start: {lines[-1] if lines else err}")
