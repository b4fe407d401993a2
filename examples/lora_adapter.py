# %% [markdown]
# # A LoRA adapter
#
# What most practitioners attribute is a fine-tuned adapter. Its folder is the model: tdastore loads base +
# adapter with `peft`, and `modules: auto` takes the modules whose weights train, so the store's rows hold the
# adapter's parameters only (the frozen base is not part of the fine-tuning).

# %%
import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import tdastore
from tdastore.demo_text import make_tiny_lm

make_tiny_lm("runs/lm", documents=120, train_steps=40, max_length=32)  # the base model and its corpus

# %% [markdown]
# Fine-tune a LoRA adapter on the attention projections (a few AdamW steps on the corpus) and save it as PEFT
# does: the folder's `adapter_config.json` names the base model.

# %%
documents = [json.loads(line)["text"] for line in Path("runs/lm/corpus.jsonl").read_text().splitlines()][:96]
tokenizer = AutoTokenizer.from_pretrained("runs/lm/model")
base = AutoModelForCausalLM.from_pretrained("runs/lm/model")
torch.manual_seed(0)
lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"]))
optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-3)
for step in range(20):
    batch = tokenizer(documents[8 * (step % 12) : 8 * (step % 12) + 8], return_tensors="pt", padding=True,
                      truncation=True, max_length=32)  # fmt: skip
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    loss = lora(**batch, labels=labels).loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
lora.save_pretrained("runs/lm-lora")
trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
print(f"adapter: {trainable} trainable parameters of {sum(p.numel() for p in lora.parameters())}")

# %% [markdown]
# The adapter folder is the model. Rows hold the adapter's `lora_A` / `lora_B` parameters only.

# %%
settings = {
    "task": {"kind": "causal_lm", "dataset": "runs/lm/corpus.jsonl", "max_length": 32, "id_column": "id"},
    "model": {"name_or_path": "runs/lm-lora"},  # or {"name_or_path": "runs/lm/model", "adapter": "runs/lm-lora"}
    "gradients": {"modules": "auto"},
    "projection": {"kind": "factored", "factors": [8, 8]},
    "attribution": {"scale": "raw"},  # grad_cos scores are then cosines (the paper's scale divides by n)
}
store = tdastore.build(tdastore.load_config(settings), "runs/lora-store", progress=False)
print(store)
print("modules:", ", ".join(store.manifest["projection"]["modules"]))

# %%
pair = {"prompt": "Return a new", "completion": " list of the items"}
top = tdastore.Attributor(store, "grad_cos").top_k([pair], k=3)
for row in top.to_pylist():
    print(f"rank {row['rank']}: cosine {row['score']:.4f} train {row['train_id']} {row['train_text'][:50]!r}")
