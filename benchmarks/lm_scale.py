"""Real-size language models and queries at scale (issue 12), as ratios measured in one run on this machine.

1. GPT-2-small shape (12 layers x 768, vocabulary 50,257, random init from a config: 124M parameters),
   documents of 512 tokens, `modules: auto`, factored 16 x 16, full_norms false: build tokens/s divided by a
   plain training step's tokens/s (forward + backward of the summed loss, every weight gradient) on the same
   batches, in process, 2 threads. Then a one-worker Ray build of 8 documents: the worker's peak RSS against
   `tdastore plan`'s per-worker estimate, and the build with the adafactor normaliser (gradients.normalizer)
   against without.
2. The demo LM (`tdastore demo-lm` defaults: GPT-2 2 x 64, its 1,684 standard-library documents): the first
   K-FAC and EK-FAC query, fitting included, divided by the build's time (2 workers).
3. 1,000 prompts scored (top-10 and the full score matrix) against a 20,000-document store by 2 Ray actors
   vs 1 (the same Ray session, actor start-up included).

With `--device cuda` part 1 runs on the GPU with the model in bfloat16, 16 x 512 tokens a batch, and its Ray
build is one GPU worker (tokens/s end to end instead of the RSS ratio, which measures host memory).

4. bfloat16 against float32 builds on the CPU: tokens/s of each where the CPU has AMX (GPT-2-small shape), and
   everywhere the rows' agreement (cosine of bf16 rows to fp32 rows).

    python benchmarks/lm_scale.py [--parts queries,kfac,gpt2,bf16] [--device cpu|cuda]
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
from text_throughput import train_and_build_seconds  # benchmarks/ is on the path when run as a script

LENGTH = 512


def sentences() -> list[str]:
    from tdastore.demo_text import stdlib_documents

    return [s.strip() + "." for doc in stdlib_documents() for s in doc.split(". ") if len(s) > 20]


def write_corpus(path: Path, n_docs: int, per_doc: int, seed: int = 0) -> None:
    pool, rng = sentences(), random.Random(seed)
    with open(path, "w") as f:
        for i in range(n_docs):
            f.write(json.dumps({"id": i, "text": " ".join(rng.sample(pool, per_doc))}) + "\n")


def save_gpt2(out: Path, vocab: int, layers: int, width: int, heads: int, positions: int, tokenizer_vocab: int):
    """A randomly initialised GPT-2 of the given shape and a BPE tokenizer trained here (offline)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from tdastore.demo_text import stdlib_documents, train_tokenizer

    tokenizer = train_tokenizer(stdlib_documents(), tokenizer_vocab)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=width, n_layer=layers, n_head=heads)
    config.eos_token_id = config.bos_token_id = tokenizer.eos_token_id
    GPT2LMHeadModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def text_config(model_dir: Path, corpus: Path, store_path: Path, device: str = "cpu", **sections):
    from tdastore.config import load_config

    raw = {
        "device": device,
        "task": {"dataset": str(corpus), "kind": "causal_lm", "max_length": LENGTH, "id_column": "id"},
        "model": {"name_or_path": str(model_dir)},
        "gradients": {"modules": "auto", "batch_size": 2, "full_norms": False},
        "projection": {"kind": "factored", "factors": [16, 16]},
        "store": {"chunk_rows": 128, "shard_rows": 256, "dtype": "float32", "path": str(store_path)},
        "build": {"workers": 1, "cpus_per_worker": 2},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return load_config(raw)


def gpt2_small(work: Path, device: str = "cpu") -> None:
    import ray

    from tdastore.distributed.build import build_store
    from tdastore.grads.computer import make_gradient_computer
    from tdastore.tasks import make_task

    model_dir = save_gpt2(work / "gpt2-small", 50257, 12, 768, 12, 1024, 2048)
    corpus = work / "long.jsonl"
    gpu = device.startswith("cuda")
    batch = 16 if gpu else 2
    write_corpus(corpus, 160 if gpu else 40, 60)
    config = text_config(
        model_dir,
        corpus,
        work / "small-store",
        device=device,
        task={"test_fraction": 0.2},
        model={"dtype": "bfloat16", "attention": "sdpa"} if gpu else {},
        gradients={"batch_size": batch},
    )
    estimate = planned_worker_mb(config, work)  # first: a fresh process, as a user runs `tdastore plan`
    torch.set_num_threads(2)
    task = make_task(config.task, config.model)
    model = task.make_model().to(device)  # in the config's dtype
    params = sum(p.numel() for p in model.parameters())
    computer = make_gradient_computer(model, task.per_example_loss, config.gradients, config.projection)
    train = task.examples("train")
    batches = [train.slice(i * batch, (i + 1) * batch).to(device) for i in range(2)]
    assert all(b.inputs.shape[-1] == LENGTH for b in batches), "documents shorter than 512 tokens"
    tokens = sum(int(b.inputs[:, 1].sum()) for b in batches)
    t_train, t_build = train_and_build_seconds(task, model, computer, batches, repeats=2, sync=gpu)
    where = "GPU, bfloat16" if gpu else "2 threads"
    print(
        f"GPT-2-small shape ({params / 1e6:.0f}M parameters, {len(computer.modules)} modules auto, {batch} x "
        f"{LENGTH} tokens, {where}): build/train-step tokens/s = {t_train / t_build:.3f} "
        f"(build {tokens / t_build:,.0f} tokens/s, training step {tokens / t_train:,.0f} tokens/s)"
    )
    normalised = make_gradient_computer(
        model, task.per_example_loss, config.gradients, config.projection, unit_normaliser(model, computer)
    )
    _, t_normalised = train_and_build_seconds(task, model, normalised, batches, repeats=2, sync=gpu)
    print(f"the same build with the adafactor normaliser / without, tokens/s: {t_build / t_normalised:.3f}")
    ray.init(
        num_cpus=2, num_gpus=1 if gpu else 0, include_dashboard=False, log_to_driver=False,
        _node_ip_address="127.0.0.1",
    )  # fmt: skip
    try:
        began = time.perf_counter()
        store = build_store(config, config.store.path, progress=False)
        seconds = time.perf_counter() - began
    finally:
        ray.shutdown()
    if gpu:
        print(
            f"GPT-2-small Ray build, one GPU worker: {store.n_rows} documents x {LENGTH} tokens in {seconds:.1f} s "
            f"end to end ({store.n_rows * LENGTH / seconds:,.0f} tokens/s, worker start-up included)"
        )
        return
    measured = store.manifest["summary"]["peak_worker_rss_mb"]
    print(
        f"GPT-2-small build worker peak RSS / `tdastore plan` estimate: {measured / estimate:.3f} "
        f"({measured:,.0f} MB measured, {estimate:,.0f} MB planned, {store.n_rows} documents)"
    )


def cpu_has_amx() -> bool:
    """Whether this CPU runs bfloat16 matrix products on AMX tiles (Linux's amx_bf16 flag)."""
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def bf16_on_the_cpu(work: Path) -> dict:
    """model.dtype bfloat16 against float32 on the CPU, in process, 2 threads: build tokens/s of each and the
    rows' agreement (cosine of each bf16 row to its fp32 row). With AMX the GPT-2-small shape of part gpt2; without,
    a 2 x 64 GPT-2 (bfloat16 products are ~100x slower than fp32 there: no throughput worth reporting, only the
    agreement)."""
    from tdastore.grads.computer import make_gradient_computer
    from tdastore.tasks import make_task

    amx = cpu_has_amx()
    shape = (50257, 12, 768, 12, 1024, 2048) if amx else (2048, 2, 64, 2, 1024, 2048)
    model_dir = save_gpt2(work / "bf16-gpt2", *shape)
    corpus = work / "bf16.jsonl"
    write_corpus(corpus, 40, 60)
    torch.set_num_threads(2)
    out, rows = {"amx": amx}, {}
    for dtype in ("float32", "bfloat16"):
        config = text_config(model_dir, corpus, work / f"bf16-store-{dtype}", task={"test_fraction": 0.2},
                             model={"dtype": dtype})  # fmt: skip
        task = make_task(config.task, config.model)
        model = task.make_model()
        computer = make_gradient_computer(model, task.per_example_loss, config.gradients, config.projection)
        train = task.examples("train")
        batches = [train.slice(i * 2, (i + 1) * 2) for i in range(2)]
        tokens = sum(int(b.inputs[:, 1].sum()) for b in batches)
        _, seconds = train_and_build_seconds(task, model, computer, batches, repeats=2 if amx else 1)
        out[f"{dtype}_tokens_per_s"] = tokens / seconds
        rows[dtype] = torch.cat([computer(b.inputs, b.targets)[0].float() for b in batches])  # [4, k]
    cosine = torch.nn.functional.cosine_similarity(rows["bfloat16"], rows["float32"], dim=1)
    out.update(cosine_min=float(cosine.min()), cosine_mean=float(cosine.mean()))
    ratio = out["bfloat16_tokens_per_s"] / out["float32_tokens_per_s"]
    where = "AMX: GPT-2-small shape" if amx else "no AMX on this CPU: GPT-2 2 x 64"
    print(
        f"bfloat16 / float32 build tokens/s on the CPU ({where}): {ratio:.3f} ({out['bfloat16_tokens_per_s']:,.0f} vs "
        f"{out['float32_tokens_per_s']:,.0f}); rows' cosine bf16 to fp32 min {out['cosine_min']:.4f}, mean "
        f"{out['cosine_mean']:.4f}" + ("" if amx else " (throughput without AMX is not what bf16 is for)")
    )
    return out


def unit_normaliser(model, computer):
    """An adafactor normaliser of the computer's parameters (its cost does not depend on v's values)."""
    from tdastore.grads.normaliser import Normaliser

    params = dict(model.named_parameters())
    moments = {n: torch.ones(params[n].shape) for n in computer.param_spec()["params"]}
    return Normaliser("adafactor", moments, 1e-8, "benchmark").bind(model)


def planned_worker_mb(config, work: Path) -> float:
    """`tdastore plan`'s per-worker estimate, from a fresh process as a user runs it."""
    import yaml

    from tdastore.config import config_to_dict

    path = work / "plan.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(config)))
    command = [sys.executable, "-m", "tdastore.cli", "plan", "--config", str(path)]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    line = next(line for line in out.splitlines() if line.startswith("per worker"))
    return float(line.split()[2].replace(",", ""))


def demo_lm_kfac(work: Path) -> None:
    import ray

    from tdastore.attribution import Attributor
    from tdastore.demo_text import make_tiny_lm
    from tdastore.distributed.build import build_store

    demo = make_tiny_lm(work / "demo")
    config = text_config(
        demo / "model",
        demo / "corpus.jsonl",
        work / "demo-store",
        task={"max_length": 128, "test_fraction": 0.1},
        gradients={"batch_size": 16, "modules": "auto"},
        store={"shard_rows": 512},
        build={"workers": 2, "cpus_per_worker": 1},
    )
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        began = time.perf_counter()
        store = build_store(config, config.store.path, progress=False)
        t_build = time.perf_counter() - began
    finally:
        ray.shutdown()
    prompts = [json.loads(line)["text"] for line in (demo / "prompts.jsonl").read_text().splitlines()]
    torch.set_num_threads(2)
    for method in ("kfac", "ekfac"):
        began = time.perf_counter()
        Attributor(store, method).top_k(prompts, 5)  # first query: fits the operator from the build's factors
        t_query = time.perf_counter() - began
        print(
            f"demo LM first {method} query (fitting included) / build time: {t_query / t_build:.3f} "
            f"({t_query:.1f} s vs {t_build:.1f} s for {store.n_rows:,} documents)"
        )


def queries_on_ray(work: Path) -> None:
    import ray

    from tdastore.attribution import Attributor
    from tdastore.demo_text import make_tiny_lm
    from tdastore.distributed.build import build_store

    demo = make_tiny_lm(work / "small-lm", train_steps=0)
    corpus = work / "corpus-20k.jsonl"
    write_corpus(corpus, 20_000, 2, seed=3)
    config = text_config(
        demo / "model",
        corpus,
        work / "store-20k",
        task={"max_length": 32, "test_fraction": 0.001},
        gradients={"batch_size": 64},
        projection={"factors": [32, 32]},
        store={"shard_rows": 2048, "chunk_rows": 512, "dtype": "float16"},
        build={"workers": 2, "cpus_per_worker": 1},
    )
    pool = sentences()
    rng = random.Random(4)
    prompts = [" ".join(rng.sample(pool, 2)) for _ in range(1000)]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        store = build_store(config, config.store.path, progress=False)
        times = {}
        for workers in (1, 2):
            attributor = Attributor(store, "grad_dot", workers=workers, ray_min_inputs=1)
            test = attributor.examples(prompts)
            for call in ("cold", "warm"):  # cold: the actors start (import, load the model); warm: kept actors
                began = time.perf_counter()
                attributor.top_k(test, 10, scores_out=work / f"scores-{workers}-{call}.zarr")
                times[workers, call] = time.perf_counter() - began
            del attributor  # its actors end with it
    finally:
        ray.shutdown()
    for call in ("cold", "warm"):
        one, two = times[1, call], times[2, call]
        print(
            f"1,000 prompts x {store.n_rows:,}-document store ({store.dim:,} columns, top-10 + full score matrix), "
            f"2 Ray actors vs 1, {call}: {one / two:.2f}x ({one:.1f} s vs {two:.1f} s)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--parts",
        default="queries,kfac,gpt2,bf16",
        help="comma-separated subset of queries, kfac, gpt2 (the "
        "slowest), bf16 (bfloat16 against float32 on the CPU; the GPT-2-small shape where the CPU has AMX)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: the GPT-2-small part on the GPU in bfloat16")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    from tdastore.tasks.text import quiet_hugging_face

    quiet_hugging_face()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "queries" in parts:
            queries_on_ray(work)
        if "kfac" in parts:
            demo_lm_kfac(work)
        if "gpt2" in parts:
            gpt2_small(work, args.device)
        if "bf16" in parts and args.device == "cpu":
            bf16_on_the_cpu(work)


if __name__ == "__main__":
    main()
