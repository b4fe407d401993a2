"""An offline text demo: a corpus from Python's own docstrings, a BPE tokenizer trained on it with
`tokenizers`, and a small GPT-2 trained briefly on it, saved as an ordinary transformers directory.

`tdastore demo-lm --out DIR` writes DIR/model (config, weights, tokenizer), DIR/corpus.jsonl and
DIR/prompts.jsonl, so `tdastore build --config configs/tiny_gpt2.yaml` runs with no network. Tests and
benchmarks build their models here too.
"""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path

import torch

STDLIB_MODULES = [
    "abc",
    "argparse",
    "asyncio",
    "base64",
    "bisect",
    "calendar",
    "collections",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "enum",
    "fractions",
    "functools",
    "glob",
    "gzip",
    "hashlib",
    "heapq",
    "hmac",
    "html",
    "http.client",
    "inspect",
    "io",
    "ipaddress",
    "itertools",
    "json",
    "logging",
    "math",
    "mimetypes",
    "operator",
    "os",
    "pathlib",
    "pickle",
    "pprint",
    "queue",
    "random",
    "re",
    "sched",
    "secrets",
    "shlex",
    "shutil",
    "socket",
    "sqlite3",
    "statistics",
    "string",
    "struct",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "timeit",
    "tokenize",
    "typing",
    "unittest",
    "urllib.parse",
    "uuid",
    "warnings",
    "weakref",
    "zipfile",
    "zlib",
]
EOS = "<|endoftext|>"


def stdlib_documents(limit: int | None = None, min_chars: int = 60) -> list[str]:
    """Paragraphs of the docstrings of standard-library modules and their public members, deduplicated,
    in a fixed order (text that ships with every Python)."""
    seen, docs = set(), []
    for name in STDLIB_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        sources = [module] + [getattr(module, m) for m in sorted(dir(module)) if not m.startswith("_")]
        for obj in sources:
            doc = inspect.getdoc(obj) if (inspect.ismodule(obj) or inspect.isclass(obj) or callable(obj)) else None
            for para in (doc or "").split("\n\n"):
                text = " ".join(para.split())
                if len(text) >= min_chars and text not in seen:
                    seen.add(text)
                    docs.append(text)
                    if limit is not None and len(docs) >= limit:
                        return docs
    return docs


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on `texts`, as a transformers fast tokenizer (EOS doubles as pad)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, pad_token=EOS)


def make_tiny_lm(
    out: Path,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    vocab_size: int = 512,
    n_positions: int = 128,
    train_steps: int = 100,
    documents: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
    max_length: int = 64,
    progress: bool = False,
    train_rows: list[int] | None = None,
) -> Path:
    """Write OUT/model (a GPT-2 trained `train_steps` AdamW steps on the corpus, or on its documents
    `train_rows` only, so the ones a task holds out for testing stay unseen), OUT/corpus.jsonl and
    OUT/prompts.jsonl; OUT/model/train_loss.json records the training loss per step."""
    from transformers import GPT2Config, GPT2LMHeadModel

    out = Path(out)
    docs = stdlib_documents(documents)
    tokenizer = train_tokenizer(docs, vocab_size)
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    model = GPT2LMHeadModel(config)
    losses = []
    if train_steps:
        seen = docs if train_rows is None else [docs[i] for i in train_rows]
        # one thread: torch's own CPU reductions (layer norm, embedding and bias gradients) split their sums by
        # thread count outside MKL's strict mode, and 4,000 AdamW steps carry those last bits into a different
        # LM (measured: 1 vs 2 threads apart from step 2, text table cells moved by up to .10)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            losses = _train(model, tokenizer, seen, train_steps, batch_size, max_length, seed, progress)
        finally:
            torch.set_num_threads(threads)
    model.eval()
    (out / "model").mkdir(parents=True, exist_ok=True)
    (out / "model" / "train_loss.json").write_text(json.dumps(losses))
    model.save_pretrained(out / "model")
    # a plain chat template (the turns' contents in order), so chat queries work as with an instruction-tuned LM
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tokenizer.save_pretrained(out / "model")
    with open(out / "corpus.jsonl", "w") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({"id": i, "text": doc}) + "\n")
    with open(out / "prompts.jsonl", "w") as f:
        for i, doc in enumerate(docs[:: max(1, len(docs) // 5)][:5]):
            f.write(json.dumps({"id": i, "text": " ".join(doc.split()[:12])}) + "\n")
    return out


def _train(model, tokenizer, docs, steps, batch_size, max_length, seed, progress) -> list[float]:
    from tqdm import tqdm

    encoded = tokenizer(docs, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    labels = ids.masked_fill(mask == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for _ in tqdm(range(steps), desc="train demo LM", disable=not progress):
        batch = torch.randint(0, len(docs), (batch_size,), generator=generator)
        loss = model(input_ids=ids[batch], attention_mask=mask[batch], labels=labels[batch]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses
