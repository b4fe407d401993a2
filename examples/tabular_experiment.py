# %% [markdown]
# # The paper's experiment on a new tabular data set
#
# The whole experiment of *Final-Model-Only Data Attribution with a Unifying View of Gradient-Based Methods* on
# scikit-learn's wine data set (178 rows, 13 features, 3 classes; the quickstart runs diabetes and
# breast_cancer): train the final model, build its gradient store, run the further-training gold standard as a
# Ray job pool, and measure how well each gradient-based method approximates it. Sized to run in about a
# minute on 2 cores: more seeds, left-out rows and further training make the curves smoother.
#
# The same from the shell: `tdastore train`, `tdastore build`, `tdastore ground-truth`, `tdastore evaluate`,
# each with `--config wine.yaml` (the settings below as YAML).

# %%
import os

import zarr

import tdastore
from tdastore.evaluate.run import evaluate
from tdastore.groundtruth.pool import run_groundtruth

config = tdastore.load_config(
    {
        "task": {"dataset": "wine"},  # a bundled name, or a .csv / .parquet file with `target: COLUMN`
        "model": {"hidden": [64, 64]},
        "train": {"lr": 0.05, "batch_size": 32, "epochs": 100, "output_dir": "runs/wine/model"},
        "store": {"chunk_rows": 64, "shard_rows": 64},
        "groundtruth": {  # further training at a tenth of the training rate, leaving out one row at a time
            "lr": 0.005,
            "batch_size": 32,
            "epochs": 40,
            "eval_every": 4,
            "seeds": 4,
            "seed_block": 4,
            "left_out_count": 40,
            "left_out_block": 40,
            "output": "runs/wine/groundtruth",
        },
    }
)
tdastore.train(config, progress=False)
store = tdastore.build(config, "runs/wine/store", progress=False)
print(store)

# %% [markdown]
# The gold standard: for every seed, one further-training run on all rows and one per left-out row; the
# attribution of row i at test point z is how much g(z) changes when i is left out (averaged over seeds).

# %%
groundtruth = run_groundtruth(config, progress=False)  # its absolute path
loo = zarr.open_array(groundtruth / "loo.zarr")  # g(z) after leaving out row i: [evaluations, test, left out, seeds]
print(f"gold standard: {os.path.relpath(groundtruth)}, leave-one-out runs {loo.shape}")

# %% [markdown]
# Every method of the unified view against it (exact path: the model has 5,251 parameters), cosine per
# evaluation point. `runs/wine/evaluation` holds `report.md`, `results.json`, `cosine.png`, `seed_curves.png`.

# %%
methods = ["grad_dot", "grad_cos", "if_gn", "if_diag", "datainf", "ekfac", "adam_dot"]
results = evaluate(store, groundtruth, methods=methods, out="runs/wine/evaluation", progress=False)
points = [0, 4, 9]  # the first, a middle and the last evaluation point (epochs 4, 20, 40)
print("method     " + "".join(f"  epoch {4 * (p + 1):>2}" for p in points))
for name in methods:
    cosine = results["methods"][name]["cosine"]
    print(f"{name:<10} " + "".join(f"  {cosine[p]:8.3f}" for p in points))
