"""Text-model throughput (issue 5), as ratios measured in one run on this machine.

Model: GPT-2 with 4 layers, width 256, 4 heads, vocabulary 4096 (tokenizer trained here on Python's
docstrings), documents of 128 tokens in batches of 16, fp32 on CPU, one thread per measurement.
1. build tokens/s (hooks + factored 16 x 16 projection of every Conv1D layer, no weight gradients)
   divided by a plain training step's tokens/s (forward + backward of the summed loss) on the same batches,
   with gradients.full_norms false (the default of configs/tiny_gpt2.yaml) and true (also the exact norm of
   every full per-example gradient, B T^2 (d_in + d_out) more work); then a whole Ray build (2 workers).
2. querying 100 new prompts against a 2,000-document store (warm: model, operator and store open) divided
   by the prompts' forward + backward alone, for grad_dot and ekfac.
3. peak memory of the build at 1,000 vs 10,000 documents (worker RSS, driver RSS).

    python benchmarks/text_throughput.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from reference import best_seconds

BATCH, LENGTH = 16, 128


def write_corpus(path: Path, n_docs: int, seed: int = 0) -> None:
    """n distinct documents of at least ~128 tokens: shuffled sentences of the standard library's docstrings."""
    from tdastore.demo_text import stdlib_documents

    sentences = [s.strip() + "." for doc in stdlib_documents() for s in doc.split(". ") if len(s) > 20]
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n_docs):
            f.write(json.dumps({"id": i, "text": " ".join(rng.sample(sentences, 12))}) + "\n")


def make_model(work: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    from tdastore.demo_text import stdlib_documents, train_tokenizer

    tokenizer = train_tokenizer(stdlib_documents(), 4096)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=4096,
            n_positions=256,
            n_embd=256,
            n_layer=4,
            n_head=4,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.eos_token_id,
        )
    )
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    return work / "model"


def config_for(work: Path, corpus: Path, name: str, full_norms: bool = False):
    from tdastore.config import load_config

    return load_config(
        {
            "task": {
                "dataset": str(corpus),
                "kind": "causal_lm",
                "max_length": LENGTH,
                "id_column": "id",
                "test_fraction": 0.01,
            },
            "model": {"name_or_path": str(work / "model")},
            "gradients": {"modules": ["*.c_attn", "*.c_proj", "*.c_fc"], "batch_size": BATCH, "full_norms": full_norms},
            "projection": {"kind": "factored", "factors": [16, 16]},
            "store": {"chunk_rows": 128, "shard_rows": 256, "dtype": "float32", "path": str(work / name)},
            "build": {"workers": 2},
        }
    )


def build_vs_training_step(config) -> tuple[float, float, float]:
    from tdastore.grads.computer import make_gradient_computer
    from tdastore.tasks import make_task

    torch.set_num_threads(1)
    task = make_task(config.task, config.model)
    model = task.make_model()
    computer = make_gradient_computer(model, task.per_example_loss, config.gradients, config.projection)
    train = task.examples("train")
    batches = [train.slice(i * BATCH, (i + 1) * BATCH) for i in range(6)]
    assert all(tuple(b.inputs.shape) == (BATCH, 2, LENGTH) for b in batches), "documents shorter than 128 tokens"
    tokens = sum(int(b.inputs[:, 1].sum()) for b in batches)
    t_train, t_build = train_and_build_seconds(task, model, computer, batches)
    return (tokens / t_build) / (tokens / t_train), tokens / t_build, tokens / t_train


def train_and_build_seconds(
    task, model, computer, batches, repeats: int = 3, sync: bool = False
) -> tuple[float, float]:
    """Best seconds over `batches` of plain training steps (forward + backward of the summed loss, every weight
    gradient) and of the store's gradient computer. sync: wait for the GPU at the end of each run."""
    wait = torch.cuda.synchronize if sync else (lambda: None)

    def training_steps():
        for b in batches:
            model.zero_grad(set_to_none=True)
            task.per_example_loss(model(b.inputs), b.targets).sum().backward()
        wait()

    def build():
        for b in batches:
            computer(b.inputs, b.targets)
        wait()

    return best_seconds(training_steps, repeats), best_seconds(build, repeats)


