"""The vectorised replica engine against replicas trained one at a time with torch.optim."""

import copy
import subprocess
import sys

import pytest
import torch

from tdastore.config import GroundTruthConfig, ModelConfig, TaskConfig
from tdastore.groundtruth.engine import ReplicaTrainer, Schedule
from tdastore.tasks import TabularTask


def reference_run(model, task, cfg: GroundTruthConfig, train, test, seed: int, left_out):
    """One replica, the plain way: torch.optim, a seeded permutation per epoch, g recorded per schedule.
    left_out: a row (-1: none) or a list of rows left out together (delete: removed from every permutation;
    subtract: the batch mean minus their summed loss / N)."""
    rows = [left_out] if isinstance(left_out, int) else list(left_out)
    dropped = torch.tensor([i for i in rows if i >= 0], dtype=torch.long)
    model = copy.deepcopy(model)
    opt_cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.optimizer]
    optimizer = opt_cls(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    schedule = Schedule.from_config(cfg, len(train))
    values, step = [], 0
    while step < schedule.total_steps:
        perm = torch.randperm(len(train), generator=generator)
        if cfg.coupling == "delete" and len(dropped):
            perm = perm[~torch.isin(perm, dropped)]
        for start in range(0, schedule.steps_per_epoch * cfg.batch_size, cfg.batch_size):
            if step >= schedule.total_steps:
                break
            batch = perm[start : start + cfg.batch_size]
            step += 1
            if len(batch) > 0:
                loss = task.per_example_loss(model(train.inputs[batch]), train.targets[batch]).mean()
                if cfg.coupling == "subtract" and len(dropped):
                    dropped_loss = task.per_example_loss(model(train.inputs[dropped]), train.targets[dropped])
                    loss = loss - dropped_loss.sum() / len(train)
                optimizer.zero_grad()
                loss.backward()
                if cfg.clip_norm:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
                optimizer.step()
            if step in schedule.eval_steps:
                with torch.no_grad():
                    values.append(task.test_function(model(test.inputs), test.targets))
    return torch.stack(values)  # [evals, n_test]


CASES = [
    dict(coupling="delete", optimizer="sgd", lr=0.05, batch_size=32, epochs=3, eval_every=1),
    dict(coupling="subtract", optimizer="sgd", lr=0.05, batch_size=32, epochs=2, eval_every=1, weight_decay=0.01),
    dict(
        coupling="delete", optimizer="adam", lr=0.003, batch_size=41, epochs=None, steps=17, eval_every=4, clip_norm=0.5
    ),
    dict(coupling="subtract", optimizer="adamw", lr=0.003, batch_size=50, epochs=2, eval_every=1, weight_decay=0.1),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['coupling']}-{c['optimizer']}")
@pytest.mark.parametrize("dataset", ["diabetes", "wine"])
def test_vectorised_replicas_equal_single_replicas(case, dataset):
    task = TabularTask(TaskConfig(dataset=dataset), ModelConfig(hidden=[16, 16]))
    model = task.make_model()
    train = task.examples("train").slice(0, 121)  # 121 = 3 x 40 + 1: delete mode's last batch is empty at B=40
    test = task.examples("test").slice(0, 7)
    cfg = GroundTruthConfig(**{**dict(left_out_count=None, left_out_indices=[0]), **case})
    trainer = ReplicaTrainer(model, task, cfg, train, test)
    seeds, left_out = [3, 11], [0, 57, 120]
    got = trainer.run(seeds, left_out)  # [evals, n_test, seeds, 1 + L]
    for si, seed in enumerate(seeds):
        for li, i in enumerate([-1, *left_out]):
            expected = reference_run(model, task, cfg, train, test, seed, i)
            torch.testing.assert_close(got[:, :, si, li], expected, rtol=1e-5, atol=1e-5)


def test_one_replica_at_a_time_equals_all_at_once():
    task = TabularTask(TaskConfig(dataset="diabetes"), ModelConfig(hidden=[8]))
    model, train, test = task.make_model(), task.examples("train"), task.examples("test").slice(0, 5)
    cfg = GroundTruthConfig(epochs=2, batch_size=64, lr=0.05)
    together = ReplicaTrainer(model, task, cfg, train, test).run([0, 1], [4, 9])
    alone = ReplicaTrainer(
        model, task, GroundTruthConfig(epochs=2, batch_size=64, lr=0.05, max_replicas=1), train, test
    ).run([0, 1], [4, 9])
    torch.testing.assert_close(together, alone, rtol=1e-6, atol=1e-6)


def test_delete_order_is_the_full_permutation_without_i():
    task = TabularTask(TaskConfig(dataset="diabetes"), ModelConfig(hidden=[8]))
    trainer = ReplicaTrainer(
        task.make_model(), task, GroundTruthConfig(), task.examples("train"), task.examples("test")
    )
    perm = torch.randperm(trainer.n, generator=torch.Generator().manual_seed(5))
    perms = perm.repeat(4, 1)
    order = trainer._visit_order(perms, torch.tensor([-1, int(perm[0]), int(perm[100]), int(perm[-1])]))
    assert torch.equal(order[0], perm)
    for row, position in zip(order[1:], (0, 100, trainer.n - 1)):
        assert torch.equal(row[:-1], torch.cat([perm[:position], perm[position + 1 :]])) and row[-1] == -1


@pytest.mark.parametrize("coupling", ["delete", "subtract"])
def test_replicas_leaving_sets_out_equal_single_replicas(coupling):
    """The linear datamodeling score's replicas: a set of rows left out at once (sets of different sizes)."""
    task = TabularTask(TaskConfig(dataset="diabetes"), ModelConfig(hidden=[8]))
    model, train, test = task.make_model(), task.examples("train").slice(0, 100), task.examples("test").slice(0, 4)
    cfg = GroundTruthConfig(coupling=coupling, lr=0.05, batch_size=32, epochs=3, eval_every=1)
    sets = [[0, 5, 99], [7], list(range(10, 60))]
    got = ReplicaTrainer(model, task, cfg, train, test).run([2], sets)  # [E, T, 1, 1 + 3]
    for index, rows in enumerate([[], *sets]):
        expected = reference_run(model, task, cfg, train, test, 2, rows)
        torch.testing.assert_close(got[:, :, 0, index], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", [CASES[0], CASES[3]], ids=["delete-sgd", "subtract-adamw"])
def test_compiled_engine_equals_the_eager_one(case):
    """groundtruth.compile: the replica step (gradients and the update rule) through torch.compile records the
    same test losses as the eager engine and as plain torch.optim one replica at a time."""
    task = TabularTask(TaskConfig(dataset="diabetes"), ModelConfig(hidden=[16, 16]))
    model, train, test = task.make_model(), task.examples("train").slice(0, 121), task.examples("test").slice(0, 7)
    cfg = GroundTruthConfig(**{**dict(left_out_count=None, left_out_indices=[0]), **case})
    eager = ReplicaTrainer(model, task, cfg, train, test).run([3], [0, 57])
    compiled = ReplicaTrainer(model, task, GroundTruthConfig(**{**cfg.__dict__, "compile": True}), train, test)
    got = compiled.run([3], [0, 57])
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[:, :, 0, 2], reference_run(model, task, cfg, train, test, 3, 57), rtol=1e-5,
                               atol=1e-5)  # fmt: skip


FAULTS = """
import resource, sys, torch
from tdastore.devices import keep_cpu_allocations
if sys.argv[1] == "keep":
    assert keep_cpu_allocations()
def faults_once(rows):  # minor page faults of allocating and writing a [rows, 256, 1024] float32 tensor again
    x = torch.ones(rows, 256, 1024)
    del x
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(rows, 256, 1024)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
def faults(rows):  # the least of 3: the kernel may fault a few pages by itself (NUMA hinting, page migration)
    return min(faults_once(rows) for _ in range(3))
faults_once(1)
print(faults(13) + faults(64) + faults(13))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_training_loops_reuse_freed_memory_on_the_cpu():
    """keep_cpu_allocations: a 13 or 64 MiB step tensor allocated again after a free touches the pages the last
    one left instead of page-faulting a fresh mapping (without it: one fault per 4 KiB page). The least of three
    tries per size: a CI run saw one 13 MiB tensor fault in full once (3,328 faults), which a fresh mapping
    does every time and a kernel's own page scan (NUMA balancing, compaction) does only now and then."""
    kept, default = (
        int(subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True).stdout)
        for mode in ("keep", "default")
    )
    assert kept < 100 and default > (13 + 64) * 256 // 2, (kept, default)


