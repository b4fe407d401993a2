"""Text tasks on Hugging Face models: causal language modelling and sequence classification.

The model is a `transformers` AutoModelForCausalLM / AutoModelForSequenceClassification loaded by hub name
or local directory (model.name_or_path); its pretrained weights are the final model. Documents come from
local files through `datasets` (jsonl / json / parquet / csv / txt, one paragraph per document) or a hub
data set, are tokenised with the model's tokenizer (truncated, or packed into max_length blocks) and kept
as Arrow; examples are right-padded token tensors [N, 2, L] (ids, attention mask) whose batches drop the
columns no row uses. The per-example loss is the mean over target tokens (padding masked, and the prompt
too with completion_only), so padding and batch composition never change an example's gradient.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from tdastore.config import ModelConfig, TaskConfig
from tdastore.errors import ConfigError, DataError
from tdastore.tasks.base import Examples, Split, Task, check_not_empty

TEXT_KINDS = ("causal_lm", "sequence_classification")
IGNORE = -100  # target id of tokens without a loss (padding, prompt)
PROMPT = "__tdastore_prompt"  # the prompt column of a query's {prompt, completion} pairs and chats
FILE_LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}


def split_rows(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, test rows) of a corpus of n documents split by task.test_fraction and task.split_seed, sorted:
    the text task's own split (the demo LM trains on the train rows only)."""
    order = np.random.default_rng(seed).permutation(n)
    n_test = max(1, int(round(test_fraction * n)))
    return np.sort(order[n_test:]), np.sort(order[:n_test])


class HFModel(nn.Module):
    """A transformers model taking one tensor [B, 2, L] (token ids, attention mask) and returning logits,
    so the rest of tdastore sees an ordinary module."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        ids, mask = inputs[:, 0], inputs[:, 1]  # [B, L] each
        return self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # [B, L, V] or [B, C]


def quiet_hugging_face() -> None:
    """No per-file progress bars from transformers / datasets inside tdastore's own."""
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def load_records(source, text_column: str, where: str):
    """A `datasets.Dataset` from a local file (by suffix), a saved data set directory, or a hub name."""
    import datasets

    quiet_hugging_face()
    if isinstance(source, datasets.Dataset):
        return source
    path = Path(str(source))
    if path.suffix in FILE_LOADERS:
        if not path.is_file():
            raise DataError(f"{where} file '{path}' does not exist")
        loader = FILE_LOADERS[path.suffix]
        extra = {"sample_by": "paragraph"} if loader == "text" else {}
        records = datasets.load_dataset(loader, data_files=str(path), split="train", **extra)
        if loader == "text":  # paragraphs keep their line breaks: one document each, trimmed, blank ones dropped
            records = records.map(lambda b: {"text": [t.strip() for t in b["text"]]}, batched=True)
            records = records.filter(lambda b: [bool(t) for t in b["text"]], batched=True)
    elif path.is_dir():
        records = datasets.load_from_disk(str(path))
    else:
        records = datasets.load_dataset(str(source), split="train")  # a hub data set (needs the network)
    if text_column not in records.column_names:
        raise DataError(
            f"{where} '{source}' has no column '{text_column}' (it has {records.column_names}): set task.text_column"
        )
    return records