def query_vs_forward_backward(store, config, n_prompts: int = 100) -> dict:
    from tdastore.attribution import Attributor

    torch.set_num_threads(1)
    corpus = [json.loads(line)["text"] for line in Path(config.task.dataset).read_text().splitlines()]
    rng = random.Random(1)
    prompts = [" ".join(rng.choice(corpus).split()[:24]) for _ in range(n_prompts)]
    out = {}
    for method in ("grad_dot", "ekfac"):
        ctx = Attributor(store, method)  # operator fitted (or loaded) here, once
        test = ctx.task.encode(prompts)
        ctx.top_k(test, 10)  # warm

        def plain():
            for start in range(0, len(test), BATCH):
                part = test.slice(start, start + BATCH)
                ctx.model.zero_grad(set_to_none=True)
                ctx.task.per_example_loss(ctx.model(part.inputs), part.targets).sum().backward()

        t_query = best_seconds(lambda: ctx.top_k(test, 10))
        t_plain = best_seconds(plain)
        out[method] = (t_query / t_plain, t_query, t_plain)
    return out


MEMORY_SCRIPT = """
import json, resource, sys
sys.path.insert(0, {bench_dir!r})
import ray
from pathlib import Path
from text_throughput import config_for
from tdastore.distributed.build import build_store
work = Path({work!r})
config = config_for(work, Path({corpus!r}), "store_mem_{docs}")
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
store = build_store(config, config.store.path, progress=False)
print(json.dumps({{"driver_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "worker_mb": store.manifest["summary"]["peak_worker_rss_mb"], "rows": store.n_rows}}))
"""


def peak_memory(work: Path, docs: int) -> dict:
    corpus = work / f"corpus_{docs}.jsonl"
    write_corpus(corpus, docs, seed=docs)
    code = MEMORY_SCRIPT.format(bench_dir=str(Path(__file__).parent), work=str(work), corpus=str(corpus), docs=docs)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="no memory scaling run")
    args = parser.parse_args()
    import ray

    from tdastore.distributed.build import build_store
    from tdastore.tasks.text import quiet_hugging_face

    quiet_hugging_face()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_model(work)
        corpus = work / "corpus_2000.jsonl"
        write_corpus(corpus, 2000)
        config = config_for(work, corpus, "store")
        for full_norms in (False, True):
            ratio, build_rate, train_rate = build_vs_training_step(config_for(work, corpus, "store", full_norms))
            print(
                f"build/train-step tokens/s (GPT-2 4x256, vocab 4096, 16 x 128 tokens, one thread, full_norms="
                f"{full_norms}): {ratio:.3f} (build {build_rate:,.0f} tokens/s, "
                f"training step {train_rate:,.0f} tokens/s)"
            )
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
        began = time.perf_counter()
        store = build_store(config, config.store.path, progress=False)
        seconds = time.perf_counter() - began
        tokens = store.n_rows * LENGTH
        print(
            f"Ray build, 2 workers, end to end incl. start-up: {tokens / seconds:,.0f} tokens/s "
            f"({store.n_rows:,} documents in {seconds:.1f} s)"
        )
        ray.shutdown()
        for method, (r, tq, tp) in query_vs_forward_backward(store, config).items():
            print(
                f"query 100 prompts / their forward+backward, {method}: {r:.3f} "
                f"({tq * 1e3:.0f} ms vs {tp * 1e3:.0f} ms, "
                f"{store.n_rows:,}-document store)"
            )
        if not args.quick:
            small, large = peak_memory(work, 1000), peak_memory(work, 10000)
            print(
                f"peak memory 10k/1k documents, worker: {large['worker_mb'] / small['worker_mb']:.3f} "
                f"({small['worker_mb']:.0f} -> {large['worker_mb']:.0f} MB)"
            )
            print(
                f"peak memory 10k/1k documents, driver: {large['driver_mb'] / small['driver_mb']:.3f} "
                f"({small['driver_mb']:.0f} -> {large['driver_mb']:.0f} MB)"
            )


if __name__ == "__main__":
    main()
