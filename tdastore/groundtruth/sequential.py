"""Further training one replica at a time with torch.optim, for models too large to stack R copies of.

The same replicas as the vectorised engine (engine.py): each seed's permutations drawn on the host from the
same generator, the same couplings (delete: the left-out rows removed from the permutation, a replica whose
batch is empty skips the step; subtract: the batch mean loss minus sum_{i in S} L_i / N), the same schedule
and test values. The optimizer is torch.optim's own SGD / Adam / AdamW with torch.nn.utils.clip_grad_norm_, so
the engine's hand-written update rules are checked against the library (tests/test_groundtruth_text.py). Both
return g at every evaluation point in the same layout, so the pool writes the same Zarr arrays either way.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from tdastore.config import GroundTruthConfig
from tdastore.devices import keep_cpu_allocations, model_device
from tdastore.groundtruth.engine import ReplicaTrainer, Schedule
from tdastore.tasks.base import Examples, Task


def make_optimizer(cfg: GroundTruthConfig, params) -> torch.optim.Optimizer:
    """torch.optim's optimizer for the ground truth's settings (betas and eps as engine.py's)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    kind = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return kind(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)


class SequentialTrainer:
    """Trains replicas [(seed, left_out)] one at a time from the final model; `run` as ReplicaTrainer.run."""

    def __init__(self, model: nn.Module, task: Task, cfg: GroundTruthConfig, train: Examples, test: Examples):
        self.device = model_device(model)
        if self.device.type == "cpu":
            keep_cpu_allocations()  # each step's large tensors reuse the last step's memory (devices.py)
        self.model, self.task, self.cfg = model, task, cfg
        self.train, self.test = train, test.to(self.device)
        self.start = {n: t.detach().clone() for n, t in model.state_dict().items()}
        self.n = len(train)
        self.schedule = Schedule.from_config(cfg, self.n)

    def run(self, seeds: list[int], left_out: list) -> torch.Tensor:
        """g for every replica of seeds x (full run + left_out): [evals, n_test, len(seeds), 1 + len(left_out)]."""
        sets = [(i,) if isinstance(i, int) else tuple(int(j) for j in i) for i in left_out]
        dtype = next(iter(self.start.values())).dtype
        out = torch.empty(len(self.schedule.eval_steps), len(self.test), len(seeds), 1 + len(sets), dtype=dtype)
        for s_index, seed in enumerate(seeds):
            for r_index, rows in enumerate([(), *sets]):
                out[:, :, s_index, r_index] = self.replica(seed, rows).T.cpu()
        return out

    def replica(self, seed: int, left_out: tuple[int, ...]) -> torch.Tensor:
        """g(z) at every evaluation point of one replica: [n_test, evals]."""
        cfg, sched = self.cfg, self.schedule
        model = copy.deepcopy(self.model)
        model.load_state_dict(self.start)
        model.eval()  # as the engine's functional calls: no dropout, batch statistics frozen
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer(cfg, params)
        generator = torch.Generator().manual_seed(seed)
        removed = torch.zeros(self.n, dtype=torch.bool)
        removed[list(left_out)] = True
        subtracted = None  # subtract coupling: the left-out rows, as tensors once (not re-encoded every step)
        if cfg.coupling == "subtract" and left_out:
            subtracted = self.train.take(torch.tensor(left_out, dtype=torch.long)).to(self.device)
        values, order = [], None
        for step in range(sched.total_steps):
            within = step % sched.steps_per_epoch
            if within == 0:
                perm = torch.randperm(self.n, generator=generator)
                order = perm if cfg.coupling == "subtract" else perm[~removed[perm]]
            batch = order[within * cfg.batch_size : (within + 1) * cfg.batch_size]
            if len(batch):  # delete mode: a replica with no rows left this step skips it, as the engine's
                part = self.train.take(batch).to(self.device)
                loss = self.task.per_example_loss(model(part.inputs), part.targets).mean()
                if subtracted is not None:
                    loss = (
                        loss - self.task.per_example_loss(model(subtracted.inputs), subtracted.targets).sum() / self.n
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.clip_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm)
                optimizer.step()
            if step + 1 in sched.eval_steps:
                with torch.no_grad():
                    values.append(self.task.test_function(model(self.test.inputs), self.test.targets).detach())
        return torch.stack(values, dim=1)  # [n_test, evals]


VECTORISE_MAX_PARAMS = 10_000_000


def make_trainer(model: nn.Module, task: Task, cfg: GroundTruthConfig, train: Examples, test: Examples):
    """The replica trainer groundtruth.execution asks for. auto: vectorised for feature-vector models up to 10M
    parameters, where a step is small and stacking replicas removes per-step overhead (3.3x on the tabular MLP);
    for token sequences vectorised only with groundtruth.compile (1.4x the loop once compiled on the demo LM,
    0.93x eager: a step is already large products, and the loop itself runs at a third of the CPU's matrix-product
    rate), else one at a time (benchmarks/text_groundtruth.py)."""
    params = sum(p.numel() for p in model.parameters())
    tokens = getattr(train, "padded", False)
    large = params > VECTORISE_MAX_PARAMS or (tokens and not cfg.compile)
    sequential = cfg.execution == "sequential" or (cfg.execution == "auto" and large)
    return (SequentialTrainer if sequential else ReplicaTrainer)(model, task, cfg, train, test)
