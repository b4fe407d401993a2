"""What `gradients.normalizer` costs the build, as a ratio measured in one run on this machine.

A randomly initialised GPT-2 (4 layers x 256, vocabulary 4,096) on documents of 128 tokens, `modules: auto`,
factored 16 x 16: build tokens/s with the adafactor normaliser divided by build tokens/s without it (the same
batches, best of 5, 2 threads); then the same for a dense gaussian projection (k = 1,024) of a diabetes MLP
with the adam normaliser. The target is >= 0.9 (two element-wise products per layer, or one per parameter).

    python benchmarks/normaliser_cost.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from lm_scale import save_gpt2, text_config, unit_normaliser, write_corpus  # noqa: E402
from reference import best_seconds  # noqa: E402


def ratio(plain, normalised, batches, repeats=5) -> tuple[float, float, float]:
    def run(computer):
        return lambda: [computer(b.inputs, b.targets) for b in batches]

    without, with_it = best_seconds(run(plain), repeats), best_seconds(run(normalised), repeats)
    return without / with_it, without, with_it


def main() -> None:
    import lm_scale

    from tdastore.config import GradientConfig, ModelConfig, ProjectionConfig, TaskConfig
    from tdastore.grads.computer import make_gradient_computer
    from tdastore.grads.normaliser import Normaliser
    from tdastore.tasks import TabularTask, make_task

    torch.set_num_threads(2)
    lm_scale.LENGTH = 128
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = save_gpt2(work / "gpt2", 4096, 4, 256, 4, 128, 2048)
        write_corpus(work / "docs.jsonl", 64, 12)
        config = text_config(model_dir, work / "docs.jsonl", work / "store", gradients={"batch_size": 8})
        task = make_task(config.task, config.model)
        model = task.make_model()
        plain = make_gradient_computer(model, task.per_example_loss, config.gradients, config.projection)
        normalised = make_gradient_computer(
            model, task.per_example_loss, config.gradients, config.projection, unit_normaliser(model, plain)
        )
        train = task.examples("train")
        batches = [train.slice(i * 8, (i + 1) * 8) for i in range(4)]
        found, without, with_it = ratio(plain, normalised, batches)
        print(f"GPT-2 4 x 256, 32 x 128 tokens, factored 16 x 16, adafactor: {found:.3f} ({without:.3f} s vs "
              f"{with_it:.3f} s)")  # fmt: skip

    task = TabularTask(TaskConfig(dataset="diabetes"), ModelConfig(hidden=[128, 128]))
    model = task.make_model()
    gaussian = ProjectionConfig(kind="gaussian", dim=1024)
    plain = make_gradient_computer(model, task.per_example_loss, GradientConfig(), gaussian)
    moments = {n: torch.ones(p.shape) for n, p in model.named_parameters()}
    normaliser = Normaliser("adam", moments, 1e-8, "benchmark").bind(model)
    normalised = make_gradient_computer(model, task.per_example_loss, GradientConfig(), gaussian, normaliser)
    train = task.examples("train")
    batches = [train.slice(i * 128, (i + 1) * 128) for i in range(2)]
    found, without, with_it = ratio(plain, normalised, batches)
    print(f"diabetes MLP 128-128, gaussian k = 1,024, adam: {found:.3f} ({without:.3f} s vs {with_it:.3f} s)")


if __name__ == "__main__":
    main()