class TextTask(Task):
    """Causal LM (loss: mean next-token cross-entropy over target tokens) or sequence classification."""

    pretrained = True  # the final model is model.name_or_path itself: nothing to train
    held_out: str | None = None  # what a test_fraction split leaves out of the training split (said at build)

    def __init__(self, task: TaskConfig, model: ModelConfig, dataset=None, test_dataset=None):
        if not model.name_or_path:
            raise ConfigError("text tasks need model.name_or_path: a transformers model name or local directory")
        if task.kind not in TEXT_KINDS:
            raise ConfigError(f"task.kind must be one of {list(TEXT_KINDS)} for a text task, got {task.kind!r}")
        self.task_config, self.model_config = task, model
        self.kind = task.kind
        self.name = Path(str(task.dataset)).stem if dataset is None else "dataset"
        self.tokenizer = _load_tokenizer(model)
        self.context = self._model_config_context()
        if task.max_length > self.context:
            raise ConfigError(
                f"task.max_length={task.max_length} exceeds the model's context of {self.context} tokens: "
                f"lower it to <= {self.context}"
            )
        if task.packing and (task.kind != "causal_lm" or task.prompt_column):
            raise ConfigError("task.packing applies to causal_lm documents without a prompt_column")
        records = load_records(dataset if dataset is not None else task.dataset, task.text_column, "task.dataset")
        if test_dataset is not None or task.test_dataset:
            train_records = records
            test_records = load_records(
                test_dataset if test_dataset is not None else task.test_dataset, task.text_column, "task.test_dataset"
            )
            split_ids = {"train": np.arange(len(train_records)), "test": np.arange(len(test_records))}
        else:
            train_rows, test_rows = split_rows(len(records), task.test_fraction, task.split_seed)
            train_records, test_records = records.select(train_rows), records.select(test_rows)
            split_ids = {"train": train_rows, "test": test_rows}
            self.held_out = (
                f"task.test_fraction {task.test_fraction}: {len(test_rows):,} of {len(records):,} documents of "
                f"'{task.dataset}' are test documents, left out of the training split; give the test prompts as "
                "task.test_dataset to keep every document"
            )
        self.classes = None
        if self.kind == "sequence_classification":
            if task.label_column not in records.column_names:
                raise DataError(f"task.dataset has no label column '{task.label_column}': set task.label_column")
            self.classes = sorted(set(train_records[task.label_column]))
        if task.id_column and task.id_column not in records.column_names:
            raise DataError(
                f"task.dataset has no id column '{task.id_column}' (it has {records.column_names}): "
                "set task.id_column, or leave it unset for row numbers"
            )
        self._splits = {}
        for split, part in (("train", train_records), ("test", test_records)):
            check_not_empty(len(part), f"the {split} split of task.dataset")
            ids = (
                np.asarray(part[task.id_column], dtype=np.int64)
                if task.id_column
                else split_ids[split].astype(np.int64)
            )
            self._splits[split] = self._encode_records(part, ids, f"the {split} split")

    # -- the model ----------------------------------------------------------------------------------
    def _model_config_context(self) -> int:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(base_and_adapter(self.model_config)[0])
        context = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        self._vocab = getattr(cfg, "vocab_size", None)
        if self._vocab is not None and len(self.tokenizer) > self._vocab:
            raise DataError(
                f"the tokenizer has {len(self.tokenizer)} tokens but the model's vocabulary has {self._vocab}: use the "
                "model's own tokenizer (leave model.tokenizer unset) or one whose vocabulary fits the embedding"
            )
        return int(context or 10**9)

    def make_model(self) -> nn.Module:
        cfg = self.model_config
        base, adapter = base_and_adapter(cfg)
        n_classes, pad_id = len(self.classes or []), self.tokenizer.pad_token_id
        return _load_model(base, self.kind, n_classes, pad_id, cfg.dtype, cfg.attention, adapter)

    def per_example_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        outputs = outputs if outputs.dtype == torch.float64 else outputs.float()  # half-precision logits: float32
        if self.kind == "sequence_classification":
            return F.cross_entropy(outputs, targets, reduction="none")  # [B]
        logits, labels = outputs[:, :-1], targets[:, 1:]  # position t predicts token t + 1
        tokens = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="none"
        ).view(labels.shape)  # [B, L - 1]
        if self.task_config.loss_reduction == "sum":
            return tokens.sum(1)  # [B]
        counted = (labels != IGNORE).sum(1).clamp(min=1)
        return tokens.sum(1) / counted  # [B]

    def describe_inputs(self) -> dict:
        described = {"kind": self.kind, "text": True, "max_length": self.task_config.max_length}
        if self.kind == "sequence_classification":
            described["classes"] = [c.item() if isinstance(c, np.generic) else c for c in self.classes]
        return described

    def encode_request(self, inputs: list, targets: list | None) -> TokenExamples:
        """Texts (prompts), with their labels for sequence classification."""
        cfg = self.task_config
        if self.kind == "sequence_classification":
            return self.encode([{cfg.text_column: t, cfg.label_column: y} for t, y in zip(inputs, targets or [])])
        return self.encode([str(t) for t in inputs])

    def is_examples(self, inputs) -> bool:
        return isinstance(inputs, (Examples, TokenExamples))

    def token_mask(self, inputs: torch.Tensor) -> torch.Tensor:
        """[B, 2, L] -> [B, L] 1 for real tokens (what K-FAC's activation statistics count)."""
        return inputs[:, 1]

    # -- data -----------------------------------------------------------------------------------------
    def examples(self, split: Split) -> TokenExamples:
        if split not in self._splits:
            raise DataError(f"unknown split '{split}': use 'train' or 'test'")
        return self._splits[split]

    def encode(self, inputs: str | Path | list | object) -> TokenExamples:
        """Query inputs: a jsonl / json / parquet / csv / txt file, a `datasets.Dataset`, or a list of strings
        (or of {text_column: ..., prompt_column: ...} records), tokenised exactly as the training data; or
        {"prompt", "completion"} pairs and chat {"messages": [...]} lists (the last message, the assistant's,
        is the completion; the rest rendered with the tokenizer's chat template is the prompt), whose loss
        counts the completion's tokens only."""
        import datasets

        text = self.task_config.text_column
        if isinstance(inputs, (list, tuple)):
            records = datasets.Dataset.from_list([r if isinstance(r, dict) else {text: str(r)} for r in inputs])
        else:
            records = load_records(inputs, text, "--inputs")
        check_not_empty(len(records), "the query inputs")
        ids = (
            np.asarray(records["id"], dtype=np.int64)
            if "id" in records.column_names
            else np.arange(len(records), dtype=np.int64)
        )
        columns = set(records.column_names)
        if "messages" in columns or {"prompt", "completion"} <= columns:
            rows = [self._completion_record(r) for r in records.to_list()]
            records = datasets.Dataset.from_list(rows)
            return self._encode_records(records, ids, "the query inputs", False, PROMPT, completion_only=True)
        return self._encode_records(records, ids, "the query inputs", packing=False)

    def _completion_record(self, record: dict) -> dict:
        """{PROMPT: prompt text, text_column: completion} of a pair or a chat."""
        if self.kind != "causal_lm":
            raise DataError("prompt / completion pairs and chat messages are causal_lm queries")
        if "messages" in record and record["messages"] is not None:
            messages = record["messages"]
            if not messages or messages[-1].get("role") != "assistant":
                raise DataError("a chat query's last message must be the assistant's (the completion attributed)")
            if not getattr(self.tokenizer, "chat_template", None):
                raise DataError(
                    "the tokenizer has no chat template: give {prompt, completion} pairs, or a tokenizer with one "
                    "(model.tokenizer)"
                )
            prompt = self.tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
            return {PROMPT: prompt, self.task_config.text_column: str(messages[-1]["content"])}
        return {PROMPT: str(record["prompt"]), self.task_config.text_column: str(record["completion"])}

    def completion_view(self, examples: TokenExamples) -> TokenExamples:
        """The same examples with the loss on their completions only (the `completion` measurement)."""
        if not isinstance(examples, TokenExamples) or self.kind != "causal_lm":
            raise ConfigError("measurement completion applies to causal_lm queries")
        prompts = np.asarray(examples.dataset.data.table.column("n_prompt").to_numpy())
        if not len(prompts) or prompts.min() <= 0:
            raise DataError(
                "measurement completion needs a prompt in every query: give {prompt, completion} pairs or chat "
                "messages, or query a store whose task has a prompt_column"
            )
        return TokenExamples(examples.dataset, examples.kind, examples.pad_id, True)

    def _encode_records(
        self,
        records,
        ids: np.ndarray,
        where: str,
        packing: bool | None = None,
        prompt_column: str | None = None,
        completion_only: bool | None = None,
    ) -> TokenExamples:
        """Tokenise with `datasets.map` into an Arrow table (cached on disk for file data sets, memory-mapped),
        then check it: lengths, vocabulary, empty documents, documents without target tokens. prompt_column /
        completion_only: a query's own (pairs, chats), else the task's."""

        cfg, tok = self.task_config, self.tokenizer
        packing = cfg.packing if packing is None else packing
        completion_only = cfg.completion_only if completion_only is None else completion_only
        prompt = prompt_column or cfg.prompt_column
        prompt = prompt if prompt and prompt in records.column_names else None
        index = {c: i for i, c in enumerate(self.classes or [])}
        records = records.add_column("__tdastore_id", [int(i) for i in ids])
        fingerprint = hashlib.sha256(
            repr(
                (
                    getattr(records, "_fingerprint", None),
                    sorted(self.description().items()),
                    packing,
                    prompt,
                    completion_only,
                    self.model_config.tokenizer,
                    len(tok),
                )
            ).encode()
        ).hexdigest()[:16]

        def encode(batch):
            full, n_prompt, texts = tokenise(tok, batch, cfg.text_column, prompt)
            out_ids = batch["__tdastore_id"]
            if packing:
                full, texts = pack(tok, full, cfg.max_length)
                n_prompt, out_ids = [0] * len(full), [-1] * len(full)
            out = {
                "id": out_ids,
                "text": texts,
                "raw_length": [len(e) for e in full],
                "max_id": [max(e) if e else -1 for e in full],
                "input_ids": [e[: cfg.max_length] for e in full],
                "n_prompt": n_prompt,
            }
            out["n_targets"] = [
                max(0, len(e) - 1 - (max(0, min(p, len(e)) - 1) if completion_only else 0))
                for e, p in zip(out["input_ids"], n_prompt)
            ]
            if self.kind == "sequence_classification":
                raw = batch.get(cfg.label_column)
                if raw is None:
                    raise DataError(
                        f"{where} has no label column '{cfg.label_column}': sequence classification needs labels"
                    )
                out["label"] = [str(r) for r in raw]
                out["target"] = [index.get(r, -1) for r in raw]
            return out

        tokenised = records.map(
            encode, batched=True, batch_size=1000, remove_columns=records.column_names, new_fingerprint=fingerprint
        )
        table = tokenised.data.table
        if packing:  # blocks are numbered in order
            tokenised = tokenised.remove_columns("id").add_column("id", list(range(len(tokenised))))
            table = tokenised.data.table
        self._validate(table, where)
        return TokenExamples(tokenised, self.kind, int(tok.pad_token_id), completion_only)

    def _validate(self, table, where: str) -> None:
        """Refuse what the model cannot be trained or queried on, naming the document and the fix: documents
        over max_length (without truncation), token ids outside the vocabulary, empty documents, unseen labels,
        documents without target tokens."""
        import pyarrow.compute as pc

        cfg = self.task_config
        row_ids = table.column("id").to_numpy()
        raw_length = table.column("raw_length").to_numpy()
        too_long = np.nonzero(raw_length > cfg.max_length)[0]
        if len(too_long) and not cfg.truncation:
            raise DataError(
                f"{where}: {len(too_long)} document(s) exceed task.max_length={cfg.max_length} tokens (the first, id "
                f"{int(row_ids[too_long[0]])}, has {int(raw_length[too_long[0]])}); set task.truncation: true, raise "
                f"task.max_length (the model's context is {self.context}) or use task.packing: true"
            )
        vocab = self._vocab or len(self.tokenizer)
        highest = int(pc.max(table.column("max_id")).as_py())
        if highest >= vocab:
            raise DataError(
                f"{where}: token id {highest} is outside the model's vocabulary of {vocab}: the tokenizer "
                "does not belong to this model"
            )
        empty = np.nonzero(raw_length == 0)[0]
        if len(empty):
            raise DataError(f"{where}: document id {int(row_ids[empty[0]])} has no tokens: drop empty documents")
        if self.kind == "sequence_classification":
            unknown = np.nonzero(table.column("target").to_numpy() < 0)[0]
            if len(unknown):
                labels = sorted({table.column("label")[int(i)].as_py() for i in unknown[:50]})
                raise DataError(f"{where}: labels {labels[:5]} were not seen in training (classes {self.classes[:10]})")
        else:
            none = np.nonzero(table.column("n_targets").to_numpy() == 0)[0]
            if len(none):
                raise DataError(
                    f"{where}: document id {int(row_ids[none[0]])} has no target tokens (a single token, or "
                    "a prompt filling max_length with completion_only): drop it or raise task.max_length"
                )

    def fingerprint(self) -> str:
        """The description and both splits' token ids and example ids, streamed from the Arrow tables."""
        digest = hashlib.sha256(repr(sorted(self.description().items())).encode())
        for split in ("train", "test"):
            table = self._splits[split].dataset.data.table.select(["id", "input_ids", "n_prompt"])
            for batch in table.to_batches(max_chunksize=65536):
                for column in batch.columns:
                    for buffer in column.buffers():
                        if buffer is not None:
                            digest.update(buffer)
        return digest.hexdigest()[:16]

    def description(self) -> dict:
        cfg = self.task_config
        return {
            "name": self.name,
            "kind": self.kind,
            "dataset": str(cfg.dataset),
            "model": self.model_config.name_or_path,
            "max_length": cfg.max_length,
            "packing": cfg.packing,
            "completion_only": cfg.completion_only,
        } | self._non_default_settings()

    def _non_default_settings(self) -> dict:
        """Settings added since stores were first built, described only when set: older stores keep their
        fingerprints (and resume) while a store built with them says so."""
        adapter = base_and_adapter(self.model_config)[1]
        return {
            **({"adapter": adapter} if adapter else {}),
            **({"loss_reduction": "sum"} if self.task_config.loss_reduction == "sum" else {}),
        }


