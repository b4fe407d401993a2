"""The two ways to differentiate a weighted run (weighted_run.py) with respect to its row weights at w = 1.

- reverse: one backward pass through the optimizer steps per (evaluation point, test point) adjoint, giving
           every row at once; the trajectory is checkpointed every c steps and recomputed per segment, so
           memory holds T / c + c states instead of T;
- forward: tangents d theta / d w_i pushed through the steps (forward-over-reverse), one per scored row,
           giving every evaluation point and test point at once with no trajectory stored.
"""

from __future__ import annotations

import torch
from torch.func import jvp, vjp, vmap

from tdastore.groundtruth.weighted_run import WeightedRun


def forward_mode(run: WeightedRun, seed: int) -> tuple[torch.Tensor, int]:
    """d g / d w [E, T, R] by tangents d theta / d w_i pushed through the steps (forward-over-reverse),
    one per scored row; also the most parameter states held at once (2)."""
    sched, batches = run.schedule, run.batches(seed)
    theta, m, v = run.start()
    r, p = len(run.rows), theta.numel()
    # d(theta, m, v) / d w_i, [R, p] each
    tangents = tuple(torch.zeros(r, p, dtype=theta.dtype, device=theta.device) for _ in range(3))
    out = torch.empty(len(sched.eval_steps), len(run.test), r, dtype=theta.dtype, device=theta.device)
    eval_at = {s: e for e, s in enumerate(sched.eval_steps)}
    for step, batch in enumerate(batches):
        g = run.batch_gradient(theta, batch)  # [p]
        d_g = run.hvp(theta, batch, tangents[0]) + run.weight_jacobian(theta, batch, g)  # [R, p]

        def push(d_theta, d_m, d_v, d_grad, primals=(theta, m, v, g), t=step + 1):
            return jvp(lambda th, mm, vv, gg: run.update(th, mm, vv, gg, t), primals, (d_theta, d_m, d_v, d_grad))

        primal, tangents = vmap(push, out_dims=(None, 0))(*tangents, d_g)
        theta, m, v = (x.detach() for x in primal)
        tangents = tuple(x.detach() for x in tangents)
        if step + 1 in eval_at:
            out[eval_at[step + 1]] = run.test_gradients(theta) @ tangents[0].T  # [T, p] x [p, R]
    return out, 2


def reverse_mode(run: WeightedRun, seed: int, checkpoint_every: int) -> tuple[torch.Tensor, int]:
    """d g / d w [E, T, R] by one adjoint per (evaluation point, test point) pulled back through the steps,
    the trajectory checkpointed every c steps and recomputed per segment; also the most states held at once."""
    sched, batches = run.schedule, run.batches(seed)
    c, peak = checkpoint_every, 0
    checkpoints = {0: run.start()}
    state = checkpoints[0]
    for step, batch in enumerate(batches):
        state = run.plain_step(state, batch, step + 1)
        if (step + 1) % c == 0:
            checkpoints[step + 1] = state
    n_eval, n_test, p = len(sched.eval_steps), len(run.test), run.theta0.numel()
    # adjoints for every (evaluation point, test point), injected when the reverse pass reaches T_e
    lam = torch.zeros(n_eval * n_test, 3, p, dtype=run.theta0.dtype, device=run.theta0.device)  # d/d(theta, m, v)
    dw = torch.zeros(n_eval * n_test, len(run.rows), dtype=run.theta0.dtype, device=run.theta0.device)
    eval_at = {s: e for e, s in enumerate(sched.eval_steps)}
    for seg_start in sorted(checkpoints, reverse=True):
        seg_stop = min(seg_start + c, sched.total_steps)
        if seg_start >= sched.total_steps:
            continue
        states = [checkpoints[seg_start]]
        for step in range(seg_start, seg_stop):  # the segment's states, and the state after its last step
            states.append(run.plain_step(states[-1], batches[step], step + 1))
        peak = max(peak, len(checkpoints) + len(states))
        for step in range(seg_stop - 1, seg_start - 1, -1):
            if step + 1 in eval_at:  # theta_{step+1} is this step's output: inject grad g there
                e = eval_at[step + 1]
                lam[e * n_test : (e + 1) * n_test, 0] += run.test_gradients(states[step + 1 - seg_start][0])
            lam, dw_step = _pull_back(run, states[step - seg_start], batches[step], step + 1, lam)
            dw += dw_step
    return dw.reshape(n_eval, n_test, len(run.rows)), peak


def _pull_back(run: WeightedRun, state, batch, t: int, lam: torch.Tensor):
    """Adjoints of (theta, m, v) after step t -> before it, [V, 3, p], and their weight gradients [V, R]."""
    theta, m, v = state
    g = run.batch_gradient(theta, batch)
    active = lam.abs().amax(dim=(1, 2)) > 0  # adjoints of later evaluation points only
    if not bool(active.any()):
        return lam, torch.zeros(lam.shape[0], len(run.rows), dtype=lam.dtype, device=lam.device)
    _, pullback = vjp(lambda th, mm, vv, gg: run.update(th, mm, vv, gg, t), theta, m, v, g)
    d_theta, d_m, d_v, mu = vmap(lambda cot: pullback((cot[0], cot[1], cot[2])))(lam[active])  # mu = d/d g
    d_theta = d_theta + run.hvp(theta, batch, mu)
    new = torch.zeros_like(lam)
    new[active] = torch.stack([d_theta, d_m, d_v], dim=1)
    dw = torch.zeros(lam.shape[0], len(run.rows), dtype=lam.dtype, device=lam.device)
    dw[active] = mu @ run.weight_jacobian(theta, batch, g).T  # [V, p] x [p, R]
    return new, dw
