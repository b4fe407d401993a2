"""Job: train the final model if its weights are missing, then run the further-training gold standard."""

from _job import run

if __name__ == "__main__":
    run(["train", "--skip-if-trained", "--quiet"], ["ground-truth", "--quiet"])