def tokenise(tok, batch: dict, text_column: str, prompt: str | None) -> tuple[list[list[int]], list[int], list[str]]:
    """Token ids of each document (a prompt's tokens first when there is one), the prompt lengths, and the
    text each row stands for."""
    texts = [str(t) for t in batch[text_column]]
    if not prompt:
        full = tok(texts, add_special_tokens=True)["input_ids"]
        return full, [0] * len(full), texts
    heads = tok([str(p) for p in batch[prompt]], add_special_tokens=True)["input_ids"]
    bodies = tok(texts, add_special_tokens=False)["input_ids"]
    full = [h + b for h, b in zip(heads, bodies)]
    return full, [len(h) for h in heads], [f"{p}{t}" for p, t in zip(batch[prompt], texts)]


def pack(tok, documents: list[list[int]], max_length: int) -> tuple[list[list[int]], list[str]]:
    """Documents concatenated (EOS between) and cut into blocks of max_length tokens, with their text."""
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    stream = [t for doc in documents for t in doc + eos]
    blocks = [stream[i : i + max_length] for i in range(0, len(stream), max_length)]
    return blocks, [tok.decode(b) for b in blocks]


ADAPTER_CONFIG = "adapter_config.json"


def base_and_adapter(model: ModelConfig) -> tuple[str, str | None]:
    """(base model, PEFT adapter folder or None): model.adapter on top of name_or_path, or name_or_path itself
    an adapter folder whose adapter_config.json names its base (as a fine-tuning run saves it)."""
    if model.adapter:
        if not (Path(model.adapter) / ADAPTER_CONFIG).is_file():
            raise ConfigError(
                f"model.adapter '{model.adapter}' has no {ADAPTER_CONFIG}: point it at a saved PEFT adapter"
            )
        return str(model.name_or_path), model.adapter
    folder = Path(str(model.name_or_path))
    if (folder / ADAPTER_CONFIG).is_file():
        base = json.loads((folder / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
        if not base:
            raise ConfigError(
                f"the adapter at '{folder}' does not name its base model: set model.name_or_path to the base and "
                "model.adapter to the adapter folder"
            )
        return base, str(folder)
    return str(model.name_or_path), None


def _load_tokenizer(model: ModelConfig):
    from transformers import AutoTokenizer

    base, adapter = base_and_adapter(model)
    own = adapter if adapter and (Path(adapter) / "tokenizer_config.json").is_file() else base
    tokenizer = AutoTokenizer.from_pretrained(model.tokenizer or own)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has neither a pad nor an EOS token: give it a pad token")
        tokenizer.pad_token = tokenizer.eos_token  # right padding is masked out of every loss
    tokenizer.padding_side = "right"
    return tokenizer


def _instantiate(
    name_or_path: str, kind: str, n_classes: int, pad_id: int, dtype: str = "float32", attention: str = "eager"
) -> nn.Module:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    quiet_hugging_face()
    common = {"dtype": getattr(torch, dtype), "attn_implementation": attention}  # eager: works under torch.func
    if kind == "causal_lm":
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **common)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(name_or_path, **common)
        if model.config.num_labels != n_classes:
            raise DataError(
                f"the model at '{name_or_path}' has {model.config.num_labels} labels, the data {n_classes} "
                "classes: use a classifier head of that size"
            )
        model.config.pad_token_id = pad_id  # the last non-pad token is the one classified
    model.eval()
    return model


def _with_adapter(model: nn.Module, adapter: str) -> nn.Module:
    """The base model with a PEFT adapter: the adapter's parameters trainable (the gold standard further-trains
    them), the base's frozen, as in the fine-tuning that made it."""
    try:
        from peft import PeftModel
    except ImportError as err:
        raise ConfigError(f"model adapter '{adapter}' needs the peft library: pip install peft") from err
    return PeftModel.from_pretrained(model, adapter, is_trainable=True).eval()


def _load_model(
    name_or_path: str,
    kind: str,
    n_classes: int,
    pad_id: int,
    dtype: str = "float32",
    attention: str = "eager",
    adapter: str | None = None,
) -> nn.Module:
    model = _instantiate(name_or_path, kind, n_classes, pad_id, dtype, attention)
    return HFModel(_with_adapter(model, adapter) if adapter else model).eval()


class TokenExamples:
    """A split as an Arrow table of token ids (a `datasets.Dataset`, memory-mapped when it came from a file):
    `slice` / `take` turn only the requested rows into right-padded tensors [b, 2, L_b] (ids, attention mask)
    and targets, so memory follows the batch, not the corpus. `inputs` / `targets` materialise everything
    (for code that needs the whole split at once, e.g. the exact path on small models)."""

    padded = True

    def __init__(self, dataset, kind: str, pad_id: int, completion_only: bool):
        self.dataset, self.kind, self.pad_id, self.completion_only = dataset, kind, pad_id, completion_only
        table = dataset.data.table
        self.ids = table.column("id").to_numpy().astype(np.int64)  # [N]
        labels = "label" if kind == "sequence_classification" else "n_targets"
        self.labels = np.asarray(table.column(labels).to_numpy(zero_copy_only=False))  # [N]
        self._whole: Examples | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def texts(self) -> np.ndarray:
        return np.asarray(self.dataset.data.table.column("text").to_pylist(), dtype=object)

    def slice(self, start: int, stop: int) -> Examples:
        return self.take(np.arange(start, min(stop, len(self))))

    def take(self, rows) -> Examples:
        index = np.arange(len(self))[rows] if isinstance(rows, slice) else np.asarray(rows).reshape(-1)
        if len(index) and np.all(np.diff(index) == 1):
            batch = self.dataset[int(index[0]) : int(index[-1]) + 1]
        else:
            batch = self.dataset[[int(i) for i in index]]
        tokens = batch["input_ids"]
        width = max([len(t) for t in tokens] + [1])
        n = len(tokens)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(n, width, dtype=torch.long)
        for i, t in enumerate(tokens):
            ids[i, : len(t)] = torch.tensor(t, dtype=torch.long)
            mask[i, : len(t)] = 1
        inputs = torch.stack([ids, mask], dim=1)  # [b, 2, L_b]
        if self.kind == "sequence_classification":
            targets = torch.tensor(batch["target"], dtype=torch.long)  # [b]
        else:
            targets = torch.where(mask.bool(), ids, torch.full_like(ids, IGNORE))  # [b, L_b]
            if self.completion_only:
                for i, p in enumerate(batch["n_prompt"]):
                    targets[i, : min(p, width)] = IGNORE
        return Examples(
            inputs, targets, self.ids[index], self.labels[index], np.asarray(batch["text"], dtype=object), padded=True
        )

    def to(self, device) -> Examples:
        """The whole split as tensors on `device` (the vectorised replica engine indexes it every step)."""
        return self._all().to(device)

    def _all(self) -> Examples:
        if self._whole is None:
            self._whole = self.take(np.arange(len(self)))
        return self._whole

    @property
    def inputs(self) -> torch.Tensor:
        return self._all().inputs

    @property
    def targets(self) -> torch.Tensor:
        return self._all().targets
