"""Job: train the final model if its weights are missing, then build the gradient store at store.path."""

from _job import run

if __name__ == "__main__":
    run(["train", "--skip-if-trained", "--quiet"], ["build", "--quiet"])
