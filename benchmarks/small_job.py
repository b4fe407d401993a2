"""The fixed costs of a small job: a 4-document build of a GPT-2-small shape (12 x 768, vocabulary 50,257:
124M parameters) through the whole CLI, next to its gradient pass alone (issue 21, item 8).

A side-by-side run against bergson found tdastore's gradient pass cheaper but its whole CLI twice as long on 4
documents: what a small job costs is what it does besides gradients. This measures, in one run on this machine:

- `tdastore build --config CFG` end to end in a fresh process (its wall time);
- its parts, in process: importing tdastore, Ray started and one worker up with tdastore imported, the driver's
  store identity (task, data, model load, fingerprint), a worker's model load, and the gradient pass of the 4
  documents (the only part that is the build's own work).

    python benchmarks/small_job.py [--work DIR] [--workers 1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from lm_scale import save_gpt2, text_config, write_corpus  # benchmarks/ is on the path when run as a script


def seconds(action) -> tuple[float, object]:
    began = time.perf_counter()
    value = action()
    return time.perf_counter() - began, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="small_job_"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir, corpus = work / "gpt2-small", work / "corpus.jsonl"
    if not (model_dir / "config.json").is_file():
        save_gpt2(model_dir, 50257, 12, 768, 12, 1024, 8000)
    write_corpus(corpus, 4, 12)
    config = text_config(
        model_dir, corpus, work / "store", build={"workers": args.workers}, task={"test_fraction": 0.25}
    )
    (work / "config.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(config_dict(config)))))

    # the whole CLI, in a fresh process, as a user runs it
    cli = [sys.executable, "-m", "tdastore", "build", "--config", str(work / "config.yaml"), "--quiet"]
    subprocess.run(["rm", "-rf", str(work / "store")], check=True)
    whole, _ = seconds(lambda: subprocess.run(cli, check=True, capture_output=True))

    # its parts, in this process
    imports = [sys.executable, "-c", "import tdastore, tdastore.distributed.build, transformers, ray"]
    import_s, _ = seconds(lambda: subprocess.run(imports, check=True))  # a fresh process's imports
    from tdastore.distributed.build import store_identity
    from tdastore.grads.computer import make_gradient_computer
    from tdastore.plan import measure_ray_start
    from tdastore.tasks import make_task
    from tdastore.training import load_model

    ray_s = measure_ray_start()
    identity_s, _ = seconds(lambda: store_identity(config, "train"))
    task = make_task(config.task, config.model)
    load_s, model = seconds(lambda: load_model(config, task))
    computer = make_gradient_computer(model, task.per_example_loss, config.gradients, config.projection)
    train = task.examples("train")
    gradient_s, _ = seconds(lambda: computer(train.inputs, train.targets))
    parameters = sum(p.numel() for p in model.parameters())
    parts = {
        "whole CLI (fresh process)": whole,
        "a fresh process: Python + tdastore, transformers, Ray imported": import_s,
        "Ray started + one worker up": ray_s,
        "driver: store identity (task, model load, fingerprint)": identity_s,
        "a worker: model load": load_s,
        f"gradient pass ({len(train)} documents)": gradient_s,
    }
    print(f"GPT-2 shape, {parameters / 1e6:.0f}M parameters, {len(train)} training documents, "
          f"{args.workers} worker(s)")  # fmt: skip
    for name, value in parts.items():
        print(f"  {name:<64}{value:>7.1f} s")
    accounted = import_s + ray_s + identity_s + load_s + gradient_s
    print(f"  {'the parts above, the CLI run once each':<64}{accounted:>7.1f} s")
    (work / "small_job.json").write_text(json.dumps({"parameters": parameters, "seconds": parts}, indent=1))


def config_dict(config) -> dict:
    from tdastore.config import config_to_dict

    return config_to_dict(config)


if __name__ == "__main__":
    main()
