# %% [markdown]
# # Your own PyTorch model, in a notebook
#
# A model you trained yourself and its training data, handed to tdastore as Python objects: no task class and
# no config file. Run it as a script (`python examples/own_model.py`) or open it as a notebook (the `# %%`
# cells are Jupytext's / VS Code's percent format).

# %%
import torch
from sklearn.datasets import load_diabetes
from torch import nn

import tdastore

X, y = (torch.tensor(a, dtype=torch.float32) for a in load_diabetes(return_X_y=True))
X, y = (X - X.mean(0)) / X.std(0), (y - y.mean()) / y.std()
torch.manual_seed(0)
net = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 1))
optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
for _ in range(300):  # your training loop; the weights it leaves are the final model
    optimizer.zero_grad()
    ((net(X[:400]).squeeze(-1) - y[:400]) ** 2).mean().backward()
    optimizer.step()


def per_example_loss(outputs, targets):  # outputs [B, 1], targets [B] -> [B]
    return (outputs.squeeze(-1) - targets) ** 2


# %% [markdown]
# Build the store: per-example gradients of every parameter (no projection: 193 parameters), computed by Ray
# workers and written to `runs/mine`. The model's current weights are the final model.

# %%
config = tdastore.load_config({"projection": {"kind": "none"}, "build": {"workers": 1}})
store = tdastore.build(config, "runs/mine", model=net, loss=per_example_loss, data=(X[:400], y[:400]))
print(store)

# %% [markdown]
# Query new points as `(inputs, targets)`. The store `build` returned remembers the objects.

# %%
top = store.attributor("grad_dot").top_k((X[400:], y[400:]), k=3)  # new points as (inputs, targets)
print(top.to_pandas().head(6).round(5).to_string(index=False))

# %% [markdown]
# Opponents (the most negative scores: removing them lowers the test loss), an influence function, and the
# full score matrix, streamed in blocks. A store opened later takes the objects again.

# %%
reopened = tdastore.open_store("runs/mine")
influence = tdastore.Attributor(reopened, "if_gn", model=net, loss=per_example_loss, data=(X[:400], y[:400]))
opponents = influence.bottom_k((X[400:], y[400:]), k=2)
print(opponents.to_pandas().head(4).round(5).to_string(index=False))
blocks = [block for _, block in influence.scores((X[400:], y[400:]))]  # [test, rows of a block] each
scores = torch.cat([torch.as_tensor(b) for b in blocks], dim=1)
print(f"score matrix {tuple(scores.shape)}, test point 0's largest score {scores[0].max().item():.5f}")
