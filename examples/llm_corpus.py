# %% [markdown]
# # A causal LM's corpus, token by token
#
# Index the training documents of a causal language model, ask which documents most raise (or lower) the
# model's loss on new prompts, and see which tokens of each document carry the score. The demo function trains
# a small GPT-2 offline and writes its corpus; with your own model, point `name_or_path` at its folder (or hub
# name) and `dataset` at your documents: a `datasets` folder (as here), a .jsonl / .parquet / .csv / .txt file
# or a hub data set.

# %%
import datasets

import tdastore
from tdastore.attribution.render import strongest_tokens, write_token_scores
from tdastore.demo_text import make_tiny_lm

make_tiny_lm("runs/lm", documents=120, train_steps=40, max_length=32)  # runs/lm/model, runs/lm/corpus.jsonl
corpus = datasets.load_dataset("json", data_files="runs/lm/corpus.jsonl", split="train")
corpus.save_to_disk("runs/lm/corpus")  # a `datasets` folder: columns id and text
print(corpus)

# %% [markdown]
# A factored store over every matrix of the model (`modules: all`: embeddings, attention, MLPs, the tied head):
# each layer's activations and output gradients are projected to 8 x 8 before their outer product, so no
# per-example gradient is ever formed.

# %%
settings = {
    "task": {"kind": "causal_lm", "dataset": "runs/lm/corpus", "max_length": 32, "id_column": "id"},
    "model": {"name_or_path": "runs/lm/model"},
    "gradients": {"modules": "all"},
    "projection": {"kind": "factored", "factors": [8, 8]},
    "attribution": {"scale": "raw"},  # inner products, not the paper's 1/n
}
store = tdastore.build(tdastore.load_config(settings), "runs/lm-store", progress=False)
print(store)

# %% [markdown]
# The documents that most help (top) and most hurt (bottom) the loss of a prompt, by EK-FAC influence.

# %%
prompts = ["Return the number of items in", "Create a new dictionary from"]
attributor = tdastore.Attributor(store, "ekfac")
top = attributor.top_k(prompts, k=3)
for row in top.to_pylist():
    print(f"prompt {row['test_id']} rank {row['rank']}: {row['score']:.4g} {row['train_text'][:60]!r}")
bottom = attributor.bottom_k(prompts[:1], k=2)
print("opponents of prompt 0:", [(r["train_id"], round(r["score"], 4)) for r in bottom.to_pylist()])

# %% [markdown]
# Which tokens of each top document carry its score (each token's share of the document's score; the shares sum
# to it), rendered as coloured HTML and PNG. Open `runs/tokens/tokens.html` in a browser.

# %%
tokens = attributor.token_scores(prompts[:1], k=2)
write_token_scores(tokens, "runs/tokens")  # tokens.parquet, tokens.html (coloured by share), tokens.png
print(strongest_tokens(tokens, per_hit=6))

# %% [markdown]
# A completion or a chat, measured on the answer's tokens only: the measurement is chosen at query time, on
# the same store.

# %%
answers = tdastore.Attributor(store, "ekfac", {"attribution": {"measurement": "completion"}}, share=attributor)
pair = {"prompt": "Return a new", "completion": " list of the items"}
chat = {
    "messages": [{"role": "user", "content": "Return a new"}, {"role": "assistant", "content": " list of the items"}]
}
by_pair, by_chat = answers.top_k([pair], k=3), answers.top_k([chat], k=3)
print("completion:", [(r["train_id"], round(r["score"], 4)) for r in by_pair.to_pylist()])
print("same chat: ", [(r["train_id"], round(r["score"], 4)) for r in by_chat.to_pylist()])
