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

from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from tdastore.config import ModelConfig, TaskConfig
from tdastore.errors import ConfigError, DataError
from tdastore.tasks.base import Examples, Split, Task, check_not_empty

TEXT_KINDS = ("causal_lm", "sequence_classification")
IGNORE = -100  # target id of tokens without a loss (padding, prompt)
FILE_LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}


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
    elif path.is_dir():
        records = datasets.load_from_disk(str(path))
    else:
        records = datasets.load_dataset(str(source), split="train")  # a hub data set (needs the network)
    if text_column not in records.column_names:
        raise DataError(f"{where} '{source}' has no column '{text_column}' (it has {records.column_names}): "
                        "set task.text_column")
    return records


class TextTask(Task):
    """Causal LM (loss: mean next-token cross-entropy over target tokens) or sequence classification."""

    pretrained = True  # the final model is model.name_or_path itself: nothing to train

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
            raise ConfigError(f"task.max_length={task.max_length} exceeds the model's context of {self.context} tokens: "
                              f"lower it to <= {self.context}")
        if task.packing and (task.kind != "causal_lm" or task.prompt_column):
            raise ConfigError("task.packing applies to causal_lm documents without a prompt_column")
        records = load_records(dataset if dataset is not None else task.dataset, task.text_column, "task.dataset")
        if test_dataset is not None or task.test_dataset:
            train_records = records
            test_records = load_records(test_dataset if test_dataset is not None else task.test_dataset,
                                        task.text_column, "task.test_dataset")
            split_ids = {"train": np.arange(len(train_records)), "test": np.arange(len(test_records))}
        else:
            order = np.random.default_rng(task.split_seed).permutation(len(records))
            n_test = max(1, int(round(task.test_fraction * len(records))))
            train_records, test_records = records.select(np.sort(order[n_test:])), records.select(np.sort(order[:n_test]))
            split_ids = {"train": np.sort(order[n_test:]), "test": np.sort(order[:n_test])}
        self.classes = None
        if self.kind == "sequence_classification":
            if task.label_column not in records.column_names:
                raise DataError(f"task.dataset has no label column '{task.label_column}': set task.label_column")
            self.classes = sorted(set(train_records[task.label_column]))
        self._splits = {}
        for split, part in (("train", train_records), ("test", test_records)):
            check_not_empty(len(part), f"the {split} split of task.dataset")
            ids = np.asarray(part[task.id_column], dtype=np.int64) if task.id_column else split_ids[split].astype(np.int64)
            self._splits[split] = self._encode_records(part, ids, f"the {split} split")

    # -- the model ----------------------------------------------------------------------------------
    def _model_config_context(self) -> int:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(self.model_config.name_or_path)
        context = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        self._vocab = getattr(cfg, "vocab_size", None)
        if self._vocab is not None and len(self.tokenizer) > self._vocab:
            raise DataError(
                f"the tokenizer has {len(self.tokenizer)} tokens but the model's vocabulary has {self._vocab}: use the "
                "model's own tokenizer (leave model.tokenizer unset) or one whose vocabulary fits the embedding"
            )
        return int(context or 10**9)

    def make_model(self) -> nn.Module:
        return _load_model(self.model_config.name_or_path, self.kind, len(self.classes or []),
                           self.tokenizer.pad_token_id)

    def per_example_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.kind == "sequence_classification":
            return F.cross_entropy(outputs.float(), targets, reduction="none")  # [B]
        logits, labels = outputs[:, :-1].float(), targets[:, 1:]  # position t predicts token t + 1
        tokens = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE,
                                 reduction="none").view(labels.shape)  # [B, L - 1]
        counted = (labels != IGNORE).sum(1).clamp(min=1)
        return tokens.sum(1) / counted  # [B]

    def token_mask(self, inputs: torch.Tensor) -> torch.Tensor:
        """[B, 2, L] -> [B, L] 1 for real tokens (what K-FAC's activation statistics count)."""
        return inputs[:, 1]

    # -- data -----------------------------------------------------------------------------------------
    def examples(self, split: Split) -> Examples:
        if split not in self._splits:
            raise DataError(f"unknown split '{split}': use 'train' or 'test'")
        return self._splits[split]

    def encode(self, inputs: Union[str, Path, list, "object"]) -> Examples:
        """Query inputs: a jsonl / json / parquet / csv / txt file, a `datasets.Dataset`, or a list of strings
        (or of {text_column: ..., prompt_column: ...} records), tokenised exactly as the training data."""
        import datasets

        if isinstance(inputs, (list, tuple)):
            rows = [r if isinstance(r, dict) else {self.task_config.text_column: str(r)} for r in inputs]
            records = datasets.Dataset.from_list(rows)
        else:
            records = load_records(inputs, self.task_config.text_column, "--inputs")
        check_not_empty(len(records), "the query inputs")
        ids = (np.asarray(records["id"], dtype=np.int64) if "id" in records.column_names
               else np.arange(len(records), dtype=np.int64))
        return self._encode_records(records, ids, "the query inputs", packing=False)

    def _encode_records(self, records, ids: np.ndarray, where: str, packing: Optional[bool] = None) -> Examples:
        cfg, tok = self.task_config, self.tokenizer
        texts = [str(t) for t in records[cfg.text_column]]
        prompts = [str(p) for p in records[cfg.prompt_column]] if cfg.prompt_column and cfg.prompt_column in records.column_names else None
        encoded = tok(texts, add_special_tokens=True, truncation=False)["input_ids"]
        prompt_lengths = [0] * len(texts)
        if prompts is not None:
            prompt_ids = tok(prompts, add_special_tokens=True, truncation=False)["input_ids"]
            encoded = [p + t for p, t in zip(prompt_ids, tok(texts, add_special_tokens=False)["input_ids"])]
            prompt_lengths = [len(p) for p in prompt_ids]
        packing = cfg.packing if packing is None else packing
        if packing:
            encoded, texts, ids = self._pack(encoded)
            prompt_lengths = [0] * len(encoded)
        too_long = [i for i, e in enumerate(encoded) if len(e) > cfg.max_length]
        if too_long and not cfg.truncation:
            raise DataError(
                f"{where}: {len(too_long)} document(s) exceed task.max_length={cfg.max_length} tokens (the first, id "
                f"{int(ids[too_long[0]])}, has {len(encoded[too_long[0]])}); set task.truncation: true, raise "
                f"task.max_length (the model's context is {self.context}) or use task.packing: true"
            )
        vocab = self._vocab or len(tok)
        highest = max((max(e) for e in encoded if e), default=0)
        if highest >= vocab:
            raise DataError(f"{where}: token id {highest} is outside the model's vocabulary of {vocab}: the tokenizer "
                            "does not belong to this model")
        encoded = [e[: cfg.max_length] for e in encoded]
        empty = [i for i, e in enumerate(encoded) if len(e) == 0]
        if empty:
            raise DataError(f"{where}: document id {int(ids[empty[0]])} has no tokens: drop empty documents")
        width = max(len(e) for e in encoded)
        n = len(encoded)
        token_ids = torch.full((n, width), int(tok.pad_token_id), dtype=torch.long)
        mask = torch.zeros(n, width, dtype=torch.long)
        for i, e in enumerate(encoded):
            token_ids[i, : len(e)] = torch.tensor(e, dtype=torch.long)
            mask[i, : len(e)] = 1
        inputs = torch.stack([token_ids, mask], dim=1)  # [N, 2, L]
        if self.kind == "sequence_classification":
            index = {c: i for i, c in enumerate(self.classes)}
            raw = records[cfg.label_column] if cfg.label_column in records.column_names else None
            if raw is None:
                raise DataError(f"{where} has no label column '{cfg.label_column}': sequence classification needs labels")
            unknown = sorted({r for r in raw if r not in index}, key=str)
            if unknown:
                raise DataError(f"{where}: labels {unknown[:5]} were not seen in training (classes {self.classes[:10]})")
            targets = torch.tensor([index[r] for r in raw], dtype=torch.long)
            return Examples(inputs, targets, ids, np.asarray(raw), np.asarray(texts, dtype=object), padded=True)
        targets = torch.where(mask.bool(), token_ids, torch.full_like(token_ids, IGNORE))  # [N, L]
        if cfg.completion_only:
            for i, length in enumerate(prompt_lengths):
                targets[i, : min(length, width)] = IGNORE
        scored = (targets[:, 1:] != IGNORE).sum(1)
        if bool((scored == 0).any()):
            first = int(torch.nonzero(scored == 0)[0, 0])
            raise DataError(f"{where}: document id {int(ids[first])} has no target tokens (a single token, or a prompt "
                            "filling max_length with completion_only): drop it or raise task.max_length")
        return Examples(inputs, targets, ids, scored.numpy(), np.asarray(texts, dtype=object), padded=True)

    def _pack(self, encoded: list[list[int]]):
        """Concatenate documents with EOS between and cut into max_length blocks (the last, shorter, kept)."""
        eos = self.tokenizer.eos_token_id
        stream = [t for e in encoded for t in (e + ([eos] if eos is not None else []))]
        size = self.task_config.max_length
        blocks = [stream[i : i + size] for i in range(0, len(stream), size)]
        texts = [self.tokenizer.decode(b) for b in blocks]
        return blocks, texts, np.arange(len(blocks), dtype=np.int64)

    def description(self) -> dict:
        cfg = self.task_config
        return {"name": self.name, "kind": self.kind, "dataset": str(cfg.dataset), "model": self.model_config.name_or_path,
                "max_length": cfg.max_length, "packing": cfg.packing, "completion_only": cfg.completion_only}


def _load_tokenizer(model: ModelConfig):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model.tokenizer or model.name_or_path)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has neither a pad nor an EOS token: give it a pad token")
        tokenizer.pad_token = tokenizer.eos_token  # right padding is masked out of every loss
    tokenizer.padding_side = "right"
    return tokenizer


def _instantiate(name_or_path: str, kind: str, n_classes: int, pad_id: int) -> nn.Module:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    quiet_hugging_face()
    common = {"dtype": torch.float32, "attn_implementation": "eager"}  # fp32 (CPUs), eager: works under torch.func
    if kind == "causal_lm":
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **common)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(name_or_path, **common)
        if model.config.num_labels != n_classes:
            raise DataError(f"the model at '{name_or_path}' has {model.config.num_labels} labels, the data {n_classes} "
                            "classes: use a classifier head of that size")
        model.config.pad_token_id = pad_id  # the last non-pad token is the one classified
    model.eval()
    return model


def _load_model(name_or_path: str, kind: str, n_classes: int, pad_id: int) -> nn.Module:
    return HFModel(_instantiate(name_or_path, kind, n_classes, pad_id)).eval()
