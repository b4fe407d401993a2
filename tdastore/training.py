"""Train the final model theta_f (minibatch SGD) and save it with the config that made it."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from tdastore.atomic import temporary_name
from tdastore.config import Config, save_config
from tdastore.devices import resolve_device
from tdastore.errors import ConfigError, StoreError
from tdastore.tasks.base import Task, model_fingerprint

WEIGHTS_FILE = "model.safetensors"


def train(config: Config, progress: bool = True, task: Task | None = None, overwrite: bool = False) -> nn.Module:
    """Train the final model of `config` (on `task`, else the config's) and save it to train.output_dir;
    existing weights are replaced only with `overwrite` (stores and ground truths built from them would then
    refuse the new ones)."""
    from tdastore.tasks import resolve_task

    resolve_device(config.device)  # a device this machine lacks is refused before anything else
    path = Path(config.train.output_dir) / WEIGHTS_FILE
    if path.exists() and not overwrite:
        raise ConfigError(
            f"trained weights exist at '{path}': pass --overwrite (overwrite=True) to replace them (stores and "
            "ground truths built from them will then refuse the new weights), or choose another train.output_dir"
        )
    return train_final_model(config, resolve_task(config.task, config.model, task), progress=progress)


def train_final_model(config: Config, task: Task, progress: bool = True) -> nn.Module:
    """SGD over seeded shuffles; returns the trained model and writes it to train.output_dir."""
    if task.pretrained:
        raise ConfigError(
            f"the final model of a text task is model.name_or_path ({config.model.name_or_path}) itself: "
            "there is nothing to train here; fine-tune it with your trainer and point name_or_path at it"
        )
    cfg = config.train
    device = resolve_device(config.device)
    model = task.make_model().to(device)
    data = task.examples("train")
    inputs, targets = data.inputs.to(device), data.targets.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    history = []
    for _ in tqdm(range(cfg.epochs), desc="train", unit="epoch", disable=not progress):
        order = torch.randperm(len(data), generator=generator)
        total = 0.0
        for start in range(0, len(data), cfg.batch_size):
            batch = order[start : start + cfg.batch_size]
            losses = task.per_example_loss(model(inputs[batch]), targets[batch])  # [b]
            optimizer.zero_grad(set_to_none=True)
            losses.mean().backward()
            optimizer.step()
            total += float(losses.detach().sum())
        history.append(total / len(data))
    model = model.cpu()  # weights are saved, evaluated and returned on the CPU
    save_model(model, config, Path(cfg.output_dir), {"train_loss": history, "test_loss": evaluate_loss(model, task)})
    return model


@torch.no_grad()
def evaluate_loss(model: nn.Module, task: Task, split: str = "test") -> float:
    data = task.examples(split)
    return float(task.per_example_loss(model(data.inputs), data.targets).mean())


def save_model(model: nn.Module, config: Config, out_dir: Path, log: dict | None = None) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / WEIGHTS_FILE
    tmp = temporary_name(path)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(path)
    save_config(config, out_dir / "config.yaml")
    summary = {"model_fingerprint": model_fingerprint(model), **(log or {})}
    (out_dir / "train_log.json").write_text(json.dumps(summary))
    return path


def load_model(config: Config, task: Task) -> nn.Module:
    """The final model: the task's architecture with the weights of train.output_dir (text tasks: the
    pretrained model itself)."""
    if task.pretrained:
        return task.make_model().eval()
    path = Path(config.train.output_dir) / WEIGHTS_FILE
    if not path.is_file():
        raise StoreError(
            f"no trained weights at '{path}': run `tdastore train --config CFG` first "
            f"(or point train.output_dir at the directory holding {WEIGHTS_FILE})"
        )
    model = task.make_model()
    try:
        state = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for truncated or foreign files
        raise StoreError(
            f"the weights file '{path}' cannot be read ({err}): it is truncated or not a safetensors file; "
            "retrain with `tdastore train --config CFG --overwrite`"
        ) from err
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise StoreError(f"weights at '{path}' do not fit the task's model ({err}); retrain with this config") from err
    model.eval()
    return model