@pytest.mark.parametrize("case", CASES[2:], ids=lambda c: f"{c['coupling']}-{c['optimizer']}")
def test_frozen_parameters_stay_fixed_as_in_a_torch_optim_loop(case):
    """A model with frozen parameters (a PEFT model's base): the replicas further-train only what requires grad,
    as torch.optim does with the same model (clipping over the trained parameters only)."""
    task = TabularTask(TaskConfig(dataset="diabetes"), ModelConfig(hidden=[16, 16]))
    model = task.make_model()
    model[0].requires_grad_(False)
    train, test = task.examples("train").slice(0, 90), task.examples("test").slice(0, 5)
    cfg = GroundTruthConfig(**{**dict(left_out_count=None, left_out_indices=[0]), **case})
    got = ReplicaTrainer(model, task, cfg, train, test).run([5], [7])
    for li, i in enumerate([-1, 7]):
        torch.testing.assert_close(got[:, :, 0, li], reference_run(model, task, cfg, train, test, 5, i),
                                   rtol=1e-5, atol=1e-5)  # fmt: skip
    unfrozen = task.make_model()
    assert not torch.allclose(
        got[:, :, 0, 0], ReplicaTrainer(unfrozen, task, cfg, train, test).run([5], [7])[:, :, 0, 0]
    )
